"""Computing results: a trained network's metrics on a split of its data. Rendering them (pictures,
report.html) is report.py's job, and never evaluates when the results are given.

A model is loaded here from its checkpoint with training/checkpoint.py, not with deploy/inference.py:
evaluation needs the network, its classes and its Preprocess, not the prediction-side conversion
of single images (and evaluation/ sits below deploy/ in the pipeline).
"""
import os
from dataclasses import dataclass

import torch

from ..config import load_yaml, make_config
from ..data import load_data, name_list, read_splits
from ..data.registry import path_source
from ..data.augment import TTA, training_shifts
from ..data.stream import make_loader
from ..data.preprocess import Preprocess
from ..errors import CnnlabError, UsageError, note
from ..runtime import Context
from ..training import checkpoint
from ..training.engine import depends_on_batch, evaluate
from ..training.temperature import tempered
from .calibration import ece
from ..metrics import summarize


@dataclass
class Trained:
    """A checkpoint's network with what evaluation needs of it."""
    net: torch.nn.Module      # in eval mode, on `device`, channels-last
    classes: list
    preprocess: Preprocess
    config: dict              # the run's resolved config (checkpoint "config")
    device: torch.device
    temperature: float = 1.0  # --calibrate's: logits are divided by it (training/temperature.py)
    epoch: int = None         # the epoch its weights are from (best.pt's metrics, last.pt's progress)


def load_trained(path, device="cpu"):
    """(Trained, run folder) of a run folder (its best.pt) or a checkpoint file."""
    resolved = checkpoint.resolve(str(path))
    return trained(checkpoint.load(resolved), resolved, device), path if os.path.isdir(path) else os.path.dirname(path)


def trained(ckpt, path, device="cpu"):
    """The Trained of a loaded checkpoint (`path`: its file, named in errors)."""
    device = torch.device(device)
    # NHWC: 2.3x faster CPU inference for the seed CNN (benchmarks/README.md)
    net = checkpoint.build_model(ckpt, path).to(device, memory_format=torch.channels_last).eval()
    epoch = ckpt.get("metrics", {}).get("epoch") or ((ckpt.get("train_state") or {}).get("progress") or {}).get("epoch")
    return Trained(net, list(ckpt["classes"]), checkpoint.preprocess_of(ckpt), dict(ckpt.get("config") or {}), device,
                   checkpoint.temperature_of(ckpt), epoch)


def last_epoch(path, best):
    """The Trained of a run folder's last.pt when it holds another epoch than `best` (its best.pt's
    Trained), else None. The tutorials report their last epoch; best.pt is the best validation epoch."""
    last = os.path.join(str(path), "last.pt")
    if not (os.path.isdir(path) and os.path.exists(last)):
        return None
    try:
        model = trained(checkpoint.load(last), last, best.device)
    except CnnlabError as e:   # best.pt's results still stand: only the last epoch's line is lost
        note(f"warning: {e} Going on without the last epoch's results.")
        return None
    return None if model.epoch is None or model.epoch == best.epoch else model


def run_data(model, run_dir=None, data=None, data_dir=None):
    """The data `model` was trained on, with the run's saved split (refused, in one line, when the
    data changed since); or `data` (a --data name, split afresh) resized to the model's input.
    `data_dir` replaces the run's own --data-dir (relative to where it was trained, or on another
    machine); for a folder, labels file or .npz it is that data's own new location."""
    cfg = make_config(model.config)
    run_yaml = run_dir and os.path.join(run_dir, "config.yaml")   # a run folder's, unless --data is another
    run_config = load_yaml(run_yaml) if not data and run_yaml and os.path.exists(run_yaml) else None
    if run_config and checkpoint.moved(cfg.data, run_config.get("data")):   # resumed with --data-dir; best.pt
        cfg = make_config({"data": run_config["data"]}, base=cfg)            # may predate the move
    kind = path_source(cfg.data)
    if data_dir:   # a folder's saved split names its files by their path inside it: it may move
        cfg = make_config({"data": f"{kind}:{data_dir}"} if kind else {"data_dir": data_dir}, base=cfg)
    elif kind and not data and not os.path.exists(cfg.data.partition(":")[2]):
        kept = " (its saved split is kept)" if run_dir and os.path.exists(os.path.join(run_dir, "splits.json")) else ""
        raise CnnlabError(f"{run_dir or 'the checkpoint'} was trained on {cfg.data}, which is not found from here "
                          f"({os.getcwd()}): give the data's location with --data-dir PATH{kept}, "
                          "or run from the folder it was trained in.")
    splits = None
    if data:
        cfg = make_config({"data": data, "classes": [], "class_names": [], "image_size": model.preprocess.image_size,
                           "resize": model.preprocess.resize}, base=cfg)
    elif run_config is not None:   # a run folder keeps its splits.json
        checkpoint.check_run_config(model.config, run_dir, run_config,
                                    fix="put back the run's own best.pt, or give --data")
        splits = read_splits(run_dir)
        # a file added since, and unreadable, is in no saved split: said and skipped, not fatal (one of the
        # split's own files gone bad is refused by the split check, by name)
        cfg = make_config({"on_bad_image": "skip"}, base=cfg)
    else:
        note(f"note: {run_dir or 'this checkpoint'} is not a run folder (no config.yaml, no splits.json): the split "
             "is cut afresh with the run's seed, the one it trained with only if the data has not changed since.")
    loaded = load_data(cfg.data_config(), splits=splits)   # the checkpoint's config holds training settings too
    if loaded.shape[0] != model.preprocess.channels:
        raise UsageError(f"data '{cfg.data}' has {loaded.shape[0]} channel(s); the model expects "
                         f"{model.preprocess.channels}.")
    return loaded


