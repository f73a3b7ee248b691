"""The tutorials' networks, faithful to the seeds (../shared/seeds) except for the bugs noted.

Each builder takes the data's input shape and class count; where a seed hard-codes a flatten size
(e.g. 16 * 5 * 5) we compute it with a dry run so the same network fits MNIST or CIFAR.

One change of order that changes no output: the seeds write pool(act(conv(x))); we compute
act(pool(conv(x))). ReLU and tanh are monotone, so max-pooling commutes with them exactly, and the
activation then runs on 4x fewer values (relu was 11% of seed 003's step time on the CPU).
"""
import torch
from torch import nn

from . import register


def flat_size(features, in_shape):
    """Feature count after `features` for one (C, H, W) input: the seeds' magic numbers, computed."""
    with torch.no_grad():
        return features(torch.zeros(1, *in_shape)).numel()


class Classifier(nn.Module):
    """features -> flatten -> head, the shape every seed network shares."""

    def __init__(self, features, head):
        super().__init__()
        self.features, self.head = features, head

    def forward(self, x):
        return self.head(torch.flatten(self.features(x), 1))


class Residual(nn.Module):
    """x + body(x): a skip connection around any block whose output has the input's shape (seed
    002's NetRes and the ResNet-9 pairs of models/resnet.py share it). The block is kept as
    `body`, the name in the state_dict keys of every checkpoint written so far."""

    def __init__(self, body):
        super().__init__()
        self.body = body

    def forward(self, x):
        return x + self.body(x)


def _lenet_style(in_shape, num_classes, conv2, fc2):
    """conv 6@5 -> pool -> relu, conv `conv2`@5 -> pool -> relu, fc 120, fc `fc2`, out: the shape
    seeds 000 and 001 share (they differ only in conv2 and fc2)."""
    features = nn.Sequential(nn.Conv2d(in_shape[0], 6, 5), nn.MaxPool2d(2), nn.ReLU(),
                             nn.Conv2d(6, conv2, 5), nn.MaxPool2d(2), nn.ReLU())
    head = nn.Sequential(nn.Linear(flat_size(features, in_shape), 120), nn.ReLU(),
                         nn.Linear(120, fc2), nn.ReLU(), nn.Linear(fc2, num_classes))
    return Classifier(features, head)


@register("seed 000: deeplizard's Network (Fashion-MNIST, Adam lr 0.01, batch 100)")
def deeplizard_network(in_shape, num_classes):
    return _lenet_style(in_shape, num_classes, conv2=12, fc2=60)


@register("seed 001: LeNet-5 Net (1x32x32 in the seed; conv 6@5, conv 16@5, fc 120-84)")
def lenet5(in_shape, num_classes):
    return _lenet_style(in_shape, num_classes, conv2=16, fc2=84)


@register("seed 003: the MNIST Model (conv 32@3, conv 64@3, fc 64); the default")
def mnist_cnn(in_shape, num_classes, width=32, hidden=64):
    features = nn.Sequential(nn.Conv2d(in_shape[0], width, 3), nn.MaxPool2d(2), nn.ReLU(),
                             nn.Conv2d(width, 2 * width, 3), nn.MaxPool2d(2), nn.ReLU())
    head = nn.Sequential(nn.Linear(flat_size(features, in_shape), hidden), nn.ReLU(),
                         nn.Linear(hidden, num_classes))
    return Classifier(features, head)


@register("seed 004: SimpleCNN (CIFAR-10; conv 18@3 pad 1, pool, fc 64)")
def simple_cnn(in_shape, num_classes, width=18, hidden=64):
    features = nn.Sequential(nn.Conv2d(in_shape[0], width, 3, padding=1), nn.MaxPool2d(2), nn.ReLU())
    head = nn.Sequential(nn.Linear(flat_size(features, in_shape), hidden), nn.ReLU(),
                         nn.Linear(hidden, num_classes))
    return Classifier(features, head)


# ---- seed 002: "Deep Learning with PyTorch" chapter 8, CIFAR-2 (airplane vs bird) ----

def _book_net(in_shape, num_classes, n_chans1, act, dropout=0.0, batchnorm=False, depth=2, skip=False):
    """The book's family: conv(c1)-act-pool, conv(c1/2)-act-pool[, conv(c1/2)-act(+skip)-pool],
    fc 32, out. The variants differ only in the switches, so one builder serves them all."""
    c1, c2 = n_chans1, n_chans1 // 2

    def stage(cin, cout):  # conv [-> BN] -> pool -> act [-> dropout]; pool/act swapped, see top
        layers = [nn.Conv2d(cin, cout, 3, padding=1)]
        layers += [nn.BatchNorm2d(cout)] if batchnorm else []
        layers += [nn.MaxPool2d(2), act()]
        return layers + ([nn.Dropout2d(dropout)] if dropout else [])

    layers = stage(in_shape[0], c1) + stage(c1, c2)
    if depth == 3:
        third = nn.Sequential(nn.Conv2d(c2, c2, 3, padding=1), act())
        layers += [Residual(third) if skip else third, nn.MaxPool2d(2)]
    features = nn.Sequential(*layers)
    head = nn.Sequential(nn.Linear(flat_size(features, in_shape), 32), act(), nn.Linear(32, num_classes))
    return Classifier(features, head)


