"""cnnlab vs the seed 003 tutorial, side by side, in ONE run on the same machine and data.

    python benchmarks/speed.py [--data-dir ../shared/datasets] [--tutorial-epochs 5] [--seeds 0 1 2]

(a) the tutorial as written (benchmarks/tutorial_seed003.py, in its own process)
(b) cnnlab training the same model at batch 32
(c) cnnlab's fastest MNIST recipe (cnnlab/recipes/mnist_fast.yaml), 3 seeds, wall time of the whole command
(c') the same under bf16 autocast (`--amp bf16`: faster where the CPU has AMX or AVX512-BF16, or on a GPU)
(d) achieved training GFLOP/s of the seed model at cnnlab's default batch vs fp32 matmul GFLOP/s
(e) inference images/s of `evaluate`, and the wall time of `cnnlab --help`
(f) the data loader alone vs the tutorial's DataLoader (issue: loader >= 20x)
(g) issue 21's target 2a: seed 004's CIFAR-10 tutorial vs cnnlab's fastest config
    (cifar_speed.py's FASTEST; skipped without ../shared/datasets/cifar10_jpg.tar), and
(g') the same config without a validation split (cifar_speed.py's NO_VAL), beside the same tutorial run
(h) target 3b: seed 002's `net` stepped beside one busy loop, cnnlab's default against
    `--threads 1` and torch's own default (busy_cpu.py)
Each ratio is printed on its own line; targets 2b, 2c and 4 are pointed to (their own scripts).
Results are recorded in benchmarks/README.md."""
import argparse
import json
import os
import statistics
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)


def sh(*cmd, **kw):
    return subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, check=True, **kw)


AS_STARTED = dict(os.environ)   # the tutorial runs in this: not in the OpenMP settings `import cnnlab` adds


def tutorial(data_dir, epochs):
    out = sh(sys.executable, os.path.join(HERE, "tutorial_seed003.py"), data_dir, str(epochs), env=AS_STARTED).stdout
    return json.loads(out.strip().splitlines()[-1])


def timed_train(argv, out_dir):
    """(whole command s, span after `import torch` s, summary dict) of `cnnlab ARGV` in a fresh
    process: the whole command (interpreter start and every import included), and the span the
    tutorials' own timers cover, from after `import torch` to the end (data loading, cnnlab's
    imports and the test evaluation included). `import cnnlab` (0.03 s, no torch) comes first, as
    in the `cnnlab` command: it sets OpenMP's wait policy before torch loads (cnnlab/threads.py)."""
    code = ("import time, cnnlab, torch; t = time.perf_counter(); from cnnlab.cli import main; "
            f"rc = main({argv!r}); print('SPAN', time.perf_counter() - t); raise SystemExit(rc)")
    start = time.perf_counter()
    out = sh(sys.executable, "-c", code).stdout
    whole = time.perf_counter() - start
    with open(os.path.join(out_dir, "summary.json")) as f:
        return whole, float(out.split("SPAN ")[1].split()[0]), json.load(f)


def fastest_recipe(data_dir, seed, extra=()):
    """timed_train of `cnnlab train --config mnist_fast [EXTRA]`: (whole s, span s, test accuracy)."""
    out_dir = os.path.join(ROOT, "runs", f"bench-mnist-fast-{seed}")
    whole, span, summary = timed_train(["train", "--config", "mnist_fast", "--data-dir", data_dir, "--seed", str(seed),
                                        "--out", out_dir, "--overwrite", "--report", "false", *extra], out_dir)
    return whole, span, summary["test_acc"]


def fastest_line(name, runs):
    walls, spans, accs = [r[0] for r in runs], [r[1] for r in runs], [r[2] for r in runs]
    return (f"{name}: whole command {', '.join(f'{w:.1f}' for w in walls)} s (median "
            f"{statistics.median(walls):.1f}); after `import torch`, as the tutorial's timer: "
            f"{', '.join(f'{w:.1f}' for w in spans)} s (median {statistics.median(spans):.1f}); "
            f"test acc mean {statistics.mean(accs):.2%}, min {min(accs):.2%}")


def matmul_gflops(n=2048, reps=10):
    import torch

    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        a @ b
        times.append(time.perf_counter() - t)
    return 2 * n**3 / statistics.median(times) / 1e9


