"""Data beyond memory (issue 17): a generated folder of JPEG photos whose decoded cache at
--image-size 224 is over 6 GB, and over 6 GiB (44,000 files at 400x300: 6.6 GB), measured in one run:

  (a) first decode images/s into the disk cache (cnnlab, a process pool) vs one pass of torchvision's
      ImageFolder + DataLoader(num_workers=2) with the same resize;
  (b) steady-state images/s of batches read from the cache (StreamLoader, crop+flip, no model) vs
      that DataLoader pass;
  (c) peak resident memory of a 1-epoch training streamed from the cache (/usr/bin/time -v).

Targets on a 2-core machine: (c) under 2 GB while the cache is over 6 GB; (b) at least 5x the
DataLoader; (a) not slower than the DataLoader's pass.

    python benchmarks/data_scale.py --out /tmp/data_scale            # the full run: ~15 GB of disk
    python benchmarks/data_scale.py --out /tmp/data_scale --small    # 1,000 files: a quick check
The generated photos and the cache are deleted afterwards (--keep keeps them).
"""
import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import time
from concurrent.futures import ProcessPoolExecutor

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
CLASSES = 10


def make_photo(task):
    """One JPEG: a smooth random colour field plus noise (compresses like a photo, ~30 KB at 400x300)."""
    path, seed, width, height = task
    from PIL import Image

    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, (height // 50 + 2, width // 50 + 2, 3), dtype=np.uint8)
    img = Image.fromarray(small).resize((width, height), Image.BILINEAR)
    noisy = np.asarray(img, dtype=np.int16) + rng.integers(-12, 13, (height, width, 3))
    Image.fromarray(noisy.clip(0, 255).astype(np.uint8)).save(path, quality=90)


def generate(folder, files, width, height):
    tasks = []
    for i in range(files):
        cls = os.path.join(folder, f"class{i % CLASSES}")
        os.makedirs(cls, exist_ok=True)
        tasks.append((os.path.join(cls, f"{i:06d}.jpg"), i, width, height))
    with ProcessPoolExecutor(os.cpu_count()) as pool:
        list(pool.map(make_photo, tasks, chunksize=64))


def dataloader_pass(folder, size, batch):
    """(images/s, seconds) of one pass of ImageFolder + DataLoader(num_workers=2), resized like cnnlab."""
    import torch
    from torchvision import datasets, transforms

    tf = transforms.Compose([transforms.Resize((size, size)), transforms.PILToTensor()])
    loader = torch.utils.data.DataLoader(datasets.ImageFolder(folder, tf), batch_size=batch, num_workers=2)
    start, n = time.perf_counter(), 0
    for x, _ in loader:
        n += len(x)
    seconds = time.perf_counter() - start
    return n / seconds, seconds


def first_decode(folder, size, cache):
    """(images/s, seconds, cache Entry) of cnnlab's first decode of every file into the disk cache."""
    from cnnlab.config import DataConfig
    from cnnlab.data.folder import decode_files, list_images

    files = list_images(folder)
    start = time.perf_counter()
    _, _, _, _, entry = decode_files(files, [0] * len(files), 3, size, DataConfig(cache_dir=cache))
    seconds = time.perf_counter() - start
    return len(files) / seconds, seconds, entry


def cached_batches(entry, batch, augment):
    """Images/s of one epoch of batches from the memory-mapped cache (no model): augment None reads
    the uint8 rows only (what the DataLoader pass yields), else normalised batches with `augment`.
    The file is read through the page cache as it stands (the machine is shared: it is not dropped)."""
    import torch

    from cnnlab.data.preprocess import Preprocess
    from cnnlab.data.stream import StreamLoader

    x = torch.from_numpy(entry.array())
    y = torch.zeros(len(x), dtype=torch.int64)
    pre = Preprocess(channels=3, image_size=x.shape[2], mean=[0.5] * 3, std=[0.25] * 3)
    loader = StreamLoader(x, y, batch, pre, shuffle=True, augment=augment or "none")
    start, n = time.perf_counter(), 0
    if augment is None:
        for rows in loader.order(0).split(batch):
            n += len(loader.read(rows))
    else:
        for xb, _ in loader.batches(0):
            n += len(xb)
    return n / (time.perf_counter() - start)


def training_peak(folder, size, cache, model, out):
    """(peak resident MiB, seconds) of `cnnlab train` for 1 epoch streamed from the cache."""
    cmd = ["/usr/bin/time", "-v", sys.executable, "-m", "cnnlab", "train", "--data", folder, "--image-size", str(size),
           "--model", model, "--epochs", "1", "--in-memory", "no", "--cache-dir", cache, "--out", out, "--overwrite",
           "--resize", "squash",   # the photos as (a) decoded them: the run reads that cache entry, no second decode
           "--report", "false", "--batch-size", "32", "--eval-batch-size", "32"]   # small: the data's memory is measured
    start = time.perf_counter()
    done = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": ROOT})
    seconds = time.perf_counter() - start
    if done.returncode:
        raise SystemExit(done.stderr[-3000:])
    peak_kb = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", done.stderr).group(1))
    return peak_kb / 1024, seconds, [line for line in done.stdout.splitlines() if line.startswith("data ")]


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="/tmp/cnnlab_data_scale", help="where the photos and the cache are made")
    p.add_argument("--files", type=int, default=44_000)
    p.add_argument("--width", type=int, default=400)
    p.add_argument("--height", type=int, default=300)
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--model", default="net", help="the network of the 1-epoch training (a small one: the loader is measured)")
    p.add_argument("--small", action="store_true", help="1,000 files: a quick check, not the issue's measurement")
    p.add_argument("--keep", action="store_true", help="keep the generated photos and cache")
    args = p.parse_args()
    files = 1000 if args.small else args.files
    photos, cache = os.path.join(args.out, "photos"), os.path.join(args.out, "cache")
    try:
        t = time.perf_counter()
        generate(photos, files, args.width, args.height)
        print(f"generated {files:,} JPEGs at {args.width}x{args.height} in {time.perf_counter() - t:.0f} s", flush=True)
        dl_rate, dl_seconds = dataloader_pass(photos, args.image_size, args.batch)
        print(f"DataLoader(num_workers=2) one pass: {dl_rate:.0f} img/s ({dl_seconds:.0f} s)", flush=True)
        dec_rate, dec_seconds, entry = first_decode(photos, args.image_size, cache)
        print(f"(a) cnnlab first decode: {dec_rate:.0f} img/s ({dec_seconds:.0f} s); cache {entry.nbytes / 2**30:.2f} GiB",
              flush=True)
        cached_rate = cached_batches(entry, args.batch, None)
        print(f"(b) uint8 batches from the cache (no model): {cached_rate:.0f} img/s", flush=True)
        normalised_rate = cached_batches(entry, args.batch, "none")
        cropped_rate = cached_batches(entry, args.batch, "crop+flip")
        print(f"    normalised float batches: {normalised_rate:.0f} img/s, with crop+flip {cropped_rate:.0f} img/s",
              flush=True)
        peak, train_seconds, data_line = training_peak(photos, args.image_size, cache, args.model,
                                                       os.path.join(args.out, "run"))
        print(f"(c) 1-epoch training ({args.model}) from the cache: peak RSS {peak:,.0f} MiB, {train_seconds:.0f} s",
              flush=True)
        print("    " + "\n    ".join(data_line))
        results = {"files": files, "size": f"{args.width}x{args.height}", "image_size": args.image_size,
                   "cache_gib": entry.nbytes / 2**30, "dataloader_img_s": dl_rate, "first_decode_img_s": dec_rate,
                   "cached_img_s": cached_rate, "cached_normalised_img_s": normalised_rate,
                   "cached_crop_flip_img_s": cropped_rate, "train_peak_mib": peak, "train_seconds": train_seconds,
                   "cpus": os.cpu_count()}
        print("ratios:")
        print(f"first decode / DataLoader pass = {dec_rate / dl_rate:.2f}  (target >= 1)")
        print(f"cached batches / DataLoader pass = {cached_rate / dl_rate:.1f}  (target >= 5)")
        print(f"peak training memory {peak * 2**20 / 1e9:.2f} GB ({peak / 1024:.2f} GiB) with a cache of "
              f"{entry.nbytes / 1e9:.2f} GB ({entry.nbytes / 2**30:.2f} GiB)  (target < 2 GB with a cache > 6 GB)")
        print(json.dumps(results))
    finally:
        if not args.keep:
            shutil.rmtree(args.out, ignore_errors=True)


if __name__ == "__main__":
    main()
