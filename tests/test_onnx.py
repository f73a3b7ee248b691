"""ONNX export: parity with PyTorch, the metadata that makes the file self-describing, the raw-input
and probabilities graphs, the plain onnxruntime example script, and int8 with its accuracy check."""
import glob
import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import cnnlab
from cnnlab.config import make_config
from cnnlab.errors import CnnlabError
from cnnlab.models import create_model
from cnnlab.training.checkpoint import payload
from cnnlab.training.checkpoint import save as save_checkpoint

from .conftest import FAULT_REPORT, ROOT, run_cli

ort = pytest.importorskip("onnxruntime")


def digits(shared_datasets):
    return sorted(glob.glob(os.path.join(shared_datasets, "samples", "mnist_*.png")))


@pytest.mark.parametrize("fmt", ["onnx", "torchscript"])
def test_export_parity(demo_run, tmp_path, fmt):
    out = tmp_path / f"model.{fmt}"
    result = run_cli("export", demo_run, "--format", fmt, "--out", out)
    assert result.returncode == 0, result.stderr
    assert "parity check passed" in result.stdout and out.exists()
    diff = float(re.search(r"difference ([0-9.e+-]+)", result.stdout).group(1))
    assert diff <= 1e-4


def test_onnx_has_dynamic_batch(demo_run, tmp_path):
    out = tmp_path / "m.onnx"
    run_cli("export", demo_run, "--format", "onnx", "--out", out)
    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    for n in (1, 7):
        assert session.run(None, {"images": np.zeros((n, 1, 28, 28), np.float32)})[0].shape == (n, 10)


def test_onnx_describes_itself(demo_run, tmp_path):
    """Everything a reader needs to use the file is in its metadata_props, as JSON where structured."""
    out = tmp_path / "m.onnx"
    assert run_cli("export", demo_run, "--format", "onnx", "--out", out).returncode == 0
    meta = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"]).get_modelmeta().custom_metadata_map
    summary = json.load(open(os.path.join(demo_run, "summary.json")))
    assert json.loads(meta["classes"]) == [str(i) for i in range(10)]
    assert json.loads(meta["input_shape"]) == [1, 28, 28] and meta["input_format"].startswith("float32 NCHW")
    assert json.loads(meta["preprocessing"]) == cnnlab.load(demo_run).preprocess.to_dict()
    assert meta["model"] == "mnist_cnn" and meta["cnnlab_version"] == cnnlab.__version__
    assert float(meta["test_accuracy"]) == pytest.approx(summary["test_acc"], abs=1e-4)
    assert meta["output"] == "logits"


def colour_inverting_checkpoint(path):
    """A 3-channel checkpoint trained on inverted images, with per-channel mean/std."""
    torch.manual_seed(0)
    net = create_model("net_bn", (3, 16, 16), 3, n_chans1="8").eval()
    meta = {"model": "net_bn", "model_args": {"n_chans1": "8"}, "in_shape": [3, 16, 16], "classes": ["a", "b", "c"],
            "preprocess": {"channels": 3, "image_size": 16, "mean": [0.2, 0.5, 0.7], "std": [0.3, 0.2, 0.25],
                           "invert": True}}
    save_checkpoint(payload(net.state_dict(), meta, make_config({"model": "net_bn", "model_args": {"n_chans1": "8"}})),
                    path)


