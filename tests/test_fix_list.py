"""--fix-list read back (issue 18): the CSV that `cnnlab audit --fix-list` writes, edited by hand, fed
to `cnnlab train --fix-list`: excluded images leave the data, relabelled ones change class, and a
list that does not fit the data is refused in one line."""
import csv
import os

import pytest
import torch

from cnnlab.config import make_config
from cnnlab.data.fixes import apply_fix_list
from cnnlab.data.registry import open_source
from tests.conftest import FAULT_REPORT, run_cli

pytest.importorskip("imagehash", reason="cnnlab audit needs imagehash (pip install 'cnnlab[explain]')")
pytest.importorskip("cleanlab", reason="cnnlab audit needs cleanlab (pip install 'cnnlab[explain]')")


def read(path):
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def write(path, rows):
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, rows[0].keys())
        writer.writeheader()
        writer.writerows(rows)


@pytest.fixture(scope="module")
def audited(tmp_path_factory):
    """An audit of 450 mnist-5k images (2 folds of 1 epoch: weak models, so many suspects) and its list."""
    tmp = tmp_path_factory.mktemp("fixes")
    result = run_cli("audit", "mnist-5k", "--limit", 150, "--folds", 2, "--epochs", 1, "--out", tmp / "audit",
                     "--fix-list", tmp / "fixes.csv")
    assert result.returncode == 0, result.stderr
    return tmp


def edited(audited, tmp_path, **change):
    """The audit's list with every action `keep` but the first row excluded and the second relabelled."""
    rows = read(audited / "fixes.csv")
    assert len(rows) >= 2 and rows[0]["pool"] == "train" and rows[1]["pool_index"] != rows[0]["pool_index"]
    for r in rows:
        r["action"] = "keep"
    rows[0]["action"] = "exclude"
    new_class = str((int(rows[1]["label"]) + 1) % 10)
    rows[1].update(action="relabel", suggested=new_class)
    rows[2].update(change)
    write(tmp_path / "edited.csv", rows)
    return tmp_path / "edited.csv", int(rows[0]["pool_index"]), int(rows[1]["pool_index"]), int(new_class)


def test_edited_fix_list_drops_and_relabels_exactly_those_images(audited, tmp_path):
    path, dropped, relabelled, new_class = edited(audited, tmp_path)
    src = open_source(make_config({"data": "mnist-5k"}).data_config())
    fixed = apply_fix_list(src, str(path))
    keep = torch.ones(len(src.train_y), dtype=torch.bool)
    keep[dropped] = False
    assert torch.equal(fixed.train_x, src.train_x[keep])          # one image fewer, the others in order
    want = src.train_y.clone()
    want[relabelled] = new_class
    assert torch.equal(fixed.train_y, want[keep])                  # one label changed, none other


def test_train_takes_the_fix_list_from_the_cli(audited, tmp_path):
    path, *_ = edited(audited, tmp_path)
    out = tmp_path / "run"
    result = run_cli("train", "--data", "mnist-5k", "--fix-list", path, "--epochs", 1, "--train-samples", 300,
                     "--val-samples", 100, "--test-samples", 100, "--report", "false", "--out", out)
    assert result.returncode == 0, result.stderr[-2000:]
    assert f"fix_list: {path}" in (out / "config.yaml").read_text()
    assert f"note: fix list {path}: 1 image(s) left out and 1 relabelled, of " in result.stderr   # never silent
    import json

    splits = json.loads((out / "splits.json").read_text())
    assert splits["fingerprint"]["train"]["count"] == 5000 - 1   # the pool the splits were cut from


@pytest.mark.parametrize("change, culprit", [
    ({"label": "different"}, "labelled"), ({"action": "delete"}, "action 'delete'"),
    ({"action": "relabel", "suggested": "eleven"}, "'eleven'"), ({"pool_index": "99999"}, "no image")])
def test_a_list_that_does_not_fit_is_refused_in_one_line(audited, tmp_path, change, culprit):
    path, *_ = edited(audited, tmp_path, **change)
    result = run_cli("train", "--data", "mnist-5k", "--fix-list", path, "--epochs", 1, "--out", tmp_path / "run")
    assert result.returncode == 2 and culprit in result.stderr and "line 4" in result.stderr, result.stderr
    assert "Traceback" not in result.stderr and len(result.stderr.strip().splitlines()) == 1
    assert not os.path.exists(tmp_path / "run" / "last.pt")
    FAULT_REPORT.append(f"train --fix-list with {change}: exit 2, one line naming line 4")


def test_missing_fix_list_names_the_command_that_makes_one(tmp_path):
    result = run_cli("train", "--fix-list", tmp_path / "none.csv", "--epochs", 1, "--out", tmp_path / "run")
    assert result.returncode == 2 and "cnnlab audit" in result.stderr and "Traceback" not in result.stderr


def test_folder_rows_are_found_by_file_wherever_the_folder_is(tmp_path):
    """A folder audited as `digits` (relative) and trained as folder:/abs/path/digits after a move:
    the rows still find their files; the excluded duplicate and blank image are gone."""
    from PIL import Image

    src = open_source(make_config({"data": "mnist-5k"}).data_config())
    root = tmp_path / "before" / "digits"
    for i in range(0, 5000, 125):   # 40 digits of every class (the pool is sorted by class)
        os.makedirs(root / str(int(src.train_y[i])), exist_ok=True)
        Image.fromarray(src.train_x[i, 0].numpy()).save(root / str(int(src.train_y[i])) / f"{i}.png")
    Image.fromarray(src.train_x[0, 0].numpy()).save(root / str(int(src.train_y[0])) / "copy.png")
    Image.new("L", (28, 28), 0).save(root / str(int(src.train_y[125])) / "blank.png")
    result = run_cli("audit", "digits", "--no-labels", "--out", "audit", "--fix-list", "fixes.csv",
                     cwd=tmp_path / "before", env={"PYTHONPATH": str(os.path.dirname(os.path.dirname(__file__)))})
    assert result.returncode == 0, result.stderr
    rows = read(tmp_path / "before" / "fixes.csv")
    for r in rows:
        r["action"] = "exclude"
    write(tmp_path / "fixes.csv", rows)
    os.rename(tmp_path / "before", tmp_path / "after")
    moved = open_source(make_config({"data": f"folder:{tmp_path / 'after' / 'digits'}"}).data_config())
    fixed = apply_fix_list(moved, str(tmp_path / "fixes.csv"))
    gone = {os.path.basename(f) for f in moved.files["train"]} - {os.path.basename(f) for f in fixed.files["train"]}
    assert len(fixed.train_y) == 42 - len(gone) and {"blank.png"} <= gone and gone & {"0.png", "copy.png"}
