"""`fit(cfg)`: data -> model -> epochs of steps -> the test split once -> the run folder.

The loop itself (`train_loop`) reads top to bottom; checkpoints, stopping, console lines and the
run's files are callbacks (callbacks.py, console.py), and where the run is lives in Progress
(progress.py). The public `cnnlab.train()` (api.py) resolves the settings and calls `fit`.
"""
import os
from contextlib import contextmanager

import torch

from . import checkpoint
from .callbacks import Callbacks, Checkpoints, EarlyStopping, RunFiles, SignalStop, TensorBoard
from .console import Console, ProgressBar
from .diagnose import DivergenceWarning, diagnose
from .distributed import handling_stop_signals, wrap_for_training
from .engine import (Interrupted, class_weights, depends_on_batch, ema_model, epoch_results, evaluate, make_step, snapshot,
                     train_step)
from .finetune import FreezeBackbone, adapt_to_data, check_starting_weights, describe, load_pretrained
from .lookahead import Lookahead
from .optim import build_optimizer, resumed_lr_change
from .progress import Progress
from .resume import refuse_changes_to_trained_run
from .run_folder import RunFolder, check_writable, default_name
from .state import TrainState, silent
from .temperature import fit_temperature, split_logits, tempered
from ..data import load_data, read_splits
from ..data.augment import resolve_augment, strong_augment
from ..data.stream import make_loader
from ..config import ignored_settings
from ..errors import UsageError, note
from ..metrics import balanced_accuracy, per_class
from ..models import check_memory, create_model, model_args
from ..models.backbones import head_names
from ..runtime import setup, teardown


def fit(cfg, resume=None, quiet=False, callbacks=()):
    """Train with a resolved config (resume.resolve_config); returns the finished TrainState
    (run_dir, summary, history, test). `resume`: the run folder to continue exactly from its
    last.pt. `callbacks`: hooks run after the standard ones (e.g. the report)."""
    ctx = setup(cfg)
    run = RunFolder(resume or cfg.out or os.path.join("runs", default_name(cfg)), ctx.is_main)
    state = TrainState(cfg, ctx, run, resumed=bool(resume), log=print if ctx.is_main and not quiet else silent)
    hooks = Callbacks(standard_callbacks() + list(callbacks))
    together = True
    try:
        return train_loop(state, hooks)
    except Interrupted as e:
        together = not e.evaluating   # between steps every rank agreed to stop at the same one: they leave together
        raise
    except BaseException:
        together = False      # another rank may be gone
        raise
    finally:
        hooks.call("on_close", state)
        teardown(ctx, together=together)


def standard_callbacks():
    """What every run does, in this order: the run folder's files first (metrics.csv is written
    before last.pt, so a crash never leaves a checkpoint ahead of its metrics), console lines last."""
    return [RunFiles(), Checkpoints(), TensorBoard(), ProgressBar(), Console(), DivergenceWarning(), EarlyStopping(),
            SignalStop(), FreezeBackbone()]


def train_loop(state, hooks):
    """Epochs of steps, each epoch followed by a validation pass, then the test split once with
    the best weights. A hook's Stop ends it: at a step as an interruption, at an epoch's end as
    a finished run (early stopping)."""
    check_run(state)
    hooks.call("on_setup", state)
    prepare(state)
    hooks.call("on_start", state)
    progress = state.progress
    while progress.epoch < state.cfg.epochs:
        progress.start_epoch()
        hooks.call("on_epoch_start", state)
        for xb, yb in state.train_loader.batches(progress.epoch, start=progress.step):
            train_step(state, xb, yb)
            stop = hooks.call("on_step", state)
            if stop:
                hooks.call("on_interrupt", state)
                raise Interrupted(state.run_dir, stop.signum, state.ctx.world)
        state.row = progress.end_epoch(*epoch_results(state))
        if progress.improved:
            state.best_weights = snapshot(state.eval_model)
        if hooks.call("on_epoch_end", state):
            break
    with stop_at_once_on_signal(state):
        test_once(state)
        hooks.call("on_end", state)
    return state


