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


def pixels(path, pre):
    """An image file -> uint8 (H, W, C) at the model's size, as cnnlab converts it: transparency
    laid on white, then grayscale or RGB, then stretched (bilinear) to a square."""
    img = Image.open(path)
    if img.mode in ("I;16", "I;16B", "I;16L", "I", "F"):   # 16-bit grey: scaled to 0..255, not clipped
        a = np.asarray(img, dtype=np.float64)
        top = 65535.0 if a.max() > 255 or img.mode.startswith("I;16") else 255.0
        img = Image.fromarray(np.clip(a / top * 255 + 0.5, 0, 255).astype(np.uint8), "L")
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        img = Image.alpha_composite(Image.new("RGBA", img.size, (255, 255, 255, 255)), img.convert("RGBA"))
    img = img.convert("L" if pre["channels"] == 1 else "RGB")
    size = pre["image_size"]
    if img.size != (size, size):
        img = img.resize((size, size), Image.BILINEAR)
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
