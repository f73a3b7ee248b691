"""Self-describing, safely loaded, atomically written checkpoints.

A checkpoint is a plain dict of tensors, numbers, strings and lists saved with torch.save and read
back with `torch.load(weights_only=True)`, which refuses any pickled object that is not plain data:
opening a checkpoint never runs code from it. It carries everything needed to rebuild and use the
model with no command line: model name and arguments, input shape, class names, preprocessing,
the resolved config and the metrics (nanoGPT's habit of storing the model's own arguments).

This module owns the format: `payload` builds it (training's last.pt and best.pt), `load` reads
and upgrades it, `build_model` / `preprocess_of` / `restore` turn it back into live objects.

    format, version        "cnnlab-checkpoint", VERSION
    model                  {name, args, in_shape, num_classes}: create_model's arguments
    classes                class names, in the model's output order
    preprocess             data.preprocess.Preprocess.to_dict(): how an image becomes the input
    config                 the resolved TrainConfig as a dict
    metrics                best.pt: {val_acc, epoch}; last.pt: {}
    state_dict             the weights (the EMA average in best.pt when --ema is on)
    train_state            last.pt only: {optimizer, ema, lookahead, rng, progress}, what --resume needs
    temperature            optional, best.pt after --calibrate: logits are divided by it (temperature.py)
"""
import io
import math
import os

import torch

from ..atomic import atomic_path
from ..errors import CnnlabError, UsageError
from ..models import count_params, create_model, model_args
from ..models.weights import torch_load_safely
from ..runtime import rng_state, set_rng_state

FORMAT = "cnnlab-checkpoint"
# 2: preprocess has "resize"; train_state.progress has "lr". Version 1 files are upgraded on load.
VERSION = 2


def resolve(path, name="best.pt"):
    """A run folder means its best.pt (or `name`); a file is itself."""
    if os.path.isdir(path):
        candidate = os.path.join(path, name)
        if not os.path.exists(candidate):
            raise CnnlabError(f"{path} is a folder without {name}; is it a cnnlab run folder?")
        return candidate
    if not os.path.exists(path):
        raise CnnlabError(f"checkpoint not found: {path}")
    return path


def save(payload, path):
    """Write atomically (cnnlab.atomic): a crash or a full disk at any moment leaves either the old
    file or the new one, never half of one."""
    buffer = io.BytesIO()   # torch's own file writer fails with a RuntimeError and no file name
    torch.save({"format": FORMAT, "version": VERSION, **payload}, buffer)
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        f.write(buffer.getbuffer())


def load(path, name="best.pt"):
    """The checkpoint dict, or one clear CnnlabError. Nothing in the file is executed."""
    path = resolve(path, name)
    ckpt = torch_load_safely(path)
    if isinstance(ckpt, dict) and ckpt.get("format") == FORMAT:
        problem = layout_problem(ckpt)
        if problem:
            raise CnnlabError(f"{path} is not a complete cnnlab checkpoint: {problem}.")
        return upgrade(ckpt, path)
    if isinstance(ckpt, dict) and ckpt and all(torch.is_tensor(v) for v in ckpt.values()):
        raise CnnlabError(f"{path} is a bare state_dict saved by plain PyTorch: it lacks the model name, "
                          "classes and preprocessing. Rebuild the network yourself and call "
                          "model.load_state_dict(torch.load(path, weights_only=True)), or train it with cnnlab.")
    raise CnnlabError(f"{path} is not a cnnlab checkpoint (no '{FORMAT}' marker).")


# The parts every checkpoint has, and their types (`metrics` and `train_state` are optional).
REQUIRED = {"model": dict, "classes": list, "preprocess": dict, "state_dict": dict, "config": dict}


def layout_problem(ckpt):
    """What is missing or malformed in a loaded checkpoint dict, in words; None when it is whole.
    Checked once at load, so no later use of the file fails with a KeyError or TypeError."""
    if not isinstance(ckpt.get("version", 1), int):
        return f"its version is {ckpt['version']!r}, not a number"
    for key, kind in REQUIRED.items():
        if key not in ckpt:
            return f"missing '{key}'"
        if not isinstance(ckpt[key], kind):
            return f"'{key}' should be a {kind.__name__}, got {type(ckpt[key]).__name__}"
    if not all(isinstance(k, str) and torch.is_tensor(v) for k, v in ckpt["state_dict"].items()):
        return "'state_dict' holds something other than named tensors"
    return model_problem(ckpt["model"], ckpt["classes"]) or preprocess_problem(ckpt["preprocess"], ckpt["model"])


def whole(value):
    """A positive int (True is an int to Python, not a size)."""
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


