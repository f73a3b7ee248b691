"""Evaluation output, pictures, report and compare (the metrics themselves against scikit-learn:
test_metrics.py)."""
import itertools
import json
import os
import re

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from cnnlab.evaluation import plots
from cnnlab.evaluation.compare import compare_table
from cnnlab.evaluation.report import environment_rows, summary_rows
from cnnlab.training.diagnose import diagnose

from .conftest import run_cli

CIFAR10 = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
FASHION = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"]


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
    for name in ("curves.png", "confusion.png", "samples.png", "mistakes.png", "per_class.png", "reliability.png"):
        with open(os.path.join(demo_run, name), "rb") as f:
            head = f.read(8)
        assert head == b"\x89PNG\r\n\x1a\n" and os.path.getsize(os.path.join(demo_run, name)) > 5000, name
    page = open(os.path.join(demo_run, "report.html"), encoding="utf-8").read()
    assert page.count("data:image/png;base64,") == 6 and "per-class" in page.lower()


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


def test_report_numbers_are_written_for_people(demo_run):
    page = open(os.path.join(demo_run, "report.html"), encoding="utf-8").read()
    s = json.load(open(os.path.join(demo_run, "summary.json")))
    for text in (f"{s['test_acc']:.1%}", f"{s['best_val_acc']:.1%}", f"{s['num_params']:,}",   # 97.0%, 121,930
                 f"{s['train_seconds']:.1f} s", f"{s['samples_per_second']:,.0f} img/s"):
        assert f"<td>{text}</td>" in page, text
    assert f"<td>{s['test_acc']:.4f}</td>" not in page and f"<td>{s['num_params']}</td>" not in page
    assert not re.search(r"<td>0\.\d+</td><td>0\.\d+</td>", page), "accuracies in the history table are raw fractions"
    assert "<th></th>" not in page                                  # no empty header row
    env = page[page.index("<h2>Environment"):]
    assert "<td>training device</td><td>cpu</td>" in env and "CUDA" not in env and "cuda" not in env


def test_summary_rows_format():
    rows = dict(summary_rows({"test_acc": 0.97, "train_seconds": 13.385, "samples_per_second": 2689.6,
                              "num_params": 121930, "test_loss": 0.11791, "test_top5_acc": None}))
    assert rows == {"test accuracy": "97.0%", "training time": "13.4 s", "throughput": "2,690 img/s",
                    "parameters": "121,930", "test loss": "0.1179"}


def test_environment_names_cuda_only_for_a_cuda_run():
    cpu = dict(environment_rows({"device": "cpu"}))
    assert cpu["training device"] == "cpu" and "CUDA" not in cpu
    gpu = dict(environment_rows({"device": "cuda:0", "world_size": 2}))
    assert gpu["training device"] == "cuda:0 x 2 processes" and "CUDA" in gpu


def _history(epochs):
    return [{"epoch": float(e), "train_loss": 1.0 / e, "train_acc": 0.5, "val_loss": 1.1 / e, "val_acc": 0.4 + e / 100,
             "lr": 1e-3, "seconds": 1.0} for e in range(1, epochs + 1)]


@pytest.mark.parametrize("epochs", [1, 2, 3, 7])
def test_epoch_ticks_are_whole_numbers(epochs):
    for fig in (plots.curves_figure(_history(epochs)), plots.compare_figure({"a": _history(epochs)})):
        for ax in fig.axes:
            lo, hi = ax.get_xlim()
            ticks = [t for t in ax.get_xticks() if lo <= t <= hi]
            assert ticks and all(float(t).is_integer() for t in ticks), ticks
        plots.plt.close(fig)


def _collisions(fig):
    """Overlapping pairs among tick labels, axis labels, titles and legends, and any of those lying
    on another plot's area (a legend: on any plot's area, its bars included)."""
    fig.canvas.draw()
    r = fig.canvas.get_renderer()
    boxes = []
    for i, ax in enumerate(fig.axes):
        texts = [*ax.get_xticklabels(), *ax.get_yticklabels(), ax.xaxis.label, ax.yaxis.label, ax.title]
        boxes += [(i, t.get_text(), t.get_window_extent(r)) for t in texts if t.get_visible() and t.get_text()]
        if ax.get_legend():
            boxes.append((i, "legend", ax.get_legend().get_window_extent(r)))
    found = [(a, b) for (_, a, box_a), (_, b, box_b) in itertools.combinations(boxes, 2) if box_a.overlaps(box_b)]
    found += [(text, f"plot {j}") for i, text, box in boxes for j, ax in enumerate(fig.axes)
              if (j != i or text == "legend") and box.overlaps(ax.get_window_extent(r))]
    plots.plt.close(fig)
    return found


