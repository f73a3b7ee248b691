"""What a training run prints (rank 0, nothing when quiet): on stdout the settings block, one line
per epoch and the test line; on stderr the progress inside an epoch (a bar on a terminal, else the
--log-every lines). Callbacks (callbacks.py)."""
import sys

from ..runtime import amp_label
from .callbacks import Callback


class Console(Callback):
    def on_setup(self, state):
        state.log(banner_title(state.resumed), flush=True)   # at once: a large folder's first decode takes a minute

    def on_start(self, state):
        for line in settings_lines(state):
            state.log(line)

    def on_epoch_end(self, state):
        state.log(epoch_line(state.row, state.cfg.epochs, state.progress.improved, state.has_val))

    def on_end(self, state):
        test, summary, progress = state.test, state.summary, state.progress
        chosen = (f"best val {progress.best_val_acc:.2%} at epoch {progress.best_epoch}" if state.has_val
                  else "no validation split: best.pt is the last epoch")
        state.log(f"test: loss {test['loss']:.4f}  acc {test['acc']:.2%}  ({chosen}; {summary['train_seconds']:.1f}s, "
                  f"{summary['samples_per_second']:.0f} img/s)")
        if state.final_test is not test:   # the tutorials print the last epoch's figure: give it too
            state.log(f"test, last epoch ({len(state.history)}): loss {state.final_test['loss']:.4f}  "
                      f"acc {state.final_test['acc']:.2%}")
        state.log(f"run folder: {state.run_dir}")


def banner_title(resumed):
    return "===== cnnlab train" + (" (resumed)" if resumed else "") + " ====="


def photo_note(data):
    """How photos become inputs, when not squashed (--resize crop: the photo pipeline; pad)."""
    pre = data.preprocess
    if pre.resize == "crop" and pre.resize_size:
        return (f"; photos stored at {pre.resize_size} px, random-resized crops to train, "
                f"resize + centre crop to evaluate (--resize crop)")
    return "" if pre.resize == "squash" else f"; --resize {pre.resize}"


def shifts_note(cfg, augment):
    """' (shifts 2 px, reflect)' when crop's padding is not the default auto zeros."""
    if "crop" not in augment.split("+") or (not cfg.crop_padding and cfg.crop_padding_mode == "zeros"):
        return ""
    return f" (shifts {cfg.crop_padding or 'auto'} px, {cfg.crop_padding_mode})"


def settings_lines(state):
    """The resolved settings before training, like seed 004's HYPERPARAMETERS block (its title
    line, `banner_title`, is printed before the data is loaded)."""
    cfg, data, meta = state.cfg, state.data, state.meta
    sizes = " / ".join(f"{len(data.splits[k])}" for k in ("train", "val", "test"))
    return [
        f"data       {cfg.data}: {'x'.join(map(str, data.shape))}, {len(data.classes)} classes, "
        f"train/val/test {sizes} ({data.residence()}), augment {meta['augment']}" + shifts_note(cfg, meta['augment'])
        + photo_note(data),
        f"model      {cfg.model} " + (f"{meta['model_args']} " if meta['model_args'] else "")
        + f"({meta['num_params']:,} parameters)",
        f"optimizer  {cfg.optimizer} lr {cfg.lr:g}, batch {cfg.batch_size} (global), "
        f"{cfg.epochs} epoch{'s' if cfg.epochs != 1 else ''}, schedule {cfg.schedule}"
        + (f", weight decay {cfg.weight_decay:g}" if cfg.weight_decay else "") + (f", l2 {cfg.l2:g}" if cfg.l2 else "")
        + (", lookahead" if cfg.lookahead else ""),
        *([f"fine-tune  {state.fine_tune}"] if state.fine_tune else []),
        f"device     {meta['device']}" + (f" x {meta['world_size']} processes" if meta["world_size"] > 1 else "")
        + f", seed {cfg.seed}, amp {amp_label(cfg.amp, state.ctx)}"
        + (f", threads {state.ctx.threads}" if state.ctx.device.type == "cpu" and state.ctx.threads else ""),
        f"run folder {state.run_dir}",
        "=" * 36,
    ]


def epoch_line(row, epochs, improved, has_val=True):
    """One epoch's numbers; `*` marks a new best validation accuracy (never shown without validation)."""
    val = f"val loss {row['val_loss']:.4f} acc {row['val_acc']:7.2%}" if has_val else "no val split"
    return (f"epoch {row['epoch']:>3}/{epochs}  train loss {row['train_loss']:.4f} acc {row['train_acc']:7.2%}  "
            f"{val}  lr {row['lr']:.2e}  {row['seconds']:.1f}s" + ("  *" if improved and has_val else ""))


class ProgressBar(Callback):
    """A tqdm bar inside the epoch when stdout is a terminal or a Jupyter notebook (rank 0); plain `--log-every` lines
    otherwise, so log files don't fill with redraws."""

    def __init__(self):
        self.bar, self.every, self.total = None, 0, 0

    def on_start(self, state):
        self.total = len(state.train_loader)
        self.every = max(1, round(state.cfg.log_every * self.total)) if state.cfg.log_every else 0

    def on_epoch_start(self, state):
        if state.ctx.is_main and (sys.stdout.isatty() or "ipykernel" in sys.modules):
            from tqdm.auto import tqdm   # a widget in Jupyter (with ipywidgets), text in a terminal

            self.bar = tqdm(total=self.total, initial=state.progress.step, desc=f"epoch {state.progress.epoch + 1}",
                            leave=False, dynamic_ncols=True)

    def on_step(self, state):
        progress = state.progress
        if self.bar is not None:
            self.bar.update(1)   # tqdm redraws at most 10 times a second
        if self.every and progress.step % self.every == 0:
            state.log(f"  epoch {progress.epoch + 1} {progress.step / self.total:4.0%}  "   # progress, as the bar: stderr
                      f"train loss {progress.running_loss():.4f}  took {progress.elapsed():.1f}s", file=sys.stderr)

    def on_epoch_end(self, state):
        self.close()

    def on_interrupt(self, state):
        self.close()

    def on_close(self, state):
        self.close()

    def close(self):
        if self.bar is not None:
            self.bar.close()
            self.bar = None