def model_problem(spec, classes):
    """`model` must be create_model's arguments, with one class name per output."""
    shape = spec.get("in_shape")
    checks = {"name": isinstance(spec.get("name"), str), "args": isinstance(spec.get("args", {}), dict),
              "in_shape": isinstance(shape, (list, tuple)) and len(shape) == 3 and all(map(whole, shape)),
              "num_classes": whole(spec.get("num_classes"))}
    bad = next((key for key, ok in checks.items() if not ok), None)
    if bad:
        return f"'model.{bad}' is {'missing' if bad not in spec else f'malformed ({spec[bad]!r:.60})'}"
    if len(classes) != spec["num_classes"] or not all(isinstance(c, str) for c in classes):
        return f"'classes' should be {spec['num_classes']} names (model.num_classes), got {classes!r:.80}"
    return None


def preprocess_problem(pre, spec):
    """`preprocess` must describe the model's own input: channels x image_size x image_size, with a
    finite mean and a positive std per channel."""
    missing = [key for key in ("channels", "image_size", "mean", "std") if key not in pre]
    if missing:
        return f"missing 'preprocess.{missing[0]}'"
    if [pre["channels"], pre["image_size"], pre["image_size"]] != list(spec["in_shape"]):
        side = f"{pre['image_size']!r:.20}"   # repr: a damaged field may hold text with a line break
        return (f"'preprocess' makes {pre['channels']!r:.20}x{side}x{side} inputs but the model "
                f"takes {'x'.join(map(str, spec['in_shape']))}")
    numbers = lambda v: isinstance(v, list) and len(v) == pre["channels"] and all(
        isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) for x in v)
    if not (numbers(pre["mean"]) and numbers(pre["std"]) and min(pre["std"]) > 0):
        return (f"'preprocess' needs {pre['channels']} finite means and positive stds, got {pre['mean']!r:.40} "
                f"and {pre['std']!r:.40}")
    return None


def check_finite(state_dict, path):
    """NaN or inf weights give NaN probabilities ("nan%") for every input: refused at load."""
    for key, tensor in state_dict.items():
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            layer, _, kind = key.rpartition(".")
            raise CnnlabError(f"checkpoint {path} has non-finite weights in layer {layer or key} ({kind}: NaN or "
                              "inf, from a training run that diverged); use an earlier checkpoint or retrain with a "
                              "lower --lr.")


def build_model(ckpt, path=""):
    """The network a checkpoint describes, with its weights loaded (on the CPU, in train mode)."""
    spec = ckpt["model"]
    check_finite(ckpt["state_dict"], path)
    if spec.get("plugin"):   # the user's own network: only from a module they named (plugins.py)
        from ..plugins import require

        require(spec["name"], spec["plugin"], path)
    try:   # the sizes come from the file: create_model refuses a network this machine cannot hold
        net = create_model(spec["name"], spec["in_shape"], spec["num_classes"], **spec.get("args", {}))
    except UsageError as e:
        raise CnnlabError(f"{path}: {e}") from None
    try:
        net.load_state_dict(ckpt["state_dict"])
    except (RuntimeError, KeyError) as e:
        raise CnnlabError(f"{path}: weights do not fit model '{spec['name']}' with "
                          f"{spec['num_classes']} classes ({str(e).splitlines()[0][:160]}).") from None
    return net


def temperature_of(ckpt):
    """The checkpoint's temperature (1.0 when it was not calibrated); a non-positive one is refused."""
    value = ckpt.get("temperature", 1.0)
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not 0 < value < float("inf"):
        raise CnnlabError(f"checkpoint 'temperature' must be a positive number, got {value!r:.40}.")
    return float(value)


def set_temperature(path, temperature):
    """Store a fitted temperature in the checkpoint at `path` (rewritten atomically)."""
    ckpt = load(path)
    ckpt["temperature"] = float(temperature)
    save({k: v for k, v in ckpt.items() if k not in ("format", "version")}, path)


def preprocess_of(ckpt):
    """The checkpoint's Preprocess (how inputs must be converted for this model)."""
    from ..data.preprocess import Preprocess

    return Preprocess.from_dict(ckpt["preprocess"])


def upgrade(ckpt, path=""):
    """A checkpoint of any earlier version in today's layout; a newer one is refused (its meaning
    may have changed in ways this cnnlab cannot know)."""
    version = ckpt.get("version", 1)
    if version > VERSION:
        raise CnnlabError(f"{path} was written by a newer cnnlab (checkpoint version {version}, this one reads "
                          f"up to {VERSION}); upgrade cnnlab to use it.")
    if version < 2:   # resizing was always a stretch; the lr of the last step was the optimizer's
        ckpt["preprocess"] = {"resize": "stretch", **ckpt["preprocess"]}
        train_state = ckpt.get("train_state")
        if train_state:
            train_state["progress"].setdefault("lr", train_state["optimizer"]["param_groups"][0]["lr"])
    ckpt["version"] = VERSION
    return ckpt


