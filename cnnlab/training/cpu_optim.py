"""SGD and Adam/AdamW for CPU training, without torch.optim's wrappers: every torch.optim optimizer
imports torch._dynamo on its first add_param_group, step, zero_grad or state_dict, 0.8 s, a sixth
of the fastest recipes' whole run on 2 cores.

- SGD (momentum, Nesterov, weight decay) is step for step what torch.optim.SGD computes there (its
  single-tensor path, torch's choice for CPU tensors).
- Adam and AdamW call the fused kernel torch.optim.Adam(fused=True) calls (torch._fused_adam_ and
  torch._fused_adamw_), step for step what that computes: one pass over each parameter instead of
  the single-tensor path's ten elementwise ops (seed 003's CNN: 0.48 -> 0.16 ms an update).

The state dicts are torch.optim's own layouts, so a checkpoint loads into either class (a GPU run
uses torch.optim). These are not torch.optim.Optimizer subclasses: torch's lr schedulers refuse
them (cnnlab's schedule is optim.lr_factor)."""
from collections import defaultdict

import torch

# the group settings torch.optim's state_dicts carry; cnnlab always uses these values for the ones
# it has no setting for
SGD_DEFAULTS = dict(dampening=0, maximize=False, foreach=None, differentiable=False, fused=None)
ADAM_DEFAULTS = dict(amsgrad=False, maximize=False, foreach=None, capturable=False, differentiable=False, fused=True)


class CpuOptimizer:
    """What both optimizers share: parameter groups, per-parameter state, zero_grad and state dicts.
    `unsupported`: torch.optim settings a loaded state dict may carry that this class does not apply."""
    unsupported = ("maximize",)

    def __init__(self, params, defaults):
        params = list(params)
        groups = params if params and isinstance(params[0], dict) else [{"params": params}]
        self.defaults = defaults
        self.param_groups = []
        for group in groups:
            self.add_param_group(group)
        self.state = defaultdict(dict)   # parameter -> its buffers, as in torch.optim

    def add_param_group(self, group):
        self.param_groups.append({**self.defaults, **group, "params": list(group["params"])})

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            self.update(group)
        return loss

    def update(self, group):
        """One group's step (the subclass's rule)."""
        raise NotImplementedError

    def zero_grad(self, set_to_none=True):
        for group in self.param_groups:
            for p in group["params"]:
                if set_to_none:
                    p.grad = None
                elif p.grad is not None:
                    p.grad.detach_().zero_()

    def state_dict(self):
        """Parameters by their index over the groups, as torch.optim.Optimizer.state_dict."""
        index = {id(p): i for i, p in enumerate(p for g in self.param_groups for p in g["params"])}
        groups = [{**{k: v for k, v in g.items() if k != "params"}, "params": [index[id(p)] for p in g["params"]]}
                  for g in self.param_groups]
        return {"state": {index[id(p)]: s for p, s in self.state.items()}, "param_groups": groups}

    def load_state_dict(self, saved):
        """A state dict of this class or of the torch.optim class it mirrors: the saved group settings
        replace the live ones (the lr_mult of --backbone-lr-mult among them), buffers go to each
        parameter's device and dtype, Adam's step count stays float32. (A --resume then puts back its
        config's settings: checkpoint.load_optimizer_state.)"""
        if len(saved["param_groups"]) != len(self.param_groups) or any(
                len(s["params"]) != len(g["params"]) for s, g in zip(saved["param_groups"], self.param_groups)):
            raise ValueError("loaded state dict has a different number of parameter groups or parameters")
        params = [p for g in self.param_groups for p in g["params"]]
        for group, s in zip(self.param_groups, saved["param_groups"]):
            group.update({k: v for k, v in s.items() if k != "params"})
        self.state = defaultdict(dict)
        for i, s in saved["state"].items():
            p = params[int(i)]
            self.state[p] = {k: like(p, v, k) if torch.is_tensor(v) else v for k, v in s.items()}
        used = [k for k in self.unsupported if any(g.get(k) for g in self.param_groups)]
        if used:   # followed as if it were off, the run would silently change
            raise ValueError(f"this state dict uses {' and '.join(used)}, which cnnlab's CPU {type(self).__name__} "
                             "does not.")


def like(p, saved, key):
    """A loaded buffer on p's device, in p's dtype AND memory layout (Adam's step count: a float32
    scalar): the fused kernel assumes one layout for a parameter, its gradient and its buffers, and
    a channels_last buffer against an NCHW parameter gave wrong updates silently."""
    if key == "step":
        return saved.to(p.device, torch.float32, copy=True)   # never shared with the dict it came from
    return torch.empty_like(p).copy_(saved)


class SGD(CpuOptimizer):
    def __init__(self, params, lr, momentum=0.0, nesterov=False, weight_decay=0.0):
        super().__init__(params, dict(lr=lr, momentum=momentum, weight_decay=weight_decay, nesterov=nesterov,
                                      **SGD_DEFAULTS))

    def update(self, group):
        lr, momentum, decay = group["lr"], group["momentum"], group["weight_decay"]
        for p in group["params"]:
            if p.grad is None:
                continue
            grad = p.grad if decay == 0 else p.grad.add(p, alpha=decay)
            if momentum != 0:
                buf = self.state[p].get("momentum_buffer")
                if buf is None:
                    buf = self.state[p]["momentum_buffer"] = grad.detach().clone()
                else:
                    buf.mul_(momentum).add_(grad, alpha=1 - group["dampening"])
                grad = grad.add(buf, alpha=momentum) if group["nesterov"] else buf
            p.add_(grad, alpha=-lr)


class Adam(CpuOptimizer):
    """Adam, or AdamW with `decoupled=True` (weight decay applied to the weights, not the gradient)."""
    unsupported = ("amsgrad", "maximize")

    def __init__(self, params, lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0, decoupled=False):
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay,
                                      decoupled_weight_decay=decoupled, **ADAM_DEFAULTS))

    def update(self, group):
        params = [p for p in group["params"] if p.grad is not None]
        if not params:
            return
        states = [self.state[p] or self._new_state(p) for p in params]
        steps = [s["step"] for s in states]
        torch._foreach_add_(steps, 1)
        fused = torch._fused_adamw_ if group["decoupled_weight_decay"] else torch._fused_adam_
        beta1, beta2 = group["betas"]
        fused(params, [p.grad for p in params], [s["exp_avg"] for s in states], [s["exp_avg_sq"] for s in states],
              [], steps, amsgrad=False, lr=group["lr"], beta1=beta1, beta2=beta2,
              weight_decay=group["weight_decay"], eps=group["eps"], maximize=False, grad_scale=None, found_inf=None)

    def _new_state(self, p):
        """torch.optim.Adam's lazy state for a fused step: a float32 step count beside the parameter."""
        state = self.state[p]
        state["step"] = torch.zeros((), dtype=torch.float32, device=p.device)
        state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        return state
