"""Evaluation numbers against scikit-learn; pictures; report; compare."""
import json
import os

import numpy as np
import pytest
import torch
from sklearn.metrics import confusion_matrix as sk_confusion
from sklearn.metrics import precision_recall_fscore_support

from cnnlab.diagnose import diagnose
from cnnlab.metrics import confusion_matrix, summarize

from .conftest import run_cli


def test_metrics_match_sklearn_with_a_never_predicted_class():
    rng = np.random.default_rng(0)
    y_true = rng.integers(0, 4, 300)
    y_pred = np.where(rng.random(300) < 0.7, y_true, rng.integers(0, 3, 300))  # class 3 never predicted... mostly
    y_pred[y_pred == 3] = 0
    cm = confusion_matrix(torch.tensor(y_pred), torch.tensor(y_true), 4)
    assert cm.tolist() == sk_confusion(y_true, y_pred, labels=range(4)).tolist()
    out = summarize(cm, ["a", "b", "c", "d"])
    p, r, f, s = precision_recall_fscore_support(y_true, y_pred, labels=range(4), zero_division=0)
    for row, pi, ri, fi, si in zip(out["per_class"], p, r, f, s):
        assert row["precision"] == pytest.approx(pi) and row["recall"] == pytest.approx(ri)
        assert row["f1"] == pytest.approx(fi) and row["support"] == si
    for avg in ("macro", "weighted"):
        p, r, f, _ = precision_recall_fscore_support(y_true, y_pred, average=avg, zero_division=0)
        got = out[f"{avg}_avg"]
        assert (got["precision"], got["recall"], got["f1"]) == pytest.approx((p, r, f))
    assert out["accuracy"] == pytest.approx((y_true == y_pred).mean())
    assert out["per_class"][3]["precision"] == 0.0


def test_evaluate_json_matches_summary(demo_run):
    result = run_cli("evaluate", demo_run, "--json")
    assert result.returncode == 0, result.stderr
    m = json.loads(result.stdout)
    summary = json.load(open(os.path.join(demo_run, "summary.json")))
    assert m["accuracy"] == pytest.approx(summary["test_acc"])
    assert m["loss"] == pytest.approx(summary["test_loss"], rel=1e-5)
    assert len(m["per_class"]) == 10 and {"class", "precision", "recall", "f1", "support"} <= set(m["per_class"][0])
    cm = np.array(m["confusion_matrix"])
    assert cm.shape == (10, 10) and cm.sum() == 1000 and m["top5_accuracy"] >= m["accuracy"]
    val = json.loads(run_cli("evaluate", demo_run, "--json", "--split", "val").stdout)
    assert np.array(val["confusion_matrix"]).sum() == 400


def test_pictures_and_report_exist(demo_run):
    for name in ("curves.png", "confusion.png", "samples.png", "mistakes.png", "per_class.png"):
        with open(os.path.join(demo_run, name), "rb") as f:
            head = f.read(8)
        assert head == b"\x89PNG\r\n\x1a\n" and os.path.getsize(os.path.join(demo_run, name)) > 5000, name
    page = open(os.path.join(demo_run, "report.html"), encoding="utf-8").read()
    assert page.count("data:image/png;base64,") == 5 and "per-class" in page.lower()


def test_report_command_rewrites(demo_run):
    os.remove(os.path.join(demo_run, "mistakes.png"))
    result = run_cli("report", demo_run)
    assert result.returncode == 0 and os.path.exists(os.path.join(demo_run, "mistakes.png"))


def test_compare_two_runs(demo_run, tmp_path):
    other = tmp_path / "other"
    assert run_cli("train", "--epochs", 2, "--model", "lenet5", "--out", other, "--report", "false").returncode == 0
    result = run_cli("compare", demo_run, other, "--out", tmp_path / "cmp.png")
    assert result.returncode == 0, result.stderr
    assert "mnist_cnn" in result.stdout and "lenet5" in result.stdout
    assert os.path.getsize(tmp_path / "cmp.png") > 5000


def test_diagnostics():
    hist = [{"epoch": i, "train_loss": 0.1, "train_acc": 0.99, "val_loss": 0.5 + i, "val_acc": 0.7} for i in range(5)]
    cm = torch.tensor([[5, 0], [3, 0]])
    notes = " ".join(diagnose(hist, cm, ["a", "b"]))
    assert "Overfitting" in notes and "rose" in notes and "Never predicted" in notes and "b" in notes
    stuck = [{"epoch": 1, "train_loss": 2.3, "train_acc": 0.1, "val_loss": 2.3, "val_acc": 0.1}]
    assert "chance" in " ".join(diagnose(stuck, torch.eye(10, dtype=torch.long), list("abcdefghij")))
