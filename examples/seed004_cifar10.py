"""Seed 004 (CIFAR-10 with a SimpleCNN) with cnnlab: the tutorial's `SimpleCNN`, verbatim apart
from the line breaks its web page lost, on 20,000 / 5,000 / 5,000 CIFAR-10 images with Adam lr
1e-3, batch 32, printing the loss ten times an epoch as the tutorial does. The tutorial normalises
with mean = std = 0.5; cnnlab uses the training split's own statistics.

    python examples/seed004_cifar10.py            # CIFAR-10 (torchvision, downloaded into data/)
    python examples/seed004_cifar10.py --quick    # 500 synthetic 3x32x32 images of 10 classes, offline
"""
import os
import sys

import torch
import torch.nn.functional as F

import cnnlab


# ---- the tutorial's network ----
class SimpleCNN(torch.nn.Module):

    # Our batch shape for input x is (3, 32, 32)

    def __init__(self):
        super(SimpleCNN, self).__init__()

        # Input channels = 3, output channels = 18
        self.conv1 = torch.nn.Conv2d(3, 18, kernel_size=3, stride=1, padding=1)
        self.pool = torch.nn.MaxPool2d(kernel_size=2, stride=2, padding=0)

        # 4608 input features, 64 output features (see sizing flow below)
        self.fc1 = torch.nn.Linear(18 * 16 * 16, 64)

        # 64 input features, 10 output features for our 10 defined classes
        self.fc2 = torch.nn.Linear(64, 10)

    def forward(self, x):

        # Computes the activation of the first convolution
        # Size changes from (3, 32, 32) to (18, 32, 32)
        x = F.relu(self.conv1(x))

        # Size changes from (18, 32, 32) to (18, 16, 16)
        x = self.pool(x)

        # Reshape data to input to the input layer of the neural net
        # Size changes from (18, 16, 16) to (1, 4608)
        # Recall that the -1 infers this dimension from the other given dimension
        x = x.view(-1, 18 * 16 * 16)

        # Computes the activation of the first fully connected layer
        # Size changes from (1, 4608) to (1, 64)
        x = F.relu(self.fc1(x))

        # Computes the second fully connected layer (activation applied later)
        # Size changes from (1, 64) to (1, 10)
        x = self.fc2(x)
        return (x)
# ---- end of the tutorial's network ----


def main(quick):
    data = (dict(data="synthetic:3x32x32:10:500") if quick else
            dict(data="cifar10", train_samples=20000, val_samples=5000, test_samples=5000))
    out = os.path.join("runs", "examples", "seed004")
    result = cnnlab.train(model=SimpleCNN(), **data, optimizer="adam", lr=1e-3, batch_size=32, augment="none",
                          epochs=1 if quick else 5, log_every=0.1, out=out, overwrite=True)
    print(result)


if __name__ == "__main__":
    main(quick="--quick" in sys.argv[1:] or os.environ.get("CNNLAB_QUICK") == "1")
