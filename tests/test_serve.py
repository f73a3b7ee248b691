"""Real HTTP requests to `cnnlab serve` on a free loopback port, the same tests for both backends
(PyTorch, and ONNX Runtime on the checkpoint exported on the fly)."""
import io
import os
import socket
import subprocess
import sys
import threading

import httpx
import torch
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


@pytest.fixture(scope="module", params=["torch", "onnx"])
def backend(request):
    return request.param


@pytest.fixture(scope="module")
def server(demo_run, backend):
    port = free_port()
    proc = start_server(demo_run, port, "--max-bytes", "200000", "--backend", backend)
    yield f"http://127.0.0.1:{port}"
    proc.terminate()
    proc.wait(timeout=10)


def same_answers(a, b):
    """Equal JSON answers, but for probabilities within float noise: a batch of several images
    and an image alone go through different kernels in PyTorch (~2e-7 apart)."""
    if isinstance(a, list) or isinstance(b, list):
        return isinstance(a, list) and isinstance(b, list) and len(a) == len(b) and all(map(same_answers, a, b))
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(same_answers(a[k], b[k]) for k in a)
    if isinstance(a, float) and isinstance(b, float):
        return abs(a - b) <= 1e-5
    return a == b


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
    assert same_answers(body["predictions"], multipart["predictions"])
    assert {"label", "index", "probability"} == set(multipart["predictions"][0])


def test_health_and_model(server, backend):
    assert httpx.get(f"{server}/health").json() == {"status": "ok"}
    info = httpx.get(f"{server}/model").json()
    assert info["classes"][9] == "9" and info["input_shape"] == [1, 28, 28] and info["digits"]
    assert info["backend"] == backend and info["model"] == "mnist_cnn" and info["metrics"]["val_acc"] > 0
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
    assert same_answers([r.json() for r in results[:4]], single)


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
    assert same_answers(r.json(), [a.json() for a in alone])
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


def test_metrics_count_requests_in_prometheus_format(server):
    from prometheus_client.parser import text_string_to_metric_families

    def count(status):
        families = {f.name: f for f in text_string_to_metric_families(httpx.get(f"{server}/metrics").text)}
        return sum(s.value for s in families["cnnlab_requests"].samples
                   if s.name == "cnnlab_requests_total" and s.labels["status"] == status)

    ok, bad = count("200"), count("400")
    httpx.post(f"{server}/predict", content=png_bytes(Image.new("L", (28, 28), 0)))
    httpx.post(f"{server}/predict", content=b"not an image")
    assert (count("200"), count("400")) == (ok + 1, bad + 1)
    assert "cnnlab_request_seconds_bucket" in httpx.get(f"{server}/metrics").text


def test_backends_answer_alike(demo_run, shared_datasets, tmp_path):
    """predict --backend onnx (exported on the fly, or an exported file) answers as the PyTorch backend."""
    import glob
    import json

    from .conftest import run_cli

    files = sorted(glob.glob(os.path.join(shared_datasets, "samples", "mnist_*.png")))[:6]
    assert run_cli("export", demo_run, "--format", "onnx", "--raw-input", "--out", tmp_path / "m.onnx").returncode == 0
    answers = [json.loads(run_cli("predict", model, *files, "--json", *flags).stdout)
               for model, flags in ((demo_run, ()), (demo_run, ("--backend", "onnx")), (tmp_path / "m.onnx", ()))]
    assert same_answers(answers[0], answers[1]) and same_answers(answers[0], answers[2])


def test_onnx_backend_refuses_foreign_files_in_one_line(tmp_path):
    import onnx
    from onnx import TensorProto, helper

    graph = helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])])
    onnx.save(helper.make_model(graph), tmp_path / "foreign.onnx")
    (tmp_path / "junk.onnx").write_bytes(b"not a model")
    image = tmp_path / "x.png"
    Image.new("L", (28, 28)).save(image)
    for name, status, words in (("foreign.onnx", 1, "no cnnlab metadata"), ("junk.onnx", 1, "cannot load it")):
        result = subprocess.run([sys.executable, "-m", "cnnlab", "predict", str(tmp_path / name), str(image)],
                                cwd=ROOT, capture_output=True, text=True, timeout=120)
        assert result.returncode == status and words in result.stderr and "Traceback" not in result.stderr
        assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    result = subprocess.run([sys.executable, "-m", "cnnlab", "predict", str(tmp_path / "junk.onnx"), str(image),
                             "--backend", "torch"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and "--backend onnx" in result.stderr


class SlowModel:
    """Records the size of each batch it is given."""

    def __init__(self):
        self.sizes = []

    def probabilities(self, x):
        self.sizes.append(len(x))
        return torch.full((len(x), 2), 0.5)


@pytest.mark.parametrize("max_batch, sizes", [(32, [5]), (2, [2, 2, 1]), (1, [1] * 5)])
def test_concurrent_requests_share_forward_passes(max_batch, sizes):
    """Five requests queued together: one forward pass up to --max-batch images, each request
    given back its own rows."""
    import asyncio

    from cnnlab.deploy.batching import Batcher

    model = SlowModel()
    batcher = Batcher(model, max_batch)

    async def scenario():
        return await asyncio.gather(*(batcher.probabilities(torch.zeros((1, 1, 2, 2))) for _ in range(5)))
    rows = asyncio.run(scenario())
    assert model.sizes == sizes and all(r.shape == (1, 2) for r in rows)


def test_a_failed_forward_pass_fails_its_requests_and_the_next_batch_still_runs():
    import asyncio

    from cnnlab.deploy.batching import Batcher

    class FailsOnce(SlowModel):
        def probabilities(self, x):
            if not self.sizes:
                self.sizes.append(len(x))
                raise RuntimeError("out of memory")
            return super().probabilities(x)

    model = FailsOnce()
    batcher = Batcher(model, 32)

    async def scenario():
        first = await asyncio.gather(*(batcher.probabilities(torch.zeros((1, 1, 2, 2))) for _ in range(3)),
                                     return_exceptions=True)
        return first, await batcher.probabilities(torch.zeros((2, 1, 2, 2)))
    first, later = asyncio.run(scenario())
    assert all(isinstance(e, RuntimeError) for e in first) and later.shape == (2, 2) and model.sizes == [3, 2]


@pytest.mark.parametrize("wait, sizes", [(0.0, [1, 2]), (60.0, [3])])
def test_the_batch_wait_window_gathers_later_requests(wait, sizes):
    """With a window, a request arriving while the first waits joins its batch (here it fills
    --max-batch 3, which ends the wait at once); without one, it goes in the next batch."""
    import asyncio

    from cnnlab.deploy.batching import Batcher

    model = SlowModel()
    batcher = Batcher(model, 3, wait)
    x = torch.zeros((1, 1, 2, 2))

    async def scenario():
        first = asyncio.ensure_future(batcher.probabilities(x))
        for _ in range(100):   # yield until the worker has taken the first request off the queue
            await asyncio.sleep(0)
            if batcher.queue is not None and batcher.queue.empty() and (model.sizes or wait):
                break
        await asyncio.gather(first, batcher.probabilities(torch.cat([x, x])))
    asyncio.run(scenario())
    assert model.sizes == sizes
