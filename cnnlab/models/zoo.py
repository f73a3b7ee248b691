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
