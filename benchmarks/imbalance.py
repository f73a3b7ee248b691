"""Class imbalance: mnist-5k with classes 3 and 8 cut to 5% of their training images (the test
split untouched), trained with the same budget three ways: neither remedy, --class-weights auto,
--sampler balanced. Prints the starved classes' test recall and the overall accuracy per way,
averaged over seeds.

    python benchmarks/imbalance.py --epochs 6 --seeds 0 1

Target (issue 19): +10 points of recall on each starved class, overall accuracy within 1 point.
"""
import argparse
import os
import sys
import tempfile

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import cnnlab  # noqa: E402
from cnnlab.config import make_config  # noqa: E402
from cnnlab.data import load_data  # noqa: E402

STARVED, KEEP = (3, 8), 0.05
WAYS = {"neither": {}, "class-weights auto": {"class_weights": "auto"}, "sampler balanced": {"sampler": "balanced"}}


def imbalanced_npz(path, seed=0):
    """mnist-5k's training pool (train + val) with the STARVED classes cut to KEEP of their images,
    and its test split as it is, as a Keras-style .npz."""
    data = load_data(make_config({"data": "mnist-5k"}).data_config())
    x = torch.cat([data.train[0], data.val[0]])
    y = torch.cat([data.train[1], data.val[1]])
    rng = np.random.default_rng(seed)
    keep = np.ones(len(y), bool)
    for k in STARVED:
        rows = np.flatnonzero(y.numpy() == k)
        keep[rng.permutation(rows)[int(round(KEEP * len(rows))):]] = False
    np.savez(path, x_train=x[keep].squeeze(1).numpy(), y_train=y[keep].numpy(),
             x_test=data.test[0].squeeze(1).numpy(), y_test=data.test[1].numpy(), classes=np.array(data.classes))
    return {k: int((y[torch.from_numpy(keep)] == k).sum()) for k in range(10)}


def run(npz, way, seed, epochs, out):
    state = cnnlab.train(make_config({"data": npz, "model": "mnist_cnn", "epochs": epochs, "seed": seed,
                                      "report": False, "out": out, **WAYS[way]}), quiet=True)
    summary = state.summary
    return summary["test_acc"], [summary["test_recall"][str(k)] for k in STARVED], summary["diagnostics"]


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--epochs", type=int, default=6)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    args = p.parse_args()
    torch.set_num_threads(2)
    with tempfile.TemporaryDirectory() as tmp:
        npz = os.path.join(tmp, "mnist5k_imbalanced.npz")
        counts = imbalanced_npz(npz)
        print(f"training pool per class: {counts} (classes {STARVED} cut to {KEEP:.0%}); test split untouched")
        results = {}
        for way in WAYS:
            runs = [run(npz, way, seed, args.epochs, os.path.join(tmp, f"{way}-{seed}")) for seed in args.seeds]
            acc = np.mean([r[0] for r in runs])
            recall = np.mean([r[1] for r in runs], axis=0)
            results[way] = (acc, recall)
            print(f"{way:<20} accuracy {acc:.2%}  " + "  ".join(f"recall {k} {r:.1%}" for k, r in zip(STARVED, recall))
                  + f"   diagnostics (seed {args.seeds[0]}): {runs[0][2]}", flush=True)
        base_acc, base_recall = results["neither"]
        print(f"\n| way | accuracy | " + " | ".join(f"recall {k}" for k in STARVED) + " |")
        print("|---|---|" + "---|" * len(STARVED))
        for way, (acc, recall) in results.items():
            gains = "" if way == "neither" else f" ({(acc - base_acc) * 100:+.1f})"
            cells = [f"{r:.1%}" + ("" if way == "neither" else f" ({(r - b) * 100:+.1f})") for r, b in zip(recall, base_recall)]
            print(f"| {way} | {acc:.2%}{gains} | " + " | ".join(cells) + " |")
        print(f"\n{args.epochs} epochs, mnist_cnn, seeds {args.seeds}; gains in points against neither")


if __name__ == "__main__":
    main()
