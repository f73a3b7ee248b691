"""The dataset registry, like the model registry (models/__init__.py): one decorated builder per
source, found by its `--data` name; nothing else knows the list.

    @register_dataset("mnist-5k", description="...", shape="1x28x28", classes=10, sizes="5000 / -")
    def mnist_5k(cfg):                  # cfg: a DataConfig; returns a Source
        ...

A builder registered with `arg` takes the text after the colon, first: `npz:PATH` calls
npz(PATH, cfg). The builders live in sources.py, folder.py and synthetic.py, registered when
cnnlab.data is imported, in the order `cnnlab datasets` lists them.
"""
import os
from dataclasses import dataclass, field
from typing import Callable

import torch

from ..errors import UsageError, unknown

REGISTRY = {}


@dataclass
class Source:
    """What a builder returns: uint8 images decoded into memory, a training pool and, when the data
    has one, an official test pool, plus class names."""
    train_x: torch.Tensor            # (N, C, H, W) uint8
    train_y: torch.Tensor            # (N,) int64
    test_x: torch.Tensor = None      # None: no official test split, cnnlab cuts one
    test_y: torch.Tensor = None
    classes: list = field(default_factory=list)
    flip_ok: bool = True             # mirror images are still valid examples (never for digits)
    files: dict = field(default_factory=dict)   # pool -> file list, for folder sources
    # pool -> one (path relative to the dataset folder, size in bytes) per row, for sources whose
    # rows are files: splits.json names its images by them, so a changed folder is noticed
    ids: dict = field(default_factory=dict)
    # pool -> cache.Entry for pools memory-mapped from the disk cache (folder:, csv:): their splits
    # may be streamed from disk instead of loaded into memory (--in-memory)
    cache: dict = field(default_factory=dict)
    # rows of the training pool that the data itself names as the validation split (a CSV's split
    # column); None: cnnlab cuts the validation split
    val_rows: list = None
    # sources that decode files fit them to a square themselves (photos.file_policy): the policy
    # used ("" for tensor sources: load_data applies --resize) and the input side when the images
    # are stored larger (crop: about 1.15x it), else 0
    resize: str = ""
    input_size: int = 0


@dataclass(frozen=True)
class Dataset:
    """A registered source and what `cnnlab datasets` says of it."""
    name: str
    build: Callable
    description: str
    shape: str = "from file"          # "CxHxW" when fixed
    classes: object = "from file"     # an int when fixed
    sizes: str = "from file"          # "train / test" image counts
    arg: str = ""                     # what follows "name:" (e.g. PATH); "" takes nothing
    arg_optional: bool = False        # `name` alone is valid too (synthetic)
    claims: Callable = None           # a bare --data path this source reads (a folder, a .npz file)

    @property
    def usage(self):
        """How it is written: mnist, npz:PATH, synthetic[:CxHxW:K:N]."""
        if not self.arg:
            return self.name
        return f"{self.name}[:{self.arg}]" if self.arg_optional else f"{self.name}:{self.arg}"

    def accepts(self, has_arg):
        return has_arg == bool(self.arg) or (self.arg_optional and bool(self.arg))

    def open(self, arg, cfg):
        return self.build(arg, cfg) if self.arg else self.build(cfg)


def register_dataset(name, **info):
    """Decorator: add a builder under `name`, with Dataset's fields (description, shape, classes,
    sizes, arg, arg_optional, claims) as keywords."""
    def wrap(fn):
        if name in REGISTRY:
            raise ValueError(f"dataset '{name}' registered twice")
        REGISTRY[name] = Dataset(name, fn, **info)
        return fn
    return wrap


def lookup(name):
    """(Dataset, its argument) for a --data name as registered, or None."""
    key, colon, arg = name.partition(":")
    found = REGISTRY.get(key)
    return (found, arg) if found and found.accepts(bool(colon)) else None


def path_source(name):
    """'folder', 'csv' or 'npz' for a --data name that is a path to the data; None for a named set."""
    found = lookup(name)
    return found[0].name if found and found[0].claims else None


def resolve_name(name):
    """`--data` as given -> a registered name: a bare path that a source claims (an existing folder,
    a .npz file) gets its prefix (folder:PATH, npz:PATH). Unknown names raise a UsageError with
    the closest one."""
    if lookup(name):
        return name
    for entry in REGISTRY.values():
        if entry.claims and entry.claims(name):
            return f"{entry.name}:{name}"
    if os.sep in name or name.lower().endswith(".npz"):
        raise UsageError(f"--data '{name}': no such folder or .npz file (and not a dataset name; "
                         "see `cnnlab datasets`).")
    raise unknown("dataset", name, [e.name if e.arg_optional else e.usage for e in REGISTRY.values()])


def open_source(cfg):
    """The Source that `cfg.data` names (cfg: a DataConfig)."""
    entry, arg = lookup(resolve_name(cfg.data))
    return entry.open(arg, cfg)


def declared_shape(name):
    """((C, H, W), classes) as registered, or None when only the data can tell (a file, an argument)."""
    found = lookup(name)
    if not found or found[1] or "x" not in found[0].shape or not isinstance(found[0].classes, int):
        return None
    return tuple(int(v) for v in found[0].shape.split("x")), found[0].classes


def datasets():
    """Every registered source, in registration order."""
    return list(REGISTRY.values())