@pytest.mark.parametrize("names", [CIFAR10, FASHION, [str(i) for i in range(10)], ["a", "b"],
                                   [f"class_{i}" for i in range(100)]])
def test_per_class_picture_has_no_overlapping_text(names):
    rng = np.random.default_rng(0)
    rows = [{"class": n, "recall": rng.random(), "f1": rng.random()} for n in names]
    assert _collisions(plots.per_class_figure(rows)) == []


@pytest.mark.parametrize("names", [CIFAR10, FASHION, [str(i) for i in range(10)], ["a", "b"]])
def test_confusion_picture_has_no_overlapping_text(names):
    cm = np.random.default_rng(0).integers(0, 50, (len(names), len(names)))
    assert _collisions(plots.confusion_figure(cm, names)) == []


def _fake_run(path, model="lenet5", data="mnist-5k", params=61706, epochs=2):
    """A run folder as compare reads it (summary.json, metrics.csv), without training."""
    os.makedirs(path)
    summary = {"model": model, "data": data, "num_params": params, "epochs": epochs, "best_val_acc": 0.9,
               "test_acc": 0.875, "train_seconds": 12.34}
    with open(os.path.join(path, "summary.json"), "w") as f:
        json.dump(summary, f)
    with open(os.path.join(path, "metrics.csv"), "w") as f:
        f.write("epoch,train_loss,train_acc,val_loss,val_acc,lr,seconds\n")
        f.writelines(f"{e},0.5,0.8,0.6,0.{e}5,0.001,1.0\n" for e in range(1, epochs + 1))
    return str(path)


def test_compare_table_aligns_any_name_length_and_shows_data():
    long = "a-run-name-much-longer-than-ten-characters"
    rows = [(long, "resnet_small", "npz:/data/cifar10_5k.npz", 1234567, 12, 0.61, 0.595, 0.59, 93.4),
            ("b", "net", "cifar2", 18090, 100, 0.8, 0.8227, None, 8.0)]
    header, *lines = compare_table(rows)
    assert header.split() == ["run", "model", "data", "params", "epochs", "best", "val", "test", "acc",
                              "last-epoch", "test", "seconds"]
    for line, row in zip(lines, rows):
        for text, column in ((row[1], "model"), (row[2], "data")):   # text columns start under their header
            assert line.index(text) == header.index(column), (line, column)
        for text, column in ((f"{row[3]:,}", "params"), (f"{row[6]:.2%}", "test acc"), (f"{row[8]:.1f}", "seconds"),
                             ("-" if row[7] is None else f"{row[7]:.2%}", "last-epoch test")):
            end = header.index(column) + len(column)                 # number columns end under their header
            assert line[:end].endswith(text), (line, column)


def test_compare_writes_beside_the_runs_by_default(tmp_path):
    a = _fake_run(tmp_path / "runs" / "a-run-name-much-longer-than-ten-characters")
    b = _fake_run(tmp_path / "runs" / "b", model="mnist_cnn", data="npz:/x/cifar10_5k.npz", epochs=3)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    result = run_cli("compare", a, b, cwd=elsewhere)
    assert result.returncode == 0, result.stderr
    picture = tmp_path / "runs" / "compare.png"
    assert picture.exists() and not (elsewhere / "compare.png").exists()
    assert str(picture) in result.stderr and "compare.png" not in result.stdout   # stdout: the table only
    lines = result.stdout.splitlines()
    assert len(lines) == 3 and "npz:/x/cifar10_5k.npz" in lines[2] and lines[1].index("lenet5") == lines[2].index("mnist_cnn")


def test_compare_leaves_out_an_unfinished_run_with_a_warning(tmp_path):
    """`cnnlab compare runs/*` stopped at the first folder without a summary.json (a run still
    training); the finished runs are compared, the others named on stderr. All unusable: an error."""
    a = _fake_run(tmp_path / "runs" / "a")
    b = _fake_run(tmp_path / "runs" / "b", model="mnist_cnn")
    (tmp_path / "runs" / "training").mkdir()
    (tmp_path / "runs" / "compare.png").write_bytes(b"")        # what the last compare wrote: no warning
    result = run_cli("compare", a, tmp_path / "runs" / "training", b, tmp_path / "runs" / "compare.png")
    assert result.returncode == 0, result.stderr
    assert len(result.stdout.splitlines()) == 3 and "training" not in result.stdout
    assert "warning: left out: " in result.stderr and "training has no summary.json" in result.stderr
    assert "compare.png has no" not in result.stderr
    alone = run_cli("compare", tmp_path / "runs" / "training")
    assert alone.returncode == 1 and alone.stderr.count("\n") == 1 and "has no summary.json" in alone.stderr


