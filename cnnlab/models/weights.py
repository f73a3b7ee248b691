"""Pretrained weights into a freshly built network: `--weights PATH|DEFAULT|NAME`.

A file is a state_dict, read with torch.load(weights_only=True) (plain tensors only: a pickle that
asks for any other Python object is refused before anything in it runs) or from .safetensors;
DEFAULT or a weights name (IMAGENET1K_V1) is torchvision's own registry, downloaded into torch's
cache when the network allows. `fit_weights` then loads what fits the network built for this data:
the head is re-made when the classes differ, a 3-channel stem is summed over RGB for 1-channel
inputs (what timm does for in_chans=1), and anything else that differs is a wrong architecture.
"""
import os
import pickle
import re

from ..errors import CnnlabError, UsageError
from .backbones import head_names

WEIGHT_FILES = (".pt", ".pth", ".safetensors", ".bin")


def torch_load_safely(path, what="checkpoint"):
    """torch.load(weights_only=True) of `path`, or one CnnlabError naming it. Nothing in the file is executed."""
    import torch

    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        refused = re.search(r"(unsupported GLOBAL [^\s]+|Unsupported global: [^\s]+)", str(e), re.IGNORECASE)
        if not refused:
            raise CnnlabError(f"{path} is not a readable {what} (not a torch.save file, or damaged).") from None
        raise CnnlabError(f"{path} was refused: it asks to load a Python object ({refused.group(1)}) that "
                          "could run code. Nothing in it was executed; cnnlab only opens plain tensors and numbers.") from None
    except Exception as e:  # truncated or foreign bytes fail in many ways inside torch.load and zipfile
        detail = str(e).splitlines()[0].split(". ")[0] if str(e) else ""   # its first sentence,
        if len(detail) > 120:                                               # cut between words
            detail = detail[:120].rsplit(" ", 1)[0] + " ..."
        if not re.search(r"[A-Za-z]{3}", detail):   # a bare number or key from deep inside the unpickler
            detail = "not a torch.save file, or damaged"
        raise CnnlabError(f"{path} is not a readable {what} (truncated or another kind of file: {detail}).") from None


