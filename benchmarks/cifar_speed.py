"""Issue 21, target 2a: seed 004's CIFAR-10 tutorial as written against cnnlab, side by side in ONE
run on the same machine and the same 60,000 JPEGs (../shared/datasets/cifar10_jpg.tar).

    python benchmarks/cifar_speed.py [--seeds 0 1 2]

(a) benchmarks/tutorial_seed004.py in its own process: 20,000 / 5,000 / 5,000 images, 5 epochs;
    its wall time after `import torch` and its test accuracy.
(b) cnnlab's first read of the folder into its disk cache (a fresh --cache-dir, the whole command
    of one short training): what a user pays once per folder.
(c) for each of CONFIGS, `cnnlab train` on the same split sizes (random stratified samples, the
    folder being sorted by class), the cache warm, per seed: the span after `import torch` (the
    tutorial's timer) and the whole command, and its test accuracy.
The target: some config reaches the tutorial's test accuracy (every seed) in <= 1/10 of its time.
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile

from recipes import JPG, cifar_folder   # benchmarks/ is on the path when a script here runs
from speed import timed_train

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
SPLIT = ["--split-ranges", "", "--train-samples", "20000", "--val-samples", "5000", "--test-samples", "5000"]
# mnist_fast's schedule on CIFAR-10 under bf16 autocast (AMX) with digits_fast: BN makes 2 epochs
# enough. Not mnist_fast's own digits_s2d, batch 192, lr 0.4: 53.6-56.0% (seeds 0-2) in 2 epochs,
# its space-to-depth stem loses what a first max-pool keeps on photos, as a strided first conv did
FASTEST = "digits_fast, one-cycle Nesterov SGD lr 0.2 at batch 128, bf16 autocast, 2 epochs"
# the same without the validation passes, as mnist_fast itself runs: a fixed schedule keeps the
# last epoch and selects nothing on validation, so the 5,000 validation images are not drawn
NO_VAL = FASTEST + ", no validation split"
FAST_FLAGS = ["--model", "digits_fast", "--batch-size", "128", "--lr", "0.2", "--augment", "none", "--amp", "bf16",
              "--epochs", "2"]
# what cnnlab runs: (recipe, flags after SPLIT's: "--val-samples", "0" lifts its cap, so that
# --val-fraction 0 can leave the validation split empty)
CONFIGS = {
    "seed004_cifar10 (the tutorial's own settings)": ("seed004_cifar10", []),
    "seed004_cifar10 at batch 128, one-cycle lr 5e-3, 3 epochs": (
        "seed004_cifar10", ["--batch-size", "128", "--lr", "0.005", "--schedule", "onecycle", "--epochs", "3"]),
    FASTEST: ("mnist_fast", FAST_FLAGS + ["--val-fraction", "0.1"]),
    NO_VAL: ("mnist_fast", FAST_FLAGS + ["--val-fraction", "0", "--val-samples", "0"]),
}


def tutorial(epochs, env=None):
    """Seed 004's code in its own process (`env`: speed.py passes the environment without the
    OpenMP settings its `import cnnlab` added)."""
    out = subprocess.run([sys.executable, os.path.join(HERE, "tutorial_seed004.py"), JPG, str(epochs)],
                         capture_output=True, text=True, check=True, cwd=ROOT, env=env).stdout
    return json.loads(out.strip().splitlines()[-1])


def cnnlab_run(config, seed, cache_dir, extra=()):
    """speed.timed_train of one `cnnlab train` of `config` on the folder: (whole s, span s, summary)."""
    out_dir = os.path.join(ROOT, "runs", f"bench-cifar-{seed}")
    return timed_train(["train", "--config", config, "--data", "folder:" + JPG, *SPLIT, "--seed", str(seed),
                        "--cache-dir", cache_dir, "--out", out_dir, "--overwrite", "--report", "false", *extra], out_dir)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--tutorial-epochs", type=int, default=5)
    args = ap.parse_args()
    cifar_folder()
    print(f"machine: {os.cpu_count()} CPUs", flush=True)
    a = tutorial(args.tutorial_epochs)
    print(f"(a) tutorial: {a['wall_seconds']:.1f} s after `import torch` ({a['train_seconds']:.1f} s in its training "
          f"loop, {a['train_images_per_second']:.0f} train img/s), test acc {a['test_acc']:.2%}", flush=True)
    with tempfile.TemporaryDirectory() as cache_dir:
        whole, span, _ = cnnlab_run("seed004_cifar10", 0, cache_dir, ["--epochs", "1", "--train-samples", "1000"])
        print(f"(b) first read of the folder (decode 60,000 JPEGs into a fresh cache, and one short training): "
              f"{whole:.1f} s whole command", flush=True)
        print("ratios (tutorial time / cnnlab time, cache warm):")
        for name in CONFIGS:
            print(f"(c) {compare(a, name, args.seeds, cache_dir)}", flush=True)


def compare(a, name, seeds, cache_dir=""):
    """One line: CONFIGS[name] run once per seed beside the tutorial's result `a`, and the ratios."""
    config, flags = CONFIGS[name]
    runs = [cnnlab_run(config, seed, cache_dir, flags) for seed in seeds]
    spans, wholes = [r[1] for r in runs], [r[0] for r in runs]
    accs = [r[2]["final_test_acc"] for r in runs]
    reached = "every seed reaches" if min(accs) >= a["test_acc"] else "NOT every seed reaches"
    return (f"{name}: after `import torch` {', '.join(f'{s:.1f}' for s in spans)} s, whole command "
            f"{', '.join(f'{w:.1f}' for w in wholes)} s; test acc {', '.join(f'{x:.2%}' for x in accs)}; "
            f"time(a) / time(c) = {a['wall_seconds'] / statistics.median(spans):.1f} timed alike, "
            f"{a['wall_seconds'] / statistics.median(wholes):.1f} whole command (target >= 10; {reached} "
            f"the tutorial's {a['test_acc']:.2%})")


if __name__ == "__main__":
    main()
