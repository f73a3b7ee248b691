"""Preprocessing as one object: how an image becomes the network's input.

Built from the training data (channels, size, the training split's mean and std), saved in every
checkpoint, and used by the batch loader, inference, export and serve, so an image goes through
the same conversion at training time and at prediction time.
"""
from dataclasses import asdict, dataclass, fields

import torch


@dataclass
class Preprocess:
    channels: int               # 1 (grayscale) or 3 (RGB): every input is converted to this
    image_size: int             # inputs are resized to image_size x image_size
    mean: list                  # per channel, as fractions of 255 (training split only)
    std: list
    invert: bool = False        # 255 - x before normalising (dark digits on light paper)
    resize: str = "stretch"     # how another size becomes the square input: stretched, aspect not kept

    def to_dict(self):
        return asdict(self)

    @classmethod
    def from_dict(cls, d):
        """From a checkpoint's dict; keys a newer or older cnnlab wrote and this one lacks are ignored."""
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})

    def scale_shift(self, device="cpu"):
        """(scale, shift) of shape (1, C, 1, 1) with x_uint8 * scale + shift == (x / 255 - mean) / std:
        conversion and normalisation fused into one multiply-add."""
        std = torch.as_tensor(self.std, dtype=torch.float32, device=device).view(1, -1, 1, 1)
        mean = torch.as_tensor(self.mean, dtype=torch.float32, device=device).view(1, -1, 1, 1)
        return 1 / (255 * std), -mean / std
