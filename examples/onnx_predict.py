"""Classify image files with a model exported by `cnnlab export --format onnx`, using only
onnxruntime, Pillow and numpy: no cnnlab, no torch. Everything the model needs (classes, input
size, channels, mean/std, inversion) is read from the ONNX file's own metadata.

    python examples/onnx_predict.py best.onnx digit.png photo.jpg [--top-k 3] [--json]
"""
import argparse
import json
import sys

import numpy as np
import onnxruntime as ort
from PIL import Image


def read_model(path):
    session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    meta = session.get_modelmeta().custom_metadata_map
    if "preprocessing" not in meta:
        sys.exit(f"{path}: no cnnlab metadata; export it with `cnnlab export RUN --format onnx`")
    return session, meta, json.loads(meta["preprocessing"]), json.loads(meta["classes"])


def center(img, size):
    """The central size x size window, at torchvision CenterCrop's offsets."""
    w, h = img.size
    left, top = int(round((w - size) / 2.0)), int(round((h - size) / 2.0))
    return img.crop((left, top, left + size, top + size)) if (w, h) != (size, size) else img


def fit(img, pre):
    """A PIL image -> the model's square, by the checkpoint's resize policy (cnnlab/data/images.py):
    squash stretches it; crop resizes the shorter side to resize_size (or the input side) and cuts
    the centre; pad resizes the longer side to the input side and centres it on black."""
    size, policy = pre["image_size"], pre.get("resize", "squash")
    if policy not in ("squash", "crop", "pad"):   # fitted another way, the model would get other pixels
        sys.exit(f"this model resizes its inputs by '{policy}', which this script does not know; use `cnnlab predict`")
    w, h = img.size
    if policy == "crop":
        side = pre.get("resize_size") or size
        shape = (side, int(side * h / w)) if w <= h else (int(side * w / h), side)   # torchvision's Resize rule
        img = img.resize(shape, Image.BILINEAR) if shape != img.size else img
        return center(center(img, side), size)   # stored at `side`, then the model's centre
    if policy == "pad":
        long = max(w, h)
        shape = (max(1, round(size * w / long)), max(1, round(size * h / long)))
        img = img.resize(shape, Image.BILINEAR) if shape != img.size else img
        square = Image.new(img.mode, (size, size))   # black
        square.paste(img, ((size - shape[0]) // 2, (size - shape[1]) // 2))
        return square
    return img.resize((size, size), Image.BILINEAR) if img.size != (size, size) else img


def pixels(path, pre):
    """An image file -> uint8 (H, W, C) at the model's size, as cnnlab converts it: transparency
    laid on white, then grayscale or RGB, then fitted to the square as the model was trained (`fit`)."""
    img = Image.open(path)
    if img.mode in ("I;16", "I;16B", "I;16L", "I", "F"):   # 16-bit grey: scaled to 0..255, not clipped
        a = np.asarray(img, dtype=np.float64)
        top = 65535.0 if a.max() > 255 or img.mode.startswith("I;16") else 255.0
        img = Image.fromarray(np.clip(a / top * 255 + 0.5, 0, 255).astype(np.uint8), "L")
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        img = Image.alpha_composite(Image.new("RGBA", img.size, (255, 255, 255, 255)), img.convert("RGBA"))
    img = fit(img.convert("L" if pre["channels"] == 1 else "RGB"), pre)
    a = np.asarray(img, dtype=np.uint8)
    return a[:, :, None] if a.ndim == 2 else a


def graph_input(batch, meta, pre):
    """uint8 (B, H, W, C) -> the graph's input: as is for a --raw-input export (it converts inside),
    else inverted if trained so, scaled to 0..1, normalised with mean/std, channels first."""
    if meta["input_format"].startswith("uint8"):
        return batch
    x = batch.astype(np.float32)
    if pre["invert"]:
        x = 255 - x
    x = (x / 255 - np.array(pre["mean"], np.float32)) / np.array(pre["std"], np.float32)
    return np.ascontiguousarray(x.transpose(0, 3, 1, 2))


def softmax(z):
    e = np.exp(z - z.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model")
    parser.add_argument("images", nargs="+")
    parser.add_argument("--top-k", type=int, default=3)
    parser.add_argument("--json", action="store_true", help="print what `cnnlab predict --json` prints")
    args = parser.parse_args()
    session, meta, pre, classes = read_model(args.model)
    batch = np.stack([pixels(p, pre) for p in args.images])
    scores = session.run(None, {session.get_inputs()[0].name: graph_input(batch, meta, pre)})[0]
    probs = scores if meta["output"] == "probabilities" else softmax(scores)
    results = []
    for path, p in zip(args.images, probs):
        top = np.argsort(-p, kind="stable")[:args.top_k]
        results.append({"path": path, "predictions": [{"label": classes[i], "index": int(i), "probability": float(p[i])}
                                                      for i in top]})
    if args.json:
        print(json.dumps(results, indent=2))
    else:
        for r in results:
            print(f"{r['path']}: " + ", ".join(f"{q['label']} {q['probability']:.1%}" for q in r["predictions"]))


if __name__ == "__main__":
    main()
