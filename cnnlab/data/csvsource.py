"""`csv:FILE`: images listed in a labels file, with columns `path,label` and an optional `split`
(train, val or test; empty: cnnlab decides). Paths are relative to the CSV's folder (absolute ones
are kept). Rows marked test are the official test split, rows marked val the validation split;
the rest are cut as for any source. Decoded like a folder (folder.decode_files: in parallel, into
the disk cache); unreadable images follow --on-bad-image as there.

Every bad row is found in one pass and reported in one line with its line number:
"labels.csv line 17: no such file 'cats/17.jpg'", then the first few and a count when there are more.
"""
import csv
import dataclasses
import os

import torch

from ..config import DataConfig
from ..errors import CnnlabError, UsageError, note, printable
from .cache import file_stamps
from .folder import decode_files, drop_unlearnable, file_ids, image_format, warn_skipped
from .photos import file_policy, stored_size
from .images import IMAGE_SUFFIXES
from .registry import Source, register_dataset
from .splits import FORMAT, cut, file_table, take

COLUMNS = ("path", "label")
SPLIT_VALUES = ("train", "val", "test", "")
SHOWN = 3   # bad rows named in the message; the rest are counted


def is_csv_file(path):
    return os.path.isfile(path) and path.lower().endswith(".csv")


@register_dataset("csv", arg="FILE", claims=is_csv_file, shape="--image-size", classes="labels",
                  sizes="from file", description="a CSV of path,label[,split] rows (paths relative to it)")
def csv_labels(path, cfg):
    """The images a labels file lists (cfg: a DataConfig: image_size, on_bad_image, cache_dir)."""
    rows = read_rows(path)
    classes = class_names(label for _, _, label, _ in rows)
    pools = {pool: [r for r in rows if (r[3] == "test") == (pool == "test")] for pool in ("train", "test")}
    if not pools["train"]:
        raise CnnlabError(f"{printable(path)}: every row is in the test split; mark some train (or leave split empty).")
    all_files = [r[1] for r in rows]
    stamps = file_stamps(all_files)   # one stat per file, for the format key, the pool keys and the ids
    channels, size, typical = image_format(all_files, cfg.image_size, path, cfg.cache_dir, stamps)
    policy = file_policy(cfg.resize, size, typical)   # photos: stored at ~1.15x the input side (photos.py)
    stored = stored_size(policy, size, cfg.resize_size)
    src = Source(None, None, classes=classes, resize=policy, input_size=size)
    bad = []
    for pool, members in pools.items():
        if not members:
            continue
        x, y, kept, bad_here, entry = decode_files([r[1] for r in members], [classes.index(r[2]) for r in members],
                                                   channels, stored, cfg, f" listed in {printable(path)}", policy,
                                                   stamps)
        setattr(src, f"{pool}_x", x)
        setattr(src, f"{pool}_y", y)
        src.files[pool], src.cache[pool], bad = kept, entry, bad + bad_here
    named_val = {r[1] for r in pools["train"] if r[3] == "val"}
    if named_val:
        src.val_rows = [i for i, f in enumerate(src.files["train"]) if f in named_val]
    warn_skipped(bad, [])
    src.files["bad"] = bad
    src.ids = {pool: file_ids(src.files[pool], os.path.dirname(os.path.abspath(path)), stamps)
               for pool in ("train", "test") if pool in src.files}
    return drop_unlearnable(src, path)


def read_rows(path):
    """[(line number, absolute file path, label, split)] of every row; all bad rows in one error."""
    folder = os.path.dirname(os.path.abspath(path))
    name = os.path.basename(path)
    try:
        with open(path, encoding="utf-8-sig", newline="") as f:   # -sig: a spreadsheet's byte-order mark
            lines = list(csv.reader(f))
    except FileNotFoundError:
        raise UsageError(f"labels file not found: {printable(path)}") from None
    except UnicodeDecodeError:
        raise CnnlabError(f"{printable(path)} is not UTF-8 text; save it as UTF-8 CSV.") from None
    except (OSError, csv.Error) as e:
        raise CnnlabError(f"cannot read {printable(path)}: {printable(e)}.") from None
    columns = header_columns(lines, path)
    rows, bad, seen = [], [], {}
    for number, line in enumerate(lines[1:], start=2):
        if not any(cell.strip() for cell in line):
            continue   # blank lines are allowed
        row, problem = parse_row(line, columns, folder, seen)
        if problem:
            bad.append(f"line {number}: {problem}")
        else:
            seen[row[0]] = number
            rows.append((number, *row))
    if bad:
        more = f" (and {len(bad) - SHOWN} more bad rows)" if len(bad) > SHOWN else ""
        raise CnnlabError(f"{printable(name)} " + "; ".join(bad[:SHOWN]) + more + ". Fix or remove these rows.")
    if not rows:
        raise CnnlabError(f"{printable(path)} lists no images (a header and no rows).")
    return rows


