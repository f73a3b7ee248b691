"""Fine-tuning: --init, --freeze-epochs, --backbone-lr-mult, the one-cycle default, and transfer."""
import pytest
import torch

import cnnlab
from cnnlab.config import make_config
from cnnlab.errors import UsageError
from cnnlab.models import create_model
from cnnlab.models.backbones import head_names
from cnnlab.training.engine import Interrupted
from cnnlab.training.loop import fit
from cnnlab.training.optim import build_optimizer, set_lr

from .conftest import run_cli
from .test_train import assert_same_weights, interrupt_at_step, metric_rows, weights

# digits_fast: a small BN network, so the frozen batch-norm statistics are checked too.
TINY = dict(data="mnist-5k", model="digits_fast", train_samples=300, val_samples=100, test_samples=100,
            batch_size=50, augment="crop", report=False)


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
    out = tmp_path_factory.mktemp("ft") / "pretrained"
    cnnlab.train(**TINY, epochs=1, out=str(out), quiet=True)
    return str(out)


def test_a_frozen_epoch_trains_the_head_alone(pretrained, tmp_path):
    """Oracle: the starting weights themselves. After one frozen epoch every backbone tensor, the
    batch-norm running statistics included, is what --init loaded; only the head moved."""
    cnnlab.train(**TINY, epochs=1, init=pretrained, freeze_epochs=1, out=str(tmp_path / "ft"), quiet=True)
    start, after = weights(pretrained, "best.pt"), weights(tmp_path / "ft")
    head = set(head_names(create_model("digits_fast", (1, 28, 28), 10), 10))   # its last Linear
    assert head and all(not torch.equal(start[k], after[k]) for k in head)
    assert all(torch.equal(start[k], after[k]) for k in start if k not in head)


def test_resume_across_the_unfreeze_is_exact(tmp_path, monkeypatch):
    """6 steps per epoch, epoch 1 frozen: cut inside the frozen epoch (step 4) and after the unfreeze
    (step 9); each resumed run ends with the uninterrupted run's weights and metrics."""
    settings = {**TINY, "epochs": 2, "freeze_epochs": 1, "backbone_lr_mult": 0.1, "schedule": "onecycle"}
    fit(make_config({**settings, "out": str(tmp_path / "full")}), quiet=True)
    for stop_step in (4, 9):
        cut = tmp_path / f"cut{stop_step}"
        interrupt_at_step(monkeypatch, stop_step)
        with pytest.raises(Interrupted):
            fit(make_config({**settings, "out": str(cut)}), quiet=True)
        monkeypatch.undo()
        cnnlab.train(resume=str(cut), quiet=True)
        assert_same_weights(weights(tmp_path / "full"), weights(cut))
        assert metric_rows(tmp_path / "full") == metric_rows(cut)


def test_the_backbone_learns_at_a_fraction_of_the_heads_lr():
    model = create_model("digits_fast", (1, 28, 28), 10)
    head = head_names(model, 10)
    optimizer = build_optimizer(make_config({"backbone_lr_mult": 0.1, "lr": 0.01}), model, head)
    set_lr(optimizer, 0.02)
    backbone_group, head_group = optimizer.param_groups
    assert backbone_group["lr"] == pytest.approx(0.002) and head_group["lr"] == pytest.approx(0.02)
    named = dict(model.named_parameters())
    assert {id(p) for p in head_group["params"]} == {id(named[n]) for n in head}
    assert len(backbone_group["params"]) + len(head) == len(named)


def test_fine_tuning_defaults_to_one_cycle_unless_a_schedule_is_given():
    assert make_config({"init": "runs/x"}).schedule == "onecycle"
    assert make_config({"weights": "w.pth", "schedule": "cosine"}).schedule == "cosine"
    assert make_config({}).schedule == "constant"


@pytest.mark.parametrize("args, words", [
    (["--freeze-epochs", "3", "--epochs", "2"], "must not exceed 'epochs'"),
    (["--backbone-lr-mult", "0"], "backbone_lr_mult"),
])
def test_bad_fine_tuning_settings_are_refused_in_one_line(args, words, tmp_path):
    result = run_cli("train", *args, "--out", tmp_path / "r")
    assert result.returncode == 2 and words in result.stderr and len(result.stderr.strip().splitlines()) == 1


def test_weights_and_init_together_are_refused(pretrained, tmp_path):
    with pytest.raises(UsageError, match="not both"):
        cnnlab.train(**TINY, epochs=1, init=pretrained, weights="x.pth", out=str(tmp_path / "r"), quiet=True)


