"""Calibration: ECE against a hand formula (and torchmetrics when installed), the temperature fit
against a grid search, and --calibrate end to end (stored in best.pt, applied by evaluate,
predict and the ONNX export)."""
import json
import math

import numpy as np
import pytest
import torch
from hypothesis import assume, given, settings, strategies as st
from hypothesis.extra.numpy import arrays

import cnnlab
from cnnlab.evaluation.calibration import ece, reliability
from cnnlab.training import checkpoint
from cnnlab.training.temperature import fit_temperature
from tests.conftest import FAULT_REPORT, run_cli

SMALL = ["--data", "mnist-5k", "--train-samples", 600, "--val-samples", 200, "--test-samples", 200,
         "--batch-size", 50, "--epochs", 2, "--report", "false"]


def hand_ece(probs, labels, bins=15):
    """Guo et al.'s definition written out: bins (i/15, (i+1)/15], weighted |accuracy - confidence|."""
    total = 0.0
    for i in range(bins):
        lo, hi = i / bins, (i + 1) / bins
        rows = [(max(p), int(np.argmax(p)) == y) for p, y in zip(probs.tolist(), labels.tolist())
                if lo < max(p) <= hi]
        if rows:
            conf = sum(c for c, _ in rows) / len(rows)
            acc = sum(ok for _, ok in rows) / len(rows)
            total += len(rows) / len(labels) * abs(acc - conf)
    return total


@st.composite
def predictions(draw):
    n, k = draw(st.integers(1, 60)), draw(st.integers(2, 6))
    logits = draw(arrays(np.float64, (n, k), elements=st.floats(-8, 8)))
    labels = draw(arrays(np.int64, (n,), elements=st.integers(0, k - 1)))
    return torch.from_numpy(logits).softmax(1), torch.from_numpy(labels)


@settings(max_examples=150, deadline=None)
@given(predictions())
def test_ece_matches_the_hand_formula(pred):
    probs, labels = pred
    assert ece(probs, labels) == pytest.approx(hand_ece(probs, labels), abs=1e-9)
    count, _, _ = reliability(probs, labels)
    assert int(count.sum()) == len(labels)


@settings(max_examples=40, deadline=None)
@given(predictions())
def test_ece_matches_torchmetrics(pred):
    tm = pytest.importorskip("torchmetrics.classification")
    probs, labels = pred[0].float(), pred[1]   # the same float32 to both
    # A confidence on a bin edge (1/3, 0.2 of 15 bins) is binned by precision: torchmetrics compares
    # it with float32 edges (equal: the lower bin), cnnlab its exact value with exact edges (float32
    # 0.2 is 0.2000000030 > 0.2: the upper bin). Both are (lo, hi]; the edge case has its own test.
    edges = torch.arange(1, 15, dtype=torch.float64) / 15
    assume(bool(((probs.max(1).values.double()[:, None] - edges).abs() > 1e-6).all()))
    metric = tm.MulticlassCalibrationError(num_classes=probs.shape[1], n_bins=15, norm="l1")
    assert ece(probs, labels) == pytest.approx(float(metric(probs, labels)), abs=1e-5)


def test_a_confidence_on_a_bin_edge_falls_in_the_lower_bin():
    """Bins are (lo, hi]: a confidence of exactly 1/5 (float64) joins the bin that ends at 1/5, not
    0.2289's; by hand: two bins, |1 - 0.2| / 2 + |0 - 0.2289| / 2 (the tie predicts class 0)."""
    probs = torch.tensor([[0.0844, 0.2289, 0.2289, 0.2289, 0.2289], [0.2, 0.2, 0.2, 0.2, 0.2]], dtype=torch.float64)
    count, _, _ = reliability(probs, torch.tensor([0, 0]), 15)
    assert count[2] == 1 and count[3] == 1
    assert ece(probs, torch.tensor([0, 0])) == pytest.approx((0.8 + 0.2289) / 2)


