"""Seeded, stratified train / val / test splits, and the record of them a run keeps (splits.json),
so that `evaluate`, `report` and `--resume` use the very same images again, or refuse in one line
when the data changed since training: never a silent mix of training images into the test split.

splits.json, format 2:
    format              2
    test_pool           "train" (cnnlab cut the test split from the training pool) or "test" (official)
    classes             the class names, in label order
    train, val, test    rows of the pools as they were at training time
    files               folder sources: {split: {path relative to the dataset folder: size in bytes}},
                        plus "unused" (the pools' files in no split, e.g. capped away), so that a new
                        file is told apart from one left out on purpose
    fingerprint         tensor sources (mnist, cifar, npz): {pool: {count, sha256}} of every label and
                        64 evenly spaced images of each pool (hashing ~0.2 MB catches a replaced file)
Format 1 (cnnlab before issue 23: rows only) is still read: its rows are used as saved, bounds
checked, with a note that a change of the data cannot be detected.
"""
import hashlib
import json
import os
from dataclasses import dataclass

import torch

from ..config import parse_split_ranges
from ..errors import CnnlabError, UsageError, note, printable

FORMAT = 2
SPLITS = ("train", "val", "test")


@dataclass
class SavedSplits:
    """A run's splits.json, as read_splits found it."""
    run: str        # the run folder, named in every message
    record: dict


def stratified_order(y, seed):
    """A seeded permutation of range(len(y)) whose every prefix holds each class in proportion.

    Each sample gets (its rank inside its class + 0.5) / class size after a seeded shuffle;
    sorting by that interleaves the classes evenly.
    """
    g = torch.Generator().manual_seed(int(seed))
    perm = torch.randperm(len(y), generator=g)
    ys = y[perm]
    frac = torch.empty(len(y), dtype=torch.float64)
    for c in torch.unique(ys):
        where = (ys == c).nonzero().flatten()
        frac[where] = (torch.arange(len(where), dtype=torch.float64) + 0.5) / len(where)
    return perm[torch.sort(frac, stable=True).indices]


def take(y, n, seed):
    """(taken, rest): a stratified sample of n indices and the remaining ones, each sorted."""
    order = stratified_order(y, seed)
    return torch.sort(order[:n]).values, torch.sort(order[n:]).values


# --- cutting new splits ------------------------------------------------------------------------

def make_splits(src, cfg):
    """The splits of a Source (after class selection), as splits.json records them."""
    rows = cut(src.train_y, src.test_y, cfg)
    if cfg.split_ranges and src.ids:
        note("note: --split-ranges counts images in the folder's order, which is sorted by class: a range may "
             "hold only some classes (the warnings below say so).")
    record = {"format": FORMAT, "test_pool": rows.pop("test_pool"), "classes": list(src.classes), **rows}
    if src.ids:
        record["files"] = file_table(src.ids, record)
    else:
        record["fingerprint"] = {pool: fingerprint(*pool_tensors(src, pool)) for pool in pools_used(record)}
    return record


def cut(train_y, test_y, cfg):
    """Row lists {'train', 'val', 'test'} and which pool the test rows point into."""
    if cfg.split_ranges:
        return cut_ranges(train_y, test_y, parse_split_ranges(cfg.split_ranges))
    seed = cfg.seed
    pool = torch.arange(len(train_y))
    if test_y is None:
        n_test = max(1, round(len(train_y) * cfg.test_fraction))
        test, pool = take(train_y, n_test, seed + 1)
        test_pool = "train"
    else:
        test, test_pool = torch.arange(len(test_y)), "test"
    n_val = round(len(pool) * cfg.val_fraction)
    if cfg.val_samples and not n_val:   # checked here, not in the config: a CSV's named val rows need no fraction
        raise UsageError(f"--val-samples {cfg.val_samples} caps the validation split, which --val-fraction "
                         f"{cfg.val_fraction:g} leaves empty: give a --val-fraction too (e.g. 0.1), or drop --val-samples.")
    val_rel, train_rel = take(train_y[pool], n_val, seed + 2)
    train, val = pool[train_rel], pool[val_rel]
    if not len(train):
        raise no_training_images(cfg, len(train_y), len(test) if test_pool == "train" else 0, len(val))
    splits = {"train": train, "val": val, "test": test}
    caps = {"train": cfg.train_samples, "val": cfg.val_samples, "test": cfg.test_samples}
    for name, cap in caps.items():
        idx = splits[name]
        if cap and cap < len(idx):
            labels = test_y[idx] if name == "test" and test_pool == "test" else train_y[idx]
            kept, _ = take(labels, cap, seed + 3)
            splits[name] = idx[kept]
    return {k: v.tolist() for k, v in splits.items()} | {"test_pool": test_pool}


