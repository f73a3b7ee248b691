"""Splits that survive changing data (issue 23 item 3) and degenerate splits (item 4).

splits.json names a folder's images by path and size, and a tensor dataset's pools by a
fingerprint: after the data changed, `evaluate` and `--resume` use the very same images again or
refuse in one line, never mixing training images into the test split."""
import json
import os

import numpy as np
import pytest
import torch
from PIL import Image

import cnnlab
from cnnlab.config import DataConfig, make_config
from cnnlab.data import load_data
from cnnlab.errors import CnnlabError
from cnnlab.evaluation.results import load_trained, run_data
from cnnlab.training.loop import fit

from .conftest import FAULT_REPORT, run_cli

TINY = {"epochs": 1, "report": False, "image_size": 16, "batch_size": 8}


def write_images(folder, names, colour):
    """Random 16x16 PNGs (each one different) with one channel at full: a learnable colour class."""
    rng = np.random.default_rng(abs(hash((str(folder), tuple(names)))) % 2**32)
    os.makedirs(folder, exist_ok=True)
    for name in names:
        a = rng.integers(0, 200, (16, 16, 3), dtype=np.uint8)
        a[..., colour] = 255
        Image.fromarray(a).save(folder / name)


@pytest.fixture
def folder_run(tmp_path, monkeypatch):
    """(dataset folder, run folder): 2 classes x 12 images, trained for one epoch."""
    monkeypatch.setenv("CNNLAB_CACHE", str(tmp_path / "cache"))
    root = tmp_path / "pets"
    for colour, cls in enumerate(("cat", "dog")):
        write_images(root / cls, [f"{i:02d}.png" for i in range(12)], colour)
    run = tmp_path / "run"
    cnnlab.train(data=f"folder:{root}", out=str(run), quiet=True, **TINY)
    return root, run


def saved(run):
    return json.loads((run / "splits.json").read_text())


def test_new_files_change_no_split(folder_run, capsys):
    """The issue's case: files added to the folder shifted the saved indices, so 'test' images
    were other images (7 of 16 were training images). Named by path, the split stays the same."""
    root, run = folder_run
    model, _ = load_trained(str(run))
    before = run_data(model, str(run))
    write_images(root / "cat", ["00a.png", "00b.png", "00c.png"], 0)     # sorted first: every index shifts
    after = run_data(model, str(run))
    for split in ("train", "val", "test"):
        assert torch.equal(getattr(after, split)[0], getattr(before, split)[0]), split
    err = capsys.readouterr().err
    assert "3 file(s)" in err and "not used" in err
    FAULT_REPORT.append("3 files added to a trained folder: evaluate used the same train/val/test images")


def test_an_unreadable_file_added_since_does_not_stop_evaluate(folder_run, capsys):
    """A broken file dropped into the folder after training stopped `evaluate` ("not an image",
    --on-bad-image skip being a training flag), though no saved split holds it: now skipped, said."""
    root, run = folder_run
    model, _ = load_trained(str(run))
    before = run_data(model, str(run))
    (root / "dog" / "broken.png").write_bytes(b"not an image")
    after = run_data(model, str(run))
    assert torch.equal(after.test[0], before.test[0])
    assert "skipped 1 unreadable image(s)" in capsys.readouterr().err


@pytest.mark.parametrize("change", ["remove test files", "resize a training file", "move a file to another class"])
def test_changed_files_are_refused_in_one_line(folder_run, change):
    root, run = folder_run
    files = saved(run)["files"]
    if change == "remove test files":
        for path in list(files["test"])[:2]:
            os.remove(root / path)
        write_images(root / "dog", ["new.png"], 1)
        expected = ["2 file(s) of the test split", "1 new file(s)"]
    elif change == "resize a training file":
        path = root / next(iter(files["train"]))
        path.write_bytes(path.read_bytes() + b"\0" * 10)                      # same name, another size
        expected = ["1 file(s) of the train split"]
    else:
        path = next(p for p in files["train"] if p.startswith("cat/"))
        os.rename(root / path, root / "dog" / "moved.png")
        expected = ["1 file(s) of the train split", "1 new file(s)"]
    result = run_cli("evaluate", run)
    assert result.returncode == 1 and result.stdout == "" and "Traceback" not in result.stderr
    line = result.stderr.strip().splitlines()[-1]                          # after the decoding notes
    assert line.startswith("cnnlab: error: ") and f"run {run}" in line and "changed since training" in line, line
    assert all(e in line for e in expected) and f"--data folder:{root}" in line, line
    FAULT_REPORT.append(f"trained folder changed ({change}): evaluate refused in one line naming the run")