def training_gflops(data_dir, batch_size, steps=300):
    """cnnlab's own training step on real MNIST batches: FLOPs per step counted by torch's
    FlopCounterMode over a forward AND backward pass, divided by the median step time (the CPU
    step is synchronous, so each step is timed alone; the median, as the matmul's, keeps a burst
    of the shared machine's noise out). Returns (GFLOP/s, images/s, mean-based GFLOP/s)."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from cnnlab.config import make_config
    from cnnlab.data import load_data
    from cnnlab.data.loader import BatchLoader
    from cnnlab.training.engine import make_step
    from cnnlab.models import create_model
    from cnnlab.training.optim import build_optimizer
    from cnnlab.runtime import setup

    cfg = make_config({"data": "mnist", "data_dir": data_dir, "batch_size": batch_size, "val_fraction": 0.0,
                       "augment": "none"})
    ctx = setup(cfg)
    data = load_data(cfg.data_config())
    model = create_model("mnist_cnn", data.shape, 10).to(memory_format=torch.channels_last)
    step = make_step(model, build_optimizer(cfg, model), cfg, ctx)
    loader = BatchLoader(*data.train, batch_size, data.preprocess, shuffle=True, channels_last=True)
    batches = [b for _, b in zip(range(steps + 10), loader.batches(0))]
    with FlopCounterMode(display=False) as counter:
        step(*batches[0], cfg.lr)
    flops_per_step = counter.get_total_flops()
    for b in batches[1:10]:
        step(*b, cfg.lr)
    times = []
    for b in batches[10:]:
        t = time.perf_counter()
        step(*b, cfg.lr)
        times.append(time.perf_counter() - t)
    median = statistics.median(times)
    return flops_per_step / median / 1e9, batch_size / median, flops_per_step / statistics.mean(times) / 1e9


def evaluate_speed(data_dir, run_dir):
    import torch

    from cnnlab.evaluation.results import evaluate_model, load_trained, run_data

    model, _ = load_trained(run_dir)
    data = run_data(model, run_dir, data="mnist")
    evaluate_model(model, data)          # warm-up
    t = time.perf_counter()
    evaluate_model(model, data)
    return len(data.test[1]) / (time.perf_counter() - t), torch.get_num_threads()


def help_seconds(reps=5):
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        sh(sys.executable, "-m", "cnnlab", "--help")
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def loader_speed(data_dir, batches=200):
    """Images/s of the tutorial's DataLoader(MNIST + ToTensor, 32) and of cnnlab's loader
    (normalised float batches of 256 with crop augmentation)."""
    import torch
    import torchvision

    from cnnlab.config import make_config
    from cnnlab.data import load_data
    from cnnlab.data.loader import BatchLoader

    ds = torchvision.datasets.MNIST(data_dir, train=True, transform=torchvision.transforms.ToTensor())
    dl = torch.utils.data.DataLoader(ds, batch_size=32, shuffle=True)
    t = time.perf_counter()
    n = sum(len(y) for _, (x, y) in zip(range(batches * 4), dl))
    tutorial_rate = n / (time.perf_counter() - t)
    data = load_data(make_config({"data": "mnist", "data_dir": data_dir, "val_fraction": 0.0}).data_config())
    loader = BatchLoader(*data.train, 256, data.preprocess, shuffle=True, augment="crop")
    t = time.perf_counter()
    n = sum(len(y) for _, (x, y) in zip(range(batches), loader.batches(0)))
    return tutorial_rate, n / (time.perf_counter() - t)


def cifar_target(seeds):
    """Target 2a's lines (cifar_speed.py): the tutorial, then FASTEST and NO_VAL per seed."""
    # benchmarks/ is on the path when a script here runs. cifar_speed imports this file again as
    # the module `speed`, whose AS_STARTED is taken after `import cnnlab`: use this one's.
    import cifar_speed
    from recipes import SHARED

    if not os.path.exists(os.path.join(SHARED, "cifar10_jpg.tar")):
        return [f"skipped: {os.path.join(SHARED, 'cifar10_jpg.tar')} is absent"] * 2
    cifar_speed.cifar_folder()
    cifar_speed.cnnlab_run("seed004_cifar10", 0, "", ["--epochs", "1", "--train-samples", "1000"])   # fills the cache
    a = cifar_speed.tutorial(5, env=AS_STARTED)
    tutorial = f"tutorial {a['wall_seconds']:.1f} s after `import torch`, test acc {a['test_acc']:.2%}; "
    return [tutorial + cifar_speed.compare(a, name, seeds) for name in (cifar_speed.FASTEST, cifar_speed.NO_VAL)]


