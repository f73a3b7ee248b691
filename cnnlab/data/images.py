"""Decoding one image file safely: a pixel limit against decompression bombs, every PIL mode
converted to L or RGB, and one clear CnnlabError (naming the file) for anything unreadable."""
import numpy as np

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


def load_array(path_or_file, channels, size, name=None):
    """Decode, convert and resize to (C, size, size) uint8 numpy."""
    from PIL import Image

    img = to_mode(open_image(path_or_file, name), channels)
    if img.size != (size, size):
        img = img.resize((size, size), Image.BILINEAR)
    a = np.asarray(img, dtype=np.uint8)
    return a[None] if a.ndim == 2 else a.transpose(2, 0, 1)


def has_colour(img):
    """True if a PIL image shows colour, not just an RGB encoding of grey (a scan saved as JPEG):
    the mean spread between a pixel's channels exceeds 16 of 255, on a 64x64 thumbnail."""
    if img.mode in GRAY_MODES:
        return False
    rgb = np.asarray(to_mode(img, 3).resize((64, 64)), dtype=np.int16)
    return float((rgb.max(axis=2) - rgb.min(axis=2)).mean()) > 16
