"""Every file cnnlab writes is written atomically (issue 23 item 5): a disk that fills up halfway
through a write leaves the previous file intact, no temporary file behind, and one clear line.

The full disk is real, not mocked: the command runs under a file-size limit (RLIMIT_FSIZE), so the
kernel refuses writes past it with EFBIG exactly as a full disk refuses them with ENOSPC."""
import os
import resource
import shutil
import signal
import subprocess
import sys

import pytest

from cnnlab.atomic import atomic_path, write_text
from cnnlab.errors import CnnlabError

from .conftest import FAULT_REPORT, ROOT

LIMIT = 8_000   # bytes: smaller than every picture and page a run writes


def run_with_full_disk(*args, limit=LIMIT):
    def limit_file_size():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)   # a failed write, not a killed process
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    return subprocess.run([sys.executable, "-m", "cnnlab", *map(str, args)], capture_output=True, text=True,
                          cwd=ROOT, timeout=600, preexec_fn=limit_file_size)


def snapshot(folder):
    return {name: open(os.path.join(folder, name), "rb").read()
            for name in sorted(os.listdir(folder)) if os.path.isfile(os.path.join(folder, name))}


@pytest.mark.parametrize("command", [("report",), ("export", "--format", "onnx"), ("export", "--format", "torchscript")])
def test_a_full_disk_loses_nothing(demo_run, tmp_path, command):
    run = tmp_path / "run"
    shutil.copytree(demo_run, run)
    if command[0] == "export":   # an earlier export exists: the failed one must not replace it with half a file
        ext = "onnx" if "onnx" in command else "torchscript.pt"
        (run / f"best.{ext}").write_bytes(b"an earlier export")
    before = snapshot(run)
    result = run_with_full_disk(*command, run)
    assert result.returncode == 1, result.stderr
    assert "Traceback" not in result.stderr
    assert "could not write" in result.stderr and "intact" in result.stderr, result.stderr
    assert snapshot(run) == before          # every file byte for byte as it was; no temporary file left
    FAULT_REPORT.append(f"disk full during `cnnlab {' '.join(command)}`: exit 1, one line, every file intact")


def test_a_full_disk_during_training_keeps_the_checkpoints_whole(tmp_path):
    """1 MB: room for best.pt (0.5 MB of weights) but not for last.pt (weights plus Adam's moments)."""
    result = run_with_full_disk("train", "--epochs", 1, "--model", "mnist_cnn", "--out", tmp_path / "run",
                                limit=1_000_000)
    assert result.returncode == 1, result.stderr
    assert "Traceback" not in result.stderr
    assert "could not write" in result.stderr and "last.pt" in result.stderr, result.stderr
    assert not [n for n in os.listdir(tmp_path / "run") if ".tmp" in n]
    from cnnlab.training import checkpoint
    assert checkpoint.load(str(tmp_path / "run"))["state_dict"]   # best.pt, written before the disk filled, loads
    FAULT_REPORT.append("disk full during training: exit 1, one line naming last.pt, best.pt whole, no temp files")


def test_atomic_path_keeps_the_old_file_when_the_writer_fails(tmp_path):
    target = tmp_path / "page.html"
    target.write_text("old")
    with pytest.raises(CnnlabError, match="page.html"):
        with atomic_path(target) as tmp:
            with open(tmp, "w") as f:
                f.write("half of the new")
            raise OSError(28, "No space left on device")
    assert target.read_text() == "old"
    assert os.listdir(tmp_path) == ["page.html"]


def test_atomic_path_keeps_the_extension_for_writers_that_need_it(tmp_path):
    seen = []
    with atomic_path(tmp_path / "curves.png") as tmp:
        seen.append(tmp)
        open(tmp, "w").close()
    assert seen[0].endswith(".png") and os.path.basename(seen[0]).startswith(".curves.")
    write_text(tmp_path / "a.txt", "new\n")
    assert (tmp_path / "a.txt").read_text() == "new\n"
