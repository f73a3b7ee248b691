"""cnnlab audit: duplicates and leaks against planted copies, odd images, cleanlab's ranking on
probabilities with a known answer, folds that never score an image they trained on, the command's
files (audit.json, audit.html in headless Chromium, the fix list)."""
import csv
import io
import json
import os

import numpy as np
import pytest
import torch
from PIL import Image

from tests.conftest import FAULT_REPORT, run_cli

pytest.importorskip("imagehash", reason="cnnlab audit needs imagehash (pip install 'cnnlab[explain]')")
pytest.importorskip("cleanlab", reason="cnnlab audit needs cleanlab (pip install 'cnnlab[explain]')")
from cnnlab.evaluation import audit as A  # noqa: E402

CIFAR = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "datasets", "cifar10_5k.npz")


def cifar(n):
    if not os.path.exists(CIFAR):
        pytest.skip("../shared/datasets/cifar10_5k.npz is absent")
    data = np.load(CIFAR)
    return data["x_train"][:n], data["y_train"][:n]


def jpeg(a):
    buffer = io.BytesIO()
    Image.fromarray(a).save(buffer, "JPEG", quality=75)
    return np.asarray(Image.open(buffer).convert("RGB"))


def test_planted_copies_are_found_and_distinct_images_are_not_paired():
    x, _ = cifar(120)
    shifted = np.zeros_like(x[2])
    shifted[1:] = x[2][:-1]                                   # one pixel down
    resized = np.asarray(Image.fromarray(x[3]).resize((64, 64), Image.BICUBIC).resize((32, 32), Image.BILINEAR))
    images = np.concatenate([x, np.stack([x[0], jpeg(x[1]), shifted, resized])])
    pairs = A.duplicate_pairs(torch.from_numpy(images).permute(0, 3, 1, 2).contiguous())
    assert sorted(pairs) == [(0, 120, "exact"), (1, 121, "near"), (2, 122, "near"), (3, 123, "near")]


def test_distinct_digits_are_not_paired_and_copies_are():
    """Digits on black look alike on average (session 4's check paired 18,655 of 2,000 mnist-5k digits,
    most of them 1s): 400 digits with a JPEG copy of one and a shifted copy of another give those two."""
    from cnnlab.config import make_config
    from cnnlab.data.registry import open_source

    x = open_source(make_config({"data": "mnist-5k"}).data_config()).train_x[:400]
    buffer = io.BytesIO()
    Image.fromarray(x[0, 0].numpy()).save(buffer, "JPEG", quality=75)
    copy = torch.from_numpy(np.asarray(Image.open(buffer)))[None]
    shifted = torch.zeros_like(x[1])
    shifted[:, 1:] = x[1][:, :-1]
    pairs = A.duplicate_pairs(torch.cat([x, copy[None], shifted[None]]))
    assert sorted(pairs) == [(0, 400, "near"), (1, 401, "near")]


def test_odd_images():
    x = torch.randint(0, 256, (5, 1, 20, 20), dtype=torch.uint8)
    x[1] = 128                                              # uniform grey: blank
    x[2] = torch.randint(0, 30, (1, 20, 20), dtype=torch.uint8)   # nothing brighter than 30: dark
    odd = A.odd_images(x, [(20, 20), (20, 20), (20, 20), (12, 40), None])
    assert odd == {1: "nearly blank", 2: "very dark", 3: "tiny (12x40 px)"}


def test_label_issues_are_the_rows_whose_given_label_the_model_doubts():
    g = torch.Generator().manual_seed(0)
    n, k = 400, 4
    y = torch.arange(n) % k
    probs = torch.full((n, k), 0.02)
    probs[torch.arange(n), y] = 0.94
    wrong = torch.randperm(n, generator=g)[:20]
    other = (y[wrong] + 1) % k
    probs[wrong] = 0.02
    probs[wrong, other] = 0.94                               # the model is sure of another class
    assert sorted(A.label_issues(y, probs)) == sorted(wrong.tolist())


