"""Self-describing, safely loaded, atomically written checkpoints.

A checkpoint is a plain dict of tensors, numbers, strings and lists saved with torch.save and read
back with `torch.load(weights_only=True)`, which refuses any pickled object that is not plain data:
opening a checkpoint never runs code from it. It carries everything needed to rebuild and use the
model with no command line: model name and arguments, input shape, class names, preprocessing,
the resolved config and the metrics (nanoGPT's habit of storing the model's own arguments).
"""
import os
import pickle
import re

import torch

from ..errors import CnnlabError

FORMAT = "cnnlab-checkpoint"
VERSION = 1


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
    """Write atomically: a temporary file in the same folder, flushed and fsynced, then renamed over
    `path`. A crash at any moment leaves either the old file or the new one, never half of one."""
    folder = os.path.dirname(os.path.abspath(path))
    tmp = os.path.join(folder, f".{os.path.basename(path)}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as f:
            torch.save({"format": FORMAT, "version": VERSION, **payload}, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise CnnlabError(f"could not write checkpoint {path}: {e.strerror or e}. "
                          "The previous checkpoint, if any, is intact.") from None
    dir_fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(dir_fd)  # make the rename itself durable
    finally:
        os.close(dir_fd)


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
        return ckpt
    if isinstance(ckpt, dict) and ckpt and all(torch.is_tensor(v) for v in ckpt.values()):
        raise CnnlabError(f"{path} is a bare state_dict saved by plain PyTorch: it lacks the model name, "
                          "classes and preprocessing. Rebuild the network yourself and call "
                          "model.load_state_dict(torch.load(path, weights_only=True)), or train it with cnnlab.")
    raise CnnlabError(f"{path} is not a cnnlab checkpoint (no '{FORMAT}' marker).")


def build_model(ckpt, path=""):
    """The network a checkpoint describes, with its weights loaded (on the CPU, in train mode)."""
    from ..models import create_model

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
