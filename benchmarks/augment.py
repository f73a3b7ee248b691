"""Strong augmentation: what it costs, and (with --cifar) what it buys.

    python benchmarks/augment.py                 # training images/s with each augmentation vs none
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
        speeds = {}
        for name, settings in VARIANTS.items():
            speeds[name] = max(run(f"{name}-{r}", settings) for r in range(args.repeats))   # best of: less noise
            print(f"{name:<16} {speeds[name]:8.0f} img/s  {speeds[name] / speeds['none']:.0%} of none", flush=True)
    slowest = min(speeds, key=speeds.get)
    print(f"\nmodel {args.model}, {args.images} images 3x32x32, batch 128, device {args.device}: slowest {slowest} "
          f"keeps {speeds[slowest] / speeds['none']:.0%} of plain (target >= 70%)")


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
    p.add_argument("--cifar", action="store_true", help="full CIFAR-10 accuracy with/without (heavy)")
    p.add_argument("--epochs", type=int, nargs="+", default=[12, 24], help="with --cifar")
    p.add_argument("--model", default="net", help="the throughput runs' model")
    p.add_argument("--images", type=int, default=3000)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--batch", type=int, default=256, help="with --loader")
    p.add_argument("--calls", type=int, default=10, help="with --loader: timed calls per way (the best counts)")
    p.add_argument("--device", default="auto")
    args = p.parse_args()
    cifar(args) if args.cifar else loader_speed(args) if args.loader else throughput(args)


if __name__ == "__main__":
    main()
