"""Using a trained model: `cnnlab.load(path)` rebuilds it from a checkpoint alone and applies
exactly its training preprocessing, the checkpoint's Preprocess: `preprocess.image` (mode
conversion, resize, optional inversion) then `inputs` (normalisation)."""
import torch

from ..training import checkpoint


class Model:
    """A loaded classifier: `predict(items)`, `classes`, `preprocess` (its Preprocess), and the torch `net`."""

    def __init__(self, ckpt, device="cpu", path=""):
        self.net = checkpoint.build_model(ckpt, path)
        self.device = torch.device(device)
        # NHWC: 2.3x faster inference on the CPU for the seed CNN (benchmarks/README.md)
        self.net.to(self.device, memory_format=torch.channels_last).eval()
        self.classes, self.preprocess = list(ckpt["classes"]), checkpoint.preprocess_of(ckpt)
        self.metrics, self.config, self.path = ckpt.get("metrics", {}), ckpt.get("config", {}), path
        self.in_shape = tuple(ckpt["model"]["in_shape"])
        self.scale_shift = self.preprocess.scale_shift(self.device)

    def __repr__(self):
        return f"cnnlab.Model({self.config.get('model')}, classes={self.classes})"

    def unlike_training(self, img):
        """'500x375 colour' when a PIL image differs greatly from the training images: its short
        side over 8x the model's input (the downscale throws away what the model would need), or
        colour into a grayscale model (or grayscale into a colour one); '' when it does not."""
        from ..data.images import GRAY_MODES, has_colour

        c, size = self.preprocess.channels, self.preprocess.image_size
        colour = has_colour(img)
        wrong_kind = (c == 1 and colour) or (c == 3 and img.mode in GRAY_MODES)
        if min(img.size) <= 8 * size and not wrong_kind:
            return ""
        return f"{img.size[0]}x{img.size[1]} {'colour' if colour else 'grayscale'}"

    def training_images(self):
        """'1x28x28 grayscale': what the model was trained on, for messages."""
        c, size = self.preprocess.channels, self.preprocess.image_size
        return f"{c}x{size}x{size} {'grayscale' if c == 1 else 'colour'}"

    def inputs(self, batch_uint8):
        """(B, C, S, S) uint8 -> the network's input, normalised as in training (BatchLoader)."""
        return self.preprocess.normalise(batch_uint8.to(self.device), self.scale_shift)

    @torch.inference_mode()
    def logits(self, batch_uint8):
        """(B, C, S, S) uint8 -> (B, K) logits."""
        return self.net(self.inputs(batch_uint8).contiguous(memory_format=torch.channels_last)).float()

    def predict(self, items, top_k=5, invert=None, batch_size=256):
        """Top-k predictions per item: a list of lists of {label, index, probability}."""
        if not isinstance(items, (list, tuple)):
            items = [items]
        out = []
        for i in range(0, len(items), batch_size):
            batch = torch.stack([self.preprocess.image(it, invert=invert) for it in items[i:i + batch_size]])
            out += self.top_k(self.logits(batch), top_k)
        return out

    def top_k(self, logits, k):
        probs = logits.softmax(1)
        values, indices = probs.topk(min(k, probs.shape[1]), dim=1)
        return [[{"label": self.classes[j], "index": int(j), "probability": float(p)} for p, j in zip(vs, ix)]
                for vs, ix in zip(values.tolist(), indices.tolist())]


def load(path, device="cpu"):
    """A checkpoint file or run folder (its best.pt) -> Model."""
    resolved = checkpoint.resolve(str(path))
    return Model(checkpoint.load(resolved), device=device, path=resolved)
