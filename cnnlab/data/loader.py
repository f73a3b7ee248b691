"""The in-memory batch loader: the whole split lives on the training device as one uint8 tensor;
each step slices a batch from a seeded permutation, converts it to float, normalises and augments
it as ONE batch. This replaces DataLoader + per-sample ToTensor, whose Python overhead per image
dominated the tutorials' run time (see benchmarks/README.md).

Randomness is derived from (seed, epoch, step), never from hidden state, so resuming in the middle
of an epoch reproduces exactly the batches an uninterrupted run would have seen.
"""
import math

import torch

from ..errors import UsageError
from .images import center_crop
from .photos import draw_flips, random_resized_crop


def shift_pixels(height, padding=0):
    """How far crop shifts images of `height` (and --tta flip+crop with them): --crop-padding, or
    for 0 its auto, 2 px for digits and height/8 above (4 for CIFAR)."""
    return padding or (2 if height <= 28 else height // 8)


def _generator(*keys):
    seed = 0
    for k in keys:
        seed = (seed * 1_000_003 + int(k)) % (2**63 - 1)
    return torch.Generator().manual_seed(seed)


class BatchLoader:
    """Batches of one split, normalised by `preprocess` (the Preprocess a model trains or was trained with)."""

    def __init__(self, x, y, batch_size, preprocess, device="cpu", shuffle=False, seed=0,
                 augment="none", rank=0, world=1, channels_last=False, sampler="shuffle", strong=None,
                 mixed=False, padding=0, padding_mode="zeros"):
        self.x = x.to(device)                       # (N, C, H, W) uint8, moved once
        self.y = y.to(device)
        self.batch_size, self.shuffle, self.seed = batch_size, shuffle, seed
        self.augment, self.rank, self.world = augment, rank, world
        self.channels_last = channels_last
        h = x.shape[2]
        # photos (--resize crop) are stored larger than the input: random-resized crops, not shifts
        self.size = preprocess.image_size if h > preprocess.image_size else 0
        parts = augment.split("+")
        shifts = "crop" in parts and not self.size
        self.pad = shift_pixels(h, padding) if shifts else 0
        side = min(x.shape[2:])
        if self.pad >= side:   # reflect cannot, zeros would give blank crops
            raise UsageError(f"--crop-padding {self.pad}{'' if padding else ' (auto)'} must be under the images' "
                             f"{side} px: give --crop-padding {side - 1} or less.")
        self.padding_mode = "constant" if padding_mode == "zeros" else padding_mode
        # Padded once here, so a random crop is a plain gather with no per-batch padding.
        self.padded = self.pad_images(self.x)
        # flip: a coin per image and step; altflip: a coin per image, inverted every odd epoch
        self.flip = "flip" in parts or "altflip" in parts
        altflip = _generator(seed, -1, 13)   # a key no epoch's order or step's draws use
        self.mirrored = (torch.rand(len(y), generator=altflip) < 0.5) if "altflip" in parts else None
        self.preprocess, self.scale_shift = preprocess, preprocess.scale_shift(device)   # made once, used per batch
        self.sampler, self.strong = sampler, strong   # strong: augment.Strong (RandAugment, mixup, ...) or None
        self.mixed = mixed   # unshuffled, yet in one fixed random order: engine.depends_on_batch says when

    def __len__(self):
        return math.ceil(len(self.y) / self.batch_size)

    def order(self, epoch):
        """The global sample order of an epoch; the same on every rank."""
        if not self.shuffle:
            if self.mixed:   # the same every time; a class-sorted split (a folder's) would give one-class batches
                return torch.randperm(len(self.y), generator=_generator(0)).to(self.x.device)
            return torch.arange(len(self.y), device=self.x.device)
        if self.sampler == "balanced":
            return balanced_order(self.y, _generator(self.seed, epoch))
        if self.sampler == "fixed":   # the book's runs after its first: a shuffle=False loader over mixed data
            epoch = 0
        return torch.randperm(len(self.y), generator=_generator(self.seed, epoch)).to(self.x.device)

    def batches(self, epoch=0, start=0):
        """Yield (images float (B, C, H, W), labels (B,)) from step `start` of `epoch`. Under DDP
        each rank takes every world-th sample of each global batch, so the ranks' shards are
        disjoint and together are exactly the single-process batch."""
        order = self.order(epoch)
        for step in range(start, len(self)):
            idx = order[step * self.batch_size:(step + 1) * self.batch_size]
            yield self.make_batch(idx, epoch, step)

    def make_batch(self, idx, epoch=0, step=0):
        """The rank's share of global batch `idx`: its images, augmented (still as uint8, 4x less
        memory traffic than floats) with the random draws one process would give those same images,
        then converted and normalised in one pass."""
        mine = slice(self.rank, None, self.world)
        images = lambda positions: self.images(idx, positions, epoch, step)
        if self.strong is None:
            xb, yb = self.preprocess.normalise(images(mine), self.scale_shift), self.y[idx[mine]]
        else:
            normalise = lambda x: self.preprocess.normalise(x, self.scale_shift)
            xb, yb = self.strong.batch(images, self.y[idx], mine, (self.size,) * 2 if self.size else self.x.shape[2:],
                                       _generator(self.seed, epoch, step, 11), normalise)
        if self.channels_last:
            xb = xb.contiguous(memory_format=torch.channels_last)
        return xb, yb

    def images(self, idx, positions, epoch, step):
        """uint8 images at `positions` (a slice or CPU index tensor) of global batch `idx`, cropped
        and flipped with the draws of their positions."""
        if self.size:
            return self.photos(self.x, idx[positions], len(idx), positions, epoch, step, self.flips(idx, positions, epoch))
        if self.augment == "none":
            return self.x[idx[positions]]
        return augment_gather(self.padded, idx[positions], self.x.shape[2:], self.pad,
                              self.flips(idx, positions, epoch), _generator(self.seed, epoch, step, 7), len(idx),
                              positions)

    def pad_images(self, x):
        """x (N, C, H, W) with crop's padding on every side (zeros, or the image mirrored)."""
        return torch.nn.functional.pad(x, (self.pad,) * 4, mode=self.padding_mode) if self.pad else x

    def flips(self, idx, positions, epoch):
        """The `flip` argument of the croppers for images idx[positions]: True or False (a fair coin
        per image, drawn there), or under altflip which of them are mirrored: a fixed coin per image,
        inverted in odd epochs, so every image is seen both ways in every two epochs (airbench's
        alternating flip)."""
        if self.mirrored is None:
            return self.flip
        return self.mirrored[idx[positions].cpu()] ^ bool(epoch % 2)

    def photos(self, x, rows, n, positions, epoch, step, flip):
        """Photos stored larger than the input (`rows` of `x`, at `positions` of a global batch of
        `n`): a random-resized crop (and flip) each when training augments with crop, the centre
        otherwise (evaluation's resize + centre crop); `flip` as `flips` gives it."""
        gen = _generator(self.seed, epoch, step, 7)
        if "crop" in self.augment.split("+"):
            return random_resized_crop(x, rows, self.size, flip, gen, n, positions)
        x = center_crop(x[rows], self.size)
        flipped = draw_flips(flip, gen, n, positions)
        if flipped is None:
            return x
        return torch.where(flipped.to(x.device)[:, None, None, None], x.flip(-1), x)


def balanced_order(y, gen):
    """--sampler balanced: len(y) draws with replacement, each class equally likely (weight
    1 / its count per sample, as torch's WeightedRandomSampler), seeded per epoch so resume and
    DDP shards hold."""
    counts = torch.bincount(y.cpu())
    weights = 1.0 / counts.double()[y.cpu()]
    return torch.multinomial(weights, len(y), replacement=True, generator=gen).to(y.device)


def augment_gather(padded, idx, size, pad, flip, gen, drawn, mine=slice(None)):
    """Random crops (shifts of up to `pad` pixels into the padding) and horizontal flips of the images
    `idx` of `padded` (N, C, H+2p, W+2p), done as ONE gather: every output pixel's flat source index
    is a per-image offset plus a fixed (C, H, W) grid (mirrored for flipped images), and `take`
    reads them all at once. Draws are made for all `drawn` images of the global batch and the
    `mine` share is used, so DDP ranks augment exactly as one process would."""
    n, c, hp, wp = padded.shape
    h, w = size
    device = padded.device
    dy = torch.randint(0, 2 * pad + 1, (drawn,), generator=gen)[mine].to(device)
    dx = torch.randint(0, 2 * pad + 1, (drawn,), generator=gen)[mine].to(device)
    offset = idx * (c * hp * wp) + dy * wp + dx                              # (B,)
    grid = _grid(c, h, w, hp, wp, device)                                    # (2, C, H, W)
    flipped = draw_flips(flip, gen, drawn, mine)
    if flipped is not None:
        flat = grid[flipped.to(device).long()] + offset[:, None, None, None]
    else:
        flat = grid[0] + offset[:, None, None, None]
    return padded.reshape(-1).take(flat)                                    # (B, C, H, W)


_GRIDS = {}


def _grid(c, h, w, hp, wp, device):
    """Flat source offsets of a (C, H, W) window in a (C, hp, wp) image, and its mirror image."""
    key = (c, h, w, hp, wp, str(device))
    if key not in _GRIDS:
        rows = torch.arange(h, device=device)[:, None] * wp
        plain = torch.arange(c, device=device)[:, None, None] * (hp * wp) + rows + torch.arange(w, device=device)
        mirrored = torch.arange(c, device=device)[:, None, None] * (hp * wp) + rows + torch.arange(w - 1, -1, -1, device=device)
        _GRIDS[key] = torch.stack([plain, mirrored])
    return _GRIDS[key]
