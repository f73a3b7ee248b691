"""Strong augmentation of whole batches on the training device: RandAugment / TrivialAugmentWide,
colour jitter, random erasing, mixup and cutmix (with soft targets).

Every draw is made on the CPU from the loader's (seed, epoch, step) generator for ALL positions of
the global batch, and a rank uses its share: resumed runs and DDP ranks see exactly the images one
uninterrupted process would have (the same rule as loader.augment_gather).

Why not torchvision.transforms.v2.RandAugment: on a batched tensor it applies ONE draw (op and
sign) to the whole batch, so every image of a step gets the same operation. Splitting the batch
into groups with a draw each still leaves whole groups alike, and a per-image call is a Python loop
over the batch (benchmarks/README.md, "Strong augmentation"). Here each image draws its own op
and magnitude, and the loop runs over the 14 OPERATIONS, each applied at once to the images that
drew it, with per-image magnitudes as tensors. Magnitude tables follow torchvision 0.29's
RandAugment (31 bins) and TrivialAugmentWide; shears and rotations turn about the image centre.
"""
import itertools
import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from ..config import TTA_MODES
from .loader import shift_pixels

BINS = 30   # magnitude index 0..30, as torchvision's num_magnitude_bins=31


# ---------- the operations: float (B, C, H, W) in [0, 255], one magnitude per image (B,) ----------

def _blend(x, other, factor):
    """factor * x + (1 - factor) * other, per image (torchvision's _blend); `other` broadcasts.
    One lerp and one clamp: these run on whole batches (jitter), where each pass counts."""
    return torch.lerp(other, x, factor[:, None, None, None]).clamp_(0, 255)


def _gray(x):   # (B, 1, H, W)
    if x.shape[1] == 1:
        return x
    weights = torch.tensor([0.2989, 0.587, 0.114], device=x.device)[:, None, None]   # ITU-R 601-2, as PIL
    return (x * weights).sum(1, keepdim=True)


def brightness(x, m):
    return (x * (1 + m)[:, None, None, None]).clamp_(0, 255)   # a blend with black


def color(x, m):
    return _blend(x, _gray(x), 1 + m)


def contrast(x, m):
    return _blend(x, _gray(x).mean((1, 2, 3), keepdim=True), 1 + m)


def sharpness(x, m):
    """Blend with PIL's smoothing [[1, 1, 1], [1, 5, 1], [1, 1, 1]] / 13 (a 3x3 box sum plus 4x the
    centre, in separable slices: half the time of a grouped conv2d on the CPU); the border pixels
    keep their values (as PIL)."""
    rows = x[..., :-2, :] + x[..., 1:-1, :] + x[..., 2:, :]
    box = rows[..., :-2] + rows[..., 1:-1] + rows[..., 2:]
    smooth = x.clone()
    smooth[..., 1:-1, 1:-1] = (box + 4 * x[..., 1:-1, 1:-1]) / 13
    return _blend(x, smooth, 1 + m)


def posterize(x, bits):
    step = 2.0 ** (8 - bits)[:, None, None, None]
    return torch.floor(x / step) * step


def solarize(x, threshold):
    return torch.where(x >= threshold[:, None, None, None], 255 - x, x)


def autocontrast(x, m):
    low, high = x.amin((2, 3), keepdim=True), x.amax((2, 3), keepdim=True)
    stretched = (x - low) * (255 / (high - low).clamp_min(1e-6))
    return torch.where(high > low, stretched, x)


def equalize_(x, m):   # torchvision's batched histogram equalisation; its kernel called directly,
    from torchvision.transforms.v2.functional import equalize_image   # skipping v2's dispatch (0.2 ms a
    return equalize_image(x.round().to(torch.uint8)).float()          # call); imported here: 0.2 s at start


def identity(x, m):
    return x


def _affine(x, theta):
    """Resample each image by its own (2, 3) matrix (output -> input, normalised coordinates),
    nearest pixel, zero fill. The grid is affine_grid's, built by broadcasting: affine_grid's bmm
    of (B, H*W, 3) by (B, 3, 2) took 1.3 ms of the 1.8 a call on one CPU thread."""
    h, w = x.shape[2:]
    theta = theta[:, :, :, None, None]                                           # (B, 2, 3, 1, 1)
    cols = torch.linspace(-1, 1, w, device=x.device) * ((w - 1) / w)             # pixel centres,
    rows = (torch.linspace(-1, 1, h, device=x.device) * ((h - 1) / h))[:, None]  # align_corners=False
    grid = theta[:, :, 0] * cols + theta[:, :, 1] * rows + theta[:, :, 2]        # (B, 2, H, W)
    return F.grid_sample(x, grid.permute(0, 2, 3, 1), mode="nearest", padding_mode="zeros", align_corners=False)


