"""`cnnlab export`: ONNX (dynamic batch, self-describing: see onnxgraph.py; optionally int8: see
quantize.py) or TorchScript, verified against PyTorch's own outputs in the same command."""
import io
import json
import os
import tempfile

import torch

from ..atomic import atomic_path
from ..errors import UsageError
from . import onnxgraph
from .onnxgraph import TOLERANCE, check_parity
from .inference import load
from ..training.temperature import tempered

def default_out(model, fmt, quantize=None):
    base = model.path[:-3] if model.path.endswith(".pt") else model.path
    if fmt == "torchscript":
        return f"{base}.torchscript.pt"
    return f"{base}.{quantize}.onnx" if quantize else f"{base}.onnx"


def run_test_accuracy(model):
    """The run's test accuracy from its summary.json (beside the checkpoint), or None."""
    try:
        with open(os.path.join(os.path.dirname(model.path), "summary.json"), encoding="utf-8") as f:
            return json.load(f).get("test_acc")
    except (OSError, ValueError):
        return None


def export(checkpoint_path, fmt, out=None, raw_input=False, probabilities=False, quantize=None, max_drop=1.0):
    if fmt != "onnx" and (raw_input or probabilities or quantize):
        raise UsageError("--raw-input, --probabilities and --quantize are for --format onnx only.")
    if max_drop < 0:
        raise UsageError(f"--max-drop {max_drop:g} must be 0 or more (points of test accuracy)")
    model = load(checkpoint_path)
    out = out or default_out(model, fmt, quantize)
    with atomic_path(out) as tmp:   # a file that fails a check never appears at `out`
        if fmt == "torchscript":
            diff = check_parity(fmt, *export_torchscript(model, tmp), out)
        elif not quantize:
            diff = check_parity(fmt, *onnxgraph.write(model, tmp, raw_input, probabilities, run_test_accuracy(model)), out)
        else:
            diff, measures = export_int8(model, tmp, out, raw_input, probabilities, max_drop)
    print(f"wrote {out}")
    print(f"parity check passed: max abs difference {diff:.2e} <= {TOLERANCE:g} on a batch of 4 "
          f"(input {'x'.join(map(str, model.in_shape))}"
          f"{', raw uint8 pixels' if raw_input else ', normalised with the checkpoint mean/std'})"
          f"{' for the fp32 graph' if quantize else ''}")
    if quantize:
        from .quantize import table

        print(table(*measures))
    return out, diff


def export_int8(model, tmp, out, raw_input, probabilities, max_drop):
    """The fp32 graph (parity-checked) in a temporary folder, quantized into `tmp`."""
    from .quantize import quantize_checked

    with tempfile.TemporaryDirectory() as folder:
        fp32 = os.path.join(folder, "fp32.onnx")
        diff = check_parity("onnx", *onnxgraph.write(model, fp32, raw_input, probabilities, run_test_accuracy(model)), out)
        return diff, quantize_checked(model, fp32, tmp, raw_input, max_drop)


def export_torchscript(model, out):
    """(TorchScript's outputs, PyTorch's) on the same seeded batch."""
    import warnings

    net = tempered(model.net, model.temperature).eval()
    sample = onnxgraph.example_input(model, raw_input=False)
    with torch.inference_mode():
        expected = net(sample).numpy()
    with warnings.catch_warnings():  # TorchScript is deprecated upstream but still what many runtimes load
        warnings.simplefilter("ignore", FutureWarning)
        scripted = torch.jit.trace(net, sample)
        buffer = io.BytesIO()   # torch's C++ file writer aborts the process on a full disk; Python's raises
        torch.jit.save(scripted, buffer)
        with open(out, "wb") as f:
            f.write(buffer.getbuffer())
        reloaded = torch.jit.load(out)
    with torch.inference_mode():
        return reloaded(sample).numpy(), expected