def evaluate_model(model, data, split="test", collect=False, tta="none", say_tta=True):
    """Metrics of `model` on a split of `data`, normalised with the MODEL's statistics (another
    dataset's own would hide a shift in the inputs), with the checkpoint's temperature. collect=True
    keeps the per-sample results; the calibration error ("ece") is always measured. `tta`: flip or
    flip+crop averages the probabilities of those views (data/augment.py); say_tta=False leaves out
    the note on mirrored digits (a second model on the same data)."""
    x, y = getattr(data, split)
    if len(y) == 0:
        raise UsageError(f"the {split} split is empty.")
    if data.classes != model.classes and len(data.classes) != len(model.classes):
        raise UsageError(f"data has {len(data.classes)} classes, the model {len(model.classes)}.")
    ours, theirs = names(data.classes), names(model.classes)
    if ours != theirs and (sorted(ours) == sorted(theirs) or not (unnamed(ours) or unnamed(theirs))):
        # label i of the data would be scored as the model's class i: a number about nothing (the same
        # names in another order too: '10' sorts before '2' as text, after it as a number)
        raise UsageError(f"data '{data.name}' has the classes {name_list(data.classes)}, the model "
                         f"{name_list(model.classes)}: evaluate it on data with the model's classes, in its order.")
    # a streamed split stays on disk (read batch by batch), never copied whole to the device
    loader = make_loader(x, y, 256, model.preprocess, model.device, streamed=data.streamed, channels_last=True,
                         mixed=depends_on_batch(model.net))
    net = tempered(model.net, model.temperature)
    if "flip" in tta and not data.flip_ok and say_tta:
        note(f"note: --tta {tta} averages in mirrored {data.name} images, which are not valid examples "
             "(a mirrored digit is another shape): it usually lowers accuracy here; --tta none avoids it.")
    if tta != "none":
        net = TTA(net, tta, model.preprocess.scale_shift(model.device)[1], training_shifts(model.config))
    raw = evaluate(net, loader, Context(device=model.device), len(model.classes), collect=True)
    out = metrics_of(raw, model.classes, split, labels=y)
    if not collect:
        del out["_probs"], out["_losses"]
    return {**out, **({"tta": tta} if tta != "none" else {})}


def names(classes):
    return [str(c) for c in classes]


def unnamed(classes):
    """Whether class names are only the label numbers (0, 1, ...: arrays and .npz files without names)."""
    return names(classes) == [str(i) for i in range(len(classes))]


def metrics_of(raw, classes, split="test", labels=None):
    """The results dict of one evaluation: engine.evaluate's counts (loss, top5, cm and, when
    collected, per-sample probs and losses) summarised per class. The per-sample tensors go under
    `_probs`/`_losses`: for pictures, never printed as JSON. With the split's `labels` too, the
    expected calibration error "ece" (calibration.py)."""
    out = summarize(raw["cm"], classes, loss=raw["loss"], top5=raw["top5"])
    out["split"] = split
    if "probs" in raw:
        out["_probs"], out["_losses"] = raw["probs"], raw["losses"]
        if labels is not None:
            out["ece"] = ece(raw["probs"], labels)
    return out


def evaluate_path(path, data=None, split="test"):
    """Metrics of a run folder or checkpoint on its own data's split (or on `data`)."""
    model, run_dir = load_trained(path)
    return evaluate_model(model, run_data(model, run_dir, data), split)
