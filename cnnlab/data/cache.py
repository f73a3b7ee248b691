"""A small on-disk cache of decoded uint8 arrays, keyed by the source files' names, sizes and
mtimes: change a file and the key changes. Lives in $CNNLAB_CACHE or ~/.cache/cnnlab."""
import hashlib
import os

import numpy as np

from ..atomic import atomic_path
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


def files_key(label, files):
    """A hash of `label` and every file's absolute name, size and mtime; a missing file counts too."""
    h = hashlib.sha256(label.encode())
    for f in files:
        try:
            st = os.stat(f)
            h.update(f"{os.path.abspath(f)}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
        except OSError:
            h.update(f"{os.path.abspath(f)}\0missing\n".encode())
    return h.hexdigest()[:24]


def cached_arrays(key, make, kind="sets"):
    """The dict of arrays stored under `key`, or `make()`'s, saved atomically for next time."""
    path = os.path.join(cache_dir(), kind, key + ".npz")
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