def metadata(state):
    """What every checkpoint of a run says about it (summary.json repeats some of it)."""
    cfg, data, ctx = state.cfg, state.data, state.ctx
    return {"model": cfg.model, "model_args": dict(cfg.model_args), "data": cfg.data, "classes": data.classes,
            "in_shape": list(data.shape), "num_params": count_params(state.model), "device": str(ctx.device),
            "world_size": ctx.world, "global_batch_size": cfg.batch_size, "augment": state.augment,
            "preprocess": data.preprocess.to_dict(), "plugin": plugin_of(cfg.model)}


def plugin_of(name):
    """The file or module that defines a user's model (plugins.py), for the message that asks for it; None for ours."""
    from ..models import REGISTRY

    return getattr(REGISTRY.get(name), "plugin", None)


def payload(weights, meta, config, metrics=None, train_state=None):
    """A checkpoint dict: `weights` a state_dict (any device), `meta` from metadata(), `config` the
    resolved TrainConfig; `train_state` only in last.pt. `save` adds the format and version."""
    return {"model": {"name": meta["model"], "args": meta["model_args"], "in_shape": meta["in_shape"],
                      "num_classes": len(meta["classes"]),
                      **({"plugin": meta["plugin"]} if meta.get("plugin") else {})},
            "classes": meta["classes"], "preprocess": meta["preprocess"], "config": config.to_dict(),
            "metrics": metrics or {}, "state_dict": {k: v.detach().cpu() for k, v in weights.items()},
            **({"train_state": train_state} if train_state is not None else {})}


def last_payload(state):
    """last.pt: the current weights and everything a resumed run needs to continue exactly."""
    train_state = {"optimizer": state.optimizer.state_dict(), "ema": state.ema.state_dict() if state.ema else None,
                   "lookahead": state.lookahead.state_dict() if state.lookahead else None,
                   "rng": rng_state(state.ctx.device), "progress": state.progress.state_dict()}
    return payload(state.model.state_dict(), state.meta, state.cfg, train_state=train_state)


def best_payload(state):
    """best.pt: the best epoch's weights and its validation accuracy."""
    metrics = {"val_acc": state.row["val_acc"], "epoch": state.row["epoch"]}
    return payload(state.best_weights, state.meta, state.cfg, metrics=metrics)


# The settings that decide a run's data and network: a checkpoint whose config differs in one of
# them was trained by another run (resume.MUST_MATCH adds the ones that shape the training itself).
DEFINING = ("data", "classes", "class_names", "image_size", "val_fraction", "test_fraction", "train_samples",
            "val_samples", "test_samples", "seed", "model", "model_args", "split_ranges", "normalize")


def check_run_config(ckpt_config, run_dir, run_config=None, name="the checkpoint",
                     fix="put back the run's own checkpoint"):
    """Refuse a checkpoint put into a run folder it was not trained in (a 3-class best.pt copied into
    an MNIST run read that run's splits and failed with an IndexError): its config and the run's
    (`run_config`, else RUN/config.yaml when there is one) must agree on every DEFINING setting; a
    folder, labels file or .npz may have moved (resumed with --data-dir), the saved split checking
    that its files are the same."""
    from ..config import load_yaml

    if run_config is None:
        path = os.path.join(run_dir, "config.yaml")
        run_config = load_yaml(path) if os.path.exists(path) else {}
    differ = [k for k in DEFINING if k in ckpt_config and k in run_config and ckpt_config[k] != run_config[k]
              and not (k == "data" and moved(ckpt_config[k], run_config[k]))]   # the splits' check guards it
    if differ:
        key = differ[0]
        raise CnnlabError(f"{name} was not trained in run folder {run_dir}: its {key} is {ckpt_config[key]!r}, the "
                          f"run's config.yaml says {run_config[key]!r}; {fix}.")


def check_same_run(ckpt, state, path):
    """--resume: the checkpoint's classes and network must be the live run's."""
    spec, classes = ckpt["model"], list(ckpt["classes"])
    ours = state.data.classes
    if classes != ours:
        show = lambda names: ", ".join(names[:5]) + (" ..." if len(names) > 5 else "")
        raise CnnlabError(f"{path} holds a model for {len(classes)} classes ({show(classes)}) but this run's data has "
                          f"{len(ours)} ({show(ours)}): the checkpoint belongs to another run; put back this run's "
                          "own checkpoint, or start a new run.")
    if spec["name"] != state.cfg.model or model_args(spec["name"], spec.get("args", {})) != model_args(
            state.cfg.model, state.cfg.model_args):
        raise CnnlabError(f"{path} holds model '{spec['name']}' {spec.get('args') or ''}, but this run trains "
                          f"'{state.cfg.model}' {state.cfg.model_args or ''}: the checkpoint belongs to another run.")


