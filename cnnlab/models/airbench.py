"""airbench94's network (Keller Jordan, "94% on CIFAR-10 in 3.29 seconds on a single GPU", 2024;
github.com/KellerJordan/cifar10-airbench, legacy/airbench94.py), rebuilt from its paper and code.

What sets it apart from resnet_small, each from that code:
- a first layer that whitens the pixels of every 2x2 patch, set from the training images before
  training (`Whiten.adapt`, which the training loop calls) and never trained itself, bias aside;
- batch norms that learn a shift but no scale (a fast-moving 0.4 momentum);
- convolutions that start as the identity on their first input channels (Dirac init), GELUs;
- one conv -> max-pool -> BN -> GELU -> conv -> BN -> GELU group per resolution, no residuals;
- batch-norm shifts that learn `BIAS_LR` times faster (a parameter's `lr_mult`, which
  training/optim.py reads), their weight decay kept as it is.
On 2 Xeon cores (bf16, AMX) cnnlab trains it on the full CIFAR-10 JPEGs to 88.5% test in 10 epochs
(6 min) and 89.6% in 20 (11.5 min, BN eps 1e-12 then), where resnet_small took 40 epochs (24.7 min)
for 89.4%; airbench's own code, run on the same cores and images, 90.1% in 10 (benchmarks/README.md).
The recipes now shift as airbench does (--crop-padding 2 --crop-padding-mode reflect, --augment
crop+altflip): 90.38% in 20 epochs with Lookahead (11.7 min; benchmarks/README.md, session 14). What
they still do differently: the whitening bias trains throughout (airbench stops it after 3 epochs);
one-cycle runs the lr 0 -> 1 -> 0 (airbench 0.2 -> 1 -> 0.07; no gain measured at 10 epochs).
"""
import torch
from torch import nn
from torch.nn import functional as F

from . import register
from .resnet import Scale

BIAS_LR = 64.0      # airbench94's bias_scaler


class Whiten(nn.Module):
    """A 2x2 convolution whose filters decorrelate the pixels of a patch: the eigenvectors of the
    training images' patch covariance, each scaled by 1/sqrt(its eigenvalue), and their negatives
    (so a ReLU-like activation after it loses no sign). The filters are a buffer, set by `adapt`
    from the network's inputs and saved with the weights; only the bias trains. Until adapted
    (a model built outside the training loop) they are an ordinary conv's random init."""

    def __init__(self, channels, size=2, eps=5e-4):
        super().__init__()
        self.size, self.eps = size, eps
        half = channels * size * size
        init = nn.Conv2d(channels, 2 * half, size)
        self.register_buffer("weight", init.weight.detach().clone())
        self.bias = nn.Parameter(torch.zeros(2 * half))

    @torch.no_grad()
    def adapt(self, x, chunk=500):
        """Set the filters from the network's inputs `x` (N, C, H, W), normalised as in training;
        the covariance is summed in chunks of images, in float64."""
        k = self.weight.shape[1] * self.size * self.size
        covariance, count = torch.zeros(k, k, dtype=torch.float64, device=x.device), 0
        for part in x.split(chunk):
            patches = F.unfold(part.double(), self.size).transpose(1, 2).reshape(-1, k)   # (patches, C*s*s)
            covariance += patches.T @ patches
            count += len(patches)
        eigenvalues, eigenvectors = torch.linalg.eigh(covariance / count)
        filters = (eigenvectors.T / (eigenvalues.clamp(min=0) + self.eps).sqrt()[:, None]).flip(0)   # largest first
        filters = filters.reshape(k, *self.weight.shape[1:]).to(self.weight)
        self.weight.copy_(torch.cat((filters, -filters)))

    def forward(self, x):
        return F.conv2d(x, self.weight, self.bias)


def shift_norm(channels):
    """Batch norm with a learned shift and a fixed scale of 1. airbench's eps is 1e-12: on digits
    (flat black borders) a DDP rank's 25-image batch had channels of no variance, which it scaled by
    1e6, and training diverged; torch's default 1e-5 trained."""
    norm = nn.BatchNorm2d(channels, eps=1e-5, momentum=0.4)
    norm.weight.requires_grad_(False)
    norm.bias.lr_mult = BIAS_LR
    return norm


def conv(cin, cout):
    layer = nn.Conv2d(cin, cout, 3, padding=1, bias=False)
    with torch.no_grad():
        nn.init.dirac_(layer.weight[:min(cin, cout)])
    return layer


def group(cin, cout):
    return nn.Sequential(conv(cin, cout), nn.MaxPool2d(2), shift_norm(cout), nn.GELU(),
                         conv(cout, cout), shift_norm(cout), nn.GELU())


MIN_SIDE = 9   # 9 -> 8 (whitening) -> 4 -> 2 -> 1 (pools)


@register("modern: airbench94's network (Jordan 2024): whitened 2x2 patches, 3 conv groups; the CIFAR "
          "recipes' net")
def airbench(in_shape, num_classes, width=64):
    """Groups of width, 4x width and 4x width channels (airbench94: 64, 256, 256)."""
    if min(in_shape[1:]) < MIN_SIDE:   # else the first training step fails deep inside a max-pool
        raise ValueError(f"airbench needs images of at least {MIN_SIDE} px a side (its 2x2 whitening and three "
                         f"2x2 poolings); give --image-size {MIN_SIDE} or more")
    whiten = Whiten(in_shape[0])
    w = [whiten.bias.numel(), width, 4 * width, 4 * width]
    return nn.Sequential(whiten, nn.GELU(), *(group(cin, cout) for cin, cout in zip(w, w[1:])),
                         nn.AdaptiveMaxPool2d(1), nn.Flatten(), nn.Linear(w[-1], num_classes, bias=False),
                         Scale(1 / 9))
