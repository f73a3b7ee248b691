"""Seed 002 (Deep Learning with PyTorch, ch. 8: airplane vs bird) with cnnlab: the book's
parameterised `NetWidth(n_chans1=32)`, registered with @cnnlab.register_model so the command line
sees it too, trained on CIFAR-2 with plain SGD lr 1e-2 and the book's explicit L2 penalty.

    python examples/seed002_cifar2.py            # CIFAR-2 (torchvision CIFAR-10, downloaded into data/)
    python examples/seed002_cifar2.py --quick    # 400 synthetic 3x32x32 two-class images, 1 epoch, offline

The same from the shell, width 16:
    cnnlab train --plugin examples/seed002_cifar2.py --model book_net_width --model-arg n_chans1=16 --data cifar2
"""
import os
import sys

import torch
import torch.nn as nn
import torch.nn.functional as F

import cnnlab


# ---- the book's network, verbatim (the version with a width argument) ----
@cnnlab.register_model("book_net_width")
class NetWidth(nn.Module):
    def __init__(self, n_chans1=32):
        super().__init__()

        self.n_chans1 = n_chans1
        self.conv1 = nn.Conv2d(3, n_chans1, kernel_size=3, padding=1)
        self.conv2 = nn.Conv2d(n_chans1, n_chans1 // 2, kernel_size=3, padding=1)
        self.fc1 = nn.Linear(8 * 8 * n_chans1 // 2, 32)
        self.fc2 = nn.Linear(32, 2)

    def forward(self, x):
        out = F.max_pool2d(torch.tanh(self.conv1(x)), 2)
        out = F.max_pool2d(torch.tanh(self.conv2(out)), 2)
        out = out.view(-1, 8 * 8 * self.n_chans1 // 2)
        out = torch.tanh(self.fc1(out))
        out = self.fc2(out)
        return out
# ---- end of the book's network ----


def main(quick):
    data = "synthetic:3x32x32:2:400" if quick else "cifar2"
    out = os.path.join("runs", "examples", "seed002")
    result = cnnlab.train(model="book_net_width", model_args={"n_chans1": 32}, data=data, optimizer="sgd",
                          momentum=0.0, lr=1e-2, l2=0.001, batch_size=64, augment="none",
                          epochs=1 if quick else 100, out=out, overwrite=True)
    print(result)


if __name__ == "__main__":
    main(quick="--quick" in sys.argv[1:] or os.environ.get("CNNLAB_QUICK") == "1")