def test_toy_transfer_beats_training_from_scratch(tmp_path):
    """Digits 0-7 teach features that digits 8 and 9 reuse: from 40 images of 8 and 9, starting
    from the 0-7 run beats starting from scratch with the same budget (fixed seed; measured
    margin in the test's comment below)."""
    pre = cnnlab.train(**{**TINY, "train_samples": 1500}, classes=[str(d) for d in range(8)], epochs=2,
                       out=str(tmp_path / "pre"), quiet=True)
    budget = dict(TINY, classes=["8", "9"], train_samples=40, val_fraction=0.0, val_samples=0, test_samples=400,
                  batch_size=20, epochs=3, schedule="onecycle", lr=2e-3)
    tuned = cnnlab.train(**budget, init=pre.run_dir, out=str(tmp_path / "tuned"), quiet=True)
    scratch = cnnlab.train(**budget, out=str(tmp_path / "scratch"), quiet=True)
    assert tuned.summary["test_acc"] >= scratch.summary["test_acc"] + 0.10


def test_the_fine_tune_line_names_the_head_and_a_random_backbone():
    """--backbone-lr-mult said "backbone lr = 0.1 x lr" without saying which layers are the head,
    and freezing a randomly initialised backbone went without a word."""
    from cnnlab.config import make_config
    from cnnlab.training.finetune import describe

    slow = describe(make_config({"backbone_lr_mult": 0.1}), None, ["fc.weight", "fc.bias"])
    assert "the head, fc.weight, fc.bias, at the full lr" in slow and "starts from random weights" in slow
    frozen = describe(make_config({"freeze_epochs": 1, "epochs": 2}), "torchvision weights", ["fc.weight"])
    assert "only the head (fc.weight) trains" in frozen and "random" not in frozen
    assert describe(make_config({}), None, ["fc.weight"]) is None
    assert "--backbone-lr-mult 0.1 ignored: no classifier head" in describe(make_config({"backbone_lr_mult": 0.1}),
                                                                             "w.pth", [])


@pytest.mark.parametrize("optimizer", ["sgd", "adamw"])
@pytest.mark.parametrize("before, after", [(1.0, 0.1), (0.1, 1.0), (0.1, 0.3)])
def test_a_resume_that_regroups_the_parameters_keeps_each_ones_state(optimizer, before, after):
    """--backbone-lr-mult from 1 to 0.1 (or back) on --resume changes the optimizer's groups, and the
    resume failed ("training state does not fit this run"). Oracle: the saved optimizer's own state,
    parameter by parameter; the groups' settings are the new run's."""
    from cnnlab.training.checkpoint import load_optimizer_state

    torch.manual_seed(0)
    model = create_model("digits_fast", (1, 28, 28), 10)
    head = head_names(model, 10)
    settings = {"optimizer": optimizer, "momentum": 0.9, "weight_decay": 1e-3, "lr": 0.01}
    old = build_optimizer(make_config({**settings, "backbone_lr_mult": before}), model, head)
    for _ in range(3):   # moments that differ per parameter
        set_lr(old, 0.01)
        old.zero_grad()
        torch.nn.functional.cross_entropy(model(torch.randn(8, 1, 28, 28)), torch.arange(8)).backward()
        old.step()
    saved = old.state_dict()
    new = build_optimizer(make_config({**settings, "backbone_lr_mult": after}), model, head)
    load_optimizer_state(new, saved, lambda: build_optimizer(make_config({**settings, "backbone_lr_mult": before}),
                                                              model, head))
    for p in model.parameters():
        assert old.state[p].keys() == new.state[p].keys()
        for key, value in old.state[p].items():
            assert torch.equal(torch.as_tensor(value), torch.as_tensor(new.state[p][key])), key
    if after == 1:   # one group, every parameter at the full lr
        assert len(new.param_groups) == 1 and new.param_groups[0].get("lr_mult", 1.0) == 1.0
        return
    named = {id(p): n for n, p in model.named_parameters()}
    for group in new.param_groups:
        in_head = {named[id(p)] in head for p in group["params"]}
        assert len(in_head) == 1 and group.get("lr_mult", 1.0) == (1.0 if in_head.pop() else after)


def test_resume_with_another_backbone_lr_mult_trains_on(pretrained, tmp_path):
    run = str(tmp_path / "ft")
    cnnlab.train(**TINY, epochs=1, init=pretrained, optimizer="sgd", momentum=0.9, out=run, quiet=True)
    result = run_cli("train", "--resume", run, "--epochs", 2, "--backbone-lr-mult", 0.1)
    assert result.returncode == 0, result.stderr
    groups = torch.load(f"{run}/last.pt", weights_only=True)["train_state"]["optimizer"]["param_groups"]
    assert sorted(g["lr_mult"] for g in groups) == [0.1, 1.0]
