"""Seed 002's figures were measured the book's way: its validate() never calls model.eval(), so
dropout stays on and batch norm normalises each batch of 64 with that batch's own statistics.
cnnlab tests in eval mode. This trains a seed-002 recipe on the full CIFAR-2 and scores its last
epoch both ways, on the same 2,000 test images in a mixed-class order (CIFAR-10's own test order
is mixed; a class folder's is not, and a one-class batch would skew the batch statistics).

    python benchmarks/eval_modes.py [--jobs N] RECIPE ...   (e.g. seed002_cifar2_net_bn)
"""
import argparse
import concurrent.futures
import multiprocessing
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from tune import cifar_folder  # noqa: E402  (the CIFAR-10 JPEG folder, extracted once)

JPG = "/tmp/cifar10_jpg"   # where cifar_folder() extracts it


def both_ways(name, epochs=0):
    import torch

    import cnnlab
    from cnnlab.config import load_yaml, make_config
    from cnnlab.data import load_data
    from cnnlab.training import checkpoint

    out = os.path.join(ROOT, "runs", f"modes-{name}")
    settings = {**load_yaml(os.path.join(ROOT, "cnnlab", "recipes", f"{name}.yaml")), "data": f"folder:{JPG}",
                "classes": ["airplane", "bird"], "out": out, "overwrite": True, "report": False}
    if epochs:
        settings["epochs"] = epochs
    cfg = make_config(settings)
    summary = cnnlab.train(cfg, quiet=True).summary
    data = load_data(cfg.data_config())
    x, y = data.test
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))
    x, y = x[order], y[order]
    net = checkpoint.build_model(torch.load(os.path.join(out, "last.pt"), weights_only=True), "")

    def accuracy(train_mode):
        net.train(train_mode)
        with torch.no_grad():
            right = sum((net(data.preprocess.normalise(x[i:i + 64])).argmax(1) == y[i:i + 64]).sum().item()
                        for i in range(0, len(y), 64))
        return right / len(y)

    return (f"| `{name}` | {summary['epochs']} | {summary['final_test_acc']:.2%} | {accuracy(False):.2%} | "
            f"{accuracy(True):.2%} |")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("recipes", nargs="+")
    ap.add_argument("--jobs", type=int, default=1, help="recipes trained at once, each in its own process")
    ap.add_argument("--epochs", type=int, default=0, help="instead of the recipe's")
    args = ap.parse_args()
    cifar_folder()
    print("| recipe | epochs | cnnlab final_test_acc | eval mode, mixed batches of 64 | train mode (the book's "
          "validate), same batches |\n|---|---|---|---|---|", flush=True)
    spawn = multiprocessing.get_context("spawn")   # each process its own CUDA context
    with concurrent.futures.ProcessPoolExecutor(args.jobs, mp_context=spawn) as pool:
        for row in pool.map(both_ways, args.recipes, [args.epochs] * len(args.recipes)):
            print(row, flush=True)


if __name__ == "__main__":
    main()
