"""`cnnlab audit DATA`: is the data clean? Four checks over every split of a dataset, pooled:

- label issues: out-of-sample probabilities from k-fold cross-training of a fast recipe (each
  image scored by a model that never saw it), ranked by cleanlab's find_label_issues (confident
  learning, Northcutt et al. 2021);
- duplicates and leaks: imagehash's perceptual hash (pHash) proposes pairs, a pixel check
  confirms them; a pair across train/val/test is a leak that inflates test accuracy;
- outliers: images far from every class centre in the penultimate-layer embedding of the same
  fold models (each image embedded by the model that never saw it);
- odd images: nearly blank, very dark, very small files;
- imbalance: counts per class and the inverse-frequency class weights.

The page is audit_page.py; the command prints summary_lines()."""
import csv
import json
import os

import numpy as np
import torch

from ..atomic import atomic_path, write_text
from ..config import make_config
from ..data import load_data
from ..data.loader import BatchLoader
from ..errors import CnnlabError, UsageError, note
from ..models import create_model
from ..runtime import Context
from ..training.engine import evaluate, make_step
from ..training.optim import build_optimizer, lr_factor

SPLITS = ("train", "val", "test")
# mnist_fast's former recipe (digits_fast at batch 128, lr 0.2), shortened: a good model is not
# needed, only one that ranks a wrong label below the right one. resnet_small at width 16 for colour
# images.
FAST_RECIPE = {"optimizer": "sgd", "momentum": 0.9, "nesterov": True, "lr": 0.2, "weight_decay": 5e-4,
               "batch_size": 128, "schedule": "onecycle", "label_smoothing": 0.1}
FAST_MODEL = {1: ("digits_fast", {}, "none"), 3: ("resnet_small", {"width": 16}, "crop+flip")}
PHASH_CANDIDATE = 8    # of 64 bits, at the best one-pixel shift: re-encoded JPEG and resized copies of
                       # CIFAR images measured <= 4

PIXEL_MATCH = 0.3      # mean |difference| (2x2-pooled, best of 9 one-pixel shifts) over the pair's own mean
                       # |pixel - image mean|: re-encoded JPEG, resized or shifted CIFAR copies measured <= 0.19,
                       # distinct CIFAR images >= 0.53 (relative, so dark-background digits are judged alike)
# ... and no more than 1% of the pooled pixels off by over 32 levels: digits on black are alike on
# average (distinct 1s measured 0.07 above; the mean alone paired 18,655 of 2,000 mnist-5k digits), a
# changed stroke is not. JPEG, resized and shifted copies of 20 mnist-5k and 20 CIFAR images measured
# <= 0.5%; distinct pHash-close digits >= 1.5% (3 of 196 pooled pixels), CIFAR images >= 57%
OFF_LEVELS, OFF_SHARE = 32, 0.01
BLANK_STD, DARK_MAX, TINY_SIDE = 3.0, 40, 16
# an outlier's distance to the nearest class centre (centre_distances) in the fold models' penultimate
# embedding: 20 noise images planted among 4,125 mnist-5k images (2 folds of 3 epochs, out-of-fold
# accuracy 96%) measured 2.53 and more (median 2.72), the real images at most 2.16 (99.9% under 2.01); 3 noise
# images among 2,407 digits of a folder (4 folds of 3 epochs) 2.3-2.56, the real ones 99.9% under 2.09
OUTLIER_DISTANCE = 2.2