def header_columns(lines, path):
    """{column: position} from the header line, which must name path and label."""
    header = [cell.strip().lower() for cell in lines[0]] if lines else []
    missing = [c for c in COLUMNS if c not in header]
    if missing:
        found = ", ".join(printable(h) for h in header) or "nothing"
        raise CnnlabError(f"{printable(path)} line 1: the header must name the columns path,label (and optionally "
                          f"split); it has {found}.")
    return {c: header.index(c) for c in COLUMNS + ("split",) if c in header}


def parse_row(line, columns, folder, seen):
    """((absolute path, label, split), None) or (None, what is wrong with the row)."""
    if len(line) <= max(columns.values()):
        return None, f"{len(line)} column(s), the header has {max(columns.values()) + 1}"
    cell = lambda c: line[columns[c]].strip() if c in columns else ""
    given, label, split = cell("path"), cell("label"), cell("split").lower()
    if not given:
        return None, "no path"
    if not label:
        return None, f"no label for '{printable(given)}'"
    if split not in SPLIT_VALUES:
        return None, f"split '{printable(split)}' is not train, val or test"
    full = os.path.normpath(os.path.join(folder, given))
    if full in seen:
        return None, f"'{printable(given)}' is listed again (first on line {seen[full]})"
    if not os.path.isfile(full):
        return None, f"no such file '{printable(given)}'"
    if not full.lower().endswith(IMAGE_SUFFIXES):
        return None, f"'{printable(given)}' is not an image file cnnlab reads ({', '.join(IMAGE_SUFFIXES)})"
    return (full, label, split), None


def class_names(labels):
    """The labels, sorted: as numbers when every label is one (2 before 10), else as text."""
    names = set(labels)
    numeric = all(n.lstrip("-").isdigit() for n in names)
    return sorted(names, key=(lambda n: int(n)) if numeric else None)


def named_val_splits(src, cfg):
    """The splits of a source that names its validation rows (src.val_rows): those rows are the
    validation split (capped by --val-samples); train, and test when there is no official test
    pool, are cut from the other rows as usual."""
    if cfg.split_ranges:
        raise UsageError("--split-ranges and the data's named validation images (a labels file's val rows, a val/ "
                         "folder) both choose the validation split; drop one.")
    if cfg.val_fraction != DataConfig.val_fraction:   # given, and nothing to cut: said, not passed over
        note(f"note: --val-fraction {cfg.val_fraction:g} is unused: the data names its validation images (a val/ "
             "folder or a labels file's val rows); --val-samples caps them.")
    val = torch.as_tensor(src.val_rows, dtype=torch.int64)
    rest = torch.ones(len(src.train_y), dtype=torch.bool)
    rest[val] = False
    rest = rest.nonzero().flatten()
    rows = cut(src.train_y[rest], src.test_y, dataclasses.replace(cfg, val_fraction=0.0, val_samples=0))
    if cfg.val_samples and cfg.val_samples < len(val):
        val = val[take(src.train_y[val], cfg.val_samples, cfg.seed + 3)[0]]
    test = torch.as_tensor(rows["test"], dtype=torch.int64)
    record = {"format": FORMAT, "test_pool": rows["test_pool"], "classes": list(src.classes),
              "train": rest[torch.as_tensor(rows["train"], dtype=torch.int64)].tolist(), "val": val.tolist(),
              "test": (rest[test] if rows["test_pool"] == "train" else test).tolist()}
    record["files"] = file_table(src.ids, record)
    return record
