"""The run folder: everything a training run writes, in one place. On non-zero DDP ranks every
method does nothing, so the engine never asks `if rank == 0`."""
import csv
import json
import os
import shutil
import time

from . import checkpoint
from ..config import dump_yaml
from ..errors import CnnlabError, UsageError

METRIC_COLUMNS = ["epoch", "train_loss", "train_acc", "val_loss", "val_acc", "lr", "seconds"]


def default_name(cfg):
    data = cfg.data.split(":")[0] if ":" in cfg.data else cfg.data
    return f"{cfg.model}-{data}-{time.strftime('%Y%m%d-%H%M%S')}"


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


class RunFolder:
    def __init__(self, path, enabled=True):
        self.path, self.enabled = path, enabled

    def file(self, name):
        return os.path.join(self.path, name)

    def write_json(self, name, obj):
        if self.enabled:
            tmp = self.file(name + ".tmp")
            with open(tmp, "w", encoding="utf-8") as f:
                json.dump(obj, f, indent=2)
            os.replace(tmp, self.file(name))

    def write_text(self, name, text):
        if self.enabled:
            with open(self.file(name), "w", encoding="utf-8") as f:
                f.write(text)

    def create(self, cfg):
        """Make the folder and write config.yaml: the first thing a run writes."""
        if self.enabled:
            try:
                os.makedirs(self.path, exist_ok=True)
            except OSError as e:
                raise UsageError(f"cannot create output folder '{self.path}': {e.strerror or e}.") from None
            dump_yaml(cfg, self.file("config.yaml"))

    def write_metrics(self, history):
        """Rewrite metrics.csv from the whole history (so a resumed run's file has no duplicates)."""
        if not self.enabled:
            return
        extra = [k for k in (history[0] if history else {}) if k not in METRIC_COLUMNS]
        with open(self.file("metrics.csv"), "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=METRIC_COLUMNS + extra)
            writer.writeheader()
            writer.writerows(history)

    def save_checkpoint(self, name, payload):
        if self.enabled:
            checkpoint.save(payload, self.file(name))


def read_json(path):
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def read_metrics(run_dir):
    with open(os.path.join(run_dir, "metrics.csv"), newline="") as f:
        return [{k: float(v) for k, v in row.items()} for row in csv.DictReader(f)]
