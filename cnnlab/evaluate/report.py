"""`cnnlab evaluate`, `cnnlab report` and `cnnlab compare`: metrics, pictures and one
self-contained report.html, all computed from a run folder or checkpoint."""
import base64
import html
import json
import os
import platform

import torch

from . import plots
from ..config import make_config
from ..data import load_data
from ..data.loader import BatchLoader
from ..data.splits import stratified_order
from ..errors import CnnlabError, UsageError
from .metrics import summarize
from ..train.run_folder import read_json, read_metrics
from ..runtime import Context


def run_data(model, run_dir=None, data=None):
    """The data a checkpoint was trained on, with the run's saved split; or `data` (a --data name)."""
    cfg = make_config(model.config) if model.config else make_config({})
    splits = None
    if data:
        cfg = make_config({"data": data, "classes": [], "image_size": model.preprocess["image_size"]}, base=cfg)
    elif run_dir and os.path.exists(os.path.join(run_dir, "splits.json")):
        splits = read_json(os.path.join(run_dir, "splits.json"))
    loaded = load_data(cfg, splits=splits)
    if loaded.shape[0] != model.preprocess["channels"]:
        raise UsageError(f"data '{cfg.data}' has {loaded.shape[0]} channel(s); the model expects "
                         f"{model.preprocess['channels']}.")
    return loaded


def evaluate_model(model, data, split="test", collect=False):
    """Metrics of `model` on a split of `data`, normalised with the MODEL's statistics."""
    from ..train.engine import evaluate

    x, y = getattr(data, split)
    if len(y) == 0:
        raise UsageError(f"the {split} split is empty.")
    if data.classes != model.classes and len(data.classes) != len(model.classes):
        raise UsageError(f"data has {len(data.classes)} classes, the model {len(model.classes)}.")
    loader = BatchLoader(x, y, 256, model.preprocess["mean"], model.preprocess["std"], model.device, channels_last=True)
    ctx = Context(device=model.device)
    raw = evaluate(model.net, loader, ctx, len(model.classes), collect=collect)
    out = summarize(raw["cm"], model.classes, loss=raw["loss"], top5=raw["top5"])
    out["split"] = split
    if collect:
        out["_probs"], out["_losses"] = raw["probs"], raw["losses"]
    return out


def evaluate_path(path, data=None, split="test"):
    from ..deploy.inference import load

    model = load(path)
    run_dir = path if os.path.isdir(path) else os.path.dirname(path)
    return evaluate_model(model, run_data(model, run_dir, data), split)


def _embed(path):
    with open(path, "rb") as f:
        return "data:image/png;base64," + base64.b64encode(f.read()).decode()


def write_pictures(run_dir, model, data, metrics):
    history = read_metrics(run_dir)
    paths = {"curves": plots.save_curves(history, os.path.join(run_dir, "curves.png"))}
    paths["confusion"] = plots.save_confusion(metrics["confusion_matrix"], model.classes, os.path.join(run_dir, "confusion.png"))
    pick = stratified_order(data.train[1], seed=0)[:20]   # a mix of classes, not the first rows
    paths["samples"] = plots.save_samples(data.train[0][pick].numpy(), data.train[1][pick], model.classes,
                                          os.path.join(run_dir, "samples.png"))
    paths["mistakes"] = plots.save_mistakes(data.test[0].numpy(), data.test[1].numpy(), metrics["_probs"].numpy(),
                                            metrics["_losses"].numpy(), model.classes, os.path.join(run_dir, "mistakes.png"))
    paths["per_class"] = plots.save_per_class(metrics["per_class"], os.path.join(run_dir, "per_class.png"))
    return paths, history


