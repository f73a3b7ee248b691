"""Messy real-world inputs: every bad image kind, bad folders, random bytes, and kill -9 during
training. Counts are printed so the test log states how many faults were injected."""
import io
import os
import subprocess
import sys

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from cnnlab.config import make_config
from cnnlab.data.images import load_array
from cnnlab.errors import CnnlabError

import cnnlab.training.loop  # noqa: F401  (monkeypatched below)

from .conftest import FAULT_REPORT, ROOT, bomb_png, run_cli


def png(img):
    buf = io.BytesIO()
    img.save(buf, "PNG")
    return buf.getvalue()


def jpeg(img):
    buf = io.BytesIO()
    img.save(buf, "JPEG")
    return buf.getvalue()


def digit(value=200):
    img = Image.new("L", (28, 28), 0)
    img.paste(value, (10, 4, 18, 24))
    return img


BAD = {  # file name -> bytes that no decoder should accept (or a bomb)
    "zero.png": b"",
    "truncated.png": png(digit())[:60],
    "truncated.jpg": jpeg(digit())[:200],
    "text.jpg": b"this is not a jpeg\n",
    "bomb.png": bomb_png(),
}


def good_files():
    rgb = Image.new("RGB", (28, 28), (200, 30, 30))
    sixteen = Image.fromarray((np.arange(28 * 28, dtype=np.uint16).reshape(28, 28) * 80))
    rgba = Image.new("RGBA", (28, 28), (255, 255, 255, 0))
    return {
        "cmyk.jpg": jpeg(rgb.convert("CMYK")),
        "sixteen.png": png(sixteen),
        "palette.png": png(rgb.convert("P")),
        "rgba.png": png(rgba),
        "one pixel.png": png(Image.new("L", (1, 1), 255)),
        "ünïcode digit.png": png(digit()),
    }


def make_messy_folder(root):
    for cls in ("a", "b"):
        os.makedirs(root / cls)
        for i in range(4):
            (root / cls / f"{i}.png").write_bytes(png(digit(100 + 40 * i)))
    for name, data in {**BAD, **good_files()}.items():
        (root / "a" / name).write_bytes(data)
    os.symlink(root / "a" / "loop.png", root / "a" / "loop.png")   # a symlink to itself
    os.makedirs(root / "empty")
    return root


@pytest.fixture
def messy(tmp_path, monkeypatch):
    monkeypatch.setenv("CNNLAB_CACHE", str(tmp_path / "cache"))
    return make_messy_folder(tmp_path / "messy")


@pytest.mark.parametrize("name", sorted(BAD))
def test_each_bad_file_is_one_clear_error(tmp_path, name):
    path = tmp_path / name
    path.write_bytes(BAD[name])
    with pytest.raises(CnnlabError) as err:
        load_array(str(path), 1, 28)
    assert name in str(err.value) and "\n" not in str(err.value)


def test_symlink_loop_is_one_clear_error(tmp_path):
    os.symlink(tmp_path / "loop.png", tmp_path / "loop.png")
    with pytest.raises(CnnlabError, match="loop.png"):
        load_array(str(tmp_path / "loop.png"), 1, 28)


@pytest.mark.parametrize("name", sorted(good_files()))
def test_odd_but_valid_images_decode(tmp_path, name):
    path = tmp_path / name
    path.write_bytes(good_files()[name])
    for channels in (1, 3):
        a = load_array(str(path), channels, 28)
        assert a.shape == (channels, 28, 28) and a.dtype == np.uint8
    if name == "sixteen.png":   # 16-bit is scaled, not clipped to white
        assert 0 < load_array(str(path), 1, 28).mean() < 255


def test_training_on_a_messy_folder(messy, tmp_path):
    out = tmp_path / "run"
    strict = run_cli("train", "--data", f"folder:{messy}", "--epochs", 1, "--out", out)
    assert strict.returncode == 1 and "Traceback" not in strict.stderr
    assert "--on-bad-image skip" in strict.stderr and "(and" in strict.stderr
    result = run_cli("train", "--data", f"folder:{messy}", "--epochs", 1, "--on-bad-image", "skip",
                     "--out", out, "--val-fraction", "0.2")
    assert result.returncode == 0, result.stderr
    assert "empty' holds no images" in result.stderr and "skipped 6 unreadable" in result.stderr
    bad = (out / "bad_images.txt").read_text().splitlines()
    assert len(bad) == 6 and any("bomb.png" in b and "limit" in b for b in bad)
    FAULT_REPORT.append(f"messy folder: {len(BAD) + 1} unreadable files (incl. a symlink loop) reported and skipped, "
                        f"{len(good_files())} odd but valid images trained on, 1 empty class folder left out")


def test_data_check_lists_unreadable(messy):
    result = run_cli("data", "check", f"folder:{messy}")
    assert result.returncode == 1
    assert result.stdout.count("unreadable:") == 6 and "truncated.jpg" in result.stdout
    assert "Traceback" not in result.stderr


def test_predict_on_a_messy_folder(messy, demo_run):
    result = run_cli("predict", demo_run, messy, "--json")
    import json

    rows = json.loads(result.stdout)
    errors = [r for r in rows if "error" in r]
    assert result.returncode == 1 and len(errors) == 6 and len(rows) == 8 + 6 + len(good_files())
    assert all(os.path.basename(r["path"]) in r["error"] for r in errors)


