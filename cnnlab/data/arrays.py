"""Data handed over as Python objects: `cnnlab.train(data=(x, y[, x_test, y_test]))` with numpy
arrays or tensors, or `data=dataset` / `data=(train_dataset, test_dataset)` with torch Datasets.

The objects become an ordinary Source (uint8 (N, C, H, W) images, int64 labels) kept in this
process under `memory:ID`, ID a hash of the pixels and labels; `memory:ID` is the run's `data`
setting, so splits, augmentation, the report, resume and evaluate work as with a named dataset.
Handing the same arrays over again (to resume) gives the same ID; a new process that was not
handed them says so in one line.
"""
import dataclasses
import hashlib

import numpy as np
import torch

from ..errors import UsageError
from .registry import Source, register_dataset

MEMORY = {}   # ID -> Source


def memory_name(data, classes=None):
    """`memory:ID` for arrays or Datasets (kept in MEMORY); `classes`: names for the labels 0..K-1."""
    source = to_source(data)
    if classes:   # the names say how many classes there are, also when a split lacks the last ones
        if len(classes) < len(source.classes):
            raise UsageError(f"class_names gives {len(classes)} names, but the labels go up to "
                             f"{len(source.classes) - 1}: give one name per class 0..K-1.")
        source.classes = [str(c) for c in classes]
    key = fingerprint(source)
    MEMORY[key] = source
    return f"memory:{key}"


def is_in_memory_data(data):
    """True for what memory_name takes: a Dataset, or a tuple/list of arrays or Datasets."""
    parts = data if isinstance(data, (tuple, list)) else [data]
    return bool(parts) and all(isinstance(p, torch.utils.data.Dataset) or hasattr(p, "__array__") or torch.is_tensor(p)
                               for p in parts)


def to_source(data):
    """(x, y), (x, y, x_test, y_test), a Dataset or (train_dataset, test_dataset) -> Source."""
    parts = list(data) if isinstance(data, (tuple, list)) else [data]
    if all(isinstance(p, torch.utils.data.Dataset) for p in parts) and len(parts) in (1, 2):
        pools = [dataset_arrays(p, name) for p, name in zip(parts, ("train", "test"))]
        source = arrays_source(*[a for pool in pools for a in pool])
        names = getattr(parts[0], "classes", None)
        if names is not None and len(names) == len(source.classes):
            source.classes = [str(c) for c in names]
        return source
    if len(parts) not in (2, 4):
        raise UsageError(f"data= takes (x, y) or (x, y, x_test, y_test) arrays, a torch Dataset or (train, test) "
                         f"Datasets; got {len(parts)} item(s).")
    return arrays_source(*parts)


def arrays_source(x, y, x_test=None, y_test=None):
    train_x, train_y = images(x, "x"), labels(y, "y", len(x))
    test_x = images(x_test, "x_test") if x_test is not None else None
    test_y = labels(y_test, "y_test", len(x_test)) if x_test is not None else None
    if test_x is not None and test_x.shape[1:] != train_x.shape[1:]:
        raise UsageError(f"x_test holds {shape(test_x)} images but x holds {shape(train_x)}: they must match.")
    k = 1 + int(max(train_y.max(), test_y.max() if test_y is not None and len(test_y) else 0))
    # grayscale is taken for digits or drawings (never mirrored), colour for photos (mirroring is fine)
    return Source(train_x, train_y, test_x, test_y, classes=[str(i) for i in range(k)], flip_ok=train_x.shape[1] == 3)


def images(x, name):
    """Arrays (N, H, W), (N, C, H, W) or (N, H, W, C), C 1 or 3, uint8 or float in [0, 1] (or
    0-255) -> uint8 (N, C, H, W)."""
    x = torch.as_tensor(np.asarray(x)) if not torch.is_tensor(x) else x.detach().cpu()
    if x.ndim == 3:
        x = x[:, None]                                            # (N, H, W) -> (N, 1, H, W)
    if x.ndim != 4:
        raise UsageError(f"data {name} has shape {tuple(x.shape)}: images must be (N, H, W), (N, C, H, W) or "
                         "(N, H, W, C).")
    if x.shape[1] not in (1, 3) and x.shape[3] in (1, 3):
        x = x.permute(0, 3, 1, 2)                                 # NHWC -> NCHW
    if x.shape[1] not in (1, 3):
        raise UsageError(f"data {name} has shape {tuple(x.shape)}: cnnlab takes 1 (grayscale) or 3 (RGB) channels.")
    return to_uint8(x, name).contiguous()