def test_resume_on_changed_data_is_refused(folder_run):
    root, run = folder_run
    os.remove(root / next(iter(saved(run)["files"]["val"])))
    result = run_cli("train", "--resume", run, "--epochs", 2)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert "1 file(s) of the val split gone or changed" in result.stderr.strip().splitlines()[-1]


def test_changed_tensor_data_is_refused(tmp_path):
    """npz (like mnist, cifar): the rows stay indices, with a fingerprint of each pool."""
    path = tmp_path / "d.npz"
    rng = np.random.default_rng(0)
    x, y = rng.integers(0, 256, (60, 16, 16), dtype=np.uint8), np.arange(60) % 2
    np.savez(path, x_train=x, y_train=y)
    run = tmp_path / "run"
    fit(make_config({"data": f"npz:{path}", "epochs": 1, "out": str(run), "batch_size": 8}), quiet=True)
    model, _ = load_trained(str(run))
    assert len(run_data(model, str(run)).test[1]) == 12                           # unchanged: used
    np.savez(path, x_train=x[:50], y_train=y[:50])
    with pytest.raises(CnnlabError, match="its train pool held 60 images, now 50"):
        run_data(model, str(run))
    np.savez(path, x_train=x, y_train=1 - y)
    with pytest.raises(CnnlabError, match=f"run {run}: npz:{path} changed.*labels or pixels"):
        run_data(model, str(run))
    FAULT_REPORT.append("npz replaced after training (fewer images; relabelled): evaluate refused, naming the change")


def test_old_splits_files_are_still_read(folder_run, capsys):
    """splits.json as cnnlab wrote it before: rows only. Read as saved, bounds checked."""
    root, run = folder_run
    record = saved(run)
    old = {k: record[k] for k in ("train", "val", "test", "test_pool")}
    (run / "splits.json").write_text(json.dumps(old))
    model, _ = load_trained(str(run))
    data = run_data(model, str(run))
    assert data.splits["test"] == record["test"] and "older cnnlab" in capsys.readouterr().err
    (run / "splits.json").write_text(json.dumps({**old, "test": old["test"] + [99]}))
    with pytest.raises(CnnlabError, match="names image 99 of a train pool that now holds 24"):
        run_data(model, str(run))


@pytest.mark.parametrize("damage", ["deleted", "not json", "wrong shape"])
def test_a_missing_or_damaged_splits_json_is_one_line(folder_run, damage):
    _, run = folder_run
    target = run / "splits.json"
    if damage == "deleted":
        target.unlink()
    else:
        target.write_text("{not json" if damage == "not json" else json.dumps({"format": 2, "train": "all"}))
    for args in (["evaluate", run], ["report", run]):
        result = run_cli(*args)
        assert result.returncode == 1 and "Traceback" not in result.stderr and "internal error" not in result.stderr
        assert len(result.stderr.strip().splitlines()) == 1 and str(target) in result.stderr, result.stderr
    FAULT_REPORT.append(f"splits.json {damage}: evaluate and report say so in one line naming the file")


def test_an_empty_training_split_is_refused_with_numbers(tmp_path):
    result = run_cli("train", "--val-fraction", "0.9999", "--epochs", 1, "--out", tmp_path / "never")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines() == [result.stderr.strip()]
    assert "--val-fraction 0.9999 leaves no training images" in result.stderr
    assert "1000 go to the test split" in result.stderr and "4000 go to validation" in result.stderr
    assert not (tmp_path / "never").exists()
    FAULT_REPORT.append("--val-fraction 0.9999 (no training images): refused, exit 2, with the counts")


def test_a_tiny_reported_split_is_warned_with_its_count(capsys):
    data = load_data(DataConfig(data="mnist-5k", test_fraction=0.0001))
    assert len(data.test[1]) == 1
    assert "the test split holds only 1 image, so its accuracy can only be 0% or 100%" in capsys.readouterr().err
    load_data(DataConfig(data="mnist-5k", test_fraction=0.003))                # 15 images
    assert "holds only 15 images, so each one moves its accuracy by 7 points" in capsys.readouterr().err
    load_data(DataConfig(data="mnist-5k", test_samples=20, val_samples=20))
    assert "holds only" not in capsys.readouterr().err


