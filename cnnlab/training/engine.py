"""The engine: the training step, one step of the loop, and the evaluation pass. `fit()` (loop.py)
drives them; `Progress` (progress.py) holds where the run is.

Batches and augmentation are functions of (seed, epoch, step), and everything else that changes
goes into last.pt, so a resumed run replays exactly the steps an uninterrupted one would have taken.
"""
import math
import os

import torch
from torch.nn import functional as F

from ..errors import CnnlabError
from .optim import l2_penalty, set_lr


class Interrupted(Exception):
    """Training stopped on SIGINT/SIGTERM: between steps after writing last.pt, or (`evaluating`)
    during the final evaluation, when every epoch's weights are saved and only the test results
    are missing. Its message says how to go on."""

    def __init__(self, run_dir, signum, world=1, evaluating=False, finished_epochs=True):
        self.run_dir, self.signum, self.evaluating = run_dir, signum, evaluating
        resume = f"cnnlab train --resume {run_dir}" + (f" --nproc {world}" if world > 1 else "")
        if not evaluating:
            message = f"stopped by signal {signum}; last.pt written. Resume with:\n  {resume}"
        elif finished_epochs:   # a resumed run with nothing left to train tests best.pt and writes the rest
            message = (f"stopped by signal {signum} during the final evaluation; training had finished (best.pt and "
                       f"last.pt are written). Finish the test results, summary.json and the report with:\n  {resume}")
        else:                   # stopped early: a resume would train again, so the results come from best.pt
            message = (f"stopped by signal {signum} during the final evaluation; training had stopped early (best.pt "
                       f"is written). See the test results with `cnnlab evaluate {run_dir}` and write the report "
                       f"with `cnnlab report {run_dir}`.")
        super().__init__(message)


def make_step(model, optimizer, cfg, ctx, *, forward=None, ema=None, class_weight=None):
    """One optimisation step on a batch at a given lr; returns (summed loss, correct count) as
    device tensors, so nothing waits for the device. `forward`: the training wrapper of `model`
    (DDP, torch.compile); `ema`: the averaged model to update after the step; `class_weight`:
    --class-weights as a (K,) tensor. `yb`: labels (B,), or soft targets (B, K) under mixup/cutmix."""
    forward = model if forward is None else forward   # not `or`: a compiled module's truth test calls len()

    def step(xb, yb, lr):
        set_lr(optimizer, lr)
        with ctx.autocast():
            logits = forward(xb)
            loss = training_loss(logits.float(), yb, class_weight, cfg.label_smoothing)
        total = loss + cfg.l2 * l2_penalty(model) if cfg.l2 else loss
        optimizer.zero_grad(set_to_none=True)
        total.backward()
        if cfg.grad_clip:
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        optimizer.step()
        if ema is not None:
            ema.update_parameters(model)
        hard = yb if yb.ndim == 1 else yb.argmax(1)   # a mixed image counts as its larger part's class
        return loss.detach() * len(yb), (logits.argmax(1) == hard).sum()
    return step


def training_loss(logits, targets, class_weight=None, smoothing=0.0):
    """Cross-entropy with labels or soft targets, label smoothing on top of either ((1 - eps) *
    target + eps / K), each sample weighted by its class weight, averaged over the B samples.
    Divided by B, not by the batch's summed weights (PyTorch's weighted mean): each DDP rank's
    loss is then its share of the one-process loss, and the auto weights average 1 per sample."""
    loss = F.cross_entropy(logits, targets, weight=class_weight, label_smoothing=smoothing, reduction="sum")
    return loss / len(targets)


def class_weights(setting, labels, classes):
    """--class-weights as a (K,) float tensor, or None for `none`. auto: inverse class frequency,
    scaled so the training samples' weights average 1 (scikit-learn's "balanced": N / (K * n_k));
    a class absent from the training split gets 0."""
    from ..config import class_weight_values
    from ..errors import UsageError

    values = class_weight_values(setting)
    if values == "none":
        return None
    if values != "auto":
        if len(values) != len(classes):
            raise UsageError(f"--class-weights has {len(values)} numbers but the data has {len(classes)} classes "
                             f"({', '.join(map(str, classes[:10]))}{' ...' if len(classes) > 10 else ''}): give one per class.")
        return torch.tensor(values, dtype=torch.float32)
    counts = torch.bincount(labels.cpu(), minlength=len(classes)).float()
    present = counts > 0
    weights = torch.where(present, len(labels) / (int(present.sum()) * counts.clamp_min(1)), torch.zeros_like(counts))
    return weights