def test_ece_of_a_known_case():
    """Two images at 0.9 confidence, one right: |0.5 - 0.9| = 0.4 (a wrong formula gives another number)."""
    probs = torch.tensor([[0.9, 0.1], [0.9, 0.1]])
    assert ece(probs, torch.tensor([0, 1])) == pytest.approx(0.4)


@settings(max_examples=25, deadline=None)
@given(st.integers(0, 10_000), st.floats(0.2, 5.0))
def test_fitted_temperature_minimises_the_nll(seed, scale):
    """The LBFGS answer is at least as good as the best of a fine grid of temperatures."""
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(300, 5, generator=g, dtype=torch.float64) * 3
    labels = torch.multinomial(logits.softmax(1), 1, generator=g).squeeze(1)
    nll = lambda t: float(torch.nn.functional.cross_entropy(logits * scale / t, labels))
    t = fit_temperature(logits * scale, labels)
    grid = [math.exp(v) for v in np.linspace(-4, 4, 801)]
    assert nll(t) <= min(map(nll, grid)) + 1e-6


def test_temperature_undoes_over_confidence():
    """Labels drawn from softmax(z) and logits 4z: the fitted T is near 4 and the ECE falls."""
    g = torch.Generator().manual_seed(0)
    z = torch.randn(20_000, 10, generator=g) * 2
    labels = torch.multinomial(z.softmax(1), 1, generator=g).squeeze(1)
    t = fit_temperature(4 * z, labels)
    assert t == pytest.approx(4, rel=0.05)
    assert ece((4 * z / t).softmax(1), labels) < ece((4 * z).softmax(1), labels) / 3


@pytest.fixture(scope="module")
def calibrated_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("cal") / "run"
    result = run_cli("train", *SMALL, "--calibrate", "--out", out)
    assert result.returncode == 0, result.stderr
    assert "calibrated: temperature" in result.stdout
    return out


def test_calibrate_stores_the_temperature_and_predict_applies_it(calibrated_run, tmp_path):
    ckpt = checkpoint.load(str(calibrated_run))
    t = ckpt["temperature"]
    assert t > 0 and t != 1.0
    assert json.loads((calibrated_run / "summary.json").read_text())["temperature"] == pytest.approx(t)
    model = cnnlab.load(str(calibrated_run))
    net = checkpoint.build_model(ckpt).eval()
    images = torch.randint(0, 256, (4, 1, 28, 28), dtype=torch.uint8)
    with torch.no_grad():
        expected = (net(model.inputs(images)) / t).softmax(1)
    assert torch.allclose(model.probabilities(images), expected, atol=1e-5)


def test_evaluate_reports_the_calibrated_ece(calibrated_run):
    result = run_cli("evaluate", calibrated_run, "--json")
    assert result.returncode == 0, result.stderr
    m = json.loads(result.stdout)
    assert 0 <= m["ece"] <= 1
    assert "ECE" in run_cli("evaluate", calibrated_run).stdout


def test_onnx_export_applies_the_temperature(calibrated_run, tmp_path):
    pytest.importorskip("onnxruntime")
    from cnnlab.deploy.inference import OnnxModel

    out = tmp_path / "m.onnx"
    result = run_cli("export", calibrated_run, "--format", "onnx", "--probabilities", "--out", out)
    assert result.returncode == 0, result.stderr
    images = torch.randint(0, 256, (4, 1, 28, 28), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    got = OnnxModel(str(out)).probabilities(images)
    assert torch.allclose(got, cnnlab.load(str(calibrated_run)).probabilities(images), atol=1e-4)


def test_calibrate_without_a_validation_split_is_refused(tmp_path):
    result = run_cli("train", *SMALL, "--val-fraction", 0, "--val-samples", 0, "--calibrate", "--out", tmp_path / "r")
    assert result.returncode == 2, result.stderr
    assert "--calibrate" in result.stderr and "Traceback" not in result.stderr
    FAULT_REPORT.append("train --calibrate with no validation split: exit 2, one line naming --calibrate")
