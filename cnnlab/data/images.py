"""From an image to a model's pixels, the one path both training and prediction take: decode
safely (a pixel limit against decompression bombs, one clear CnnlabError naming the file for
anything unreadable), convert every PIL mode to L or RGB, resize, uint8 (C, S, S).

A folder dataset is decoded with `load_array` and `cnnlab predict`/`serve` read their images with
it (through Preprocess.image), and tensor sources are resized by the same `resize`: an image gives
the model the same pixels at training time and at prediction time.
"""
import os

import numpy as np
import torch

from ..errors import CnnlabError

MAX_PIXELS = 64_000_000  # 8000x8000: far beyond a classifier's input, far below a bomb's claim
GRAY_MODES = ("1", "L", "LA", "I", "I;16", "I;16B", "I;16L", "F")   # single-channel PIL modes
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm")


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

    if img.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        img = _to_8bit(img)
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        img = Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba)
    return img.convert("L" if channels == 1 else "RGB")


def open_image(path_or_file, name=None):
    """Open and fully decode an image; returns a PIL image in its own mode."""
    from PIL import Image, UnidentifiedImageError

    name = name or str(path_or_file)
    try:
        img = Image.open(path_or_file)
        w, h = img.size
        if w * h > MAX_PIXELS:
            raise CnnlabError(f"{name}: image claims {w}x{h} pixels, over the {MAX_PIXELS:,}-pixel "
                              "limit (decompression-bomb guard); resize it first.")
        img.load()
        return img
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


def array_to_image(arr):
    """uint8 0..255 or float 0..1 arrays, HW / HWC / CHW -> PIL image."""
    from PIL import Image

    if arr.dtype != np.uint8:
        arr = np.clip(arr * (255 if arr.max() <= 1.0 else 1) + 0.5, 0, 255).astype(np.uint8)
    if arr.ndim == 3 and arr.shape[0] in (1, 3) and arr.shape[-1] not in (1, 3):
        arr = arr.transpose(1, 2, 0)
    return Image.fromarray(arr[..., 0] if arr.ndim == 3 and arr.shape[-1] == 1 else arr)


def as_image(item, name=None):
    """A path, file object, PIL image or array (numpy or torch) as a PIL image."""
    if isinstance(item, (str, os.PathLike)) or hasattr(item, "read"):
        return open_image(item, name)
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


def load_array(item, channels, size, name=None):
    """An image (see `as_image`) -> mode L or RGB -> size x size -> uint8 (C, size, size) numpy."""
    a = np.array(to_mode(as_image(item, name), channels), dtype=np.uint8)   # a writable copy for torch
    x = torch.from_numpy(a[None] if a.ndim == 2 else a.transpose(2, 0, 1))
    return np.ascontiguousarray(resize(x[None], size)[0].numpy())


def has_colour(img):
    """True if a PIL image shows colour, not just an RGB encoding of grey (a scan saved as JPEG):
    the mean spread between a pixel's channels exceeds 16 of 255, on a 64x64 thumbnail."""
    if img.mode in GRAY_MODES:
        return False
    rgb = np.asarray(to_mode(img, 3).resize((64, 64)), dtype=np.int16)
    return float((rgb.max(axis=2) - rgb.min(axis=2)).mean()) > 16