@contextmanager
def stop_at_once_on_signal(state):
    """After the last step, SIGINT/SIGTERM stop the run at once (SignalStop only stops between
    steps, so a Ctrl-C during the test pass and the report used to be swallowed): the training is
    saved, and Interrupted says how to finish what is left."""
    finished = state.progress.epoch >= state.cfg.epochs

    def stop(signum, frame):
        raise Interrupted(state.run_dir, signum, state.ctx.world, evaluating=True, finished_epochs=finished)

    with handling_stop_signals(stop):
        yield


def check_run(state):
    """One-line errors before anything is printed, loaded or written."""
    cfg, ctx = state.cfg, state.ctx
    if cfg.batch_size % ctx.world:
        raise UsageError(f"--batch-size {cfg.batch_size} (global) must be divisible by the {ctx.world} processes.")
    check_names(cfg)
    for message in ignored_settings(cfg):
        note(f"note: {message}")
    if ctx.is_main:
        check_writable(state.run_dir, need_bytes=64 * 2**20)
    state.run.claim(resume=state.resumed, overwrite=cfg.overwrite)


def check_names(cfg):
    """Unknown dataset or model names fail before anything is written or loaded."""
    from ..data import check_data_name
    from ..models import check_model_name

    check_data_name(cfg.data)
    check_model_name(cfg.model)


def prepare(state):
    """The data (a resumed run keeps its splits), the model and what trains it; on --resume, the
    exact state of last.pt."""
    build(state, read_splits(state.run.path) if state.resumed else None)
    if state.cfg.patience and not state.has_val:   # refused before the run folder is written
        raise UsageError(f"--patience {state.cfg.patience} needs a validation split, and this run has none: "
                         "use a --val-fraction above 0, or drop --patience.")
    if state.cfg.calibrate and not state.has_val:
        raise UsageError("--calibrate fits a temperature on the validation split, and this run has none: use a "
                         "--val-fraction above 0, or drop --calibrate.")
    if state.resumed:
        saved = checkpoint.restore(state, state.run_dir)
        refuse_changes_to_trained_run(saved, state.cfg, state.progress.epoch, state.run_dir)
        change = resumed_lr_change(saved, state.cfg, state.progress.global_step, len(state.train_loader))
        if change:
            note(change)
    state.meta = checkpoint.metadata(state)


