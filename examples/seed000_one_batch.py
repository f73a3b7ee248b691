"""Seed 000 (deeplizard) as written: ONE Adam step on ONE batch of 100 images, printing what the
seed prints: the loss and the number of correct predictions before and after the step, and the
gradient's shape. The network is cnnlab's `deeplizard_network` (the seed's Network class), the
images the first 100 of the training set, as `DataLoader(train_set, batch_size=100)` gives them,
converted with ToTensor only (`normalize="none"`).

    python examples/seed000_one_batch.py [--data fashion-mnist --data-dir DIR]

Fashion-MNIST is not on machines without internet: the embedded MNIST sample (mnist-5k) stands in,
and says so. The seed's figures (Fashion-MNIST, its random initialisation): loss 2.3075 -> 2.2627,
9 -> 15 correct of 100."""
import argparse
import sys

import torch
import torch.nn.functional as F

from cnnlab.config import DataConfig
from cnnlab.data import load_data
from cnnlab.errors import CnnlabError, UsageError
from cnnlab.models import create_model


def first_batch(data_name, data_dir, size=100):
    """The first `size` training images (in the data's own order), as ToTensor gives them, and labels."""
    cfg = DataConfig(data=data_name, data_dir=data_dir, normalize="none", val_fraction=0.0,
                     split_ranges=f"train=0:{size},val=0:0,test=0:0")
    data = load_data(cfg)
    images, labels = data.train
    return data.preprocess.normalise(images), labels


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default="fashion-mnist")
    ap.add_argument("--data-dir", default="data")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    try:
        images, labels = first_batch(args.data, args.data_dir)
    except (UsageError, CnnlabError) as e:
        print(f"note: {args.data} is not here ({str(e).splitlines()[0]}); using the embedded mnist-5k instead",
              file=sys.stderr)
        # mnist-5k is sorted by label: its first 100 images would all be zeros, so take every 50th
        images, labels = first_batch("mnist-5k", args.data_dir, size=5000)
        images, labels = images[::50], labels[::50]
    torch.manual_seed(args.seed)
    network = create_model("deeplizard_network", tuple(images.shape[1:]), 10)
    conv1 = network.features[0]
    optimizer = torch.optim.Adam(network.parameters(), lr=0.01)

    preds = network(images)
    loss = F.cross_entropy(preds, labels)
    print(f"loss before the step: {loss.item():.4f}   correct: {(preds.argmax(1) == labels).sum().item()} of {len(labels)}")
    print(f"conv1 weight grad before backward: {conv1.weight.grad}")
    loss.backward()
    print(f"conv1 weight grad shape after backward: {tuple(conv1.weight.grad.shape)}")
    optimizer.step()

    preds = network(images)
    loss = F.cross_entropy(preds, labels)
    print(f"loss after the step:  {loss.item():.4f}   correct: {(preds.argmax(1) == labels).sum().item()} of {len(labels)}")


if __name__ == "__main__":
    main()
