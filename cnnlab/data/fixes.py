"""`--fix-list FIXES.csv`: the CSV that `cnnlab audit --fix-list` writes, read back. Each row names
one image and an action: `exclude` leaves it out of every split, `relabel` gives it the class in the
`suggested` column (edit that to any class name), `keep` changes nothing. An image named twice is
left out if any of its rows says exclude.

Rows find their image by `file` for folder sources (so a folder that gained files, moved or is
named by another path still matches), else by `pool` and `pool_index`: its row in the source's
train or test set, which stays the same whatever --val-fraction and the sample sizes cut. The
`label` column must still be the image's label: a list from another dataset, or one whose class
order changed, is refused rather than applied to the wrong images. The fixes apply to the source
before the splits are cut (a changed pool, like --classes), so a run and its resume see the same
images."""
import csv

import torch

from ..errors import UsageError, note
from .sources import keep_rows

ACTIONS = ("exclude", "relabel", "keep")
NEEDED = ("action", "label", "suggested", "file", "pool", "pool_index")


def apply_fix_list(src, path):
    """The Source with the list's exclude rows dropped and its relabel rows relabelled."""
    labels = {"train": src.train_y.clone(), "test": None if src.test_y is None else src.test_y.clone()}
    dropped = {pool: torch.zeros(len(y), dtype=torch.bool) for pool, y in labels.items() if y is not None}
    where = {rel: (pool, i) for pool, rows in src.ids.items() for i, (rel, _) in enumerate(rows)}   # folder sources
    for line, r in read_rows(path):
        pool, i = locate(r, where, labels, f"{path} line {line}")
        given = src.classes[int((src.train_y if pool == "train" else src.test_y)[i])]
        if r["label"] != given:
            raise UsageError(f"{path} line {line}: {pool} image {i} is labelled '{given}' in this data, the list says "
                             f"'{r['label']}': a fix list from other data? (to relabel, set action to relabel "
                             f"and the class in `suggested`)")
        if r["action"] == "exclude":
            dropped[pool][i] = True
        elif r["action"] == "relabel":
            labels[pool][i] = class_index(r["suggested"], src.classes, f"{path} line {line}")
    relabelled = sum(int(((labels[pool] != old) & ~dropped[pool]).sum())   # an excluded image counts once
                     for pool, old in (("train", src.train_y), ("test", src.test_y)) if old is not None)
    note(f"note: fix list {path}: {sum(int(d.sum()) for d in dropped.values())} image(s) left out and {relabelled} "
         f"relabelled, of {sum(len(d) for d in dropped.values())}.")
    return keep_rows(src, {pool: ~d for pool, d in dropped.items()}, labels, why="with a fix list")


def read_rows(path):
    """(line number, row) of each CSV row, the columns and actions checked."""
    try:
        with open(path, newline="", encoding="utf-8") as f:
            rows = list(csv.DictReader(f))
            columns = rows[0].keys() if rows else []
    except OSError as e:
        raise UsageError(f"--fix-list {path}: cannot read it ({e.strerror}); write one with "
                         f"`cnnlab audit DATA --fix-list {path}`.") from None
    missing = [c for c in NEEDED if rows and c not in columns]
    if missing:
        raise UsageError(f"--fix-list {path}: no column {', '.join(missing)}: not a list from `cnnlab audit "
                         f"--fix-list` (make a new one).")
    for line, r in enumerate(rows, start=2):
        if r["action"] not in ACTIONS:
            raise UsageError(f"{path} line {line}: action '{r['action']}'; use one of {', '.join(ACTIONS)}.")
    return list(enumerate(rows, start=2))


def locate(r, where, labels, place):
    """(pool, row) of a CSV row's image: by file for folder sources (the longest end of its path that
    is a path inside the dataset folder, so the folder may be named otherwise or have moved), else
    by pool and pool_index."""
    if r["file"] and where:
        parts = r["file"].replace("\\", "/").split("/")
        found = next((where[key] for key in ("/".join(parts[-k:]) for k in range(len(parts), 0, -1)) if key in where),
                     None)
        if found is None:
            raise UsageError(f"{place}: {r['file']} is not in this data.")
        return found
    pool, index = r["pool"], r["pool_index"]
    if labels.get(pool) is None or not index.isdigit() or int(index) >= len(labels[pool]):
        raise UsageError(f"{place}: no image {pool or '?'}[{index or '?'}] in this data (pool train or test, "
                         f"pool_index a row of it).")
    return pool, int(index)


def class_index(name, classes, place):
    if name not in classes:
        raise UsageError(f"{place}: relabel to '{name}', not a class of this data ({', '.join(classes)}).")
    return classes.index(name)


