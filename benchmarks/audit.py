"""What `cnnlab audit` and `--calibrate` find, against planted truth (recorded in benchmarks/README.md):

  labels-mnist   flip 5% of mnist-5k's labels (seeded): precision and recall of the flagged set
  labels-cifar   the same on the CIFAR-10 5k npz
  duplicates     a folder of 2,000 distinct CIFAR images with 20 exact and 20 near copies (JPEG
                 re-encoded, resized to 64 px, shifted one pixel) planted in its test split
  duplicates-mnist  the same with 2,000 mnist-5k digits
  outliers       20 uniform-noise images planted among 4,125 mnist-5k images: found as outliers?
  temperature    an over-confident run (no label smoothing, 30 epochs on 1,000 digits): test ECE
                 before and after --calibrate

python benchmarks/audit.py [PART ...] (default: all)"""
import io
import os
import sys
import tempfile
import time

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import cnnlab  # noqa: E402
from cnnlab.config import make_config  # noqa: E402
from cnnlab.data import load_data  # noqa: E402
from cnnlab.data.registry import open_source  # noqa: E402
from cnnlab.evaluation.audit import audit  # noqa: E402

SHARED = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "shared", "datasets")
CIFAR = os.path.join(SHARED, "cifar10_5k.npz")


def flip_labels(data, fraction=0.05, seed=0):
    """Give `fraction` of every split's images another class, in place; returns {(split, index)}."""
    g = torch.Generator().manual_seed(seed)
    k, flipped = len(data.classes), set()
    for split in ("train", "val", "test"):
        y = getattr(data, split)[1]
        rows = torch.randperm(len(y), generator=g)[:round(fraction * len(y))]
        y[rows] = (y[rows] + torch.randint(1, k, (len(rows),), generator=g)) % k   # never the same class
        flipped |= {(split, int(i)) for i in rows}
    return flipped


def labels(name, epochs):
    data = load_data(make_config({"data": name}).data_config())
    flipped = flip_labels(data)
    start = time.time()
    with tempfile.TemporaryDirectory() as out:
        report = audit(data, out=out, epochs=epochs, quiet=True)
    flagged = {(r["split"], r["index"]) for r in report["label_issues"]}
    hit = len(flagged & flipped)
    print(f"{name}: {len(flipped)} of {report['images']} labels flipped; {len(flagged)} flagged; precision "
          f"{hit / max(1, len(flagged)):.3f}, recall {hit / len(flipped):.3f} ({report['label_recipe']['model']}, "
          f"{epochs} epochs x 4 folds, out-of-fold accuracy {report['label_recipe']['out_of_fold_accuracy']:.1%}; "
          f"{time.time() - start:.0f} s)")


def near_copy(a, kind):
    img = Image.fromarray(a)
    if kind == "jpeg":
        buffer = io.BytesIO()
        img.save(buffer, "JPEG", quality=75)
        return Image.open(buffer).convert(img.mode)
    if kind == "resized":
        return img.resize((64, 64), Image.BICUBIC)
    shifted = np.zeros_like(a)
    shifted[:, 1:] = a[:, :-1]                                  # one pixel right, a black column enters
    return Image.fromarray(shifted)


def source_images(name, n=2000):
    """The first n training images of the CIFAR-10 npz (H, W, 3) or of mnist-5k (H, W), and labels."""
    if name == "cifar":
        return np.load(CIFAR)["x_train"][:n], np.load(CIFAR)["y_train"][:n]
    src = open_source(make_config({"data": "mnist-5k"}).data_config())
    return src.train_x[:n, 0].numpy(), src.train_y[:n].numpy()


