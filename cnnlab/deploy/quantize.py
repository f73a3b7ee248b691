"""`cnnlab export --format onnx --quantize int8`: ONNX Runtime static quantization, calibrated on
seeded training images, then measured against the fp32 graph in the same command (test accuracy,
file size, CPU latency) and refused when it loses more than `max_drop` points of accuracy."""
import os
import tempfile
import time
from dataclasses import dataclass

import numpy as np
import torch

from ..errors import CnnlabError
from . import onnxgraph

CALIBRATION_IMAGES = 320   # a few hundred, 10 batches of 32 (1,000 moved the CIFAR int8 accuracy by 0.2 points)


@dataclass
class Measure:
    accuracy: float         # on the test split, a fraction
    size: int               # bytes
    latency_1: float        # seconds, median of single-image runs
    latency_64: float       # seconds, median of batch-64 runs


def run_data_of(model):
    """The run's own data and split, as `cnnlab evaluate` reads them."""
    from ..evaluation.results import run_data

    return run_data(model, os.path.dirname(model.path))


class Calibration:
    """onnxruntime's CalibrationDataReader: `n` seeded training images, 32 at a time."""

    def __init__(self, model, train_x, raw_input, n=CALIBRATION_IMAGES, seed=0):
        pick = torch.randperm(len(train_x), generator=torch.Generator().manual_seed(seed))[:n]
        x = onnxgraph.graph_input(model, train_x[pick], raw_input).numpy()
        self.batches = iter([{"images": x[i:i + 32]} for i in range(0, len(x), 32)])

    def get_next(self):
        return next(self.batches, None)


def quantize(model, fp32_path, out, raw_input, train_x):
    """Write the int8 version of the graph at `fp32_path` to `out` (QDQ, per-channel weights).
    reduce_range: 7-bit weights. On x86 CPUs without VNNI, u8 x s8 products can saturate the 16-bit
    intermediate sums (ONNX Runtime's quantization docs); measured on the cifar10_5k resnet_small
    run here: 46.4% -> 49.7% test accuracy (fp32 49.4%), where Entropy (45.6%), Percentile (46.0%)
    calibration or 1,000 calibration images (46.2%) did not help."""
    from onnxruntime.quantization import QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    with tempfile.TemporaryDirectory() as folder:
        prepared = os.path.join(folder, "prepared.onnx")   # shapes inferred, BN folded: what ORT advises
        quant_pre_process(fp32_path, prepared, skip_symbolic_shape=True)
        # Conv/Gemm/MatMul carry the weights and the time; the softmax and the input's
        # conversion stay in float (quantizing a softmax costs accuracy for no speed).
        quantize_static(prepared, out, Calibration(model, train_x, raw_input), quant_format=QuantFormat.QDQ,
                        per_channel=True, reduce_range=True, weight_type=QuantType.QInt8,
                        activation_type=QuantType.QUInt8,
                        op_types_to_quantize=["Conv", "Gemm", "MatMul"])
    compact(out)


def compact(path):
    """Rename the graph's inner tensors to short ids, drop node names, doc strings and value_info,
    in place; the arithmetic is untouched. QDQ quantization spells names like
    "/net/net.1/net.1.4/body/body.0/body.0.0/Conv_output_0_zero_point" three or four times per
    tensor: on the 24k-weight digits_fast (then mnist_fast's net) the file went 39.9 KB -> 29.6 KB, 0.40x -> 0.30x
    the fp32 file, with the same outputs; CIFAR simple_cnn 0.26x -> 0.25x."""
    import onnx

    graph_model = onnx.load(path)
    graph = graph_model.graph
    keep = {v.name for v in (*graph.input, *graph.output)} | {""}   # the interface, and "absent input"
    short = {}

    def rename(name):
        if name in keep:
            return name
        return short.setdefault(name, format(len(short), "x"))

    for tensor in graph.initializer:
        tensor.name, tensor.doc_string = rename(tensor.name), ""
    for node in graph.node:
        node.input[:] = [rename(n) for n in node.input]
        node.output[:] = [rename(n) for n in node.output]
        node.name = node.doc_string = ""
    del graph.value_info[:]   # intermediate shapes: onnxruntime infers them again when loading
    graph.doc_string = graph_model.doc_string = ""
    onnx.save(graph_model, path)


def accuracy(sess, model, x, y, raw_input, batch=256):
    right = 0
    for i in range(0, len(x), batch):
        scores = sess.run(None, {"images": onnxgraph.graph_input(model, x[i:i + batch], raw_input).numpy()})[0]
        right += int((scores.argmax(1) == y[i:i + batch].numpy()).sum())
    return right / len(x)


def latency(sess, feed, runs):
    """Median seconds of `runs` runs, after one warm-up run."""
    sess.run(None, feed)
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        sess.run(None, feed)
        times.append(time.perf_counter() - start)
    return float(np.median(times))


def measure(path, model, data, raw_input):
    sess = onnxgraph.session(path)
    x, y = data.test
    sample = onnxgraph.graph_input(model, x[:64], raw_input).numpy()
    return Measure(accuracy(sess, model, x, y, raw_input), os.path.getsize(path),
                   latency(sess, {"images": sample[:1]}, 50), latency(sess, {"images": sample}, 10))


def quantize_checked(model, fp32_path, out, raw_input, max_drop):
    """Quantize to `out`, measure both graphs; CnnlabError (nothing kept) when the int8 test
    accuracy is more than `max_drop` points below fp32's. Returns (fp32, int8) Measures."""
    data = run_data_of(model)
    if len(data.test[1]) == 0:
        raise CnnlabError("the run has no test split to check the int8 model on: --quantize needs one.")
    from ..data.images import center_crop   # photos (--resize crop) are stored larger than the input

    quantize(model, fp32_path, out, raw_input, center_crop(data.train[0], model.preprocess.image_size))
    fp32, int8 = measure(fp32_path, model, data, raw_input), measure(out, model, data, raw_input)
    drop = 100 * (fp32.accuracy - int8.accuracy)
    if drop > max_drop:
        raise CnnlabError(f"int8 refused: test accuracy {int8.accuracy:.2%} against fp32's {fp32.accuracy:.2%}, a drop of "
                          f"{drop:.2f} points over --max-drop {max_drop:g}; nothing was written (export without "
                          "--quantize, or raise --max-drop).")
    onnxgraph.add_metadata(out, {"test_accuracy": f"{int8.accuracy:.4f}", "quantization": "int8 static, "
                                 f"calibrated on {CALIBRATION_IMAGES} training images; fp32 test accuracy "
                                 f"{fp32.accuracy:.4f}"})
    return fp32, int8


def table(fp32, int8):
    """The comparison printed by the export command."""
    rows = [f"{'':6} {'test acc':>9} {'size':>10} {'batch 1':>9} {'batch 64':>9}"]
    for name, m in (("fp32", fp32), ("int8", int8)):
        rows.append(f"{name:6} {m.accuracy:>9.2%} {m.size / 1024:>8.0f}KB {m.latency_1 * 1e3:>7.2f}ms "
                    f"{m.latency_64 * 1e3:>7.1f}ms")
    rows.append(f"int8: {int8.size / fp32.size:.2f}x the size, {int8.latency_1 / fp32.latency_1:.2f}x the batch-1 "
                f"latency, accuracy {100 * (int8.accuracy - fp32.accuracy):+.2f} points (CPU, onnxruntime)")
    return "\n".join(rows)
