"""`cnnlab models`: the zoo as a table, or one model layer by layer (torchinfo, as seed 003 does)."""
from ..errors import UsageError
from . import REGISTRY, count_params, create_model, forward_flops, model_names


def data_shape(data, data_dir):
    """(C, H, W) and class count of a dataset, without loading it when its registration says."""
    from ..config import DataConfig
    from ..data import declared_shape, load_data

    known = declared_shape(data)
    if known:
        return known
    loaded = load_data(DataConfig(data=data, data_dir=data_dir))
    return loaded.shape, len(loaded.classes)


def list_models(data="mnist-5k", data_dir="data"):
    shape, k = data_shape(data, data_dir)
    lines = [f"models for {data} ({'x'.join(map(str, shape))}, {k} classes):",
             f"{'name':<20} {'params':>11} {'MFLOPs':>9}  from"]
    for name in model_names():
        try:
            model = create_model(name, shape, k)
            lines.append(f"{name:<20} {count_params(model):>11,} {forward_flops(model, shape) / 1e6:>9.2f}  {REGISTRY[name].source}")
        except (RuntimeError, UsageError) as e:  # e.g. too many poolings for a tiny image
            lines.append(f"{name:<20} {'-':>11} {'-':>9}  does not fit this input: {str(e).splitlines()[0][:60]}")
    return "\n".join(lines)


def describe_model(name, data="mnist-5k", data_dir="data"):
    from torchinfo import summary

    shape, k = data_shape(data, data_dir)
    model = create_model(name, shape, k)
    stats = summary(model, input_size=(1, *shape), verbose=0, col_names=("output_size", "num_params"), device="cpu")
    return f"{name}: {REGISTRY[name].source}\n{stats}"


def list_backbones(family, data="mnist-5k", data_dir="data", image_size=0, contains=""):
    """`cnnlab models --family torchvision|timm [TEXT]`: the family's networks (names containing
    TEXT) with parameters and forward FLOPs for the data's shape (or --image-size), counted on
    the meta device: shapes only, so a 600M-parameter network costs no memory. timm's thousand-odd
    names are listed without numbers unless TEXT narrows them."""
    from .backbones import FAMILIES, backbone_names

    prefix = next((k for k, v in FAMILIES.items() if family in (k, v)), None)
    if prefix is None:
        raise UsageError(f"unknown model family '{family}': torchvision or timm.")
    if image_size < 0:
        raise UsageError(f"--image-size {image_size} must be a side in pixels (0: the data's own size).")
    shape, k = data_shape(data, data_dir)
    shape = (shape[0], image_size, image_size) if image_size else shape
    names = [n for n in backbone_names(prefix) if contains in n]
    if prefix == "timm" and not contains:
        return "\n".join([f"{len(names)} timm models (give part of a name, e.g. `cnnlab models --family timm "
                          "resnet`, for their parameters and FLOPs):", *names])
    lines = [f"{family} models for {data} at {'x'.join(map(str, shape))}, {k} classes:",
             f"{'name':<28} {'params':>13} {'MFLOPs':>10}"]
    for name in names:
        try:
            params, flops = measure_on_meta(name, shape, k)
            lines.append(f"{name:<28} {params:>13,} {flops / 1e6:>10.1f}")
        # e.g. maxvit's windows need 224-multiple sides, ViT's patches an exact tiling
        except (RuntimeError, ValueError, AssertionError, UsageError) as e:
            lines.append(f"{name:<28} {'-':>13} {'-':>10}  does not fit this input: {str(e).splitlines()[0][:50]}")
    return "\n".join(lines)


def measure_on_meta(name, shape, k):
    """(parameters, forward FLOPs of one image) of a network built on the meta device."""
    import warnings

    import torch

    from . import build

    with torch.device("meta"), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = build(name, shape, k, {})
        return count_params(model), forward_flops(model, shape)
