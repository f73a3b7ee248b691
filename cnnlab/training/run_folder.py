"""The run folder: everything a training run writes, in one place. On non-zero DDP ranks every
method does nothing, so the engine never asks `if rank == 0`."""
import csv
import json
import os
import shutil
import time

from . import checkpoint
from ..atomic import atomic_path, write_text
from ..config import dump_yaml
from ..errors import CnnlabError, UsageError, note

METRIC_COLUMNS = ["epoch", "train_loss", "train_acc", "val_loss", "val_acc", "lr", "seconds"]


def default_name(cfg):
    data = cfg.data.split(":")[0] if ":" in cfg.data else cfg.data
    model = cfg.model.rpartition(":")[2]   # a user model module:Class -> Class
    return f"{model}-{data}-{time.strftime('%Y%m%d-%H%M%S')}"


def check_writable(path, need_bytes):
    """Fail before training, and before creating anything, if `path` can't be written or the disk
    is nearly full: better now than after an hour of training."""
    parent = os.path.abspath(path)
    while not os.path.exists(parent):
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent):
        raise UsageError(f"output folder '{path}' cannot be created: '{parent}' is a file; choose another --out.")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise UsageError(f"output folder '{path}' is not writable (no write permission on '{parent}'); "
                         "choose another with --out.")
    free = shutil.disk_usage(parent).free
    if free < need_bytes:
        raise CnnlabError(f"only {free / 2**20:.0f} MiB free under '{parent}', need about {need_bytes / 2**20:.0f} MiB "
                          "for checkpoints; free some space or choose another --out.")


LOCK = ".lock"


class RunFolder:
    def __init__(self, path, enabled=True):
        self.path, self.enabled = path, enabled
        self._lock, self._created = None, False

    def claim(self, resume=False, overwrite=False):
        """Take the folder for this run: an OS lock held for the run's life (a second process on
        the same folder gets one line naming the holder), then refuse a finished or foreign run in
        it unless we resume it or were told to overwrite it. Nothing is written to a refused folder."""
        if not self.enabled:
            return
        self._created = not os.path.exists(self.path)
        try:
            os.makedirs(self.path, exist_ok=True)
        except OSError as e:
            raise UsageError(f"cannot create output folder '{self.path}': {e.strerror or e}.") from None
        self._lock = hold_lock(self.file(LOCK))
        if not resume:
            self._check_empty(overwrite)

    def _check_empty(self, overwrite):
        entries = [e for e in os.listdir(self.path) if e != LOCK]
        if not entries:
            return
        if not os.path.exists(self.file("config.yaml")):
            self.release()
            raise UsageError(f"output folder '{self.path}' is not empty and holds no cnnlab run; choose another --out.")
        if not overwrite:
            self.release()
            raise UsageError(f"'{self.path}' already holds a run; continue it with --resume {self.path}, replace it "
                             "with --overwrite, or choose another --out.")
        for entry in entries:   # a cnnlab run folder: every file in it belongs to the old run
            path = self.file(entry)
            shutil.rmtree(path) if os.path.isdir(path) and not os.path.islink(path) else os.remove(path)

    def release(self):
        """Drop the lock; a folder this run created and never wrote to (it failed before starting)
        is removed, so a refused or failed command leaves nothing behind."""
        if self._lock is None:
            return
        if self._created and os.listdir(self.path) == [LOCK]:
            try:                 # unlinked while still locked: no one can take this lock meanwhile
                os.remove(self.file(LOCK))
                os.rmdir(self.path)
            except OSError:
                pass
        self._lock.close()       # closing the file drops the flock
        self._lock = None

    def file(self, name):
        return os.path.join(self.path, name)

    def write_json(self, name, obj):
        if self.enabled:
            write_text(self.file(name), json.dumps(obj, indent=2))

    def write_text(self, name, text):
        if self.enabled:
            write_text(self.file(name), text)

    def create(self, cfg):
        """Write config.yaml, the first thing a run writes (claim made the folder)."""
        if self.enabled:
            dump_yaml(cfg, self.file("config.yaml"))

    def write_metrics(self, history):
        """Rewrite metrics.csv from the whole history (so a resumed run's file has no duplicates)."""
        if not self.enabled:
            return
        extra = [k for k in (history[0] if history else {}) if k not in METRIC_COLUMNS]
        with atomic_path(self.file("metrics.csv")) as tmp, open(tmp, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=METRIC_COLUMNS + extra)
            writer.writeheader()
            writer.writerows(history)

    def save_checkpoint(self, name, payload):
        if self.enabled:
            checkpoint.save(payload, self.file(name))


def hold_lock(path):
    """An exclusive, non-blocking flock on `path`, with our pid written in it for the next comer."""
    import fcntl

    f = open(path, "a+")
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        f.seek(0)
        holder = f.read().strip() or "unknown"
        f.close()
        raise CnnlabError(f"run folder '{os.path.dirname(path)}' is in use by another cnnlab process (pid {holder}); "
                          "wait for it to finish or choose another --out.") from None
    f.seek(0)
    f.truncate()
    f.write(str(os.getpid()))
    f.flush()
    return f


def lock_holder(folder):
    """The pid text of the cnnlab process training in `folder` now, or None (no lock file, or no
    process holding it)."""
    import fcntl

    try:
        with open(os.path.join(folder, LOCK)) as f:
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                return f.read().strip() or "unknown"
            fcntl.flock(f, fcntl.LOCK_UN)
    except OSError:   # no lock file (a finished run removes it), or not ours to read
        return None
    return None


def read_json(path):
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except ValueError as e:   # JSONDecodeError, UnicodeDecodeError
        raise CnnlabError(f"{path} is damaged (not valid JSON: {str(e)[:80]}); restore it, or delete it and rerun "
                          "the command that wrote it.") from None


def read_metrics(run_dir):
    """metrics.csv as rows of floats; [] with a note when it is missing (no training curves then)."""
    path = os.path.join(run_dir, "metrics.csv")
    if not os.path.exists(path):
        note(f"note: {path} is missing: going on without the training curves.")
        return []
    try:
        with open(path, newline="", encoding="utf-8") as f:
            return [{k: float(v) for k, v in row.items()} for row in csv.DictReader(f)]
    except (ValueError, TypeError, csv.Error) as e:   # a cell that is not a number, a short or long row
        raise CnnlabError(f"{path} is damaged ({str(e)[:80]}); delete it to go on without the training "
                          "curves.") from None
