"""Your own networks in cnnlab: an `nn.Module` class or factory becomes a model registry entry.

    @cnnlab.register_model("tinynet")            # in mymodels.py; `cnnlab train --plugin mymodels.py --model tinynet`
    class TinyNet(nn.Module):
        def __init__(self, num_classes, width=16): ...

A class (or factory) is called with the arguments it names: `in_shape` (C, H, W) and
`num_classes` from the data when its signature has them, plus `model_args`. Handed to
`cnnlab.train(model=Net)` or `model=Net()`, it is registered under its import path `module:Qualname`.

Checkpoints store that name, the constructor arguments (plain values) and the file that defined
it, never code. Loading imports nothing by itself: the user names their module (`--plugin
FILE_OR_MODULE`, `plugins=[...]`), and a model from a module not given is refused in one line
that names the module. Only callables found in modules the user gave are ever called.
"""
import importlib
import importlib.util
import inspect
import os
import sys

from .errors import UsageError

LOADED = {}   # what the user named (a file's real path, or a module name) -> the module


def use(plugins):
    """Import the user's modules (files ending in .py, or importable module names), once each;
    their @register_model / @register_dataset entries are then known. Returns the modules."""
    if isinstance(plugins, (str, os.PathLike)):
        plugins = [plugins]
    return [import_plugin(os.fspath(p)) for p in plugins or ()]


def import_plugin(name):
    is_file = name.endswith(".py") or os.sep in name
    key = os.path.realpath(name) if is_file else name
    if key in LOADED:
        return LOADED[key]
    if is_file and not os.path.isfile(name):
        raise UsageError(f"--plugin {name}: no such file (give a .py file, or a module name importable from here).")
    try:
        module = import_file(name) if is_file else import_module(name)
    except UsageError:
        raise
    except Exception as e:   # the user's code failed: one line, theirs to fix
        first = str(e).splitlines()[0][:160] if str(e) else ""
        raise UsageError(f"--plugin {name} failed to import: {type(e).__name__}: {first}") from None
    LOADED[key] = module
    return module


def import_file(path):
    """A .py file as the module named by its stem (a script's `if __name__ == "__main__":` part does not run)."""
    name = os.path.splitext(os.path.basename(path))[0]
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module   # before running it: dataclasses and pickling look themselves up there
    try:
        spec.loader.exec_module(module)
    except BaseException:
        sys.modules.pop(name, None)
        raise
    return module


def import_module(name):
    if os.getcwd() not in sys.path:   # `cnnlab` (the console script) does not put the current folder there
        sys.path.insert(0, os.getcwd())
    try:
        return importlib.import_module(name)
    except ModuleNotFoundError as e:
        if e.name and name.startswith(e.name):
            raise UsageError(f"--plugin {name}: no such module (give a .py file, or a module importable from "
                             f"{os.getcwd()}).") from None
        raise


# ---------------------------------------------------------------------------------------- models

def register_model(name):
    """Decorator: make an nn.Module class or factory a model under `name`, for cnnlab.train(model=name)
    and `cnnlab train --plugin FILE --model name`. It is called with `in_shape` / `num_classes`
    when its signature names them, plus the run's model_args; it returns an nn.Module.

        @cnnlab.register_model("tinynet")
        class TinyNet(nn.Module):
            def __init__(self, num_classes, width=16): ...
    """
    def wrap(obj):
        add_model(name, obj)
        return obj
    return wrap


def add_model(name, obj):
    """REGISTRY[name] = a builder (in_shape, num_classes, **args) around `obj`. The same object's
    module registering again (a re-run notebook cell, a plugin imported twice) replaces it; a name
    taken by another model is refused."""
    from .models import REGISTRY, model_names

    model_names()   # the built-in families are registered first, so a clash is seen
    old = REGISTRY.get(name)
    if old is not None and getattr(old, "plugin", None) != plugin_file(obj):
        raise UsageError(f"model name '{name}' is already taken ({getattr(old, 'source', '')}); register yours under "
                         "another name.")
    REGISTRY[name] = model_builder(obj)
    return name