def test_single_class_folder(tmp_path):
    os.makedirs(tmp_path / "only" / "cats")
    Image.new("RGB", (8, 8)).save(tmp_path / "only" / "cats" / "x.png")
    result = run_cli("train", "--data", f"folder:{tmp_path / 'only'}", "--out", tmp_path / "r")
    assert result.returncode == 1 and "at least 2" in result.stderr and not (tmp_path / "r").exists()


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=2000))
def test_random_bytes_never_crash_the_decoder(data):
    if not FAULT_REPORT or not FAULT_REPORT[-1].startswith("random bytes"):
        FAULT_REPORT.append("random bytes into the image decoder: 200 + 50 hypothesis examples, each decoded or one clear error")
    try:
        a = load_array(io.BytesIO(data), 1, 8, name="fuzz")
    except CnnlabError as e:
        assert "fuzz" in str(e)
    else:
        assert a.shape == (1, 8, 8)


@settings(max_examples=50, deadline=None)
@given(st.binary(min_size=8, max_size=400))
def test_random_bytes_after_a_png_signature(data):
    try:
        load_array(io.BytesIO(b"\x89PNG\r\n\x1a\n" + data), 3, 8, name="fuzz.png")
    except CnnlabError as e:
        assert "fuzz.png" in str(e)


def test_kill_and_resume_small():
    """CI's short version of benchmarks/crash_resume.py (which does 20 kills)."""
    result = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "crash_resume.py"), "--kills", "2",
                             "--epochs", "4", "--min-delay", "0.2", "--max-delay", "1.5"],
                            capture_output=True, text=True, timeout=400, cwd=ROOT)
    assert result.returncode == 0, result.stdout + result.stderr
    FAULT_REPORT.append("kill -9 during training: " + result.stdout.strip().splitlines()[-1])
    assert "unreadable after 0" in result.stdout and "equal to the uninterrupted run: yes" in result.stdout


def test_full_disk_is_detected_before_training(tmp_path, monkeypatch):
    import shutil

    import cnnlab.training.run_folder
    from cnnlab.errors import CnnlabError as Error
    from cnnlab.training.loop import fit

    monkeypatch.setattr(cnnlab.training.run_folder.shutil, "disk_usage", lambda p: shutil._ntuple_diskusage(10**9, 10**9 - 4096, 4096))
    with pytest.raises(Error, match="MiB free"):
        fit(make_config({"out": str(tmp_path / "full")}), quiet=True)
    assert not (tmp_path / "full").exists()


def test_out_of_memory_names_the_batch_size(monkeypatch, tmp_path):
    """CUDA is not on CI machines; the step raises CUDA's out-of-memory error here instead."""
    import torch

    from cnnlab.errors import CnnlabError as Error
    from cnnlab.training.loop import fit

    def exploding(*args, **kwargs):
        def run(xb, yb, lr):
            raise torch.cuda.OutOfMemoryError("CUDA out of memory")
        return run
    monkeypatch.setattr(cnnlab.training.loop, "make_step", exploding)
    with pytest.raises(Error, match="--batch-size 512 does not fit.*try --batch-size 256"):
        fit(make_config({"batch_size": 512, "out": str(tmp_path / "oom"), "train_samples": 600}), quiet=True)


TINY_RUN = ["--epochs", "1", "--train-samples", "300", "--val-samples", "100", "--test-samples", "100",
            "--report", "false"]


def test_a_finished_run_is_not_overwritten(tmp_path):
    """`train --out` on a finished run is refused in one line (exit 2) and leaves its files as they
    were; --overwrite replaces it whole (no stale file of the old run left beside the new one)."""
    run = tmp_path / "run"
    assert run_cli("train", *TINY_RUN, "--out", run).returncode == 0
    run_files = lambda: {p.name: p.read_bytes() for p in run.iterdir() if p.is_file() and p.name != ".lock"}
    before = run_files()
    refused = run_cli("train", *TINY_RUN, "--model", "lenet5", "--out", run)
    assert refused.returncode == 2 and refused.stdout == ""
    assert len(refused.stderr.strip().splitlines()) == 1 and "--resume" in refused.stderr and "--overwrite" in refused.stderr
    assert run_files() == before
    (run / "report.html").write_text("the old run's report")
    replaced = run_cli("train", *TINY_RUN, "--model", "lenet5", "--out", run, "--overwrite")
    assert replaced.returncode == 0, replaced.stderr
    assert not (run / "report.html").exists() and "lenet5" in (run / "config.yaml").read_text()
    FAULT_REPORT.append("train --out on a finished run: refused (exit 2), files unchanged; --overwrite replaces it")


def test_a_foreign_folder_is_refused(tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    result = run_cli("train", *TINY_RUN, "--out", tmp_path, "--overwrite")
    assert result.returncode == 2 and "holds no cnnlab run" in result.stderr
    assert sorted(p.name for p in tmp_path.iterdir() if p.name != ".lock") == ["notes.txt"]


def test_a_run_folder_in_use_is_refused(tmp_path):
    """Two trainings on one --out: the second gets one line naming the holder's pid and writes nothing.
    The holder here is this test process's own lock (no race on timing)."""
    import fcntl

    run = tmp_path / "run"
    run.mkdir()
    with open(run / ".lock", "a+") as held:
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        held.write("4242")
        held.flush()
        result = run_cli("train", *TINY_RUN, "--out", run)
    assert result.returncode == 1 and "in use by another cnnlab process (pid 4242)" in result.stderr
    assert [p.name for p in run.iterdir()] == [".lock"]
    FAULT_REPORT.append("two trainings on one --out: the second refused in one line naming the holder")
