"""Grad-CAM: the layer found for every zoo model, captum's heatmaps against the formula written in
plain PyTorch, a network whose classes look at known halves of the image, and `cnnlab explain`."""
import os

import numpy as np
import pytest
import torch
from PIL import Image

from cnnlab.config import make_config
from cnnlab.evaluation.explain import explain_batch, find_layer, gradcam
from cnnlab.models import create_model, model_names
from cnnlab.training.checkpoint import payload, save as save_checkpoint
from tests.conftest import FAULT_REPORT, run_cli

pytest.importorskip("captum", reason="Grad-CAM needs captum (pip install 'cnnlab[explain]')")


@pytest.mark.parametrize("shape", [(1, 28, 28), (3, 32, 32)])
@pytest.mark.parametrize("name", model_names())
def test_every_zoo_model_gets_a_spatial_layer_and_heatmaps(name, shape):
    torch.manual_seed(0)
    net = create_model(name, shape, 10).eval()
    layer_name, layer = find_layer(net, shape)
    seen = []
    handle = layer.register_forward_hook(lambda m, a, out: seen.append(out.shape))
    x = torch.randn(2, *shape)
    heat = gradcam(net, x.requires_grad_(), torch.tensor([1, 2]), layer)
    handle.remove()
    assert len(seen[0]) == 4 and seen[0][2] * seen[0][3] > 1, (layer_name, seen)
    assert heat.shape == (2, *shape[1:]) and np.isfinite(heat).all() and heat.min() >= 0 and heat.max() <= 1


def hand_gradcam(net, layer, x, target):
    """Selvaraju et al.'s formula: ReLU(sum_c mean_ij(d y / d A_cij) * A_c), bilinear to the input, / max."""
    acts = []
    handle = layer.register_forward_hook(lambda m, a, out: acts.append(out))
    score = net(x)[torch.arange(len(x)), target].sum()
    handle.remove()
    grads = torch.autograd.grad(score, acts[0])[0]                              # (B, C, h, w)
    cam = torch.relu((grads.mean((2, 3), keepdim=True) * acts[0]).sum(1, keepdim=True))
    cam = torch.nn.functional.interpolate(cam, size=x.shape[2:], mode="bilinear", align_corners=False)[:, 0]
    return (cam / cam.flatten(1).amax(1).clamp(min=1e-12)[:, None, None]).detach().numpy()


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("name", ["mnist_cnn", "net_res", "resnet_small"])
def test_gradcam_matches_the_formula(name, seed):
    torch.manual_seed(seed)
    net = create_model(name, (1, 28, 28), 10).eval()
    _, layer = find_layer(net, (1, 28, 28))
    x = torch.randn(3, 1, 28, 28)
    target = torch.randint(0, 10, (3,))
    np.testing.assert_allclose(gradcam(net, x.clone().requires_grad_(), target, layer),
                               hand_gradcam(net, layer, x, target), atol=1e-5)


class BrightDark(torch.nn.Module):
    """Class 0 scores bright pixels, class 1 dark ones (two detector channels, globally pooled): on
    an image bright on the left and dark on the right, Grad-CAM of class 0 must light the left half
    and of class 1 the right (a wrong target, or a transposed map, would not)."""

    def __init__(self):
        super().__init__()
        self.features = torch.nn.Sequential(torch.nn.Conv2d(1, 2, 1), torch.nn.ReLU())
        self.features[0].weight.data = torch.tensor([1.0, -1.0]).view(2, 1, 1, 1)
        self.features[0].bias.data = torch.tensor([-0.5, 0.5])
        self.pool = torch.nn.AdaptiveAvgPool2d(1)

    def forward(self, x):
        return self.pool(self.features(x)).flatten(1)            # (B, 2): bright, dark


def test_the_heatmap_lights_where_the_class_looks():
    net = BrightDark()
    layer_name, layer = find_layer(net, (1, 8, 8))
    assert layer_name == "features"     # the last map before the pooling, not the pooling's output
    x = torch.full((2, 1, 8, 6), 0.1)
    x[:, :, :, :3] = 0.9                                          # bright left, dark right
    heat = gradcam(net, x.requires_grad_(), torch.tensor([0, 1]), layer)
    assert heat[0][:, :3].min() > 0.99 and heat[0][:, 3:].max() < 0.01
    assert heat[1][:, 3:].min() > 0.99 and heat[1][:, :3].max() < 0.01


@pytest.fixture(scope="module")
def checkpoint_file(tmp_path_factory):
    """An untrained mnist_cnn checkpoint (Grad-CAM runs the same on any weights) and three PNGs."""
    folder = tmp_path_factory.mktemp("explain")
    torch.manual_seed(0)
    net = create_model("mnist_cnn", (1, 28, 28), 3)
    meta = {"model": "mnist_cnn", "model_args": {}, "in_shape": [1, 28, 28], "classes": ["a", "b", "c"],
            "preprocess": {"channels": 1, "image_size": 28, "mean": [0.1], "std": [0.3]}}
    save_checkpoint(payload(net.state_dict(), meta, make_config({"model": "mnist_cnn"})), folder / "m.pt")
    rng = np.random.default_rng(0)
    for i in range(3):
        Image.fromarray(rng.integers(0, 256, (28, 28), dtype=np.uint8)).save(folder / f"img{i}.png")
    return folder


