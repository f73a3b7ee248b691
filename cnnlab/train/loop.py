"""`fit(cfg)`: data -> model -> loop -> run folder. The CLI's `train` and the Python API's
`cnnlab.train()` both end here."""
import math
import os
import sys
import time

import torch

from . import checkpoint
from ..config import make_config
from ..data import default_augment, load_data
from ..data.loader import BatchLoader
from .engine import (Interrupted, Progress, StopSignal, evaluate, ema_model, eval_weights, make_step,
                     progress_state, snapshot, train_one_epoch)
from ..errors import UsageError
from ..models import count_params, create_model
from .optim import build_optimizer
from .run_folder import RunFolder, check_writable, default_name, read_json
from ..runtime import rng_state, set_rng_state, setup, teardown

# Settings that define what a run IS; changing them on --resume would silently mix two runs.
MUST_MATCH = ("data", "classes", "model", "model_args", "image_size", "val_fraction", "test_fraction",
              "train_samples", "val_samples", "test_samples", "seed", "batch_size", "optimizer", "augment")


class Result:
    """What `cnnlab.train()` returns: the run folder, its summary and per-epoch history."""

    def __init__(self, run_dir, summary, history):
        self.run_dir, self.summary, self.history = run_dir, summary, history

    def plot(self):
        from ..evaluate.plots import curves_figure

        return curves_figure(self.history)

    def __repr__(self):
        return f"Result(run_dir={self.run_dir!r}, test_acc={self.summary.get('test_acc')})"


def resume_config(run_dir, overrides):
    """The saved config with the allowed overrides applied; refuses changes to MUST_MATCH keys."""
    from ..config import load_yaml

    if not os.path.exists(os.path.join(run_dir, "last.pt")):
        raise UsageError(f"cannot resume: {run_dir} has no last.pt (is it a cnnlab run folder?).")
    saved = make_config(load_yaml(os.path.join(run_dir, "config.yaml")))
    changed = [k for k in MUST_MATCH if k in overrides and make_config({k: overrides[k]}).to_dict()[k] != getattr(saved, k)]
    if changed:
        diffs = ", ".join(f"{k}: {getattr(saved, k)!r} -> {overrides[k]!r}" for k in changed)
        raise UsageError(f"cannot resume {run_dir} with a different {diffs}; start a new run instead.")
    return make_config({k: v for k, v in overrides.items() if k != "out"}, base=saved)


def fit(cfg=None, resume=None, quiet=False, **overrides):
    """Train a model; returns a Result. `resume` is a run folder to continue from its last.pt."""
    if resume:
        cfg = resume_config(resume, overrides)   # flags given with --resume, checked against the run
    elif cfg is None or overrides:
        cfg = make_config(overrides, base=cfg)
    ctx = setup(cfg)
    log = print if ctx.is_main and not quiet else (lambda *a, **k: None)
    try:
        result = _fit(cfg, ctx, resume, log)
    except Interrupted:
        teardown(ctx)                 # every rank agreed to stop at the same step
        raise
    except BaseException:
        teardown(ctx, together=False)
        raise
    teardown(ctx)
    return result


