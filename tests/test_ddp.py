"""torch.distributed with 2 CPU processes (gloo on loopback), bounded in time."""
import csv
import json
import os

import pytest

import cnnlab
from cnnlab.config import make_config
from cnnlab.training.loop import fit

from .conftest import run_cli

ARGS = dict(data="mnist-5k", model="mnist_cnn", train_samples=600, val_samples=200, test_samples=200,
            batch_size=50, epochs=2, augment="crop", lr=0.002, report=False)


def flags(settings):
    return [part for k, v in settings.items() for part in (f"--{k.replace('_', '-')}", str(v))]


@pytest.fixture(scope="module")
def ddp_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("ddp") / "run"
    result = run_cli("train", "--nproc", 2, "--device", "cpu", *flags(ARGS), "--out", out, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return out, result


def test_ddp_matches_single_process(ddp_run, tmp_path):
    out, _ = ddp_run
    single = fit(make_config({**ARGS, "out": str(tmp_path / "single")}), quiet=True)
    rows = list(csv.DictReader(open(out / "metrics.csv")))
    assert len(rows) == len(single.history) == 2
    for ddp_row, one in zip(rows, single.history):
        assert abs(float(ddp_row["train_loss"]) - one["train_loss"]) < 1e-4
        assert abs(float(ddp_row["val_acc"]) - one["val_acc"]) < 1e-6 + 1 / 200


def test_only_rank_zero_prints_and_writes(ddp_run):
    out, result = ddp_run
    assert result.stdout.count("epoch   1/2") == 1 and result.stdout.count("===== cnnlab train") == 1
    assert sorted(os.listdir(out)) == [".lock", "best.pt", "config.yaml", "last.pt", "metrics.csv", "splits.json",
                                       "summary.json"]
    summary = json.load(open(out / "summary.json"))
    assert summary["world_size"] == 2 and summary["global_batch_size"] == 50


def test_ddp_checkpoint_loads_in_one_process(ddp_run):
    out, _ = ddp_run
    model = cnnlab.load(out)
    from cnnlab.evaluation.results import evaluate_path

    m = evaluate_path(str(out))
    assert m["accuracy"] == pytest.approx(json.load(open(out / "summary.json"))["test_acc"])
    assert model.classes[0] == "0"


def test_resume_under_ddp(ddp_run):
    out, _ = ddp_run
    result = run_cli("train", "--nproc", 2, "--resume", out, "--epochs", 3, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert len(list(csv.DictReader(open(out / "metrics.csv")))) == 3


def test_a_dead_rank_stops_the_others_quickly(tmp_path):
    """kill -9 one worker: the launcher returns within seconds, naming the failed rank."""
    import signal
    import subprocess
    import time

    from .conftest import signal_and_wait, start_train

    proc = start_train("--nproc", 2, "--device", "cpu", "--epochs", 50, "--report", "false", "--out", tmp_path / "dead")
    workers = subprocess.run(["pgrep", "-f", "--", f"-u -m cnnlab train --device cpu --epochs 50 --report false --out {tmp_path}"],
                             capture_output=True, text=True).stdout.split()
    assert len(workers) == 2, workers
    start = time.monotonic()
    err = signal_and_wait(proc, signal.SIGKILL, pid=int(workers[-1]))
    assert proc.returncode != 0 and time.monotonic() - start < 60
    assert "distributed training failed" in err and "SIGKILL" in err


def test_sigterm_to_the_launcher_leaves_a_resumable_checkpoint(tmp_path):
    import signal

    from cnnlab.training.checkpoint import load as load_checkpoint

    from .conftest import signal_and_wait, start_train

    out = tmp_path / "term"
    proc = start_train("--nproc", 2, "--device", "cpu", "--epochs", 50, "--report", "false", "--out", out)
    err = signal_and_wait(proc, signal.SIGTERM)
    assert proc.returncode == 143, err[-2000:]
    assert f"cnnlab train --resume {out} --nproc 2" in err
    assert load_checkpoint(out / "last.pt", "last.pt")["train_state"]["progress"]["global_step"] > 0


def test_launch_from_python_matches_the_cli_run(ddp_run, tmp_path):
    """cnnlab.launch(2, ...) is `cnnlab train --nproc 2` from Python: the same epochs, the same losses.
    (Compared per epoch: test_resume_under_ddp extends the CLI run by an epoch.)"""
    out, _ = ddp_run
    result = cnnlab.launch(2, device="cpu", out=str(tmp_path / "py"), **ARGS)
    assert result.summary["world_size"] == 2 and len(result.history) == ARGS["epochs"]
    with open(os.path.join(out, "metrics.csv"), newline="") as f:
        cli_rows = list(csv.DictReader(f))[:ARGS["epochs"]]
    for mine, theirs in zip(result.history, cli_rows):
        for key in ("train_loss", "val_loss", "val_acc"):
            assert mine[key] == pytest.approx(float(theirs[key]), abs=1e-6), key


def test_launch_refuses_objects_it_cannot_hand_to_new_processes():
    import numpy as np
    from cnnlab.errors import UsageError

    with pytest.raises(UsageError, match="register_dataset"):
        cnnlab.launch(2, data=(np.zeros((4, 8, 8), np.uint8), np.arange(4) % 2))


@pytest.mark.parametrize("args, code, stream, text", [
    (["models"], 0, "stdout", "mnist_cnn"),
    (["train", "--epochs", "-1"], 2, "stderr", "cnnlab: error:"),
])
def test_a_rank_leaves_with_its_exit_code_and_all_its_output(args, code, stream, text):
    """A torchrun rank skips interpreter finalization (gloo's threads aborted a finished rank there):
    its exit code and its buffered output (stdout into a pipe is block-buffered) must survive that."""
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"}

    def run(**extra):
        return subprocess.run([sys.executable, "-m", "cnnlab", *args], capture_output=True, text=True,
                              timeout=300, env={**env, **extra})
    result = run(WORLD_SIZE="2", RANK="1")
    assert result.returncode == code
    assert text in getattr(result, stream)
    if stream == "stdout":   # the whole listing, not what happened to be flushed
        assert result.stdout == run().stdout
