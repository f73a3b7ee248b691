"""Published networks by name: `tv/NAME` is any torchvision classification model
(`torchvision.models.list_models`), `timm/NAME` any timm model when timm is installed.

They are built like cnnlab's own networks, from the data: `build_backbone(name, in_shape,
num_classes)` gives the architecture with a fresh head for the data's classes and a first
convolution taking the data's channels. Pretrained weights are not a builder's business: a
checkpoint rebuilds the bare architecture from its name and loads its own weights, and training
loads `--weights` afterwards (models/weights.py). So rebuilding a model never downloads anything
and never runs code from a file.

These names live beside the registry (models/__init__.py), not in it: the registry's tests build
every registered model, and torchvision alone has 80 of them, some of 600M parameters.
"""
from contextlib import contextmanager

from ..errors import UsageError, closest

FAMILIES = {"tv": "torchvision", "timm": "timm"}
# Builder arguments some torchvision models need to behave as plain classifiers: googlenet and
# inception_v3 otherwise return (logits, aux logits) tuples in train mode, and their scipy-based
# truncated-normal init takes seconds; init_weights=True keeps torchvision's own initialisation.
TV_EXTRA = {"googlenet": {"aux_logits": False, "init_weights": True},
            "inception_v3": {"aux_logits": False, "init_weights": True}}
# Vision transformers fix their input side at build time (positional embeddings per patch).
TV_SIZED = ("vit_",)


def is_backbone(name):
    """True for a `tv/...` or `timm/...` name."""
    family, sep, arch = str(name).partition("/")
    return bool(sep) and family in FAMILIES


def backbone_names(family):
    """Every model name of a family ("tv" or "timm"), prefixed."""
    if family == "tv":
        import torchvision.models as tvm

        return [f"tv/{n}" for n in tvm.list_models(module=tvm)]
    return [f"timm/{n}" for n in timm_module().list_models()]


def timm_module():
    try:
        import timm
    except ImportError:
        raise UsageError("timm/ models need the timm package: pip install 'cnnlab[timm]' "
                         "(or use a torchvision model, tv/NAME).") from None
    return timm


def check_backbone(name):
    """A UsageError naming the closest model for an unknown tv/ or timm/ name. The list is not
    printed (timm has over a thousand names): `cnnlab models --family` shows it."""
    family = name.partition("/")[0]
    names = backbone_names(family)
    if name not in names:
        hint = closest(name, names)
        raise UsageError(f"unknown model '{name}'." + (f" Did you mean '{hint}'?" if hint else "")
                         + f" See `cnnlab models --family {FAMILIES[family]}`.")


def build_backbone(name, in_shape, num_classes):
    """The architecture `name` for (C, H, W) inputs and `num_classes` outputs, randomly initialised."""
    family, _, arch = name.partition("/")
    channels, side = in_shape[0], in_shape[1]
    if family == "timm":   # timm adapts the stem and the head itself
        return timm_module().create_model(arch, pretrained=False, num_classes=num_classes, in_chans=channels)
    import torchvision.models as tvm

    extra = dict(TV_EXTRA.get(arch, {}))
    if arch.startswith(TV_SIZED):
        extra["image_size"] = side
    with widths_on_cpu(arch):
        net = tvm.get_model(arch, weights=None, num_classes=num_classes, **extra)
    if channels != 3:
        adapt_stem(net, channels)
    return net


@contextmanager
def widths_on_cpu(arch):
    """RegNet computes its block widths with tensor arithmetic and reads them back (.tolist()): on the
    meta device (models.footprint measures networks there) the tensors have no values. Its width
    rule is run on the CPU while this is open; every other model is left alone."""
    if not arch.startswith("regnet"):
        yield
        return
    import torch
    from torchvision.models import regnet

    rule = regnet.BlockParams.from_init_params

    def on_cpu(*args, **kwargs):
        with torch.device("cpu"):
            return rule(*args, **kwargs)
    regnet.BlockParams.from_init_params = on_cpu
    try:
        yield
    finally:
        regnet.BlockParams.from_init_params = rule


def first_conv(net):
    """(qualified name, module) of the first 2-d convolution taking 3 channels: the stem."""
    import torch

    return next(((n, m) for n, m in net.named_modules() if isinstance(m, torch.nn.Conv2d) and m.in_channels == 3),
                (None, None))


def adapt_stem(net, channels):
    """Replace the stem's 3-channel convolution by one taking `channels` (same kernel, stride,
    padding, bias); pretrained RGB weights are summed into it when loaded (weights.fit_stem)."""
    import torch

    name, conv = first_conv(net)
    if conv is None:
        raise UsageError(f"found no 3-channel convolution to adapt to {channels}-channel inputs.")
    new = torch.nn.Conv2d(channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding,
                          conv.dilation, conv.groups, conv.bias is not None, conv.padding_mode)
    parent_name, _, attr = name.rpartition(".")
    setattr(net.get_submodule(parent_name) if parent_name else net, attr, new)


def head_names(net, num_classes):
    """Parameter names of the classifier head: those of the last module whose output is the
    `num_classes` logits (the final Linear, or squeezenet's 1x1 convolution). They are what is
    re-made for new classes, and what trains alone while the backbone is frozen."""
    import torch

    head = None
    for name, module in net.named_modules():
        weight = getattr(module, "weight", None)
        if isinstance(module, (torch.nn.Linear, torch.nn.Conv2d)) and weight is not None and weight.shape[0] == num_classes:
            head = name
    if head is None:
        return []
    return [f"{head}.{p}" for p, _ in net.get_submodule(head).named_parameters()]