def busy_target(repeats=3):
    """Target 3b's line (busy_cpu.py): img/s beside one busy loop, and the default's slowdown."""
    import types

    import busy_cpu

    names = ["new default", "threads 1", "old default"]
    result = busy_cpu.scenario(1, names, types.SimpleNamespace(seconds=2.0, repeats=repeats, cli=0, model="net"))
    rates = {name: img_s for name, (img_s, _) in result.items()}
    return (", ".join(f"{name} {rate:.0f} img/s" for name, rate in rates.items())
            + f"; best / cnnlab's default = {max(rates.values()) / rates['new default']:.2f} (target: far from 10; "
            f"torch's own default {max(rates.values()) / rates['old default']:.1f})")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--data-dir", default=os.path.join("..", "shared", "datasets"))
    ap.add_argument("--tutorial-epochs", type=int, default=5)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    args = ap.parse_args()
    if not os.path.isdir(os.path.join(ROOT, args.data_dir, "MNIST")):
        sys.exit(f"full MNIST not found under {args.data_dir}")
    import cnnlab   # before torch, as the `cnnlab` command does: OpenMP's wait policy (cnnlab/threads.py)
    import torch
    from cnnlab.allocator import reuse_freed_memory

    reuse_freed_memory()   # as cli.main does for every command: (b) and (d) train in this process

    print(f"machine: {os.cpu_count()} CPUs, torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"GOMP_SPINCOUNT {os.environ.get('GOMP_SPINCOUNT', 'unset')}, OMP_WAIT_POLICY {os.environ.get('OMP_WAIT_POLICY', 'unset')}")
    a = tutorial(args.data_dir, args.tutorial_epochs)
    print(f"(a) tutorial: {a['train_images_per_second']:.0f} train img/s, {a['wall_seconds']:.1f} s for "
          f"{args.tutorial_epochs} epochs, test acc {a['test_acc']:.2%}", flush=True)
    from cnnlab.config import load_yaml, make_config

    b = cnnlab.train(make_config({**load_yaml(os.path.join(ROOT, "cnnlab", "recipes", "seed003_mnist.yaml")), "data_dir": args.data_dir,
                         "epochs": 1, "out": os.path.join(ROOT, "runs", "bench-b"), "overwrite": True, "report": False}), quiet=True)
    b_rate = b.summary["samples_per_second"]
    print(f"(b) cnnlab, same model, batch 32: {b_rate:.0f} train img/s", flush=True)
    runs = [fastest_recipe(args.data_dir, s) for s in args.seeds]
    walls, spans, accs = [r[0] for r in runs], [r[1] for r in runs], [r[2] for r in runs]
    print(f"(c) {fastest_line('fastest recipe', runs)}", flush=True)
    bf16 = [fastest_recipe(args.data_dir, s, ["--amp", "bf16"]) for s in args.seeds]   # AMX / AVX512-BF16 CPUs, GPUs
    print(f"(c') {fastest_line('the same with --amp bf16', bf16)}", flush=True)
    default_batch = make_config().batch_size
    gflops, rate, mean_gflops = training_gflops(args.data_dir, default_batch)
    mm = matmul_gflops()
    print(f"(d) seed model training at batch {default_batch}: {gflops:.1f} GFLOP/s at the median step "
          f"({rate:.0f} img/s; {mean_gflops:.1f} GFLOP/s at the mean step); fp32 matmul {mm:.1f} GFLOP/s", flush=True)
    eval_rate, _ = evaluate_speed(args.data_dir, os.path.join(ROOT, "runs", "bench-b"))
    help_s = help_seconds()
    print(f"(e) evaluate: {eval_rate:.0f} img/s; `cnnlab --help`: {help_s:.2f} s", flush=True)
    tut_loader, our_loader = loader_speed(args.data_dir)
    print(f"(f) loader alone: tutorial DataLoader {tut_loader:.0f} img/s; cnnlab (256, crop, normalised) {our_loader:.0f} img/s")
    cifar, no_val = cifar_target(args.seeds)
    print(f"(g) CIFAR-10, seed 004's tutorial vs cnnlab: {cifar}", flush=True)
    print(f"(g') the same without a validation split: {no_val}", flush=True)
    busy = busy_target()
    print(f"(h) seed 002's net beside one busy loop: {busy}", flush=True)
    print("ratios:")
    print(f"time(a) / time(c) = {a['wall_seconds'] / statistics.median(spans):.1f} with both timed after `import torch` "
          f"({a['wall_seconds'] / statistics.median(walls):.1f} against cnnlab's whole command)  "
          f"(targets >= 20 timed alike, >= 15 whole command; min acc {min(accs):.2%}, target >= 99.0%)")
    bf16_span, bf16_whole = (statistics.median(r[i] for r in bf16) for i in (1, 0))
    print(f"time(a) / time(c') = {a['wall_seconds'] / bf16_span:.1f} timed alike ({a['wall_seconds'] / bf16_whole:.1f} "
          f"whole command; min acc {min(r[2] for r in bf16):.2%})")
    print(f"(b) / (a) images/s = {b_rate / a['train_images_per_second']:.2f}  (target >= 1.5)")
    print(f"(d) / matmul = {gflops / mm:.1%}  (target >= 60%)")
    print(f"cnnlab --help = {help_s:.2f} s  (target < 1 s)")
    print(f"loader / tutorial loader = {our_loader / tut_loader:.1f}  (target >= 20)")
    print(f"2a, CIFAR-10 (g): {cifar.split('time(a) / time(c) = ')[-1]}")
    print(f"2a without validation (g'): {no_val.split('time(a) / time(c) = ')[-1]}")
    print(f"3b, busy CPU (h): best / {busy.split('best / ')[-1]}")
    print("2b (cifar10_fast >= 94% on the JPEGs): not measurable here, airbench94's own code reaches 90.6% on them "
          "(benchmarks/README.md); 2c: python benchmarks/cifar_cpu.py (12 min on AMX, 30 on a Zen 4); "
          "4: python benchmarks/speed_gpu.py on a CUDA machine" + ("" if torch.cuda.is_available() else " (none here)"))


if __name__ == "__main__":
    main()
