"""Modern small networks with batch norm, for the speed recipes (not from the tutorials).

`resnet_small` follows the ResNet-9 / airbench layout (Page 2018; Jordan 2024): a conv stem, then
stages of conv -> max-pool -> BN -> ReLU with a residual pair of convs, global max-pool, a linear
head scaled down by a constant. It reaches CIFAR-10 accuracies the seed networks cannot.
"""
from torch import nn
from torch.nn import functional as F

from . import register
from .seeds import Residual


def conv_bn(cin, cout):
    return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


class Scale(nn.Module):
    """Multiply logits by a constant: keeps the early softmax soft without a temperature schedule."""

    def __init__(self, factor):
        super().__init__()
        self.factor = factor

    def forward(self, x):
        return x * self.factor


class SpaceToDepth(nn.Module):
    """(B, C, H, W) -> (B, 4C, H/2, W/2): each 2x2 block of pixels as 4 channels (PixelUnshuffle),
    an odd side of the (C, H, W) inputs it is built for given a zero row or column at the bottom or
    right first. The padding is fixed at build time (an export traces no branch on the input's
    shape), so the net takes the size it was built for, as cnnlab always gives it."""

    def __init__(self, in_shape):
        super().__init__()
        self.pad = (0, in_shape[2] % 2, 0, in_shape[1] % 2)

    def forward(self, x):
        if any(self.pad):
            x = F.pad(x, self.pad)
        return F.pixel_unshuffle(x, 2)


def _stage(cin, cout, residual):
    layers = [nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.MaxPool2d(2), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]
    pair = [Residual(nn.Sequential(conv_bn(cout, cout), conv_bn(cout, cout)))] if residual else []
    return nn.Sequential(*layers, *pair)


@register("modern: ResNet-9-style net with batch norm (airbench layout) for CIFAR-sized images")
def resnet_small(in_shape, num_classes, width=32):
    w = width
    return nn.Sequential(conv_bn(in_shape[0], w), _stage(w, 2 * w, True), _stage(2 * w, 4 * w, False),
                         _stage(4 * w, 8 * w, True), nn.AdaptiveMaxPool2d(1), nn.Flatten(),
                         nn.Linear(8 * w, num_classes, bias=False), Scale(0.125))


@register("modern: a small fast BN net for 28x28 digits (conv -> max-pool -> BN -> ReLU stages)")
def digits_fast(in_shape, num_classes, width=16):
    """Two conv -> max-pool -> BN -> ReLU stages (pooling first: the BN and ReLU then touch 4x
    fewer values) and one residual pair, 3.8 MFLOPs per image: a one-cycle LR reaches 99% on
    MNIST in one epoch."""
    return _digits(_stage(in_shape[0], width, False), width, num_classes)


@register("modern: digits_fast with a space-to-depth stem (mnist_fast's model: steps 21% shorter)")
def digits_s2d(in_shape, num_classes, width=16):
    """digits_fast with its first stage folded: PixelUnshuffle(2) stacks each 2x2 block of pixels
    as 4 channels, so the first conv (the same 3.8 MFLOPs an image) already runs at half size and
    no max-pool follows it. Pooling 16 channels at 28x28 was 28% of a bf16 training step on the
    CPU; without it a step at batch 192 takes 5.9 ms instead of 7.5. An odd side gets a zero row
    or column, so that every size folds. (`--init` cannot sum an RGB stem's weights to grayscale
    here, as it does for other nets: the stem's 12 input channels are 3 colours x 4 positions.)"""
    return _digits(nn.Sequential(SpaceToDepth(in_shape), conv_bn(4 * in_shape[0], width)), width, num_classes)


def _digits(first, w, num_classes):
    """The digits nets after their first stage (`w` channels at half size): a conv -> max-pool ->
    BN -> ReLU stage with a residual pair, global max-pool, a scaled linear head."""
    return nn.Sequential(first, _stage(w, 2 * w, True), nn.AdaptiveMaxPool2d(1),
                         nn.Flatten(), nn.Linear(2 * w, num_classes, bias=False), Scale(0.25))
