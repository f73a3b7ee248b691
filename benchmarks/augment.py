"""Strong augmentation: what it costs, and (with --cifar) what it buys.

    python benchmarks/augment.py                 # training images/s with each augmentation vs none
    python benchmarks/augment.py --steps         # the same, timed per step (robust on a loaded machine)
    python benchmarks/augment.py --loader        # batch making alone: ours vs torchvision v2 RandAugment
    python benchmarks/augment.py --cifar --epochs 12 24   # full CIFAR-10, cifar10_fast with/without (heavy: GPU)

Throughput: one epoch of the same model on the same 32x32 RGB images (`synthetic:3x32x32:10:N`, so
every colour op has work to do), each variant after a warm-up run, images/s from summary.json.
Target (issue 19): the slowest variant keeps >= 70% of the plain throughput.
"""
import argparse
import os
import sys
import tempfile
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)   # this checkout's cnnlab

import cnnlab  # noqa: E402
from cnnlab.config import load_yaml, make_config  # noqa: E402

VARIANTS = {
    "none": {"augment": "none"},
    "crop+flip": {"augment": "crop+flip"},
    "randaugment": {"augment": "crop+flip+randaugment"},
    "trivialaugment": {"augment": "crop+flip+trivialaugment"},
    "jitter 0.4": {"augment": "crop+flip", "jitter": 0.4},
    "erase 0.25": {"augment": "crop+flip", "erase": 0.25},
    "mixup 0.2": {"augment": "crop+flip", "mixup": 0.2},
    "cutmix 1.0": {"augment": "crop+flip", "cutmix": 1.0},
    "all": {"augment": "crop+flip+randaugment", "jitter": 0.4, "erase": 0.25, "mixup": 0.2, "cutmix": 1.0},
}
STRONG = {"augment": "crop+flip+randaugment", "mixup": 0.2, "cutmix": 1.0, "erase": 0.25}


def throughput(args):
    base = dict(data=f"synthetic:3x32x32:10:{args.images}", model=args.model, epochs=1, batch_size=128,
                val_fraction=0.0, test_samples=128, report=False, device=args.device)
    with tempfile.TemporaryDirectory() as tmp:
        run = lambda name, settings: cnnlab.train(make_config({**base, **settings, "out": os.path.join(tmp, name)}),
                                                  quiet=True).summary["samples_per_second"]
        run("warm-up", {})
        speeds = {name: 0.0 for name in VARIANTS}
        for r in range(args.repeats):   # rounds over all variants, the best of each kept: the load of a
            for name, settings in VARIANTS.items():   # shared machine drifts, and only slows runs down
                speeds[name] = max(speeds[name], run(f"{name}-{r}", settings))
        for name in VARIANTS:
            print(f"{name:<16} {speeds[name]:8.0f} img/s  {speeds[name] / speeds['none']:.0%} of none", flush=True)
    slowest = min(speeds, key=speeds.get)
    print(f"\nmodel {args.model}, {args.images} images 3x32x32, batch 128, device {args.device}: slowest {slowest} "
          f"keeps {speeds[slowest] / speeds['none']:.0%} of plain (target >= 70%)")


