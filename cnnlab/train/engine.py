"""The training loop: `train_one_epoch()`, `evaluate()` and `fit()`, read top to bottom.

Everything that must survive a crash lives in `Progress` and goes into last.pt with the model,
optimizer, EMA and RNG states; batches and augmentation are functions of (seed, epoch, step), so
a resumed run replays exactly the steps an uninterrupted one would have taken.
"""
import signal
from dataclasses import asdict, dataclass, field

import torch
from torch.nn import functional as F

from ..errors import CnnlabError
from .optim import l2_penalty, lr_factor, set_lr


class Interrupted(Exception):
    """Training stopped on SIGINT/SIGTERM after writing last.pt."""

    def __init__(self, run_dir, signum):
        self.run_dir, self.signum = run_dir, signum
        super().__init__(f"interrupted; resume with: cnnlab train --resume {run_dir}")


@dataclass
class Progress:
    epoch: int = 0             # current epoch (0-based)
    step: int = 0              # next step inside it
    global_step: int = 0
    sums: list = field(default_factory=lambda: [0.0, 0, 0])   # this epoch's loss sum, correct, seen
    epoch_seconds: float = 0.0
    best_val_acc: float = -1.0
    best_epoch: int = 0
    bad_epochs: int = 0        # epochs since the best, for early stopping
    train_seconds: float = 0.0
    samples_seen: int = 0
    history: list = field(default_factory=list)


def make_step(model, forward, optimizer, cfg, ctx, ema):
    """One optimisation step on a batch; returns (summed loss, correct count) as device tensors,
    so nothing waits for the device until the epoch's totals are read."""
    def step(xb, yb, lr):
        set_lr(optimizer, lr)
        with ctx.autocast():
            logits = forward(xb)
            loss = F.cross_entropy(logits.float(), yb, label_smoothing=cfg.label_smoothing)
        total = loss + cfg.l2 * l2_penalty(model) if cfg.l2 else loss
        optimizer.zero_grad(set_to_none=True)
        total.backward()
        if cfg.grad_clip:
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        optimizer.step()
        if ema is not None:
            ema.update_parameters(model)
        return loss.detach() * len(yb), (logits.argmax(1) == yb).sum()
    return step


def train_one_epoch(step, loader, epoch, progress, ctx, cfg, on_step):
    """Run the rest of `epoch` from progress.step; `on_step` may save or stop after any step."""
    device = ctx.device
    loss_sum = torch.tensor(progress.sums[0], device=device, dtype=torch.float64)
    correct = torch.tensor(progress.sums[1], device=device)
    seen = progress.sums[2]
    steps_per_epoch = len(loader)
    check_every = 1 if device.type == "cpu" else 25   # a finiteness check syncs the GPU
    for xb, yb in loader.batches(epoch, start=progress.step):
        lr = cfg.lr * lr_factor(cfg, progress.global_step, steps_per_epoch)
        try:
            batch_loss, batch_correct = step(xb, yb, lr)
        except torch.cuda.OutOfMemoryError:
            raise CnnlabError(
                f"--batch-size {cfg.batch_size} does not fit in GPU memory with model '{cfg.model}' "
                f"(out of memory at epoch {epoch + 1}, step {progress.step + 1}); try --batch-size "
                f"{max(1, cfg.batch_size // 2)}, or --amp bf16 to halve activation memory.") from None
        loss_sum += batch_loss
        correct += batch_correct
        seen += len(yb)
        progress.step += 1
        progress.global_step += 1
        if progress.step % check_every == 0 and not torch.isfinite(loss_sum):
            raise non_finite(epoch, progress.step, lr)
        progress.sums = [loss_sum, correct, seen]
        on_step(lr)
    seen_t = torch.tensor(float(seen), device=device, dtype=torch.float64)
    totals = ctx.all_reduce(torch.stack([loss_sum.double(), correct.double(), seen_t]))
    if not torch.isfinite(totals[0]):   # steps between GPU checks, or another rank's loss
        raise non_finite(epoch, progress.step, cfg.lr * lr_factor(cfg, progress.global_step - 1, steps_per_epoch))
    return {"loss": float(totals[0] / totals[2]), "acc": float(totals[1] / totals[2]), "samples": int(totals[2])}


def non_finite(epoch, step, lr):
    return CnnlabError(f"loss became non-finite at epoch {epoch + 1}, step {step} (lr {lr:.3g}); training "
                       "stopped and the last good checkpoint was kept. Try a lower --lr, --grad-clip 1, or --amp off.")


