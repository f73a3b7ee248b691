"""cnnlab.metrics against scikit-learn over random predictions (hypothesis), degenerate cases included,
and `cnnlab evaluate --json` against scikit-learn on predictions made independently of the engine."""
import json

import numpy as np
import pytest
import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st
from sklearn.metrics import accuracy_score, precision_recall_fscore_support
from sklearn.metrics import confusion_matrix as sk_confusion

import cnnlab
from cnnlab.evaluation.results import load_trained, run_data
from cnnlab.metrics import summarize
from cnnlab.training.engine import confusion_matrix

from .conftest import run_cli


@st.composite
def labelled(draw):
    """(K, y_true, y_pred): 1 to 12 classes, 1 to 60 samples. Small K and N make the degenerate
    cases frequent: classes never predicted, absent from the targets, precision + recall < 1."""
    k = draw(st.integers(1, 12))
    n = draw(st.integers(1, 60))
    labels = st.lists(st.integers(0, k - 1), min_size=n, max_size=n)
    return k, np.array(draw(labels)), np.array(draw(labels))


def assert_matches_sklearn(k, y_true, y_pred, out):
    """Every number of a summarize() dict equals scikit-learn's on the same labels."""
    labels = list(range(k))
    assert out["confusion_matrix"] == sk_confusion(y_true, y_pred, labels=labels).tolist()
    assert out["accuracy"] == pytest.approx(accuracy_score(y_true, y_pred))
    assert out["samples"] == len(y_true)
    p, r, f, s = precision_recall_fscore_support(y_true, y_pred, labels=labels, zero_division=0)
    got = out["per_class"]
    assert [row["support"] for row in got] == s.tolist()
    for key, want in (("precision", p), ("recall", r), ("f1", f)):
        assert [row[key] for row in got] == pytest.approx(want.tolist(), abs=1e-12), key
    for avg in ("macro", "weighted"):
        p, r, f, _ = precision_recall_fscore_support(y_true, y_pred, labels=labels, average=avg, zero_division=0)
        a = out[f"{avg}_avg"]
        assert (a["precision"], a["recall"], a["f1"]) == pytest.approx((p, r, f), abs=1e-12), avg


@pytest.mark.filterwarnings("ignore:A single label was found")   # scikit-learn's note for K = 1
@settings(max_examples=300, deadline=None)
@given(labelled())
@example((1, np.array([0]), np.array([0])))                      # one class, one sample
@example((3, np.array([1]), np.array([2])))                      # one sample, wrong
@example((4, np.array([0, 0, 1, 1]), np.array([0, 0, 0, 0])))    # classes never predicted, classes absent
@example((2, np.array([0, 0, 0, 1, 1]), np.array([0, 1, 1, 0, 0])))   # P + R < 1 for class 0
def test_summarize_matches_sklearn(case):
    k, y_true, y_pred = case
    cm = confusion_matrix(torch.tensor(y_pred), torch.tensor(y_true), k)
    assert_matches_sklearn(k, y_true, y_pred, summarize(cm, [str(i) for i in range(k)]))


def test_f1_when_precision_plus_recall_is_below_one():
    # the CIFAR-10 bird row of issue 14: P 40/110 (0.364), R 40/100 (0.400), F1 2PR/(P+R) = 0.381, not 2PR = 0.291
    cm = torch.tensor([[40, 60], [70, 830]])
    bird = summarize(cm, ["bird", "rest"])["per_class"][0]
    assert bird["f1"] == pytest.approx(2 * 40 / (110 + 100))


@pytest.fixture(scope="module")
def weak_run(tmp_path_factory):
    """A deliberately weak run (narrow network, 1 epoch at a low learning rate, 1,200 training images):
    about 33% accuracy, with classes whose precision + recall < 1 (where the old F1 was wrong)."""
    out = tmp_path_factory.mktemp("weak") / "run"
    result = run_cli("train", "--epochs", 1, "--train-samples", 1200, "--model-arg", "width=8", "--lr", 3e-4,
                     "--report", "false", "--out", out)
    assert result.returncode == 0, result.stderr
    return str(out)


def test_evaluate_json_matches_sklearn_on_independent_predictions(weak_run):
    result = run_cli("evaluate", weak_run, "--json")
    assert result.returncode == 0, result.stderr
    got = json.loads(result.stdout)
    # predictions made by cnnlab.load's own preprocessing, not the evaluation engine
    model = cnnlab.load(weak_run)
    x, y = run_data(load_trained(weak_run)[0], weak_run).test
    logits = torch.cat([model.logits(x[i:i + 500]) for i in range(0, len(y), 500)])
    y_true, y_pred = y.numpy(), logits.argmax(1).numpy()
    assert 0.2 < accuracy_score(y_true, y_pred) < 0.95, "the run should be weak enough to make mistakes"
    p, r, _, _ = precision_recall_fscore_support(y_true, y_pred, zero_division=0)
    assert ((p + r > 0) & (p + r < 1)).any(), "the run should have a class with 0 < P + R < 1"
    assert_matches_sklearn(len(model.classes), y_true, y_pred, got)
    top5 = (logits.topk(5, dim=1).indices == y[:, None]).any(1).double().mean()
    assert got["top5_accuracy"] == pytest.approx(float(top5))
    assert got["loss"] == pytest.approx(float(torch.nn.functional.cross_entropy(logits, y)), rel=1e-4)