def step_speed(args):
    """The same question, robust to a loaded machine: a training step is make_batch + the model's
    step, so images/s = B / (t_batch + t_step). Both are timed in rounds over all variants, one
    call each per round, and the best call of each is kept (a busy machine only ever adds time)."""
    from cnnlab.data.augment import resolve_augment, strong_augment
    from cnnlab.data.loader import BatchLoader
    from cnnlab.data.preprocess import Preprocess
    from cnnlab.models import create_model
    from cnnlab.runtime import Context
    from cnnlab.training.engine import make_step
    from cnnlab.training.optim import build_optimizer

    device = torch.device("cpu" if args.device == "auto" else args.device)
    gen = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (args.images, 3, 32, 32), dtype=torch.uint8, generator=gen)
    y = torch.randint(0, 10, (args.images,), generator=gen)
    data = type("Photos", (), {"flip_ok": True, "name": "synthetic"})()
    loaders, steps = {}, {}
    for name, settings in VARIANTS.items():
        cfg = make_config({"model": args.model, "lr": 0.01, **settings})
        augment = resolve_augment(data, cfg.augment)
        loaders[name] = BatchLoader(x, y, 128, Preprocess(3, 32, [0.5] * 3, [0.25] * 3), device, shuffle=True,
                                    augment=augment, channels_last=True, strong=strong_augment(cfg, augment, 10))
        net = create_model(args.model, (3, 32, 32), 10).to(device, memory_format=torch.channels_last)
        steps[name] = make_step(net, build_optimizer(cfg, net), cfg, Context(device=device))
    best = {name: [float("inf"), float("inf")] for name in VARIANTS}
    order = loaders["none"].order(0)
    for r in range(args.rounds):
        idx = order[(r % (args.images // 128)) * 128:][:128]
        for name in VARIANTS:
            start = time.perf_counter()
            xb, yb = loaders[name].make_batch(idx, 0, r)
            made = time.perf_counter()
            steps[name](xb, yb, 0.01)
            done = time.perf_counter()
            best[name] = [min(best[name][0], made - start), min(best[name][1], done - made)]
    # every variant runs the same model on the same shapes: its best step is the step time of all
    step = min(t_step for _, t_step in best.values())
    speed = {name: 128 / (t_batch + step) for name, (t_batch, _) in best.items()}
    for name, (t_batch, t_step) in best.items():
        print(f"{name:<16} batch {t_batch * 1000:6.1f} ms  step {t_step * 1000:6.1f} ms (best of all {step * 1000:.1f})  "
              f"{speed[name]:7.0f} img/s  "
              f"{speed[name] / speed['none']:.0%} of none", flush=True)
    slowest = min(speed, key=speed.get)
    print(f"\nmodel {args.model}, batch 128 of 3x32x32, best of {args.rounds} rounds: slowest {slowest} keeps "
          f"{speed[slowest] / speed['none']:.0%} of plain (target >= 70%)")


def loader_speed(args):
    """Batch making alone (no model): per-image RandAugment here, against torchvision's v2.RandAugment
    called once on the batch (one draw for all) and once per image (a Python loop)."""
    from torchvision.transforms import v2

    from cnnlab.data import augment as A

    device = torch.device(args.device if args.device != "auto" else "cpu")
    x = torch.randint(0, 256, (args.batch, 3, 32, 32), dtype=torch.uint8, device=device)
    gen = torch.Generator().manual_seed(0)
    ours = lambda: A.apply_policy(x.float(), A.draw_policy("randaugment", 9, len(x), gen), torch.arange(len(x)), False)
    tv = v2.RandAugment(num_ops=2, magnitude=9)
    ways = {"cnnlab per-image (batched by op)": ours, "torchvision v2, one draw per batch": lambda: tv(x),
            "torchvision v2, a loop per image": lambda: torch.stack([tv(img) for img in x])}
    for name, fn in ways.items():
        fn()
        best = min(timed(fn, device) for _ in range(args.calls))   # the best call: a loaded machine's noise is all upward
        print(f"{name:<36} {len(x) / best:9.0f} img/s", flush=True)


def timed(fn, device):
    start = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


def cifar(args):
    """cifar10_fast on the full CIFAR-10 (../shared/datasets/cifar10_jpg.tar) with and without the
    strong augmentations, for each --epochs: test accuracy of each."""
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from tune import cifar_folder

    folder = cifar_folder()
    base = load_yaml(os.path.join(ROOT, "cnnlab", "recipes", "cifar10_fast.yaml"))
    base.update(data=f"folder:{folder}", report=False, device=args.device)
    print("| epochs | cifar10_fast | + " + " ".join(f"{k} {v}" for k, v in STRONG.items()) + " |\n|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        for epochs in args.epochs:
            acc = [cnnlab.train(make_config({**base, **extra, "epochs": epochs, "out": os.path.join(tmp, f"{epochs}-{i}")}),
                                quiet=True).summary["test_acc"] for i, extra in enumerate(({}, STRONG))]
            print(f"| {epochs} | {acc[0]:.2%} | {acc[1]:.2%} ({(acc[1] - acc[0]) * 100:+.2f}) |", flush=True)


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--loader", action="store_true", help="batch making alone, against torchvision")
    p.add_argument("--steps", action="store_true", help="batch + training step timed per variant, best of --rounds")
    p.add_argument("--rounds", type=int, default=15, help="with --steps")
    p.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0: torch's default)")
    p.add_argument("--cifar", action="store_true", help="full CIFAR-10 accuracy with/without (heavy)")
    p.add_argument("--epochs", type=int, nargs="+", default=[12, 24], help="with --cifar")
    p.add_argument("--model", default="net", help="the throughput runs' model")
    p.add_argument("--images", type=int, default=3000)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--batch", type=int, default=256, help="with --loader")
    p.add_argument("--calls", type=int, default=10, help="with --loader: timed calls per way (the best counts)")
    p.add_argument("--device", default="auto")
    args = p.parse_args()
    if args.threads:   # on a loaded machine, 2 threads on small tensors wait on each other (README)
        torch.set_num_threads(args.threads)
    if args.cifar:
        cifar(args)
    elif args.loader:
        loader_speed(args)
    elif args.steps:
        step_speed(args)
    else:
        throughput(args)


if __name__ == "__main__":
    main()
