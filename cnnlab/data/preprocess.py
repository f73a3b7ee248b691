"""Preprocessing as one object: how an image becomes the network's input.

Built from the training data (channels, size, the training split's mean and std), saved in every
checkpoint, and used by the batch loader, inference, export and serve, so an image goes through
the same conversion at training time and at prediction time: `image` (an image -> the model's
uint8 pixels, images.load_array) then `normalise` (uint8 batch -> float input).
"""
from dataclasses import asdict, dataclass, fields

import torch

from ..errors import CnnlabError
from .images import RESIZE_POLICIES, center_crop, load_array

LEGACY_POLICIES = {"stretch": "squash"}   # what checkpoints before --resize called squash


@dataclass
class Preprocess:
    channels: int               # 1 (grayscale) or 3 (RGB): every input is converted to this
    image_size: int             # inputs are resized to image_size x image_size
    mean: list                  # per channel, as fractions of 255 (training split only)
    std: list
    invert: bool = False        # 255 - x before normalising (dark digits on light paper)
    resize: str = "squash"      # how another size becomes the square input (images.FIT): squash, crop, pad
    # crop: the shorter side is resized to this first, and the centre image_size x image_size cut
    # from it (Resize(resize_size) + CenterCrop(image_size)); 0: resized to image_size directly
    resize_size: int = 0

    def to_dict(self):
        return asdict(self)

    @classmethod
    def from_dict(cls, d):
        """From a checkpoint's dict; keys a newer or older cnnlab wrote and this one lacks are ignored."""
        names = {f.name for f in fields(cls)}
        pre = cls(**{k: v for k, v in d.items() if k in names})
        if isinstance(pre.resize, str):
            pre.resize = LEGACY_POLICIES.get(pre.resize, pre.resize)
        if pre.resize not in RESIZE_POLICIES:  # resizing another way would give the model other pixels
            raise CnnlabError(f"the checkpoint resizes inputs by '{pre.resize}'; this cnnlab knows "
                              f"{', '.join(RESIZE_POLICIES)} only (a newer cnnlab wrote it?).")
        if type(pre.resize_size) is not int or not 0 <= pre.resize_size <= 4096:
            raise CnnlabError(f"the checkpoint's preprocess has resize_size {pre.resize_size!r}; a side in pixels "
                              "(or 0) was expected: the file is damaged.")
        return pre

    def scale_shift(self, device="cpu"):
        """(scale, shift) of shape (1, C, 1, 1) with x_uint8 * scale + shift == (x / 255 - mean) / std:
        conversion and normalisation fused into one multiply-add."""
        std = torch.as_tensor(self.std, dtype=torch.float32, device=device).view(1, -1, 1, 1)
        mean = torch.as_tensor(self.mean, dtype=torch.float32, device=device).view(1, -1, 1, 1)
        return 1 / (255 * std), -mean / std

    def normalise(self, x, scale_shift=None):
        """uint8 (B, C, H, W) -> the network's float input. `scale_shift`: this object's
        scale_shift() for x's device, made once by a caller that normalises many batches."""
        scale, shift = scale_shift or self.scale_shift(x.device)
        return x.float().mul_(scale).add_(shift)

    @property
    def decode_size(self):
        """The side an image is decoded and fitted to before any centre crop: what a JPEG's draft
        (images.open_header's `size`) must be asked for, so every path decodes the same pixels."""
        return self.resize_size or self.image_size

    def image(self, item, name=None, invert=None):
        """One image (path, file object, PIL image, or array HW, HWC or CHW) -> uint8 (C, S, S)
        tensor, converted and resized as the training images were; `invert` (None: this
        object's own setting) gives 255 - x, for dark digits on light paper."""
        a = load_array(item, self.channels, self.decode_size, name, self.resize)
        if self.resize_size:
            a = center_crop(a, self.image_size).copy()
        if self.invert if invert is None else invert:
            a = 255 - a
        return torch.from_numpy(a)