def test_no_fold_scores_an_image_it_trained_on(monkeypatch):
    """Each image's probabilities come from the one fold model that never saw it."""
    trained_on = []

    class Recorder(torch.nn.Module):
        def __init__(self, seen):
            super().__init__()
            self.seen, self.w = seen, torch.nn.Parameter(torch.zeros(()))

        def forward(self, xb):   # images carry their own row number in pixel [0, 0, 0] (un-normalised below)
            rows = xb[:, 0, 0, 0].round().long()
            out = torch.zeros(len(xb), 2)
            out[:, 1] = torch.tensor([float(int(r) in self.seen) for r in rows]) * 10
            return out

    def fake_train(cfg, x, y, k, preprocess, ctx):
        seen = set(x[:, 0, 0, 0].tolist())
        trained_on.append(seen)
        return Recorder(seen)

    monkeypatch.setattr(A, "train_fold", fake_train)
    x = torch.zeros(40, 1, 4, 4, dtype=torch.uint8)
    x[:, 0, 0, 0] = torch.arange(40, dtype=torch.uint8)
    y = torch.arange(40) % 2
    from cnnlab.data.preprocess import Preprocess

    identity = Preprocess(channels=1, image_size=4, mean=[0.0], std=[1 / 255])   # normalise(x) == x
    probs, _ = A.out_of_fold_probs(x, y, 2, identity, A.fast_config(1, 1), folds=4, log=lambda *a: None)
    assert len(trained_on) == 4 and all(len(s) == 30 for s in trained_on)
    # a model that had seen a row would score it 1.0 for class 1; one that had not gives 0.5
    assert torch.allclose(probs[:, 1], torch.tensor(0.5))


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """60 CIFAR images in train/ and test/ class folders, with a training image copied into test/
    (a leak), a blank image and a tiny one."""
    x, y = cifar(60)
    root = tmp_path_factory.mktemp("audit") / "data"
    for i, (a, label) in enumerate(zip(x, y)):
        split = "train" if i < 45 else "test"
        os.makedirs(root / split / f"c{label}", exist_ok=True)
        Image.fromarray(a).save(root / split / f"c{label}" / f"{i}.png")
    os.makedirs(root / "test" / f"c{y[0]}", exist_ok=True)
    Image.fromarray(x[0]).save(root / "test" / f"c{y[0]}" / "leak.png")
    Image.new("RGB", (32, 32), (90, 90, 90)).save(root / "train" / f"c{y[1]}" / "blank.png")
    Image.fromarray(x[5]).resize((12, 12)).save(root / "train" / f"c{y[5]}" / "tiny.png")
    return root


def test_audit_command_writes_json_page_and_fix_list(folder, tmp_path):
    out, fixes = tmp_path / "out", tmp_path / "fix.csv"
    result = run_cli("audit", f"folder:{folder}", "--folds", 2, "--epochs", 1, "--out", out, "--fix-list", fixes)
    assert result.returncode == 0, result.stderr
    assert "label issues:" in result.stdout and "1 across splits (leaks)" in result.stdout
    report = json.loads((out / "audit.json").read_text())
    leak = next(d for d in report["duplicates"] if d["leak"])
    assert {os.path.basename(leak["a"]["file"]), os.path.basename(leak["b"]["file"])} == {"0.png", "leak.png"}
    reasons = {os.path.basename(r["file"]): r["reason"] for r in report["odd_images"]}
    assert reasons["blank.png"] == "nearly blank" and reasons["tiny.png"].startswith("tiny")
    rows = list(csv.DictReader(open(fixes, encoding="utf-8")))
    assert {"leak", "odd"} <= {r["issue"] for r in rows} and all(r["action"] in ("exclude", "keep") for r in rows)
    page = (out / "audit.html").read_text()
    shown = (len(report["label_issues"]) + len(report["outliers"]) + 2 * len(report["duplicates"])
             + len(report["odd_images"]))
    assert page.count("data:image/png;base64,") == shown     # a thumbnail for every finding


