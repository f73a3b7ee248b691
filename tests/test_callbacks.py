"""The training loop's callbacks, Progress (the run's position and its current lr) and TrainState."""
import csv
import math
import types

import pytest
import torch

import cnnlab
from cnnlab.config import make_config
from cnnlab.training.callbacks import Callback, Stop
from cnnlab.training.checkpoint import load as load_checkpoint
from cnnlab.training.engine import Interrupted, gather_shards
from cnnlab.training.loop import fit
from cnnlab.training.progress import Progress

TINY = dict(data="mnist-5k", train_samples=200, val_samples=100, test_samples=120, batch_size=50, epochs=2,
            report=False)


class Recorder(Callback):
    """Every hook it sees, with the lr the step ran at; optionally a Stop at one hook and moment."""

    def __init__(self, stop_at=None):
        self.calls, self.lrs, self.stop_at = [], [], stop_at

    def record(self, hook, state):
        self.calls.append(hook)
        if self.stop_at and self.stop_at(hook, state):
            return Stop("asked by the test", signum=2)
        return None

    def on_setup(self, state):
        assert state.data is None   # before the data is loaded
        return self.record("on_setup", state)

    def on_start(self, state):
        return self.record("on_start", state)

    def on_epoch_start(self, state):
        return self.record("on_epoch_start", state)

    def on_step(self, state):
        self.lrs.append((state.progress.lr, state.optimizer.param_groups[0]["lr"]))
        return self.record("on_step", state)

    def on_epoch_end(self, state):
        return self.record("on_epoch_end", state)

    def on_interrupt(self, state):
        return self.record("on_interrupt", state)

    def on_end(self, state):
        return self.record("on_end", state)

    def on_close(self, state):
        return self.record("on_close", state)


def test_hooks_run_in_order_and_the_test_split_is_evaluated_once(tmp_path, monkeypatch):
    import cnnlab.training.loop

    evaluations = []
    real = cnnlab.training.loop.evaluate
    monkeypatch.setattr(cnnlab.training.loop, "evaluate", lambda *a, **k: evaluations.append(len(a[1].y)) or real(*a, **k))
    rec = Recorder()
    state = fit(make_config({**TINY, "out": str(tmp_path / "r")}), quiet=True, callbacks=[rec])
    steps = ["on_step"] * 4
    assert rec.calls == ["on_setup", "on_start", *(["on_epoch_start", *steps, "on_epoch_end"] * 2), "on_end", "on_close"]
    assert evaluations == [120]   # the test split, once (validation runs in the engine's epoch_results)
    assert state.test["probs"].shape == (120, 10) and state.test["losses"].shape == (120,)
    assert state.summary["test_acc"] == state.test["acc"] and len(state.history) == 2


def test_progress_lr_is_the_lr_every_reader_sees(tmp_path):
    rec = Recorder()
    cfg = make_config({**TINY, "epochs": 3, "schedule": "cosine", "warmup_epochs": 1, "out": str(tmp_path / "r")})
    result = cnnlab.train(cfg, quiet=True, callbacks=[rec])
    assert all(progress_lr == optimizer_lr for progress_lr, optimizer_lr in rec.lrs)
    assert len(rec.lrs) == 12 and len({lr for lr, _ in rec.lrs}) >= 8   # warm-up, then the cosine
    rows = list(csv.DictReader(open(tmp_path / "r" / "metrics.csv")))
    for epoch, row in enumerate(rows):   # each row's lr: the epoch's last step
        assert float(row["lr"]) == pytest.approx(rec.lrs[4 * epoch + 3][0]) == result.history[epoch]["lr"]


def test_a_stop_at_an_epoch_end_finishes_the_run(tmp_path):
    rec = Recorder(stop_at=lambda hook, state: hook == "on_epoch_end")
    result = cnnlab.train(**{**TINY, "epochs": 5}, out=str(tmp_path / "r"), quiet=True, callbacks=[rec])
    assert len(result.history) == 1 and result.summary["stopped_early"]
    assert rec.calls[-2:] == ["on_end", "on_close"]
    assert (tmp_path / "r" / "summary.json").exists()


def test_a_stop_at_a_step_interrupts_and_leaves_a_resumable_checkpoint(tmp_path):
    rec = Recorder(stop_at=lambda hook, state: hook == "on_step" and state.progress.global_step == 6)
    with pytest.raises(Interrupted) as stopped:
        fit(make_config({**TINY, "out": str(tmp_path / "r")}), quiet=True, callbacks=[rec])
    assert stopped.value.signum == 2 and rec.calls[-2:] == ["on_interrupt", "on_close"]
    progress = load_checkpoint(tmp_path / "r" / "last.pt", "last.pt")["train_state"]["progress"]
    assert (progress["epoch"], progress["step"], progress["global_step"]) == (1, 2, 6)
    assert isinstance(progress["sums"][0], float) and isinstance(progress["sums"][2], int) and progress["sums"][2] == 100
    resumed = cnnlab.train(resume=str(tmp_path / "r"), quiet=True)
    assert len(resumed.history) == 2


def test_progress_sums_stay_one_tensor_and_save_as_numbers():
    cfg = make_config({"lr": 0.1})
    progress = Progress()
    for _ in range(3):
        progress.next_lr(cfg, steps_per_epoch=3)
        progress.add_step(torch.tensor(2.0), torch.tensor(4), 5)
    assert progress.sums.dtype == torch.float64 and progress.running_loss() == pytest.approx(6 / 15)
    saved = progress.state_dict()
    assert saved["sums"] == [6.0, 12, 15] and saved["lr"] == 0.1 and saved["global_step"] == 3
    ctx = types.SimpleNamespace(all_reduce=lambda t: t)
    row = progress.end_epoch(progress.epoch_totals(ctx), None)
    assert row["train_loss"] == pytest.approx(0.4) and row["train_acc"] == pytest.approx(0.8) and math.isnan(row["val_loss"])
    assert progress.sums.dtype == torch.float64 and progress.sums.tolist() == [0, 0, 0] and progress.improved
    again = Progress()
    again.load_state_dict(saved)
    assert again.sums.tolist() == [6.0, 12.0, 15.0] and again.step == 3 and again.lr == 0.1


def test_gather_shards_puts_the_ranks_samples_back_in_order(monkeypatch):
    """Under DDP rank r holds samples r, r + world, ... of each batch; gathered, they are the split."""
    import torch.distributed as dist

    world, batches = 3, [torch.arange(0, 8), torch.arange(8, 12)]   # the second batch is short
    shards = [[b[r::world] for b in batches] for r in range(world)]
    monkeypatch.setattr(dist, "all_gather_object", lambda out, obj: out.__setitem__(slice(None), shards))
    ctx = types.SimpleNamespace(distributed=True, world=world)
    assert torch.equal(gather_shards(shards[0], ctx), torch.arange(12))
