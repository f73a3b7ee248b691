"""From an image to a model's pixels, the one path both training and prediction take: decode
safely (a pixel limit against decompression bombs, one clear CnnlabError naming the file for
anything unreadable), turn it upright (EXIF orientation), convert every PIL mode to L or RGB,
fit it to a square by the run's resize policy (squash, crop, pad), uint8 (C, S, S).

A folder dataset is decoded with `load_array` and `cnnlab predict`/`serve` read their images with
it (through Preprocess.image), and tensor sources are resized by the same `resize`: an image gives
the model the same pixels at training time and at prediction time.

Decoding is bounded in memory: every decode in the process holds its share of one budget
(DECODING, half the memory available), so parallel decoding threads take turns on huge images,
and a JPEG far larger than the model's input decodes at reduced scale (PIL's draft).
"""
import ctypes
import functools
import os
import threading
from contextlib import contextmanager

import numpy as np
import torch

from ..errors import CnnlabError

MAX_PIXELS = 64_000_000  # 8000x8000: far beyond a classifier's input, far below a bomb's claim
LIMIT_HINT = "decompression-bomb guard"
# A JPEG decodes at reduced scale (1/2, 1/4, 1/8) only down to 2x the side it is resized to.
# Measured on 2048x1536 photos into 148 px: full decode 47 ms, 1/4 scale 24 ms (mean difference
# 0.34 of 255 after the antialiased resize), 1/8 scale 23 ms (1.4 of 255): 2x keeps the speed,
# not the error. (It was 8x: a 128 px model then decoded a 2592x1944 photo at full size.)
DRAFT_MARGIN = 2
# Peak memory of one load_array per decoded pixel, measured on 8000x8000 PNGs: RGBA 15 bytes
# (decode, white background, composite, grey or RGB copy, resize), RGB to RGB 10, L to L 5.
BYTES_PER_PIXEL = 16
TRIM_ABOVE = 64 * 2**20   # decodes holding this much give their memory back to the system after
GRAY_MODES = ("1", "L", "LA", "I", "I;16", "I;16B", "I;16L", "F")   # single-channel PIL modes
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm")