def test_audit_refuses_bad_input_in_one_line(tmp_path):
    result = run_cli("audit", "mnist-5k", "--folds", 1, "--out", tmp_path)
    assert result.returncode == 2 and "--folds 1" in result.stderr and "Traceback" not in result.stderr
    result = run_cli("audit", "mnist5k", "--no-labels", "--out", tmp_path)
    assert result.returncode == 2 and "mnist-5k" in result.stderr
    FAULT_REPORT.append("audit --folds 1 and a misspelt dataset: exit 2, one line each, no traceback")


def test_audit_page_renders_in_chromium(folder, tmp_path, chromium):
    from tests.browser import chromium_page

    out = tmp_path / "out"
    assert run_cli("audit", f"folder:{folder}", "--no-labels", "--out", out).returncode == 0
    with chromium_page(chromium) as (page, errors):
        page.goto("file://" + str(out / "audit.html"))
        images = page.eval_on_selector_all("img", "els => els.map(e => [e.complete, e.naturalWidth])")
    assert images and all(done and width > 0 for done, width in images), images
    assert not errors, errors


# ---------- outliers in embedding space ----------

def test_centre_distances_are_in_units_of_each_class_spread():
    """By hand: class 0 sits at the origin with its images 1 away, class 1 at (10, 0) with its images
    3 away. (0, 2) is 2 of class 0's spreads from its centre (class 1: sqrt(104) / 3 = 3.4); (10, 6)
    is 2 of class 1's; (0, 0) is 0; (5, 40) is far from both (40.3 / 3 = 13.4 from class 1)."""
    ring = torch.tensor([[1.0, 0], [-1, 0], [0, 1], [0, -1]])
    fit = torch.cat([ring, ring * 3 + torch.tensor([10.0, 0])])
    fit_y = torch.tensor([0] * 4 + [1] * 4)
    held = torch.tensor([[0.0, 2], [10, 6], [0, 0], [5, 40]])
    got = A.centre_distances(fit, fit_y, held, num_classes=3)   # class 2 has no images: ignored
    assert torch.allclose(got, torch.tensor([2.0, 2.0, 0.0, (25 + 1600) ** 0.5 / 3]))
    assert A.outliers(got) == [3]


def test_planted_noise_images_in_mnist_are_the_outliers():
    """20 uniform-noise images among 4,125 mnist-5k images (2 folds of 3 epochs, as OUTLIER_DISTANCE
    was measured): at least 18 of them flagged, and they are at least 80% of the flagged."""
    from cnnlab.config import make_config
    from cnnlab.data import load_data

    data = load_data(make_config({"data": "mnist-5k", "train_samples": 3000, "val_samples": 375,
                                  "test_samples": 750}).data_config())
    x, y = data.train
    g = torch.Generator().manual_seed(1)
    planted = torch.randperm(len(y), generator=g)[:20]
    x = x.clone()
    x[planted] = torch.randint(0, 256, (20, *x.shape[1:]), generator=g, dtype=torch.uint8)
    data.train = (x, y)
    xs, ys, _ = A.pooled(data)   # train first: the planted rows keep their numbers
    _, scores = A.out_of_fold_probs(xs, ys, 10, data.preprocess, A.fast_config(1, 3), folds=2, log=lambda *a: None)
    flagged = set(A.outliers(scores))
    found = flagged & set(planted.tolist())
    assert len(found) >= 18 and len(found) >= 0.8 * len(flagged), (len(found), len(flagged))


# ---------- every entry point on every kind of source ----------

@pytest.fixture(params=["mnist-5k", "cifar-npz", "folder"])
def source(request):
    if request.param == "mnist-5k":
        return "mnist-5k"
    if not os.path.exists(CIFAR):
        pytest.skip("../shared/datasets/cifar10_5k.npz is absent")
    return f"npz:{os.path.abspath(CIFAR)}" if request.param == "cifar-npz" else f"folder:{request.getfixturevalue('folder')}"