def test_explain_writes_an_overlay_per_image_and_a_contact_sheet(checkpoint_file, tmp_path):
    images = [checkpoint_file / f"img{i}.png" for i in range(3)]
    result = run_cli("explain", checkpoint_file / "m.pt", *images, "--target", "b", "--out", tmp_path)
    assert result.returncode == 0, result.stderr
    assert sorted(os.listdir(tmp_path)) == ["contact_sheet.png", "img0.gradcam.png", "img1.gradcam.png",
                                            "img2.gradcam.png"]
    assert Image.open(tmp_path / "img0.gradcam.png").size == (224, 224)   # 28 px scaled 8x, nearest
    assert "Grad-CAM of b" in result.stdout and "layer 'features'" in result.stdout


def test_explain_and_predict_exit_1_naming_each_unreadable_file_once(checkpoint_file, tmp_path):
    """An unreadable file among readable ones: both commands go on with the rest and exit 1 (explain
    exited 0), the error line names the file once; an empty folder is a usage error for both."""
    bad = tmp_path / "notimage.png"
    bad.write_text("plain text")
    for command in ("explain", "predict"):
        result = run_cli(command, checkpoint_file / "m.pt", checkpoint_file / "img0.png", bad,
                         *(["--out", tmp_path / "out"] if command == "explain" else []))
        assert result.returncode == 1, (command, result.stderr)
        line = next(x for x in result.stderr.splitlines() if "notimage" in x)
        assert line.count("notimage.png") == 1, line
        assert "1 of 2 file(s) could not be read" in result.stderr
        (tmp_path / "empty").mkdir(exist_ok=True)
        empty = run_cli(command, checkpoint_file / "m.pt", tmp_path / "empty")
        assert empty.returncode == 2 and "no image file in" in empty.stderr and empty.stdout == "", empty.stderr


@pytest.mark.parametrize("flags, culprit", [(["--target", "bb"], "unknown class 'bb'. Did you mean 'b'?"),
                                            (["--layer", "feature"], "Did you mean 'features'?")])
def test_explain_refuses_an_unknown_class_or_layer_in_one_line(checkpoint_file, tmp_path, flags, culprit):
    result = run_cli("explain", checkpoint_file / "m.pt", checkpoint_file / "img0.png", *flags, "--out", tmp_path)
    assert result.returncode == 2 and culprit in result.stderr and "Traceback" not in result.stderr
    FAULT_REPORT.append(f"explain {' '.join(flags)}: exit 2, one line: {result.stderr.strip()[:80]}")


def test_python_api_explains_a_uint8_batch(checkpoint_file):
    import cnnlab

    model = cnnlab.load(str(checkpoint_file / "m.pt"))
    results = model.explain([str(checkpoint_file / "img0.png"), str(checkpoint_file / "img1.png")])
    assert [r["target"] for r in results] == [r["predicted"] for r in results]
    assert results[0]["heatmap"].shape == (28, 28)
    direct = explain_batch(model.net, model.preprocess, torch.stack([model.preprocess.image(str(checkpoint_file / "img0.png"))]),
                           model.classes, target="c")
    assert direct[0]["target"] == "c"


def test_serve_explain_answers_a_heatmap_and_refuses_an_unknown_class(checkpoint_file):
    """POST /explain through the app itself (httpx's in-process transport, no socket)."""
    import asyncio
    import base64

    httpx = pytest.importorskip("httpx")
    import cnnlab
    from cnnlab.deploy.serve import create_app

    app = create_app(cnnlab.load(str(checkpoint_file / "m.pt")))
    body = (checkpoint_file / "img0.png").read_bytes()

    async def post(url):
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test") as client:
            return await client.post(url, content=body)
    ok = asyncio.run(post("/explain?target=c"))
    assert ok.status_code == 200, ok.text
    answer = ok.json()
    assert answer["target"] == "c" and answer["layer"] == "features"
    png = base64.b64decode(answer["overlay"].split(",", 1)[1])
    assert png.startswith(b"\x89PNG") and Image.open(__import__("io").BytesIO(png)).size == (224, 224)
    bad = asyncio.run(post("/explain?target=zz"))
    assert bad.status_code == 400 and "unknown class 'zz'" in bad.json()["error"]


def test_serve_page_shows_the_heatmap_when_toggled(checkpoint_file, chromium):
    """The page's Grad-CAM toggle: an uploaded image gets its overlay, with no console error."""
    from tests.browser import chromium_page
    from tests.test_serve import free_port, start_server

    port = free_port()
    server = start_server(str(checkpoint_file / "m.pt"), port)
    try:
        with chromium_page(chromium) as (page, errors):
            failed = []   # Chromium asks for /favicon.ico, which serve does not have: not an error of the page
            page.on("response", lambda r: failed.append(r.url) if r.status >= 400 and "favicon" not in r.url else None)
            page.goto(f"http://127.0.0.1:{port}/")
            page.check("#heat")
            page.set_input_files("#file", str(checkpoint_file / "img1.png"))
            page.wait_for_selector('body[data-heatmaps="1"]', state="attached", timeout=60_000)
            size = page.eval_on_selector("#heatmap", "e => [e.hidden, e.complete, e.naturalWidth]")
    finally:
        server.terminate()
        server.wait(timeout=30)
    assert size == [False, True, 224], size
    assert not failed and not [e for e in errors if not e.startswith("Failed to load resource")], (failed, errors)
