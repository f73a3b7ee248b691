"""fp32 PyTorch vs fp32 ONNX Runtime vs int8 ONNX Runtime on trained runs: test accuracy, file
size, p50 latency at batch 1 and images/s at batch 256, on this machine's CPU.

    python benchmarks/export_onnx.py RUN_DIR [RUN_DIR ...] [--runs 200]

Targets (issue 22): int8 accuracy within 1 point of fp32; int8 file <= 0.35x; ONNX Runtime fp32
batch-1 latency <= 0.7x PyTorch's.
"""
import argparse
import io
import os
import statistics
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from cnnlab.deploy import onnxgraph, quantize  # noqa: E402
from cnnlab.deploy.inference import load  # noqa: E402


def timed(fn, runs):
    """Seconds of each of `runs` calls, after two warm-up calls."""
    fn(), fn()
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return times


def row(name, acc, size, run_1, run_256, runs):
    p50 = statistics.median(timed(run_1, runs))
    per_256 = statistics.median(timed(run_256, max(3, runs // 20)))
    return {"name": name, "acc": acc, "size": size, "p50_ms": p50 * 1e3, "img_s": 256 / per_256}


def torch_row(model, data, runs):
    x, y = data.test
    right = sum(int((model.logits(x[i:i + 256]).argmax(1) == y[i:i + 256]).sum()) for i in range(0, len(x), 256))
    buffer = io.BytesIO()
    torch.save(model.net.state_dict(), buffer)
    one, batch = x[:1], x[:256].repeat(256 // min(256, len(x)) + 1, 1, 1, 1)[:256]
    return row("fp32 PyTorch", right / len(x), len(buffer.getvalue()), lambda: model.logits(one),
               lambda: model.logits(batch), runs)


def onnx_row(name, path, model, data, runs):
    sess = onnxgraph.session(path)
    x, y = data.test
    feed = onnxgraph.graph_input(model, x[:256], False).numpy()
    feed = feed.repeat(256 // len(feed) + 1, 0)[:256] if len(feed) < 256 else feed
    return row(name, quantize.accuracy(sess, model, x, y, False), os.path.getsize(path),
               lambda: sess.run(None, {"images": feed[:1]}), lambda: sess.run(None, {"images": feed}), runs)


def bench(run_dir, runs):
    model = load(run_dir)
    data = quantize.run_data_of(model)
    with tempfile.TemporaryDirectory() as folder:
        fp32, int8 = os.path.join(folder, "fp32.onnx"), os.path.join(folder, "int8.onnx")
        onnxgraph.write(model, fp32)
        quantize.quantize(model, fp32, int8, False, data.train[0])
        rows = [torch_row(model, data, runs), onnx_row("fp32 ONNX Runtime", fp32, model, data, runs),
                onnx_row("int8 ONNX Runtime", int8, model, data, runs)]
    print(f"\n{run_dir} ({model.config.get('model')}, {model.config.get('data')}, {len(data.test[1])} test images)")
    print("| backend | test acc | file | p50 batch 1 | img/s batch 256 |\n|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['name']} | {r['acc']:.2%} | {r['size'] / 1024:.0f} KB | {r['p50_ms']:.3f} ms | {r['img_s']:.0f} |")
    t, f, q = rows
    print(f"int8 - fp32 accuracy: {100 * (q['acc'] - f['acc']):+.2f} points (target >= -1); int8 file: "
          f"{q['size'] / f['size']:.2f}x (target <= 0.35); ORT fp32 batch-1 latency: {f['p50_ms'] / t['p50_ms']:.2f}x "
          f"PyTorch's (target <= 0.7); int8 batch-256 throughput: {q['img_s'] / f['img_s']:.2f}x fp32 ORT")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", metavar="RUN_DIR")
    parser.add_argument("--runs", dest="repeats", type=int, default=200, help="timed batch-1 runs per backend")
    args = parser.parse_args()
    print(f"machine: {os.cpu_count()} CPUs, torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"onnxruntime {onnxgraph.onnxruntime().__version__}; load average {os.getloadavg()[0]:.1f} at start")
    for run_dir in args.runs:
        bench(run_dir, args.repeats)


if __name__ == "__main__":
    main()
