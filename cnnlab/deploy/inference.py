"""Using a trained model: `cnnlab.load(path)` rebuilds it from a checkpoint alone and applies
exactly its evaluation preprocessing (mode conversion, resize, normalisation, optional inversion)."""
import os

import numpy as np
import torch

from ..train import checkpoint


class Model:
    """A loaded classifier: `predict(items)`, `classes`, `preprocess`, and the torch `net`."""

    def __init__(self, ckpt, device="cpu", path=""):
        spec = ckpt["model"]
        self.net = checkpoint.build_model(ckpt, path)
        self.device = torch.device(device)
        # NHWC: 2.3x faster inference on the CPU for the seed CNN (benchmarks/README.md)
        self.net.to(self.device, memory_format=torch.channels_last).eval()
        self.classes, self.preprocess = list(ckpt["classes"]), dict(ckpt["preprocess"])
        self.metrics, self.config, self.path = ckpt.get("metrics", {}), ckpt.get("config", {}), path
        self.in_shape = tuple(spec["in_shape"])
        p = self.preprocess
        std = torch.tensor(p["std"], dtype=torch.float32).view(1, -1, 1, 1)
        self.scale, self.shift = (1 / (255 * std)).to(self.device), (-torch.tensor(p["mean"]).view(1, -1, 1, 1) / std).to(self.device)

    def __repr__(self):
        return f"cnnlab.Model({self.preprocess and self.config.get('model')}, classes={self.classes})"

    def to_uint8(self, item, invert=None, name=None):
        """One image (path, file object, PIL image, or uint8/float array HW, HWC or CHW) ->
        (C, S, S) uint8, converted and resized exactly as the training data was."""
        from PIL import Image

        from ..data.images import open_image, to_mode

        c, size = self.preprocess["channels"], self.preprocess["image_size"]
        if isinstance(item, (str, os.PathLike)) or hasattr(item, "read"):
            item = open_image(item, name)
        elif isinstance(item, np.ndarray) or torch.is_tensor(item):
            item = array_to_image(np.asarray(item))
        img = to_mode(item, c)
        if img.size != (size, size):
            img = img.resize((size, size), Image.BILINEAR)
        a = np.array(img, dtype=np.uint8)  # a writable copy
        a = a[None] if a.ndim == 2 else a.transpose(2, 0, 1)
        if invert if invert is not None else self.preprocess.get("invert"):
            a = 255 - a
        return torch.from_numpy(np.ascontiguousarray(a))

    def unlike_training(self, img):
        """'500x375 colour' when a PIL image differs greatly from the training images: its short
        side over 8x the model's input (the downscale throws away what the model would need), or
        colour into a grayscale model (or grayscale into a colour one); '' when it does not."""
        from ..data.images import GRAY_MODES, has_colour

        c, size = self.preprocess["channels"], self.preprocess["image_size"]
        colour = has_colour(img)
        wrong_kind = (c == 1 and colour) or (c == 3 and img.mode in GRAY_MODES)
        if min(img.size) <= 8 * size and not wrong_kind:
            return ""
        return f"{img.size[0]}x{img.size[1]} {'colour' if colour else 'grayscale'}"

    def training_images(self):
        """'1x28x28 grayscale': what the model was trained on, for messages."""
        c, size = self.preprocess["channels"], self.preprocess["image_size"]
        return f"{c}x{size}x{size} {'grayscale' if c == 1 else 'colour'}"

    @torch.inference_mode()
    def logits(self, batch_uint8):
        """(B, C, S, S) uint8 -> (B, K) logits, with the training normalisation."""
        x = batch_uint8.to(self.device).float() * self.scale + self.shift
        return self.net(x.contiguous(memory_format=torch.channels_last)).float()

    def predict(self, items, top_k=5, invert=None, batch_size=256):
        """Top-k predictions per item: a list of lists of {label, index, probability}."""
        if not isinstance(items, (list, tuple)):
            items = [items]
        out = []
        for i in range(0, len(items), batch_size):
            batch = torch.stack([self.to_uint8(it, invert) for it in items[i:i + batch_size]])
            out += self.top_k(self.logits(batch), top_k)
        return out

    def top_k(self, logits, k):
        probs = logits.softmax(1)
        values, indices = probs.topk(min(k, probs.shape[1]), dim=1)
        return [[{"label": self.classes[j], "index": int(j), "probability": float(p)} for p, j in zip(vs, ix)]
                for vs, ix in zip(values.tolist(), indices.tolist())]


def array_to_image(arr):
    """uint8 0..255 or float 0..1 arrays, HW / HWC / CHW -> PIL image."""
    from PIL import Image

    if arr.dtype != np.uint8:
        arr = np.clip(arr * (255 if arr.max() <= 1.0 else 1) + 0.5, 0, 255).astype(np.uint8)
    if arr.ndim == 3 and arr.shape[0] in (1, 3) and arr.shape[-1] not in (1, 3):
        arr = arr.transpose(1, 2, 0)
    return Image.fromarray(arr[..., 0] if arr.ndim == 3 and arr.shape[-1] == 1 else arr)


def load(path, device="cpu"):
    """A checkpoint file or run folder (its best.pt) -> Model."""
    resolved = checkpoint.resolve(str(path))
    return Model(checkpoint.load(resolved), device=device, path=resolved)
