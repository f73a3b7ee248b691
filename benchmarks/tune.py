"""`cnnlab tune` against seed 002's hand-picked settings, on CIFAR-2 (airplane vs bird) from the full
CIFAR-10 JPEG folder: best validation and test accuracy of each, and what pruning saved.

    python benchmarks/tune.py                       # 20 trials of 15 epochs, median pruning
    python benchmarks/tune.py --trials 8 --epochs 5 # a quicker look

The baseline is the recipe seed002_cifar2_net (the book's `net`, SGD lr 1e-2, batch 64) for the
same number of epochs; the search is the recipe seed002_cifar2_tune with the space seed002_cifar2
(the seed's nets, their width, lr, momentum, L2, batch size). The JPEG folder is extracted from
../shared/datasets/cifar10_jpg.tar into /tmp/cifar10_jpg when absent."""
import argparse
import os
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)   # this checkout's cnnlab, not whichever one the interpreter has installed
TAR = os.path.join(ROOT, "..", "shared", "datasets", "cifar10_jpg.tar")
RECIPES = os.path.join(ROOT, "cnnlab", "recipes")


def cifar_folder():
    """/tmp/cifar10_jpg (train/ and test/ class folders), extracted once."""
    if not os.path.isdir("/tmp/cifar10_jpg"):
        subprocess.run(["tar", "xf", TAR, "-C", "/tmp"], check=True)
    return "/tmp/cifar10_jpg"


def recipe(name, **settings):
    from cnnlab.config import load_yaml, make_config

    return make_config({**load_yaml(os.path.join(RECIPES, name + ".yaml")), **settings})


def baseline(data, epochs, out):
    """Seed 002's `net` as the book trains it: one run, its best val and test accuracy, its time."""
    import cnnlab

    start = time.time()
    # the book's recipe has no validation split; here it gets the tune trials' split and normalisation
    settings = dict(val_fraction=0.1, normalize="dataset", epochs=epochs, out=out, report=False)
    result = cnnlab.train(recipe("seed002_cifar2_net", **data, **settings), quiet=True)
    return result.summary["best_val_acc"], result.summary["test_acc"], time.time() - start


def search(data, epochs, trials, out):
    """The study, and its trials' epochs and seconds (from the storage)."""
    import cnnlab
    import optuna

    start = time.time()
    result = cnnlab.tune(recipe("seed002_cifar2_tune", **data, epochs=epochs, report=False), "seed002_cifar2",
                         trials=trials, out=out, quiet=True)
    seconds = time.time() - start
    study = optuna.load_study(study_name=os.path.basename(out), storage=f"sqlite:///{out}/study.db")
    return result, study.get_trials(), seconds


def pruning_savings(trials, epochs):
    """(pruned trials, epochs not run, seconds those epochs would have taken at the mean epoch time)."""
    ran = [t for t in trials if t.state.name in ("COMPLETE", "PRUNED")]
    pruned = [t for t in ran if t.state.name == "PRUNED"]
    run_epochs = sum(t.user_attrs["epochs"] for t in ran)
    per_epoch = sum(t.user_attrs["seconds"] for t in ran) / max(run_epochs, 1)
    skipped = epochs * len(ran) - run_epochs
    return len(pruned), skipped, skipped * per_epoch, run_epochs


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--trials", type=int, default=20)
    ap.add_argument("--epochs", type=int, default=15)
    ap.add_argument("--out", default=None, help="work folder (default: a new temporary folder)")
    args = ap.parse_args()
    work = args.out or tempfile.mkdtemp(prefix="cnnlab-tune-bench-")
    data = {"data": "folder:" + cifar_folder(), "classes": ["airplane", "bird"]}
    val, test, base_seconds = baseline(data, args.epochs, os.path.join(work, "net"))
    result, trials, seconds = search(data, args.epochs, args.trials, os.path.join(work, "tune"))
    pruned, skipped, saved, run_epochs = pruning_savings(trials, args.epochs)
    print(f"CIFAR-2 (folder:/tmp/cifar10_jpg, airplane vs bird), {args.epochs} epochs a run, work folder {work}")
    print(f"seed 002 net (hand-picked): best val {val:.2%}, test {test:.2%}, {base_seconds:.0f} s")
    print(f"tune, {args.trials} trials: best val {result.best_val_acc:.2%}, test {result.test_acc:.2%} "
          f"(re-run of the best), {seconds:.0f} s in all; best settings {result.best_params}")
    print(f"pruning: {pruned} of {args.trials} trials pruned, {run_epochs} epochs run, {skipped} not run "
          f"(about {saved:.0f} s of training saved)")
    print("\n".join(result.lines[:-2]))


if __name__ == "__main__":
    main()