# The geometric ops as (2, 3) matrices (output -> input) of their parameter m: each op's function
# gives the matrix's change per unit of m at an image size; rotate turns by m degrees instead.
def shear_x(size):
    return [[0, 1, 0], [0, 0, 0]]


def shear_y(size):
    return [[0, 0, 0], [1, 0, 0]]


def translate_x(size):   # m in pixels; a shift of one image width is 2 in normalised units
    return [[0, 0, -2 / size[1]], [0, 0, 0]]


def translate_y(size):
    return [[0, 0, 0], [0, 0, -2 / size[0]]]


def rotate(size):
    return [[0, 0, 0], [0, 0, 0]]


GEOMETRIC = (shear_x, shear_y, translate_x, translate_y, rotate)


def geometric_theta(kind, m, size):
    """Each image's matrix, all at once: kind (B,) indexes GEOMETRIC, m (B,) its parameter. Built
    on the CPU in a dozen calls, then one grid_sample moves every image of a round that drew a
    geometric op (per op, five calls cost 5x, grid generation dominating)."""
    r = torch.where(kind == GEOMETRIC.index(rotate), m * (math.pi / 180), 0.0)   # 0: no turn
    cos, sin, zero = r.cos(), r.sin(), torch.zeros_like(r)
    turn = torch.stack([cos, -sin, zero, sin, cos, zero], 1).view(-1, 2, 3)
    return turn + m[:, None, None] * torch.tensor([fn(size) for fn in GEOMETRIC], dtype=m.dtype)[kind]


@dataclass(frozen=True)
class Op:
    fn: object
    rand: float       # RandAugment's largest magnitude (bin 30)
    wide: float       # TrivialAugmentWide's
    signed: bool      # a random sign per image
    kind: str = "linear"   # or "posterize" (bits), "solarize" (threshold): a table of their own


# torchvision 0.29 _augment_space of RandAugment and TrivialAugmentWide; translations in image-size
# fractions (RandAugment: 150/331 of the side; TrivialAugmentWide: 32 px of 224 ~ 0.143, scaled)
OPERATIONS = (
    Op(identity, 0, 0, False), Op(shear_x, 0.3, 0.99, True), Op(shear_y, 0.3, 0.99, True),
    Op(translate_x, 150 / 331, 32 / 224, True), Op(translate_y, 150 / 331, 32 / 224, True),
    Op(rotate, 30, 135, True), Op(brightness, 0.9, 0.99, True), Op(color, 0.9, 0.99, True),
    Op(contrast, 0.9, 0.99, True), Op(sharpness, 0.9, 0.99, True), Op(posterize, 4, 6, False, "posterize"),
    Op(solarize, 255, 255, False, "solarize"), Op(autocontrast, 0, 0, False), Op(equalize_, 0, 0, False),
)
# geometric_theta's kind is an op number less this: the geometric ops sit together, in GEOMETRIC's order
_FIRST_GEOMETRIC = [op.fn for op in OPERATIONS].index(GEOMETRIC[0])
assert tuple(op.fn for op in OPERATIONS[_FIRST_GEOMETRIC:][:len(GEOMETRIC)]) == GEOMETRIC


# the tables as tensors indexed by op number, so one round's parameters are a few calls, not 14 x 5
_TOP = {wide: torch.tensor([op.wide if wide else op.rand for op in OPERATIONS]) for wide in (False, True)}
_SIGNED = torch.tensor([op.signed for op in OPERATIONS])
_PIXELS = torch.tensor([op.fn in (translate_x, translate_y) for op in OPERATIONS])
_KIND = {kind: torch.tensor([op.kind == kind for op in OPERATIONS]) for kind in ("posterize", "solarize")}


def op_values(ops, index, sign, wide, size):
    """Op number, magnitude index in 0..30 and sign (each (B,)) -> each image's parameter for its
    op, as torchvision's tables: posterize keeps 8 - round(i / (30 / top)) bits, solarize's
    threshold falls from 255 to 0, translations are in pixels, the others top * i / 30."""
    top = _TOP[wide][ops]
    value = torch.where(_PIXELS[ops], top * index / BINS * size, top * index / BINS)
    value = torch.where(_KIND["posterize"][ops], (8 - torch.round(index * top / BINS)).clamp(1, 8), value)
    value = torch.where(_KIND["solarize"][ops], 255 * (1 - index / BINS), value)
    return torch.where(_SIGNED[ops], value * sign, value)


