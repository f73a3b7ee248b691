"""Optimizers and learning-rate schedules.

The schedule is a pure function of the global step (`lr_factor`): Progress.next_lr (progress.py)
makes it the current lr, and the step sets it on each group (`set_lr`) before it runs. Nothing to
save or restore, so resume is exact by construction.

`weight_decay` is the optimizer's own decay (decoupled for AdamW, added to the gradient for SGD and
Adam); `l2` is seed 002's explicit penalty `l2 * sum(w^2)` added to the loss, which Adam then
rescales per parameter, so the two differ for adaptive optimizers and coincide (up to a factor 2)
for plain SGD.
"""
import math

import torch

from ..config import make_config
from ..errors import UsageError
from . import cpu_optim


def build_optimizer(cfg, model, head=()):
    """`head`: the classifier's parameter names, which --backbone-lr-mult leaves at the full lr."""
    params = param_groups(cfg, model, head)
    # on a GPU torch's multi-tensor steps are faster, and their 0.8 s import of torch._dynamo does not count
    on_cpu = all(p.device.type == "cpu" for p in model.parameters())
    if cfg.optimizer == "sgd":
        kind = cpu_optim.SGD if on_cpu else torch.optim.SGD
        return kind(params, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov and cfg.momentum > 0,
                    weight_decay=cfg.weight_decay)
    if on_cpu:
        return cpu_optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay, decoupled=cfg.optimizer == "adamw")
    kind = torch.optim.Adam if cfg.optimizer == "adam" else torch.optim.AdamW
    return kind(params, lr=cfg.lr, weight_decay=cfg.weight_decay)


def param_groups(cfg, model, head):
    """The parameters to optimise: one group, or more with an `lr_mult` each that set_lr applies.
    --backbone-lr-mult gives the backbone's their own (fastai's discriminative lrs: pretrained
    features move slower than a new head). A network may also ask for a parameter's own `lr_mult`
    attribute (airbench's batch-norm shifts: models/airbench.py); its weight decay is divided by
    it, so the decay a step applies (lr x decay, for SGD and AdamW) stays that of the rest. The
    groups are in the optimizer's state_dict; a resumed run takes its config's
    (checkpoint.load_optimizer_state)."""
    head = set(head) if cfg.backbone_lr_mult != 1 else set()
    groups = {}
    for name, p in model.named_parameters():
        if p.requires_grad:
            backbone = cfg.backbone_lr_mult if head and name not in head else 1.0
            groups.setdefault((backbone, getattr(p, "lr_mult", 1.0)), []).append(p)
    if list(groups) == [(1.0, 1.0)]:
        return groups[1.0, 1.0]
    return [{"params": params, "lr_mult": backbone * own, "weight_decay": cfg.weight_decay / own}
            for (backbone, own), params in groups.items()]


def lr_factor(cfg, step, steps_per_epoch):
    """Multiplier of cfg.lr at global `step` (0-based): warmup, then the chosen schedule."""
    total = max(1, cfg.epochs * steps_per_epoch)
    epoch = step / steps_per_epoch
    warmup = cfg.warmup_epochs * steps_per_epoch
    if cfg.schedule == "onecycle":
        # linear ramp to the peak over the warmup (default 25% of training), linear decay to 0
        ramp = warmup or 0.25 * total
        return min(1.0, (step + 1) / ramp) if step < ramp else max(0.0, (total - step) / max(1, total - ramp))
    if warmup and step < warmup:
        return min(1.0, (step + 1) / warmup)   # a warm-up of a fractional step count never overshoots
    if cfg.schedule == "step":
        return cfg.gamma ** int(epoch // cfg.step_epochs)
    if cfg.schedule == "cosine":
        progress = (step - warmup) / max(1, total - warmup)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
    return 1.0


def set_lr(optimizer, lr):
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_mult", 1.0)


def l2_penalty(model):
    """Seed 002's explicit L2: the sum of squared parameters."""
    return sum(p.pow(2).sum() for p in model.parameters() if p.requires_grad)


# The settings lr_factor reads: a --resume that changes one of them changes the lr from the next step on.
SCHEDULE_KEYS = ("lr", "epochs", "schedule", "warmup_epochs", "step_epochs", "gamma")


def resumed_lr_change(saved, cfg, step, steps_per_epoch):
    """A note for a --resume whose schedule settings differ from the saved run's (`saved`: its config
    dict), e.g. a longer --epochs under cosine or one-cycle: the lr of the next step under the old and
    the new settings; None when they agree."""
    try:
        before = make_config({k: saved[k] for k in SCHEDULE_KEYS if k in saved}, base=cfg)
    except UsageError:   # a damaged saved config costs this note only
        return None
    old, new = (c.lr * lr_factor(c, step, steps_per_epoch) for c in (before, cfg))
    if math.isclose(old, new, rel_tol=1e-6, abs_tol=1e-12):
        return None
    changed = ", ".join(f"{k} {getattr(before, k)} -> {getattr(cfg, k)}" for k in SCHEDULE_KEYS
                        if getattr(before, k) != getattr(cfg, k))
    stretched = (f" the {cfg.schedule} schedule is {'stretched' if cfg.epochs > before.epochs else 'shortened'} to "
                 f"the new length of {cfg.epochs} epochs, so"
                 if before.epochs != cfg.epochs and cfg.schedule in ("cosine", "onecycle") else "")
    return (f"note: resumed with {changed}:{stretched} the lr jumps from {old:.3g} to {new:.3g} at epoch "
            f"{step // steps_per_epoch + 1} (global step {step}).")
