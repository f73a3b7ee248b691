"""Seed 003's MNIST pipeline AS WRITTEN (../shared/seeds/003_*.txt), the baseline of speed.py.

The code below is the tutorial's, verbatim in substance: torchvision MNIST with a per-sample
ToTensor, DataLoader batch 32, its 2-conv Model, SGD lr 1e-2, 5 epochs, test after each epoch.
Only timing and a JSON line at the end were added. Do not speed it up or slow it down.

    python benchmarks/tutorial_seed003.py ../shared/datasets [EPOCHS]
"""
import json
import sys
import time

import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision

root = sys.argv[1] if len(sys.argv) > 1 else "../shared/datasets"
epochs = int(sys.argv[2]) if len(sys.argv) > 2 else 5
start = time.perf_counter()

device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
train_ds = torchvision.datasets.MNIST(root, train=True, transform=torchvision.transforms.ToTensor(), download=False)
test_ds = torchvision.datasets.MNIST(root, train=False, transform=torchvision.transforms.ToTensor(), download=False)
batch_size = 32
train_dl = torch.utils.data.DataLoader(train_ds, batch_size=batch_size, shuffle=True)
test_dl = torch.utils.data.DataLoader(test_ds, batch_size=batch_size)

num_classes = 10


class Model(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 32, kernel_size=3)
        self.pool1 = nn.MaxPool2d(2)
        self.conv2 = nn.Conv2d(32, 64, kernel_size=3)
        self.pool2 = nn.MaxPool2d(2)
        self.fc1 = nn.Linear(1600, 64)
        self.fc2 = nn.Linear(64, num_classes)

    def forward(self, x):
        x = self.pool1(F.relu(self.conv1(x)))
        x = self.pool2(F.relu(self.conv2(x)))
        x = torch.flatten(x, start_dim=1)
        x = F.relu(self.fc1(x))
        x = self.fc2(x)
        return x


model = Model().to(device)
loss_fn = nn.CrossEntropyLoss()
learn_rate = 1e-2
opt = torch.optim.SGD(model.parameters(), lr=learn_rate)


def train(dataloader, model, loss_fn, optimizer):
    size = len(dataloader.dataset)
    num_batches = len(dataloader)
    train_loss, train_acc = 0, 0
    for X, y in dataloader:
        X, y = X.to(device), y.to(device)
        pred = model(X)
        loss = loss_fn(pred, y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        train_acc += (pred.argmax(1) == y).type(torch.float).sum().item()
        train_loss += loss.item()
    train_acc /= size
    train_loss /= num_batches
    return train_acc, train_loss


def test(dataloader, model, loss_fn):
    size = len(dataloader.dataset)
    num_batches = len(dataloader)
    test_loss, test_acc = 0, 0
    with torch.no_grad():
        for imgs, target in dataloader:
            imgs, target = imgs.to(device), target.to(device)
            target_pred = model(imgs)
            loss = loss_fn(target_pred, target)
            test_loss += loss.item()
            test_acc += (target_pred.argmax(1) == target).type(torch.float).sum().item()
    test_acc /= size
    test_loss /= num_batches
    return test_acc, test_loss


train_seconds = 0.0
for epoch in range(epochs):
    t0 = time.perf_counter()
    model.train()
    epoch_train_acc, epoch_train_loss = train(train_dl, model, loss_fn, opt)
    train_seconds += time.perf_counter() - t0
    model.eval()
    epoch_test_acc, epoch_test_loss = test(test_dl, model, loss_fn)
    template = ('Epoch:{:2d}, Train_acc:{:.1f}%, Train_loss:{:.3f}, Test_acc:{:.1f}%,Test_loss:{:.3f}')
    print(template.format(epoch + 1, epoch_train_acc * 100, epoch_train_loss, epoch_test_acc * 100, epoch_test_loss), flush=True)
print('Done')
print(json.dumps({"wall_seconds": time.perf_counter() - start, "train_seconds": train_seconds,
                  "train_images_per_second": len(train_ds) * epochs / train_seconds, "test_acc": epoch_test_acc}))