def test_compare_unwritable_out_is_one_line(tmp_path):
    a = _fake_run(tmp_path / "a")
    result = run_cli("compare", a, "--out", tmp_path / "missing" / "cmp.png")
    assert result.returncode == 1 and "--out" in result.stderr and "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def _finished_training(tmp_path, rank=0, world=1, k=3, n_test=12):
    """A hand-made end-of-training state as the training loop hands it to its callbacks: a run
    folder (metrics.csv, summary.json), the data, and the test results of the best weights."""
    from types import SimpleNamespace

    from cnnlab.config import make_config
    from cnnlab.runtime import Context
    from cnnlab.training.engine import confusion_matrix

    run_dir = _fake_run(tmp_path / "run", epochs=3)
    g = torch.Generator().manual_seed(0)
    image = lambda n: torch.randint(0, 256, (n, 1, 8, 8), dtype=torch.uint8, generator=g)
    y_test = torch.arange(n_test) % k
    data = SimpleNamespace(classes=["cat", "dog", "eel"][:k], train=(image(30), torch.arange(30) % k),
                           test=(image(n_test), y_test))
    probs = torch.softmax(torch.randn(n_test, k, generator=g), 1)   # gathered from every rank under DDP
    cm = confusion_matrix(probs.argmax(1), y_test, k)
    test = {"loss": 0.7, "acc": float(cm.diag().sum()) / n_test, "top5": None, "cm": cm, "probs": probs,
            "losses": -probs[torch.arange(n_test), y_test].log()}
    summary = {"model": "lenet5", "data": "toy", "test_acc": test["acc"], "num_params": 1234, "device": "cpu"}
    return SimpleNamespace(run_dir=run_dir, data=data, test=test, summary=summary, cfg=make_config({"epochs": 3}), model=None,
                           ctx=Context(device=torch.device("cpu"), rank=rank, world=world))


PICTURES = ("curves.png", "confusion.png", "samples.png", "mistakes.png", "per_class.png", "reliability.png")


def test_report_writer_renders_training_results_without_evaluating(tmp_path, monkeypatch):
    import cnnlab.evaluation.results
    import cnnlab.training.engine
    from cnnlab.evaluation.report import ReportWriter

    def no_evaluation(*args, **kwargs):
        raise AssertionError("the report evaluated the test split a second time")
    monkeypatch.setattr(cnnlab.training.engine, "evaluate", no_evaluation)
    monkeypatch.setattr(cnnlab.evaluation.results, "evaluate", no_evaluation)
    state = _finished_training(tmp_path)
    writer = ReportWriter()
    for hook in ("on_start", "on_step", "on_epoch_end", "on_interrupt"):
        assert getattr(writer, hook)(state) is None and not os.path.exists(os.path.join(state.run_dir, "report.html"))
    assert writer.on_end(state=state) is None
    for name in PICTURES:
        assert os.path.getsize(os.path.join(state.run_dir, name)) > 1000, name
    page = open(os.path.join(state.run_dir, "report.html"), encoding="utf-8").read()
    assert page.count("data:image/png;base64,") == 6
    assert "<td>eel</td>" in page and "<td>1,234</td>" in page and "&quot;epochs&quot;: 3" in page


def test_report_writer_writes_nothing_on_other_ranks(tmp_path):
    from cnnlab.evaluation.report import ReportWriter

    state = _finished_training(tmp_path, rank=1, world=2)
    ReportWriter().on_end(state)
    assert sorted(os.listdir(state.run_dir)) == ["metrics.csv", "summary.json"]


