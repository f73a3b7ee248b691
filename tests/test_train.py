"""Training: the CLI demo's run folder, determinism, exact resume, signals, NaN, optimizers."""
import csv
import json
import os
import signal

import pytest
import torch

import cnnlab
import cnnlab.training.callbacks
from cnnlab.training.checkpoint import load as load_checkpoint
from cnnlab.config import make_config
from cnnlab.errors import UsageError
from cnnlab.training.engine import Interrupted
from cnnlab.training.loop import fit

from .conftest import run_cli, signal_and_wait, start_train

SMALL = dict(data="mnist-5k", train_samples=600, val_samples=200, test_samples=200, batch_size=50,
             model="net_dropout", epochs=3, schedule="onecycle", ema=0.9, augment="crop", report=False)


def test_cli_demo_run_folder(demo_run):
    for name in ("config.yaml", "metrics.csv", "summary.json", "best.pt", "last.pt", "curves.png", "splits.json"):
        assert os.path.getsize(os.path.join(demo_run, name)) > 0, name
    summary = json.load(open(os.path.join(demo_run, "summary.json")))
    for key in ("best_val_acc", "test_acc", "test_loss", "epochs", "train_seconds", "samples_per_second",
                "device", "model", "data", "num_params"):
        assert key in summary, key
    assert summary["test_acc"] > 0.5 and summary["best_val_acc"] > 0.5   # chance is 0.1
    assert summary["num_params"] == 121930 and summary["epochs"] == 4
    rows = list(csv.DictReader(open(os.path.join(demo_run, "metrics.csv"))))
    assert list(rows[0])[:7] == ["epoch", "train_loss", "train_acc", "val_loss", "val_acc", "lr", "seconds"]
    assert len(rows) == 4 and all(0 <= float(r["val_acc"]) <= 1 for r in rows)
    assert float(rows[-1]["train_loss"]) < float(rows[0]["train_loss"])


def weights(run_dir, name="last.pt"):
    return load_checkpoint(os.path.join(run_dir, name), name)["state_dict"]


def metric_rows(run_dir):
    """metrics.csv without the wall-clock column, which no two runs share."""
    return [{k: v for k, v in row.items() if k != "seconds"} for row in csv.DictReader(open(os.path.join(run_dir, "metrics.csv")))]


def assert_same_weights(a, b):
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_seeded_runs_are_identical(tmp_path):
    fit(make_config({**SMALL, "epochs": 2, "out": str(tmp_path / "a")}), quiet=True)
    fit(make_config({**SMALL, "epochs": 2, "out": str(tmp_path / "b")}), quiet=True)
    assert_same_weights(weights(tmp_path / "a"), weights(tmp_path / "b"))
    assert metric_rows(tmp_path / "a") == metric_rows(tmp_path / "b")


def interrupt_at_step(monkeypatch, n):
    calls = {"n": 0}

    def fake_stop(stop, ctx):
        calls["n"] += 1
        if calls["n"] == n:
            stop.signum = signal.SIGINT
            return True
        return False
    monkeypatch.setattr(cnnlab.training.callbacks, "agreed_stop", fake_stop)


def assert_resume_is_exact(settings, tmp_path, monkeypatch, stop_step):
    """A run stopped after `stop_step` and resumed ends with the uninterrupted run's weights and metrics."""
    fit(make_config({**settings, "out": str(tmp_path / "full")}), quiet=True)
    interrupt_at_step(monkeypatch, stop_step)
    with pytest.raises(Interrupted):
        fit(make_config({**settings, "out": str(tmp_path / "cut")}), quiet=True)
    monkeypatch.undo()
    cnnlab.train(resume=str(tmp_path / "cut"), quiet=True)
    assert_same_weights(weights(tmp_path / "full"), weights(tmp_path / "cut"))
    assert metric_rows(tmp_path / "full") == metric_rows(tmp_path / "cut")


@pytest.mark.parametrize("stop_step", [12, 17], ids=["epoch-boundary", "mid-epoch"])
def test_resume_is_exact(tmp_path, monkeypatch, stop_step):
    """12 steps per epoch: stopping after step 12 is an epoch boundary, after 17 mid-epoch."""
    fit(make_config({**SMALL, "out": str(tmp_path / "full")}), quiet=True)
    interrupt_at_step(monkeypatch, stop_step)
    with pytest.raises(Interrupted):
        fit(make_config({**SMALL, "out": str(tmp_path / "cut")}), quiet=True)
    state = load_checkpoint(tmp_path / "cut" / "last.pt", "last.pt")["train_state"]["progress"]
    assert state["global_step"] == stop_step
    monkeypatch.undo()
    cnnlab.train(resume=str(tmp_path / "cut"), quiet=True)
    assert_same_weights(weights(tmp_path / "full"), weights(tmp_path / "cut"))
    assert_same_weights(weights(tmp_path / "full", "best.pt"), weights(tmp_path / "cut", "best.pt"))
    assert metric_rows(tmp_path / "full") == metric_rows(tmp_path / "cut")


