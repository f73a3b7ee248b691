"""Run every recipe under cnnlab/recipes/ once on the full data here and print a Markdown table for
the README: the seed's or book's figure and where it comes from, cnnlab's test accuracy at the
best validation epoch (`test_acc`) and at the last epoch (`final_test_acc`, what the tutorials
print), and the wall time. Full MNIST from ../shared/datasets; the full CIFAR-10 from
../shared/datasets/cifar10_jpg.tar (extracted once into /tmp/cifar10_jpg); Fashion-MNIST's recipe
on MNIST where Fashion-MNIST is absent (labelled).

    python benchmarks/recipes.py [--only NAME ...] [--jobs N] [--amp bf16]

--amp bf16 trains under bf16 autocast (2.8x faster for the 100-block NetResDeep on a CPU with AMX;
the row says so). --jobs N runs N recipes at once (on a GPU, whose small-model runs leave it mostly idle); each row's
wall time is then that recipe's own time beside the others, not alone.

A class folder is sorted by class, so seed 004's index ranges (a recipe for CIFAR-10 in its own
order) become random stratified samples of the same sizes here (labelled)."""
import argparse
import concurrent.futures
import glob
import json
import os
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARED = os.path.join(ROOT, "..", "shared", "datasets")
JPG = "/tmp/cifar10_jpg"
CIFAR10 = ["--data", "folder:" + JPG]
CIFAR2 = CIFAR10 + ["--classes", "airplane,bird"]
MNIST = ["--data-dir", SHARED]
# recipe -> (extra flags, what it ran on, the published figure, its source)
BOOK = "dlwpt-code p1ch8/1_convolution.ipynb, val = CIFAR-10 test images, last epoch"
HERE = {
    "seed000_fashion": (["--data", "mnist"] + MNIST, "MNIST (Fashion-MNIST is not on this machine)", None, "seed 000 prints no accuracy"),
    "seed001_lenet": (MNIST, "MNIST, resized to 32x32", None, "seed 001 trains one step on random input"),
    "seed003_mnist": (MNIST, "MNIST 60,000 / 10,000", None, "seed 003 prints its per-epoch figures, none given"),
    "mnist_fast": (MNIST, "MNIST 60,000 / 10,000 (no validation split)", None, ""),
    "seed004_cifar10": (CIFAR10 + ["--split-ranges", "", "--train-samples", "20000", "--val-samples", "5000",
                                   "--test-samples", "5000"], "CIFAR-10 JPEGs, 20,000 / 5,000 / 5,000 stratified",
                        0.60, "seed 004: \"about 60%\" (on its training set)"),
    "cifar10_fast": (CIFAR10, "CIFAR-10 JPEGs 45,000 / 5,000 / 10,000", None, ""),
    "cifar10_cpu": (CIFAR10, "CIFAR-10 JPEGs 45,000 / 5,000 / 10,000, bf16 autocast", None, ""),
    "seed002_cifar2_net": (CIFAR2, "", 0.89, BOOK),
    "seed002_cifar2_net_width": (CIFAR2, "", 0.90, BOOK),
    "seed002_cifar2_net_l2": (CIFAR2, "", 0.87, BOOK),
    "seed002_cifar2_net_dropout": (CIFAR2, "", 0.88, BOOK),
    "seed002_cifar2_net_bn": (CIFAR2, "", 0.89, BOOK),
    "seed002_cifar2_net_depth": (CIFAR2, "", 0.90, BOOK),
    "seed002_cifar2_net_res": (CIFAR2, "", 0.90, BOOK),
    "seed002_cifar2_net_res_deep_book": (CIFAR2, "", 0.86, BOOK),
}
CIFAR2_LABEL = "CIFAR-2 JPEGs 10,000 / 2,000 (the book's split)"


def cifar_folder():
    if not os.path.isdir(JPG):
        subprocess.run(["tar", "xf", os.path.join(SHARED, "cifar10_jpg.tar"), "-C", os.path.dirname(JPG)], check=True)


def run(name, amp=""):
    extra, label, figure, source = HERE.get(name, (CIFAR2, "", None, ""))
    label = label or (CIFAR2_LABEL if name.startswith("seed002") else "CIFAR-2 JPEGs")
    if amp:
        extra, label = [*extra, "--amp", amp], f"{label}, {amp} autocast"
    out = os.path.join(ROOT, "runs", f"recipe-{name}")
    start = time.perf_counter()
    result = subprocess.run([sys.executable, "-m", "cnnlab", "train", "--config", name, *extra,
                             "--out", out, "--overwrite", "--report", "false"], cwd=ROOT, capture_output=True, text=True)
    wall = time.perf_counter() - start
    if result.returncode:
        return f"| `{name}` | {label} | failed: {result.stderr.strip()[-120:]} | | | | | |"
    s = json.load(open(os.path.join(out, "summary.json")))
    published = f"{figure:.0%} ({source})" if figure is not None else (source or "-")
    best = "-" if s["best_val_acc"] is None else f"{s['test_acc']:.2%}"   # no validation split: no best epoch
    gap = "" if figure is None else f" ({(s['final_test_acc'] - figure) * 100:+.1f})"
    row = (f"| `{name}` | {label} | {s['model']} | {published} | {best} | {s['final_test_acc']:.2%}{gap} | "
           f"{s['epochs']} | {wall:.0f} s |")
    print(row, file=sys.stderr, flush=True)   # at once: with --jobs, stdout keeps the recipes' order
    return row


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--only", nargs="*")
    ap.add_argument("--jobs", type=int, default=1, help="recipes run at once")
    ap.add_argument("--amp", default="", help="train under this autocast (bf16), labelled in the table")
    args = ap.parse_args()
    names = args.only or sorted(os.path.basename(p)[:-5]
                                          for p in glob.glob(os.path.join(ROOT, "cnnlab", "recipes", "*.yaml")))
    cifar_folder()
    print("| recipe | data here | model | published figure | test acc, best val epoch | test acc, last epoch "
          "(vs figure) | epochs | wall |")
    print("|---|---|---|---|---|---|---|---|")
    with concurrent.futures.ThreadPoolExecutor(args.jobs) as pool:
        for row in pool.map(lambda name: run(name, args.amp), names):   # rows in the recipes' order, each printed once ready
            print(row, flush=True)


if __name__ == "__main__":
    main()