def confusion_matrix(preds, targets, num_classes):
    """(K, K) int64 counts; row i, column j = true class i predicted as j."""
    idx = targets.to(torch.int64) * num_classes + preds.to(torch.int64)
    return torch.bincount(idx, minlength=num_classes * num_classes).reshape(num_classes, num_classes)


@torch.inference_mode()
def evaluate(model, loader, ctx, num_classes, collect=False):
    """Loss, accuracy, top-5, confusion matrix over a loader (sharded and all-reduced under DDP).
    With collect=True also the per-sample probabilities and losses (for plots of mistakes)."""
    was_training = model.training
    model.eval()
    device = ctx.device
    loss_sum = torch.zeros((), device=device, dtype=torch.float64)
    top5 = torch.zeros((), device=device, dtype=torch.int64)
    cm = torch.zeros(num_classes, num_classes, device=device, dtype=torch.int64)
    probs, losses = [], []
    for xb, yb in loader.batches():
        with ctx.autocast():
            logits = model(xb).float()
        per_sample = F.cross_entropy(logits, yb, reduction="none")
        loss_sum += per_sample.sum()
        cm += confusion_matrix(logits.argmax(1), yb, num_classes)
        if num_classes >= 10:
            top5 += (logits.topk(5, dim=1).indices == yb[:, None]).any(1).sum()
        if collect:
            probs.append(logits.softmax(1).cpu())
            losses.append(per_sample.cpu())
    model.train(was_training)
    ctx.all_reduce(loss_sum), ctx.all_reduce(cm), ctx.all_reduce(top5)
    n = int(cm.sum())
    out = {"loss": float(loss_sum) / max(1, n), "acc": float(cm.diag().sum()) / max(1, n), "cm": cm.cpu(),
           "top5": float(top5) / max(1, n) if num_classes >= 10 else None}
    if collect:
        out["probs"] = torch.cat(probs) if probs else torch.zeros(0, num_classes)
        out["losses"] = torch.cat(losses) if losses else torch.zeros(0)
    return out


class StopSignal:
    """SIGINT/SIGTERM set a flag; the loop finishes the current step, saves and stops."""

    def __init__(self):
        self.signum, self._old = None, {}

    def __enter__(self):
        try:
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._old[sig] = signal.signal(sig, self._handle)
        except ValueError:  # not the main thread (e.g. a notebook worker): no handlers
            pass
        return self

    def _handle(self, signum, frame):
        self.signum = signum

    def __exit__(self, *exc):
        for sig, old in self._old.items():
            signal.signal(sig, old)


def progress_state(progress, elapsed=0.0):
    """Progress as plain data for a checkpoint (device tensors read once, here); `elapsed` is the
    time spent so far in the unfinished epoch."""
    state = asdict(progress)
    state["sums"] = [float(progress.sums[0]), int(progress.sums[1]), int(progress.sums[2])]
    state["epoch_seconds"] = progress.epoch_seconds + elapsed
    return state


def snapshot(model):
    return {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}


def ema_model(model, decay):
    """--ema: an AveragedModel whose decay warms up; its update count `n_averaged` is a buffer, so
    last.pt carries it and a resumed run continues the same warm-up."""
    if not decay:
        return None
    from torch.optim.swa_utils import AveragedModel

    return AveragedModel(model, multi_avg_fn=ema_warmup_update(decay), use_buffers=True)


def ema_warmup_update(decay):
    """EMA with the usual warm-up (TensorFlow's ExponentialMovingAverage, timm, torchvision):
    decay_t = min(decay, (1 + t) / (10 + t)) after t earlier updates. A fixed 0.999 would keep ~37%
    of the random initial weights after 1,000 steps, far worse than the raw weights on short runs."""
    @torch.no_grad()
    def update(ema_params, params, n_averaged):
        # n_averaged is a device tensor: computing on it avoids a GPU sync every step
        weight = 1 - torch.clamp((1 + n_averaged) / (10 + n_averaged), max=decay)
        for ema_p, p in zip(ema_params, params):
            if ema_p.is_floating_point():
                ema_p.lerp_(p, weight.to(ema_p.dtype))
            else:   # integer buffers (BatchNorm's num_batches_tracked) are counts, not averages
                ema_p.copy_(p)
    return update


def eval_weights(model, ema):
    """The network to evaluate and save as best: the EMA average when --ema is on."""
    return ema.module if ema is not None else model