def need(module):
    """The optional package behind a check, or one line saying how to install it."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError:
        raise CnnlabError(f"cnnlab audit needs {module.split('.')[0]}: pip install 'cnnlab[explain]'") from None


def pooled(data):
    """Every image of every split: x (N, C, H, W) uint8, y (N,), and per row its split and index."""
    parts = [(s, *getattr(data, s)) for s in SPLITS if len(getattr(data, s)[1])]
    x = torch.cat([p[1] for p in parts])
    y = torch.cat([p[2] for p in parts])
    where = [(s, i) for s, _, ys in parts for i in range(len(ys))]
    return x, y, where


def source_row(data, split, index):
    """(pool, row): where a row of a split sits in its source, 'train' or 'test' pool (what --fix-list
    files name, since a split's own indices change with --val-fraction and the sample sizes)."""
    pool = "test" if split == "test" and data.splits.get("test_pool") == "test" else "train"
    return pool, int(data.splits[split][index])


def file_of(data, split, index):
    """The file behind a row of a folder dataset's split ('' for other sources)."""
    pool, row = source_row(data, split, index)
    files = data.files.get(pool)
    return str(files[row]) if files else ""


# --- label issues -------------------------------------------------------------------------------

def fast_config(channels, epochs, model=None, seed=0):
    name, args, augment = FAST_MODEL[channels] if model is None else (model, {}, "none")
    return make_config({**FAST_RECIPE, "model": name, "model_args": args, "augment": augment, "epochs": epochs,
                        "seed": seed})


def train_fold(cfg, x, y, num_classes, preprocess, ctx):
    """A model of `cfg`'s recipe trained on (x, y) alone."""
    torch.manual_seed(cfg.seed)
    model = create_model(cfg.model, tuple(x.shape[1:]), num_classes, **cfg.model_args).to(ctx.device)
    optimizer = build_optimizer(cfg, model)
    step = make_step(model, optimizer, cfg, ctx)
    loader = BatchLoader(x, y, cfg.batch_size, preprocess, ctx.device, shuffle=True, seed=cfg.seed,
                         augment=cfg.augment, padding=cfg.crop_padding, padding_mode=cfg.crop_padding_mode)
    for epoch in range(cfg.epochs):
        for i, (xb, yb) in enumerate(loader.batches(epoch)):
            step(xb, yb, cfg.lr * lr_factor(cfg, epoch * len(loader) + i, len(loader)))
    return model


def out_of_fold_probs(x, y, num_classes, preprocess, cfg, folds=4, device="cpu", log=print):
    """(N, K) probabilities, each row from the fold model that did not train on it (stratified
    folds), and (N,) outlier scores from the same models (centre_distances)."""
    StratifiedKFold = need("sklearn.model_selection").StratifiedKFold
    ctx = Context(device=torch.device(device))
    probs, scores = torch.zeros(len(y), num_classes), torch.zeros(len(y))
    split = StratifiedKFold(folds, shuffle=True, random_state=cfg.seed).split(np.zeros(len(y)), y.numpy())
    for k, (fit_idx, held_idx) in enumerate(split):
        log(f"label check: fold {k + 1}/{folds}: training {cfg.model} on {len(fit_idx)} images, "
            f"scoring {len(held_idx)}")
        model = train_fold(cfg, x[fit_idx], y[fit_idx], num_classes, preprocess, ctx)
        held = BatchLoader(x[held_idx], y[held_idx], 256, preprocess, ctx.device)
        probs[held_idx] = evaluate(model, held, ctx, num_classes, collect=True)["probs"]
        scores[held_idx] = centre_distances(features(model, x[fit_idx], preprocess, ctx), y[fit_idx],
                                            features(model, x[held_idx], preprocess, ctx), num_classes)
    return probs, scores


def label_issues(y, probs):
    """Row indices of suspect labels, most suspect first (cleanlab's find_label_issues)."""
    find_label_issues = need("cleanlab.filter").find_label_issues
    return [int(i) for i in find_label_issues(y.numpy(), probs.numpy(), return_indices_ranked_by="self_confidence")]


# --- outliers in embedding space ----------------------------------------------------------------

def features(model, x, preprocess, ctx):
    """(N, D) embeddings of uint8 images: the input of the model's last Linear layer (its
    classifier), i.e. the penultimate layer; the logits for a model without a Linear."""
    head = next((m for m in reversed(list(model.modules())) if isinstance(m, torch.nn.Linear)), None)
    seen = []
    keep = lambda module, args: seen.append(args[0].flatten(1).float().cpu())
    hook = head.register_forward_pre_hook(keep) if head else None
    was_training = model.training
    model.eval()
    with torch.inference_mode():
        for xb, _ in BatchLoader(x, torch.zeros(len(x), dtype=torch.int64), 256, preprocess, ctx.device).batches():
            with ctx.autocast():
                out = model(xb)
            if head is None:
                seen.append(out.flatten(1).float().cpu())
    if hook:
        hook.remove()
    model.train(was_training)
    return torch.cat(seen)


def centre_distances(fit, fit_y, held, num_classes):
    """Each held embedding's distance to the nearest class centre of the fold's training embeddings
    `fit`, every dimension scaled by the class's own spread along it (a diagonal Mahalanobis
    distance, root mean square over dimensions), in units of the median such distance of the
    training images to their own centre: ~1 for a typical image, large for one unlike every class.
    (Plain Euclidean distances separated 3 noise images among 2,407 digits less well: 2.0-2.4
    against a real maximum of 3.9 and 99.9% under 2.06; these gave 2.3-2.6 against 2.09.)"""
    present = torch.tensor([k for k in range(num_classes) if (fit_y == k).any()])
    centres = torch.stack([fit[fit_y == k].mean(0) for k in present.tolist()])                        # (K', D)
    inv_var = 1 / torch.stack([fit[fit_y == k].var(0, unbiased=False) for k in present.tolist()]).clamp_min(1e-6)
    # sum_d (e_d - c_d)^2 / v_d expanded into matmuls: no (N, K', D) intermediate on large splits
    square = (held ** 2) @ inv_var.T - 2 * held @ (centres * inv_var).T + (centres ** 2 * inv_var).sum(1)
    own_class = torch.searchsorted(present, fit_y)
    own = ((fit - centres[own_class]) ** 2 * inv_var[own_class]).mean(1).sqrt()
    return (square.clamp_min(0) / fit.shape[1]).sqrt().min(1).values / own.median().clamp_min(1e-6)


def outliers(scores, limit=OUTLIER_DISTANCE):
    """Rows whose score (centre_distances) exceeds `limit`, farthest first."""
    order = torch.argsort(scores, descending=True)
    return [int(i) for i in order if scores[i] > limit]


# --- duplicates and leaks -----------------------------------------------------------------------

SHIFTS = [(dy, dx) for dy in (-1, 0, 1) for dx in (-1, 0, 1)]


def shifted(a, dy, dx):
    """An (H, W, C) image moved by one pixel (edge rows repeated): a copy cropped one pixel off."""
    h, w = a.shape[:2]
    rows = np.clip(np.arange(h) - dy, 0, h - 1)
    cols = np.clip(np.arange(w) - dx, 0, w - 1)
    return a[rows][:, cols]


def phashes(x):
    """(9, N, 64) 0/1 float pHash bits (imagehash) of uint8 images moved by each one-pixel shift
    (SHIFTS; index 4 unmoved): pHash alone moves up to 16 of 64 bits when a 32 px image shifts by
    one pixel, so pairs are compared at their best shift and the threshold can stay tight."""
    from PIL import Image

    imagehash = need("imagehash")
    hwc = x.permute(0, 2, 3, 1).numpy()
    picture = lambda a: Image.fromarray(a[..., 0] if a.shape[2] == 1 else a)
    return np.array([[imagehash.phash(picture(shifted(a, dy, dx))).hash.flatten() for a in hwc]
                     for dy, dx in SHIFTS], dtype=np.float32)


def hash_candidates(bits, limit=PHASH_CANDIDATE, chunk=1024):
    """Pairs (i < j) whose pHash differ in at most `limit` bits at the best shift of i: Hamming
    distances as matmuls."""
    base = bits[4]
    pairs = []
    for start in range(0, base.shape[0], chunk):
        dist = np.min([bits.shape[2] - (a @ base.T + (1 - a) @ (1 - base).T)
                       for a in bits[:, start:start + chunk]], axis=0)              # (chunk, N)
        dist = np.minimum(dist, dist_t(bits, base, start, chunk))
        i, j = np.nonzero(dist <= limit)
        keep = start + i < j
        pairs += list(zip((start + i)[keep].tolist(), j[keep].tolist()))
    return np.array(pairs, dtype=np.int64).reshape(-1, 2)


def dist_t(bits, base, start, chunk):
    """The other direction: the chunk's unmoved hashes against every image's shifted ones."""
    a = base[start:start + chunk]
    return np.min([bits.shape[2] - (a @ s.T + (1 - a) @ (1 - s).T) for s in bits], axis=0)


def pixel_distances(gray, pairs, chunk=4096):
    """Per pair (i, j) of (N, H, W) gray images, at the best of the nine one-pixel shifts (the
    smallest mean difference): mean |a - b| after 2x2 pooling (re-encoding noise averages out),
    and the fraction of pooled pixels that differ by more than OFF_LEVELS."""
    n, h, w = gray.shape
    best = np.full(len(pairs), np.inf, dtype=np.float32)
    off = np.zeros(len(pairs), dtype=np.float32)
    for start in range(0, len(pairs), chunk):
        i, j = pairs[start:start + chunk].T
        part = slice(start, start + len(i))
        for dy, dx in SHIFTS:
            d = (gray[i, max(dy, 0):h + min(dy, 0), max(dx, 0):w + min(dx, 0)]
                 - gray[j, max(-dy, 0):h + min(-dy, 0), max(-dx, 0):w + min(-dx, 0)])
            hh, ww = d.shape[1] // 2 * 2, d.shape[2] // 2 * 2
            pooled_d = np.abs(d[:, :hh, :ww].reshape(len(i), hh // 2, 2, ww // 2, 2).mean((2, 4)))
            mean, fraction = pooled_d.mean((1, 2)), (pooled_d > OFF_LEVELS).mean((1, 2))
            better = mean < best[part]
            best[part] = np.where(better, mean, best[part])
            off[part] = np.where(better, fraction, off[part])
    return best, off


def spreads(gray):
    """Per (H, W) gray image: mean |pixel - image mean| after 2x2 pooling (its contrast)."""
    n, h, w = gray.shape
    pooled_gray = gray[:, :h // 2 * 2, :w // 2 * 2].reshape(n, h // 2, 2, w // 2, 2).mean((2, 4))
    return np.abs(pooled_gray - pooled_gray.mean((1, 2), keepdims=True)).mean((1, 2))


def duplicate_pairs(x):
    """[(i, j, 'exact'|'near')]: identical pixels, or pHash-close and confirmed by pixel_distances:
    a small mean difference relative to the pair's contrast, and hardly a pixel far off."""
    pairs = hash_candidates(phashes(x))
    if not len(pairs):
        return []
    flat = x.flatten(1)
    exact = (flat[pairs[:, 0]] == flat[pairs[:, 1]]).all(1).numpy()
    gray = x.float().mean(1).numpy()
    contrast = spreads(gray)
    scale = np.maximum(1e-6, (contrast[pairs[:, 0]] + contrast[pairs[:, 1]]) / 2)
    mean, off = pixel_distances(gray, pairs)
    near = (mean / scale <= PIXEL_MATCH) & (off <= OFF_SHARE)
    return [(int(i), int(j), "exact" if e else "near") for (i, j), e, m in zip(pairs, exact, near) if e or m]


# --- odd images and imbalance -------------------------------------------------------------------

def odd_images(x, sizes=None):
    """{row: reason} for nearly blank (pixel std < 3), very dark (no pixel above 40) and tiny
    (a side under 16 px in its file) images."""
    flat = x.flatten(1).float()
    odd = {}
    for i in torch.nonzero(flat.std(1) < BLANK_STD).flatten().tolist():
        odd[i] = "nearly blank"
    for i in torch.nonzero(flat.amax(1) < DARK_MAX).flatten().tolist():
        odd.setdefault(i, "very dark")
    for i, size in enumerate(sizes or []):
        if size and min(size) < TINY_SIDE:
            odd.setdefault(i, f"tiny ({size[0]}x{size[1]} px)")
    return odd


def file_sizes(files):
    """(width, height) of each file from its header (no decoding); None for a row without a file."""
    from PIL import Image

    def size(path):
        try:
            with Image.open(path) as img:
                return img.size
        except (OSError, ValueError):
            return None
    return [size(f) if f else None for f in files]


def imbalance(data):
    """Counts per class and split, and inverse-frequency weights N / (K * count) of the train split."""
    counts = {s: torch.bincount(getattr(data, s)[1], minlength=len(data.classes)).tolist() for s in SPLITS}
    train, k = counts["train"], len(data.classes)
    weights = [round(sum(train) / (k * c), 3) if c else None for c in train]
    return {"classes": data.classes, "counts": counts, "class_weights": weights,
            "ratio": round(max(train) / max(1, min(train)), 2)}


# --- the audit ----------------------------------------------------------------------------------

def audit(data, data_dir="data", out=None, folds=4, epochs=3, model=None, seed=0, device="cpu", labels=True,
          fix_list=None, quiet=False, limit=0):
    """Audit a dataset (a --data name, or a loaded data.Data): writes audit.json and audit.html into
    `out` (default audits/<name>), `fix_list` a CSV of every finding; returns the findings as a dict.
    `limit`: audit a seeded sample of at most this many images of each split (0: all)."""
    from .audit_page import write_page

    if folds < 2:
        raise UsageError(f"--folds {folds}: k-fold cross-training needs at least 2 folds.")
    log = (lambda *a: None) if quiet else note   # progress on stderr: stdout is the summary alone
    sizes = {f"{s}_samples": limit for s in SPLITS}
    loaded = (load_data(make_config({"data": data, "data_dir": data_dir, **sizes}).data_config())
              if isinstance(data, str) else data)
    data = loaded.name
    x, y, where = pooled(loaded)
    files = [file_of(loaded, s, i) for s, i in where]
    row = lambda i: {"split": where[i][0], "index": where[i][1], "file": files[i], "label": loaded.classes[int(y[i])],
                     **dict(zip(("pool", "pool_index"), source_row(loaded, *where[i])))}
    report = {"data": data, "images": len(y), "classes": loaded.classes, "imbalance": imbalance(loaded)}
    if labels:
        cfg = fast_config(x.shape[1], epochs, model, seed)
        probs, scores = out_of_fold_probs(x, y, len(loaded.classes), loaded.preprocess, cfg, folds, device, log)
        report["label_recipe"] = {"model": cfg.model, "epochs": epochs, "folds": folds,
                                  "out_of_fold_accuracy": float((probs.argmax(1) == y).float().mean())}
        report["label_issues"] = [{**row(i), "suggested": loaded.classes[int(probs[i].argmax())],
                                   "given_probability": round(float(probs[i, y[i]]), 4),
                                   "suggested_probability": round(float(probs[i].max()), 4), "row": i}
                                  for i in label_issues(y, probs)]
        report["outliers"] = [{**row(i), "distance": round(float(scores[i]), 2), "row": i} for i in outliers(scores)]
    pairs = duplicate_pairs(x)
    report["duplicates"] = [{"kind": kind, "leak": where[i][0] != where[j][0], "a": {**row(i), "row": i},
                             "b": {**row(j), "row": j}} for i, j, kind in pairs]
    odd = odd_images(x, file_sizes(files) if any(files) else None)
    report["odd_images"] = [{**row(i), "reason": reason, "row": i} for i, reason in sorted(odd.items())]
    out = out or os.path.join("audits", data.replace(":", "_").replace(os.sep, "_"))
    os.makedirs(out, exist_ok=True)
    write_text(os.path.join(out, "audit.json"), json.dumps(report, indent=2))
    write_page(os.path.join(out, "audit.html"), report, x)
    if fix_list:
        write_fix_list(fix_list, report)
    report["out"] = out
    return report


FIX_COLUMNS = ("action", "issue", "split", "index", "file", "label", "suggested", "detail", "pool", "pool_index")


def fix_rows(report):
    """One CSV row per finding; `action` is what a user edits: exclude (the default for suspects
    and the second image of a duplicate pair), relabel, or keep."""
    for r in report.get("label_issues", []):
        yield {"action": "exclude", "issue": "label", **pick(r), "suggested": r["suggested"],
               "detail": f"given {r['given_probability']:.0%}, suggested {r['suggested_probability']:.0%}"}
    for d in report["duplicates"]:
        yield {"action": "exclude", "issue": "leak" if d["leak"] else f"{d['kind']} duplicate", **pick(d["b"]),
               "detail": f"same as {d['a']['split']}[{d['a']['index']}] {d['a']['file']}".strip()}
    for r in report.get("outliers", []):
        yield {"action": "keep", "issue": "outlier", **pick(r),
               "detail": f"{r['distance']}x a typical distance to a class"}
    for r in report["odd_images"]:
        yield {"action": "keep", "issue": "odd", **pick(r), "detail": r["reason"]}


def pick(r):
    return {k: r[k] for k in ("split", "index", "file", "label", "pool", "pool_index")}


def write_fix_list(path, report):
    with atomic_path(path) as tmp, open(tmp, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, FIX_COLUMNS, restval="")
        writer.writeheader()
        writer.writerows(fix_rows(report))
    return path


def weak_folds(report):
    """The warning, for the terminal and the page, when the fold models are too weak for their
    suspects to mean much (out-of-fold accuracy under 3x chance, or 90%); None otherwise."""
    k, accuracy = len(report["classes"]), report["label_recipe"]["out_of_fold_accuracy"]
    if accuracy >= min(0.9, 3 / k):
        return None
    return (f"warning: the fold models are weak ({accuracy:.1%} out-of-fold accuracy, chance {1 / k:.1%}): "
            "the suspects mean little; try more --epochs or more images")


def summary_lines(report):
    """What the terminal shows."""
    imb = report["imbalance"]
    lines = [f"audited {report['data']}: {report['images']} images, {len(report['classes'])} classes"]
    if "label_issues" in report:
        rec = report["label_recipe"]
        lines.append(f"label issues: {len(report['label_issues'])} suspect labels ({rec['folds']}-fold {rec['model']}, "
                     f"out-of-fold accuracy {rec['out_of_fold_accuracy']:.1%})")
        warning = weak_folds(report)
        if warning:
            lines.append("  " + warning)
        for r in report["label_issues"][:5]:
            name = f" {r['file']}" if r["file"] else ""
            lines.append(f"  {r['split']}[{r['index']}]{name}: given {r['label']}, suggested {r['suggested']} "
                         f"({r['suggested_probability']:.0%})")
    if "outliers" in report:
        lines.append(f"outliers: {len(report['outliers'])} images far from every class in the fold models' embedding")
    leaks = sum(d["leak"] for d in report["duplicates"])
    lines.append(f"duplicates: {len(report['duplicates'])} pairs "
                 f"({sum(d['kind'] == 'exact' for d in report['duplicates'])} exact), {leaks} across splits (leaks)")
    lines.append(f"odd images: {len(report['odd_images'])}")
    lines.append(f"imbalance: largest / smallest train class = {imb['ratio']}; class weights "
                 f"{', '.join(f'{c}={w}' for c, w in zip(imb['classes'], imb['class_weights']))}")
    return lines