def _fit(cfg, ctx, resume, log):
    if cfg.batch_size % ctx.world:
        raise UsageError(f"--batch-size {cfg.batch_size} (global) must be divisible by the {ctx.world} processes.")
    run_dir = resume or cfg.out or os.path.join("runs", default_name(cfg))
    check_names(cfg)
    if ctx.is_main:
        check_writable(run_dir, need_bytes=64 * 2**20)
    splits = read_json(os.path.join(resume, "splits.json")) if resume else None
    log(banner_title(bool(resume)), flush=True)   # at once: a large folder's first decode takes a minute
    data = load_data(cfg, splits=splits)
    model = create_model(cfg.model, data.shape, len(data.classes), **cfg.model_args).to(ctx.device)
    if cfg.channels_last:
        model = model.to(memory_format=torch.channels_last)
    optimizer, ema, progress = build_optimizer(cfg, model), ema_model(model, cfg.ema), Progress()
    best_state = None
    if resume:
        best_state = restore(os.path.join(resume, "last.pt"), model, optimizer, ema, progress, ctx)
    forward = wrap_for_training(model, cfg, ctx)
    augment = default_augment(data, cfg.augment)
    run = RunFolder(run_dir, ctx.is_main)
    meta = run_metadata(cfg, data, model, ctx, augment)
    print_settings(log, cfg, data, meta, run_dir)
    if not resume:
        run.create(cfg)
        run.write_json("splits.json", data.splits)
        if data.files.get("bad"):
            run.write_text("bad_images.txt", "\n".join(data.files["bad"]) + "\n")
    loader = lambda part, bs, **kw: BatchLoader(*part, bs, data.mean, data.std, ctx.device, rank=ctx.rank,
                                                world=ctx.world, channels_last=cfg.channels_last, **kw)
    train_loader = loader(data.train, cfg.batch_size, shuffle=True, seed=cfg.seed, augment=augment)
    val_loader = loader(data.val, cfg.eval_batch_size * ctx.world)
    step = make_step(model, forward, optimizer, cfg, ctx, ema)
    num_classes = len(data.classes)

    def save_last(elapsed=0.0):  # elapsed: seconds of the current, unfinished epoch
        run.save_checkpoint("last.pt", payload(model, meta, cfg, extra={
            "train_state": {"optimizer": optimizer.state_dict(), "ema": ema.state_dict() if ema else None,
                            "rng": rng_state(ctx.device), "progress": progress_state(progress, elapsed)}}))

    tensorboard = TensorBoard(run.file("tensorboard"), enabled=cfg.tensorboard and ctx.is_main)
    with StopSignal() as stop, tensorboard:
        for epoch in range(progress.epoch, cfg.epochs):
            start = time.perf_counter()
            bar = ProgressBar(len(train_loader), epoch, progress.step, cfg, log, enabled=ctx.is_main)
            def on_step(lr):
                elapsed = time.perf_counter() - start
                bar.update(progress, elapsed + progress.epoch_seconds)
                if cfg.save_every_steps and progress.global_step % cfg.save_every_steps == 0:
                    save_last(elapsed)
                if agreed_stop(stop, ctx):
                    save_last(elapsed)
                    raise Interrupted(run_dir, stop.signum)
            train = train_one_epoch(step, train_loader, epoch, progress, ctx, cfg, on_step)
            bar.close()
            val = evaluate(eval_weights(model, ema), val_loader, ctx, num_classes) if len(data.val[1]) else None
            seconds = time.perf_counter() - start + progress.epoch_seconds
            row = end_epoch(progress, epoch, train, val, optimizer.param_groups[0]["lr"], seconds)
            improved = progress.best_epoch == epoch + 1
            if improved:
                best_state = snapshot(eval_weights(model, ema))
                run.save_checkpoint("best.pt", payload(eval_weights(model, ema), meta, cfg,
                                                       metrics={"val_acc": row["val_acc"], "epoch": epoch + 1}))
            run.write_metrics(progress.history)
            tensorboard.log(row)
            save_last()
            log(epoch_line(row, cfg.epochs, improved))
            if cfg.patience and progress.bad_epochs >= cfg.patience:
                log(f"early stopping: no val improvement for {cfg.patience} epochs (best {progress.best_val_acc:.2%} "
                    f"at epoch {progress.best_epoch})")
                break
    return finish(model, best_state, data, cfg, ctx, run, meta, progress, log, loader)


def check_names(cfg):
    """Unknown dataset or model names fail before anything is written or loaded."""
    from ..data import check_data_name
    from ..models import model_names
    from ..errors import unknown

    check_data_name(cfg.data)
    if cfg.model not in model_names():
        raise unknown("model", cfg.model, model_names())


def agreed_stop(stop, ctx):
    """All ranks stop at the same step (else one would wait forever in an all-reduce)."""
    if not ctx.distributed:
        return stop.signum is not None
    flag = ctx.all_reduce(torch.tensor([1.0 if stop.signum else 0.0], device=ctx.device))
    if flag.item() and stop.signum is None:
        stop.signum = 15
    return bool(flag.item())


