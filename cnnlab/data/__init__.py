"""Datasets by name: `load_data(data_cfg)` turns a `--data` string into train/val/test tensors
with class names and the Preprocess a model trained on them expects. Sources are found only
through the registry (registry.py); `cnnlab datasets` lists it.
Notes and warnings go through errors.note: stderr (stdout carries results only), rank 0 only."""
from dataclasses import dataclass, field

import torch

from ..config import fixed_normalization
from ..errors import UsageError, note
# The builders register themselves on import, in the order `cnnlab datasets` lists them.
from . import sources, folder, synthetic  # noqa: F401
from . import arrays  # noqa: F401,E402  (memory:ID, data handed to cnnlab.train as arrays or a Dataset)
from . import csvsource  # noqa: F401,E402  (csv:FILE, a labels file of image paths)
from .fixes import apply_fix_list
from .images import center_crop, fit
from .photos import stored_size
from .preprocess import Preprocess
from .registry import Source, datasets, declared_shape, open_source, register_dataset, resolve_name  # noqa: F401
from .splits import make_splits, match_splits, read_splits  # noqa: F401


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
    streamed: bool = False    # the splits stay memory-mapped from the disk cache (data/stream.py)
    disk_bytes: int = 0       # the disk cache's entries behind this data (0: not from the disk cache)
    resize: str = "squash"    # how images of another size became squares (images.FIT)
    input_size: int = 0       # crop: the network's input side; the training images are stored larger

    @property
    def shape(self):
        """The network's input (C, H, W); crop's training images are stored larger (photos.py)."""
        c, h, w = self.train[0].shape[1:]
        return (c, self.input_size, self.input_size) if self.input_size else (c, h, w)

    @property
    def preprocess(self):
        """What a model trained on this data expects of its inputs (saved in its checkpoints)."""
        c, size = self.shape[0], self.shape[1]
        resize_size = self.train[0].shape[2] if self.input_size else 0
        return Preprocess(channels=c, image_size=size, mean=self.mean, std=self.std, resize=self.resize,
                          resize_size=resize_size)

    def nbytes(self):
        return sum(part[0].numel() + part[1].numel() * 8 for part in (self.train, self.val, self.test))

    def residence(self):
        """Where the images are, for the settings block: memory used, the budget, the disk cache."""
        from .stream import memory_budget

        if not self.disk_bytes:
            return f"{self.nbytes() / 2**20:.1f} MiB in memory"
        disk = f"cache {self.disk_bytes / 2**30:.2f} GiB on disk"
        if not self.streamed:
            return f"{self.nbytes() / 2**20:.1f} MiB in memory, budget {memory_budget() / 2**30:.1f} GiB; {disk}"
        labels = sum(part[1].numel() * 8 for part in (self.train, self.val, self.test))
        return (f"streamed from disk: {labels / 2**20:.1f} MiB of labels and two batches in memory, "
                f"{self.nbytes() / 2**30:.2f} GiB of images, budget {memory_budget() / 2**30:.1f} GiB; {disk}")


def check_data_name(name):
    resolve_name(name)


def channel_stats(x, mapped=False):
    """Per-channel mean and std of uint8 images, as fractions of 255 (from the training split only),
    from exact integer sums read in chunks (a streamed split is never held as floats; `mapped`: x is
    memory-mapped from the disk cache, whose pages are let go as they are read)."""
    from .stream import channel_sums

    total, squares, n = (v.double() if torch.is_tensor(v) else v for v in channel_sums(x, mapped))
    mean = total / n
    var = (squares - total * mean) / max(n - 1, 1)          # unbiased, as torch.std
    return (mean / 255).tolist(), (var.clamp_min(0).sqrt() / 255).clamp_min(1e-3).tolist()


def normalization(setting, train_x, mapped=False):
    """(mean, std) per channel: the training split's own (`dataset`), or the fixed values asked for."""
    fixed = fixed_normalization(setting)
    if fixed is None:
        return channel_stats(train_x, mapped)
    channels = train_x.shape[1]
    mean, std = fixed
    if len(mean) == 1:
        return mean * channels, std * channels
    if len(mean) != channels:
        raise UsageError(f"--normalize {setting} gives {len(mean)} means and stds; the images have {channels} "
                         f"channel(s): give one pair for all, or {channels} means then {channels} stds.")
    return mean, std


def load_data(cfg, splits=None):
    """Decode the source, cut or reuse the splits, and compute the normalisation statistics.
    `cfg`: a DataConfig (TrainConfig.data_config() gives one). `splits`: a run's saved splits
    (read_splits(run_dir)), found again in the data as it is now, or refused if it changed."""
    src = open_source(cfg)
    if cfg.class_names:
        if len(cfg.class_names) != len(src.classes):
            raise UsageError(f"--class-names gives {len(cfg.class_names)} names for {len(src.classes)} classes.")
        src.classes = list(cfg.class_names)
    if cfg.fix_list:   # before --classes: the list's pool rows index the whole source
        src = apply_fix_list(src, cfg.fix_list)
    if cfg.classes:
        src = sources.select_classes(src, cfg.classes)
    if len(torch.unique(src.train_y)) < 2:
        raise UsageError(f"'{cfg.data}' has fewer than 2 classes in its training data.")
    if splits:
        splits = match_splits(splits, src, cfg.data)
    else:
        splits = csvsource.named_val_splits(src, cfg) if src.val_rows is not None else make_splits(src, cfg)
    policy, size, stored = fitting(cfg, src)
    parts, streamed, disk_bytes = pick_splits(src, splits, cfg, policy, size, stored)
    mean, std = normalization(cfg.normalize, parts["train"][0], streamed)
    data = Data(name=cfg.data, classes=list(src.classes), **parts, mean=mean, std=std, flip_ok=src.flip_ok,
                splits=splits, files=src.files, streamed=streamed, disk_bytes=disk_bytes,
                resize=policy, input_size=size if stored != size else 0)
    warn_missing_classes(data, ranges=bool(cfg.split_ranges))
    warn_small_splits(data)
    return data