def duplicates(name):
    x, y = source_images(name)
    with tempfile.TemporaryDirectory() as root:
        def save(img, split, label, name):
            folder = os.path.join(root, split, f"c{label}")
            os.makedirs(folder, exist_ok=True)
            img.save(os.path.join(folder, name))
            return os.path.join(folder, name)
        originals = [save(Image.fromarray(a), "train" if i < 1600 else "test", y[i], f"{i:04d}.png")
                     for i, a in enumerate(x)]
        planted = {}
        for i in range(40):   # copies of training images 0-39 in the test split
            kind = "exact" if i < 20 else ("jpeg", "resized", "shift")[i % 3]
            copy = Image.fromarray(x[i]) if kind == "exact" else near_copy(x[i], kind)
            planted[frozenset((originals[i], save(copy, "test", y[i], f"copy{i:02d}.png")))] = kind
        start = time.time()
        report = audit(f"folder:{root}", out=os.path.join(root, "audit"), labels=False, quiet=True)
        found = {frozenset((d["a"]["file"], d["b"]["file"])): d for d in report["duplicates"]}
    hits = [p for p in planted if p in found]
    false = [sorted(os.path.relpath(f, root) for f in p) for p in found if p not in planted]
    leaks = sum(found[p]["leak"] for p in hits)
    print(f"duplicates ({name}): {len(hits)} of 40 planted pairs found ({sum(planted[p] == 'exact' for p in hits)} "
          f"of 20 exact, {sum(planted[p] != 'exact' for p in hits)} of 20 near), {leaks} reported as leaks; "
          f"{len(false)} pairs not planted among {len(originals)} source images ({time.time() - start:.0f} s): {false}")


def outliers():
    """20 uniform-noise images planted among 4,125 mnist-5k images; 2 folds of 3 epochs."""
    from cnnlab.evaluation import audit as A

    data = load_data(make_config({"data": "mnist-5k", "train_samples": 3000, "val_samples": 375,
                                  "test_samples": 750}).data_config())
    x, y = data.train
    g = torch.Generator().manual_seed(1)
    planted = set(torch.randperm(len(y), generator=g)[:20].tolist())
    x = x.clone()
    x[sorted(planted)] = torch.randint(0, 256, (20, *x.shape[1:]), generator=g, dtype=torch.uint8)
    data.train = (x, y)
    start = time.time()
    with tempfile.TemporaryDirectory() as out:
        report = audit(data, out=out, folds=2, epochs=3, quiet=True)
    flagged = {r["index"] for r in report["outliers"] if r["split"] == "train"}
    real = [r["distance"] for r in report["outliers"] if (r["split"], r["index"]) not in {("train", i) for i in planted}]
    hit = len(flagged & planted)
    print(f"outliers: 20 noise images among {report['images']}; {len(report['outliers'])} flagged, {hit} of them "
          f"planted (recall {hit / 20:.2f}, precision {hit / max(1, len(report['outliers'])):.2f}); real images "
          f"flagged at distances {real}; out-of-fold accuracy {report['label_recipe']['out_of_fold_accuracy']:.1%} "
          f"({time.time() - start:.0f} s)")


def temperature():
    from cnnlab.evaluation.results import evaluate_model, load_trained, run_data

    with tempfile.TemporaryDirectory() as out:
        result = cnnlab.train(data="mnist-5k", model="mnist_cnn", epochs=30, train_samples=1000, lr=3e-3,
                              label_smoothing=0.0, calibrate=True, report=False, out=os.path.join(out, "run"),
                              quiet=True)
        model, run_dir = load_trained(result.run_dir)
        data = run_data(model, run_dir)
        after = evaluate_model(model, data)
        model.temperature = 1.0
        before = evaluate_model(model, data)
    print(f"temperature: T = {result.summary['temperature']:.3f}; test ECE {before['ece']:.2%} before, "
          f"{after['ece']:.2%} after; test NLL {before['loss']:.4f} -> {after['loss']:.4f}; accuracy "
          f"{before['accuracy']:.2%} both")


PARTS = {"labels-mnist": lambda: labels("mnist-5k", 3), "labels-cifar": lambda: labels(f"npz:{CIFAR}", 4),
         "duplicates": lambda: duplicates("cifar"), "duplicates-mnist": lambda: duplicates("mnist"),
         "outliers": outliers, "temperature": temperature}

if __name__ == "__main__":
    torch.set_num_threads(2)
    print(f"machine: {os.cpu_count()} CPUs, torch {torch.__version__}")
    for part in sys.argv[1:] or PARTS:
        PARTS[part]()