def end_epoch(progress, epoch, train, val, lr, seconds):
    """Record the epoch in `progress` and return its metrics.csv row."""
    val_loss, val_acc = (val["loss"], val["acc"]) if val else (math.nan, train["acc"])
    row = {"epoch": epoch + 1, "train_loss": train["loss"], "train_acc": train["acc"],
           "val_loss": val_loss, "val_acc": val_acc if val else math.nan, "lr": lr, "seconds": round(seconds, 3)}
    progress.history.append(row)
    progress.train_seconds += seconds
    progress.samples_seen += train["samples"]
    if val_acc > progress.best_val_acc:
        progress.best_val_acc, progress.best_epoch, progress.bad_epochs = val_acc, epoch + 1, 0
    else:
        progress.bad_epochs += 1
    progress.epoch, progress.step, progress.sums, progress.epoch_seconds = epoch + 1, 0, [0.0, 0, 0], 0.0
    return row


def finish(model, best_state, data, cfg, ctx, run, meta, progress, log, loader):
    """Evaluate the best weights once on the test split; write summary.json and the report."""
    raw_val_acc = None
    if cfg.ema and len(data.val[1]):  # the raw last weights, once: the diagnostics say when the EMA lags them
        raw_val_acc = evaluate(model, loader(data.val, cfg.eval_batch_size * ctx.world), ctx, len(data.classes))["acc"]
    if best_state is not None:
        model.load_state_dict(best_state)
    test = evaluate(model, loader(data.test, cfg.eval_batch_size * ctx.world), ctx, len(data.classes))
    history = progress.history
    summary = {
        "best_val_acc": progress.best_val_acc, "best_epoch": progress.best_epoch,
        "test_acc": test["acc"], "test_loss": test["loss"], "test_top5_acc": test["top5"],
        "epochs": len(history), "train_seconds": round(progress.train_seconds, 3),
        "samples_per_second": round(progress.samples_seen / max(progress.train_seconds, 1e-9), 1),
        **{k: meta[k] for k in ("model", "model_args", "data", "classes", "num_params", "device",
                                 "world_size", "global_batch_size", "augment")},
        "splits": {k: len(data.splits[k]) for k in ("train", "val", "test")},
        "stopped_early": len(history) < cfg.epochs,
        **({"raw_val_acc": raw_val_acc} if raw_val_acc is not None else {}),
    }
    from .diagnose import diagnose

    summary["diagnostics"] = diagnose(history, test["cm"], data.classes, raw_val_acc=raw_val_acc)
    run.write_json("summary.json", summary)
    log(f"test: loss {test['loss']:.4f}  acc {test['acc']:.2%}  (best val {progress.best_val_acc:.2%} at epoch "
        f"{progress.best_epoch}; {summary['train_seconds']:.1f}s, {summary['samples_per_second']:.0f} img/s)")
    if ctx.is_main and cfg.report:
        from ..evaluate.report import write_report

        write_report(run.path, data=data, quiet=True)
    log(f"run folder: {run.path}")
    return Result(run.path, summary, history)


def wrap_for_training(model, cfg, ctx):
    """The callable used for training forward passes: DDP and/or torch.compile around `model`."""
    forward = model
    if ctx.distributed:
        from torch.nn.parallel import DistributedDataParallel as DDP

        if cfg.sync_bn:
            model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
        forward = DDP(model, device_ids=[ctx.device.index] if ctx.device.type == "cuda" else None)
    if cfg.compile:
        forward = torch.compile(forward)
    return forward


def restore(path, model, optimizer, ema, progress, ctx):
    """Load last.pt into the live objects; returns the best weights so far (from best.pt)."""
    ckpt = checkpoint.load(path)
    state = ckpt["train_state"]
    model.load_state_dict(ckpt["state_dict"])
    optimizer.load_state_dict(state["optimizer"])
    if ema is not None and state["ema"] is not None:
        ema.load_state_dict(state["ema"])
    set_rng_state(state["rng"], ctx.device)
    for key, value in state["progress"].items():
        setattr(progress, key, value)
    best = os.path.join(os.path.dirname(path), "best.pt")
    return checkpoint.load(best)["state_dict"] if os.path.exists(best) else None


def run_metadata(cfg, data, model, ctx, augment):
    c, h, w = data.shape
    return {"model": cfg.model, "model_args": dict(cfg.model_args), "data": cfg.data, "classes": data.classes,
            "in_shape": [c, h, w], "num_params": count_params(model), "device": str(ctx.device),
            "world_size": ctx.world, "global_batch_size": cfg.batch_size, "augment": augment,
            "preprocess": {"channels": c, "image_size": h, "mean": data.mean, "std": data.std, "invert": False}}


