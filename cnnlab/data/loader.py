"""The in-memory batch loader: the whole split lives on the training device as one uint8 tensor;
each step slices a batch from a seeded permutation, converts it to float, normalises and augments
it as ONE batch. This replaces DataLoader + per-sample ToTensor, whose Python overhead per image
dominated the tutorials' run time (see benchmarks/README.md).

Randomness is derived from (seed, epoch, step), never from hidden state, so resuming in the middle
of an epoch reproduces exactly the batches an uninterrupted run would have seen.
"""
import math

import torch


def _generator(*keys):
    seed = 0
    for k in keys:
        seed = (seed * 1_000_003 + int(k)) % (2**63 - 1)
    return torch.Generator().manual_seed(seed)


class BatchLoader:
    def __init__(self, x, y, batch_size, mean, std, device="cpu", shuffle=False, seed=0,
                 augment="none", rank=0, world=1, channels_last=False):
        self.x = x.to(device)                       # (N, C, H, W) uint8, moved once
        self.y = y.to(device)
        self.batch_size, self.shuffle, self.seed = batch_size, shuffle, seed
        self.augment, self.rank, self.world = augment, rank, world
        self.channels_last = channels_last
        std = torch.as_tensor(std, dtype=torch.float32, device=device).view(1, -1, 1, 1)
        mean = torch.as_tensor(mean, dtype=torch.float32, device=device).view(1, -1, 1, 1)
        self.scale, self.shift = 1 / (255 * std), -mean / std   # x/255 then normalise, fused

    def __len__(self):
        return math.ceil(len(self.y) / self.batch_size)

    def order(self, epoch):
        """The global sample order of an epoch; the same on every rank."""
        if not self.shuffle:
            return torch.arange(len(self.y), device=self.x.device)
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
        """The rank's share of global batch `idx`: its images, normalised and augmented with the
        random draws the single-process run would give those same images."""
        mine = slice(self.rank, None, self.world)
        xb = self.x[idx[mine]].float().mul_(self.scale).add_(self.shift)
        if self.augment != "none":
            xb = augment_batch(xb, self.augment, _generator(self.seed, epoch, step, 7), len(idx), mine)
        if self.channels_last:
            xb = xb.contiguous(memory_format=torch.channels_last)
        return xb, self.y[idx[mine]]


def augment_batch(x, kind, gen, drawn=None, mine=slice(None)):
    """Random crop with zero padding and/or horizontal
    flip, drawn per image but applied to the whole batch with one gather. Draws are made for the
    `drawn` images of the global batch and the `mine` share is used, so DDP ranks augment exactly as
    one process would."""
    b, c, h, w = x.shape
    drawn = drawn or b
    if "crop" in kind:
        pad = 2 if h <= 28 else h // 8   # 2 px for digits, 4 px for CIFAR (He et al. 2016)
        padded = torch.nn.functional.pad(x, (pad, pad, pad, pad))
        dy = torch.randint(0, 2 * pad + 1, (drawn,), generator=gen)[mine].to(x.device)
        dx = torch.randint(0, 2 * pad + 1, (drawn,), generator=gen)[mine].to(x.device)
        rows = (dy[:, None] + torch.arange(h, device=x.device))[:, None, :, None]   # (B, 1, H, 1)
        cols = (dx[:, None] + torch.arange(w, device=x.device))[:, None, None, :]   # (B, 1, 1, W)
        bi = torch.arange(b, device=x.device)[:, None, None, None]
        ci = torch.arange(c, device=x.device)[None, :, None, None]
        x = padded[bi, ci, rows, cols]
    if "flip" in kind:
        flip = (torch.rand(drawn, generator=gen)[mine] < 0.5).to(x.device)
        x = torch.where(flip[:, None, None, None], x.flip(3), x)
    return x