def train_step(state, xb, yb):
    """One step of the loop at the scheduled lr, counted in the epoch's running sums."""
    progress, cfg = state.progress, state.cfg
    lr = progress.next_lr(cfg, len(state.train_loader))
    try:
        loss_sum, correct = state.step(xb, yb, lr)
    except torch.cuda.OutOfMemoryError:
        raise CnnlabError(
            f"--batch-size {cfg.batch_size} does not fit in GPU memory with model '{cfg.model}' "
            f"(out of memory at epoch {progress.epoch + 1}, step {progress.step + 1}); try --batch-size "
            f"{max(1, cfg.batch_size // 2)}, or --amp bf16 to halve activation memory.") from None
    progress.add_step(loss_sum, correct, len(yb))
    if state.lookahead is not None:
        state.lookahead.after_step(progress.global_step, cfg.epochs * len(state.train_loader))
    check_every = 1 if state.ctx.device.type == "cpu" else 25   # a finiteness check syncs the GPU
    if progress.step % check_every == 0 and not progress.loss_is_finite():
        raise non_finite(state)


def epoch_results(state):
    """The finished epoch's training totals over all ranks, and its validation pass (None without
    a validation split)."""
    train = state.progress.epoch_totals(state.ctx)
    if not math.isfinite(train["loss"]):   # steps between GPU checks, or another rank's loss
        raise non_finite(state)
    if not state.has_val:
        return train, None
    return train, evaluate(state.eval_model, state.val_loader, state.ctx, len(state.data.classes))


def non_finite(state):
    """The error of a NaN or inf training loss, saying truthfully whether a checkpoint is left."""
    progress, run = state.progress, state.run
    kept = run is not None and os.path.exists(run.file("last.pt"))
    return CnnlabError(f"loss became non-finite at epoch {progress.epoch + 1}, step {progress.step} (lr "
                       f"{progress.lr:.3g}); training stopped and "
                       + ("the last good checkpoint (last.pt) was kept" if kept else "no checkpoint was written yet")
                       + ". Try a lower --lr, --grad-clip 1, or --amp off.")


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
        out["probs"] = stored_order(gather_shards(probs, ctx) if probs else torch.zeros(0, num_classes), loader)
        out["losses"] = stored_order(gather_shards(losses, ctx) if losses else torch.zeros(0), loader)
    return out


def depends_on_batch(net):
    """Whether `net` in eval mode still normalises with each batch's own statistics (a batch norm
    without running statistics: net_res_deep's shared one, as the book measured it). Its results
    then depend on what a batch holds, so it is evaluated in a mixed order (BatchLoader.mixed): a
    class folder's test split in stored order gives one-class batches, and normalising each by
    its own statistics erases the class. Seed 002's NetResDeep scored 72.0% that way, 85.0% in
    mixed batches (the book: 0.86)."""
    return any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) and not m.track_running_stats
               for m in net.modules())


def stored_order(per_sample, loader):
    """Per-sample results of `loader`, put back in its split's order when it evaluated mixed."""
    if not getattr(loader, "mixed", False) or len(per_sample) == 0:
        return per_sample
    stored = torch.empty_like(per_sample)
    stored[loader.order(0).cpu()] = per_sample
    return stored


def gather_shards(parts, ctx):
    """Per-batch CPU tensors of this rank -> the whole split's, in the loader's order. Under DDP
    rank r holds samples r, r + world, ... of each batch (BatchLoader.make_batch): every rank's
    parts are gathered and interleaved back, so per-sample results line up with the split."""
    if not ctx.distributed:
        return torch.cat(parts)
    import torch.distributed as dist

    ranks = [None] * ctx.world
    dist.all_gather_object(ranks, parts)
    merged = []
    for shards in zip(*ranks):
        batch = shards[0].new_empty((sum(len(s) for s in shards), *shards[0].shape[1:]))
        for r, shard in enumerate(shards):
            batch[r::ctx.world] = shard
        merged.append(batch)
    return torch.cat(merged)


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
