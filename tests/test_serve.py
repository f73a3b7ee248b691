"""Real HTTP requests to `cnnlab serve` on a free loopback port."""
import io
import os
import socket
import subprocess
import sys
import threading

import httpx
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from .conftest import ROOT, bomb_png


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(checkpoint, port, *extra, env=None):
    """`cnnlab serve` in a subprocess, returned once it says it is serving: its socket is then
    bound and listening (connections wait in the backlog until uvicorn accepts them)."""
    proc = subprocess.Popen([sys.executable, "-m", "cnnlab", "serve", checkpoint, "--port", str(port), *extra],
                            cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, **(env or {})})
    lines = []
    for line in proc.stderr:   # ends when the server exits
        lines.append(line)
        if line.startswith("serving "):
            threading.Thread(target=proc.stderr.read, daemon=True).start()   # keep the pipe drained
            return proc
    proc.wait()
    raise AssertionError("server did not start: " + "".join(lines))


@pytest.fixture(scope="module")
def server(demo_run):
    port = free_port()
    proc = start_server(demo_run, port, "--max-bytes", "200000")
    yield f"http://127.0.0.1:{port}"
    proc.terminate()
    proc.wait(timeout=10)


def png_bytes(img):
    buf = io.BytesIO()
    img.save(buf, "PNG")
    return buf.getvalue()


def test_predict_multipart_and_raw(server, shared_datasets):
    path = os.path.join(shared_datasets, "samples", "mnist_07_9.png")
    raw = open(path, "rb").read()
    multipart = httpx.post(f"{server}/predict", files={"file": ("mnist_07_9.png", raw, "image/png")}).json()
    body = httpx.post(f"{server}/predict", content=raw, headers={"content-type": "image/png"}).json()
    assert multipart["path"] == "mnist_07_9.png" and multipart["predictions"][0]["label"] == "9"
    assert body["predictions"] == multipart["predictions"]
    assert {"label", "index", "probability"} == set(multipart["predictions"][0])


def test_health_and_model(server):
    assert httpx.get(f"{server}/health").json() == {"status": "ok"}
    info = httpx.get(f"{server}/model").json()
    assert info["classes"][9] == "9" and info["input_shape"] == [1, 28, 28] and info["digits"]
    assert "mean" in info["preprocess"]
    assert "<canvas" in httpx.get(f"{server}/").text


def test_bad_requests(server):
    assert httpx.post(f"{server}/predict", content=b"hello, not an image").status_code == 400
    assert httpx.post(f"{server}/predict", content=b"").status_code == 400
    assert httpx.post(f"{server}/predict", content=b"x" * 300000).status_code == 413
    r = httpx.post(f"{server}/predict", content=bomb_png())
    assert r.status_code == 400 and "limit" in r.json()["error"]


def test_concurrent_requests(server):
    from concurrent.futures import ThreadPoolExecutor

    images = [png_bytes(Image.new("L", (28, 28), v)) for v in range(0, 256, 8)]
    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(lambda b: httpx.post(f"{server}/predict", content=b, timeout=30), images))
    assert all(r.status_code == 200 for r in results)
    single = [httpx.post(f"{server}/predict", content=b).json() for b in images[:4]]
    assert [r.json() for r in results[:4]] == single


def test_bad_checkpoint_fails_at_start(tmp_path):
    (tmp_path / "bad.pt").write_text("nope")
    result = subprocess.run([sys.executable, "-m", "cnnlab", "serve", str(tmp_path / "bad.pt"), "--port", str(free_port())],
                            cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert result.returncode == 1 and "not a readable checkpoint" in result.stderr


def multipart(server, files):
    """POST several (name, bytes) files in one multipart request, in this order."""
    return httpx.post(f"{server}/predict", files=[("file", (n, b, "image/png")) for n, b in files], timeout=60)


# an image file: random size and pixels, or a broken one (name and bytes)
random_png = st.builds(lambda w, h, seed: png_bytes(Image.fromarray(
    np.random.default_rng(seed).integers(0, 256, (h, w), dtype=np.uint8))),
    st.integers(1, 64), st.integers(1, 64), st.integers(0, 2**32 - 1))
broken = st.sampled_from([b"not an image", b"\x89PNG\r\n\x1a\n" + bytes(40)])
named_file = st.tuples(st.from_regex(r"[A-Za-z0-9_-]{1,10}\.png", fullmatch=True),
                       st.one_of(random_png, random_png, broken))


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(files=st.lists(named_file, min_size=2, max_size=5))
def test_several_files_answer_each_in_order(server, files):
    """Oracle: each file sent alone. Names may repeat, so order is checked by position."""
    r = multipart(server, files)
    alone = [multipart(server, [f]) for f in files]
    if all(a.status_code == 400 for a in alone):   # nothing readable: one 400 naming every file
        assert r.status_code == 400 and all(name in r.json()["error"] for name, _ in files)
        return
    assert r.status_code == 200
    assert r.json() == [a.json() for a in alone]
    assert [item["path"] for item in r.json()] == [name for name, _ in files]


def test_one_file_keeps_one_object(server, shared_datasets):
    raw = open(os.path.join(shared_datasets, "samples", "mnist_07_9.png"), "rb").read()
    r = multipart(server, [("mnist_07_9.png", raw)])
    assert r.status_code == 200 and r.json()["path"] == "mnist_07_9.png"
    assert r.json()["predictions"][0]["label"] == "9"


def test_port_in_use_fails_in_one_line_before_serving(demo_run):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = subprocess.run([sys.executable, "-m", "cnnlab", "serve", demo_run, "--port", str(port)],
                                cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 1 and result.stdout == ""
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and str(port) in lines[0] and "--port N" in lines[0], result.stderr


@pytest.mark.parametrize("port", ["70000", "99999"])   # 99999: the 38-line traceback
def test_port_out_of_range_is_a_usage_error(demo_run, port):
    result = subprocess.run([sys.executable, "-m", "cnnlab", "serve", demo_run, "--port", port],
                            cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and result.stdout == "" and port in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
