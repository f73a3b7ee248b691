"""Recipes that reproduce the tutorials as written (issue 25): index-range splits (seed 004),
fixed normalisation (ToTensor only, mean = std = 0.5, the book's CIFAR statistics), the book's
weight-sharing NetResDeep, and the last epoch's test accuracy beside the best epoch's."""
import json
import os

import numpy as np
import pytest
import torch
from hypothesis import given, settings, strategies as st

import cnnlab
from cnnlab.config import DataConfig, make_config
from cnnlab.data import load_data
from cnnlab.errors import UsageError
from cnnlab.models import count_params, create_model
from cnnlab.training.callbacks import Callback

from .conftest import run_cli

N_TRAIN, N_TEST = 60, 30


@pytest.fixture(scope="module")
def npz(tmp_path_factory):
    """A Keras-style npz with an official test set; image i's first pixel is i (to find it again)."""
    rng = np.random.default_rng(0)
    x_train = rng.integers(0, 256, (N_TRAIN, 8, 8, 3), dtype=np.uint8)
    x_test = rng.integers(0, 256, (N_TEST, 8, 8, 3), dtype=np.uint8)
    x_train[:, 0, 0, 0], x_test[:, 0, 0, 0] = np.arange(N_TRAIN), np.arange(N_TEST) + 100
    path = tmp_path_factory.mktemp("npz") / "d.npz"
    np.savez(path, x_train=x_train, y_train=np.arange(N_TRAIN) % 3, x_test=x_test, y_test=np.arange(N_TEST) % 3)
    return str(path)


def ranges_text(train, val, test):
    return ",".join(f"{name}={a}:{b}" for name, (a, b) in zip(("train", "val", "test"), (train, val, test)))


@settings(max_examples=25, deadline=None)
@given(st.data())
def test_split_ranges_take_exactly_those_images_in_order(npz, draw):
    cut1 = draw.draw(st.integers(1, N_TRAIN - 1))
    train_start = draw.draw(st.integers(0, cut1 - 1))
    val_stop = draw.draw(st.integers(cut1, N_TRAIN))
    test = sorted(draw.draw(st.lists(st.integers(0, N_TEST), min_size=2, max_size=2)))
    data = load_data(DataConfig(data="npz:" + npz, split_ranges=ranges_text((train_start, cut1), (cut1, val_stop), test)))
    # the oracle: plain slices of the arrays, in their own order
    assert data.train[0][:, 0, 0, 0].tolist() == list(range(train_start, cut1))
    assert data.val[0][:, 0, 0, 0].tolist() == list(range(cut1, val_stop))
    assert data.test[0][:, 0, 0, 0].tolist() == [100 + i for i in range(*test)]
    assert data.splits["train"] == list(range(train_start, cut1)) and data.splits["test_pool"] == "test"


@pytest.mark.parametrize("text, culprit", [
    ("train=0:10,val=5:20,test=0:5", "overlap"),
    ("train=0:10,val=10:999,test=0:5", "STOP of at most 60"),
    ("train=0:10,val=10:20,test=0:31", "STOP of at most 30"),
])
def test_split_ranges_that_cannot_be_cut_are_refused(npz, text, culprit):
    with pytest.raises(UsageError, match=culprit):
        load_data(DataConfig(data="npz:" + npz, split_ranges=text))


@pytest.mark.parametrize("text, culprit", [
    ("train=0:10,val=10:20", "missing test"), ("train=0:10,val=10:20,test=5", "SPLIT=START:STOP"),
    ("train=0:10,val=10:20,train=0:5", "once each"), ("train=5:2,val=10:20,test=0:5", "START <= STOP"),
    ("train=0:0,val=10:20,test=0:5", "no images"), ("train=0:10,vali=10:20,test=0:5", "'vali'"),
])
def test_bad_split_ranges_are_one_line_usage_errors(text, culprit):
    with pytest.raises(UsageError, match=culprit):
        make_config({"split_ranges": text})


def test_split_ranges_and_sample_caps_do_not_mix():
    with pytest.raises(UsageError, match="drop train_samples"):
        make_config({"split_ranges": "train=0:10,val=10:20,test=0:5", "train_samples": 5})


def test_split_ranges_without_a_test_set_come_from_the_training_pool():
    data = load_data(DataConfig(data="mnist-5k", split_ranges="train=0:100,val=100:150,test=4000:4100"))
    assert data.splits["test_pool"] == "train" and data.splits["test"] == list(range(4000, 4100))
    with pytest.raises(UsageError, match="overlap"):
        load_data(DataConfig(data="mnist-5k", split_ranges="train=0:100,val=100:150,test=50:60"))


