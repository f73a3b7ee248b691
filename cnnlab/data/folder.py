"""`folder:PATH`: class subfolders of image files, decoded once in parallel and cached.

Layouts: PATH/<class>/... (cnnlab cuts the splits), or PATH/train/<class>/... with PATH/test/
(or PATH/val/) beside it as the official held-out split.

Oddities are said, never passed over in silence (stderr, one line each):
- a class folder with no images, or none left readable after --on-bad-image skip, is left out;
- files with an image-like suffix cnnlab does not decode (.svg, .heic, .psd, camera raw ...) are
  counted, by suffix, in the same warning as unreadable images;
- a class folder that is a symlink to a folder outside the dataset is followed (symlink farms are a
  common way to build a dataset) with a warning naming its target: its images are trained on, and
  shown in the report's pictures;
- file and folder names are printed with control characters escaped (errors.printable).
"""
import os
from collections import Counter
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch
from tqdm import tqdm

from ..errors import CnnlabError, UsageError, note, on_main_rank, printable
from .cache import cached_arrays, files_key
from .images import GRAY_MODES, IMAGE_SUFFIXES, load_array
from .photos import file_policy, stored_size
from .registry import Source, register_dataset
from .sources import select_classes

# In the decoded arrays' cache key: bumped when decoding changes (2: images.resize, torch's
# kernel, replaced PIL's; 3: large JPEGs decoded at reduced scale, PIL's draft; 4: EXIF orientation,
# draft down to 2x, the resize policy in the key), so an old entry is never mixed with new decodes
# or predictions.
DECODER = 4

# Suffixes of pictures that are not rasters cnnlab decodes (vector drawings, formats Pillow does not
# read by default, layered editor files, camera raw): skipped, but counted in the skipped-files warning.
NOT_DECODED = (".svg", ".svgz", ".eps", ".ai", ".heic", ".heif", ".avif", ".jxl", ".jp2", ".psd", ".xcf",
               ".raw", ".dng", ".cr2", ".cr3", ".nef", ".arw", ".orf", ".rw2", ".ico", ".tga")


def list_images(root):
    """Image files below `root`, sorted; directory symlinks are not followed (no loops)."""
    return list_files(root)[0]


def list_files(root):
    """(image files, image-like files not decoded) below `root`, sorted, as list_images."""
    found, other = [], []
    for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
        dirnames.sort()
        for f in sorted(filenames):
            if f.lower().endswith(IMAGE_SUFFIXES):
                found.append(os.path.join(dirpath, f))
            elif f.lower().endswith(NOT_DECODED):
                other.append(os.path.join(dirpath, f))
    return found, other


def scan_classes(root, top):
    """({class name: [files]}, [image-like files not decoded]) for the class subfolders of `root`
    (`top`: the dataset folder, for the symlink check). Empty classes are dropped with a warning;
    class names are printable (a folder name's control characters escaped)."""
    if not os.path.isdir(root):
        raise UsageError(f"image folder not found: {printable(root)}")
    names = sorted(d for d in os.listdir(root) if os.path.isdir(os.path.join(root, d)) and not d.startswith("."))
    classes, other = {}, []
    for name in names:
        folder = os.path.join(root, name)
        warn_outside_link(folder, top)
        files, skipped = list_files(folder)
        other += skipped
        if files:
            classes[printable(name)] = files
        else:
            note(f"warning: class folder '{printable(folder)}' holds no images; it is left out.")
    if len(classes) < 2:
        raise CnnlabError(f"{printable(root)}: found {len(classes)} class folder(s) with images; a classifier needs "
                          "at least 2 (one subfolder of images per class).")
    return classes, other


