"""`cnnlab data check DATA`: what is in a dataset before training on it."""
import hashlib
from collections import Counter

import torch

from ..config import DataConfig
from . import load_data
from .images import center_crop


def image_modes(files):
    """Counter of (mode, WxH) from the file headers."""
    from PIL import Image

    seen = Counter()
    for f in files:
        try:
            with Image.open(f) as img:
                seen[(img.mode, f"{img.size[0]}x{img.size[1]}")] += 1
        except Exception:
            pass
    return seen


def duplicate_groups(data):
    """[[(split, position), ...]] of the images whose exact pixels occur more than once, compared at
    the input side (under --resize crop the training rows are kept larger: their centres are cut)."""
    side = min(getattr(data, split)[0].shape[-1] for split in ("train", "val", "test") if len(getattr(data, split)[1]))
    where = {}
    for split in ("train", "val", "test"):
        for i, img in enumerate(getattr(data, split)[0]):
            img = center_crop(img[None], side)[0] if img.shape[-1] != side else img
            where.setdefault(hashlib.sha1(img.contiguous().numpy().tobytes()).hexdigest(), []).append((split, i))
    return [group for group in where.values() if len(group) > 1]


def image_name(data, split, i):
    """A split's i-th image as the person knows it: its file, or split[i] for tensor datasets."""
    pool = data.splits.get("test_pool", "test") if split == "test" else "train"
    files, rows = data.files.get(pool), data.splits.get(split)
    return files[rows[i]] if files and rows is not None else f"{split}[{i}]"


def print_duplicates(data, shown=5):
    """Exact copies across splits (leaks) and copies with different labels (conflicts), the first
    `shown` of each by name."""
    groups = duplicate_groups(data)
    leaks = [g for g in groups if len({split for split, _ in g}) > 1]
    label = lambda split, i: data.classes[int(getattr(data, split)[1][i])]
    conflicts = [g for g in groups if len({label(*member) for member in g}) > 1]
    print(f"exact duplicates across splits: {len(leaks)}" + ("  (warning: leakage between splits)" if leaks else ""))
    for group in leaks[:shown]:
        print("  " + " = ".join(f"{image_name(data, *m)} ({m[0]})" for m in group))
    if conflicts:
        print(f"warning: {len(conflicts)} image(s) appear with different labels")
        for group in conflicts[:shown]:
            print("  " + " = ".join(f"{image_name(data, *m)} ({label(*m)})" for m in group))


def check(name, data_dir="data", cache_dir="", in_memory="auto"):
    data = load_data(DataConfig(data=name, data_dir=data_dir, on_bad_image="skip", cache_dir=cache_dir,
                                in_memory=in_memory))
    k = len(data.classes)
    print(f"{name}: {k} classes, image {'x'.join(map(str, data.shape))} as decoded, "
          f"splits train/val/test {len(data.train[1])}/{len(data.val[1])}/{len(data.test[1])}")
    counts = {s: torch.bincount(getattr(data, s)[1], minlength=k).tolist() for s in ("train", "val", "test")}
    width = max(5, max(len(c) for c in data.classes))
    print(f"{'class':<{width}}  {'train':>7}  {'val':>7}  {'test':>7}")
    for i, c in enumerate(data.classes):
        print(f"{c:<{width}}  {counts['train'][i]:>7}  {counts['val'][i]:>7}  {counts['test'][i]:>7}")
    files = [f for key in ("train", "test") for f in data.files.get(key, [])]
    if files:
        modes = image_modes(files)
        print("file modes and sizes: " + ", ".join(f"{m} {s}: {n}" for (m, s), n in modes.most_common(8)))
    bad = data.files.get("bad", [])
    for msg in bad:
        print(f"unreadable: {msg}")
    print_duplicates(data)
    train = [n for n in counts["train"] if n]
    if train and max(train) > 3 * min(train):
        print(f"warning: strong class imbalance: largest class {max(train)} vs smallest {min(train)} training images")
    print(f"unreadable files: {len(bad)}")
    return 1 if bad else 0