@settings(max_examples=20, deadline=None)
@given(st.lists(st.floats(0.01, 1.0), min_size=6, max_size=6), st.integers(0, 2**31 - 1))
def test_fixed_normalization_equals_torchvision(npz, stats, seed):
    from torchvision.transforms import v2

    text = ",".join(f"{v:.4f}" for v in stats)
    data = load_data(DataConfig(data="npz:" + npz, normalize=text))
    x = torch.randint(0, 256, (4, 3, 8, 8), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))
    mean, std = [float(f"{v:.4f}") for v in stats[:3]], [float(f"{v:.4f}") for v in stats[3:]]
    expected = v2.Normalize(mean, std)(x.float() / 255)       # ToTensor, then Normalize(mean, std)
    torch.testing.assert_close(data.preprocess.normalise(x), expected, rtol=1e-5, atol=1e-5)


def test_normalize_none_is_to_tensor_and_one_pair_serves_every_channel(npz):
    from torchvision.transforms import v2

    x = torch.randint(0, 256, (4, 3, 8, 8), dtype=torch.uint8)
    none = load_data(DataConfig(data="npz:" + npz, normalize="none")).preprocess
    torch.testing.assert_close(none.normalise(x), v2.ToDtype(torch.float32, scale=True)(x))
    half = load_data(DataConfig(data="npz:" + npz, normalize="0.5,0.5")).preprocess
    assert half.mean == [0.5] * 3 and half.std == [0.5] * 3
    own = load_data(DataConfig(data="npz:" + npz)).preprocess   # the default: the training split's own
    assert own.mean != [0.5] * 3


@pytest.mark.parametrize("text, culprit", [("0.5", "MEAN,STD"), ("0.5,0", "positive"), ("a,b", "MEAN,STD"),
                                           ("nan,1", "MEAN,STD")])
def test_bad_normalize_values_are_refused(text, culprit):
    with pytest.raises(UsageError, match=culprit):
        make_config({"normalize": text})


def test_normalize_with_the_wrong_channel_count_names_both(npz):
    with pytest.raises(UsageError, match="2 means and stds; the images have 3"):
        load_data(DataConfig(data="npz:" + npz, normalize="0.1,0.2,0.3,0.4"))


def test_the_books_net_res_deep_shares_one_block():
    shared = create_model("net_res_deep", (3, 32, 32), 2, n_blocks=100, share_weights=True)
    own = create_model("net_res_deep", (3, 32, 32), 2, n_blocks=3)
    blocks = [m for m in shared.features if type(m).__name__ == "ResBlock"]   # modules() would dedupe them
    assert len(blocks) == 100 and len({id(b) for b in blocks}) == 1      # as `n_blocks * [ResBlock()]`
    one_block = sum(p.numel() for p in blocks[0].parameters())
    assert count_params(shared) == count_params(own) - 2 * one_block     # 100 shared blocks weigh as 1


def test_a_shared_weight_run_saves_loads_and_predicts(tmp_path):
    result = cnnlab.train(data="mnist-5k", model="net_res_deep", model_args={"n_blocks": 4, "share_weights": True},
                          epochs=1, train_samples=200, test_samples=50, image_size=16, report=False,
                          out=str(tmp_path / "r"), quiet=True)
    model = cnnlab.load(result.run_dir)
    blocks = [m for m in model.net.features if type(m).__name__ == "ResBlock"]
    assert len(blocks) == 4 and len({id(b) for b in blocks}) == 1                          # rebuilt shared, from the file's args
    assert len(model.predict([np.zeros((16, 16), np.uint8)])) == 1


class RuinTheLastEpoch(Callback):
    """Zeroes the weights after the last step, so the last epoch is surely not the best one."""

    def on_step(self, state):
        if state.progress.epoch == state.cfg.epochs - 1 and state.progress.step == len(state.train_loader):
            with torch.no_grad():
                for p in state.model.parameters():
                    p.zero_()


def test_final_test_acc_is_the_last_epochs_weights_on_the_test_split(tmp_path):
    run = str(tmp_path / "r")
    result = cnnlab.train(data="mnist-5k", model="mnist_cnn", epochs=2, train_samples=400, test_samples=200,
                          val_samples=100, report=False, out=run, quiet=True, callbacks=[RuinTheLastEpoch()])
    s = result.summary
    assert s["best_epoch"] == 1 and s["final_test_acc"] < s["test_acc"]
    # the oracle: evaluate each checkpoint file on its own
    best = json.loads(run_cli("evaluate", os.path.join(run, "best.pt"), "--json").stdout)
    last = json.loads(run_cli("evaluate", os.path.join(run, "last.pt"), "--json").stdout)
    assert best["accuracy"] == pytest.approx(s["test_acc"]) and last["accuracy"] == pytest.approx(s["final_test_acc"])
    both = run_cli("evaluate", run, "--json")
    assert both.returncode == 0, both.stderr
    final = json.loads(both.stdout)["final"]
    assert final["epoch"] == 2 and final["accuracy"] == pytest.approx(s["final_test_acc"])
    text = run_cli("evaluate", run).stdout
    assert "last epoch (2, last.pt)" in text


