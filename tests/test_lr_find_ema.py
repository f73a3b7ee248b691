"""lr-find's suggestion and CLI (issue 14 item 2) and the EMA warm-up and diagnostic (item 3)."""
import math
import os

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from cnnlab.config import make_config
from cnnlab.training.diagnose import diagnose
from cnnlab.training.engine import ema_model
from cnnlab.errors import CnnlabError
from cnnlab.training.lr_find import lr_find, suggest_lr
from cnnlab.training.loop import fit

from .conftest import run_cli

# A small problem: 100 range-test steps of 64 are ~6 epochs of these 1,000 digits.
SMALL = {"train_samples": 1000, "val_samples": 200, "test_samples": 500, "batch_size": 64}


# ---- the suggestion on synthetic loss curves ------------------------------------------------

def lr_grid(n):
    return [1e-7 * (1e8) ** (i / max(1, n - 1)) for i in range(n)]


@st.composite
def diverging_curves(draw):
    """A smoothed range-test curve: flat-ish start, a descent to a minimum at index m, a rise that
    diverges (above the start, or 4x the minimum), then optionally a fall again (a wrecked model's
    loss drifting back down), possibly below the minimum. Returns (lrs, losses, m)."""
    start = draw(st.floats(0.05, 10))
    low = start * draw(st.floats(0.01, 0.85))          # fell at least 15% below the start
    m = draw(st.integers(0, 60))
    shape = draw(st.floats(0.5, 4))   # one exponent for the whole descent, so it falls all the way
    descent = [start - (start - low) * (i / m) ** shape if m else low for i in range(m + 1)]
    peak = max(start, 4 * low) * draw(st.floats(1.01, 3))
    r = draw(st.integers(1, 20))
    rise = [low + (peak - low) * i / r for i in range(1, r + 1)]
    fall = [peak - (peak - low * draw(st.floats(0.1, 2))) * i / 10 for i in range(1, 11)] if draw(st.booleans()) else []
    losses = descent + rise + fall
    return lr_grid(len(losses)), losses, m


@settings(max_examples=300, deadline=None)
@given(diverging_curves())
def test_suggestion_is_a_tenth_of_the_minimum_before_divergence(curve):
    lrs, losses, m = curve
    suggestion = suggest_lr(lrs, losses)
    assert suggestion == pytest.approx(lrs[m] / 10)
    assert suggestion < lrs[m]   # never on the slope after the loss diverged (issue 14: 0.2 gave 10%)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.floats(0.01, 10), min_size=1, max_size=100))
def test_suggestion_on_any_curve_is_below_its_lowest_point(losses):
    """Any finite curve (noise, one point, never diverging): the suggestion is a tenth of the lr
    of a point no higher than the first one, so it lies below the curve's end and is finite."""
    lrs = lr_grid(len(losses))
    suggestion = suggest_lr(lrs, losses)
    i = next(i for i, lr in enumerate(lrs) if lr == pytest.approx(suggestion * 10))
    assert losses[i] <= losses[0] and losses[i] == min(losses[:i + 1])
    assert 0 < suggestion < lrs[-1] or len(lrs) == 1


def test_suggestion_degenerate_curves():
    assert suggest_lr([1e-3], [2.3]) == pytest.approx(1e-4)                        # one point
    assert suggest_lr(lr_grid(5), [5, 4, 3, 2, 1]) == pytest.approx(lr_grid(5)[-1] / 10)   # never diverged
    assert suggest_lr(lr_grid(4), [2, 1, math.nan, 0.1]) == pytest.approx(lr_grid(4)[1] / 10)
    with pytest.raises(CnnlabError, match="not finite"):
        suggest_lr([1e-7, 1e-6], [math.inf, 1.0])


# ---- lr-find on a real problem, through the CLI ----------------------------------------------

