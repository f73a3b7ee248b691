"""`folder:PATH`: class subfolders of image files, decoded once in parallel and cached.

Layouts: PATH/<class>/... (cnnlab cuts the splits), or PATH/train/<class>/... with PATH/test/
(or PATH/val/) beside it as the official held-out split.
"""
import os
from collections import Counter
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch
from tqdm import tqdm

from ..errors import CnnlabError, UsageError, note, on_main_rank
from .cache import cached_arrays, files_key
from .images import GRAY_MODES, IMAGE_SUFFIXES, load_array
from .registry import Source, register_dataset

# In the decoded arrays' cache key: bumped when decoding changes (2: images.resize, torch's
# kernel, replaced PIL's), so an old entry is never mixed with new decodes or predictions.
DECODER = 2


def list_images(root):
    """Image files below `root`, sorted; directory symlinks are not followed (no loops)."""
    found = []
    for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
        dirnames.sort()
        found += [os.path.join(dirpath, f) for f in sorted(filenames) if f.lower().endswith(IMAGE_SUFFIXES)]
    return found


def scan_classes(root):
    """{class name: [files]} for the class subfolders of `root`; empty classes are dropped with a warning."""
    if not os.path.isdir(root):
        raise UsageError(f"image folder not found: {root}")
    names = sorted(d for d in os.listdir(root) if os.path.isdir(os.path.join(root, d)) and not d.startswith("."))
    classes = {}
    for name in names:
        files = list_images(os.path.join(root, name))
        if files:
            classes[name] = files
        else:
            note(f"warning: class folder '{os.path.join(root, name)}' holds no images; it is left out.")
    if len(classes) < 2:
        raise CnnlabError(f"{root}: found {len(classes)} class folder(s) with images; a classifier needs "
                          "at least 2 (one subfolder of images per class).")
    return classes


def split_folders(root):
    """(train root, test root or None)."""
    train = os.path.join(root, "train")
    for held_out in ("test", "val"):
        if os.path.isdir(train) and os.path.isdir(os.path.join(root, held_out)):
            return train, os.path.join(root, held_out)
    return root, None


def parallel_map(fn, items, desc, workers):
    """[fn(item) for item in items] on a thread pool (PIL releases the GIL while decoding), with a
    progress bar on stderr when it is a terminal (rank 0's only): a first load of 60,000 files
    takes a minute."""
    with ThreadPoolExecutor(workers) as pool:
        return list(tqdm(pool.map(fn, items), total=len(items), desc=desc, unit="img",
                         disable=None if on_main_rank() else True, leave=False, dynamic_ncols=True))


def choose_format(files, image_size):
    """(channels, size): grayscale only if every image is; size from the data unless given."""
    from PIL import Image

    def header(path):
        try:
            with Image.open(path) as img:
                return img.mode in GRAY_MODES, img.size   # one header read per file
        except Exception:
            return True, None  # unreadable: decided (and reported) when decoded
    heads = parallel_map(header, files, "reading headers", 8)
    channels = 1 if all(g for g, _ in heads) else 3
    if image_size:
        return channels, image_size
    sizes = Counter(s for _, s in heads if s)
    (w, h), _ = sizes.most_common(1)[0] if sizes else ((32, 32), 0)
    return channels, min(max(min(w, h), 8), 128)


def image_format(files, image_size, root):
    """choose_format, cached by the file list: reading 60,000 headers again costs ~10 s per load.
    A miss means a first load, which is announced: it takes a minute for 60,000 files."""
    def make():
        note(f"first load of {len(files):,} images under {root}: reading headers, then decoding them once "
             "(cached for next time)")
        return {"format": np.array(choose_format(files, image_size))}
    channels, size = cached_arrays(files_key(f"format-{image_size}", files), make, kind="formats")["format"]
    return int(channels), int(size)


def decode_all(files, channels, size, where=""):
    """Decode every file in parallel -> (uint8 array (N, C, S, S), ok mask, bad messages). Bad files
    are recorded, not raised, so the cache entry serves both --on-bad-image modes."""
    def one(path):
        try:
            return load_array(path, channels, size), None
        except CnnlabError as e:
            return None, str(e)
    note(f"decoding {len(files):,} images{where} at {channels}x{size}x{size}")
    results = parallel_map(one, files, "decoding", min(32, (os.cpu_count() or 1) * 4))
    bad = [msg for _, msg in results if msg]
    ok = np.array([a is not None for a, _ in results], dtype=bool)
    arrays = [a for a, _ in results if a is not None]
    x = np.stack(arrays) if arrays else np.zeros((0, channels, size, size), np.uint8)
    return x, ok, bad


def load_pool(class_files, classes, channels, size, on_bad_image, where=""):
    files = [f for c in classes for f in class_files.get(c, [])]
    labels = np.array([i for i, c in enumerate(classes) for _ in class_files.get(c, [])], dtype=np.int64)
    def decode():
        x, ok, bad = decode_all(files, channels, size, where)
        return {"x": x, "ok": ok, "bad": np.array(bad, dtype=str)}
    arrays = cached_arrays(files_key(f"{channels}x{size}-decoder{DECODER}", files), decode, kind="folders")
    x, ok, bad = arrays["x"], arrays["ok"], [str(b) for b in arrays["bad"]]
    if bad and on_bad_image == "error":
        more = f" (and {len(bad) - 1} more bad files)" if len(bad) > 1 else ""
        raise CnnlabError(f"{bad[0]}{more}. Remove it, or pass --on-bad-image skip.")
    kept = [f for f, good in zip(files, ok) if good]
    return torch.from_numpy(x), torch.from_numpy(labels[ok]), kept, bad


@register_dataset("folder", arg="PATH", claims=os.path.isdir, shape="--image-size", classes="folders",
                  sizes="from files", description="class subfolders of images; train/ + test/ (or val/) "
                                                  "subfolders are the splits")
def folder(path, cfg):
    """The images under `path` (cfg: a DataConfig: image_size, on_bad_image)."""
    train_root, test_root = split_folders(path)
    train_classes = scan_classes(train_root)
    classes = list(train_classes)
    test_classes = scan_classes(test_root) if test_root else {}
    extra = sorted(set(test_classes) - set(classes))
    if extra:
        raise CnnlabError(f"{test_root} has class folders not in {train_root}: {', '.join(extra)}.")
    all_files = [f for fs in list(train_classes.values()) + list(test_classes.values()) for f in fs]
    channels, size = image_format(all_files, cfg.image_size, path)
    train_x, train_y, train_files, bad = load_pool(train_classes, classes, channels, size, cfg.on_bad_image,
                                                   f" in {train_root}")
    src = Source(train_x, train_y, classes=classes, files={"train": train_files})
    if test_root:
        src.test_x, src.test_y, src.files["test"], bad_test = load_pool(
            test_classes, classes, channels, size, cfg.on_bad_image, f" in {test_root}")
        bad += bad_test
    if bad:
        note(f"warning: skipped {len(bad)} unreadable image(s); the list is in bad_images.txt in the run folder.")
    src.files["bad"] = bad
    return src