def test_raw_input_graph_converts_inverts_and_normalises_inside(tmp_path):
    """--raw-input --probabilities: uint8 (N, H, W, C) pixels in, the checkpoint's own inversion and
    per-channel mean/std applied inside, softmax out, equal to PyTorch's predictions."""
    from cnnlab.deploy.export import export

    colour_inverting_checkpoint(tmp_path / "m.pt")
    out, _ = export(tmp_path / "m.pt", "onnx", str(tmp_path / "m.onnx"), raw_input=True, probabilities=True)
    model = cnnlab.load(tmp_path / "m.pt")
    pixels = torch.randint(0, 256, (5, 3, 16, 16), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    session = ort.InferenceSession(out, providers=["CPUExecutionProvider"])
    (inp,) = session.get_inputs()
    assert inp.type == "tensor(uint8)" and inp.shape[1:] == [16, 16, 3]
    got = session.run(None, {"images": pixels.permute(0, 2, 3, 1).numpy()})[0]
    inverted = 255 - pixels   # what preprocess.image gives this checkpoint; logits() then only normalises
    np.testing.assert_allclose(got, model.logits(inverted).softmax(1).numpy(), atol=1e-5)
    assert session.get_modelmeta().custom_metadata_map["output"] == "probabilities"


@pytest.mark.parametrize("flags", [(), ("--raw-input", "--probabilities")])
def test_example_script_answers_as_cnnlab_predict(demo_run, shared_datasets, tmp_path, flags):
    """examples/onnx_predict.py (onnxruntime + Pillow + numpy, reading the file's metadata) gives
    the 20 sample digits the same top-1 as `cnnlab predict`, with probabilities within 1e-4."""
    out = tmp_path / "m.onnx"
    assert run_cli("export", demo_run, "--format", "onnx", *flags, "--out", out).returncode == 0
    files = digits(shared_datasets)
    script = subprocess.run([sys.executable, os.path.join(ROOT, "examples", "onnx_predict.py"), str(out), *files,
                             "--json"], capture_output=True, text=True, timeout=300)
    assert script.returncode == 0, script.stderr
    expected = json.loads(run_cli("predict", demo_run, *files, "--json").stdout)
    got = json.loads(script.stdout)
    assert len(got) == 20
    for g, e in zip(got, expected):
        assert g["predictions"][0]["label"] == e["predictions"][0]["label"], g["path"]
        assert g["predictions"][0]["probability"] == pytest.approx(e["predictions"][0]["probability"], abs=1e-4)


@given(width=st.integers(3, 90), height=st.integers(3, 90), channels=st.sampled_from([1, 3]),
       size=st.integers(2, 40), policy=st.sampled_from(["squash", "crop", "pad"]), extra=st.integers(0, 20),
       seed=st.integers(0, 2**16))
@settings(max_examples=60, deadline=None)
def test_example_script_fits_images_by_the_models_resize_policy(tmp_path_factory, width, height, channels, size,
                                                                 policy, extra, seed):
    """examples/onnx_predict.py squashed every image, so a --resize crop or pad model got other
    pixels than `cnnlab predict` gives it (cat 56.7% against 47.7%). Its pixels are now cnnlab's
    Preprocess.image's, within one level of rounding (PIL's bilinear against torch's), over random
    sizes, aspects and policies."""
    import importlib.util

    from PIL import Image

    from cnnlab.data.preprocess import Preprocess

    spec = importlib.util.spec_from_file_location("onnx_predict", os.path.join(ROOT, "examples", "onnx_predict.py"))
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    rng = np.random.default_rng(seed)
    ramp = np.linspace(0, 170, width)[None, :, None]   # some structure under the noise, so a shift shows
    image = (rng.integers(0, 256, (height, width, 3)) * 0.3 + ramp).astype(np.uint8)
    path = str(tmp_path_factory.mktemp("fit") / "image.png")
    Image.fromarray(image).save(path)
    resize_size = size + extra if policy == "crop" else 0
    pre = Preprocess(channels=channels, image_size=size, mean=[0.0] * channels, std=[1.0] * channels, resize=policy,
                     resize_size=resize_size)
    meta = {"channels": channels, "image_size": size, "resize": policy, "resize_size": resize_size}
    got = example.pixels(path, meta).transpose(2, 0, 1).astype(int)
    expected = pre.image(path).numpy().astype(int)
    assert got.shape == expected.shape and np.abs(got - expected).max() <= 1


def test_example_script_imports_neither_cnnlab_nor_torch():
    source = open(os.path.join(ROOT, "examples", "onnx_predict.py")).read()
    imports = set(re.findall(r"^(?:import|from) (\w+)", source, re.M))
    assert imports <= {"argparse", "json", "sys", "numpy", "onnxruntime", "PIL"}, imports


def test_int8_export_is_checked_and_measured(demo_run, tmp_path):
    out = tmp_path / "m.int8.onnx"
    result = run_cli("export", demo_run, "--format", "onnx", "--quantize", "int8", "--out", out)
    assert result.returncode == 0, result.stderr
    fp32, int8 = (re.search(rf"^{name}\s+([0-9.]+)%\s+(\d+)KB", result.stdout, re.M) for name in ("fp32", "int8"))
    assert fp32 and int8, result.stdout
    assert float(fp32[1]) - float(int8[1]) <= 1.0 and int(int8[2]) <= 0.35 * int(fp32[2]), result.stdout
    meta = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"]).get_modelmeta().custom_metadata_map
    assert meta["quantization"].startswith("int8") and float(meta["test_accuracy"]) == pytest.approx(float(int8[1]) / 100)


def test_int8_that_loses_accuracy_is_refused(demo_run, tmp_path, monkeypatch, capsys):
    """Calibrated on blank images, the activation ranges are wrong and int8 loses far more than a
    point: one error with both accuracies, and nothing written (an earlier file stays)."""
    from cnnlab.deploy import export as export_module
    from cnnlab.deploy import quantize

    def blank_calibration(self, model, train_x, raw_input, **kw):
        x = torch.zeros((64, *model.in_shape), dtype=torch.uint8)
        self.batches = iter([{"images": quantize.onnxgraph.graph_input(model, x, raw_input).numpy()}])

    monkeypatch.setattr(quantize.Calibration, "__init__", blank_calibration)
    out = tmp_path / "m.int8.onnx"
    out.write_bytes(b"an earlier export")
    with pytest.raises(CnnlabError, match=r"int8 refused: test accuracy [0-9.]+% against fp32's [0-9.]+%") as e:
        export_module.export(demo_run, "onnx", str(out), quantize="int8", max_drop=1.0)
    assert "\n" not in str(e.value) and out.read_bytes() == b"an earlier export"
    assert not [n for n in os.listdir(tmp_path) if ".tmp" in n]
    FAULT_REPORT.append(f"int8 calibrated on blank images: refused, one line ({str(e.value)[:60]}...), file intact")


def reloaded(net, name, shape, num_classes, mean, std, path):
    """`net`, the zoo's `name` at its default arguments for (C, H, W) `shape` inputs, saved as a
    checkpoint at `path` (one mean and std for every channel) and loaded back as cnnlab.load does."""
    meta = {"model": name, "model_args": {}, "in_shape": list(shape), "classes": [str(i) for i in range(num_classes)],
            "preprocess": {"channels": shape[0], "image_size": shape[1], "mean": [mean] * shape[0],
                           "std": [std] * shape[0], "invert": False}}
    save_checkpoint(payload(net.state_dict(), meta, make_config({"model": name})), path)
    return cnnlab.load(path)


@pytest.mark.parametrize("name", ["digits_fast", "digits_s2d"])
def test_int8_of_a_small_net_is_not_mostly_names(tmp_path, monkeypatch, name):
    """digits_fast and digits_s2d (24k weights; mnist_fast trains the second): QDQ's long tensor
    names once made the int8 file 0.40x the fp32 one; renamed compactly it is under 0.35x and
    computes exactly the same."""
    import onnx

    from cnnlab.deploy import onnxgraph, quantize

    torch.manual_seed(0)
    model = reloaded(create_model(name, (1, 28, 28), 10).eval(), name, (1, 28, 28), 10, 0.13, 0.31, tmp_path / "m.pt")
    fp32, int8, verbose = (str(tmp_path / name) for name in ("m.onnx", "m.int8.onnx", "verbose.int8.onnx"))
    onnxgraph.write(model, fp32)
    train_x = torch.randint(0, 256, (64, 1, 28, 28), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    quantize.quantize(model, fp32, int8, False, train_x)
    assert os.path.getsize(int8) <= 0.35 * os.path.getsize(fp32), (os.path.getsize(int8), os.path.getsize(fp32))
    names = [n for node in onnx.load(int8).graph.node for n in (*node.input, *node.output)]
    assert max(map(len, names)) <= 8, names

    monkeypatch.setattr(quantize, "compact", lambda path: None)   # the same quantization, names as ORT wrote them
    quantize.quantize(model, fp32, verbose, False, train_x)
    x = onnxgraph.example_input(model, False, n=8).numpy()
    got, want = (ort.InferenceSession(p, providers=["CPUExecutionProvider"]).run(None, {"images": x})[0]
                 for p in (int8, verbose))
    np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("shape", [(1, 28, 28), (3, 27, 27)])
def test_space_to_depth_stem_exports_as_it_computes(tmp_path, shape):
    """digits_s2d's stem (a zero row or column on an odd side, then PixelUnshuffle) in ONNX Runtime
    gives PyTorch's logits on random images."""
    from cnnlab.deploy import onnxgraph

    torch.manual_seed(0)
    net = create_model("digits_s2d", shape, 7).eval()
    for m in net.modules():     # random BN statistics, so that the check is not of an identity
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-1, 1), m.running_var.uniform_(0.5, 2)
    model = reloaded(net, "digits_s2d", shape, 7, 0.5, 0.25, tmp_path / "m.pt")
    onnxgraph.write(model, str(tmp_path / "m.onnx"))
    x = onnxgraph.example_input(model, False, n=5)
    with torch.no_grad():
        want = model.net(x).numpy()
    got = ort.InferenceSession(str(tmp_path / "m.onnx"), providers=["CPUExecutionProvider"]).run(None, {"images": x.numpy()})[0]
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


def test_quantize_needs_onnx(demo_run, tmp_path):
    result = run_cli("export", demo_run, "--format", "torchscript", "--quantize", "int8", "--out", tmp_path / "m.pt")
    assert result.returncode == 2 and "--format onnx" in result.stderr and "Traceback" not in result.stderr