def test_resume_refuses_a_changed_model(tmp_path):
    fit(make_config({**SMALL, "epochs": 1, "out": str(tmp_path / "r")}), quiet=True)
    result = run_cli("train", "--resume", tmp_path / "r", "--model", "lenet5")
    assert result.returncode == 2 and "model: 'net_dropout' -> 'lenet5'" in result.stderr


@pytest.mark.parametrize("setting, value", [("sampler", "balanced"), ("mixup", 0.2), ("class_weights", "auto"),
                                            ("normalize", "none")])
def test_resume_refuses_a_change_of_what_the_run_trains_on(tmp_path, setting, value):
    """Sampler, mixing, loss weights and normalisation decide the batches and the loss: changing
    them on --resume would silently make a run that is neither the old one nor a new one."""
    from cnnlab.training.resume import resolve_config

    fit(make_config({**SMALL, "epochs": 1, "out": str(tmp_path / "r")}), quiet=True)
    with pytest.raises(UsageError, match=f"different {setting}"):
        resolve_config(resume=str(tmp_path / "r"), overrides={setting: value})


@pytest.mark.parametrize("optimizer", ["sgd", "adamw"])
def test_resume_trains_on_with_a_changed_momentum_and_weight_decay(tmp_path, optimizer):
    """--momentum and --weight-decay may change on --resume, and the steps after it use the new
    values: last.pt's optimizer groups once put the old ones back while config.yaml said the new."""
    run = str(tmp_path / "r")
    fit(make_config({**SMALL, "epochs": 1, "optimizer": optimizer, "momentum": 0.9, "weight_decay": 5e-4,
                     "out": run}), quiet=True)
    cnnlab.train(resume=run, epochs=2, momentum=0.5, weight_decay=2e-3, quiet=True)
    groups = load_checkpoint(os.path.join(run, "last.pt"), "last.pt")["train_state"]["optimizer"]["param_groups"]
    assert [g["weight_decay"] for g in groups] == [2e-3]
    if optimizer == "sgd":
        assert [g["momentum"] for g in groups] == [0.5]
    saved = load_checkpoint(os.path.join(run, "last.pt"), "last.pt")["config"]
    assert (saved["momentum"], saved["weight_decay"]) == (0.5, 2e-3)


def test_resuming_a_run_still_in_its_first_epoch_names_the_process(tmp_path):
    """No last.pt yet because another process is training the folder: said with its pid, not
    'is it a cnnlab run folder?'; once the process is gone, the plain message."""
    from cnnlab.training.resume import resolve_config
    from cnnlab.training.run_folder import LOCK, hold_lock

    lock = hold_lock(tmp_path / LOCK)
    with pytest.raises(UsageError, match=f"another cnnlab process \\(pid {os.getpid()}\\) is training it"):
        resolve_config(resume=str(tmp_path))
    lock.close()
    with pytest.raises(UsageError, match="has no last.pt \\(is it a cnnlab run folder"):
        resolve_config(resume=str(tmp_path))


def test_a_run_on_a_folder_resumes_after_the_folder_moved(tmp_path):
    """A folder named by a relative path could not be resumed from another working directory, nor
    after it moved (--data-dir was ignored, --data refused): --data-dir now gives its new place, and
    the resumed run ends as the uninterrupted one; other data under that name is still refused."""
    from .test_data import make_folder

    (tmp_path / "work").mkdir()
    make_folder(tmp_path / "work" / "pets", n=10)
    flags = ("--data", "folder:pets", "--image-size", 8, "--model", "simple_cnn", "--batch-size", 4, "--report", "false")
    for name, epochs in (("full", 2), ("cut", 1)):
        result = run_cli("train", *flags, "--epochs", epochs, "--out", tmp_path / name, cwd=tmp_path / "work")
        assert result.returncode == 0, result.stderr
    os.rename(tmp_path / "work" / "pets", tmp_path / "pets2")
    first_best = (tmp_path / "cut" / "best.pt").read_bytes()   # its config says folder:pets
    lost = run_cli("train", "--resume", tmp_path / "cut", "--epochs", 2, cwd=tmp_path)
    assert lost.returncode == 2 and "its data pets (a path relative" in lost.stderr and "--data-dir PATH" in lost.stderr
    again = run_cli("train", "--resume", tmp_path / "cut", "--epochs", 2, "--data-dir", tmp_path / "pets2", cwd=tmp_path)
    assert again.returncode == 0, again.stderr
    assert_same_weights(weights(tmp_path / "full"), weights(tmp_path / "cut"))
    assert metric_rows(tmp_path / "full") == metric_rows(tmp_path / "cut")
    # evaluate reads the data's new place from config.yaml, whichever epoch's best.pt says the old one
    evaluated = run_cli("evaluate", tmp_path / "cut", "--json", cwd=tmp_path)
    assert evaluated.returncode == 0, evaluated.stderr
    assert json.loads(evaluated.stdout)["accuracy"] == json.loads(
        (tmp_path / "full" / "summary.json").read_text())["test_acc"]
    (tmp_path / "cut" / "best.pt").write_bytes(first_best)   # as when the resumed epochs never beat epoch 1
    evaluated = run_cli("evaluate", tmp_path / "cut", "--json", cwd=tmp_path)
    assert evaluated.returncode == 0 and "accuracy" in json.loads(evaluated.stdout), evaluated.stderr
    make_folder(tmp_path / "other", n=4)   # most of the split's files missing: not the data it was cut from
    other = run_cli("train", "--resume", tmp_path / "cut", "--epochs", 3, "--data-dir", tmp_path / "other")
    assert other.returncode in (1, 2) and "Traceback" not in other.stderr, other.stderr
    assert "changed since" in other.stderr or "missing" in other.stderr, other.stderr