def payload(model, meta, cfg, metrics=None, extra=None):
    """A self-describing checkpoint dict (see checkpoint.py)."""
    return {"model": {"name": meta["model"], "args": meta["model_args"], "in_shape": meta["in_shape"],
                      "num_classes": len(meta["classes"])},
            "classes": meta["classes"], "preprocess": meta["preprocess"], "config": cfg.to_dict(),
            "metrics": metrics or {}, "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
            **(extra or {})}


def banner_title(resumed):
    return "===== cnnlab train" + (" (resumed)" if resumed else "") + " ====="


def print_settings(log, cfg, data, meta, run_dir):
    """The resolved settings before training, like seed 004's HYPERPARAMETERS block (its title
    line, `banner_title`, is printed before the data is loaded)."""
    sizes = " / ".join(f"{len(data.splits[k])}" for k in ("train", "val", "test"))
    mem = data.nbytes() / 2**20
    log(f"data       {cfg.data}: {'x'.join(map(str, data.shape))}, {len(data.classes)} classes, "
        f"train/val/test {sizes} ({mem:.1f} MiB in memory), augment {meta['augment']}")
    log(f"model      {cfg.model} {meta['model_args'] or ''}({meta['num_params']:,} parameters)")
    log(f"optimizer  {cfg.optimizer} lr {cfg.lr:g}, batch {cfg.batch_size} (global), {cfg.epochs} epochs, "
        f"schedule {cfg.schedule}" + (f", weight decay {cfg.weight_decay:g}" if cfg.weight_decay else "")
        + (f", l2 {cfg.l2:g}" if cfg.l2 else ""))
    log(f"device     {meta['device']}" + (f" x {meta['world_size']} processes" if meta["world_size"] > 1 else "")
        + f", seed {cfg.seed}, amp {cfg.amp}")
    log(f"run folder {run_dir}")
    log("=" * 36)


def epoch_line(row, epochs, improved):
    return (f"epoch {row['epoch']:>3}/{epochs}  train loss {row['train_loss']:.4f} acc {row['train_acc']:7.2%}  "
            f"val loss {row['val_loss']:.4f} acc {row['val_acc']:7.2%}  lr {row['lr']:.2e}  "
            f"{row['seconds']:.1f}s" + ("  *" if improved else ""))


class TensorBoard:
    """--tensorboard: per-epoch scalars as TensorBoard event files in RUN/tensorboard; otherwise a
    do-nothing logger, so the loop never asks whether it is on."""

    def __init__(self, path, enabled):
        self.writer = None
        if enabled:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                raise UsageError("--tensorboard needs the tensorboard package: pip install 'cnnlab[tensorboard]'") from None
            self.writer = SummaryWriter(path)

    def log(self, row):
        if self.writer is not None:
            for key in ("train_loss", "train_acc", "val_loss", "val_acc", "lr"):
                group = "loss" if "loss" in key else "accuracy" if "acc" in key else "lr"
                self.writer.add_scalar(f"{group}/{key}", row[key], row["epoch"])

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        if self.writer is not None:
            self.writer.close()


class ProgressBar:
    """A tqdm bar inside the epoch when stdout is a terminal; plain `--log-every` lines otherwise,
    so log files don't fill with redraws."""

    def __init__(self, total, epoch, start, cfg, log, enabled):
        self.total, self.epoch, self.log = total, epoch, log
        self.every = max(1, round(cfg.log_every * total)) if cfg.log_every else 0
        self.bar = None
        if enabled and sys.stdout.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=total, initial=start, desc=f"epoch {epoch + 1}", leave=False, dynamic_ncols=True)

    def update(self, progress, elapsed):
        if self.bar is not None:
            self.bar.update(1)   # tqdm redraws at most 10 times a second
        if self.every and progress.step % self.every == 0:
            loss_sum, _, seen = progress.sums
            self.log(f"  epoch {self.epoch + 1} {progress.step / self.total:4.0%}  "
                     f"train loss {float(loss_sum) / max(1, seen):.4f}  took {elapsed:.1f}s")

    def close(self):
        if self.bar is not None:
            self.bar.close()
