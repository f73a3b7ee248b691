"""Where a run is: epoch and step, the learning rate of the current step, this epoch's running
sums and time, the best epoch so far and the per-epoch history.

This is the only owner of that state: the loop and the callbacks read it, and change it only
through these methods. Everything here must survive a crash, so it goes into last.pt
(`state_dict`) and comes back on --resume (`load_state_dict`).
"""
import time

import torch

from .optim import lr_factor

SAVED = ("epoch", "step", "global_step", "lr", "epoch_seconds", "best_val_acc", "best_epoch", "bad_epochs",
         "train_seconds", "samples_seen", "history")


class Progress:
    def __init__(self, device="cpu"):
        self.device = device
        self.epoch = 0              # current epoch (0-based)
        self.step = 0               # next step inside it
        self.global_step = 0
        # The lr of the step running (or last run). Set only by `next_lr`; the step, the console line,
        # metrics.csv and TensorBoard all read it here.
        self.lr = 0.0
        self.sums = self._zeros()   # this rank's loss sum, correct count, images seen in this epoch
        self.epoch_seconds = 0.0    # time spent in this epoch before a resume
        self.started = None         # perf_counter at this process's start of the epoch
        self.best_val_acc, self.best_epoch, self.bad_epochs = -1.0, 0, 0   # bad: epochs since the best
        self.train_seconds, self.samples_seen, self.history = 0.0, 0, []

    def _zeros(self):
        # One float64 device tensor, always: adding a step never waits for the device, and float64
        # counts stay exact far beyond any dataset size.
        return torch.zeros(3, dtype=torch.float64, device=self.device)

    def next_lr(self, cfg, steps_per_epoch):
        """The scheduled lr of the step about to run (optim.lr_factor of the global step)."""
        self.lr = cfg.lr * lr_factor(cfg, self.global_step, steps_per_epoch)
        return self.lr

    def start_epoch(self):
        self.started = time.perf_counter()

    def elapsed(self):
        """Seconds spent in the unfinished epoch, including before a resume."""
        return self.epoch_seconds + (time.perf_counter() - self.started if self.started is not None else 0.0)

    def add_step(self, loss_sum, correct, samples):
        """Count a finished step: its summed loss and correct count (device tensors) over `samples` images."""
        self.sums[0] += loss_sum
        self.sums[1] += correct
        self.sums[2] += samples
        self.step += 1
        self.global_step += 1

    def loss_is_finite(self):
        return bool(torch.isfinite(self.sums[0]))   # reads the device: call it sparingly on a GPU

    def running_loss(self):
        """This rank's mean training loss so far in the epoch."""
        loss_sum, _, seen = self.sums.tolist()
        return loss_sum / max(1.0, seen)

    def epoch_totals(self, ctx):
        """The epoch's training loss, accuracy and image count over every rank."""
        loss_sum, correct, seen = ctx.all_reduce(self.sums.clone()).tolist()
        return {"loss": loss_sum / seen, "acc": correct / seen, "samples": int(seen)}

    def end_epoch(self, train, val):
        """Record the finished epoch (`val` None without a validation split: then nothing tells a
        better epoch, and the last one is kept as the best); returns its metrics.csv row."""
        seconds = self.elapsed()
        val_loss, val_acc = (val["loss"], val["acc"]) if val else (float("nan"), float("nan"))
        row = {"epoch": self.epoch + 1, "train_loss": train["loss"], "train_acc": train["acc"], "val_loss": val_loss,
               "val_acc": val_acc, "lr": self.lr, "seconds": round(seconds, 3)}
        self.history.append(row)
        self.train_seconds += seconds
        self.samples_seen += train["samples"]
        if val is None or val_acc > self.best_val_acc:
            self.best_val_acc, self.best_epoch, self.bad_epochs = val_acc, self.epoch + 1, 0
        else:
            self.bad_epochs += 1
        self.epoch, self.step, self.sums, self.epoch_seconds, self.started = self.epoch + 1, 0, self._zeros(), 0.0, None
        return row

    @property
    def improved(self):
        """After end_epoch: whether the epoch that just ended is the best so far."""
        return self.best_epoch == self.epoch

    def state_dict(self):
        """Plain numbers and lists for last.pt; the running sums are read from the device here, once."""
        state = {key: getattr(self, key) for key in SAVED}
        loss_sum, correct, seen = self.sums.tolist()
        state.update(sums=[loss_sum, int(correct), int(seen)], epoch_seconds=self.elapsed())
        return state

    def load_state_dict(self, state):
        for key in SAVED:
            if key in state:
                setattr(self, key, state[key])
        self.sums = torch.tensor([float(v) for v in state["sums"]], dtype=torch.float64, device=self.device)
        self.started = None