def model_builder(obj):
    """`obj`'s call as a registry builder: the signature cnnlab reads knobs from (models.model_knobs)."""
    if not callable(obj):
        raise UsageError(f"model {obj!r} is not an nn.Module class, a factory or an nn.Module instance.")
    params = inspect.signature(obj).parameters
    takes = [k for k in ("in_shape", "num_classes") if k in params]
    knobs = [p for k, p in params.items() if k not in takes and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]

    def builder(in_shape, num_classes, **args):
        given = {"in_shape": tuple(in_shape), "num_classes": int(num_classes)}
        net = obj(**{k: given[k] for k in takes}, **args)
        check_outputs(net, obj, in_shape, num_classes)
        if not takes_channels_last(net, in_shape):
            keep_nchw(net)
        return net

    fixed = [inspect.Parameter(k, inspect.Parameter.POSITIONAL_OR_KEYWORD) for k in ("in_shape", "num_classes")]
    builder.__signature__ = inspect.Signature(fixed + knobs)
    builder.source = f"your own: {import_path(obj)}"
    builder.plugin = plugin_file(obj)
    builder.user = obj
    return builder


def check_outputs(net, obj, in_shape, num_classes):
    """A network that is not an nn.Module, or gives another number of scores than the data has
    classes, fails here with both numbers (the loss would fail later with neither)."""
    import torch

    if not isinstance(net, torch.nn.Module):
        raise ValueError(f"{import_path(obj)} returned a {type(net).__name__}, not an nn.Module")
    was_training = net.training
    net.eval()   # no dropout draws, no BatchNorm statistics: building stays free of side effects
    with torch.no_grad():
        out = net(torch.zeros(2, *in_shape))
    net.train(was_training)
    if tuple(out.shape) != (2, num_classes):
        raise ValueError(f"it gives outputs of shape {tuple(out.shape[1:])} per image, but the data has "
                         f"{num_classes} classes: make its last layer output {num_classes} scores (or, when some "
                         "classes are absent from the labels, name them all: class_names=[...])")


def takes_channels_last(net, in_shape):
    """cnnlab runs networks on NHWC tensors (channels_last: faster convolutions); tutorials flatten
    with `x.view(-1, n)`, which refuses NHWC strides. Tried once, on a copy of the input's layout."""
    import torch

    was_training = net.training
    net.eval().to(memory_format=torch.channels_last)
    try:
        with torch.no_grad():
            net(torch.zeros(2, *in_shape).contiguous(memory_format=torch.channels_last))
        return True
    except RuntimeError:
        return False
    finally:
        net.to(memory_format=torch.contiguous_format).train(was_training)


def keep_nchw(net):
    """Make `net` ignore channels_last: its inputs become NCHW-contiguous, and `.to(memory_format=...)`
    leaves its weights as they are (a convolution gives NHWC outputs if its input or weights are)."""
    import types

    net.register_forward_pre_hook(lambda module, inputs: tuple(
        x.contiguous() if hasattr(x, "contiguous") else x for x in inputs))
    net.to = types.MethodType(to_without_memory_format, net)   # deepcopy (the EMA) rebinds it to the copy


def to_without_memory_format(net, *args, **kwargs):
    kwargs.pop("memory_format", None)
    return type(net).to(net, *args, **kwargs)


def import_path(obj):
    return f"{obj.__module__}:{obj.__qualname__}"


def plugin_file(obj):
    """What the user gives to --plugin to get `obj` back: its source file, else its module."""
    try:
        return inspect.getsourcefile(obj) or obj.__module__
    except TypeError:   # built-in or dynamically made
        return obj.__module__


def model_setting(model, model_args=None):
    """cnnlab.train(model=...): a name stays a name; a class or factory is registered under its
    import path; an instance too, once its class rebuilt with `model_args` is the same network.
    Returns (name, model_args, the instance or None)."""
    import torch

    if isinstance(model, str):
        return model, model_args, None
    args = dict(model_args or {})
    if isinstance(model, torch.nn.Module):
        check_rebuilds(model, args)
        return add_model(import_path(type(model)), type(model)), args, model
    return add_model(import_path(model), model), args, None