def read_state_dict(path):
    """The {name: tensor} of a weights file (.safetensors, or a torch.save'd state_dict, possibly
    wrapped as {"state_dict": ...} or {"model": ...} as training scripts save them)."""
    import torch

    if path.endswith(".safetensors"):
        try:
            from safetensors.torch import load_file
        except ImportError:
            raise UsageError(f"{path}: reading .safetensors needs the safetensors package (pip install safetensors).") from None
        try:
            return load_file(path)
        except Exception as e:
            raise CnnlabError(f"{path} is not a readable .safetensors file ({str(e).splitlines()[0][:120]}).") from None
    state = torch_load_safely(path, "weights file")
    for key in ("state_dict", "model", "model_state_dict"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not (isinstance(state, dict) and state and all(isinstance(k, str) and torch.is_tensor(v) for k, v in state.items())):
        raise CnnlabError(f"{path} holds no state_dict (a dict of named tensors); save one with "
                          "torch.save(model.state_dict(), path).")
    return {k.removeprefix("module."): v for k, v in state.items()}   # saved from a DDP wrapper


def resolve_weights(spec, model):
    """(state_dict, where it came from, the torchvision weights entry or None) for --weights `spec`
    and the network name `model`. The entry carries the preprocessing those weights were trained with."""
    path, source, entry = weights_file(spec, model)
    return read_state_dict(path), source, entry


def weights_file(spec, model):
    """(local file, where it came from, torchvision entry or None) of --weights `spec`: a file, or
    torchvision's named weights fetched into torch's hub cache. Training calls it before decoding
    the data, so a missing file or an offline download fails in seconds, not after the decode."""
    if os.path.exists(spec) or spec.endswith(WEIGHT_FILES):
        if not os.path.isfile(spec):
            raise UsageError(f"--weights {spec}: no such file.")
        return spec, spec, entry_for_file(model, spec)
    if not model.startswith("tv/"):
        raise UsageError(f"--weights {spec}: named weights are torchvision's (tv/ models); for '{model}' give "
                         "a weights file (.pth, .pt or .safetensors).")
    entry = torchvision_entry(model, spec)
    return cached_download(entry), f"torchvision {entry}", entry


def torchvision_entry(model, spec):
    """The torchvision weights enum member for `spec` (DEFAULT, IMAGENET1K_V1 or ResNet18_Weights.IMAGENET1K_V1)."""
    import torchvision.models as tvm

    arch = model.partition("/")[2]
    try:
        enum = tvm.get_model_weights(arch)
    except (ValueError, KeyError):
        raise UsageError(f"--weights {spec}: torchvision has no weights for '{arch}'.") from None
    name = spec.rpartition(".")[2]
    if name not in enum.__members__:
        names = ", ".join(["DEFAULT", *enum.__members__])
        raise UsageError(f"--weights {spec}: unknown weights for {arch}; torchvision has {names}.")
    return enum[name]


def cached_download(entry):
    """The local file of a torchvision weights entry: torch's hub cache, filled from the network
    when it can be; offline, one line naming the file and the folder to put it in."""
    import torch

    folder = os.path.join(torch.hub.get_dir(), "checkpoints")
    path = os.path.join(folder, os.path.basename(entry.url))
    if os.path.isfile(path):
        return path
    try:
        os.makedirs(folder, exist_ok=True)
        torch.hub.download_url_to_file(entry.url, path, progress=False)
    except Exception as e:   # URLError, socket errors, HTTP errors: all mean "not downloadable here"
        raise CnnlabError(f"cannot download {entry} ({type(e).__name__}): put {entry.url} "
                          f"into {folder}/ and run again.") from None
    return path


def entry_for_file(model, path):
    """The torchvision weights entry whose published file has this file's name (resnet18-f37072fd.pth),
    so a downloaded copy given by path keeps its preprocessing; None otherwise."""
    if not model.startswith("tv/"):
        return None
    import torchvision.models as tvm

    try:
        enum = tvm.get_model_weights(model.partition("/")[2])
    except (ValueError, KeyError):
        return None
    return next((e for e in enum if os.path.basename(e.url) == os.path.basename(path)), None)


def weights_preprocess(entry):
    """{mean, std, resize, crop} of a torchvision weights entry (its transforms()), or None."""
    if entry is None:
        return None
    t = entry.transforms()
    return {"mean": list(t.mean), "std": list(t.std), "resize": t.resize_size[0], "crop": t.crop_size[0]}


def fit_weights(net, state, num_classes, source, model_name):
    """Load `state` into `net` (built for `num_classes`) and return what happened, in words. The head
    is re-made when its shape differs, a 3-channel stem is summed over RGB for a 1-channel network;
    any other difference (keys missing, unexpected, or of another shape) is a CnnlabError."""
    own = net.state_dict()
    head = set(head_names(net, num_classes))
    take, remade, summed, wrong = {}, [], [], []
    for key, tensor in state.items():
        if key not in own:
            continue
        mine = own[key]
        if mine.shape == tensor.shape:
            take[key] = tensor
        elif key in head:
            remade.append(key)
        elif is_rgb_stem(tensor, mine):
            take[key] = tensor.sum(1, keepdim=True)   # gray x on every channel gives the same response
            summed.append(key)
        else:
            wrong.append(key)
    missing = [k for k in own if k not in state and k not in head and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in state if k not in own and "aux" not in k.lower()]   # inception's aux heads: unused
    if missing or unexpected or wrong:
        example = (missing or unexpected or wrong)[0]
        guess = guess_architecture(state, model_name)
        raise CnnlabError(f"{source} does not fit {model_name}: {len(missing)} keys missing, {len(unexpected)} "
                          f"unexpected, {len(wrong)} of another shape (e.g. '{example}')"
                          + (f"; it looks like weights for {guess}" if guess and guess != model_name else "") + ".")
    net.load_state_dict(take, strict=False)
    text = f"loaded {len(take)} of {len(own)} tensors from {source}"
    if remade:
        text += f"; head {', '.join(remade)} re-made for {num_classes} classes"
    if summed:
        text += f"; stem {summed[0]} summed over RGB for 1-channel inputs"
    return text


def is_rgb_stem(theirs, mine):
    """A (O, 3, k, k) convolution weight offered to a (O, 1, k, k) one."""
    return (theirs.dim() == 4 and mine.dim() == 4 and theirs.shape[1] == 3 and mine.shape[1] == 1
            and theirs.shape[0] == mine.shape[0] and theirs.shape[2:] == mine.shape[2:])


def guess_architecture(state, model_name):
    """The torchvision model of `model_name`'s family (the same first three letters: resnet34 for
    resnet18, resnext too) whose parameter names best match the file's (>= 90% shared), or None.
    Built on the meta device: no memory, but ~0.3 s a model, so only the family is tried."""
    import warnings

    import torch

    from .backbones import backbone_names, build_backbone

    keys, best, best_score = set(state), None, 0.9
    family = model_name.partition("/")[2][:3]
    for name in (n for n in backbone_names("tv") if n[3:6] == family):
        try:
            with torch.device("meta"), warnings.catch_warnings():
                warnings.simplefilter("ignore")
                theirs = set(build_backbone(name, (3, 224, 224), 1000).state_dict())
        except Exception:   # regnet computes its widths with tensors, which have no values on meta
            continue
        score = len(keys & theirs) / len(keys | theirs)
        if score > best_score:
            best, best_score = name, score
    return best

