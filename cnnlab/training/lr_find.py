"""`cnnlab lr-find`: the LR range test (Smith 2017; fastai's lr_find). The LR grows exponentially
from 1e-7 to 10 over 100 steps of the SAME step training takes (engine.make_step: AMP, --l2,
label smoothing, grad clip, channels_last), until the smoothed loss diverges.

The suggestion is a tenth of the LR at the loss minimum before divergence (fastai's `minimum`).
Measured here: mnist_cnn/Adam on mnist-5k, 3 epochs at each rule's LR: min/10 2.2e-3 -> 95.4%
test, steepest descent before the minimum 1.5e-2 -> 80.4%, fastai's valley 3e-4 -> 91.6%; the old
rule (steepest descent anywhere) picked 0.2, on a slope after the divergence (10% accuracy, issue 14)."""
import math
import os
from dataclasses import dataclass

from .loop import build
from .state import TrainState
from ..errors import CnnlabError
from ..runtime import setup, teardown


@dataclass
class RangeTest:
    lrs: list
    losses: list          # bias-corrected moving average of the training loss, up to divergence
    suggestion: float     # a tenth of the lr at `minimum`
    minimum: tuple        # (lr, loss) at the lowest smoothed loss before divergence


def lr_find(cfg, start=1e-7, end=10.0, steps=100):
    """Run the range test; returns the curve and the suggested lr (drawing it is the caller's:
    evaluate.plots.save_lr_find)."""
    lrs, losses = range_test(cfg, start, end, steps)
    best = minimum_index(lrs, losses)
    return RangeTest(lrs, losses, suggest_lr(lrs, losses), (lrs[best], losses[best]))


def default_plot_path(cfg):
    """Inside --out when given (the run it prepares), else runs/lr_find-<model>-<data>.png."""
    if cfg.out:
        return os.path.join(cfg.out, "lr_find.png")
    return os.path.join("runs", f"lr_find-{cfg.model}-{cfg.data.split(':')[0]}.png")


def range_test(cfg, start=1e-7, end=10.0, steps=100, beta=0.9):
    """(lrs, bias-corrected moving average of the training loss), up to the first diverged point,
    with the model, step and loader built exactly as training builds them (loop.build)."""
    ctx = setup(cfg)
    try:
        state = TrainState(cfg, ctx)
        build(state)
        return sweep(state, start, end, steps, beta)
    finally:
        teardown(ctx)


def sweep(state, start, end, steps, beta):
    """Training steps at exponentially growing lrs until the smoothed loss diverges."""
    batches = (b for epoch in range(10**6) for b in state.train_loader.batches(epoch))
    lrs, losses, avg = [], [], 0.0
    for i in range(steps):
        lr = start * (end / start) ** (i / max(1, steps - 1))
        xb, yb = next(batches)
        avg = beta * avg + (1 - beta) * state.step(xb, yb, lr)[0].item() / len(yb)
        lrs.append(lr)
        losses.append(avg / (1 - beta ** (i + 1)))
        if divergence_index(losses) < len(losses):
            break
    return lrs, losses


def divergence_index(losses):
    """Index of the first diverged point of a smoothed loss curve (len(losses) if none): not
    finite, above 4x the best so far (fastai's rule), or back above where it started after falling
    10% below it (cross-entropy seldom reaches 4x its best: Adam on MNIST went 2.3 -> 1.45 -> 3.5)."""
    best = math.inf
    for i, value in enumerate(losses):
        if not math.isfinite(value) or value > 4 * best or (best < 0.9 * losses[0] and value > losses[0]):
            return i
        best = min(best, value)
    return len(losses)


def minimum_index(lrs, losses):
    """Index of the lowest loss before divergence: past it a curve can fall again (after the model
    is wrecked), and the old rule, steepest descent anywhere, suggested an lr there."""
    usable = divergence_index(losses)
    if usable == 0:
        raise CnnlabError("lr-find: the loss was not finite from the first step, at lr "
                          f"{lrs[0]:.1e}; check the data and model (or try --amp off).")
    return min(range(usable), key=losses.__getitem__)


def suggest_lr(lrs, losses):
    """A tenth of the lr at the lowest smoothed loss before divergence (fastai's `minimum`)."""
    return lrs[minimum_index(lrs, losses)] / 10
