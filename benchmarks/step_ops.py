"""Issue 21's target 3, op by op: seed 003's training step (`mnist_cnn`, fp32, channels_last, the
default batch of 64) written out as the aten calls autograd makes, each timed where it runs in the
step, so each finds the caches as the step before it left them. Beside them: the real step
(speed.py's (d): engine.make_step with the fused Adam, FLOPs from torch's FlopCounterMode) and
the fp32 matmul that (d) is divided by. Prints each op's median time, the convolutions' GFLOP/s,
and what 60% of the matmul leaves for the step.

    python benchmarks/step_ops.py [--threads N] [--batch 64] [--data-dir ../shared/datasets]
"""
import argparse
import os
import statistics
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
sys.path.insert(0, HERE)
import cnnlab  # noqa: E402,F401  (first, as the `cnnlab` command: its OpenMP wait settings precede torch)
from cnnlab.allocator import reuse_freed_memory  # noqa: E402

ATEN_CONV = ([1, 1], [0, 0], [1, 1], False, [0, 0], 1)   # stride, padding, dilation, transposed, output_padding, groups
POOL = ([2, 2], [2, 2], [0, 0], [1, 1], False)            # kernel, stride, padding, dilation, ceil_mode


def conv_flops(x, w, grads):
    """Multiply-adds x 2 of a valid 3x3 convolution of x by w, times the passes (forward = 1,
    backward: 1 per gradient, input and weight)."""
    b, _, h, wd = x.shape
    return 2 * b * w.shape[0] * (h - w.shape[2] + 1) * (wd - w.shape[3] + 1) * w[0].numel() * grads


def timed_ops(model, x, y, times):
    """One step of model (Classifier(features, head) of mnist_cnn) by hand, each op's seconds
    appended to times[name]; the gradients are computed and dropped (no update: timed apart)."""
    import torch
    from torch.nn import functional as F

    aten = torch.ops.aten
    conv1, _, _, conv2, _, _ = model.features
    fc1, _, fc2 = model.head
    clock = [time.perf_counter()]

    def tick(name):
        now = time.perf_counter()
        times.setdefault(name, []).append(now - clock[0])
        clock[0] = now

    with torch.no_grad():
        h1 = aten.convolution(x, conv1.weight, conv1.bias, *ATEN_CONV); tick("conv1 forward")
        p1, i1 = aten.max_pool2d_with_indices(h1, *POOL[:2]); tick("pool1 forward")
        r1 = torch.relu(p1); tick("relu1 forward")
        h2 = aten.convolution(r1, conv2.weight, conv2.bias, *ATEN_CONV); tick("conv2 forward")
        p2, i2 = aten.max_pool2d_with_indices(h2, *POOL[:2]); tick("pool2 forward")
        r2 = torch.relu(p2); tick("relu2 forward")
        flat = r2.flatten(1)
        a1 = torch.relu(F.linear(flat, fc1.weight, fc1.bias))
        logits = F.linear(a1, fc2.weight, fc2.bias)
        F.cross_entropy(logits, y); tick("head + loss forward")
        g = (torch.softmax(logits, 1) - F.one_hot(y, logits.shape[1])) / len(y)
        g.t() @ a1
        ga1 = aten.threshold_backward(g @ fc2.weight, a1, 0)
        ga1.t() @ flat
        gr2 = (ga1 @ fc1.weight).view(r2.shape); tick("head backward")
        gp2 = aten.threshold_backward(gr2, r2, 0); tick("relu2 backward")
        gh2 = aten.max_pool2d_with_indices_backward(gp2, h2, *POOL, i2); tick("pool2 backward")
        gr1, _, _ = aten.convolution_backward(gh2, r1, conv2.weight, [conv2.weight.shape[0]], *ATEN_CONV,
                                              [True, True, True]); tick("conv2 backward")
        gp1 = aten.threshold_backward(gr1, r1, 0); tick("relu1 backward")
        gh1 = aten.max_pool2d_with_indices_backward(gp1, h1, *POOL, i1); tick("pool1 backward")
        aten.convolution_backward(gh1, x, conv1.weight, [conv1.weight.shape[0]], *ATEN_CONV,
                                  [False, True, True]); tick("conv1 backward")
    return {"conv1 forward": conv_flops(x, conv1.weight, 1), "conv1 backward": conv_flops(x, conv1.weight, 1),
            "conv2 forward": conv_flops(r1, conv2.weight, 1), "conv2 backward": conv_flops(r1, conv2.weight, 2)}


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=0, help="torch's CPU threads (0: cnnlab's choice)")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--data-dir", default=os.path.join(os.path.dirname(os.path.dirname(HERE)), "shared", "datasets"))
    args = parser.parse_args()
    reuse_freed_memory()   # as cli.main does for every command
    if args.threads:
        os.environ["OMP_NUM_THREADS"] = str(args.threads)   # cnnlab's setup takes a user's OMP_NUM_THREADS
    import torch

    from cnnlab.config import make_config
    from cnnlab.data import load_data
    from cnnlab.data.loader import BatchLoader
    from cnnlab.models import create_model
    from cnnlab.runtime import setup
    from speed import matmul_gflops, training_gflops

    cfg = make_config({"data": "mnist", "data_dir": args.data_dir, "batch_size": args.batch, "val_fraction": 0.0,
                       "augment": "none"})
    setup(cfg)
    data = load_data(cfg.data_config())
    model = create_model("mnist_cnn", data.shape, 10).to(memory_format=torch.channels_last)
    loader = BatchLoader(*data.train, args.batch, data.preprocess, shuffle=True, channels_last=True)
    batches = [b for _, b in zip(range(16), loader.batches(0))]
    times = {}
    for i in range(args.steps + 20):
        flops = timed_ops(model, *batches[i % len(batches)], times)
        if i == 19:
            times.clear()   # warm-up
    step_gflops, rate, _ = training_gflops(args.data_dir, args.batch)
    matmul = matmul_gflops()
    step_ms = args.batch / rate * 1e3
    print(f"machine: {os.cpu_count()} CPUs, torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"batch {args.batch}")
    print(f"{'op':22s} {'ms':>7s}  GFLOP/s (% of matmul)")
    total = 0.0
    for name, seconds in times.items():
        ms = statistics.median(seconds) * 1e3
        total += ms
        rate_text = (f"{flops[name] / ms / 1e6:7.1f} ({flops[name] / ms / 1e6 / matmul:.0%})" if name in flops else "")
        print(f"{name:22s} {ms:7.3f}  {rate_text}")
    flops_per_step = step_gflops * step_ms * 1e6
    print(f"{'sum of the ops':22s} {total:7.3f}")
    print(f"real step (make_step, fused Adam; median): {step_ms:.3f} ms, {step_gflops:.1f} GFLOP/s; fp32 matmul {matmul:.1f} "
          f"GFLOP/s; ratio {step_gflops / matmul:.0%}")
    print(f"60% of the matmul leaves {flops_per_step / (0.6 * matmul * 1e9) * 1e3:.3f} ms for the step's "
          f"{flops_per_step / 1e6:.0f} MFLOP")


if __name__ == "__main__":
    main()
