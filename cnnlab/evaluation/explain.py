"""Grad-CAM (Selvaraju et al. 2017) with captum's LayerGradCam: where in an image the network
looked for the class it scored. The layer is found automatically: the last module whose output
is still a spatial feature map (B, C, H, W with H*W > 1) before the network pools it away;
`layer` overrides it with a name from `net.named_modules()`.

Used by `cnnlab explain`, the Python API (cnnlab.explain, Model.explain), report.html's
highest-loss mistakes and serve's POST /explain."""
import math
import os

import numpy as np
import torch

from ..atomic import atomic_path
from ..errors import CnnlabError, UsageError, unknown

POOLS = (torch.nn.modules.pooling._MaxPoolNd, torch.nn.modules.pooling._AvgPoolNd,
         torch.nn.modules.pooling._AdaptiveAvgPoolNd, torch.nn.modules.pooling._AdaptiveMaxPoolNd)


def captum_attr():
    try:
        from captum import attr
    except ImportError:
        raise CnnlabError("Grad-CAM needs captum: pip install 'cnnlab[explain]'") from None
    return attr


def spatial_modules(net, in_shape):
    """[(name, module)] of the modules that output a spatial map in one forward pass of a blank
    image, in the order they finish, leaving out pooling layers, the modules that merely pass a
    pooling layer's output on (a Sequential ending in a pool) and modules called more than once
    (a shared ReLU: Grad-CAM needs one activation per image)."""
    device = next(net.parameters()).device
    calls, outputs, pooled = {}, [], set()

    def record(name):
        def hook(module, args, out):
            calls[name] = calls.get(name, 0) + 1
            if isinstance(module, POOLS):
                pooled.add(id(out))
            elif torch.is_tensor(out) and out.dim() == 4 and out.shape[2] * out.shape[3] > 1 and id(out) not in pooled:
                outputs.append((name, module))
            keep.append(out)   # ids stay unique while the pass runs
        return hook

    keep = []
    handles = [m.register_forward_hook(record(n)) for n, m in net.named_modules() if n]
    try:
        was_training = net.training
        with torch.no_grad():
            net.eval()(torch.zeros(1, *in_shape, device=device))
        net.train(was_training)
    finally:
        for h in handles:
            h.remove()
    return [(n, m) for n, m in outputs if calls[n] == 1]


def find_layer(net, in_shape, name=None):
    """(name, module) Grad-CAM attributes to: `name` when given, else the last spatial module."""
    if name:
        modules = dict(net.named_modules())
        if name not in modules or not name:
            raise unknown("layer", name, [n for n in modules if n])
        return name, modules[name]
    found = spatial_modules(net, in_shape)
    if not found:
        raise CnnlabError("this network has no layer with a spatial feature map for Grad-CAM; name one with --layer.")
    return found[-1]


def gradcam(net, inputs, targets, layer):
    """(B, H, W) float numpy heatmaps in [0, 1] at the input's size: ReLU'd Grad-CAM of class
    `targets` (B,) at `layer` (a module of `net`), each scaled by its own maximum."""
    attr = captum_attr()
    was_training = net.training
    net.eval()
    cam = attr.LayerGradCam(net, layer).attribute(inputs, target=targets, relu_attributions=True)  # (B, 1, h, w)
    net.train(was_training)
    cam = attr.LayerAttribution.interpolate(cam.detach().float(), tuple(inputs.shape[2:]), "bilinear")[:, 0]
    top = cam.flatten(1).amax(1).clamp(min=1e-12)[:, None, None]
    return (cam / top).clamp(0, 1).cpu().numpy()


def class_index(classes, target):
    """A --target given as a class name (or its index) -> the output index."""
    if target in classes:
        return classes.index(target)
    if str(target).isdigit() and int(target) < len(classes):
        return int(target)
    raise unknown("class", str(target), classes)