def test_sigint_leaves_a_resumable_checkpoint(tmp_path):
    out = tmp_path / "sig"
    proc = start_train("--epochs", 30, "--out", out, "--train-samples", 1000, "--report", "false")
    err = signal_and_wait(proc, signal.SIGINT)
    assert proc.returncode == 130, err
    assert f"cnnlab train --resume {out}" in err
    ckpt = load_checkpoint(out / "last.pt", "last.pt")
    assert ckpt["train_state"]["progress"]["global_step"] > 0
    resumed = run_cli("train", "--resume", out, "--epochs", ckpt["train_state"]["progress"]["epoch"] + 1)
    assert resumed.returncode == 0, resumed.stderr
    assert "(resumed)" in resumed.stdout


def test_nan_loss_stops_cleanly(tmp_path):
    result = run_cli("train", "--optimizer", "sgd", "--lr", "1e8", "--train-samples", "500", "--out", tmp_path / "nan")
    assert result.returncode == 1
    assert "non-finite" in result.stderr and "lr" in result.stderr and "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize("settings", [
    dict(optimizer="sgd", momentum=0.9, nesterov=True, schedule="step", step_epochs=1),
    dict(optimizer="adam", schedule="cosine", warmup_epochs=0.5),
    dict(optimizer="adamw", weight_decay=0.05, schedule="onecycle", label_smoothing=0.1, grad_clip=1.0),
    dict(optimizer="sgd", l2=1e-3, schedule="constant", amp="bf16", channels_last=True),
])
def test_optimizers_and_schedules_take_steps(tmp_path, settings):
    cfg = make_config({**SMALL, "model": "mnist_cnn", "ema": 0.0, "epochs": 2, "lr": 0.01, **settings,
                       "out": str(tmp_path / "o")})
    before = fit(make_config({**cfg.to_dict(), "epochs": 1, "out": str(tmp_path / "o1")}), quiet=True)
    result = fit(cfg, quiet=True)
    lrs = [row["lr"] for row in result.history]
    assert result.summary["test_acc"] > 0.3 and before.summary["test_acc"] > 0.1
    if settings["schedule"] == "step":
        assert lrs[1] == pytest.approx(lrs[0] * 0.1)


def test_early_stopping(tmp_path):
    result = fit(make_config({**SMALL, "epochs": 8, "lr": 1e-9, "optimizer": "sgd", "schedule": "constant",
                              "patience": 1, "out": str(tmp_path / "p")}), quiet=True)
    assert result.summary["stopped_early"] and result.summary["epochs"] < 8


@pytest.mark.parametrize("args,needle", [
    (["--data", "mnsit"], "Did you mean 'mnist'"),
    (["--model", "lenet"], "Did you mean 'lenet5'"),
    (["--epochs", "0"], "epochs"),
    (["--batch-size", "-4"], "batch_size"),
    (["--optimizer", "adan"], "optimizer"),
    (["--bogus-flag", "1"], "unrecognized arguments"),
])
def test_bad_input_is_one_line_exit_2_and_writes_nothing(tmp_path, args, needle):
    out = tmp_path / "never"
    result = run_cli("train", *args, "--out", out)
    assert result.returncode == 2, result.stderr
    assert needle in result.stderr and len(result.stderr.strip().splitlines()) == 1
    assert not out.exists()


def test_unwritable_out(tmp_path):
    blocker = tmp_path / "file.txt"
    blocker.write_text("x")
    result = run_cli("train", "--out", blocker / "run")
    assert result.returncode == 2 and "is a file" in result.stderr


