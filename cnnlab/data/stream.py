"""Data beyond memory: `--in-memory auto|yes|no` for sources decoded into the disk cache
(folder:, csv:).

In memory (yes, or auto when the splits fit the budget) each split is gathered from the cache's
memory map into one uint8 tensor, as for every other source. Streamed (no, or auto when they do
not fit) each split is gathered once into its own cache entry (the rows of the split, in split
order) and stays memory-mapped: StreamLoader reads only the rows of each batch, the next batch
in a background thread while the model trains on this one. Both modes slice batches from the
same seeded permutation with the same augmentation draws (the loader's make_batch), so their
batches, and so their losses, are identical, and exact resume and DDP shards hold in both.
"""
import hashlib
import os
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch

from ..errors import UsageError, note
from .cache import PageDropper, disk_array, drop_pages, new_pixels
from .images import available_memory, center_crop
from .loader import BatchLoader, _generator, augment_gather

MODES = ("auto", "yes", "no")
BUDGET_SHARE = 2   # auto: the splits stay in memory when they take at most 1/2 of the memory available


def memory_budget():
    """Bytes the in-memory splits may take: half the memory available now (the rest is for the
    model, the batches and everything else on the machine)."""
    return available_memory() // BUDGET_SHARE


def stream_splits(mode, nbytes, data_name, disk_backed):
    """True when the splits (`nbytes` in memory) are to be streamed from the disk cache. --in-memory
    yes that cannot fit is refused here, before any split is loaded."""
    if mode not in MODES:
        raise UsageError(f"--in-memory {mode!r}: use auto, yes or no.")
    budget = memory_budget()
    if mode == "yes" and nbytes > budget:
        raise UsageError(f"--in-memory yes: the splits of {data_name} take {nbytes / 2**30:.2f} GiB, over the "
                         f"{budget / 2**30:.2f} GiB budget (half the memory available); use --in-memory auto or no "
                         "to stream them from the disk cache.")
    if not disk_backed:
        if mode == "no":
            note(f"note: {data_name} is held in memory by its source; --in-memory no streams folder: and csv: data only.")
        return False
    return mode == "no" or (mode == "auto" and nbytes > budget)


def split_on_disk(x, rows, pool_entry, name="a split", crop=0):
    """The rows `rows` of a memory-mapped pool `x` (split `name`), gathered once into their own entry
    in the pool's cache (keyed by the pool's entry, the rows and `crop`) -> (memory-mapped uint8
    tensor, its Entry). `crop`: keep each image's central crop x crop (held-out splits of photos)."""
    rows = torch.as_tensor(rows, dtype=torch.int64)
    key = hashlib.sha256(pool_entry.path.encode() + rows.numpy().tobytes() + str(crop).encode()).hexdigest()[:24]
    side = (crop, crop) if crop else tuple(x.shape[2:])

    def fill(folder):
        out = new_pixels(folder, (len(rows), x.shape[1]) + side)
        dropper = PageDropper(out)
        for start in range(0, len(rows), 256):   # sorted rows within a chunk: a forward read of the pool
            part = x[rows[start:start + 256]]
            drop_pages(x)                        # scattered rows of the pool: see PageDropper
            out[start:start + 256] = (center_crop(part, crop) if crop else part).numpy()
            dropper.read(out[start:start + 256].nbytes)
        dropper.drop()
        origin = pool_entry.meta.get("origin") or pool_entry.meta.get("source", "images")   # the decoded files
        return {"shape": list(out.shape), "source": f"{name} of the {origin}", "origin": origin}
    entry = disk_array("splits", key, fill, os.path.dirname(os.path.dirname(pool_entry.path)))
    return torch.from_numpy(entry.array()), entry