# ---------- the policy, jitter and erasing, drawn for every position of the global batch ----------

def draw_policy(policy, magnitude, drawn, gen):
    """(op, magnitude index, sign) per image and round, each (rounds, drawn): RandAugment applies 2
    ops of the fixed magnitude; TrivialAugmentWide 1 op of a uniform magnitude."""
    rounds = 2 if policy == "randaugment" else 1
    ops = torch.randint(0, len(OPERATIONS), (rounds, drawn), generator=gen)
    if policy == "randaugment":
        index = torch.full((rounds, drawn), float(magnitude))
    else:
        index = torch.randint(0, BINS + 1, (rounds, drawn), generator=gen).float()
    sign = torch.where(torch.rand(rounds, drawn, generator=gen) < 0.5, -1.0, 1.0)
    return ops, index, sign


def apply_policy(x, draws, positions, wide):
    """x (B, C, H, W) float: the images at `positions` of the global batch, each with its own ops.
    Each round sorts the images by the op they drew (one index_select), so every op works in place
    on a contiguous run of rows: no gather and scatter per op. Sorting and sizes are worked out on
    the CPU (no device sync); the images are put back in their order once, at the end."""
    ops, index, sign = (d[:, positions] for d in draws)
    values = op_values(ops, index, sign, wide, x.shape[-1])   # (rounds, B)
    held = torch.arange(len(positions))   # held[i]: the image now in row i of x
    for r in range(len(ops)):
        order = torch.argsort(ops[r, held], stable=True)
        held = held[order]
        x = x.index_select(0, order.to(x.device))   # index_select: 5x faster than x[order] on the CPU
        apply_round(x, ops[r, held], values[r, held])
    return x.index_select(0, torch.argsort(held).to(x.device))


def apply_round(x, ops, values):
    """In place: rows sorted by op number `ops` (B,) on the CPU, each row's parameter `values` (B,)."""
    counts = torch.bincount(ops, minlength=len(OPERATIONS)).tolist()
    runs = [(op, slice(end - n, end)) for op, n, end in zip(OPERATIONS, counts, itertools.accumulate(counts))
            if n and op.fn is not identity]
    moved = [rows for op, rows in runs if op.fn in GEOMETRIC]
    if moved:   # the geometric ops are neighbours in OPERATIONS: one grid_sample moves all their rows
        rows = slice(moved[0].start, moved[-1].stop)
        theta = geometric_theta(ops[rows] - _FIRST_GEOMETRIC, values[rows], x.shape[2:])
        x[rows] = _affine(x[rows], theta.to(x.device))
    device_values = values.to(x.device)
    for op, rows in runs:
        if op.fn not in GEOMETRIC:
            x[rows] = op.fn(x[rows], device_values[rows])


def colour_jitter(x, strength, factors):
    """Colour jitter: brightness, contrast, saturation by per-image factors (B, 3) in [1-s, 1+s]
    (torchvision's ColorJitter in a fixed order)."""
    f = (1 + strength * (2 * factors - 1)).to(x.device)
    x = brightness(x, f[:, 0] - 1)
    x = contrast(x, f[:, 1] - 1)
    return color(x, f[:, 2] - 1)


def draw_erase(p, drawn, gen):
    """Random erasing (Zhong et al. 2017, torchvision's RandomErasing defaults): with probability
    p a box of 2-33% of the area, aspect ratio log-uniform in [0.3, 3.3]. Returns (drawn, 5):
    on, area, log-ratio, and the box's place as fractions of the room left."""
    u = torch.rand(drawn, 5, generator=gen)
    u[:, 0] = (u[:, 0] < p).float()
    u[:, 1] = 0.02 + u[:, 1] * (0.33 - 0.02)
    u[:, 2] = math.log(0.3) + u[:, 2] * (math.log(3.3) - math.log(0.3))
    return u


