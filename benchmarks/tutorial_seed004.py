"""Seed 004's CIFAR-10 pipeline AS WRITTEN (../shared/seeds/004_*.txt), the baseline of cifar_speed.py.

The tutorial's code, in substance: ToTensor + Normalize(0.5, 0.5) per sample, SubsetRandomSampler
over images 0-19,999 (train), 20,000-24,999 (validation) and test images 0-4,999, DataLoaders with
num_workers=2 (batch 32 for training, 128 for validation, 4 for test), its SimpleCNN, Adam lr 1e-3,
5 epochs, a validation pass after each. Changes, none of which speeds it up:
- The data: this machine has no internet, so torchvision's CIFAR10 download is replaced by the
  same 60,000 images as JPEGs in class folders. They are decoded once, before the timer starts,
  into what CIFAR10 holds (one uint8 array; an item is Image.fromarray + the transform): decoding a
  JPEG per item instead (ImageFolder) would make the baseline slower than the tutorial is (191 vs
  60 us an item). A class folder is sorted by class, so the images are put in one fixed random
  order (seed 42): the tutorial's index ranges then hold every class, as in CIFAR-10's own order.
- `loss_size.data[0]` (PyTorch 0.3) is `loss_size.item()`; `Variable` is gone.
- The per-10%-of-an-epoch prints are kept; a test-accuracy pass at the end (the figure the article
  quotes, "about 60%"), timing and a JSON line are added. The timer starts after the decode, so
  CIFAR10's own loading (unpickling, about 1 s) is not in it either: the baseline is if anything
  faster than the tutorial.

    python benchmarks/tutorial_seed004.py /tmp/cifar10_jpg [EPOCHS]
"""
import json
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F
import torch.optim as optim
import torchvision
import torchvision.transforms as transforms
from PIL import Image
from torch.utils.data.sampler import SubsetRandomSampler

root = sys.argv[1] if len(sys.argv) > 1 else "/tmp/cifar10_jpg"
epochs = int(sys.argv[2]) if len(sys.argv) > 2 else 5


class CIFAR10Like(torch.utils.data.Dataset):
    """torchvision.datasets.CIFAR10's way of serving images, over a class folder of JPEGs decoded once
    (in CIFAR-10's place on a machine without internet; see the docstring)."""

    def __init__(self, folder, transform, order):
        in_folder = torchvision.datasets.ImageFolder(folder).samples
        samples = [in_folder[i] for i in order]
        self.data = np.stack([np.asarray(Image.open(path).convert("RGB")) for path, _ in samples])
        self.targets = [label for _, label in samples]
        self.transform = transform

    def __getitem__(self, index):
        return self.transform(Image.fromarray(self.data[index])), self.targets[index]

    def __len__(self):
        return len(self.data)


mixed = lambda n: np.random.RandomState(42).permutation(n)   # CIFAR-10's own order mixes the classes
train_data = CIFAR10Like(root + "/train", None, mixed(50000))
test_data = CIFAR10Like(root + "/test", None, mixed(10000))
start = time.perf_counter()

seed = 42
np.random.seed(seed)
torch.manual_seed(seed)

transform = transforms.Compose([transforms.ToTensor(), transforms.Normalize((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))])
train_set, test_set = train_data, test_data   # torchvision.datasets.CIFAR10(..., transform=transform)
train_set.transform = test_set.transform = transform

n_training_samples = 20000
train_sampler = SubsetRandomSampler(np.arange(n_training_samples, dtype=np.int64))
n_val_samples = 5000
val_sampler = SubsetRandomSampler(np.arange(n_training_samples, n_training_samples + n_val_samples, dtype=np.int64))
n_test_samples = 5000
test_sampler = SubsetRandomSampler(np.arange(n_test_samples, dtype=np.int64))


class SimpleCNN(torch.nn.Module):
    def __init__(self):
        super(SimpleCNN, self).__init__()
        self.conv1 = torch.nn.Conv2d(3, 18, kernel_size=3, stride=1, padding=1)
        self.pool = torch.nn.MaxPool2d(kernel_size=2, stride=2, padding=0)
        self.fc1 = torch.nn.Linear(18 * 16 * 16, 64)
        self.fc2 = torch.nn.Linear(64, 10)

    def forward(self, x):
        x = F.relu(self.conv1(x))
        x = self.pool(x)
        x = x.view(-1, 18 * 16 * 16)
        x = F.relu(self.fc1(x))
        x = self.fc2(x)
        return x


def get_train_loader(batch_size):
    return torch.utils.data.DataLoader(train_set, batch_size=batch_size, sampler=train_sampler, num_workers=2)


test_loader = torch.utils.data.DataLoader(test_set, batch_size=4, sampler=test_sampler, num_workers=2)
val_loader = torch.utils.data.DataLoader(train_set, batch_size=128, sampler=val_sampler, num_workers=2)


def createLossAndOptimizer(net, learning_rate=0.001):
    loss = torch.nn.CrossEntropyLoss()
    optimizer = optim.Adam(net.parameters(), lr=learning_rate)
    return loss, optimizer


def trainNet(net, batch_size, n_epochs, learning_rate):
    print("===== HYPERPARAMETERS =====")
    print("batch_size=", batch_size)
    print("epochs=", n_epochs)
    print("learning_rate=", learning_rate)
    print("=" * 30)
    train_loader = get_train_loader(batch_size)
    n_batches = len(train_loader)
    loss, optimizer = createLossAndOptimizer(net, learning_rate)
    training_start_time = time.time()
    for epoch in range(n_epochs):
        running_loss = 0.0
        print_every = n_batches // 10
        start_time = time.time()
        total_train_loss = 0
        for i, data in enumerate(train_loader, 0):
            inputs, labels = data
            optimizer.zero_grad()
            outputs = net(inputs)
            loss_size = loss(outputs, labels)
            loss_size.backward()
            optimizer.step()
            running_loss += loss_size.item()
            total_train_loss += loss_size.item()
            if (i + 1) % (print_every + 1) == 0:
                print("Epoch {}, {:d}% \t train_loss: {:.2f} took: {:.2f}s".format(
                    epoch + 1, int(100 * (i + 1) / n_batches), running_loss / print_every, time.time() - start_time))
                running_loss = 0.0
                start_time = time.time()
        total_val_loss = 0
        for inputs, labels in val_loader:
            val_outputs = net(inputs)
            val_loss_size = loss(val_outputs, labels)
            total_val_loss += val_loss_size.item()
        print("Validation loss = {:.2f}".format(total_val_loss / len(val_loader)), flush=True)
    print("Training finished, took {:.2f}s".format(time.time() - training_start_time))
    return time.time() - training_start_time


CNN = SimpleCNN()
train_seconds = trainNet(CNN, batch_size=32, n_epochs=epochs, learning_rate=0.001)
correct = 0
with torch.no_grad():
    for inputs, labels in test_loader:
        correct += (CNN(inputs).argmax(1) == labels).sum().item()
print(json.dumps({"wall_seconds": time.perf_counter() - start, "train_seconds": train_seconds,
                  "train_images_per_second": n_training_samples * epochs / train_seconds,
                  "test_acc": correct / n_test_samples}))
