"""`cnnlab export`: ONNX (dynamic batch) or TorchScript, verified against PyTorch's own logits
in the same command."""
import io

import torch

from ..atomic import atomic_path
from ..errors import CnnlabError
from .inference import load

TOLERANCE = 1e-4


def export(checkpoint_path, fmt, out=None):
    model = load(checkpoint_path)
    net = model.net.eval()
    base = model.path[:-3] if model.path.endswith(".pt") else model.path
    out = out or f"{base}.{'onnx' if fmt == 'onnx' else 'torchscript.pt'}"
    # Random images through the checkpoint's own normalisation: inputs as the net sees them.
    pixels = torch.randint(0, 256, (4, *model.in_shape), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    sample = model.inputs(pixels).cpu()
    with torch.inference_mode():
        expected = net(sample).numpy()
    with atomic_path(out) as tmp:   # a file that fails the parity check never appears at `out`
        got = export_onnx(net, sample, tmp) if fmt == "onnx" else export_torchscript(net, sample, tmp)
        diff = float(abs(got - expected).max())
        if not diff <= TOLERANCE:
            raise CnnlabError(f"parity check FAILED: {fmt} output differs from PyTorch by {diff:.2e} "
                              f"(> {TOLERANCE:g}); nothing was written to {out}.")
    print(f"wrote {out}")
    print(f"parity check passed: max abs difference {diff:.2e} <= {TOLERANCE:g} on a batch of {len(sample)} "
          f"(input {'x'.join(map(str, model.in_shape))}, normalised with the checkpoint's mean/std)")
    return out, diff


def export_onnx(net, sample, out):
    try:
        import onnxruntime as ort
    except ImportError:
        raise CnnlabError("ONNX export needs onnx and onnxruntime: pip install 'cnnlab[onnx]'") from None
    try:
        torch.onnx.export(net, (sample,), out, input_names=["images"], output_names=["logits"],
                          dynamic_axes={"images": {0: "batch"}, "logits": {0: "batch"}}, dynamo=False)
    except ImportError as e:
        raise CnnlabError(f"ONNX export needs {e.name}: pip install 'cnnlab[onnx]'") from None
    session = ort.InferenceSession(out, providers=["CPUExecutionProvider"])
    bigger = torch.cat([sample, sample[:1]])  # a batch size not seen at export proves it is dynamic
    got = session.run(None, {"images": bigger.numpy()})[0]
    return got[:len(sample)]


def export_torchscript(net, sample, out):
    import warnings

    with warnings.catch_warnings():  # TorchScript is deprecated upstream but still what many runtimes load
        warnings.simplefilter("ignore", FutureWarning)
        scripted = torch.jit.trace(net, sample)
        buffer = io.BytesIO()   # torch's C++ file writer aborts the process on a full disk; Python's raises
        torch.jit.save(scripted, buffer)
        with open(out, "wb") as f:
            f.write(buffer.getbuffer())
        reloaded = torch.jit.load(out)
    with torch.inference_mode():
        return reloaded(sample).numpy()