@register("seed 002: the book's Net (conv 16, conv 8, tanh, fc 32)")
def net(in_shape, num_classes):
    return _book_net(in_shape, num_classes, n_chans1=16, act=nn.Tanh)


@register("seed 002: NetWidth (n_chans1 wide first conv)")
def net_width(in_shape, num_classes, n_chans1=32):
    return _book_net(in_shape, num_classes, n_chans1, nn.Tanh)


@register("seed 002: NetDropout (Dropout2d p=0.4 after each conv)")
def net_dropout(in_shape, num_classes, n_chans1=32, p=0.4):
    return _book_net(in_shape, num_classes, n_chans1, nn.Tanh, dropout=p)


@register("seed 002: NetBN (batch norm after each conv; seed bugs fixed)")
def net_bn(in_shape, num_classes, n_chans1=32):
    """Fixed: the seed assigns `conv1_batchnorm` twice (so conv2's norm never exists) and calls
    `conv1` where it means `conv2`; here each conv has its own BatchNorm2d."""
    return _book_net(in_shape, num_classes, n_chans1, nn.Tanh, batchnorm=True)


@register("seed 002: NetDepth (a third conv, ReLU)")
def net_depth(in_shape, num_classes, n_chans1=32):
    return _book_net(in_shape, num_classes, n_chans1, nn.ReLU, depth=3)


@register("seed 002: NetRes (NetDepth plus one skip connection)")
def net_res(in_shape, num_classes, n_chans1=32):
    return _book_net(in_shape, num_classes, n_chans1, nn.ReLU, depth=3, skip=True)


class ResBlock(nn.Module):
    """Seed 002's block: conv (no bias) -> BN -> ReLU, plus the input. Kaiming-normal conv weights,
    BN weight 0.5 and bias 0, as the seed initialises them."""

    def __init__(self, n_chans, running_stats=True):
        super().__init__()
        self.conv = nn.Conv2d(n_chans, n_chans, 3, padding=1, bias=False)
        self.batch_norm = nn.BatchNorm2d(n_chans, track_running_stats=running_stats)
        nn.init.kaiming_normal_(self.conv.weight, nonlinearity="relu")
        nn.init.constant_(self.batch_norm.weight, 0.5)
        nn.init.zeros_(self.batch_norm.bias)

    def forward(self, x):
        return torch.relu(self.batch_norm(self.conv(x))) + x


@register("seed 002: NetResDeep (n_blocks ResBlocks; seed bugs fixed; share_weights=true: the book's own model)")
def net_res_deep(in_shape, num_classes, n_chans1=32, n_blocks=10, share_weights=False):
    """Fixed: the seed's forward calls `self.conv1`, which it never defined (it is `self.conv`).
    The book builds its blocks with `n_blocks * [ResBlock(...)]`, which repeats ONE module, so all
    blocks share one conv and one batch norm: its 100-block run (0.97 train / 0.86 val) is a
    3-layer network applied 100 times. That is rarely what a reader means, so each block is its own
    module by default; `share_weights=True` builds the book's model as written.
    A batch norm shared by 100 depths cannot keep one set of running statistics (its mean and
    variance would be those of whichever depths updated it last, and an eval-mode test then scored
    50%, chance, after 97% training accuracy), so the shared one always normalises with the batch's
    own statistics. That is also how the book measured its 0.86: its validate() never calls
    model.eval()."""
    if share_weights:
        blocks = [ResBlock(n_chans1, running_stats=False)] * n_blocks
    else:
        blocks = [ResBlock(n_chans1) for _ in range(n_blocks)]
    features = nn.Sequential(nn.Conv2d(in_shape[0], n_chans1, 3, padding=1), nn.MaxPool2d(2), nn.Tanh(),
                             *blocks, nn.MaxPool2d(2))
    head = nn.Sequential(nn.Linear(flat_size(features, in_shape), 32), nn.ReLU(), nn.Linear(32, num_classes))
    return Classifier(features, head)


@register("seed 002: the 13-layer VGG-style net from its closing advice (64-64, 128-128, 256x3, fc 512)")
def vgg13_style(in_shape, num_classes, width=64, dropout=0.0):
    """Seven 3x3 'same' convs in three pooled stages, fc 512, output: the design the seed describes.
    Its softmax output layer is left to the loss (CrossEntropyLoss expects logits)."""
    widths = [[width, width], [2 * width, 2 * width], [4 * width] * 3]
    layers, cin = [], in_shape[0]
    for stage in widths:
        for i, cout in enumerate(stage):
            conv = [nn.Conv2d(cin, cout, 3, padding=1)]
            layers += conv + ([nn.MaxPool2d(2)] if i == len(stage) - 1 else []) + [nn.ReLU(inplace=True)]
            cin = cout
    features = nn.Sequential(*layers)
    head = nn.Sequential(nn.Linear(flat_size(features, in_shape), 512), nn.ReLU(inplace=True),
                         nn.Dropout(dropout), nn.Linear(512, num_classes))
    return Classifier(features, head)
