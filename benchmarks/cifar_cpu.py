"""Issue 21, target 2c: the `cifar10_cpu` recipe on the full CIFAR-10 (the 60,000 JPEGs of
../shared/datasets/cifar10_jpg.tar, 45,000 / 5,000 / 10,000) must reach >= 90% test accuracy in
<= 30 minutes on this machine. One run (about 12 minutes on 2 AMX cores), then its time-to-accuracy,
epoch by epoch, from the run's metrics.csv, and its test accuracy with and without flip TTA
(`cnnlab evaluate --tta flip`: each test image and its mirror image, as airbench measures):

    python benchmarks/cifar_cpu.py [--recipe cifar10_cpu] [--seed 0] [--table-only RUN_DIR]

--table-only prints the table of a run already made (its metrics.csv and summary.json)."""
import argparse
import csv
import json
import os
import subprocess
import sys
import time

from recipes import CIFAR10, ROOT, cifar_folder   # benchmarks/ is on the path when a script here runs

MINUTES = 30


def train(recipe, seed):
    out = os.path.join(ROOT, "runs", f"bench-{recipe}-{seed}")
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "cnnlab", "train", "--config", recipe, *CIFAR10, "--seed", str(seed),
                    "--out", out, "--overwrite", "--report", "false"], cwd=ROOT, check=True)
    return out, time.perf_counter() - start


def flip_tta(run_dir):
    """`cnnlab evaluate RUN --tta flip`: (test accuracy at the best validation epoch, at the last epoch)."""
    out = subprocess.run([sys.executable, "-m", "cnnlab", "evaluate", run_dir, "--tta", "flip", "--json"],
                         cwd=ROOT, check=True, capture_output=True, text=True).stdout
    m = json.loads(out)
    return m["accuracy"], m.get("final", m)["accuracy"]


def table(run_dir):
    """Markdown rows: epoch, training time so far, validation accuracy; then the summary lines."""
    with open(os.path.join(run_dir, "metrics.csv")) as f:
        rows = list(csv.DictReader(f))
    with open(os.path.join(run_dir, "summary.json")) as f:
        summary = json.load(f)
    lines = ["| epoch | training time so far | val acc |", "|---|---|---|"]
    elapsed, first90 = 0.0, None
    for row in rows:
        elapsed += float(row["seconds"])
        acc = float(row["val_acc"])
        if first90 is None and acc >= 0.90:
            first90 = (row["epoch"], elapsed)
        lines.append(f"| {row['epoch']} | {elapsed / 60:.1f} min | {acc:.2%} |")
    best_tta, last_tta = flip_tta(run_dir)
    lines += ["", f"after {elapsed / 60:.1f} min of training: test accuracy {summary['final_test_acc']:.2%} at the last "
              f"epoch ({summary['test_acc']:.2%} at the best validation epoch); with flip TTA {last_tta:.2%} "
              f"({best_tta:.2%}); validation reached 90% "
              + (f"at epoch {first90[0]} ({first90[1] / 60:.1f} min)" if first90 else "never"),
              f"target >= 90% test in <= {MINUTES} min: without TTA "
              + ("met" if summary["final_test_acc"] >= 0.90 and elapsed <= MINUTES * 60 else "NOT met")
              + ", with flip TTA " + ("met" if last_tta >= 0.90 and elapsed <= MINUTES * 60 else "NOT met")]
    return "\n".join(lines)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--recipe", default="cifar10_cpu")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--table-only", metavar="RUN_DIR")
    args = ap.parse_args()
    if args.table_only:
        print(table(os.path.abspath(args.table_only)))
        return
    cifar_folder()
    print(f"machine: {os.cpu_count()} CPUs", flush=True)
    run_dir, wall = train(args.recipe, args.seed)
    print(table(run_dir))
    print(f"whole command {wall / 60:.1f} min (the first read of the folder included when the cache is cold)")


if __name__ == "__main__":
    main()
