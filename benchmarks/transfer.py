"""Transfer, proven offline with weights cnnlab makes itself: pretrain tv/resnet18 on 8 CIFAR-10
classes, then learn the other 2 (ship, truck) from 100 training images each, once starting from
the pretrained run (--init, the head re-made) and once from scratch, with the same budget (epochs,
batch, lr, schedule), for 3 seeds. Test accuracy on 150 official test images per class.

    python benchmarks/transfer.py [--source /tmp/cifar10_jpg] [--out /tmp/transfer]

The CIFAR-10 JPEG folder is extracted from ../shared/datasets/cifar10_jpg.tar when absent. Small
subset folders (copies) are built so cnnlab decodes only the images it uses. Target (issue 16):
fine-tuned >= from scratch + 10 points. Prints one line per run and a Markdown table."""
import argparse
import os
import shutil
import statistics
import sys
import tarfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import cnnlab  # noqa: E402

CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
PRETRAIN, NEW = CLASSES[:8], CLASSES[8:]
TAR = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "datasets", "cifar10_jpg.tar")
MODEL = "tv/resnet18"
# Pretraining: 250 images per class, 3 epochs at 32 px, no validation pass: sized for a 2-core
# machine shared with many other jobs (tv/resnet18 at 32 px trains ~20 images per CPU-second).
PRETRAIN_RUN = dict(model=MODEL, epochs=3, batch_size=64, lr=2e-3, optimizer="adamw", weight_decay=0.05,
                    schedule="onecycle", val_fraction=0.0)
# Both arms of the comparison: identical settings, only the starting weights differ (the fine-tuned
# arm's backbone learns at 0.1x, fastai's discriminative lr, --backbone-lr-mult).
FINETUNE_RUN = dict(model=MODEL, epochs=6, batch_size=50, lr=1e-3, optimizer="adamw", weight_decay=0.05,
                    schedule="onecycle", val_fraction=0.0)


def subset(source, dest, classes, train_per_class, test_per_class):
    """DEST/train/<class>/ and DEST/test/<class>/ with the first N images of each class (copies;
    an existing DEST is kept as it is, so seeds run as separate processes decode it once)."""
    if os.path.isdir(dest):
        return dest
    for split, n in (("train", train_per_class), ("test", test_per_class)):
        for c in classes:
            folder = os.path.join(dest, split, c)
            os.makedirs(folder, exist_ok=True)
            for name in sorted(os.listdir(os.path.join(source, split, c)))[:n]:
                shutil.copyfile(os.path.join(source, split, c, name), os.path.join(folder, name))
    return dest


def train(out, **settings):
    t = time.perf_counter()
    result = cnnlab.train(out=out, overwrite=True, report=False, quiet=False, **settings)
    return result.summary["test_acc"], time.perf_counter() - t


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--source", default="/tmp/cifar10_jpg")
    p.add_argument("--out", default="/tmp/transfer")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--threads", type=int, default=0, help="torch threads per run (0: cnnlab's default)")
    p.add_argument("--pretrain-per-class", type=int, default=250)
    p.add_argument("--test-per-class", type=int, default=150)
    args = p.parse_args()
    if not os.path.isdir(args.source):
        with tarfile.open(TAR) as tar:
            tar.extractall(os.path.dirname(args.source), filter="data")
    pre = subset(args.source, os.path.join(args.out, "data8"), PRETRAIN, args.pretrain_per_class, 100)
    new = subset(args.source, os.path.join(args.out, "data2"), NEW, 100, args.test_per_class)
    if os.path.exists(os.path.join(args.out, "pretrain", "summary.json")):   # seeds run as separate processes share it
        print(f"pretrained run {os.path.join(args.out, 'pretrain')} reused", flush=True)
    else:
        acc, seconds = train(os.path.join(args.out, "pretrain"), data=f"folder:{pre}", threads=args.threads,
                             **PRETRAIN_RUN)
        print(f"pretrain {MODEL} on {len(PRETRAIN)} classes x {args.pretrain_per_class}: test acc {acc:.2%} "
              f"({seconds:.0f}s)", flush=True)
    results = {"fine-tuned": [], "from scratch": []}
    for seed in args.seeds:
        for arm, start in (("fine-tuned", {"init": os.path.join(args.out, "pretrain"),
                                                              "backbone_lr_mult": 0.1}), ("from scratch", {})):
            acc, seconds = train(os.path.join(args.out, f"{arm.replace(' ', '_')}-{seed}"), data=f"folder:{new}",
                                 seed=seed, threads=args.threads, **start, **FINETUNE_RUN)
            results[arm].append(acc)
            print(f"seed {seed} {arm:<12} test acc {acc:.2%} ({seconds:.0f}s)", flush=True)
    print(f"\n| start | test acc, seeds {', '.join(map(str, args.seeds))} | mean |\n| --- | --- | --- |")
    for arm, accs in results.items():
        print(f"| {arm} | {' / '.join(f'{a:.1%}' for a in accs)} | {statistics.mean(accs):.1%} |")
    gain = 100 * (statistics.mean(results["fine-tuned"]) - statistics.mean(results["from scratch"]))
    print(f"\nfine-tuned - from scratch: {gain:+.1f} points (target >= +10)")
    return 0 if gain >= 10 else 1


if __name__ == "__main__":
    sys.exit(main())
