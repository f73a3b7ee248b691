"""`folder:PATH`: class subfolders of image files, decoded once in parallel into the disk cache
(cache.py: memory-mapped, so a collection larger than memory trains too).

Layouts: PATH/<class>/... (cnnlab cuts the splits), or PATH/train/<class>/... with PATH/test/
beside it as the official held-out split and PATH/val/ (or valid/, validation/) as the validation
split; val/ alone beside train/ is the held-out split. The names are matched in any case.

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
from ..threads import cpu_count
from .cache import PageDropper, cached_arrays, disk_array, drop_pages, file_stamps, files_key, new_pixels
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


def scan_classes(root, top, need=2):
    """({class name: [files]}, [image-like files not decoded]) for the class subfolders of `root`
    (`top`: the dataset folder, for the symlink check). Empty classes are dropped with a warning;
    class names are printable (a folder name's control characters escaped). `need`: the classes a
    training folder must have (a held-out folder may hold fewer)."""
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
    if len(classes) < need:   # a lone class folder of folders is likely a train/ whose classes are inside
        nested = [n for n in names if printable(n) in classes
                  and any(os.path.isdir(os.path.join(root, n, d)) for d in os.listdir(os.path.join(root, n)))]
        hint = (f" '{printable(nested[0])}' holds subfolders: if they are the classes, point --data at "
                f"{printable(os.path.join(root, nested[0]))}, or put a test/ or val/ folder beside it." if nested else "")
        raise CnnlabError(f"{printable(root)}: found {len(classes)} class folder(s) with images; a classifier needs "
                          f"at least 2 (one subfolder of images per class).{hint}")
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
    """(train root, validation root or None, test root or None): train/ with test/ and/or val/
    are the splits; val/ alone beside train/ is the held-out (test) split, as ImageNet's is."""
    present = {}   # lower-case name -> the folder: Train/, TEST/, valid/ (train/ before Train/ when both exist)
    for d in sorted(os.listdir(root), reverse=True) if os.path.isdir(root) else []:
        if os.path.isdir(os.path.join(root, d)):
            present[d.lower()] = d
    train, test = (os.path.join(root, present.get(name, name)) for name in ("train", "test"))
    val = next((os.path.join(root, present[n]) for n in ("val", "valid", "validation") if n in present), "")
    has_val = bool(val) and bool(list_files(val)[0])   # an empty val/ is no split
    if os.path.isdir(train) and os.path.isdir(test):
        return train, val if has_val else None, test
    if os.path.isdir(train) and has_val:
        return train, None, val
    return root, None, None   # a lone train/ is a class folder (trains, buses, cars)


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


def image_format(files, image_size, root, cache_dir="", stamps=None):
    """choose_format, cached by the file list: reading 60,000 headers again costs ~10 s per load.
    A miss means a first load, which is announced: it takes a minute for 60,000 files."""
    def make():
        note(f"first load of {len(files):,} images under {printable(root)}: reading headers, then decoding them once "
             "(cached for next time)")
        return {"format": np.array(choose_format(files, image_size))}
    found = cached_arrays(files_key(f"format2-{image_size}", files, stamps), make, "formats", cache_dir)["format"]
    return tuple(int(v) for v in found)


def decode_all(files, channels, size, where="", out=None, policy="squash"):
    """Decode every file in parallel processes (decoding and resizing hold the GIL for part of
    their time; on this shared 2-core machine 2 processes and 8 threads measured within its noise,
    154-171 vs 164-236 photos/s at 224), fitted to size x size by `policy`, into `out`, a uint8
    (N, C, S, S) array (the disk cache's memmap; a new array when None) -> (x, ok mask, bad
    messages). The good rows come first in x, in file order; bad files are recorded, not raised,
    so the cache entry serves both --on-bad-image modes."""
    out = np.empty((len(files), channels, size, size), np.uint8) if out is None else out
    note(f"decoding {len(files):,} images{where} at {channels}x{size}x{size}")
    chunks = [(start, files[start:start + DECODE_CHUNK], channels, size, policy)
              for start in range(0, len(files), DECODE_CHUNK)]
    errors = {}
    bar = tqdm(total=len(files), desc="decoding", unit="img", disable=None if on_main_rank() else True,
               leave=False, dynamic_ncols=True)
    global _SHARED
    _SHARED = out if isinstance(out, np.memmap) else None   # inherited by the forked workers
    try:
        with bar, decoding_pool(len(chunks)) as pool:
            for start, decoded in pool.map(decode_chunk, chunks):
                for i, (pixels, error) in enumerate(decoded):
                    if error:
                        errors[start + i] = error
                    elif pixels is not None:
                        out[start + i] = pixels
                bar.update(len(decoded))
    finally:
        _SHARED = None
    ok = np.ones(len(files), dtype=bool)
    ok[list(errors)] = False
    return compact(out, ok), ok, [errors[i] for i in sorted(errors)]


DECODE_CHUNK = 64   # files per task: ~10 MB of pixels at 224 back through the pipe, a bar tick a second


def decoding_pool(tasks):
    """Worker processes for decode_all (forked: no re-import of torch; start_worker sets each one
    up); none for a single task."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor
    from contextlib import nullcontext

    workers = min(cpu_count(), tasks)   # this process's share of the CPUs (a container's), not the machine's
    if workers <= 1 or "fork" not in multiprocessing.get_all_start_methods():
        return nullcontext(_SerialPool())
    return ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("fork"), initializer=start_worker,
                               initargs=(workers,))


def start_worker(workers):
    """A decoding process: one torch thread, and its share of the decoding memory budget (each
    forked worker holds a copy of images.DECODING, which was meant for the whole process)."""
    from . import images

    torch.set_num_threads(1)
    images.DECODING.total //= workers


class _SerialPool:
    """decode_all's pool when there is one chunk or no fork: the chunks are decoded in this process."""
    map = staticmethod(map)


# decode_all's output while it runs, when it is the disk cache's memory map (its file is shared with
# the forked workers): each worker writes its rows straight into the file, with no copy of the
# pixels back through a pipe to this process (that copy cost a quarter of the decoding time), and
# with pwrite rather than through the map (page faults and madvise: 10% of the decoding time).
_SHARED = None


def decode_chunk(task):
    """(start, [(uint8 (C, S, S) or None, error message or None)]) for one chunk of files; the
    pixels are None when they were written into their rows of the shared output instead, with
    pwrite: no page of the output is mapped into the worker, so none to fault in or let go again."""
    start, files, channels, size, policy = task
    decoded = []
    fd = os.open(_SHARED.filename, os.O_WRONLY) if _SHARED is not None else None
    try:
        for i, path in enumerate(files):
            try:
                pixels = load_array(path, channels, size, policy=policy)
            except CnnlabError as e:
                decoded.append((None, str(e)))
                continue
            if fd is not None:
                if os.pwrite(fd, pixels.data, _SHARED.offset + (start + i) * pixels.nbytes) != pixels.nbytes:
                    raise OSError(f"short write into {_SHARED.filename}")   # the space was reserved: not expected
                pixels = None
            decoded.append((pixels, None))
    finally:
        if fd is not None:
            os.close(fd)
    return start, decoded


def compact(x, ok):
    """x with its good rows moved to the front (in place, in chunks: x may be a memmap larger than
    memory), cut to their number."""
    good = np.flatnonzero(ok)
    if len(good) < len(x):
        for start in range(0, len(good), 256):   # rows only move down: each chunk is read before it is written
            rows = good[start:start + 256]
            x[start:start + len(rows)] = x[rows]
    return x[:len(good)]


def decode_label(channels, size, policy="squash"):
    """What, besides the file list, decides the decoded pixels: the cache key's label. A new
    decoding setting belongs here."""
    return f"{channels}x{size}-{policy}-decoder{DECODER}"


def decode_files(files, labels, channels, size, cfg, where="", policy="squash", stamps=None):
    """The pool of (path, label) rows as tensors: (uint8 (N, C, S, S) memory-mapped from the disk
    cache, int64 labels, kept files, bad messages, the cache Entry). Decoded once, in parallel, into
    the cache (cfg.cache_dir); --on-bad-image error raises on the first bad file, skip leaves it out.
    Shared by folder: and csv: sources."""
    def fill(folder):
        x, ok, bad = decode_all(files, channels, size, where, new_pixels(folder, (len(files), channels, size, size)), policy)
        if isinstance(x, np.memmap):
            PageDropper(x).drop()   # its pages out of this process (compact() may have written some)
            os.truncate(os.path.join(folder, "pixels.u8"), x.nbytes)   # the bad files' rows, cut off
        return {"shape": list(x.shape), "ok": ok.tolist(), "bad": bad, "source": "images" + where,
                "files": len(files)}
    entry = disk_array("folders", files_key(decode_label(channels, size, policy), files, stamps), fill, cfg.cache_dir)
    ok, bad = np.array(entry.meta["ok"], dtype=bool), [printable(b) for b in entry.meta["bad"]]
    if bad and cfg.on_bad_image == "error":
        more = f" (and {len(bad) - 1} more bad files)" if len(bad) > 1 else ""
        raise CnnlabError(f"{bad[0].rstrip('.')}{more}. Remove it, or pass --on-bad-image skip.")
    kept = [f for f, good in zip(files, ok) if good]
    labels = np.asarray(labels, dtype=np.int64)[ok]
    return torch.from_numpy(entry.array()), torch.from_numpy(labels), kept, bad, entry


def load_pool(class_files, classes, channels, size, cfg, where="", policy="squash", stamps=None):
    """A folder's pool: its class subfolders' files, labelled by class, decoded (decode_files)."""
    files = [f for c in classes for f in class_files.get(c, [])]
    labels = [i for i, c in enumerate(classes) for _ in class_files.get(c, [])]
    return decode_files(files, labels, channels, size, cfg, where, policy, stamps)


@register_dataset("folder", arg="PATH", claims=os.path.isdir, shape="--image-size", classes="folders",
                  sizes="from files", description="class subfolders of images; train/ + val/ and/or test/ "
                                                  "subfolders are the splits")
def folder(path, cfg):
    """The images under `path` (cfg: a DataConfig: image_size, on_bad_image)."""
    train_root, val_root, test_root = split_folders(path)
    train_classes, not_decoded = scan_classes(train_root, path)
    classes = list(train_classes)
    held_out = {root: scan_classes(root, path, need=1) for root in (val_root, test_root) if root}
    for root, (found, _) in held_out.items():
        extra = sorted(set(found) - set(classes))
        if extra:
            raise CnnlabError(f"{printable(root)} has class folders not in {printable(train_root)}: {', '.join(extra)}.")
    val_classes, not_decoded_val = held_out.get(val_root, ({}, []))
    test_classes, not_decoded_test = held_out.get(test_root, ({}, []))
    all_files = [f for split in (train_classes, val_classes, test_classes) for fs in split.values() for f in fs]
    stamps = file_stamps(all_files)
    channels, size, typical = image_format(all_files, cfg.image_size, path, cfg.cache_dir, stamps)
    policy = file_policy(cfg.resize, size, typical)
    stored = stored_size(policy, size, cfg.resize_size)   # crop: decoded once at ~1.15x the input side (photos.py)
    # val/'s images join the training pool as named validation rows (as a labels file's are)
    pool = {c: train_classes.get(c, []) + val_classes.get(c, []) for c in classes}
    where = f" in {printable(train_root)}" + (f" or {printable(val_root)}" if val_root else "")
    train_x, train_y, train_files, bad, entry = load_pool(pool, classes, channels, stored, cfg, where, policy, stamps)
    src = Source(train_x, train_y, classes=classes, files={"train": train_files}, cache={"train": entry},
                 resize=policy, input_size=size)
    if val_root:
        val_files = {f for fs in val_classes.values() for f in fs}
        src.val_rows = [i for i, f in enumerate(train_files) if f in val_files]
    if test_root:
        src.test_x, src.test_y, src.files["test"], bad_test, src.cache["test"] = load_pool(
            test_classes, classes, channels, stored, cfg, f" in {printable(test_root)}", policy, stamps)
        bad += bad_test
    warn_skipped(bad, not_decoded + not_decoded_val + not_decoded_test)
    src.files["bad"] = bad
    src.ids = {pool: file_ids(src.files[pool], path, stamps) for pool in ("train", "test") if pool in src.files}
    return drop_unlearnable(src, path)


def file_ids(files, top, stamps=None):
    """(path relative to the dataset folder, with '/', size in bytes) of each file: how splits.json
    names them, so the folder may move but a changed file is noticed (`stamps`: the load's
    file_stamps, whose sizes save a stat per file)."""
    prefix = os.path.join(top, "")   # `top` and one separator

    def relative(f):   # os.path.relpath, by cutting the prefix where nothing needs normalising:
        rest = f[len(prefix):]   # relpath costs 12 us a file, 0.7 s of CIFAR-10's 60,000
        if f.startswith(prefix) and not any(part in ("", ".", "..") for part in rest.split(os.sep)):
            return rest
        return os.path.relpath(f, top)
    size = (lambda f: stamps[f][1]) if stamps else os.path.getsize
    return [(relative(f).replace(os.sep, "/"), size(f)) for f in files]


def warn_skipped(bad, not_decoded):
    """One warning for every file left out: unreadable images (bad_images.txt lists them) and
    image-like files in formats cnnlab does not decode, counted by suffix."""
    parts = []
    if bad:
        parts.append(f"{len(bad)} unreadable image(s) (a training run lists them in its bad_images.txt)")
    if not_decoded:
        kinds = Counter(os.path.splitext(f)[1].lower() for f in not_decoded).most_common()
        parts.append(f"{len(not_decoded)} file(s) in formats cnnlab does not decode "
                     f"({', '.join(f'{n} {suffix}' for suffix, n in kinds)}; convert them to PNG or JPEG to use them)")
    if parts:
        note("warning: skipped " + " and ".join(parts) + ".")


def drop_unlearnable(src, path):
    """A class with no readable training image left (after --on-bad-image skip) cannot be learnt:
    it is left out, with its test images, and said."""
    training = torch.ones(len(src.train_y), dtype=torch.bool)
    if src.val_rows is not None:   # a val/ folder's images are in the pool, but train nothing
        training[torch.as_tensor(src.val_rows, dtype=torch.long)] = False
    counts = torch.bincount(src.train_y[training], minlength=len(src.classes)).tolist()
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