def train_state_of(ckpt, path):
    """last.pt's train_state, or one line saying it cannot be resumed from."""
    saved = ckpt.get("train_state")
    parts = {"optimizer": dict, "rng": dict, "progress": dict}
    bad = next((k for k, kind in parts.items() if not isinstance(saved, dict) or not isinstance(saved.get(k), kind)),
               None)
    if bad:
        raise CnnlabError(f"cannot resume from {path}: it has no complete training state (missing or malformed "
                          f"'train_state.{bad}'); a best.pt copied over last.pt? Start a new run instead.")
    return saved


def restore(state, run_dir):
    """--resume: last.pt into the live model, optimizer, EMA, RNG and progress; best.pt's weights
    become the best so far. Returns last.pt's config (the settings the run had before this resume)."""
    path = os.path.join(run_dir, "last.pt")
    ckpt = load(path, "last.pt")
    check_run_config(ckpt["config"], run_dir, state.cfg.to_dict(), path, "put back the run's own last.pt, or "
                     "start a new run")
    check_same_run(ckpt, state, path)
    check_finite(ckpt["state_dict"], path)
    saved = train_state_of(ckpt, path)
    try:
        state.model.load_state_dict(ckpt["state_dict"])
        load_optimizer_state(state.optimizer, saved["optimizer"], lambda: optimizer_as_saved(ckpt, state))
        if state.ema is not None and saved.get("ema") is not None:
            state.ema.load_state_dict(saved["ema"])
        if state.lookahead is not None:   # turned on by this --resume: the slow copy starts from the weights
            state.lookahead.load_state_dict(saved.get("lookahead") or state.model.state_dict())
        set_rng_state(saved["rng"], state.ctx.device)
        state.progress.load_state_dict(saved["progress"])
    except (RuntimeError, KeyError, ValueError, TypeError, IndexError) as e:
        raise CnnlabError(f"cannot resume from {path}: its training state does not fit this run "
                          f"({type(e).__name__}: {str(e).splitlines()[0][:120] if str(e) else ''}).") from None
    state.best_weights = best_weights(state, os.path.join(run_dir, "best.pt"))
    return ckpt["config"]


def moved(before, now):
    """Whether --data went from one path to another of the same kind (folder:, csv:, npz:), as a
    --resume with --data-dir makes it (resume.moved_data)."""
    from ..data.registry import path_source

    if not (isinstance(before, str) and isinstance(now, str)) or before == now:
        return False
    return path_source(before) is not None and path_source(before) == path_source(now)


# The group settings cnnlab's config decides (optim.build_optimizer, param_groups); torch's own
# implementation flags (fused, foreach, capturable) stay as the loaded state dict has them.
GROUP_SETTINGS = ("momentum", "nesterov", "weight_decay", "lr_mult", "decoupled_weight_decay")


def load_optimizer_state(optimizer, saved, saved_layout):
    """last.pt's optimizer state (moments, step counts) under this run's settings: torch's
    load_state_dict also puts back the saved groups' momentum, weight decay and lr_mult, which
    silently undid a --resume that changed --momentum or --weight-decay (config.yaml said the new
    value, the steps used the old one). A --resume that regroups the parameters (--backbone-lr-mult
    from 1 to another value, or back) loads the state into `saved_layout()`, the optimizer as the
    saved run built it, and takes it over parameter by parameter."""
    settings = [{k: v for k, v in group.items() if k in GROUP_SETTINGS} for group in optimizer.param_groups]
    sizes = lambda groups: [len(g["params"]) for g in groups]
    if sizes(saved["param_groups"]) == sizes(optimizer.param_groups):
        optimizer.load_state_dict(saved)
    else:
        before = saved_layout()
        before.load_state_dict(saved)
        optimizer.load_state_dict({"state": regrouped(before, optimizer),
                                   "param_groups": optimizer.state_dict()["param_groups"]})
    for group, own in zip(optimizer.param_groups, settings):
        group.update(own)


def optimizer_as_saved(ckpt, state):
    """The optimizer of state.model as the run in `ckpt` built it (its groups, before this --resume)."""
    from ..config import make_config
    from .optim import build_optimizer

    return build_optimizer(make_config(ckpt["config"]), state.model, state.head)


def regrouped(before, after):
    """before's per-parameter state, keyed by the parameters' indices in after's groups (the layout
    of an optimizer's state_dict)."""
    where = {id(p): i for i, p in enumerate(p for g in after.param_groups for p in g["params"])}
    return {where[id(p)]: s for p, s in before.state.items() if id(p) in where}


def best_weights(state, path):
    """best.pt's weights for --resume (None when the run has none yet), checked like last.pt."""
    if not os.path.exists(path):
        return None
    ckpt = load(path, "best.pt")
    check_same_run(ckpt, state, path)
    check_finite(ckpt["state_dict"], path)
    return ckpt["state_dict"]