def to_uint8(x, name):
    """Pixels as uint8. Floats in [0, 1] (ToTensor's range) are scaled by 255; cnnlab computes the
    normalisation itself, so already-normalised values (negative, or above 255) are refused."""
    if x.dtype == torch.uint8:
        return x
    if x.dtype == torch.bool or len(x) == 0:
        raise UsageError(f"data {name} must hold pixel values (uint8, or floats in [0, 1]), got {x.dtype} "
                         f"{'(empty)' if len(x) == 0 else ''}.")
    low, high = float(x.min()), float(x.max())
    if not (np.isfinite(low) and np.isfinite(high)) or low < 0 or high > 255:
        raise UsageError(f"data {name} ranges from {low:g} to {high:g}: give raw pixels (uint8 0-255, or floats in "
                         "[0, 1]); cnnlab normalises them itself, so drop any Normalize transform.")
    scale = 255 if x.is_floating_point() and high <= 1 else 1
    return (x.double() * scale).round().to(torch.uint8)


def labels(y, name, n):
    """Class indices 0..K-1 -> int64 (N,)."""
    y = torch.as_tensor(np.asarray(y)) if not torch.is_tensor(y) else y.detach().cpu()
    if y.ndim != 1 or len(y) != n:
        raise UsageError(f"data {name} has shape {tuple(y.shape)}: labels must be one class index per image ({n},).")
    if (y.is_floating_point() and not bool((y == y.round()).all())) or y.dtype == torch.bool:
        raise UsageError(f"data {name} must hold whole class indices 0..K-1, got {y.dtype} values.")
    if n and int(y.min()) < 0:
        raise UsageError(f"data {name} has label {int(y.min())}: labels are class indices 0..K-1.")
    return y.to(torch.int64)


def dataset_arrays(dataset, pool):
    """A Dataset of (image, label) items -> (images, labels); images as tensors, arrays or PIL images."""
    if len(dataset) == 0:
        raise UsageError(f"the {pool} Dataset is empty.")
    xs, ys = [], []
    for i in range(len(dataset)):
        item = dataset[i]
        if not isinstance(item, (tuple, list)) or len(item) != 2:
            raise UsageError(f"the {pool} Dataset's item {i} is not an (image, label) pair.")
        x, y = item
        x = np.asarray(x) if not torch.is_tensor(x) else x   # a PIL image -> (H, W[, C])
        xs.append(torch.as_tensor(x)[None] if torch.as_tensor(x).ndim == 2 else torch.as_tensor(x))
        ys.append(int(y))
    first = xs[0].shape
    bad = next((i for i, x in enumerate(xs) if x.shape != first), None)
    if bad is not None:
        raise UsageError(f"the {pool} Dataset's images differ in shape ({tuple(first)} and {tuple(xs[bad].shape)} at "
                         f"item {bad}): resize them to one size in its transform.")
    return torch.stack(xs), torch.tensor(ys)


def fingerprint(source):
    """12 hex digits of BLAKE2 over the pixels, labels and class names: the same arrays, the same ID."""
    h = hashlib.blake2b(digest_size=6)
    for t in (source.train_x, source.train_y, source.test_x, source.test_y):
        if t is not None:
            h.update(str(tuple(t.shape)).encode())
            h.update(t.contiguous().numpy().tobytes())
    h.update("\n".join(source.classes).encode())
    return h.hexdigest()


def shape(x):
    return "x".join(map(str, x.shape[1:]))


@register_dataset("memory", description="arrays or Datasets handed to cnnlab.train(data=...) in this process",
                  arg="ID")
def memory(key, cfg):
    if key not in MEMORY:
        raise UsageError(f"data 'memory:{key}' was handed to cnnlab.train(data=...) in another Python process: pass "
                         "the same arrays or Dataset again as data=... (to resume, evaluate or report on the run).")
    source = MEMORY[key]
    if source.train_x.shape[2] != source.train_x.shape[3] and not cfg.image_size:
        raise UsageError(f"the images are {shape(source.train_x)}, and cnnlab trains on square images: pass "
                         "image_size=N to resize them to N x N.")
    return dataclasses.replace(source)   # load_data renames classes in place: the kept one stays as given