def erase(x, boxes):
    """Blank one box per chosen image with 0 (the normalised mean, torchvision's default value)."""
    h, w = x.shape[2:]
    boxes = boxes.to(x.device)
    area, ratio = boxes[:, 1] * h * w, boxes[:, 2].exp()
    bh = torch.sqrt(area * ratio).round().clamp(1, h)
    bw = torch.sqrt(area / ratio).round().clamp(1, w)
    top, left = (boxes[:, 3] * (h - bh + 1)).floor(), (boxes[:, 4] * (w - bw + 1)).floor()
    rows = torch.arange(h, device=x.device)[None, :, None]
    cols = torch.arange(w, device=x.device)[None, None, :]
    inside = ((rows >= top[:, None, None]) & (rows < (top + bh)[:, None, None])
              & (cols >= left[:, None, None]) & (cols < (left + bw)[:, None, None]))   # (B, H, W)
    inside &= boxes[:, 0].bool()[:, None, None]
    return x.masked_fill(inside[:, None], 0.0)


# ---------- mixup and cutmix: one draw per global batch ----------

@dataclass
class Mix:
    kind: str            # "mixup" or "cutmix"
    lam: float           # the weight of each image's own label
    partner: torch.Tensor   # (drawn,) the position each image is mixed with
    box: tuple = None    # cutmix: (y0, y1, x0, x1)