def test_audit_runs_from_the_cli_and_the_python_api(source, tmp_path):
    """The same audit (100 images a split, 2 folds of 1 epoch) from `cnnlab audit` and cnnlab.audit():
    the same images, findings of every kind in both, and the page written."""
    import cnnlab

    result = run_cli("audit", source, "--limit", 100, "--folds", 2, "--epochs", 1, "--out", tmp_path / "cli")
    assert result.returncode == 0, result.stderr[-2000:]
    assert "label issues:" in result.stdout and "outliers:" in result.stdout
    cli = json.loads((tmp_path / "cli" / "audit.json").read_text())
    api = cnnlab.audit(source, limit=100, folds=2, epochs=1, out=str(tmp_path / "api"), quiet=True)
    for key in ("images", "classes", "imbalance", "duplicates", "odd_images"):
        assert cli[key] == api[key], key
    assert {"label_issues", "outliers"} <= cli.keys() & api.keys()
    assert (tmp_path / "api" / "audit.html").read_text().count("<h2>") == 5


def test_explain_and_calibrate_run_from_the_cli_and_the_python_api(source, tmp_path):
    """The other two questions on every kind of source: `--calibrate` fits and stores a temperature,
    and `explain` writes Grad-CAM overlays of the data's own images, from the CLI and from Python."""
    import cnnlab
    from cnnlab.config import DataConfig
    from cnnlab.data import load_data

    sizes = {"train_samples": 200, "val_samples": 100, "test_samples": 100, "epochs": 1}
    flags = [part for key, value in sizes.items() for part in (f"--{key.replace('_', '-')}", value)]
    result = run_cli("train", "--data", source, *flags, "--calibrate", "--report", "false", "--out", tmp_path / "cli")
    assert result.returncode == 0, result.stderr[-2000:]
    api = cnnlab.train(data=source, **sizes, calibrate=True, report=False, out=str(tmp_path / "api"), quiet=True)
    cli_temperature = json.loads((tmp_path / "cli" / "summary.json").read_text())["temperature"]
    assert cli_temperature > 0 and api.summary["temperature"] > 0
    assert cnnlab.load(str(tmp_path / "cli")).temperature == pytest.approx(cli_temperature)

    x = load_data(DataConfig(data=source, test_samples=100)).test[0][:3]
    paths = []
    for i, image in enumerate(x.numpy()):
        paths.append(str(tmp_path / f"image{i}.png"))
        Image.fromarray(image[0] if image.shape[0] == 1 else image.transpose(1, 2, 0)).save(paths[-1])
    shown = run_cli("explain", tmp_path / "cli", *paths)
    assert shown.returncode == 0, shown.stderr[-2000:]
    assert "contact sheet" in shown.stdout and (tmp_path / "cli" / "explain" / "contact_sheet.png").exists()
    maps = cnnlab.explain(str(tmp_path / "api"), paths)
    assert [os.path.basename(m["path"]) for m in maps] == [f"image{i}.png" for i in range(3)]
    assert all(os.path.exists(m["png"]) and 0 <= m["target_probability"] <= 1 for m in maps)


@pytest.mark.parametrize("accuracy,weak", [(0.133, True), (0.29, True), (0.31, False), (0.95, False)])
def test_weak_fold_models_are_flagged_on_the_page_as_in_the_terminal(accuracy, weak):
    """10 classes: under 3x chance (30%) the suspects mean little, and audit.html says so too."""
    from cnnlab.evaluation.audit import weak_folds
    from cnnlab.evaluation.audit_page import label_section

    report = {"classes": [f"c{i}" for i in range(10)], "label_issues": [],
              "label_recipe": {"folds": 2, "model": "net", "epochs": 1, "out_of_fold_accuracy": accuracy}}
    assert bool(weak_folds(report)) == weak
    assert ("the fold models are weak" in label_section(report, None)) == weak
