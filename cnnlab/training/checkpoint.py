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
    train_state            last.pt only: {optimizer, ema, rng, progress}, what --resume needs
"""
import io
import os
import pickle
import re

import torch

from ..atomic import atomic_path
from ..errors import CnnlabError
from ..models import count_params, create_model
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
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        refused = re.search(r"(unsupported GLOBAL [^\s]+|Unsupported global: [^\s]+)", str(e), re.IGNORECASE)
        if not refused:
            raise CnnlabError(f"{path} is not a readable checkpoint (not a torch.save file, or damaged).") from None
        raise CnnlabError(f"{path} was refused: it asks to load a Python object ({refused.group(1)}) that "
                          "could run code. Nothing in it was executed; cnnlab only opens plain tensors and numbers.") from None
    except Exception as e:  # truncated or foreign bytes fail in many ways inside torch.load and zipfile
        raise CnnlabError(f"{path} is not a readable checkpoint (truncated or another kind of file: "
                          f"{str(e).splitlines()[0][:120] if str(e) else type(e).__name__}).") from None
    if isinstance(ckpt, dict) and ckpt.get("format") == FORMAT:
        return upgrade(ckpt, path)
    if isinstance(ckpt, dict) and ckpt and all(torch.is_tensor(v) for v in ckpt.values()):
        raise CnnlabError(f"{path} is a bare state_dict saved by plain PyTorch: it lacks the model name, "
                          "classes and preprocessing. Rebuild the network yourself and call "
                          "model.load_state_dict(torch.load(path, weights_only=True)), or train it with cnnlab.")
    raise CnnlabError(f"{path} is not a cnnlab checkpoint (no '{FORMAT}' marker).")


def build_model(ckpt, path=""):
    """The network a checkpoint describes, with its weights loaded (on the CPU, in train mode)."""
    spec = ckpt["model"]
    try:
        net = create_model(spec["name"], spec["in_shape"], spec["num_classes"], **spec.get("args", {}))
        net.load_state_dict(ckpt["state_dict"])
    except (RuntimeError, KeyError) as e:
        raise CnnlabError(f"{path}: weights do not fit model '{spec.get('name')}' with "
                          f"{spec.get('num_classes')} classes ({str(e).splitlines()[0][:160]}).") from None
    return net


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
            "preprocess": data.preprocess.to_dict()}


def payload(weights, meta, config, metrics=None, train_state=None):
    """A checkpoint dict: `weights` a state_dict (any device), `meta` from metadata(), `config` the
    resolved TrainConfig; `train_state` only in last.pt. `save` adds the format and version."""
    return {"model": {"name": meta["model"], "args": meta["model_args"], "in_shape": meta["in_shape"],
                      "num_classes": len(meta["classes"])},
            "classes": meta["classes"], "preprocess": meta["preprocess"], "config": config.to_dict(),
            "metrics": metrics or {}, "state_dict": {k: v.detach().cpu() for k, v in weights.items()},
            **({"train_state": train_state} if train_state is not None else {})}


def last_payload(state):
    """last.pt: the current weights and everything a resumed run needs to continue exactly."""
    train_state = {"optimizer": state.optimizer.state_dict(), "ema": state.ema.state_dict() if state.ema else None,
                   "rng": rng_state(state.ctx.device), "progress": state.progress.state_dict()}
    return payload(state.model.state_dict(), state.meta, state.cfg, train_state=train_state)


def best_payload(state):
    """best.pt: the best epoch's weights and its validation accuracy."""
    metrics = {"val_acc": state.row["val_acc"], "epoch": state.row["epoch"]}
    return payload(state.best_weights, state.meta, state.cfg, metrics=metrics)


def restore(state, run_dir):
    """--resume: last.pt into the live model, optimizer, EMA, RNG and progress; best.pt's weights
    become the best so far."""
    ckpt = load(os.path.join(run_dir, "last.pt"), "last.pt")
    saved = ckpt["train_state"]
    state.model.load_state_dict(ckpt["state_dict"])
    state.optimizer.load_state_dict(saved["optimizer"])
    if state.ema is not None and saved["ema"] is not None:
        state.ema.load_state_dict(saved["ema"])
    set_rng_state(saved["rng"], state.ctx.device)
    state.progress.load_state_dict(saved["progress"])
    best = os.path.join(run_dir, "best.pt")
    state.best_weights = load(best, "best.pt")["state_dict"] if os.path.exists(best) else None
