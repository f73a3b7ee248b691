"""The photo pipeline (--resize crop): images of any size and aspect, decoded once, trained with a
random-resized crop per sample and evaluated with resize + centre crop, as ImageNet models are.

What is stored. Each image is decoded once (images.load_array) to a square of side L, about 1.15 x
the input side S: its shorter side resized to L, the longer one centre-cropped to L. A square, not
the shorter side alone, because every image of a split then fits one uint8 tensor (N, C, L, L): one
gather per batch on the device, one block in the decode cache, no per-image Python anywhere. The
price is the ends of the longer side (1/8 of a 4:3 photo's width on each side), which the
random-resized crop could otherwise reach; its crops mostly lie inside the centre square anyway.

Evaluation takes the centre S x S of the stored square: exactly torchvision's Resize(L) +
CenterCrop(S) when L - S is a multiple of 4 (as `stored_side` makes it; then the two centre crops'
rounded offsets add up to the direct one's), within a pixel otherwise (a weights' own 255/240).

Training takes, per sample, a random-resized crop (torchvision's RandomResizedCrop: area 8-100% of
the stored square, aspect ratio 3/4-4/3 log-uniform, 10 tries then the whole image) and a random
horizontal flip, drawn on the CPU from the loader's (seed, epoch, step) generator for every
position of the global batch (a DDP rank keeps its share; a resumed run draws the same), and
resampled for the whole batch at once on the training device by torchvision.ops.roi_align (its
adaptive sampling averages about (crop / S)^2 points per output pixel: an antialiased resize).
"""
import math

import torch

TRIES = 10                                 # RandomResizedCrop's attempts before the fallback
SCALE = (0.08, 1.0)                        # torchvision's defaults (the Inception paper's)
RATIO = (3 / 4, 4 / 3)


def stored_side(size):
    """L for an input side S: about 1.15 S (ImageNet's 256 for 224; 148 for 128), with L - S a
    multiple of 4 so that the centre crop of the stored square is torchvision's exactly."""
    return size + 4 * max(1, round(0.15 * size / 4))


def file_policy(requested, size, typical_side):
    """--resize for sources that decode files: `auto` is crop when the images' typical shorter
    side (their median) is larger than the input side, squash otherwise (small images, digits)."""
    if requested != "auto":
        return requested
    return "crop" if size and typical_side > size else "squash"


def stored_size(policy, size, resize_size=0):
    """The side images are kept at in memory: L under crop (`resize_size` when the weights give
    one, else stored_side), the input side otherwise (0: as they come)."""
    if policy != "crop" or not size:
        return size
    return resize_size or stored_side(size)


def draw_crops(drawn, gen):
    """(drawn, 4) boxes (top, left, height, width) as fractions of the stored square, one per
    image, as RandomResizedCrop draws them: TRIES candidates each, the first that fits is kept
    (all drawn at once, so the draws never depend on the images), else the whole square."""
    u = torch.rand(drawn, TRIES, 4, generator=gen, dtype=torch.float64)
    area = SCALE[0] + u[..., 0] * (SCALE[1] - SCALE[0])
    log_ratio = math.log(RATIO[0]) + u[..., 1] * (math.log(RATIO[1]) - math.log(RATIO[0]))
    w, h = (area * log_ratio.exp()).sqrt(), (area / log_ratio.exp()).sqrt()
    fits = (w <= 1) & (h <= 1)                                                   # (drawn, TRIES)
    first = fits.int().argmax(1)                                                 # the first that fits
    pick = lambda t: t.gather(1, first[:, None])[:, 0]
    h, w = pick(h), pick(w)
    top, left = pick(u[..., 2]) * (1 - h), pick(u[..., 3]) * (1 - w)
    boxes = torch.stack([top, left, h, w], 1)
    boxes[~fits.any(1)] = torch.tensor([0.0, 0.0, 1.0, 1.0], dtype=torch.float64)   # no try fitted: all of it
    return boxes.float()


def draw_flips(flip, gen, drawn, mine):
    """Which images of the `mine` share of a global batch of `drawn` are mirrored, as a bool tensor
    (None for none): a coin per image drawn from `gen` when `flip` is True, `flip` itself when it is
    already a tensor (altflip's, see BatchLoader.flips)."""
    if isinstance(flip, torch.Tensor):
        return flip
    return (torch.rand(drawn, generator=gen) < 0.5)[mine] if flip else None


def random_resized_crop(stored, idx, size, flip, gen, drawn, mine=slice(None)):
    """Random-resized crops (and flips when `flip`) of the images `idx` of `stored` (N, C, L, L)
    uint8, resampled to float (B, C, size, size) in [0, 255]. Draws are made for all `drawn`
    images of the global batch and the `mine` share is used (the loader's rule for DDP)."""
    from torchvision.ops import roi_align

    boxes = draw_crops(drawn, gen)[mine]
    flipped = draw_flips(flip, gen, drawn, mine)
    x = stored[idx].float()                                                      # (B, C, L, L)
    side = stored.shape[-1]
    top, left, h, w = (boxes * side).unbind(1)
    rois = torch.stack([torch.arange(len(boxes), dtype=torch.float32), left, top, left + w, top + h], 1)
    out = roi_align(x, rois.to(x.device), (size, size), spatial_scale=1.0, sampling_ratio=-1, aligned=True)
    if flipped is not None and flipped.any():
        rows = flipped.nonzero()[:, 0].to(x.device)
        out[rows] = out[rows].flip(-1)
    return out                                                                    # (B, C, size, size)
