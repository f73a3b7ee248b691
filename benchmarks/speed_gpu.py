"""The GPU path measured (issue 21, target 4), one part after the other on the same GPU:

    python benchmarks/speed_gpu.py --data-dir ../shared/datasets --cifar /tmp/cifar10_jpg \
        [--airbench PATH/airbench94.py] [--seeds 0 1 2] [--profile OUTDIR]

mnist     cnnlab's mnist_fast recipe per seed: training seconds (summary.json's train_seconds, the span
          tuomaso's one-epoch record counts), the whole command, test accuracy; then one 3-epoch run, whose
          per-epoch seconds separate the first epoch's CUDA warm-up from the steady state.
airbench  airbench94's own script (KellerJordan/cifar10-airbench legacy/airbench94.py, passed with
          --airbench, not vendored here) on the SAME images: the JPEG folder is converted once into the
          train.pt/test.pt it reads; its warm-up run, then --airbench-runs timed runs.
cifar     cnnlab's cifar10_fast on the same folder: training seconds, per-epoch validation accuracy,
          test accuracy.
--profile torch.profiler's operator tables and cProfile's top functions for one mnist_fast epoch,
          written into OUTDIR (where a step's time goes).
Results are recorded in benchmarks/README.md with the GPU's name."""
import argparse
import csv
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)


def cnnlab_train(args, name, *flags):
    """`cnnlab train` in a fresh process on the GPU; (whole-command seconds, summary, metrics rows)."""
    out = os.path.join(ROOT, "runs", f"gpu-{name}")
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "cnnlab", "train", *flags, "--device", "cuda", "--out", out,
                    "--overwrite", "--report", "false"], cwd=ROOT, check=True, capture_output=True, text=True)
    whole = time.perf_counter() - start
    with open(os.path.join(out, "summary.json")) as f:
        summary = json.load(f)
    with open(os.path.join(out, "metrics.csv")) as f:
        rows = list(csv.DictReader(f))
    return whole, summary, rows


def mnist(args):
    print("## MNIST: mnist_fast on the GPU")
    runs = []
    for seed in args.seeds:
        whole, s, _ = cnnlab_train(args, f"mnist-{seed}", "--config", "mnist_fast", "--data-dir", args.data_dir,
                                   "--seed", str(seed))
        runs.append((s["train_seconds"], whole, s["test_acc"]))
        print(f"seed {seed}: training {s['train_seconds']:.2f} s, whole command {whole:.1f} s, "
              f"test {s['test_acc']:.2%}", flush=True)
    print(f"median training {statistics.median(r[0] for r in runs):.2f} s, min accuracy "
          f"{min(r[2] for r in runs):.2%} (target: >= 99.0% in <= 0.5 s of training)")
    _, s, rows = cnnlab_train(args, "mnist-3ep", "--config", "mnist_fast", "--data-dir", args.data_dir, "--epochs", "3")
    print("3 epochs: seconds per epoch " + ", ".join(r["seconds"] for r in rows) + f"; test {s['test_acc']:.2%}",
          flush=True)


def decode(path):
    from PIL import Image

    return np.asarray(Image.open(path).convert("RGB"))


def airbench_data(folder, dest):
    """The JPEG folder as airbench's cifar10/{train,test}.pt: uint8 NHWC images, labels, class names."""
    import torch

    classes = sorted(os.listdir(os.path.join(folder, "train")))
    os.makedirs(dest, exist_ok=True)
    with ProcessPoolExecutor() as pool:
        for split in ("train", "test"):
            files = [(os.path.join(folder, split, c, f), k) for k, c in enumerate(classes)
                     for f in sorted(os.listdir(os.path.join(folder, split, c)))]
            images = np.stack(list(pool.map(decode, [f for f, _ in files], chunksize=500)))
            labels = torch.tensor([k for _, k in files])
            torch.save({"images": torch.from_numpy(images), "labels": labels, "classes": classes},
                       os.path.join(dest, f"{split}.pt"))