def cut_ranges(train_y, test_y, ranges):
    """Index ranges in the pools' own order (seed 004: train 0-19,999 and val 20,000-24,999 of the
    training set, test 0-4,999 of the test set). Test rows come from the official test set when there
    is one, else from the training pool, where they must not overlap train or val."""
    test_pool = "train" if test_y is None else "test"
    sizes = {"train": len(train_y), "test": len(train_y) if test_y is None else len(test_y)}
    for split, (start, stop) in ranges.items():
        pool = "train" if split != "test" else test_pool
        if stop > sizes[pool]:
            raise UsageError(f"--split-ranges {split}={start}:{stop} goes past the {sizes[pool]} images of the "
                             f"{pool} pool: give a STOP of at most {sizes[pool]}.")
    taken = [ranges["train"], ranges["val"]] + ([ranges["test"]] if test_pool == "train" else [])
    for i, (a0, a1) in enumerate(taken):
        for b0, b1 in taken[i + 1:]:
            if a0 < b1 and b0 < a1:
                raise UsageError(f"--split-ranges {a0}:{a1} and {b0}:{b1} overlap in the training pool: an image "
                                 "would be in two splits.")
    rows = {split: list(range(*ranges[split])) for split in SPLITS}
    return rows | {"test_pool": test_pool}


def no_training_images(cfg, n, n_test, n_val):
    """The usage error for fractions that leave the training split empty (it would 'train' on nothing)."""
    test = f"{n_test} go to the test split (--test-fraction {cfg.test_fraction:g}) and " if n_test else ""
    smaller = "--val-fraction" + (" or --test-fraction" if n_test else "")
    return UsageError(f"--val-fraction {cfg.val_fraction:g} leaves no training images: of the {n} in the training "
                      f"pool, {test}{n_val} go to validation. Use a smaller {smaller}.")


def pools_used(record):
    return ("train", "test") if record["test_pool"] == "test" else ("train",)


def pool_of(split, record):
    return record["test_pool"] if split == "test" else "train"


def pool_tensors(src, pool):
    """(x, y) of a Source's pool; an absent test pool is empty."""
    if pool == "train":
        return src.train_x, src.train_y
    if src.test_y is None:
        return torch.zeros(0, dtype=torch.uint8), torch.zeros(0, dtype=torch.int64)
    return src.test_x, src.test_y


def file_table(ids, record):
    """{split: {relative path: size}} for each split's rows, and 'unused' for the pools' other files."""
    files = {split: dict(ids[pool_of(split, record)][row] for row in record[split]) for split in SPLITS}
    used = {path for split in SPLITS for path in files[split]}
    files["unused"] = {path: size for pool in pools_used(record) for path, size in ids.get(pool, [])
                       if path not in used}
    return files


def fingerprint(x, y):
    """{'count', 'sha256'} of a pool: every label, and the pixels of 64 evenly spaced images."""
    h = hashlib.sha256(y.to(torch.int64).numpy().tobytes())
    if len(x):
        sample = torch.linspace(0, len(x) - 1, min(64, len(x))).round().long()
        h.update(x[sample].contiguous().numpy().tobytes())
    return {"count": len(y), "sha256": h.hexdigest()[:24]}


# --- reading them back -------------------------------------------------------------------------

def read_splits(run_dir):
    """A run's splits.json, checked for shape; a missing or damaged file is one clear CnnlabError."""
    path = os.path.join(run_dir, "splits.json")
    try:
        with open(path, encoding="utf-8") as f:
            record = json.load(f)
    except FileNotFoundError:
        raise CnnlabError(f"{path} is missing, so which images run {run_dir} was trained and tested on is unknown. "
                          + how_to_go_on(run_dir, restore="splits.json from a copy")) from None
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise CnnlabError(f"{path} cannot be read ({printable(e)}). "
                          + how_to_go_on(run_dir, restore="splits.json from a copy")) from None
    problem = record_problem(record)
    if problem:
        raise CnnlabError(f"{path} is not a cnnlab split record: {problem}. "
                          + how_to_go_on(run_dir, restore="splits.json from a copy"))
    return SavedSplits(run_dir, record)


def how_to_go_on(run, data="DATA", restore="the data as it was"):
    """The fixes for a run whose split cannot be found again: the one-line error's second half."""
    return (f"Restore {restore}, train a new run, or evaluate on a fresh split with "
            f"`cnnlab evaluate {run} --data {data}` (its test images may then include training images).")


