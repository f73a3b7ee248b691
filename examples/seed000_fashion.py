"""Seed 000 (deeplizard's "CNN Training With Code Example" and "CNN Confusion Matrix") with cnnlab:
the course's `Network` class trained on Fashion-MNIST with Adam lr 0.01, batch 100; cnnlab writes
the confusion matrix the second lesson builds by hand into the run's report.html.

    python examples/seed000_fashion.py            # Fashion-MNIST (torchvision, downloaded into data/)
    python examples/seed000_fashion.py --quick    # 600 embedded MNIST digits, 1 epoch, offline
"""
import os
import sys

import torch.nn as nn
import torch.nn.functional as F

import cnnlab


# ---- the course's network (deeplizard, "CNN Layers" episode; seed 000 uses it as `Network()`) ----
class Network(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels=1, out_channels=6, kernel_size=5)
        self.conv2 = nn.Conv2d(in_channels=6, out_channels=12, kernel_size=5)

        self.fc1 = nn.Linear(in_features=12 * 4 * 4, out_features=120)
        self.fc2 = nn.Linear(in_features=120, out_features=60)
        self.out = nn.Linear(in_features=60, out_features=10)

    def forward(self, t):
        t = F.max_pool2d(F.relu(self.conv1(t)), kernel_size=2, stride=2)
        t = F.max_pool2d(F.relu(self.conv2(t)), kernel_size=2, stride=2)
        t = t.reshape(-1, 12 * 4 * 4)
        t = F.relu(self.fc1(t))
        t = F.relu(self.fc2(t))
        return self.out(t)
# ---- end of the course's network ----


def main(quick):
    data = dict(data="mnist-5k", train_samples=600, test_samples=200) if quick else dict(data="fashion-mnist")
    out = os.path.join("runs", "examples", "seed000")
    result = cnnlab.train(model=Network(), **data, optimizer="adam", lr=0.01, batch_size=100, augment="none",
                          epochs=1 if quick else 5, out=out, overwrite=True)
    print(result)
    print(f"confusion matrix, per-class scores and mistakes: {os.path.join(out, 'report.html')}")


if __name__ == "__main__":
    main(quick="--quick" in sys.argv[1:] or os.environ.get("CNNLAB_QUICK") == "1")