def build(state, splits=None):
    """Data, model, optimizer, EMA, the training step and the batch loaders, from state.cfg: the one
    path that both training and lr-find take."""
    cfg, ctx = state.cfg, state.ctx
    check_starting_weights(cfg)   # before the data: a photo folder's first decode takes minutes
    data = state.data = load_data(cfg.data_config(), splits=splits)
    # what training adds to the network itself (gradients, optimizer state, a batch's activations)
    # must fit on the device too: refused here before anything is allocated
    check_memory(cfg.model, data.shape, len(data.classes), model_args(cfg.model, cfg.model_args), "train",
                 batch=max(1, cfg.batch_size // ctx.world), device=ctx.device)
    model = create_model(cfg.model, data.shape, len(data.classes), **cfg.model_args)
    head = state.head = tuple(head_names(model, len(data.classes)))
    loaded = load_pretrained(cfg, model, data)   # before data.preprocess is read
    if loaded is None and not state.resumed:
        adapt_to_data(model, data, cfg.seed)
    state.fine_tune = describe(cfg, loaded, head)
    model = model.to(ctx.device)
    state.model = model.to(memory_format=torch.channels_last) if cfg.channels_last else model
    state.optimizer, state.ema = build_optimizer(cfg, state.model, head), ema_model(state.model, cfg.ema)
    state.lookahead = Lookahead(state.model) if cfg.lookahead else None
    state.progress = Progress(ctx.device)
    state.forward = wrap_for_training(state.model, cfg, ctx)
    weight = class_weights(cfg.class_weights, data.train[1], data.classes)
    state.step = make_step(state.model, state.optimizer, cfg, ctx, forward=state.forward, ema=state.ema,
                           class_weight=None if weight is None else weight.to(ctx.device))
    state.augment = resolve_augment(data, cfg.augment)
    state.train_loader = batch_loader(state, data.train, cfg.batch_size, shuffle=True, seed=cfg.seed,
                                      augment=state.augment, sampler=cfg.sampler, padding=cfg.crop_padding,
                                      padding_mode=cfg.crop_padding_mode,
                                      strong=strong_augment(cfg, state.augment, len(data.classes)))
    state.val_loader = batch_loader(state, data.val, cfg.eval_batch_size * ctx.world, mixed=depends_on_batch(state.model))


def batch_loader(state, split, batch_size, **options):
    """A batch loader over one split on the training device (streamed from the disk cache when the
    data is: data/stream.py), sharded over the ranks."""
    ctx = state.ctx
    return make_loader(*split, batch_size, state.data.preprocess, ctx.device, streamed=state.data.streamed,
                       rank=ctx.rank, world=ctx.world, channels_last=state.cfg.channels_last, **options)


def test_once(state):
    """The best weights on the test split, once, with the per-sample results kept (state.test) for
    whatever renders them; then the summary."""
    cfg, ctx, data = state.cfg, state.ctx, state.data
    if cfg.ema and state.has_val:   # the raw last weights, once: the diagnostics say when the EMA lags them
        state.raw_val_acc = evaluate(state.model, state.val_loader, ctx, len(data.classes))["acc"]
    test_loader = batch_loader(state, data.test, cfg.eval_batch_size * ctx.world, mixed=depends_on_batch(state.model))
    final = None   # the last epoch's weights, which the tutorials report, when they are not the best
    if state.best_weights is not None and state.progress.best_epoch != len(state.history):
        final = evaluate(state.eval_model, test_loader, ctx, len(data.classes))
    if state.best_weights is not None:
        state.model.load_state_dict(state.best_weights)
    temperature = calibrate(state) if cfg.calibrate else None
    state.test = evaluate(tempered(state.model, temperature), test_loader, ctx, len(data.classes), collect=True)
    state.final_test = final or state.test
    state.summary = summarize(state)
    if temperature is not None:
        state.summary["temperature"] = temperature


def calibrate(state):
    """--calibrate: the temperature of the best weights fitted on the whole validation split (the
    same on every rank), written into best.pt; the test results are then the calibrated ones."""
    logits, labels = split_logits(state.model, state.data.val, state.data.preprocess, state.ctx.device,
                                  streamed=state.data.streamed)
    temperature = fit_temperature(logits, labels)
    if state.ctx.is_main:
        checkpoint.set_temperature(state.run.file("best.pt"), temperature)
    state.log(f"calibrated: temperature {temperature:.3f} (fitted on {len(labels)} validation images)")
    return temperature


def summarize(state):
    """summary.json: the results, what the run was, and plain-language diagnostics."""
    progress, test, meta, data, history = state.progress, state.test, state.meta, state.data, state.history
    summary = {
        "best_val_acc": progress.best_val_acc if state.has_val else None,   # None: no validation split
        "best_epoch": progress.best_epoch,
        "test_acc": test["acc"], "test_loss": test["loss"], "test_top5_acc": test["top5"],
        # the last epoch's weights on the test split: what the tutorials print (test_acc is the best epoch's)
        "final_test_acc": state.final_test["acc"], "final_test_loss": state.final_test["loss"],
        "test_balanced_acc": balanced_accuracy(test["cm"]),
        "test_recall": dict(zip(map(str, data.classes), map(float, per_class(test["cm"])[1]))),
        "epochs": len(history), "train_seconds": round(progress.train_seconds, 3),
        "samples_per_second": round(progress.samples_seen / max(progress.train_seconds, 1e-9), 1),
        **{k: meta[k] for k in ("model", "model_args", "data", "classes", "num_params", "device",
                                 "world_size", "global_batch_size", "augment")},
        "splits": {k: len(data.splits[k]) for k in ("train", "val", "test")},
        "stopped_early": len(history) < state.cfg.epochs,
        **({"raw_val_acc": state.raw_val_acc} if state.raw_val_acc is not None else {}),
    }
    summary["diagnostics"] = diagnose(history, test["cm"], data.classes, raw_val_acc=state.raw_val_acc,
                                      train_labels=data.train[1], cfg=state.cfg)
    return summary
