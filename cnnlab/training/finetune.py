"""Fine-tuning, as fastai's `fine_tune`: pretrained weights in (--weights, --init), the backbone
frozen for the first --freeze-epochs while a new head learns, then everything trained with the
backbone's lr scaled by --backbone-lr-mult (optim.param_groups, set_lr).

The frozen phase is set at every epoch's start from the epoch number alone, so a run resumed
inside or after it is in the same phase as the uninterrupted run: nothing to save.
"""
import os

import torch

from . import checkpoint
from .callbacks import Callback
from ..data.images import center_crop
from ..errors import UsageError
from ..models.backbones import head_names
from ..models.weights import (WEIGHT_FILES, entry_for_file, fit_weights, resolve_weights, torchvision_entry,
                              weights_file, weights_preprocess)


def check_starting_weights(cfg):
    """--weights or --init that cannot be had fail before the data is decoded (a photo folder's
    first decode takes minutes): a missing file or run, an unknown name, an offline download."""
    if cfg.weights and cfg.init:
        raise UsageError("give --weights or --init, not both: both say where the starting weights come from.")
    if cfg.weights:
        weights_file(cfg.weights, cfg.model)
    if cfg.init:
        checkpoint.resolve(cfg.init)


def load_pretrained(cfg, model, data):
    """--weights or --init into the freshly built `model`; the data's normalisation becomes the one
    the weights were trained with (it is what the Preprocess saves). Returns what was done, in
    words, or None when the run starts from random weights."""
    if cfg.weights:   # --weights with --init: refused by check_starting_weights
        state, source, entry = resolve_weights(cfg.weights, cfg.model)
        normalisation = weights_preprocess(entry)
    elif cfg.init:
        ckpt = checkpoint.load(cfg.init)
        state, source, normalisation = ckpt["state_dict"], f"{checkpoint.resolve(cfg.init)}", ckpt["preprocess"]
    else:
        return None
    text = fit_weights(model, state, len(data.classes), source, cfg.model)
    if normalisation:
        text += use_normalisation(data, normalisation)
    return text


def adapt_to_data(model, data, seed, count=5000, pixels=5_000_000):
    """Layers that set themselves from the training images before the first step (an `adapt`
    method, as Keras's preprocessing layers have: airbench's whitening, models/airbench.py) get a
    seeded sample of `count` of them, as the network sees them: fewer for large images, at most
    `pixels` pixel positions in all (airbench's 5,000 CIFAR images; 100 at 224 px, not 5,000
    holding 9 GB). For a run that starts from random weights: loaded weights bring their own."""
    layers = [m for m in model.modules() if hasattr(m, "adapt")]
    if not layers:
        return
    images = data.train[0]
    count = max(1, min(count, pixels // (data.shape[1] * data.shape[2])))
    rows = torch.randperm(len(images), generator=torch.Generator().manual_seed(seed))[:count].sort().values
    x = images[rows]
    if data.input_size:   # photos stored larger than the input: the centre, as evaluation crops them
        x = center_crop(x, data.input_size)
    x = data.preprocess.normalise(x)
    for layer in layers:
        layer.adapt(x)


def weights_sizes(cfg):
    """--weights naming torchvision weights (DEFAULT, a weights name, or a file named as torchvision
    publishes it) with no --image-size: the weights' own crop and resize sizes become the run's
    image_size and resize_size (224 cut from 256 for most ImageNet weights), as their mean and std
    become its normalisation. Read from torchvision's tables: nothing is downloaded here."""
    if not cfg.weights or cfg.image_size or not cfg.model.startswith("tv/"):
        return cfg
    from ..config import make_config

    is_file = os.path.exists(cfg.weights) or cfg.weights.endswith(WEIGHT_FILES)
    sizes = weights_preprocess(entry_for_file(cfg.model, cfg.weights) if is_file
                               else torchvision_entry(cfg.model, cfg.weights))
    if sizes is None:
        return cfg
    return make_config({"image_size": sizes["crop"], "resize_size": sizes["resize"]}, base=cfg)


def use_normalisation(data, pre):
    """The weights' mean and std as the data's (averaged over RGB for 1-channel data, whose stem
    was summed over RGB); returns a note for the settings block."""
    mean, std = pre["mean"], pre["std"]
    if data.shape[0] != len(mean):
        mean, std = [sum(mean) / len(mean)] * data.shape[0], [sum(std) / len(std)] * data.shape[0]
    data.mean, data.std = list(mean), list(std)
    trained_at = f" (trained on {pre['crop']} px crops of {pre['resize']} px)" if "crop" in pre else ""
    return f"; inputs normalised with the weights' mean/std{trained_at}"


def describe(cfg, loaded, head):
    """The settings block's fine-tune line: where the weights came from, what is frozen, the lrs."""
    parts = [loaded] if loaded else []
    if cfg.freeze_epochs:
        first = "epoch 1" if cfg.freeze_epochs == 1 else f"epochs 1-{cfg.freeze_epochs}"
        parts.append(f"{first}: backbone frozen (batch norm in eval mode), only the head "
                     f"({', '.join(head)}) trains; then all")
    if cfg.backbone_lr_mult != 1 and not head:   # optim.param_groups then keeps one group at the full lr
        parts.append(f"--backbone-lr-mult {cfg.backbone_lr_mult:g} ignored: no classifier head was found in this network")
    elif cfg.backbone_lr_mult != 1:
        parts.append(f"backbone lr = {cfg.backbone_lr_mult:g} x lr" + ("" if cfg.freeze_epochs else
                                                                      f" (the head, {', '.join(head)}, at the full lr)"))
    if not loaded and (cfg.freeze_epochs or cfg.backbone_lr_mult != 1):
        parts.append("note: no --weights or --init, so the backbone starts from random weights, which freezing "
                     "it or a lower lr keeps close to random")
    return "; ".join(parts) or None


class FreezeBackbone(Callback):
    """--freeze-epochs N: for epochs 1..N the backbone's parameters take no gradient (so the backward
    pass stops at the head, and the optimizer skips them) and its batch-norm layers keep their
    statistics (eval mode); from epoch N+1 everything trains."""

    def on_setup(self, state):
        self.trainable = None   # the parameters that train at all, as the network was built
        if state.cfg.freeze_epochs and state.ctx.world > 1:   # DDP fixes the set of trained parameters when it wraps
            raise UsageError("--freeze-epochs is not supported with --nproc above 1 yet: DDP cannot change which "
                             "parameters train mid-run; train on one process, or drop --freeze-epochs.")

    def on_epoch_start(self, state):
        if state.cfg.freeze_epochs:
            if self.trainable is None:   # a network's own fixed parameters stay fixed
                self.trainable = {name for name, p in state.model.named_parameters() if p.requires_grad}
            frozen = state.progress.epoch < state.cfg.freeze_epochs
            set_frozen(state.model, head_names(state.model, len(state.data.classes)), frozen, self.trainable)


def set_frozen(model, head, frozen, trainable):
    """The backbone frozen or not; `trainable`: the parameters that train at all."""
    head = set(head)
    for name, p in model.named_parameters():
        p.requires_grad_(name in trainable and (not frozen or name in head))
    # evaluate() puts the model back in train mode after each validation pass, so this runs every epoch
    for module in model.modules():
        if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
            module.train(not frozen)
