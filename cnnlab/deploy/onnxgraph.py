"""A self-describing ONNX file: the network, optionally with cnnlab's preprocessing inside
(`raw_input`: uint8 NHWC pixels in) and a softmax at the end (`probabilities`), and everything a
reader needs in its `metadata_props` (classes, input shape and format, preprocessing, model,
cnnlab version, test accuracy), so onnxruntime alone can classify an image with it
(examples/onnx_predict.py)."""
import json
import os

import torch

from ..errors import CnnlabError
from ..training.temperature import tempered

RAW, NORMALISED = "uint8 NHWC 0-255 pixels", "float32 NCHW normalised"
TOLERANCE = 1e-4   # float32 graphs agree to ~1e-6; more means an operator exported wrongly


def onnxruntime():
    try:
        import onnxruntime as ort
    except ImportError:
        raise CnnlabError("ONNX needs onnx and onnxruntime: pip install 'cnnlab[onnx]'") from None
    return ort


class Deployable(torch.nn.Module):
    """The net as exported: `raw_input` moves the checkpoint's conversion (uint8 NHWC -> float NCHW,
    inversion, mean/std) into the graph; `probabilities` ends it with a softmax; a calibrated
    checkpoint's `temperature` divides the logits (--calibrate)."""

    def __init__(self, net, preprocess, raw_input=False, probabilities=False, temperature=1.0):
        super().__init__()
        self.net, self.raw_input, self.probabilities = tempered(net, temperature), raw_input, probabilities
        scale, shift = preprocess.scale_shift()   # (1, C, 1, 1): x * scale + shift == (x / 255 - mean) / std
        if preprocess.invert:   # (255 - x) * scale + shift, folded into the same multiply-add
            scale, shift = -scale, shift + 255 * scale
        self.register_buffer("scale", scale)
        self.register_buffer("shift", shift)

    def forward(self, x):
        if self.raw_input:
            x = x.permute(0, 3, 1, 2).float() * self.scale + self.shift   # (B, H, W, C) uint8 -> (B, C, H, W)
        x = self.net(x)
        return x.softmax(1) if self.probabilities else x


def example_input(model, raw_input, n=4):
    """`n` seeded random images in the form the exported graph takes."""
    pixels = torch.randint(0, 256, (n, *model.in_shape), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    return graph_input(model, pixels, raw_input)


def graph_input(model, pixels, raw_input):
    """uint8 (B, C, H, W) -> what a graph exported with/without `raw_input` takes (CPU tensor)."""
    return pixels.permute(0, 2, 3, 1).contiguous() if raw_input else model.inputs(pixels).cpu()


def metadata(model, raw_input, probabilities, test_accuracy=None):
    """The strings stored in the file's metadata_props."""
    from .. import __version__

    c, h, w = model.in_shape
    meta = {"classes": json.dumps(model.classes), "model": str(model.config.get("model")),
            "input_shape": json.dumps([h, w, c] if raw_input else [c, h, w]),
            "input_format": RAW if raw_input else NORMALISED,
            "output": "probabilities" if probabilities else "logits",
            "preprocessing": json.dumps(model.preprocess.to_dict()), "cnnlab_version": __version__,
            "temperature": f"{model.temperature:.6g}"}
    if test_accuracy is not None:
        meta["test_accuracy"] = f"{test_accuracy:.4f}"
    return meta


def write(model, out, raw_input=False, probabilities=False, test_accuracy=None):
    """Export `model` to `out` with its metadata; returns the graph's (B, K) outputs on a seeded
    random batch, through onnxruntime, and PyTorch's own outputs on the same batch."""
    net = Deployable(model.net, model.preprocess, raw_input, probabilities, model.temperature).cpu().eval()
    sample = example_input(model, raw_input)
    with torch.inference_mode():
        expected = net(sample).numpy()
    output = "probabilities" if probabilities else "logits"
    try:
        torch.onnx.export(net, (sample,), out, input_names=["images"], output_names=[output],
                          dynamic_axes={"images": {0: "batch"}, output: {0: "batch"}}, dynamo=False)
    except ImportError as e:
        raise CnnlabError(f"ONNX export needs {e.name}: pip install 'cnnlab[onnx]'") from None
    add_metadata(out, metadata(model, raw_input, probabilities, test_accuracy))
    bigger = torch.cat([sample, sample[:1]])  # a batch size not seen at export proves it is dynamic
    got = session(out).run(None, {"images": bigger.numpy()})[0]
    return got[:len(sample)], expected


def check_parity(fmt, got, expected, out):
    """The largest difference between an exported graph's outputs and PyTorch's; CnnlabError above TOLERANCE."""
    diff = float(abs(got - expected).max())
    if not diff <= TOLERANCE:
        raise CnnlabError(f"parity check FAILED: {fmt} output differs from PyTorch by {diff:.2e} "
                          f"(> {TOLERANCE:g}); nothing was written to {out}.")
    return diff


def add_metadata(path, props):
    """Set (or replace) metadata_props entries of the ONNX file at `path`, in place."""
    import onnx

    graph = onnx.load(path)
    kept = {p.key: p.value for p in graph.metadata_props}
    onnx.helper.set_model_props(graph, {**kept, **props})
    onnx.save(graph, path)


def session(path_or_bytes, threads=0):
    """An onnxruntime CPU session (`threads` 0: onnxruntime's default)."""
    ort = onnxruntime()
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    # Worker threads sleep instead of spinning between operators: on this shared 2-core machine,
    # spinning made the CIFAR resnet_small batch-1 latency 6.1 ms instead of 2.3 ms (batch 256 the
    # same), and serve's decoding threads need those cores too.
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    if isinstance(path_or_bytes, str) and not os.path.isfile(path_or_bytes):
        raise CnnlabError(f"{path_or_bytes}: no such ONNX file; export one with `cnnlab export RUN --format onnx`.")
    try:
        return ort.InferenceSession(path_or_bytes, options, providers=["CPUExecutionProvider"])
    except Exception as e:   # onnxruntime raises its own Fail/InvalidProtobuf types
        name = path_or_bytes if isinstance(path_or_bytes, str) else "the model"
        raise CnnlabError(f"{name}: onnxruntime cannot load it ({str(e).splitlines()[0]}).") from None


def read_metadata(sess, path):
    """The cnnlab metadata of a session's model, with JSON values decoded; refused in one line
    for an ONNX file that cnnlab did not write."""
    props = sess.get_modelmeta().custom_metadata_map
    if "preprocessing" not in props or "classes" not in props:
        raise CnnlabError(f"{path} has no cnnlab metadata (classes, preprocessing): export it with "
                          "`cnnlab export RUN --format onnx`.")
    meta = dict(props)
    for key in ("classes", "preprocessing", "input_shape"):
        meta[key] = json.loads(props[key])
    return meta