def test_lr_find_suggests_a_rate_that_trains(tmp_path):
    """Old code: 0.167 here, on the slope after the loss blew up; 2 epochs at it: train loss 364
    then 2.33, 10% test accuracy. Measured with this code: 4.5e-3, 86%."""
    result = run_cli("lr-find", *[f"--{k.replace('_', '-')}={v}" for k, v in SMALL.items()], cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("suggested lr ") and len(result.stdout.splitlines()) == 1
    suggestion = float(result.stdout.split()[2])
    lowest_at = float(result.stderr.split("lowest smoothed loss ")[1].split(" at lr ")[1].split(";")[0])
    assert suggestion == pytest.approx(lowest_at / 10, rel=0.01)
    plot = tmp_path / "runs" / "lr_find-mnist_cnn-mnist-5k.png"   # not the current folder
    assert os.path.getsize(plot) > 5000 and f"plot: {os.path.join('runs', plot.name)}" in result.stderr
    assert not list(tmp_path.glob("*.png"))
    trained = fit(make_config({**SMALL, "epochs": 2, "lr": suggestion, "report": False, "out": str(tmp_path / "r")}),
                  quiet=True)
    losses = [row["train_loss"] for row in trained.history]
    assert losses[-1] < losses[0] < math.log(10) and trained.summary["test_acc"] > 0.7   # chance: 0.1


def test_lr_find_returns_its_curve_and_writes_nothing(tmp_path, monkeypatch):
    """The library call draws and prints nothing (train/ does not import evaluation/): the CLI does."""
    monkeypatch.chdir(tmp_path)
    curve = lr_find(make_config({"train_samples": 200, "batch_size": 16, "report": False}), steps=12)
    assert len(curve.lrs) == len(curve.losses) <= 12 and curve.lrs == sorted(curve.lrs)
    assert curve.suggestion == pytest.approx(curve.minimum[0] / 10) and curve.minimum[1] == min(curve.losses)
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize("flag,plot", [("--out", "run/lr_find.png"), ("--plot", "a/lr.png")])
def test_lr_find_plot_goes_inside_out_or_to_plot(tmp_path, flag, plot):
    value = os.path.dirname(plot) if flag == "--out" else plot
    result = run_cli("lr-find", "--train-samples", 200, "--batch-size", 16, flag, value, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert os.path.getsize(tmp_path / plot) > 5000 and f"plot: {plot}" in result.stderr


@pytest.mark.parametrize("args,flag", [
    (["--nproc", 2], "--nproc"), (["--resume", "runs/x"], "--resume"), (["--epochs", 3], "--epochs"),
    (["--schedule", "cosine"], "--schedule"), (["--ema", 0.99], "--ema"),
    (["--out", "runs/lr.png"], "--plot runs/lr.png"),   # made a folder named lr.png
])
def test_lr_find_refuses_training_only_flags(tmp_path, args, flag):
    result = run_cli("lr-find", *args, cwd=tmp_path)
    assert result.returncode == 2 and flag in result.stderr, result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and "Traceback" not in result.stderr
    assert not list(tmp_path.iterdir())


# ---- EMA: warm-up, exact resume, diagnostic --------------------------------------------------

class Tiny(torch.nn.Module):
    def __init__(self, size):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(size))
        self.register_buffer("count", torch.zeros((), dtype=torch.long))


def hand_ema(values, decay):
    """The EMA with warm-up, by hand in float64: the first update copies, the t-th later one
    (t = 1, 2, ...) uses decay_t = min(decay, (1 + t) / (10 + t))."""
    ema = values[0].double()
    for t, v in enumerate(values[1:], start=1):
        d = min(decay, (1 + t) / (10 + t))
        ema = d * ema + (1 - d) * v.double()
    return ema


@settings(max_examples=100, deadline=None)
@given(st.integers(1, 60), st.integers(1, 5), st.floats(0.0, 0.9999, allow_subnormal=False), st.integers(0, 2**31),
       st.data())
def test_ema_matches_hand_computed_and_resumes_exactly(steps, size, decay, seed, data):
    values = list(torch.randn(steps, size, generator=torch.Generator().manual_seed(seed)) * 10)
    model = Tiny(size)
    ema = ema_model(model, decay) if decay else None
    if ema is None:   # --ema 0 means off
        return
    split = data.draw(st.integers(0, steps))
    for t, v in enumerate(values):
        if t == split:   # resume: a fresh EMA from the saved state continues identically
            state = ema.state_dict()
            ema = ema_model(Tiny(size), decay)
            ema.load_state_dict(state)
        model.w.data.copy_(v)
        model.count += 1
        ema.update_parameters(model)
    torch.testing.assert_close(ema.module.w.double(), hand_ema(values, decay), rtol=1e-5, atol=1e-4)
    assert int(ema.module.count) == steps   # integer buffers are copied, not averaged


def test_ema_close_to_raw_weights_on_a_short_run(tmp_path):
    """Old code: --ema 0.999 over 38 steps kept 96% of the random initial weights (chance accuracy)."""
    result = fit(make_config({"train_samples": 600, "val_samples": 200, "test_samples": 200, "batch_size": 32,
                              "epochs": 2, "ema": 0.999, "report": False, "out": str(tmp_path / "e")}), quiet=True)
    ema_val, raw_val = result.history[-1]["val_acc"], result.summary["raw_val_acc"]
    assert raw_val > 0.5 and ema_val >= raw_val - 0.05
    assert not any("EMA" in note for note in result.summary["diagnostics"])


ROW = {"epoch": 1, "train_loss": 1.0, "train_acc": 0.5, "val_loss": 1.0}


@settings(max_examples=200, deadline=None)
@given(st.one_of(st.floats(0, 1, allow_subnormal=False), st.just(math.nan)),
       st.one_of(st.none(), st.floats(0, 1, allow_subnormal=False)))
def test_diagnostic_names_an_ema_far_below_the_raw_weights(ema_val, raw_val):
    notes = diagnose([{**ROW, "val_acc": ema_val, "train_acc": ema_val if ema_val == ema_val else 0.5}],
                     torch.eye(2, dtype=torch.long), ["a", "b"], raw_val_acc=raw_val)
    expected = raw_val is not None and not math.isnan(ema_val) and raw_val - ema_val > 0.05
    assert any("EMA" in note for note in notes) == expected
