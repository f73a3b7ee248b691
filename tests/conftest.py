import os
import shutil
import subprocess
import sys

import pytest

import cnnlab  # noqa: F401  (before any test imports torch: OpenMP's short waits, as the CLI has them)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARED = os.path.join(ROOT, "..", "shared", "datasets")


@pytest.fixture(scope="session", autouse=True)
def private_cache(tmp_path_factory):
    """The suite's decoded-data cache (CNNLAB_CACHE, inherited by every subprocess) is a temporary
    folder of its own: in ~/.cache/cnnlab each run of the suite left ~1 GB of entries keyed by
    temporary paths that no later run reads."""
    os.environ["CNNLAB_CACHE"] = str(tmp_path_factory.mktemp("cnnlab-cache"))


def run_cli(*args, cwd=None, timeout=600, env=None):
    """Run `python -m cnnlab ARGS` in a subprocess; returns CompletedProcess with text output."""
    return subprocess.run([sys.executable, "-m", "cnnlab", *map(str, args)], capture_output=True, text=True,
                          cwd=cwd or ROOT, timeout=timeout, env={**os.environ, **(env or {})})


def start_train(*args):
    """`cnnlab train ARGS` in a subprocess, returned once it has printed its first epoch line, so a
    last.pt exists: for the tests that then stop it with a signal or kill one of its workers."""
    proc = subprocess.Popen([sys.executable, "-m", "cnnlab", "train", *map(str, args)], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    for line in proc.stdout:
        if line.startswith("epoch"):
            break
    return proc


def signal_and_wait(proc, signum, pid=None, timeout=120):
    """Send `signum` to `pid` (default: the start_train process itself) and wait for that process
    to exit; returns its stderr."""
    os.kill(pid or proc.pid, signum)
    _, err = proc.communicate(timeout=timeout)
    return err


@pytest.fixture(scope="session")
def demo_run(tmp_path_factory):
    """One short real training run on the embedded sample, shared by the tests that only read it."""
    out = tmp_path_factory.mktemp("runs") / "demo"
    result = run_cli("train", "--epochs", 4, "--out", out)
    assert result.returncode == 0, result.stderr
    return str(out)


@pytest.fixture
def shared_datasets():
    if not os.path.isdir(SHARED):
        pytest.skip(f"../shared/datasets is absent ({SHARED})")
    return SHARED


@pytest.fixture(scope="session")
def chromium():
    """Debian's chromium, installed by the test setup when missing (needs root and the package registry)."""
    path = shutil.which("chromium")
    if path is None and os.geteuid() == 0 and shutil.which("apt-get"):
        subprocess.run("apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium",
                       shell=True, capture_output=True, timeout=900)
        path = shutil.which("chromium")
    if path is None:
        pytest.skip("chromium is not installed and could not be installed here")
    return path


def bomb_png(width=30000, height=30000):
    """A tiny valid-looking PNG whose header claims width x height pixels (a decompression bomb)."""
    import io
    import zlib

    from PIL import Image

    buf = io.BytesIO()
    Image.new("L", (1, 1)).save(buf, "PNG")
    data = bytearray(buf.getvalue())
    data[16:24] = width.to_bytes(4, "big") + height.to_bytes(4, "big")
    data[29:33] = zlib.crc32(bytes(data[12:29])).to_bytes(4, "big")   # keep the IHDR checksum valid
    return bytes(data)


# Counts of injected faults and bad inputs, printed at the end of the run (issue: "the test output
# states the counts"). Tests append one line each.
FAULT_REPORT = []


def pytest_terminal_summary(terminalreporter):
    if FAULT_REPORT:
        terminalreporter.section("faults injected and bad inputs tried")
        for line in FAULT_REPORT:
            terminalreporter.write_line(line)
