"""Seed 002's book runs after its first were trained on a fixed batch order: the notebook
(dlwpt-code p1ch8/1_convolution.ipynb) redefines `train_loader` with `shuffle=False` for its
validate() cell, then passes that same loader to every later training_loop (width, l2, dropout,
batch norm, depth, res, res deep). This script is the book's own code in plain PyTorch (no cnnlab)
on CIFAR-2 from the CIFAR-10 JPEG folder, trained both ways, to see what the fixed order does:

    python benchmarks/book_order.py [--model bn|net] [--epochs 100] [--seed 123]

Each epoch the shuffled run draws a new permutation (DataLoader(shuffle=True)); the fixed run
reuses one permutation drawn once (CIFAR-10's own training order interleaves the classes; this
folder is sorted by class, so a seeded permutation stands in for it). Accuracy is printed the
book's way (validate() without model.eval(): batch norm uses each test batch's statistics, in
batches of 64 in a mixed order) and in eval mode.
"""
import argparse
import os
import sys
import time

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from tune import cifar_folder  # noqa: E402  (the CIFAR-10 JPEG folder, extracted once)

MEAN, STD = (0.4915, 0.4823, 0.4468), (0.2470, 0.2435, 0.2616)   # the book's Normalize


class Net(nn.Module):   # the book's baseline, as written
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 16, kernel_size=3, padding=1)
        self.conv2 = nn.Conv2d(16, 8, kernel_size=3, padding=1)
        self.fc1 = nn.Linear(8 * 8 * 8, 32)
        self.fc2 = nn.Linear(32, 2)

    def forward(self, x):
        out = F.max_pool2d(torch.tanh(self.conv1(x)), 2)
        out = F.max_pool2d(torch.tanh(self.conv2(out)), 2)
        out = out.view(-1, 8 * 8 * 8)
        out = torch.tanh(self.fc1(out))
        return self.fc2(out)


class NetBatchNorm(nn.Module):   # the book's, as written
    def __init__(self, n_chans1=32):
        super().__init__()
        self.n_chans1 = n_chans1
        self.conv1 = nn.Conv2d(3, n_chans1, kernel_size=3, padding=1)
        self.conv1_batchnorm = nn.BatchNorm2d(num_features=n_chans1)
        self.conv2 = nn.Conv2d(n_chans1, n_chans1 // 2, kernel_size=3, padding=1)
        self.conv2_batchnorm = nn.BatchNorm2d(num_features=n_chans1 // 2)
        self.fc1 = nn.Linear(8 * 8 * n_chans1 // 2, 32)
        self.fc2 = nn.Linear(32, 2)

    def forward(self, x):
        out = self.conv1_batchnorm(self.conv1(x))
        out = F.max_pool2d(torch.tanh(out), 2)
        out = self.conv2_batchnorm(self.conv2(out))
        out = F.max_pool2d(torch.tanh(out), 2)
        out = out.view(-1, 8 * 8 * self.n_chans1 // 2)
        out = torch.tanh(self.fc1(out))
        return self.fc2(out)


def cifar2(root, split):
    """(images normalised as the book does, labels) of airplane (0) and bird (1), in a mixed order."""
    xs, ys = [], []
    for label, name in enumerate(["airplane", "bird"]):
        folder = os.path.join(root, split, name)
        for file in sorted(os.listdir(folder)):
            xs.append(np.asarray(Image.open(os.path.join(folder, file)).convert("RGB")))
            ys.append(label)
    x = torch.from_numpy(np.stack(xs)).permute(0, 3, 1, 2).contiguous().float() / 255
    x = (x - torch.tensor(MEAN).view(1, 3, 1, 1)) / torch.tensor(STD).view(1, 3, 1, 1)
    mixed = torch.randperm(len(ys), generator=torch.Generator().manual_seed(0))
    return x[mixed], torch.tensor(ys)[mixed]


def accuracy(model, x, y, train_mode):
    model.train(train_mode)
    with torch.no_grad():
        right = sum((model(x[i:i + 64]).argmax(1) == y[i:i + 64]).sum().item() for i in range(0, len(y), 64))
    return right / len(y)


def run(model_name, shuffle, x, y, xt, yt, epochs, seed):
    torch.manual_seed(seed)
    model = NetBatchNorm(32) if model_name == "bn" else Net()
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-2)
    fixed = torch.randperm(len(y))
    start = time.perf_counter()
    for epoch in range(1, epochs + 1):
        model.train()
        order = torch.randperm(len(y)) if shuffle else fixed
        total = 0.0
        for rows in order.split(64):
            loss = F.cross_entropy(model(x[rows]), y[rows])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            total += loss.item()
        if epoch == 1 or epoch % 10 == 0:
            print(f"  {'shuffled' if shuffle else 'fixed'} epoch {epoch}: training loss {total / len(order.split(64)):.4f}",
                  file=sys.stderr, flush=True)
    return (f"| {model_name} | {'new order each epoch' if shuffle else 'one fixed order (the book)'} | "
            f"{total / len(order.split(64)):.4f} | {accuracy(model, x, y, True):.2%} | "
            f"{accuracy(model, xt, yt, True):.2%} | {accuracy(model, xt, yt, False):.2%} | "
            f"{time.perf_counter() - start:.0f} s |")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", choices=["bn", "net"], default="bn")
    ap.add_argument("--epochs", type=int, default=100)
    ap.add_argument("--seed", type=int, default=123, help="the notebook's torch.manual_seed")
    ap.add_argument("--only", choices=["fixed", "shuffled"], help="one of the two runs")
    args = ap.parse_args()
    root = cifar_folder()
    x, y = cifar2(root, "train")
    xt, yt = cifar2(root, "test")
    print("| model | batch order | last training loss | train acc (book's way) | test acc (book's way) | "
          "test acc (eval mode) | time |\n|---|---|---|---|---|---|---|", flush=True)
    for shuffle in (False, True):
        if args.only and args.only != ("shuffled" if shuffle else "fixed"):
            continue
        print(run(args.model, shuffle, x, y, xt, yt, args.epochs, args.seed), flush=True)


if __name__ == "__main__":
    main()
