"""Using a trained model: `cnnlab.load(path)` rebuilds it from a checkpoint alone and applies
exactly its training preprocessing, the checkpoint's Preprocess: `preprocess.image` (mode
conversion, resize, optional inversion) then `inputs` (normalisation).

Two backends behind one interface (Classifier), so predict and serve have one code path: `Model`
runs the checkpoint's network in PyTorch, `OnnxModel` an exported ONNX file in onnxruntime
(described by its own metadata, or exported on the fly from a checkpoint)."""
import numbers
import os
import tempfile

import torch

from ..errors import UsageError
from ..training import checkpoint

BACKENDS = ("torch", "onnx")


def check_top_k(k):
    """--top-k (top_k) must ask for at least one class: 0 printed nothing, a negative k crashed topk."""
    if isinstance(k, bool) or not isinstance(k, numbers.Integral) or k < 1:
        raise UsageError(f"--top-k {k} must be a whole number of at least 1 (how many classes to list per image).")


class Classifier:
    """What every backend offers: `classes`, `preprocess` (a Preprocess), `in_shape`, `config`
    (at least the model's name), `metrics`, `path`, `backend`, and `probabilities(batch_uint8)`;
    a backend implements `view_probabilities`, which `probabilities` averages over --tta's views."""
    backend = ""
    tta = "none"   # --tta flip | flip+crop: probabilities averaged over those views of each image

    def probabilities(self, batch_uint8):
        """(B, C, S, S) uint8, as `preprocess.image` gives it -> (B, K) float probabilities,
        averaged over the views of `tta` (data/augment.py; the batch alone without)."""
        from ..data.augment import training_shifts, tta_views

        views = tta_views(batch_uint8, self.tta, 0, *training_shifts(self.config))
        return torch.stack([self.view_probabilities(v) for v in views]).mean(0)

    def view_probabilities(self, batch_uint8):
        """The backend's probabilities of exactly these images."""
        raise NotImplementedError

    def classify(self, batch_uint8, k):
        """Top-k predictions for a uint8 batch: a list of lists of {label, index, probability}."""
        return self.top_k(self.probabilities(batch_uint8), k)

    def unlike_training(self, img):
        """'500x375 colour' when a PIL image differs greatly from the training images: its short
        side over 8x the model's input (the downscale throws away what the model would need), or
        colour into a grayscale model (or grayscale into a colour one); '' when it does not."""
        from ..data.images import GRAY_MODES, file_size, has_colour

        c, size = self.preprocess.channels, self.preprocess.image_size
        colour = has_colour(img)
        wrong_kind = (c == 1 and colour) or (c == 3 and img.mode in GRAY_MODES)
        w, h = file_size(img)
        # a photo model (--resize crop) was trained on photos of any size: only the kind can differ
        too_large = min(w, h) > 8 * size and self.preprocess.resize != "crop"
        if not too_large and not wrong_kind:
            return ""
        return f"{w}x{h} {'colour' if colour else 'grayscale'}"

    def training_images(self):
        """'1x28x28 grayscale': what the model was trained on, for messages."""
        c, size = self.preprocess.channels, self.preprocess.image_size
        return f"{c}x{size}x{size} {'grayscale' if c == 1 else 'colour'}"

    def predict(self, items, top_k=5, invert=None, batch_size=256):
        """Top-k predictions per item: a list of lists of {label, index, probability}."""
        check_top_k(top_k)
        if not isinstance(items, (list, tuple)):
            items = [items]
        out = []
        for i in range(0, len(items), batch_size):
            batch = torch.stack([self.preprocess.image(it, invert=invert) for it in items[i:i + batch_size]])
            out += self.classify(batch, top_k)
        return out

    def top_k(self, probs, k):
        values, indices = probs.topk(min(k, probs.shape[1]), dim=1)
        return [[{"label": self.classes[j], "index": int(j), "probability": float(p)} for p, j in zip(vs, ix)]
                for vs, ix in zip(values.tolist(), indices.tolist())]


