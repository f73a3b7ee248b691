"""The model registry: `@register` a builder, `create_model(name, in_shape, num_classes, **args)`.

Every builder takes the input shape (C, H, W) and class count from the data, plus the knobs its
tutorial varies, so a network adapts to any dataset; flatten sizes are computed, never typed in.
"""
import inspect

from ..config import parse_scalar
from ..errors import UsageError, unknown

REGISTRY = {}


def register(source):
    """Decorator: add a builder under its function name; `source` says which tutorial it is from."""
    def wrap(fn):
        if fn.__name__ in REGISTRY:
            raise ValueError(f"model '{fn.__name__}' registered twice")
        fn.source = source
        REGISTRY[fn.__name__] = fn
        return fn
    return wrap


def _load_families():
    from . import resnet
    from . import seeds  # noqa: F401(registration happens on import)


def model_names():
    _load_families()
    return sorted(REGISTRY)


def model_knobs(name):
    """The settable arguments of a builder and their defaults."""
    params = inspect.signature(REGISTRY[name]).parameters
    return {k: p.default for k, p in params.items() if k not in ("in_shape", "num_classes")}


def create_model(name, in_shape, num_classes, **args):
    _load_families()
    if name not in REGISTRY:
        raise unknown("model", name, REGISTRY)
    knobs = model_knobs(name)
    for key in args:
        if key not in knobs:
            raise unknown(f"argument for model '{name}'", key, knobs)
    typed = {k: parse_knob(name, k, knobs[k], v) for k, v in args.items()}
    try:
        return REGISTRY[name](tuple(in_shape), int(num_classes), **typed)
    except (ValueError, RuntimeError) as e:  # e.g. p=1.5 for dropout, width=0 for a conv
        raise UsageError(f"model '{name}' cannot be built with {typed}: {str(e).splitlines()[0][:160]}.") from None


def parse_knob(model, key, default, value):
    """A --model-arg value (a CLI string or a YAML value) in the type of the knob's default."""
    kind = type(default)
    if default is None or kind not in (bool, int, float, str):
        return value
    try:
        return parse_scalar(kind, value)
    except (TypeError, ValueError, OverflowError):
        expected = {bool: "true or false (yes/no, 1/0)", int: "a whole number", float: "a finite number",
                    str: "text"}[kind]
        raise UsageError(f"--model-arg {key}={value!r} for model '{model}': {key} must be {expected} "
                         f"(default {default!r}).") from None


def count_params(model):
    return sum(p.numel() for p in model.parameters())


def forward_flops(model, in_shape):
    """Forward FLOPs (2 x multiply-adds) for one image, counted by torch's own FLOP counter."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    was_training = model.training
    model.eval()
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(torch.zeros(1, *in_shape))
    model.train(was_training)
    return counter.get_total_flops()