def pick_splits(src, splits, cfg, policy, size, stored):
    """({split: (x, y)}, streamed, bytes on disk): each split's rows of its pool, fitted by `policy`
    to the `stored` side, gathered into memory or, for a pool in the disk cache streamed per
    --in-memory, once into a memory-mapped cache entry of its own. With crop, training keeps the
    larger stored squares (a random-resized crop is cut from each at every step); validation and
    test keep their centres at the input side `size`, cut once here."""
    from .stream import split_on_disk, stream_splits

    pools = {"train": (src.train_x, src.train_y), "test": (src.test_x, src.test_y)}
    where = {"train": "train", "val": "train", "test": splits["test_pool"]}
    rows = {split: torch.as_tensor(splits[split], dtype=torch.int64) for split in where}
    shape = pools["train"][0].shape[1:]
    image_bytes = shape[0] * (stored ** 2 if stored else shape[1] * shape[2])
    streamed = stream_splits(cfg.in_memory, sum(map(len, rows.values())) * image_bytes, cfg.data, bool(src.cache))
    parts, disk_bytes = {}, sum(entry.nbytes for entry in src.cache.values())
    for split, pool in where.items():
        x, y = pools[pool]
        crop = size if split != "train" and stored != size else 0
        if streamed:   # decoded at the stored side already: nothing to resize
            x, entry = split_on_disk(x, rows[split], src.cache[pool], f"{split} split", crop=crop)
            disk_bytes += entry.nbytes
        else:
            x = fit(x[rows[split]], stored, policy)
            x = center_crop(x, crop).contiguous() if crop else x
        parts[split] = (x, y[rows[split]])
    return parts, streamed, disk_bytes


def fitting(cfg, src):
    """(resize policy, input side, stored side) of the data. A source of files fitted its images
    when decoding them (src.resize); tensor sources are fitted here by --resize, whose `auto` keeps
    them squashed as they always were (MNIST, CIFAR: small images, no photo pipeline)."""
    if src.resize:
        stored = src.train_x.shape[-1]
        return src.resize, src.input_size or stored, stored
    policy = "squash" if cfg.resize == "auto" else cfg.resize
    return policy, cfg.image_size, stored_size(policy, cfg.image_size, cfg.resize_size)


def absent_classes(y, classes):
    """The names of the classes that no label in `y` has."""
    counts = torch.bincount(y, minlength=len(classes)).tolist()
    return [c for c, n in zip(classes, counts) if n == 0]


# The held-out splits, with the flags that size them (for the warnings about them).
HELD_OUT = (("val", "--val-fraction/--val-samples"), ("test", "--test-fraction/--test-samples"))


def warn_missing_classes(data, ranges=False):
    """A class with no training images cannot be learnt, and one with no validation or test images
    is never measured there; say so (stderr) rather than let a per-class table or a stopping rule
    quietly ignore it."""
    untaught = absent_classes(data.train[1], data.classes)
    if untaught:
        note(f"warning: no training images for class {name_list(untaught)}; the model cannot learn "
             f"{'it' if len(untaught) == 1 else 'them'} "
             f"({missing_class_hint(ranges, 'a smaller --val-fraction/--test-fraction')}).")
    for split, flag in HELD_OUT:
        y = getattr(data, split)[1]
        if len(y) == 0:
            continue  # the split is off as a whole (e.g. --val-fraction 0): nothing to warn about
        missing = absent_classes(y, data.classes)
        if missing:
            note(f"warning: no {split} images for class {name_list(missing)}; {'its' if len(missing) == 1 else 'their'} "
                 f"{split} accuracy is not measured ({missing_class_hint(ranges, f'a larger {flag}')}).")


def missing_class_hint(ranges, flags):
    """The hint of warn_missing_classes: --split-ranges, when given, decides the splits alone."""
    if ranges:
        return "--split-ranges did that: ranges holding every class, or --split-ranges '' with sample sizes, fix it"
    return f"more data or {flags} fixes it"


def name_list(names):
    return ", ".join(repr(c) for c in names[:5]) + (f" and {len(names) - 5} more" if len(names) > 5 else "")


# Below this many images a split's accuracy moves by 5 points or more per image: too few to report
# a number on without saying so.
FEW_IMAGES = 20


def warn_small_splits(data):
    """A validation or test split of a handful of images gives accuracies like 100% on 1 image:
    say how many images a reported number stands on (stderr)."""
    for split, flag in HELD_OUT:
        n = len(getattr(data, split)[1])
        if 0 < n < FEW_IMAGES:
            effect = (f"each one moves its accuracy by {100 / n:.0f} points" if n > 1
                      else "its accuracy can only be 0% or 100%")
            note(f"warning: the {split} split holds only {n} image{'s' if n > 1 else ''}, so {effect}; "
                 f"more data or a larger {flag} gives a number to trust.")


def default_augment(data, requested):
    """`auto`: crop+flip for photos, crop only for digits and other sets where a mirror changes the class."""
    if requested != "auto":
        if "flip" in requested and not data.flip_ok:
            note(f"note: flipping {data.name} images makes invalid examples (mirrored digits); using it as asked.")
        return requested
    return "crop+flip" if data.flip_ok else "crop"