def write_report(run_dir, data=None, quiet=False):
    """Every picture plus report.html for a run folder; returns the report's path."""
    from ..deploy.inference import load

    if not os.path.isdir(run_dir):
        raise UsageError(f"not a run folder: {run_dir}")
    model = load(run_dir)
    data = data or run_data(model, run_dir)
    metrics = evaluate_model(model, data, "test", collect=True)
    paths, history = write_pictures(run_dir, model, data, metrics)
    summary = read_json(os.path.join(run_dir, "summary.json")) if os.path.exists(os.path.join(run_dir, "summary.json")) else {}
    page = render_html(run_dir, summary, model, metrics, paths, history)
    out = os.path.join(run_dir, "report.html")
    with open(out, "w", encoding="utf-8") as f:
        f.write(page)
    if not quiet:
        print(f"wrote {out} and {', '.join(os.path.basename(p) for p in paths.values())}")
    return out


def _table(rows, header=None):
    """An HTML table; header None for a plain key/value list (no empty header row). Tables with a
    header hold numbers after their first column: those are right-aligned (class "num")."""
    head = "".join(f"<th>{html.escape(str(h))}</th>" for h in header or [])
    body = "".join("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in row) + "</tr>" for row in rows)
    start = f'<table class="num"><thead><tr>{head}</tr></thead>' if header else "<table>"
    return f"{start}<tbody>{body}</tbody></table>"


def fmt_percent(v):
    return f"{v:.1%}"


def fmt_loss(v):
    return f"{v:.4f}"


def fmt_seconds(v):
    return f"{v:,.1f} s"


def fmt_count(v):
    return f"{int(v):,}"


# summary.json key -> (label, format): numbers written for people (97.0%, 13.4 s, 2,690 img/s, 121,930)
SUMMARY_ROWS = {"model": ("model", str), "data": ("data", str), "num_params": ("parameters", fmt_count),
                "epochs": ("epochs", fmt_count), "best_val_acc": ("best validation accuracy", fmt_percent),
                "best_epoch": ("best epoch", fmt_count), "test_acc": ("test accuracy", fmt_percent),
                "test_top5_acc": ("test top-5 accuracy", fmt_percent), "test_loss": ("test loss", fmt_loss),
                "train_seconds": ("training time", fmt_seconds),
                "samples_per_second": ("throughput", lambda v: f"{v:,.0f} img/s"),
                "device": ("training device", str), "global_batch_size": ("batch size", fmt_count)}
# metrics.csv column -> format; columns not listed (from newer versions) are shown as written
HISTORY_COLUMNS = {"epoch": fmt_count, "train_loss": fmt_loss, "train_acc": fmt_percent, "val_loss": fmt_loss,
                   "val_acc": fmt_percent, "lr": lambda v: f"{v:.2e}", "seconds": fmt_seconds}


def summary_rows(summary):
    return [(label, fmt(summary[key])) for key, (label, fmt) in SUMMARY_ROWS.items() if summary.get(key) is not None]


def history_rows(history):
    return [[HISTORY_COLUMNS.get(k, str)(v) for k, v in row.items()] for row in history]


def per_class_rows(metrics):
    """One row per class, then the macro and weighted averages (as scikit-learn's report)."""
    rows = [(r["class"], *map(fmt_percent, (r["precision"], r["recall"], r["f1"])), fmt_count(r["support"]))
            for r in metrics["per_class"]]
    for name in ("macro_avg", "weighted_avg"):
        a = metrics[name]
        rows.append((name.replace("_", " "), *map(fmt_percent, (a["precision"], a["recall"], a["f1"])),
                     fmt_count(metrics["samples"])))
    return rows


def environment_rows(summary):
    """Software of this report, and the device the run trained on; a CUDA version only for a CUDA
    run (torch's build version says nothing about a CPU run)."""
    rows = [("python", platform.python_version()), ("torch", torch.__version__), ("platform", platform.platform())]
    device = summary.get("device")
    if device:
        world = summary.get("world_size") or 1
        rows.append(("training device", device + (f" x {world} processes" if world > 1 else "")))
        if device.startswith("cuda"):
            rows.append(("CUDA", torch.version.cuda or "unknown"))
    return rows


def render_html(run_dir, summary, model, metrics, paths, history):
    diag = summary.get("diagnostics") or ["No problems detected."]
    img = lambda key, alt: f'<figure><img src="{_embed(paths[key])}" alt="{alt}"><figcaption>{alt}</figcaption></figure>'
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>cnnlab report: {html.escape(os.path.basename(os.path.abspath(run_dir)))}</title>
<style>body{{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;color:#222}}
table{{border-collapse:collapse;margin:1em 0}}td,th{{border:1px solid #ccc;padding:3px 8px;text-align:left}}
.num td+td,.num th+th{{text-align:right;font-variant-numeric:tabular-nums}}
img{{max-width:100%}}pre{{background:#f6f6f6;padding:1em;overflow:auto}}figure{{margin:1em 0}}</style></head>
<body><h1>cnnlab report</h1><p>{html.escape(os.path.abspath(run_dir))}</p>
<h2>Summary</h2>{_table(summary_rows(summary))}
<h2>Diagnostics</h2><ul>{"".join(f"<li>{html.escape(d)}</li>" for d in diag)}</ul>
<h2>Training curves</h2>{img("curves", "loss and accuracy per epoch")}
<h2>Confusion matrix (test)</h2>{img("confusion", "confusion matrix")}
<h2>Per-class metrics (test)</h2>{_table(per_class_rows(metrics), ["class", "precision", "recall", "F1", "support"])}
{img("per_class", "per-class accuracy and F1")}
<h2>Mistakes</h2>{img("mistakes", "highest-loss test images")}
<h2>Training samples</h2>{img("samples", "training images with labels")}
<h2>History</h2>{_table(history_rows(history), [k.replace("_", " ") for k in history[0]] if history else None)}
<h2>Configuration</h2><pre>{html.escape(json.dumps(model.config, indent=2))}</pre>
<h2>Environment</h2>{_table(environment_rows(summary))}
</body></html>"""


COMPARE_HEADER = ("run", "model", "data", "params", "epochs", "best val", "test acc", "seconds")


def compare(run_dirs, out=None):
    """Rows of (run, model, data, params, epochs, best val, test acc, seconds) and the overlaid
    validation curves, written to `out` or else to compare.png in the runs' common parent folder
    (beside the runs, not wherever the command happens to run). Returns (rows, picture path)."""
    parent = os.path.commonpath([os.path.dirname(os.path.abspath(d)) for d in run_dirs])
    rows, histories = [], {}
    for d in run_dirs:
        path = os.path.join(d, "summary.json")
        if not os.path.exists(path):
            raise CnnlabError(f"{d} has no summary.json; is it a finished cnnlab run folder?")
        s = read_json(path)
        name = os.path.relpath(os.path.abspath(d), parent)   # unique even when two runs share a basename
        histories[name] = read_metrics(d)
        rows.append((name, s["model"], s["data"], s["num_params"], s["epochs"], s["best_val_acc"], s["test_acc"],
                     s["train_seconds"]))
    out = out or os.path.join(parent, "compare.png")
    try:
        plots.save_compare(histories, out)
    except OSError as e:
        raise CnnlabError(f"cannot write {out} ({e.strerror or e}); choose another place with --out.") from None
    return rows, out


def compare_table(rows):
    """The compare rows as text lines, every column as wide as its longest cell: names of any
    length stay aligned. Text left-aligned, numbers right-aligned."""
    cells = [COMPARE_HEADER] + [(*r[:3], fmt_count(r[3]), fmt_count(r[4]), f"{r[5]:.2%}", f"{r[6]:.2%}", f"{r[7]:.1f}")
                                for r in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(COMPARE_HEADER))]
    align = lambda i, text: text.ljust(widths[i]) if i < 3 else text.rjust(widths[i])
    return ["  ".join(align(i, text) for i, text in enumerate(row)).rstrip() for row in cells]
