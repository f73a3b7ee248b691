"""The model registry: `@register` a builder, `create_model(name, in_shape, num_classes, **args)`.

Every builder takes the input shape (C, H, W) and class count from the data, plus the knobs its
tutorial varies, so a network adapts to any dataset; flatten sizes are computed, never typed in.

Sizes come from outside (a command line, a recipe, a checkpoint), so a network is measured before
it is built: `check_memory` builds it on the meta device (shapes, no memory), counts its parameters
and one image's activations, and refuses in one line what this machine cannot hold (hidden=2,000,000
used to allocate until the kernel killed the process). Networks `surely_small` skip the measuring.
"""
import inspect

from ..config import parse_scalar
from ..errors import UsageError, unknown
from ..runtime import available_memory
from .backbones import build_backbone, check_backbone, is_backbone

REGISTRY = {}
# An int knob far above its default can make a builder create millions of modules before anything
# could count them (net_res_deep takes ~5 ms a block even on the meta device): 1000x is the ceiling.
KNOB_CEILING = 1000
# Bytes per parameter: fp32 weights to build and predict; training adds their gradients and Adam's
# two moments (SGD with momentum keeps one: the estimate errs on the safe side).
BYTES_PER_PARAM = {"build": 4, "train": 16}
SMALL_BUILD = 256 * 2**20   # see surely_small


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
    from . import airbench, resnet  # noqa: F401
    from . import seeds  # noqa: F401(registration happens on import)


def model_names():
    _load_families()
    return sorted(REGISTRY)


def check_model_name(name):
    """UsageError with the closest name for a model that is neither registered, nor a plugin's
    module:Class, nor a tv/ or timm/ one."""
    _load_families()
    if is_backbone(name):
        check_backbone(name)
        return
    if name not in REGISTRY and ":" in name:   # module:Class, the user's own (plugins.py)
        from ..plugins import find_model

        find_model(name)
    if name not in REGISTRY:
        raise unknown("model", name, REGISTRY)


def model_knobs(name):
    """The settable arguments of a builder and their defaults (none for tv/ and timm/ networks)."""
    if is_backbone(name):
        return {}
    params = inspect.signature(REGISTRY[name]).parameters
    return {k: p.default for k, p in params.items() if k not in ("in_shape", "num_classes")}


def create_model(name, in_shape, num_classes, **args):
    """The network `name` for (C, H, W) inputs and `num_classes` outputs, once check_memory says
    this machine can hold it; `args` are its knobs, as text or values."""
    typed = model_args(name, args)
    if not surely_small(name, in_shape, num_classes, typed):
        check_memory(name, in_shape, num_classes, typed)
    return build(name, in_shape, num_classes, typed)


def build(name, in_shape, num_classes, args):
    """Run the builder; a value it cannot build with (p=1.5 for dropout, width=0 for a conv) is a UsageError."""
    try:
        if is_backbone(name):
            return build_backbone(name, tuple(in_shape), int(num_classes))
        return REGISTRY[name](tuple(in_shape), int(num_classes), **args)
    except (ValueError, RuntimeError) as e:
        raise UsageError(f"model '{name}' cannot be built with {args} for {shape_text(in_shape)} inputs: "
                         f"{str(e).splitlines()[0][:160]}.") from None


def surely_small(name, in_shape, num_classes, args):
    """True for a network no larger than the zoo's networks at their default knobs on inputs of up
    to 3x64x64 and 1000 classes, which need less than SMALL_BUILD to build (a test checks every
    registered model). Those are built unmeasured: the first meta-device operation of a process
    spends 1-3 s importing torch's meta kernels, which `cnnlab predict` on one image would pay."""
    if is_backbone(name):   # published networks reach 600M parameters: always measured
        return False
    defaults = model_knobs(name)
    at_most_default = all(type(defaults[k]) is not int or 0 < v <= defaults[k] for k, v in args.items())
    return at_most_default and in_shape[0] <= 3 and max(in_shape[1:]) <= 64 and num_classes <= 1000


def model_args(name, args):
    """`args` (--model-arg text or YAML values) in the types of the builder's knobs; unknown model
    or knob names are refused with the closest valid one."""
    check_model_name(name)
    knobs = model_knobs(name)
    for key in args:
        if key not in knobs:
            raise unknown(f"argument for model '{name}'", key, knobs)
    return {k: check_knob_range(name, k, knobs[k], parse_knob(name, k, knobs[k], v)) for k, v in args.items()}


def footprint(name, in_shape, num_classes, args):
    """(parameters, activation bytes of one image) of a network built on the meta device: shapes
    only, so a network far too large to exist is measured without allocating it. The activations
    are the outputs of its leaf layers, what a forward pass keeps for the backward. A network
    surely_small is built and run for real (the meta kernels are Python that imports
    torch._dynamo: 0.8 s, a sixth of a fast run), the random numbers its initialisation draws
    given back."""
    import warnings

    import torch

    outputs = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")   # "Initializing zero-element tensors is a no-op" for width=0
        device = "cpu" if surely_small(name, in_shape, num_classes, args) else "meta"
        with torch.random.fork_rng(devices=[]), torch.device(device), torch.no_grad():
            net = build(name, in_shape, num_classes, args)
            for module in net.modules():
                if not any(module.children()):
                    module.register_forward_hook(lambda module, inputs, output: outputs.append(output))
            try:
                net.eval()(torch.zeros(1, *in_shape))
            except (ValueError, RuntimeError):
                pass   # a network that cannot take this input fails where it always did; its parameters still count
    activations = sum(o.numel() * o.element_size() for o in outputs if torch.is_tensor(o))
    return count_params(net), activations


def check_memory(name, in_shape, num_classes, args, purpose="build", batch=1, device=None):
    """UsageError, before anything is allocated, when the network needs more memory than `device`
    (default the CPU) has available: parameters x BYTES_PER_PARAM[purpose] plus `batch` images'
    activations (twice when training: the outputs and their gradients)."""
    params, activations = footprint(name, in_shape, num_classes, args)
    per_batch = activations * batch * (2 if purpose == "train" else 1)
    need, have = params * BYTES_PER_PARAM[purpose] + per_batch, available_memory(device)
    if need > have:
        what = ", ".join(f"{k}={v}" for k, v in args.items()) or "its default arguments"
        raise UsageError(
            f"model '{name}' with {what} on {shape_text(in_shape)} inputs is too large to {purpose} here: "
            f"{params:,} parameters ({gib(params * BYTES_PER_PARAM[purpose])}) and {gib(per_batch)} of activations "
            f"for {batch} image(s) need {gib(need)}, but {gib(have)} is available. Use smaller model arguments"
            + (" or a smaller --image-size / --batch-size." if purpose == "train" else "."))
    return params, activations


def shape_text(in_shape):
    return "x".join(map(str, in_shape))


def gib(n):
    return f"{n / 2**30:.2f} GiB" if n >= 2**27 else f"{n / 2**20:.1f} MiB"


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


def check_knob_range(model, key, default, value):
    """An int knob at most KNOB_CEILING times its default; returns it."""
    if type(default) is int and default > 0 and value > KNOB_CEILING * default:
        raise UsageError(f"--model-arg {key}={value} for model '{model}' is out of range: at most "
                         f"{KNOB_CEILING * default} ({KNOB_CEILING}x the default {default}).")
    return value


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