def draw_mix(mixup, cutmix, drawn, size, gen):
    """None, or this batch's Mix. With both on, each batch takes one of the two (timm's switch)."""
    if not (mixup or cutmix):
        return None
    use_cutmix = cutmix > 0 and (not mixup or torch.rand(1, generator=gen).item() < 0.5)
    alpha = cutmix if use_cutmix else mixup
    # torch has no seeded Beta sampler; numpy's, seeded from the batch's generator
    lam = float(np.random.default_rng(int(torch.randint(0, 2**62, (1,), generator=gen))).beta(alpha, alpha))
    partner = torch.randperm(drawn, generator=gen)
    if not use_cutmix:
        return Mix("mixup", lam, partner)
    h, w = size
    # the CutMix paper's box: sides sqrt(1 - lam) of the image's, centre uniform, clipped at the border
    ch, cw = int(h * math.sqrt(1 - lam)), int(w * math.sqrt(1 - lam))
    cy, cx = int(torch.randint(0, h, (1,), generator=gen)), int(torch.randint(0, w, (1,), generator=gen))
    y0, y1, x0, x1 = max(cy - ch // 2, 0), min(cy + ch // 2, h), max(cx - cw // 2, 0), min(cx + cw // 2, w)
    lam = 1 - (y1 - y0) * (x1 - x0) / (h * w)   # the label weight is the area actually kept
    return Mix("cutmix", lam, partner, (y0, y1, x0, x1))


def mix_images(x, partner_x, mix):
    if mix.kind == "mixup":
        return x.mul_(mix.lam).add_(partner_x, alpha=1 - mix.lam)
    y0, y1, x0, x1 = mix.box
    x[:, :, y0:y1, x0:x1] = partner_x[:, :, y0:y1, x0:x1]
    return x


def soft_targets(labels, partner_labels, lam, num_classes):
    """lam * one_hot(label) + (1 - lam) * one_hot(partner's): label smoothing is applied on top
    by the loss (F.cross_entropy's label_smoothing works on probability targets too)."""
    own = F.one_hot(labels, num_classes).float()
    return own.mul_(lam).add_(F.one_hot(partner_labels, num_classes).float(), alpha=1 - lam)


# ---------- the whole thing, per batch ----------

@dataclass
class Strong:
    """The strong augmentations of a run (None of them on: `strong_augment` returns None)."""
    policy: str = ""           # "", "randaugment" or "trivialaugment"
    magnitude: int = 9
    jitter: float = 0.0
    erase: float = 0.0
    mixup: float = 0.0
    cutmix: float = 0.0
    num_classes: int = 0

    def batch(self, images, labels, mine, size, gen, normalise):
        """This rank's (float images, targets) of a global batch. images(positions) -> uint8
        images at those positions (crop/flip applied); labels: (drawn,) of the whole batch; mine:
        the rank's positions; size: (H, W). Targets are soft (B, K) under mixup/cutmix."""
        drawn = len(labels)
        mine = torch.arange(drawn)[mine].contiguous()   # searchsorted wants contiguous positions
        policy = draw_policy(self.policy, self.magnitude, drawn, gen) if self.policy else None
        factors = torch.rand(drawn, 3, generator=gen) if self.jitter else None
        boxes = draw_erase(self.erase, drawn, gen) if self.erase else None
        mix = draw_mix(self.mixup, self.cutmix, drawn, size, gen)
        need = mine if mix is None else torch.unique(torch.cat([mine, mix.partner[mine]]))   # sorted
        x = images(need).float()
        if policy is not None:
            x = apply_policy(x, policy, need, self.policy == "trivialaugment")
        if factors is not None:
            x = colour_jitter(x, self.jitter, factors[need])
        x = normalise(x)
        if boxes is not None:
            x = erase(x, boxes[need])
        row = lambda positions: torch.searchsorted(need, positions).to(x.device)
        if mix is None:
            return x, labels[mine.to(labels.device)]
        own, partner = mine, mix.partner[mine]
        xb = mix_images(x[row(own)], x[row(partner)], mix)
        targets = soft_targets(labels[own.to(labels.device)], labels[partner.to(labels.device)], mix.lam,
                               self.num_classes)
        return xb, targets


POLICIES = ("randaugment", "trivialaugment")


def resolve_augment(data, requested):
    """--augment as the run uses it: a policy alone (`randaugment`) comes on top of the dataset's
    `auto` crop and flip, since dropping them would weaken the augmentation it adds to."""
    from . import default_augment

    if requested in POLICIES:
        return default_augment(data, "auto") + "+" + requested
    return default_augment(data, requested)


def strong_augment(cfg, augment, num_classes):
    """The run's Strong, or None when it asks for none of them. `augment`: the resolved --augment."""
    parts = augment.split("+")
    policy = next((p for p in parts if p in POLICIES), "")
    strong = Strong(policy, cfg.augment_magnitude, cfg.jitter, cfg.erase, cfg.mixup, cfg.cutmix, num_classes)
    return strong if (policy or cfg.jitter or cfg.erase or cfg.mixup or cfg.cutmix) else None


# ---------- test-time augmentation (evaluate, predict, serve) ----------

def training_shifts(config):
    """(crop_padding, crop_padding_mode) of a checkpoint's config: how its training crop shifted
    the images (auto and zeros for runs that predate the two settings)."""
    return config.get("crop_padding", 0), config.get("crop_padding_mode", "zeros")


def tta_views(x, mode, fill=0.0, padding=0, padding_mode="zeros"):
    """The views of a batch (B, C, H, W) whose probabilities --tta averages: the images and their
    mirror images (flip); with crop also each shifted in the four directions by the training crop's
    padding (loader.shift_pixels), the uncovered border as training filled it: `fill` for zeros (0
    for uint8, the normalised value of 0 for network inputs), the mirrored image for reflect."""
    if mode not in TTA_MODES:
        from ..errors import unknown

        raise unknown("--tta", mode, TTA_MODES)
    if mode == "none":
        return [x]
    views = [x, x.flip(-1)]
    if mode == "flip+crop":
        d = shift_pixels(x.shape[2], padding)
        views += [shift(v, dy, dx, fill, padding_mode) for v in (x, x.flip(-1))
                  for dy, dx in ((d, 0), (-d, 0), (0, d), (0, -d))]
    return views


def shift(x, dy, dx, fill, padding_mode="zeros"):
    """x moved by (dy, dx) pixels, the uncovered border `fill` (a number or a (1, C, 1, 1) tensor),
    or under reflect the image mirrored at its edges (as training's reflect padding gives)."""
    h, w = x.shape[2:]
    if padding_mode == "reflect":
        p = max(abs(dy), abs(dx))
        return F.pad(x, (p,) * 4, mode="reflect")[..., p - dy:p - dy + h, p - dx:p - dx + w]
    out = torch.empty_like(x).copy_(torch.as_tensor(fill, dtype=x.dtype, device=x.device).expand_as(x))
    out[..., max(dy, 0):h + min(dy, 0), max(dx, 0):w + min(dx, 0)] = \
        x[..., max(-dy, 0):h + min(-dy, 0), max(-dx, 0):w + min(-dx, 0)]
    return out


class TTA(torch.nn.Module):
    """A network whose output is the log of its probabilities averaged over tta_views: argmax,
    softmax and cross-entropy of it are those of the averaged probabilities (engine.evaluate
    takes it as logits). `fill`: the normalised value of a black pixel; `shifts`: training_shifts'."""

    def __init__(self, net, mode, fill, shifts=(0, "zeros")):
        super().__init__()
        self.net, self.mode, self.fill, self.shifts = net, mode, fill, shifts

    def forward(self, x):
        probs = torch.stack([self.net(v).float().softmax(1) for v in tta_views(x, self.mode, self.fill, *self.shifts)])
        return probs.mean(0).clamp_min(1e-12).log()