def channel_sums(x, mapped=False, elements=2**20):
    """(sum, sum of squares, count) per channel of uint8 images, exactly (int64), read in chunks of
    about `elements` pixels: a split is never converted as a whole. Each chunk's channel is summed
    as float64, its squares by einsum: the sums are integers below 2**53, hence exact, and 4x
    faster than a histogram by numpy's bincount (which widens every pixel to int64). Not a BLAS dot
    product, whose idle OpenBLAS threads then halved the speed of torch's loader for the rest of
    the process (and torch's bincount made every later training step 15% slower). `mapped`: x is
    memory-mapped from the disk cache; its pages are let go as the pass goes (a 5.7 GB split
    stayed resident without it)."""
    if x.dtype != torch.uint8:
        raise TypeError(f"channel_sums takes uint8 images, not {x.dtype}")
    channels = x.shape[1]
    total, squares = [0] * channels, [0] * channels
    chunk = max(1, elements // max(1, x[0].numel())) if len(x) else 1
    dropper = PageDropper(x) if mapped else None
    for start in range(0, len(x), chunk):
        part = x[start:start + chunk].numpy()
        for c in range(channels):
            values = part[:, c].astype(np.float64).reshape(-1)
            total[c] += int(values.sum())
            squares[c] += int(np.einsum("i,i->", values, values))
        if dropper:
            dropper.read(part.size)
    if dropper:
        dropper.drop()
    count = len(x) * x.shape[2] * x.shape[3]
    return torch.tensor(total, dtype=torch.int64), torch.tensor(squares, dtype=torch.int64), count


class StreamLoader(BatchLoader):
    """A BatchLoader whose split stays memory-mapped on the CPU: each batch reads only its rows
    (this rank's share under DDP), the next one in a background thread, then crops and flips them
    with the very draws the in-memory loader makes (same positions, same generators)."""

    def __init__(self, x, y, batch_size, preprocess, device="cpu", **options):
        super().__init__(x[:0], y, batch_size, preprocess, device, **options)   # nothing moved or padded at once
        self.source = x                     # (N, C, H, W) uint8, memory-mapped
        self.pinned = torch.device(device).type == "cuda"
        self.ahead = None                   # (rows, images) read ahead for the coming step

    def batches(self, epoch=0, start=0):
        """As BatchLoader.batches; while a batch trains, the next one's rows are read in a thread."""
        order = self.order(epoch)
        with ThreadPoolExecutor(1) as reader:
            coming = reader.submit(self.read, self.own_rows(order, start)) if start < len(self) else None
            for step in range(start, len(self)):
                self.ahead = (self.own_rows(order, step), coming.result())
                if step + 1 < len(self):
                    coming = reader.submit(self.read, self.own_rows(order, step + 1))
                yield self.make_batch(order[step * self.batch_size:(step + 1) * self.batch_size], epoch, step)
            self.ahead = None

    def own_rows(self, order, step):
        """The rows this rank reads at `step`: its share of the global batch (make_batch's `mine`)."""
        return order[step * self.batch_size:(step + 1) * self.batch_size][self.rank::self.world].cpu()

    def read(self, rows):
        """uint8 images of `rows` on the device: a gather from the memory map, through pinned memory
        and a non-blocking copy on CUDA."""
        images = self.source[rows]                   # (B, C, H, W): only these rows are read
        drop_pages(self.source)                      # scattered rows: see PageDropper
        if self.pinned:
            return images.pin_memory().to(self.x.device, non_blocking=True)
        return images.to(self.x.device)

    def images(self, idx, positions, epoch, step):
        """As BatchLoader.images, from the rows read for this batch (read now if they were not)."""
        rows = idx[positions].cpu()
        ahead = self.ahead
        got = ahead[1] if ahead is not None and torch.equal(ahead[0], rows) else self.read(rows)
        local = torch.arange(len(got), device=got.device)
        if self.size:   # photos stored larger than the input: cut as the in-memory loader cuts them
            return self.photos(got, local, len(idx), positions, epoch, step, self.flips(idx, positions, epoch))
        if self.augment == "none":
            return got
        return augment_gather(self.pad_images(got), local, self.x.shape[2:], self.pad,
                              self.flips(idx, positions, epoch), _generator(self.seed, epoch, step, 7), len(idx),
                              positions)


def make_loader(x, y, batch_size, preprocess, device="cpu", streamed=False, **options):
    """A StreamLoader for a streamed split, else the in-memory BatchLoader."""
    kind = StreamLoader if streamed else BatchLoader
    return kind(x, y, batch_size, preprocess, device, **options)
