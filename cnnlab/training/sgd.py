"""SGD with momentum, Nesterov and weight decay for CPU training: step for step what torch.optim.SGD
computes there (its single-tensor path, torch's choice for CPU tensors), without torch.optim's
wrappers. Every torch.optim optimizer imports torch._dynamo on its first add_param_group, step,
zero_grad or state_dict: 0.8 s, a sixth of the fastest recipes' whole run on 2 cores.

The state dict is torch.optim.SGD's own layout, so a checkpoint loads into either class. It is not
a torch.optim.Optimizer: torch's lr schedulers refuse it (cnnlab's schedule is optim.lr_factor),
and a callback that needs one can train with --optimizer adam or on a GPU."""
from collections import defaultdict

import torch

# torch.optim.SGD's group settings, which its state_dict carries; cnnlab always uses these values
# for the ones it has no setting for
DEFAULTS = dict(dampening=0, maximize=False, foreach=None, differentiable=False, fused=None)


class SGD:
    def __init__(self, params, lr, momentum=0.0, nesterov=False, weight_decay=0.0):
        params = list(params)
        groups = params if params and isinstance(params[0], dict) else [{"params": params}]
        self.defaults = dict(lr=lr, momentum=momentum, weight_decay=weight_decay, nesterov=nesterov, **DEFAULTS)
        self.param_groups = []
        for group in groups:
            self.add_param_group(group)
        self.state = defaultdict(dict)   # parameter -> {"momentum_buffer": tensor}, as in torch.optim

    def add_param_group(self, group):
        self.param_groups.append({**self.defaults, **group, "params": list(group["params"])})

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
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
        return loss

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
        """A state dict of this class or of torch.optim.SGD: the saved group settings replace the
        live ones (the lr_mult of --backbone-lr-mult among them), buffers go to each parameter's
        device and dtype."""
        if len(saved["param_groups"]) != len(self.param_groups) or any(
                len(s["params"]) != len(g["params"]) for s, g in zip(saved["param_groups"], self.param_groups)):
            raise ValueError("loaded state dict has a different number of parameter groups or parameters")
        params = [p for g in self.param_groups for p in g["params"]]
        for group, s in zip(self.param_groups, saved["param_groups"]):
            group.update({k: v for k, v in s.items() if k != "params"})
        self.state = defaultdict(dict)
        for i, s in saved["state"].items():
            p = params[int(i)]
            self.state[p] = {k: v.to(p.device, p.dtype) if torch.is_tensor(v) else v for k, v in s.items()}