def warn_outside_link(folder, top):
    """A class folder that links outside the dataset is used, and said (its images are trained on
    and appear in the report): a symlink farm is a normal way to build a dataset, a surprise is not."""
    if not os.path.islink(folder):
        return
    target, inside = os.path.realpath(folder), os.path.realpath(top)
    if os.path.commonpath([target, inside]) != inside:
        note(f"warning: class folder '{printable(folder)}' is a symlink to '{printable(target)}', outside the dataset; "
             "its images are used.")


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
    """(channels, size, typical shorter side): grayscale only if every image is; size from the
    data unless given; the median of the images' shorter sides (for --resize auto)."""
    from PIL import Image

    def header(path):
        try:
            with Image.open(path) as img:
                return img.mode in GRAY_MODES, img.size   # one header read per file
        except Exception:
            return True, None  # unreadable: decided (and reported) when decoded
    heads = parallel_map(header, files, "reading headers", 8)
    channels = 1 if all(g for g, _ in heads) else 3
    shorter = sorted(min(s) for _, s in heads if s)
    typical = shorter[len(shorter) // 2] if shorter else 0
    if image_size:
        return channels, image_size, typical
    sizes = Counter(s for _, s in heads if s)
    (w, h), _ = sizes.most_common(1)[0] if sizes else ((32, 32), 0)
    return channels, min(max(min(w, h), 8), 128), typical


def image_format(files, image_size, root):
    """choose_format, cached by the file list: reading 60,000 headers again costs ~10 s per load.
    A miss means a first load, which is announced: it takes a minute for 60,000 files."""
    def make():
        note(f"first load of {len(files):,} images under {printable(root)}: reading headers, then decoding them once "
             "(cached for next time)")
        return {"format": np.array(choose_format(files, image_size))}
    found = cached_arrays(files_key(f"format2-{image_size}", files), make, kind="formats")["format"]
    return tuple(int(v) for v in found)


def decode_all(files, channels, size, where="", policy="squash"):
    """Decode every file in parallel, fitted to size x size by `policy` -> (uint8 array (N, C, S, S),
    ok mask, bad messages). Bad files are recorded, not raised, so the cache entry serves both
    --on-bad-image modes."""
    def one(path):
        try:
            return load_array(path, channels, size, policy=policy), None
        except CnnlabError as e:
            return None, str(e)
    note(f"decoding {len(files):,} images{where} at {channels}x{size}x{size}")
    results = parallel_map(one, files, "decoding", min(32, (os.cpu_count() or 1) * 4))
    bad = [msg for _, msg in results if msg]
    ok = np.array([a is not None for a, _ in results], dtype=bool)
    arrays = [a for a, _ in results if a is not None]
    x = np.stack(arrays) if arrays else np.zeros((0, channels, size, size), np.uint8)
    return x, ok, bad


def load_pool(class_files, classes, channels, size, on_bad_image, where="", policy="squash"):
    files = [f for c in classes for f in class_files.get(c, [])]
    labels = np.array([i for i, c in enumerate(classes) for _ in class_files.get(c, [])], dtype=np.int64)
    def decode():
        x, ok, bad = decode_all(files, channels, size, where, policy)
        return {"x": x, "ok": ok, "bad": np.array(bad, dtype=str)}
    arrays = cached_arrays(files_key(f"{channels}x{size}-{policy}-decoder{DECODER}", files), decode, kind="folders")
    # printable here, not when decoding: an entry cached before names were escaped is escaped too
    x, ok, bad = arrays["x"], arrays["ok"], [printable(b) for b in arrays["bad"]]
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
    train_classes, not_decoded = scan_classes(train_root, path)
    classes = list(train_classes)
    test_classes, not_decoded_test = scan_classes(test_root, path) if test_root else ({}, [])
    extra = sorted(set(test_classes) - set(classes))
    if extra:
        raise CnnlabError(f"{printable(test_root)} has class folders not in {printable(train_root)}: {', '.join(extra)}.")
    all_files = [f for fs in list(train_classes.values()) + list(test_classes.values()) for f in fs]
    channels, size, typical = image_format(all_files, cfg.image_size, path)
    policy = file_policy(cfg.resize, size, typical)
    stored = stored_size(policy, size, cfg.resize_size)   # crop: decoded once at ~1.15x the input side (photos.py)
    train_x, train_y, train_files, bad = load_pool(train_classes, classes, channels, stored, cfg.on_bad_image,
                                                   f" in {printable(train_root)}", policy)
    src = Source(train_x, train_y, classes=classes, files={"train": train_files}, resize=policy, input_size=size)
    if test_root:
        src.test_x, src.test_y, src.files["test"], bad_test = load_pool(
            test_classes, classes, channels, stored, cfg.on_bad_image, f" in {printable(test_root)}", policy)
        bad += bad_test
    warn_skipped(bad, not_decoded + not_decoded_test)
    src.files["bad"] = bad
    src.ids = {pool: file_ids(src.files[pool], path) for pool in ("train", "test") if pool in src.files}
    return drop_unlearnable(src, path)


def file_ids(files, top):
    """(path relative to the dataset folder, with '/', size in bytes) of each file: how splits.json
    names them, so the folder may move but a changed file is noticed."""
    return [(os.path.relpath(f, top).replace(os.sep, "/"), os.path.getsize(f)) for f in files]


def warn_skipped(bad, not_decoded):
    """One warning for every file left out: unreadable images (bad_images.txt lists them) and
    image-like files in formats cnnlab does not decode, counted by suffix."""
    parts = []
    if bad:
        parts.append(f"{len(bad)} unreadable image(s) (the list is in bad_images.txt in the run folder)")
    if not_decoded:
        kinds = Counter(os.path.splitext(f)[1].lower() for f in not_decoded).most_common()
        parts.append(f"{len(not_decoded)} file(s) in formats cnnlab does not decode "
                     f"({', '.join(f'{n} {suffix}' for suffix, n in kinds)}; convert them to PNG or JPEG to use them)")
    if parts:
        note("warning: skipped " + " and ".join(parts) + ".")


def drop_unlearnable(src, path):
    """A class with no readable training image left (after --on-bad-image skip) cannot be learnt:
    it is left out, with its test images, and said."""
    counts = torch.bincount(src.train_y, minlength=len(src.classes)).tolist()
    empty = [c for c, n in zip(src.classes, counts) if n == 0]
    if not empty:
        return src
    kept = [c for c in src.classes if c not in empty]
    note(f"warning: class {', '.join(repr(c) for c in empty)} has no readable training image left after skipping "
         "unreadable files; it is left out (a class with no images cannot be learnt).")
    if len(kept) < 2:
        raise CnnlabError(f"{printable(path)}: only {len(kept)} class(es) have readable images; a classifier needs "
                          "at least 2. Replace its unreadable files (`cnnlab data check` lists them).")
    return select_classes(src, kept)