def test_without_a_validation_split_nothing_is_called_val(tmp_path, capsys):
    from cnnlab.evaluation.compare import compare_table

    state = fit(make_config({"val_fraction": 0.0, "train_samples": 200, "test_samples": 100, "epochs": 2,
                             "out": str(tmp_path / "r")}))
    out = capsys.readouterr().out
    assert "best val" not in out and "no validation split: best.pt is the last epoch" in out
    assert "val loss" not in out and "*" not in out                               # no epoch is a "best val"
    assert state.summary["best_val_acc"] is None and state.summary["best_epoch"] == 2
    assert state.summary["final_test_acc"] == state.summary["test_acc"]          # the last epoch is the one tested
    row = ("r", "mnist_cnn", "mnist-5k", 1, 2, None, 0.5, 0.5, 1.0)
    assert " - " in compare_table([row])[-1]


def test_patience_without_a_validation_split_is_refused(tmp_path):
    """Early stopping watches validation accuracy: without a val split --patience did nothing, silently."""
    result = run_cli("train", "--val-fraction", 0, "--patience", 2, "--epochs", 1, "--out", tmp_path / "never")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "--patience 2 needs a validation split" in result.stderr.strip().splitlines()[-1]
    assert not (tmp_path / "never").exists()
    FAULT_REPORT.append("--patience with --val-fraction 0: refused, exit 2, no folder left behind")


def test_val_samples_without_a_validation_split_is_refused(tmp_path):
    """--val-samples caps the split --val-fraction cuts: with a fraction of 0 (mnist_fast's recipe)
    it used to leave no validation split without a word. A saved run is not re-cut, and a CSV's
    named val rows need no fraction, so the check is made where a new split is cut."""
    result = run_cli("train", "--config", "mnist_fast", "--data", "mnist-5k", "--val-samples", 500,
                     "--out", tmp_path / "never")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1] == (
        "cnnlab: error: --val-samples 500 caps the validation split, which --val-fraction 0 leaves empty: "
        "give a --val-fraction too (e.g. 0.1), or drop --val-samples.")
    assert not (tmp_path / "never").exists()
    data = load_data(DataConfig(data="mnist-5k", val_fraction=0.1, val_samples=50, test_samples=10))
    assert len(data.val[1]) == 50
    FAULT_REPORT.append("--val-samples with --val-fraction 0: refused, exit 2, no folder left behind")


def test_a_run_on_a_relative_folder_is_found_again_with_data_dir(tmp_path):
    """A run trained on `folder:pets` (relative) could not be evaluated from another folder, nor
    after the images moved: "image folder not found: pets", and --data-dir did nothing for a
    folder. Now the error says how, and --data-dir PATH is the folder's new location, with the
    saved split kept (same test images, same accuracy as the run's own test)."""
    env = {"CNNLAB_CACHE": str(tmp_path / "cache")}
    for colour, cls in enumerate(("cat", "dog")):
        write_images(tmp_path / "pets" / cls, [f"{i:02d}.png" for i in range(12)], colour)
    flags = [f"--{k.replace('_', '-')}={v}" for k, v in TINY.items()]
    assert run_cli("train", "--data", "folder:pets", "--out", "run", *flags, cwd=tmp_path, env=env).returncode == 0
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    (tmp_path / "elsewhere").mkdir()
    lost = run_cli("evaluate", tmp_path / "run", cwd=tmp_path / "elsewhere", env=env)
    assert lost.returncode == 1 and lost.stderr.count("\n") == 1 and "--data-dir PATH" in lost.stderr
    os.rename(tmp_path / "pets", tmp_path / "moved")
    found = run_cli("evaluate", tmp_path / "run", "--data-dir", tmp_path / "moved", "--json", cwd=tmp_path / "elsewhere",
                    env=env)
    assert found.returncode == 0, found.stderr
    m = json.loads(found.stdout)
    assert m["samples"] == len(saved(tmp_path / "run")["test"]) and m["accuracy"] == pytest.approx(summary["test_acc"])


@pytest.mark.parametrize("ranges", [True, False])
def test_missing_class_warnings_name_the_setting_that_cut_the_splits(ranges, capsys):
    """Under --split-ranges the warnings told the user to change --val-fraction, which that run ignores."""
    from cnnlab.data import warn_missing_classes

    data = load_data(DataConfig(data="mnist-5k", split_ranges="train=0:100,val=100:150,test=150:200") if ranges
                     else DataConfig(data="mnist-5k", train_samples=5, val_samples=3, test_samples=3))
    capsys.readouterr()
    warn_missing_classes(data, ranges=ranges)
    lines = capsys.readouterr().err.strip().splitlines()
    assert lines and all(line.startswith("warning: no ") for line in lines)
    if ranges:
        assert all("--split-ranges did that" in line and "--val-fraction" not in line for line in lines)
    else:
        assert all("more data or a " in line and "--split-ranges" not in line for line in lines)
