"""Run every recipe under cnnlab/recipes/ once on this machine and print a Markdown table of test accuracy
and wall time for the README. Where a recipe's dataset is not on these machines, it runs on what
is (labelled): CIFAR recipes on the 5,000-image CIFAR-10 subset, Fashion-MNIST's on MNIST.

    python benchmarks/recipes.py [--only NAME ...]
"""
import argparse
import glob
import json
import os
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARED = os.path.join("..", "shared", "datasets")
CIFAR = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
SUBSET = ["--data", f"npz:{SHARED}/cifar10_5k.npz", "--class-names", ",".join(CIFAR)]
HERE = {  # recipe -> (extra flags, label of what it ran on)
    "seed000_fashion": (["--data", "mnist", "--data-dir", SHARED], "MNIST (Fashion-MNIST is not on this machine)"),
    "seed001_lenet": (["--data-dir", SHARED], "MNIST, resized to 32x32"),
    "seed003_mnist": (["--data-dir", SHARED], "MNIST"),
    "mnist_fast": (["--data-dir", SHARED], "MNIST"),
    "seed004_cifar10": (SUBSET, "CIFAR-10 5k subset (3,600 / 400 / 1,000)"),
    "cifar10_fast": (SUBSET, "CIFAR-10 5k subset (3,600 / 400 / 1,000)"),
}


def run(name):
    extra, label = HERE.get(name, (SUBSET + ["--classes", "airplane,bird"], "CIFAR-2 from the 5k subset (720 / 80 / 200)"))
    out = os.path.join(ROOT, "runs", f"recipe-{name}")
    start = time.perf_counter()
    result = subprocess.run([sys.executable, "-m", "cnnlab", "train", "--config", name, *extra,
                             "--out", out, "--overwrite", "--report", "false"], cwd=ROOT, capture_output=True, text=True)
    wall = time.perf_counter() - start
    if result.returncode:
        return f"| {name} | {label} | failed: {result.stderr.strip()[-120:]} | | |"
    s = json.load(open(os.path.join(out, "summary.json")))
    return (f"| `{name}` | {label} | {s['model']} | {s['test_acc']:.2%} | {s['epochs']} | {wall:.0f} s |")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--only", nargs="*")
    names = ap.parse_args().only or sorted(os.path.basename(p)[:-5] for p in glob.glob(os.path.join(ROOT, "cnnlab", "recipes", "*.yaml")))
    print("| recipe | data here | model | test acc | epochs | wall |")
    print("|---|---|---|---|---|---|")
    for name in names:
        print(run(name), flush=True)


if __name__ == "__main__":
    main()