def available_memory():
    """Bytes this process may still allocate: the kernel's MemAvailable, or less when a cgroup
    (a container's memory limit, v2 or v1) leaves less."""
    found = []
    try:
        with open("/proc/meminfo") as f:
            found += [int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable:")]
    except OSError:   # not Linux: half the physical memory, as a guess of what is free
        found.append(os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") // 2)
    cgroups = (("memory.max", "memory.current"), ("memory/memory.limit_in_bytes", "memory/memory.usage_in_bytes"))
    for limit, usage in cgroups:
        try:
            with open(f"/sys/fs/cgroup/{limit}") as f, open(f"/sys/fs/cgroup/{usage}") as g:
                found.append(int(f.read()) - int(g.read()))
        except (OSError, ValueError):   # no such cgroup file, or "max": no limit
            pass
    return min(found)


@functools.cache
def _libc():
    try:
        return ctypes.CDLL("libc.so.6")
    except OSError:   # not glibc (macOS, musl): nothing to trim
        return None


def release_freed_memory():
    """Give memory freed by a large decode back to the system. glibc keeps freed memory in the
    freeing thread's arena (PIL allocates images in 16 MiB blocks, below glibc's mmap threshold),
    so without this, 8 decoding threads each kept ~1 GB after their first 8000x8000 RGBA image:
    `data check` peaked at 5.0 GiB under a 1 GiB budget; with it 1.6 GiB (0.5 of it torch itself)."""
    libc = _libc()
    if libc is not None and hasattr(libc, "malloc_trim"):
        libc.malloc_trim(0)


class DecodeBudget:
    """The memory that images being decoded may hold at once, shared by every thread of the
    process: a decode waits until its share (BYTES_PER_PIXEL per pixel) is free, so 8 decoding
    threads on 8000x8000 RGBA images take turns instead of asking for 8 GB together. One image
    larger than the whole budget is refused with its name."""

    def __init__(self, total):
        self.total, self.used = total, 0
        self.freed = threading.Condition()

    @contextmanager
    def hold(self, img, name):
        w, h = img.size
        need = w * h * BYTES_PER_PIXEL
        if need > self.total:
            raise CnnlabError(f"{name}: decoding its {w}x{h} pixels needs about {need / 2**20:,.0f} MiB, more than "
                              f"the {self.total / 2**20:,.0f} MiB cnnlab lets images take (half the memory "
                              "available when it started); resize it first.")
        with self.freed:
            self.freed.wait_for(lambda: self.used + need <= self.total)
            self.used += need
        try:
            yield
        finally:
            if need >= TRIM_ABOVE:
                release_freed_memory()
            with self.freed:
                self.used -= need
                self.freed.notify_all()


DECODING = DecodeBudget(available_memory() // 2)


def _to_8bit(img):
    """16-bit and 32-bit grey ('I;16', 'I') scaled to 0..255, not clipped (PIL's convert clips)."""
    a = np.asarray(img, dtype=np.float64)
    top = 65535.0 if a.max() > 255 or img.mode.startswith("I;16") else 255.0
    from PIL import Image

    return Image.fromarray(np.clip(a / top * 255.0 + 0.5, 0, 255).astype(np.uint8), "L")


def to_mode(img, channels):
    """A PIL image converted to 'L' (channels=1) or 'RGB' (channels=3). Transparency is laid on
    white, CMYK and palettes go through RGB."""
    from PIL import Image

    target = "L" if channels == 1 else "RGB"
    if img.mode == target:
        return img   # convert() would copy it
    if img.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        img = _to_8bit(img)
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        rgba = img if img.mode == "RGBA" else img.convert("RGBA")   # no copy: 4 bytes a pixel
        img = Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba)
    return img.convert(target)


@contextmanager
def readable(name):
    """Any failure to read or decode an image becomes one CnnlabError naming the file."""
    from PIL import Image, UnidentifiedImageError

    try:
        yield
    except CnnlabError:
        raise
    except FileNotFoundError:
        raise CnnlabError(f"{name}: no such file.") from None
    except IsADirectoryError:
        raise CnnlabError(f"{name}: is a folder, not an image file.") from None
    except UnidentifiedImageError:
        raise CnnlabError(f"{name}: not an image PIL can read (empty, or another kind of file).") from None
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        raise CnnlabError(f"{name}: cannot decode image ({str(e).splitlines()[0] or type(e).__name__}).") from None


FILE_SIZE = "cnnlab_file_size"   # img.info key: (w, h) as stored in the file, before any draft


def file_size(img):
    """(w, h) of the image in its file: a JPEG opened with a draft decodes smaller."""
    return img.info.get(FILE_SIZE, img.size)


def open_header(path_or_file, name=None, size=0, max_pixels=MAX_PIXELS, limit_hint=LIMIT_HINT):
    """Open an image without decoding its pixels. A JPEG is set to decode at 1/2, 1/4 or 1/8 scale
    when that still leaves DRAFT_MARGIN times `size` per side (PIL's draft: the decoder skips the
    detail, 8x less time and memory for a photo into a small model). The pixels it will decode to
    are checked against `max_pixels` before any is decoded; `limit_hint` says how to raise it."""
    from PIL import Image

    name = name or str(path_or_file)
    with readable(name):
        img = Image.open(path_or_file)
        img.info[FILE_SIZE] = img.size   # the draft below changes img.size; messages name the file's
        if size and img.format == "JPEG":
            img.draft(None, (DRAFT_MARGIN * size, DRAFT_MARGIN * size))
        w, h = img.size
        if w * h > max_pixels:
            raise CnnlabError(f"{name}: image decodes to {w}x{h} pixels, over the {max_pixels:,}-pixel "
                              f"limit ({limit_hint}); resize it first.")
        return img


def open_image(path_or_file, name=None, size=0):
    """Open and decode an image (a large JPEG at reduced scale for a `size` model input, as training
    and serve decode it); returns a PIL image in its own mode."""
    name = name or str(path_or_file)
    img = open_header(path_or_file, name, size)
    with DECODING.hold(img, name), readable(name):
        img.load()
    return img


def array_to_image(arr):
    """uint8 0..255 or float 0..1 arrays, HW / HWC / CHW -> PIL image."""
    from PIL import Image

    if arr.dtype != np.uint8:
        arr = np.clip(arr * (255 if arr.max() <= 1.0 else 1) + 0.5, 0, 255).astype(np.uint8)
    if arr.ndim == 3 and arr.shape[0] in (1, 3) and arr.shape[-1] not in (1, 3):
        arr = arr.transpose(1, 2, 0)
    return Image.fromarray(arr[..., 0] if arr.ndim == 3 and arr.shape[-1] == 1 else arr)


def as_image(item, name=None, size=0):
    """A path or file object (opened, not yet decoded: see `open_header`), PIL image or array
    (numpy or torch) as a PIL image."""
    if isinstance(item, (str, os.PathLike)) or hasattr(item, "read"):
        return open_header(item, name, size)
    if isinstance(item, np.ndarray) or torch.is_tensor(item):
        return array_to_image(np.asarray(item))
    return item


def resize(x, size):
    """uint8 (N, C, H, W) -> (N, C, size, size), stretched (bilinear, antialiased); size 0 keeps it.
    Torch's uint8 kernel, not a float round trip: PIL-like results, and no float copy of a large
    photo per decoding thread."""
    if size == 0 or (x.shape[2] == size and x.shape[3] == size):
        return x
    return torch.nn.functional.interpolate(x, size=(size, size), mode="bilinear", antialias=True).contiguous()


def resize_shorter(x, size):
    """uint8 (N, C, H, W) with its shorter side resized to `size`, the longer one to
    int(size * long / short): torchvision's Resize(size) rule, with images.resize's kernel."""
    h, w = x.shape[2:]
    if min(h, w) == size:
        return x
    shape = (size, int(size * w / h)) if h <= w else (int(size * h / w), size)
    return torch.nn.functional.interpolate(x, size=shape, mode="bilinear", antialias=True).contiguous()


def center_crop(x, size):
    """The central size x size window of (..., H, W), at torchvision CenterCrop's offsets."""
    h, w = x.shape[-2:]
    top, left = int(round((h - size) / 2.0)), int(round((w - size) / 2.0))
    return x[..., top:top + size, left:left + size]


def resize_crop(x, size):
    """`crop`: the shorter side resized to `size`, the longer one centre-cropped to it; aspect kept."""
    return center_crop(resize_shorter(x, size), size).contiguous()


def resize_pad(x, size):
    """`pad`: the longer side resized to `size`, the shorter one padded with black, centred; the
    whole image kept, aspect kept (a letterbox)."""
    h, w = x.shape[2:]
    long = max(h, w)
    shape = (max(1, round(size * h / long)), max(1, round(size * w / long)))
    if shape != (h, w):
        x = torch.nn.functional.interpolate(x, size=shape, mode="bilinear", antialias=True)
    top, left = (size - shape[0]) // 2, (size - shape[1]) // 2
    return torch.nn.functional.pad(x, (left, size - shape[1] - left, top, size - shape[0] - top)).contiguous()


# How an image of any size becomes a square: squash stretches it (aspect lost, nothing cut: the
# only policy before photos, kept for digits and other small sets), crop keeps the centre, pad the
# whole image with black bars.
FIT = {"squash": resize, "crop": resize_crop, "pad": resize_pad}
RESIZE_POLICIES = tuple(FIT)


def fit(x, size, policy="squash"):
    """uint8 (N, C, H, W) -> (N, C, size, size) by `policy` (FIT); size 0 keeps it."""
    return x if size == 0 else FIT[policy](x, size)


def load_array(item, channels, size, name=None, policy="squash"):
    """An image (see `as_image`) -> upright (EXIF orientation) -> mode L or RGB -> size x size by
    `policy` (FIT) -> uint8 (C, size, size) numpy, decoded within the process's DECODING budget."""
    img = as_image(item, name, size)
    name = name or (str(item) if isinstance(item, (str, os.PathLike)) else "image")
    with DECODING.hold(img, name), readable(name):
        a = np.array(to_mode(upright(img), channels), dtype=np.uint8)   # a writable copy for torch
        x = torch.from_numpy(a[None] if a.ndim == 2 else a.transpose(2, 0, 1))
        return np.ascontiguousarray(fit(x[None], size, policy)[0].numpy())


EXIF_ORIENTATION = 0x0112


def upright(img):
    """The image as it is meant to be seen: a camera stores a photo taken sideways as it was
    sensed, with an EXIF orientation tag saying how to turn it, which every viewer obeys. Images
    without the tag (or with 'as stored') are returned as they are, not copied."""
    from PIL import ImageOps

    if img.format == "JPEG" and "exif" not in img.info:   # PIL keeps a JPEG's EXIF there: none, no tag
        return img
    if img.getexif().get(EXIF_ORIENTATION, 1) == 1:
        return img
    return ImageOps.exif_transpose(img)


def has_colour(img):
    """True if a PIL image shows colour, not just an RGB encoding of grey (a scan saved as JPEG):
    the mean spread between a pixel's channels exceeds 16 of 255, on a 64x64 thumbnail."""
    if img.mode in GRAY_MODES:
        return False
    rgb = np.asarray(to_mode(img, 3).resize((64, 64)), dtype=np.int16)
    return float((rgb.max(axis=2) - rgb.min(axis=2)).mean()) > 16
