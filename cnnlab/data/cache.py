"""The on-disk cache of decoded images, keyed by the source files' names, sizes and mtimes and by
the decoding settings: change a file and the key changes. Lives in --cache-dir, else $CNNLAB_CACHE,
else ~/.cache/cnnlab. Small results (image formats) are npz files (cached_arrays); decoded pools
and streamed splits are memory-mapped entries (disk_array), listed and cleared by `cnnlab cache`."""
import glob
import hashlib
import json
import os
import shutil
import time
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np

from ..atomic import atomic_path, write_text
from ..errors import CnnlabError


def cache_dir():
    return os.environ.get("CNNLAB_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "cnnlab")


def files_under(root):
    """Every file below `root`, sorted (none if it does not exist)."""
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        found += [os.path.join(dirpath, f) for f in sorted(filenames)]
    return found


def file_stamps(files):
    """{file: (absolute name, size, mtime_ns)}, size and mtime None for a missing file: one abspath
    and one os.stat per file, which the cache keys and ids of one load share (a CIFAR-10 folder's
    60,000 files were stat-ed three times, 0.6 s of its start-up)."""
    stamps = {}
    for f, name in zip(files, absolute_names(files)):
        try:
            st = os.stat(f)
            stamps[f] = (name, st.st_size, st.st_mtime_ns)
        except OSError:
            stamps[f] = (name, None, None)
    return stamps


def files_key(label, files, stamps=None):
    """A hash of `label` and every file's absolute name, size and mtime; a missing file counts too.
    `stamps`: file_stamps of these files (or more), when the caller has them already."""
    files = list(files)
    stamps = file_stamps(files) if stamps is None else stamps
    h = hashlib.sha256(label.encode())
    for f in files:
        name, size, mtime = stamps[f]
        h.update((f"{name}\0{size}\0{mtime}\n" if size is not None else f"{name}\0missing\n").encode())
    return h.hexdigest()[:24]


def absolute_names(files):
    """os.path.abspath of each file, made once per folder rather than once per file (abspath
    normalises the whole name: 2 us a file, 0.5 s of a CIFAR-10 folder's start-up over its keys)."""
    folders = {}
    for f in files:
        head, tail = os.path.split(f)
        if tail in ("", ".", ".."):   # not a plain file name: normalising could change the folder
            yield os.path.abspath(f)
            continue
        if head not in folders:
            folders[head] = os.path.abspath(head or os.curdir)
        yield os.path.join(folders[head], tail)


def cached_arrays(key, make, kind="sets", root=""):
    """The dict of arrays stored under `key`, or `make()`'s, saved atomically for next time
    (`root`: --cache-dir, else the default)."""
    path = os.path.join(root or cache_dir(), kind, key + ".npz")
    if os.path.exists(path):
        try:
            with np.load(path, allow_pickle=False) as z:
                return {k: z[k] for k in z.files}
        except (OSError, ValueError):
            pass  # a damaged cache entry is rebuilt below
    arrays = make()
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with atomic_path(path) as tmp:   # a crash mid-write leaves no half entry to be read
            np.savez(tmp, **arrays)
    except (OSError, CnnlabError):
        pass  # a read-only home or a full disk is no reason to fail; we just decode again next time
    return arrays


# --- memory-mapped arrays on disk ---------------------------------------------------------------
# An entry is a folder <cache>/<kind>/<key>/ holding pixels.u8 (raw uint8 rows, read back with
# numpy's memmap) and meta.json (shape, what it holds). It is built under another name,
# .<key>.partial-<pid>, and renamed last, so a crash mid-build leaves nothing that looks complete;
# a lock file per key (fcntl.flock) makes a second process wait for the first one's build, then read it.

PIXELS, META = "pixels.u8", "meta.json"
SMALL_KINDS = ("formats", "sets", "folders")   # where cached_arrays keeps its .npz entries


def cache_root(override=""):
    """--cache-dir, else $CNNLAB_CACHE, else ~/.cache/cnnlab."""
    return override or cache_dir()


@contextmanager
def file_lock(path):
    """An exclusive lock on `path` (created if needed), held for the `with` block; the kernel drops
    it when the process dies, so a killed build never blocks the next one."""
    import fcntl

    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


@dataclass
class Entry:
    """A complete cache entry: its folder and meta.json."""
    path: str
    meta: dict

    @property
    def shape(self):
        return tuple(self.meta["shape"])

    @property
    def nbytes(self):
        return int(np.prod(self.shape))

    def array(self):
        """The rows as a numpy memmap: pages are read when touched, never all at once. Copy-on-write
        mode, so torch.from_numpy takes it without a warning, though nothing ever writes to it."""
        if not self.nbytes:
            return np.zeros(self.shape, np.uint8)
        return np.memmap(os.path.join(self.path, PIXELS), np.uint8, "c", shape=self.shape)


def read_entry(path):
    """The Entry at `path`, or None when it is absent or incomplete (no meta.json: a build died)."""
    try:
        with open(os.path.join(path, META), encoding="utf-8") as f:
            return Entry(path, json.load(f))
    except (OSError, ValueError):
        return None


def disk_array(kind, key, fill, root=""):
    """The Entry stored as kind/key, built once by `fill(folder)` if absent. `fill` writes
    folder/pixels.u8 and returns the meta dict (with "shape"). Safe for processes that ask at once
    (DDP ranks, two trainings): one builds, the others wait on the lock, then read."""
    root = cache_root(root)
    final = os.path.join(root, kind, key)
    found = read_entry(final)
    if found:
        return found
    try:
        with file_lock(os.path.join(root, "locks", f"{kind}-{key}.lock")):
            return read_entry(final) or build_entry(final, fill)   # built by another process while we waited?
    except OSError as e:
        raise CnnlabError(f"cannot write the decoded-images cache in {root}: {e.strerror or e}. Free some space "
                          "or point --cache-dir (or CNNLAB_CACHE) at a writable folder with room.") from None


def build_entry(final, fill):
    """Build the entry in a partial folder and rename it to `final` last (the lock is held)."""
    folder, key = os.path.split(final)
    for stale in glob.glob(os.path.join(folder, f".{glob.escape(key)}.partial-*")):
        shutil.rmtree(stale, ignore_errors=True)   # a build that died: the lock says no one else is at it
    partial = os.path.join(folder, f".{key}.partial-{os.getpid()}")
    os.makedirs(partial)
    try:
        meta = dict(fill(partial), created=time.time())
        write_text(os.path.join(partial, META), json.dumps(meta))
        os.rename(partial, final)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    return Entry(final, meta)


def new_pixels(folder, shape):
    """A writable uint8 memmap of `shape` in folder/pixels.u8 (what a `fill` writes into). Its
    space is reserved first: a full disk is then one OSError here, not a SIGBUS (a crash without
    a message) at the first page of a memory map that the disk cannot hold."""
    path = os.path.join(folder, PIXELS)
    nbytes = int(np.prod(shape))
    with open(path, "wb") as f:
        if nbytes and hasattr(os, "posix_fallocate"):
            os.posix_fallocate(f.fileno(), 0, nbytes)
    if not nbytes:
        return np.zeros(shape, np.uint8)
    return np.memmap(path, np.uint8, "r+", shape=tuple(shape))


DROP_EVERY = 128 * 2**20


class PageDropper:
    """Keeps a pass over memory-mapped arrays from filling this process's resident memory: every
    DROP_EVERY bytes read or written, the mapped pages leave the process (the file and the page cache
    keep the data). Without it a pass over a 6 GB cache showed 6 GB of resident memory, all of it
    mapped file pages. Written pages are not flushed first: the maps written to are shared ("r+"),
    whose dirty pages stay in the page cache when unmapped, and the kernel writes them back in its
    own time (an msync per drop made the whole build wait for the disk: 9% of a first decode).

    A sequential pass maps about what it reads. Scattered rows do not: the kernel maps a whole page
    cache folio per fault (8 MB of readahead here), so 128 MiB of rows mapped 1.5 GB. Readers of
    scattered rows call drop_pages after every batch instead."""

    def __init__(self, *arrays):
        self.arrays, self.since = arrays, 0

    def read(self, nbytes):
        self.since += nbytes
        if self.since >= DROP_EVERY:
            self.drop()

    def drop(self):
        self.since = 0
        for a in self.arrays:
            drop_pages(a)


def drop_pages(a):
    """madvise(MADV_DONTNEED) over a memory-mapped numpy array or a tensor made from one (only
    those: on ordinary memory it would zero the data). Mapped file pages are read again from the
    page cache or the file when touched. Only for read-only or shared maps: a private map's
    written pages would be lost."""
    import ctypes
    import mmap

    nbytes = a.nbytes
    if not nbytes or not hasattr(mmap, "MADV_DONTNEED"):
        return   # an empty entry is no mapping at all (Entry.array); not Linux: nothing to do
    ptr = a.data_ptr() if hasattr(a, "data_ptr") else a.ctypes.data
    start = ptr - ptr % mmap.PAGESIZE
    ctypes.CDLL(None).madvise(ctypes.c_void_p(start), ctypes.c_size_t(ptr + nbytes - start), mmap.MADV_DONTNEED)


def entries(root=""):
    """[(kind, Entry)] of every complete entry under the cache root, and the bytes of everything
    else there (partial builds, locks, small npz entries), for `cnnlab cache list`."""
    root = cache_root(root)
    found, other = [], 0
    for kind in sorted(os.listdir(root)) if os.path.isdir(root) else []:
        for name in sorted(os.listdir(os.path.join(root, kind))):
            path = os.path.join(root, kind, name)
            entry = read_entry(path) if os.path.isdir(path) and not name.startswith(".") else None
            if entry:
                found.append((kind, entry))
            elif not name.endswith(".npz"):   # small_entries counts those
                other += folder_bytes(path)
    return found, other


def small_entries(root=""):
    """{kind: (files, bytes)} of cached_arrays' .npz entries: decoded torchvision sets ("sets"),
    image folders' formats ("formats")."""
    root = cache_root(root)
    out = {}
    for kind in SMALL_KINDS:
        paths = glob.glob(os.path.join(root, kind, "*.npz"))
        if paths:
            out[kind] = (len(paths), sum(os.path.getsize(p) for p in paths))
    return out


def folder_bytes(path):
    """Bytes of a file, or of every file below a folder."""
    if not os.path.isdir(path):
        return os.path.getsize(path) if os.path.exists(path) else 0
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(path) for f in fs)


def clear(root=""):
    """Delete the whole cache folder's contents; returns the bytes freed. Entries being built hold
    their lock: they are left alone (their builder renames them when done)."""
    root = cache_root(root)
    freed = 0
    found, _ = entries(root)
    for kind, entry in found:
        freed += folder_bytes(entry.path)
        shutil.rmtree(entry.path, ignore_errors=True)
    for kind in SMALL_KINDS:   # the small npz entries of cached_arrays
        for path in glob.glob(os.path.join(root, kind, "*.npz")):
            freed += os.path.getsize(path)
            os.remove(path)
    return freed