def airbench(args):
    print(f"## airbench94 ({os.path.basename(args.airbench)}) on the same JPEG-decoded CIFAR-10")
    with tempfile.TemporaryDirectory() as work:
        airbench_data(args.cifar, os.path.join(work, "cifar10"))
        code = open(args.airbench).read()
        code = code.replace("#main('warmup')", "main('warmup')").replace("range(25)", f"range({args.airbench_runs})")
        script = os.path.join(work, "airbench94.py")
        with open(script, "w") as f:
            f.write(code)
        out = subprocess.run([sys.executable, script], cwd=work, capture_output=True, text=True, check=True).stdout
    rows = [line.split("|") for line in out.splitlines() if line.startswith("|")]
    evals = [cells for cells in rows if len(cells) > 3 and cells[2].strip() == "eval"]   # a run's last row
    times = [float(cells[-2]) for cells in evals][1:]   # the first is the warm-up run, on random labels
    accs = [float(cells[-3]) for cells in evals][1:]
    print("\n".join(line for line in out.splitlines() if line.startswith(("|", "Mean"))))
    print(f"airbench94: median {statistics.median(times):.2f} s per run, mean TTA accuracy {statistics.mean(accs):.2%} "
          f"over {len(accs)} runs", flush=True)


def cifar(args):
    print("## cnnlab cifar10_fast on the same folder")
    whole, s, rows = cnnlab_train(args, "cifar10-fast", "--config", "cifar10_fast", "--data", f"folder:{args.cifar}")
    elapsed = 0.0
    for r in rows:
        elapsed += float(r["seconds"])
        print(f"epoch {r['epoch']}: val {float(r['val_acc']):.2%} at {elapsed:.1f} s")
    print(f"cifar10_fast: training {s['train_seconds']:.1f} s, whole command {whole:.1f} s, test {s['test_acc']:.2%}",
          flush=True)


def profile(args):
    """Where an mnist_fast epoch's time goes on the GPU: operators (torch.profiler) and Python functions."""
    os.makedirs(args.profile, exist_ok=True)
    code = (f"import torch, cnnlab; from cnnlab.config import load_yaml, make_config; "
            f"cfg = make_config({{**load_yaml({os.path.join(ROOT, 'cnnlab', 'recipes', 'mnist_fast.yaml')!r}), "
            f"'data_dir': {args.data_dir!r}, 'device': 'cuda', 'report': False, "
            f"'out': {os.path.join(ROOT, 'runs', 'gpu-profile')!r}, 'overwrite': True}}); "
            "cnnlab.train(cfg, quiet=True); "   # warm: the profiled run below sees no first-use costs
            "acts = [torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]; "
            "prof = torch.profiler.profile(activities=acts); prof.__enter__(); cnnlab.train(cfg, quiet=True); "
            "prof.__exit__(None, None, None); k = prof.key_averages(); "
            "print(k.table(sort_by='self_cpu_time_total', row_limit=40)); "
            "print(k.table(sort_by='self_cuda_time_total', row_limit=25))")
    with open(os.path.join(args.profile, "torch_profile.txt"), "w") as f:
        subprocess.run([sys.executable, "-c", code], cwd=ROOT, stdout=f, stderr=subprocess.STDOUT)
    stats = os.path.join(args.profile, "cprofile.out")
    subprocess.run([sys.executable, "-m", "cProfile", "-o", stats, "-m", "cnnlab", "train", "--config", "mnist_fast",
                    "--data-dir", args.data_dir, "--device", "cuda", "--report", "false", "--overwrite",
                    "--out", os.path.join(ROOT, "runs", "gpu-cprofile")], cwd=ROOT, capture_output=True)
    import pstats

    with open(os.path.join(args.profile, "cprofile.txt"), "w") as f:
        pstats.Stats(stats, stream=f).sort_stats("tottime").print_stats(50)
        pstats.Stats(stats, stream=f).sort_stats("cumulative").print_stats(80)
    print(f"profiles written to {args.profile}")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data-dir", default=os.path.join(ROOT, "..", "shared", "datasets"))
    ap.add_argument("--cifar", default="/tmp/cifar10_jpg", help="the CIFAR-10 JPEG folder (train/ and test/)")
    ap.add_argument("--airbench", help="airbench94.py (legacy/airbench94.py of KellerJordan/cifar10-airbench)")
    ap.add_argument("--airbench-runs", type=int, default=5)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--profile", help="write profiles of an mnist_fast epoch into this folder")
    ap.add_argument("--parts", nargs="+", default=["mnist", "airbench", "cifar"])
    args = ap.parse_args()
    import torch

    print(f"GPU: {torch.cuda.get_device_name()}, torch {torch.__version__}", flush=True)
    for part in args.parts:
        if part == "airbench" and not args.airbench:
            print("airbench: skipped (no --airbench script given)")
            continue
        try:
            {"mnist": mnist, "airbench": airbench, "cifar": cifar}[part](args)
        except subprocess.CalledProcessError as e:
            print(f"{part} failed: {(e.stderr or '')[-2000:]}", flush=True)
    if args.profile:
        profile(args)


if __name__ == "__main__":
    main()
