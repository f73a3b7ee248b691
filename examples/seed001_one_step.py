"""Seed 001 as written: LeNet-5 (cnnlab's `lenet5`, the seed's Net) on ONE random 1x32x32 input
with a random target of 10 values and MSE loss; the gradients are zeroed, computed, and ONE SGD
step (lr 0.01) is taken. It prints what the seed prints: the loss, conv1's bias gradient before and
after backward, and the loss after the step (smaller: the step went downhill).

    python examples/seed001_one_step.py [--seed N]"""
import argparse

import torch
import torch.nn as nn

from cnnlab.models import create_model


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    torch.manual_seed(args.seed)
    net = create_model("lenet5", (1, 32, 32), 10)
    conv1 = net.features[0]
    input = torch.randn(1, 1, 32, 32)
    target = torch.randn(10).view(1, -1)          # the same shape as the output
    criterion = nn.MSELoss()
    optimizer = torch.optim.SGD(net.parameters(), lr=0.01)

    output = net(input)
    loss = criterion(output, target)
    print(f"loss: {loss.item():.4f}")
    optimizer.zero_grad()
    print(f"conv1.bias.grad before backward: {conv1.bias.grad}")
    loss.backward()
    print(f"conv1.bias.grad after backward: {conv1.bias.grad}")
    optimizer.step()
    print(f"loss after one SGD step: {criterion(net(input), target).item():.4f}")


if __name__ == "__main__":
    main()
