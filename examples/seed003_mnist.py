"""Seed 003 (the MNIST CNN tutorial) with cnnlab: the tutorial's own `Model` class, trained on MNIST
handed over as a torchvision Dataset (or, with --quick, numpy arrays of the embedded 5,000-digit
sample), then resumed, reloaded, used to predict and exported to ONNX.

    python examples/seed003_mnist.py            # torchvision MNIST (downloaded into data/), 5 epochs
    python examples/seed003_mnist.py --quick    # 600 embedded digits, 1 epoch: seconds, offline

Afterwards, from any process: `cnnlab predict RUN digit.png --plugin examples/seed003_mnist.py`
(the run's checkpoint names this file; cnnlab imports it only because --plugin says so).
"""
import os
import sys

import torch
import torch.nn as nn
import torch.nn.functional as F

import cnnlab

# ---- the tutorial's network, verbatim ----
num_classes = 10  # 图片的类别数


class Model(nn.Module):
    def __init__(self):
        super().__init__()
        # 特征提取网络
        self.conv1 = nn.Conv2d(1, 32, kernel_size=3)  # 第一层卷积,卷积核大小为3*3
        self.pool1 = nn.MaxPool2d(2)  # 设置池化层,池化核大小为2*2
        self.conv2 = nn.Conv2d(32, 64, kernel_size=3)  # 第二层卷积,卷积核大小为3*3
        self.pool2 = nn.MaxPool2d(2)
        # 分类网络
        self.fc1 = nn.Linear(1600, 64)
        self.fc2 = nn.Linear(64, num_classes)

    # 前向传播
    def forward(self, x):
        x = self.pool1(F.relu(self.conv1(x)))
        x = self.pool2(F.relu(self.conv2(x)))
        x = torch.flatten(x, start_dim=1)
        x = F.relu(self.fc1(x))
        x = self.fc2(x)
        return x
# ---- end of the tutorial's network ----


def mnist(quick):
    """The tutorial's data: torchvision's MNIST Datasets (ToTensor, as the tutorial loads them), or
    600 + 200 digits of the embedded sample as numpy arrays."""
    if not quick:
        import torchvision

        to_tensor = torchvision.transforms.ToTensor()
        train = torchvision.datasets.MNIST("data", train=True, download=True, transform=to_tensor)
        test = torchvision.datasets.MNIST("data", train=False, download=True, transform=to_tensor)
        return train, test
    from cnnlab.config import DataConfig
    from cnnlab.data.registry import open_source

    digits = open_source(DataConfig(data="mnist-5k"))
    pick = torch.randperm(5000, generator=torch.Generator().manual_seed(0))   # the sample is in no useful order
    x, y = digits.train_x[pick].numpy(), digits.train_y[pick].numpy()     # uint8 (5000, 1, 28, 28), labels 0..9
    return x[:600], y[:600], x[4000:4200], y[4000:4200]


def main(quick):
    data = mnist(quick)
    out = os.path.join("runs", "examples", "seed003")
    settings = dict(optimizer="sgd", momentum=0.0, lr=1e-2, batch_size=32, augment="none", out=out, overwrite=True)
    # the tutorial: SGD lr 1e-2, batch 32; the first epochs now, more on resume
    result = cnnlab.train(model=Model(), data=data, epochs=1, **settings)
    print(result)
    result = cnnlab.train(resume=out, model=Model, data=data, epochs=2 if quick else 5)   # continues exactly
    print(f"test accuracy after resuming: {result.summary['test_acc']:.2%}")

    model = cnnlab.load(out)   # best.pt, with the preprocessing training used
    image = data[2][0][0] if quick else data[1][0][0]   # one test digit
    print("prediction for one test digit:", model.predict([image if quick else (image * 255).byte()], top_k=2)[0])
    onnx_file = cnnlab.export(out, "onnx")   # runs without this file, cnnlab or torch
    print(f"ONNX: {onnx_file}; reload the run elsewhere with --plugin {__file__}")


if __name__ == "__main__":
    main(quick="--quick" in sys.argv[1:] or os.environ.get("CNNLAB_QUICK") == "1")