def explain_batch(net, preprocess, batch_uint8, classes, target=None, layer=None):
    """Grad-CAM of a uint8 batch (B, C, S, S): a list of {predicted, probability, target,
    target_probability, heatmap (S, S) in [0, 1], layer} dicts. `target`: a class name or index
    for every image (None: each image's top-1 class)."""
    device = next(net.parameters()).device
    inputs = preprocess.normalise(batch_uint8.to(device))
    name, module = find_layer(net, tuple(batch_uint8.shape[1:]), layer)
    with torch.no_grad():
        probs = net.eval()(inputs).float().softmax(1).cpu()
    predicted = probs.argmax(1)
    targets = predicted if target is None else torch.full_like(predicted, class_index(classes, target))
    heat = gradcam(net, inputs.requires_grad_(), targets.to(device), module)
    return [{"predicted": classes[int(p)], "probability": float(probs[i, p]), "target": classes[int(t)],
             "target_probability": float(probs[i, t]), "heatmap": heat[i], "layer": name}
            for i, (p, t) in enumerate(zip(predicted, targets))]


def overlay(img_uint8, heatmap, alpha=0.45, min_side=224):
    """(C, S, S) uint8 image + (S, S) heatmap -> an RGB PIL image, the heatmap in matplotlib's
    jet colours over the picture, scaled up (nearest) so a 28-pixel digit is visible."""
    from matplotlib import colormaps
    from PIL import Image

    img = np.asarray(img_uint8)
    rgb = np.repeat(img, 3, 0) if img.shape[0] == 1 else img[:3]
    colours = colormaps["jet"](heatmap)[..., :3] * 255                      # (S, S, 3)
    mixed = (1 - alpha) * rgb.transpose(1, 2, 0) + alpha * colours
    picture = Image.fromarray(mixed.clip(0, 255).astype(np.uint8))
    scale = max(1, math.ceil(min_side / picture.width))
    return picture.resize((picture.width * scale, picture.height * scale), Image.NEAREST)


def save_png(picture, path):
    with atomic_path(path) as tmp:
        picture.save(tmp, format="PNG")
    return path


def save_contact_sheet(images, results, titles, path, cols=6):
    """All overlays on one page, each titled with its file and the explained class."""
    from . import plots

    n = len(results)
    cols = min(cols, n)
    rows = math.ceil(n / cols)
    fig, axes = plots.plt.subplots(rows, cols, figsize=(2.4 * cols, 2.8 * rows), squeeze=False)
    for ax, img, r, title in zip(axes.flat, images, results, titles):
        plots._show(ax, img)
        ax.imshow(r["heatmap"], cmap="jet", alpha=0.45, vmin=0, vmax=1)
        ax.set_title(f"{os.path.basename(title)[:18]}\n{r['target']} {r['target_probability']:.0%}", fontsize=9)
    for ax in list(axes.flat)[n:]:
        ax.axis("off")
    fig.suptitle(f"Grad-CAM at layer '{results[0]['layer']}'")
    return plots._save(fig, path)


def write_explanations(images, results, names, out):
    """One overlay PNG per image (NAME.gradcam.png) and contact_sheet.png into folder `out`;
    returns the paths written."""
    os.makedirs(out, exist_ok=True)
    paths = []
    for img, r, name in zip(images, results, names):
        stem = os.path.splitext(os.path.basename(name))[0]
        paths.append(save_png(overlay(img, r["heatmap"]), os.path.join(out, f"{stem}.gradcam.png")))
    paths.append(save_contact_sheet(images, results, names, os.path.join(out, "contact_sheet.png")))
    return paths


def mistake_heatmaps(net, preprocess, images, probs, indices):
    """{index: heatmap} of the predicted class for the test images at `indices` (report.html's
    highest-loss mistakes); {} when captum is not installed."""
    try:
        captum_attr()
    except CnnlabError:
        return {}
    batch = torch.as_tensor(np.asarray(images)[np.asarray(indices)])
    classes = [str(i) for i in range(np.asarray(probs).shape[1])]
    results = explain_batch(net, preprocess, batch, classes)
    return {int(i): r["heatmap"] for i, r in zip(indices, results)}