def test_python_api(tmp_path):
    import matplotlib.pyplot as plt

    import cnnlab

    result = cnnlab.train(**{**SMALL, "epochs": 2}, out=str(tmp_path / "api"), quiet=True)
    assert os.path.exists(os.path.join(result.run_dir, "best.pt")) and len(result.history) == 2
    fig = result.plot()
    axes = {ax.get_title(): ax for ax in fig.axes}
    assert sorted(axes) == ["accuracy", "loss"]
    for title, key in (("loss", "loss"), ("accuracy", "acc")):   # one point per epoch, train and val
        lines = {line.get_label(): line.get_data() for line in axes[title].get_lines()}
        assert sorted(lines) == ["train", "val"], title
        for split, (xs, ys) in lines.items():
            assert list(xs) == [1, 2], (title, split)
            assert list(ys) == [row[f"{split}_{key}"] for row in result.history], (title, split)
    plt.close(fig)


def test_tensorboard_and_log_every(tmp_path):
    result = run_cli("train", "--epochs", 1, "--train-samples", 500, "--tensorboard", "--log-every", 0.25,
                     "--out", tmp_path / "tb", "--report", "false")
    assert result.returncode == 0, result.stderr
    events = os.listdir(tmp_path / "tb" / "tensorboard")
    assert any(name.startswith("events.out.tfevents") for name in events)
    assert result.stderr.count("took") == 4     # four timed progress lines in one epoch, beside the bar's place
    assert "took" not in result.stdout and "epoch   1/1" in result.stdout


@pytest.mark.parametrize("args,needle", [
    (["--resume", "runs/x", "--config", "seed003_mnist"], "drop --config"),
    (["--amp", "fp16", "--device", "cpu"], "fp16"),
    (["--schedule", "step"], "step_epochs"),
])
def test_conflicting_flags(tmp_path, args, needle):
    result = run_cli("train", *args, "--out", tmp_path / "c")
    assert result.returncode == 2 and needle in result.stderr and "Traceback" not in result.stderr


def test_a_training_wrapper_is_never_truth_tested():
    """--compile's wrapper (torch._dynamo's OptimizedModule) answers len() only for an nn.Sequential,
    so `forward or model` raised "ResNet does not support len()" for every other --compile run."""
    from cnnlab.runtime import Context
    from cnnlab.training.engine import make_step

    class NoTruth(torch.nn.Module):   # what OptimizedModule does around a non-Sequential network
        def __init__(self, net):
            super().__init__()
            self.net = net

        def forward(self, x):
            return self.net(x)

        def __len__(self):
            raise TypeError("ResNet does not support len()")

    net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(4, 3))
    cfg = make_config({"optimizer": "sgd", "lr": 0.1})
    step = make_step(net, torch.optim.SGD(net.parameters(), lr=0.1), cfg, Context(torch.device("cpu")),
                     forward=NoTruth(net))
    loss, correct = step(torch.randn(5, 1, 2, 2), torch.tensor([0, 1, 2, 0, 1]), 0.1)
    assert loss.item() > 0 and 0 <= correct.item() <= 5


@pytest.mark.parametrize("amx, avx512_bf16", [(True, True), (True, False), (False, True), (False, False)])
def test_amp_auto_is_fp32_on_any_cpu_and_names_bf16_where_the_cpu_has_it(monkeypatch, amx, avx512_bf16):
    """amp auto on the CPU stays fp32 (exact DDP and evaluate); on a CPU with AMX or AVX512-BF16,
    where bf16 trains 1.1-2.8x faster (benchmarks/cpu_bf16.py), the settings block says so and names
    the unit; bf16 on request anywhere."""
    import torch

    from cnnlab import runtime

    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx)
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: avx512_bf16)
    cpu = torch.device("cpu")
    ctx = runtime.Context(device=cpu, amp_dtype=runtime.amp_dtype("auto", cpu))
    assert ctx.amp_dtype is None and runtime.amp_dtype("bf16", cpu) == torch.bfloat16
    label = runtime.amp_label("auto", ctx)
    assert ("--amp bf16" in label) == (amx or avx512_bf16) and label.startswith("auto (fp32")
    assert ("AMX" in label) == amx and ("AVX512-BF16" in label) == (avx512_bf16 and not amx)
    assert runtime.amp_label("bf16", runtime.Context(device=cpu, amp_dtype=torch.bfloat16)) == "bf16"
    monkeypatch.delattr(torch.cpu, "_is_amx_tile_supported")   # a torch without the private probes
    monkeypatch.delattr(torch.cpu, "_is_avx512_bf16_supported")
    assert runtime.cpu_bf16_units() == ""