def check_rebuilds(instance, args):
    """A checkpoint rebuilds a model from its class and arguments, so an instance must be what
    `type(instance)(**args)` makes: same layers (their repr) and same weight shapes."""
    import torch

    cls = type(instance)
    hint = (f"model={cls.__name__}(...) was built with arguments cnnlab cannot see; pass the class and its "
            f"arguments instead: model={cls.__name__}, model_args={{...}}")
    try:
        with torch.random.fork_rng(devices=[]):   # the user's random stream is left as it was
            twin = cls(**args)
    except TypeError as e:
        raise UsageError(f"{hint} ({e}).") from None
    same_shapes = {k: v.shape for k, v in twin.state_dict().items()} == {
        k: v.shape for k, v in instance.state_dict().items()}
    if repr(twin) != repr(instance) or not same_shapes:
        raise UsageError(f"{hint}.")


def find_model(name):
    """A `module:Qualname` model name from a checkpoint or config, looked up in the modules the
    user gave (--plugin, plugins=[...]) and registered; otherwise one line naming the module."""
    module, _, qualname = name.partition(":")
    for candidate in LOADED.values():
        obj = lookup(candidate, qualname)
        # only what the module itself defines: `--plugin os` must not make "os:system" a model
        if obj is not None and getattr(obj, "__module__", None) == candidate.__name__ and (
                candidate.__name__ == module or module == "__main__" or len(LOADED) == 1):
            return add_model(name, obj)
    raise missing_plugin(name, module)


def require(name, plugin="", path=""):
    """A checkpoint's (`path`) user model, registered from the modules the user gave, or one line naming `plugin`."""
    from .models import REGISTRY

    if name in REGISTRY:
        return
    if ":" in name:
        try:
            find_model(name)
            return
        except UsageError:
            pass
    raise missing_plugin(name, plugin or name.partition(":")[0], path)


def missing_plugin(name, plugin, path=""):
    where = "the script or notebook" if plugin == "__main__" else plugin
    return UsageError(f"{path}: " * bool(path) + f"model '{name}' is your own code, and cnnlab imports code only "
                      f"when asked: give the module that defines it ({where}) with --plugin FILE_OR_MODULE, or "
                      "cnnlab.load(..., plugins=[...]).")


def lookup(module, qualname):
    obj = module
    for part in qualname.split("."):
        obj = getattr(obj, part, None)
    return obj if callable(obj) else None


# -------------------------------------------------------------------------------------- datasets

def register_dataset(name, **info):
    """Decorator: make a function a dataset under `name`, for cnnlab.train(data=name) and
    `cnnlab train --plugin FILE --data name`. It takes the run's DataConfig (or nothing) and
    returns arrays `(x, y[, x_test, y_test])`, a torch Dataset, `(train_dataset, test_dataset)`
    or a cnnlab Source; keywords as `cnnlab datasets` shows them (description, shape, classes,
    sizes). Splits, class selection and resizing are cnnlab's, as for every dataset.

        @cnnlab.register_dataset("blobs", description="two blobs")
        def blobs(cfg):
            return x, y                      # uint8 (N, H, W) and labels 0..K-1
    """
    from .data.registry import REGISTRY, register_dataset as register

    def wrap(fn):
        old = REGISTRY.get(name)
        if old is not None and getattr(old.build, "plugin", None) == plugin_file(fn):
            del REGISTRY[name]   # the same module registering again (a re-run notebook cell)
        elif old is not None:
            raise UsageError(f"dataset name '{name}' is already taken; register yours under another name.")
        doc = (fn.__doc__ or "").strip().splitlines()
        register(name, **{"description": doc[0] if doc else f"your own: {import_path(fn)}", **info})(
            dataset_builder(fn))
        return fn
    return wrap


def dataset_builder(fn):
    """`fn`'s call as a registry builder (cfg -> Source)."""
    takes_cfg = bool(inspect.signature(fn).parameters)

    def build(cfg):
        from .data.arrays import to_source
        from .data.registry import Source

        out = fn(cfg) if takes_cfg else fn()
        return out if isinstance(out, Source) else to_source(out)

    build.plugin = plugin_file(fn)
    return build