def record_problem(record):
    """What makes `record` unusable as splits.json, or None."""
    if not isinstance(record, dict):
        return "not a JSON object"
    fmt = record.get("format", 1)
    if fmt not in (1, FORMAT):
        return f"format {fmt!r} (this cnnlab reads 1 and {FORMAT}; a newer cnnlab wrote it?)"
    if record.get("test_pool") not in ("train", "test"):
        return "'test_pool' is neither 'train' nor 'test'"
    for split in SPLITS:
        rows = record.get(split)
        if not isinstance(rows, list) or not all(type(r) is int and r >= 0 for r in rows):
            return f"'{split}' is not a list of image numbers"
    if fmt == 1:
        return None
    if not isinstance(record.get("classes"), list):
        return "no 'classes' list"
    if "files" in record:
        return files_problem(record)
    if not isinstance(record.get("fingerprint"), dict):
        return "neither 'files' nor 'fingerprint'"
    return None


def files_problem(record):
    files = record["files"]
    for split in SPLITS + ("unused",):
        table = files.get(split) if isinstance(files, dict) else None
        if not isinstance(table, dict) or not all(type(size) is int for size in table.values()):
            return f"'files' has no {{path: size}} table for '{split}'"
        if split != "unused" and len(table) != len(record[split]):
            return f"'files' lists {len(table)} {split} files for {len(record[split])} rows"
    return None


def match_splits(saved, src, data):
    """The saved splits as rows of `src`'s pools (the same images, in the same order, wherever they
    are now), or one CnnlabError naming the run and what changed. `data`: the --data name."""
    record, run = saved.record, saved.run
    if record.get("format", 1) == 1:
        return {**record, **legacy_rows(record, src, run, data)}
    if record["classes"] != list(src.classes):
        raise data_changed(run, data, f"its classes were {', '.join(map(printable, record['classes']))}; "
                                      f"now {', '.join(map(printable, src.classes))}")
    if "files" in record:
        rows = file_rows(record, src, run, data)
    else:
        check_fingerprints(record, src, run, data)
        rows = {split: record[split] for split in SPLITS}
    return {**record, **rows}


def data_changed(run, data, what):
    return CnnlabError(f"run {run}: {data} changed since training ({what}). " + how_to_go_on(run, data))


def file_rows(record, src, run, data):
    """Each saved file's row in the current pools; a file gone or of another size refuses. Files
    that are new since training are in no split: a note says they are not used."""
    pools = {pool: {path: (row, size) for row, (path, size) in enumerate(src.ids.get(pool, []))}
             for pool in ("train", "test")}
    rows, gone = {}, {}
    for split in SPLITS:
        pool = pools[pool_of(split, record)]
        hits = {path: pool.get(path) for path in record["files"][split]}
        gone[split] = [path for path, hit in hits.items() if hit is None or hit[1] != record["files"][split][path]]
        rows[split] = [hit[0] for hit in hits.values() if hit is not None]
    known = set().union(*record["files"].values())
    new = [path for pool in pools.values() for path in pool if path not in known]
    if any(gone.values()):
        counts = " and ".join(f"{len(g)} file(s) of the {split} split" for split, g in gone.items() if g)
        first = next(g[0] for g in gone.values() if g)
        raise data_changed(run, data, f"{counts} gone or changed, e.g. '{printable(first)}'"
                                      + (f"; {len(new)} new file(s)" if new else ""))
    if new:
        note(f"note: {len(new)} file(s) of {data} are newer than run {run} (e.g. '{printable(new[0])}'); "
             "they are in none of its splits and not used. Train a new run to use them.")
    return rows


def check_fingerprints(record, src, run, data):
    for pool, saved in record["fingerprint"].items():
        now = fingerprint(*pool_tensors(src, pool))
        if now == saved:
            continue
        if now["count"] != saved.get("count"):
            raise data_changed(run, data, f"its {pool} pool held {saved.get('count')} images, now {now['count']}")
        raise data_changed(run, data, f"the labels or pixels of its {pool} pool differ, same {now['count']} images")


def legacy_rows(record, src, run, data):
    """Format 1: rows only. Used as saved when they fit the pools, with a note that a change of the
    data since training cannot be detected."""
    for split in SPLITS:
        pool = pool_of(split, record)
        size, rows = len(pool_tensors(src, pool)[1]), record[split]
        if rows and max(rows) >= size:
            raise data_changed(run, data, f"its {split} split names image {max(rows)} of a {pool} pool that now "
                                          f"holds {size}")
    note(f"note: {os.path.join(run, 'splits.json')} is from an older cnnlab (image numbers only): used as saved, "
         "but whether the data changed since training cannot be checked.")
    return {split: record[split] for split in SPLITS}