def test_when_the_last_epoch_is_the_best_both_figures_agree(tmp_path):
    result = cnnlab.train(data="mnist-5k", model="mnist_cnn", epochs=1, train_samples=300, test_samples=100,
                          report=False, out=str(tmp_path / "r"), quiet=True)
    assert result.summary["final_test_acc"] == result.summary["test_acc"]
    assert "final" not in json.loads(run_cli("evaluate", result.run_dir, "--json").stdout)


@pytest.mark.parametrize("script, lines", [("seed000_one_batch.py", ("loss before the step", "loss after the step")),
                                           ("seed001_one_step.py", ("loss:", "loss after one SGD step"))])
def test_the_one_step_seeds_run_and_go_downhill(script, lines):
    """Seeds 000 and 001 are one optimizer step each: the examples take it and print the seed's numbers."""
    import re
    import subprocess
    import sys

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    result = subprocess.run([sys.executable, os.path.join(root, "examples", script)], capture_output=True, text=True,
                            cwd=root, env={**os.environ, "PYTHONPATH": root}, timeout=600)
    assert result.returncode == 0, result.stderr
    before, after = (float(re.search(re.escape(label) + r"[:\s]*([0-9.]+)", result.stdout).group(1)) for label in lines)
    assert after < before                  # one step on the same batch lowers its loss


def test_the_shared_batch_norm_normalises_with_the_batch_in_eval_mode_too():
    """One batch norm shared by every depth has no meaningful running statistics (an eval-mode test of
    the book's run scored chance after 97% training accuracy): it uses the batch's own, in both modes,
    as the book's validate() (which never calls model.eval()) measured its 0.86."""
    torch.manual_seed(0)
    shared = create_model("net_res_deep", (3, 32, 32), 2, n_blocks=5, share_weights=True)
    x = torch.randn(8, 3, 32, 32)
    shared.train()
    for _ in range(3):   # training steps would move running statistics, if there were any
        shared(x * 3 + 1)
    with torch.no_grad():
        train_mode = shared.train()(x)
        eval_mode = shared.eval()(x)
    assert torch.allclose(train_mode, eval_mode, atol=1e-5)
    own = create_model("net_res_deep", (3, 32, 32), 2, n_blocks=2)   # blocks of their own keep theirs
    assert all(m.track_running_stats for m in own.modules() if isinstance(m, torch.nn.BatchNorm2d))


def test_a_network_that_depends_on_the_batch_is_evaluated_in_one_fixed_mixed_order():
    """The book's NetResDeep normalises with each batch's statistics even in eval mode; a class
    folder's test split in stored order gave it one-class batches, which that normalisation
    erases: 72.0% where mixed batches give 85.0% (the book: 0.86). Such a network is evaluated in
    one fixed random order, its per-sample results put back in the split's order."""
    from cnnlab.data.loader import BatchLoader
    from cnnlab.data.preprocess import Preprocess
    from cnnlab.runtime import Context
    from cnnlab.training.engine import depends_on_batch, evaluate

    shared = create_model("net_res_deep", (3, 32, 32), 2, n_blocks=3, share_weights=True)
    assert depends_on_batch(shared)
    assert not any(depends_on_batch(create_model(name, (3, 32, 32), 2)) for name in ("net_res_deep", "net_bn", "net"))
    torch.manual_seed(0)
    x = torch.randint(0, 256, (50, 3, 32, 32), dtype=torch.uint8)
    y = torch.arange(50) % 2
    prep = Preprocess(channels=3, image_size=32, mean=[0.5] * 3, std=[0.25] * 3)
    mixed = BatchLoader(x, y, 16, prep, mixed=True)
    order = mixed.order(0)
    assert sorted(order.tolist()) == list(range(50)) and order.tolist() != list(range(50))
    assert torch.equal(order, BatchLoader(x, y, 16, prep, mixed=True).order(3))     # fixed: every call, every epoch
    assert BatchLoader(x, y, 16, prep).order(0).tolist() == list(range(50))
    # a batch-independent network gives the same per-sample results either way, once put back in order
    net = create_model("net", (3, 32, 32), 2).eval()
    cpu = Context(device=torch.device("cpu"))
    stored = evaluate(net, BatchLoader(x, y, 16, prep), cpu, 2, collect=True)
    shuffled = evaluate(net, mixed, cpu, 2, collect=True)
    assert torch.allclose(stored["probs"], shuffled["probs"], atol=1e-6)
    assert torch.allclose(stored["losses"], shuffled["losses"], atol=1e-5)
    assert torch.equal(stored["cm"], shuffled["cm"])
