"""Real HTTP requests to `cnnlab serve` on a free loopback port."""
import io
import os
import socket
import subprocess
import sys
import time

import httpx
import pytest
from PIL import Image

from .conftest import ROOT, bomb_png


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(checkpoint, port, *extra):
    proc = subprocess.Popen([sys.executable, "-m", "cnnlab", "serve", checkpoint, "--port", str(port), *extra],
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    for _ in range(300):
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                return proc
        except httpx.HTTPError:
            pass
        if proc.poll() is not None:
            raise AssertionError(proc.stderr.read())
        time.sleep(0.1)
    proc.kill()
    raise AssertionError("server did not start")


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
