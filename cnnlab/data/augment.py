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
import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torchvision.transforms.v2.functional import equalize

from ..config import TTA_MODES

BINS = 30   # magnitude index 0..30, as torchvision's num_magnitude_bins=31


# ---------- the operations: float (B, C, H, W) in [0, 255], one magnitude per image (B,) ----------

def _blend(x, other, factor):
    """factor * x + (1 - factor) * other, per image (torchvision's _blend)."""
    return (other + factor[:, None, None, None] * (x - other)).clamp_(0, 255)


def _gray(x):
    if x.shape[1] == 1:
        return x
    return (0.2989 * x[:, 0] + 0.587 * x[:, 1] + 0.114 * x[:, 2]).unsqueeze(1)   # ITU-R 601-2, as PIL


def brightness(x, m):
    return _blend(x, torch.zeros_like(x), 1 + m)


def color(x, m):
    return _blend(x, _gray(x).expand_as(x), 1 + m)


def contrast(x, m):
    return _blend(x, _gray(x).mean((1, 2, 3), keepdim=True).expand_as(x), 1 + m)


def sharpness(x, m):
    """Blend with a 3x3 smoothing of the image; the border pixels keep their values (as PIL)."""
    c = x.shape[1]
    kernel = torch.ones(3, 3, device=x.device)
    kernel[1, 1] = 5
    kernel = (kernel / 13).expand(c, 1, 3, 3)
    smooth = x.clone()
    smooth[..., 1:-1, 1:-1] = F.conv2d(x, kernel, groups=c)
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


def equalize_(x, m):
    return equalize(x.round().to(torch.uint8)).float()   # torchvision's batched histogram equalisation


def identity(x, m):
    return x


def _affine(x, theta):
    """Resample each image by its own (2, 3) matrix (output -> input, normalised coordinates),
    nearest pixel, zero fill: one grid_sample for the whole group."""
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="nearest", padding_mode="zeros", align_corners=False)


def _theta(m, a=1, b=0, c=0, d=0, e=1, f=0):
    theta = torch.zeros(len(m), 2, 3, device=m.device)
    theta[:, 0, 0], theta[:, 0, 1], theta[:, 0, 2] = a, b, c
    theta[:, 1, 0], theta[:, 1, 1], theta[:, 1, 2] = d, e, f
    return theta


# The geometric ops give each image's matrix, not the image: one grid_sample per round moves all
# the images that drew any of them (five calls cost 5x, grid generation dominating).
def shear_x(m, size):
    return _theta(m, b=m)


def shear_y(m, size):
    return _theta(m, d=m)


def translate_x(m, size):   # m in pixels; a shift of one image width is 2 in normalised units
    return _theta(m, c=-2 * m / size[1])


def translate_y(m, size):
    return _theta(m, f=-2 * m / size[0])


def rotate(m, size):
    r = m * (math.pi / 180)
    return _theta(m, a=torch.cos(r), b=-torch.sin(r), d=torch.sin(r), e=torch.cos(r))


GEOMETRIC = (shear_x, shear_y, translate_x, translate_y, rotate)


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


def op_values(op, index, wide, size):
    """Magnitude index (B,) in 0..30 -> the op's parameter per image, as torchvision's tables."""
    top = op.wide if wide else op.rand
    if op.kind == "posterize":   # 8 - round(i / (30 / top)) bits
        return (8 - torch.round(index * top / BINS)).clamp(1, 8)
    if op.kind == "solarize":    # the threshold falls from 255 to 0
        return 255 * (1 - index / BINS)
    value = top * index / BINS
    return value * size if op.fn in (translate_x, translate_y) else value


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
    Loops over the OPERATIONS, never over images; the groups are chosen on the CPU (no device sync)."""
    ops, index, sign = (d[:, positions] for d in draws)
    for r in range(len(ops)):
        moved, thetas = [], []
        for k, op in enumerate(OPERATIONS):
            rows = (ops[r] == k).nonzero().squeeze(1)
            if len(rows) == 0 or op.fn is identity:
                continue
            value = op_values(op, index[r, rows], wide, x.shape[-1])
            value = (value * sign[r, rows] if op.signed else value).to(x.device)
            rows = rows.to(x.device)
            if op.fn in GEOMETRIC:
                moved.append(rows)
                thetas.append(op.fn(value, x.shape[2:]))
            else:
                x[rows] = op.fn(x[rows], value)
        if moved:
            rows = torch.cat(moved)
            x[rows] = _affine(x[rows], torch.cat(thetas))
    return x


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
    b, _, h, w = x.shape
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

def tta_views(x, mode, fill=0.0):
    """The views of a batch (B, C, H, W) whose probabilities --tta averages: the images and their
    mirror images (flip); with crop also each shifted by the training crop's padding (2 px for
    digits, H/8 for larger images) in the four directions, the uncovered border set to `fill`
    (0 for uint8, the normalised value of 0 for network inputs: training's zero padding)."""
    if mode not in TTA_MODES:
        from ..errors import unknown

        raise unknown("--tta", mode, TTA_MODES)
    if mode == "none":
        return [x]
    views = [x, x.flip(-1)]
    if mode == "flip+crop":
        d = 2 if x.shape[2] <= 28 else x.shape[2] // 8
        views += [shift(v, dy, dx, fill) for v in (x, x.flip(-1))
                  for dy, dx in ((d, 0), (-d, 0), (0, d), (0, -d))]
    return views


def shift(x, dy, dx, fill):
    """x moved by (dy, dx) pixels, the uncovered border `fill` (a number or a (1, C, 1, 1) tensor)."""
    h, w = x.shape[2:]
    out = torch.empty_like(x).copy_(torch.as_tensor(fill, dtype=x.dtype, device=x.device).expand_as(x))
    out[..., max(dy, 0):h + min(dy, 0), max(dx, 0):w + min(dx, 0)] = \
        x[..., max(-dy, 0):h + min(-dy, 0), max(-dx, 0):w + min(-dx, 0)]
    return out


class TTA(torch.nn.Module):
    """A network whose output is the log of its probabilities averaged over tta_views: argmax,
    softmax and cross-entropy of it are those of the averaged probabilities (engine.evaluate
    takes it as logits). `fill`: the normalised value of a black pixel."""

    def __init__(self, net, mode, fill):
        super().__init__()
        self.net, self.mode, self.fill = net, mode, fill

    def forward(self, x):
        probs = torch.stack([self.net(v).float().softmax(1) for v in tta_views(x, self.mode, self.fill)])
        return probs.mean(0).clamp_min(1e-12).log()