def test_a_training_run_reports_from_its_own_test_results(tmp_path, monkeypatch):
    """The report of `cnnlab train` is rendered from the test evaluation training made (the test
    split is evaluated once per run): evaluation/'s own evaluation is never called."""
    import cnnlab
    import cnnlab.evaluation.results

    def no_evaluation(*args, **kwargs):
        raise AssertionError("the report evaluated the test split a second time")
    monkeypatch.setattr(cnnlab.evaluation.results, "evaluate", no_evaluation)
    result = cnnlab.train(train_samples=600, val_samples=200, test_samples=200, epochs=1, out=str(tmp_path / "run"),
                          quiet=True)
    for name in PICTURES + ("report.html",):
        assert os.path.getsize(os.path.join(result.run_dir, name)) > 1000, name
    page = open(os.path.join(result.run_dir, "report.html"), encoding="utf-8").read()
    assert f"<td>{result.summary['test_acc']:.1%}</td>" in page


def test_report_history_shows_a_dash_for_a_run_without_validation():
    from cnnlab.evaluation.report import history_rows

    row = {"epoch": 1.0, "train_loss": 0.5, "train_acc": 0.9, "val_loss": float("nan"), "val_acc": float("nan"),
           "lr": 1e-3, "seconds": 2.0}
    assert history_rows([row]) == [["1", "0.5000", "90.0%", "-", "-", "1.00e-03", "2.0 s"]]


@given(names=st.lists(st.sampled_from(["cat", "dog", "ship", "bird", "0", "1", "2", "frog"]), min_size=2, max_size=4,
                      unique=True),
       others=st.lists(st.sampled_from(["cat", "dog", "ship", "bird", "0", "1", "2", "frog"]), min_size=2,
                       max_size=4, unique=True),
       numbered=st.sampled_from(["neither", "data", "model", "both"]), reorder=st.randoms(use_true_random=False),
       same_names=st.booleans())
@settings(max_examples=80, deadline=None)
def test_evaluate_refuses_data_whose_class_names_are_not_the_models(names, others, numbered, reorder, same_names):
    """A model of cat/dog/ship scored on airplane/bird/frog images said 18% without a word: label i
    of the data counted as the model's class i. Refused when both sides name their classes and the
    names differ, and whenever the same names come in another order (numbers too: '10' sorts before
    '2' as text); names that are only label numbers (arrays, .npz) are taken as given."""
    from types import SimpleNamespace

    from cnnlab.errors import UsageError
    from cnnlab.evaluation.results import evaluate_model

    if same_names:   # the model's own names, perhaps in another order
        others = list(names)
        reorder.shuffle(others)
    data_classes = [str(i) for i in range(len(others))] if numbered in ("data", "both") else others
    model_classes = [str(i) for i in range(len(names))] if numbered in ("model", "both") else names
    if numbered == "both" and same_names:
        reorder.shuffle(data_classes)
    data = SimpleNamespace(test=(torch.zeros(1, 1, 4, 4), torch.zeros(1, dtype=torch.long)), classes=data_classes,
                           name="d")
    model = SimpleNamespace(classes=model_classes)
    numbers_only = lambda c: c == [str(i) for i in range(len(c))]
    if len(data_classes) != len(model_classes) and data_classes != model_classes:
        expected = "classes, the model"
    elif data_classes != model_classes and (sorted(data_classes) == sorted(model_classes) or not (
            numbers_only(data_classes) or numbers_only(model_classes))):
        expected = "evaluate it on data with the model's classes"
    else:
        expected = None
    try:
        evaluate_model(model, data)
    except UsageError as e:
        assert expected is not None and expected in str(e), str(e)
    except AttributeError:   # past the checks: the bare namespace has no preprocess to build a loader with
        assert expected is None
    else:
        raise AssertionError("evaluate_model ran on a bare namespace")


def test_evaluate_goes_on_from_best_pt_when_last_pt_is_damaged(demo_run, tmp_path):
    """Only last.pt cut short: evaluate gave no metrics at all, and its error stopped mid-word."""
    import shutil

    run = tmp_path / "run"
    shutil.copytree(demo_run, run)
    data = (run / "last.pt").read_bytes()
    (run / "last.pt").write_bytes(data[:3000])
    result = run_cli("evaluate", run, "--json")
    assert result.returncode == 0, result.stderr
    summary = json.load(open(os.path.join(demo_run, "summary.json")))
    assert json.loads(result.stdout)["accuracy"] == pytest.approx(summary["test_acc"])   # best.pt's, as before
    warning = next(line for line in result.stderr.splitlines() if "last.pt" in line)
    assert "not a readable checkpoint" in warning and warning.endswith("Going on without the last epoch's results.")
    assert "(truncated or another kind of file: " in warning and "). Going on" in warning
    assert "miniz" not in warning   # torch's message is cut to its first sentence, not mid-word at 120 characters