class Model(Classifier):
    """The checkpoint's network in PyTorch: also `net`, `inputs` and `logits`."""
    backend = "torch"

    def __init__(self, ckpt, device="cpu", path=""):
        self.net = checkpoint.build_model(ckpt, path)
        self.device = torch.device(device)
        # NHWC: 2.3x faster inference on the CPU for the seed CNN (benchmarks/README.md)
        self.net.to(self.device, memory_format=torch.channels_last).eval()
        self.classes, self.preprocess = list(ckpt["classes"]), checkpoint.preprocess_of(ckpt)
        self.metrics, self.config, self.path = ckpt.get("metrics", {}), ckpt.get("config", {}), path
        self.in_shape = tuple(ckpt["model"]["in_shape"])
        self.scale_shift = self.preprocess.scale_shift(self.device)
        self.temperature = checkpoint.temperature_of(ckpt)   # 1.0 unless trained with --calibrate

    def __repr__(self):
        return f"cnnlab.Model({self.config.get('model')}, classes={self.classes})"

    def _repr_html_(self):
        """Jupyter shows the network, its classes and inputs, and its run's curves and confusion matrix."""
        from ..evaluation.report import notebook_html

        rows = [("model", self.config.get("model")), ("classes", ", ".join(map(str, self.classes))),
                ("input", "x".join(map(str, self.in_shape))), ("checkpoint", self.path),
                ("validation accuracy", self.metrics.get("val_acc")), ("temperature", self.temperature)]
        run_dir = os.path.dirname(self.path) if self.path else None
        return notebook_html(f"cnnlab.Model {self.config.get('model')}", rows, run_dir)

    def inputs(self, batch_uint8):
        """(B, C, S, S) uint8 -> the network's input, normalised as in training (BatchLoader)."""
        return self.preprocess.normalise(batch_uint8.to(self.device), self.scale_shift)

    @torch.inference_mode()
    def logits(self, batch_uint8):
        """(B, C, S, S) uint8 -> (B, K) logits (divided by the checkpoint's temperature)."""
        return self.net(self.inputs(batch_uint8).contiguous(memory_format=torch.channels_last)).float() / self.temperature

    def view_probabilities(self, batch_uint8):
        return self.logits(batch_uint8).softmax(1).cpu()

    def explain(self, items, target=None, layer=None, invert=None):
        """Grad-CAM (evaluation/explain.py) of images (paths, PIL images, arrays, or a uint8 batch):
        one dict per image with `predicted`, `probability`, `target`, `heatmap` (S, S) in [0, 1]
        and `layer`; `target` a class name (default: each image's top-1), `layer` a module name."""
        from ..evaluation.explain import explain_batch

        if torch.is_tensor(items) and items.dtype == torch.uint8 and items.dim() == 4:
            batch = items
        else:
            batch = torch.stack([self.preprocess.image(it, invert=invert)
                                 for it in (items if isinstance(items, (list, tuple)) else [items])])
        return explain_batch(self.net, self.preprocess, batch, self.classes, target, layer)


class OnnxModel(Classifier):
    """An ONNX file written by `cnnlab export`, run by onnxruntime on the CPU; everything else it
    needs (classes, preprocessing, input format) comes from the file's own metadata."""
    backend = "onnx"

    def __init__(self, path, source=None):
        """`source`: the torch Model this file was exported from on the fly (its path and metrics are kept)."""
        from ..data.preprocess import Preprocess
        from . import onnxgraph

        self.session = onnxgraph.session(path)
        meta = onnxgraph.read_metadata(self.session, path)
        self.classes, self.preprocess = meta["classes"], Preprocess.from_dict(meta["preprocessing"])
        self.raw_input = meta["input_format"] == onnxgraph.RAW
        self.gives_probabilities = meta["output"] == "probabilities"
        size = self.preprocess.image_size
        self.in_shape = (self.preprocess.channels, size, size)
        self.config = {"model": meta["model"]}
        self.metrics = {"test_acc": float(meta["test_accuracy"])} if "test_accuracy" in meta else {}
        self.path = path
        if source is not None:
            self.path, self.metrics, self.config = source.path, source.metrics, source.config

    def __repr__(self):
        return f"cnnlab.OnnxModel({self.config['model']}, classes={self.classes})"

    def graph_input(self, batch_uint8):
        if not self.raw_input:
            return self.preprocess.normalise(batch_uint8).numpy()
        if self.preprocess.invert:   # preprocess.image inverted it already, and the graph inverts too
            batch_uint8 = 255 - batch_uint8
        return batch_uint8.permute(0, 2, 3, 1).contiguous().numpy()   # (B, H, W, C)

    def view_probabilities(self, batch_uint8):
        scores = torch.from_numpy(self.session.run(None, {"images": self.graph_input(batch_uint8)})[0])
        return scores if self.gives_probabilities else scores.softmax(1)


def load(path, device="cpu", backend=None):
    """A checkpoint file or run folder (its best.pt) -> Model; with backend 'onnx', or for an .onnx
    file, an OnnxModel (a checkpoint is exported on the fly to a temporary file, parity-checked)."""
    path = str(path)
    is_onnx = path.endswith(".onnx")
    backend = backend or ("onnx" if is_onnx else "torch")
    if is_onnx and backend != "onnx":
        raise UsageError(f"{path} is an ONNX file: it runs with --backend onnx (or give a checkpoint or run folder).")
    if is_onnx:
        return OnnxModel(path)
    resolved = checkpoint.resolve(path)
    model = Model(checkpoint.load(resolved), device=device, path=resolved)
    return exported_on_the_fly(model) if backend == "onnx" else model


def exported_on_the_fly(model):
    """The OnnxModel of a torch Model, through a temporary file (onnxruntime keeps the graph in memory)."""
    from . import onnxgraph

    with tempfile.TemporaryDirectory() as folder:
        out = os.path.join(folder, "model.onnx")
        onnxgraph.check_parity("onnx", *onnxgraph.write(model, out), out)
        return OnnxModel(out, source=model)
