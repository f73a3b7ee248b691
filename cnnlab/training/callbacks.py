"""Training callbacks: everything the loop does besides training.

A callback is an object with any of these hooks, each called with the `TrainState` (state.py):

    on_setup        before the data is loaded (only cfg, ctx, run, resumed are set)
    on_start        everything is built (and restored on --resume); the first epoch comes next
    on_epoch_start  an epoch (re)starts at state.progress.step
    on_step         after each step; returning Stop interrupts the run (last.pt is written by
                    on_interrupt, and engine.Interrupted tells the caller how to resume)
    on_epoch_end    after the validation pass (state.row is the epoch's metrics); returning Stop
                    ends training as finished (early stopping): the test split is still evaluated
    on_interrupt    the run stops at a step because a hook asked
    on_end          after the test evaluation (state.test, state.summary are set)
    on_close        always, last, however the run ended (an error too): release what was taken

Hooks run in list order; loop.standard_callbacks() is what every run uses, before the caller's own.
"""
from contextlib import ExitStack

import torch

from . import checkpoint
from .distributed import handling_stop_signals
from ..errors import UsageError


class Stop:
    """A hook's answer that ends training (see the module docstring for what it means where)."""

    def __init__(self, reason, signum=None):
        self.reason, self.signum = reason, signum


class Callback:
    """Every hook, doing nothing: subclass and override the ones you need."""

    def on_setup(self, state):
        pass

    def on_start(self, state):
        pass

    def on_epoch_start(self, state):
        pass

    def on_step(self, state):
        pass

    def on_epoch_end(self, state):
        pass

    def on_interrupt(self, state):
        pass

    def on_end(self, state):
        pass

    def on_close(self, state):
        pass


class Callbacks:
    """Calls one hook on every callback that has it, in order (each of them, even after a Stop, so
    all ranks and all callbacks see every step); the answer is the first Stop returned."""

    def __init__(self, callbacks):
        self.callbacks = list(callbacks)

    def call(self, hook, state):
        answers = [getattr(cb, hook)(state) for cb in self.callbacks if hasattr(cb, hook)]
        return next((a for a in answers if isinstance(a, Stop)), None)


class RunFiles(Callback):
    """config.yaml, splits.json and bad_images.txt when a new run starts, metrics.csv after every
    epoch (rewritten whole, so a resumed run's file has no duplicates), summary.json at the end."""

    def on_start(self, state):
        state.run.create(state.cfg)   # on --resume too: config.yaml then says the new --epochs
        if state.resumed:
            return
        state.run.write_json("splits.json", state.data.splits)
        if state.data.files.get("bad"):
            state.run.write_text("bad_images.txt", "\n".join(state.data.files["bad"]) + "\n")

    def on_epoch_end(self, state):
        state.run.write_metrics(state.history)

    def on_end(self, state):
        state.run.write_json("summary.json", state.summary)

    def on_close(self, state):
        state.run.release()


class Checkpoints(Callback):
    """best.pt when validation improves; last.pt after every epoch, every --save-every-steps steps
    and when the run is interrupted (with the unfinished epoch's time, so resume is exact)."""

    def on_step(self, state):
        every = state.cfg.save_every_steps
        if every and state.progress.global_step % every == 0:
            state.run.save_checkpoint("last.pt", checkpoint.last_payload(state))

    def on_epoch_end(self, state):
        if state.progress.improved:
            state.run.save_checkpoint("best.pt", checkpoint.best_payload(state))
        state.run.save_checkpoint("last.pt", checkpoint.last_payload(state))

    def on_interrupt(self, state):
        state.run.save_checkpoint("last.pt", checkpoint.last_payload(state))


class TensorBoard(Callback):
    """--tensorboard: per-epoch scalars as TensorBoard event files in RUN/tensorboard (rank 0)."""

    def __init__(self):
        self.writer = None

    def on_start(self, state):
        if not (state.cfg.tensorboard and state.ctx.is_main):
            return
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            raise UsageError("--tensorboard needs the tensorboard package: pip install 'cnnlab[tensorboard]'") from None
        self.writer = SummaryWriter(state.run.file("tensorboard"))

    def on_epoch_end(self, state):
        if self.writer is not None:
            for key in ("train_loss", "train_acc", "val_loss", "val_acc", "lr"):
                group = "loss" if "loss" in key else "accuracy" if "acc" in key else "lr"
                self.writer.add_scalar(f"{group}/{key}", state.row[key], state.row["epoch"])

    def on_close(self, state):
        if self.writer is not None:
            self.writer.close()


class EarlyStopping(Callback):
    """--patience N: stop after N epochs without a better validation accuracy."""

    def on_epoch_end(self, state):
        patience, progress = state.cfg.patience, state.progress
        if patience and progress.bad_epochs >= patience:
            state.log(f"early stopping: no val improvement for {patience} epochs (best {progress.best_val_acc:.2%} "
                      f"at epoch {progress.best_epoch})")
            return Stop("early stopping")
        return None


class SignalStop(Callback):
    """SIGINT/SIGTERM set a flag; the run stops after the current step, on every rank at the same
    step. The handlers are ours only while training runs."""

    def __init__(self):
        self.signum, self._handlers = None, ExitStack()

    def on_start(self, state):
        self._handlers.enter_context(handling_stop_signals(self._handle))

    def _handle(self, signum, frame):
        self.signum = signum

    def on_step(self, state):
        return Stop("signal", self.signum) if agreed_stop(self, state.ctx) else None

    def on_close(self, state):
        self._handlers.close()   # the previous handlers back


def agreed_stop(stop, ctx):
    """All ranks stop at the same step (else one would wait forever in an all-reduce); `stop.signum`
    is the signal this rank received (SIGTERM when only another rank got one)."""
    if not ctx.distributed:
        return stop.signum is not None
    flag = ctx.all_reduce(torch.tensor([1.0 if stop.signum else 0.0], device=ctx.device))
    if flag.item() and stop.signum is None:
        stop.signum = 15
    return bool(flag.item())
