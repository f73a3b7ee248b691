"""Class imbalance (issue 19): --class-weights, --sampler balanced, balanced accuracy, the starved-class diagnostic."""
import json

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.nn import functional as F

from cnnlab.config import make_config
from cnnlab.data.loader import balanced_order
from cnnlab.errors import UsageError
from cnnlab.metrics import balanced_accuracy
from cnnlab.training.diagnose import starved
from cnnlab.training.engine import class_weights, confusion_matrix, training_loss

from .conftest import run_cli

sklearn_metrics = pytest.importorskip("sklearn.metrics")


@settings(max_examples=200, deadline=None)
@given(st.integers(2, 8).flatmap(lambda k: st.tuples(
    st.just(k), st.lists(st.tuples(st.integers(0, k - 1), st.integers(0, k - 1)), min_size=1, max_size=60))))
def test_balanced_accuracy_matches_scikit_learn(case):
    k, pairs = case
    y_true, y_pred = zip(*pairs)
    cm = confusion_matrix(torch.tensor(y_pred), torch.tensor(y_true), k)
    import warnings

    with warnings.catch_warnings():   # sklearn warns when y_pred has classes y_true lacks
        warnings.simplefilter("ignore")
        expected = sklearn_metrics.balanced_accuracy_score(y_true, y_pred)
    assert balanced_accuracy(cm) == pytest.approx(expected, abs=1e-12)


@settings(max_examples=100, deadline=None)
@given(st.lists(st.integers(0, 5), min_size=1, max_size=80))
def test_auto_class_weights_are_scikit_learns_balanced(labels):
    from sklearn.utils.class_weight import compute_class_weight

    y = torch.tensor(labels)
    weights = class_weights("auto", y, list(range(6)))
    present = sorted(set(labels))
    expected = compute_class_weight("balanced", classes=torch.tensor(present).numpy(), y=y.numpy())
    assert torch.allclose(weights[present].double(), torch.tensor(expected), atol=1e-6)
    assert float(weights[y].mean()) == pytest.approx(1.0, abs=1e-5)   # the samples' weights average 1
    assert all(weights[k] == 0 for k in range(6) if k not in present)


def test_explicit_class_weights_and_their_errors():
    assert class_weights("none", torch.tensor([0, 1]), ["a", "b"]) is None
    assert class_weights("1,3", torch.tensor([0, 1]), ["a", "b"]).tolist() == [1.0, 3.0]
    with pytest.raises(UsageError, match="has 3 numbers but the data has 2 classes"):
        class_weights("1,2,3", torch.tensor([0, 1]), ["a", "b"])
    for bad in ("a,b", "-1,2", "0,0", ""):
        with pytest.raises(UsageError, match="class_weights"):
            make_config({"class_weights": bad})


def test_weighted_loss_is_the_hand_formula_and_splits_over_ranks():
    """mean_i w[y_i] * CE_i over B samples (not PyTorch's divide-by-summed-weights): two halves' losses average to it."""
    torch.manual_seed(0)
    logits, y = torch.randn(8, 4), torch.tensor([0, 1, 2, 3, 3, 3, 1, 0])
    w = torch.tensor([0.5, 1.0, 2.0, 4.0])
    hand = (w[y] * -logits.log_softmax(1)[torch.arange(8), y]).mean()
    assert training_loss(logits, y, w) == pytest.approx(float(hand), rel=1e-6)
    halves = (training_loss(logits[0::2], y[0::2], w) + training_loss(logits[1::2], y[1::2], w)) / 2
    assert float(halves) == pytest.approx(float(hand), rel=1e-6)
    assert training_loss(logits, y) == pytest.approx(float(F.cross_entropy(logits, y)), rel=1e-6)


def test_balanced_sampler_is_seeded_and_balanced():
    y = torch.tensor([0] * 900 + [1] * 90 + [2] * 10)
    gen = lambda s: torch.Generator().manual_seed(s)
    first = balanced_order(y, gen(1))
    assert torch.equal(first, balanced_order(y, gen(1))) and not torch.equal(first, balanced_order(y, gen(2)))
    drawn = torch.bincount(y[torch.cat([balanced_order(y, gen(s)) for s in range(20)])], minlength=3).float()
    assert len(first) == len(y)
    assert (drawn / drawn.sum() - 1 / 3).abs().max() < 0.02   # plain shuffling gives 0.9 / 0.09 / 0.01


def test_the_starved_class_is_named_with_the_flags():
    classes = ["a", "b", "c"]
    train = torch.tensor([0] * 100 + [1] * 100 + [2] * 5)
    cm = torch.tensor([[50, 0, 0], [0, 50, 0], [30, 0, 20]])   # c: recall 40%, accuracy 80%
    text = starved(cm, classes, train)
    assert "c (5 training images, test recall 40%)" in text and "--class-weights auto" in text
    assert "--sampler balanced" not in starved(cm, classes, train, make_config({"sampler": "balanced"}))
    assert starved(torch.tensor([[50, 0, 0], [0, 50, 0], [1, 0, 49]]), classes, train) is None   # learnt anyway


def test_a_weighted_balanced_run_reports_balanced_accuracy(tmp_path):
    run = tmp_path / "run"
    trained = run_cli("train", "--epochs", 1, "--train-samples", 300, "--val-samples", 100, "--test-samples", 100,
                      "--class-weights", "auto", "--sampler", "balanced", "--report", "false", "--out", run)
    assert trained.returncode == 0, trained.stderr
    summary = json.load(open(run / "summary.json"))
    assert 0 <= summary["test_balanced_acc"] <= 1 and set(summary["test_recall"]) == set(summary["classes"])
    evaluated = run_cli("evaluate", run, "--json")
    assert json.loads(evaluated.stdout)["balanced_acc"] == pytest.approx(summary["test_balanced_acc"])
    wrong = run_cli("train", "--epochs", 1, "--class-weights", "1,2", "--out", tmp_path / "w")
    assert wrong.returncode == 2 and "one per class" in wrong.stderr and "Traceback" not in wrong.stderr
