"""`cnnlab report`: a run's pictures and one self-contained report.html, rendered from results
computed elsewhere (evaluation.py, or the training run's own test evaluation through
`ReportWriter`). Nothing here evaluates a model."""
import base64
import html
import json
import math
import os
import platform

import torch

from . import plots
from ..atomic import write_text
from ..data.splits import stratified_order
from ..training.callbacks import Callback
from ..training.run_folder import read_json, read_metrics
from .calibration import ece, reliability
from .results import metrics_of
from .explain import mistake_heatmaps


def _embed(path):
    with open(path, "rb") as f:
        return "data:image/png;base64," + base64.b64encode(f.read()).decode()


def write_pictures(run_dir, data, metrics, history, net=None):
    """curves, confusion, samples, mistakes, per_class and reliability .png; returns {name: path}.
    `metrics` is an evaluation of data.test with the per-sample results (`_probs`, `_losses`)
    collected; `net`: the network, to draw Grad-CAM heatmaps over the mistakes (captum installed)."""
    classes = [row["class"] for row in metrics["per_class"]]   # the model's names, in its order
    file = lambda name: os.path.join(run_dir, name + ".png")
    paths = {"curves": plots.save_curves(history, file("curves"))}
    paths["confusion"] = plots.save_confusion(metrics["confusion_matrix"], classes, file("confusion"))
    pick = stratified_order(data.train[1], seed=0)[:20]   # a mix of classes, not the first rows
    paths["samples"] = plots.save_samples(data.train[0][pick].numpy(), data.train[1][pick], classes, file("samples"))
    heat = None if net is None else mistake_heatmaps(net, data.preprocess, data.test[0], metrics["_probs"],
                                                     plots.top_losses(metrics["_losses"]))
    paths["mistakes"] = plots.save_mistakes(data.test[0].numpy(), data.test[1].numpy(), metrics["_probs"].numpy(),
                                            metrics["_losses"].numpy(), classes, file("mistakes"), heatmaps=heat)
    paths["per_class"] = plots.save_per_class(metrics["per_class"], file("per_class"))
    paths["reliability"] = plots.save_reliability(*reliability(metrics["_probs"], data.test[1]),
                                                  ece(metrics["_probs"], data.test[1]), file("reliability"))
    return paths


def write_report(run_dir, data, metrics, config, summary=None, quiet=False, net=None):
    """Every picture plus report.html of a run folder, from its test results `metrics` (see
    write_pictures); `summary`: the run's summary.json, read from the folder when not given.
    Returns the report's path."""
    history = read_metrics(run_dir)
    paths = write_pictures(run_dir, data, metrics, history, net)
    if summary is None:
        summary_path = os.path.join(run_dir, "summary.json")
        summary = read_json(summary_path) if os.path.exists(summary_path) else {}
    page = render_html(run_dir, summary, config, metrics, paths, history)
    out = os.path.join(run_dir, "report.html")
    write_text(out, page)
    if not quiet:
        print(f"wrote {out} and {', '.join(os.path.basename(p) for p in paths.values())}")
    return out


class ReportWriter(Callback):
    """Training callback: at the end of a run, its pictures and report.html (rank 0 only), from the
    test evaluation training already made of the best weights (`state.test`: engine.evaluate's
    dict with collect=True), so the test split is evaluated once per run. The caller of the
    training loop adds it when the config's `report` is on (train/ does not import evaluation/);
    every other hook is Callback's, doing nothing."""

    def on_end(self, state):
        if not state.ctx.is_main:
            return None
        metrics = metrics_of(state.test, state.data.classes, labels=state.data.test[1])
        write_report(state.run_dir, state.data, metrics, state.cfg.to_dict(),
                     summary=state.summary, quiet=True, net=state.model)
        return None


def _table(rows, header=None):
    """An HTML table; header None for a plain key/value list (no empty header row). Tables with a
    header hold numbers after their first column: those are right-aligned (class "num")."""
    head = "".join(f"<th>{html.escape(str(h))}</th>" for h in header or [])
    body = "".join("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in row) + "</tr>" for row in rows)
    start = f'<table class="num"><thead><tr>{head}</tr></thead>' if header else "<table>"
    return f"{start}<tbody>{body}</tbody></table>"


# numbers written for people; counts come back from metrics.csv as floats (4.0 -> "4")
fmt_percent, fmt_loss, fmt_seconds, fmt_count = "{:.1%}".format, "{:.4f}".format, "{:,.1f} s".format, "{:,.0f}".format


# summary.json key -> (label, format): numbers written for people (97.0%, 13.4 s, 2,690 img/s, 121,930)
SUMMARY_ROWS = {"model": ("model", str), "data": ("data", str), "num_params": ("parameters", fmt_count),
                "epochs": ("epochs", fmt_count), "best_val_acc": ("best validation accuracy", fmt_percent),
                "best_epoch": ("best epoch", fmt_count), "test_acc": ("test accuracy", fmt_percent),
                "final_test_acc": ("test accuracy of the last epoch", fmt_percent),
                "test_top5_acc": ("test top-5 accuracy", fmt_percent), "test_loss": ("test loss", fmt_loss),
                "test_balanced_acc": ("test balanced accuracy (mean recall)", fmt_percent),
                "train_seconds": ("training time", fmt_seconds),
                "samples_per_second": ("throughput", lambda v: f"{v:,.0f} img/s"),
                "device": ("training device", str), "global_batch_size": ("batch size", fmt_count)}
# metrics.csv column -> format; columns not listed (from newer versions) are shown as written
HISTORY_COLUMNS = {"epoch": fmt_count, "train_loss": fmt_loss, "train_acc": fmt_percent, "val_loss": fmt_loss,
                   "val_acc": fmt_percent, "lr": lambda v: f"{v:.2e}", "seconds": fmt_seconds}


def summary_rows(summary):
    return [(label, fmt(summary[key])) for key, (label, fmt) in SUMMARY_ROWS.items() if summary.get(key) is not None]


def history_rows(history):
    """metrics.csv as text; a value an epoch has not got (val_* in a run without validation: NaN
    or empty) is a dash, not "nan%"."""
    missing = lambda v: v in ("", None) or (isinstance(v, float) and math.isnan(v))
    return [["-" if missing(v) else HISTORY_COLUMNS.get(k, str)(v) for k, v in row.items()] for row in history]


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


def render_html(run_dir, summary, config, metrics, paths, history):
    diag = summary.get("diagnostics") or ["No problems detected."]
    split = summary.get("evaluated_split") or "test"   # a tune trial is evaluated on val: the test split stays unseen
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
<h2>Confusion matrix ({split})</h2>{img("confusion", "confusion matrix")}
<h2>Per-class metrics ({split})</h2>{_table(per_class_rows(metrics), ["class", "precision", "recall", "F1", "support"])}
{img("per_class", "per-class accuracy and F1")}
<h2>Calibration ({split})</h2><p>Expected calibration error {fmt_percent(metrics.get("ece", float("nan")))}
(15 bins){f", after temperature scaling (T = {summary['temperature']:.3f})" if summary.get("temperature") else
"; `--calibrate` fits a temperature that lowers it"}.</p>{img("reliability", "reliability diagram")}
<h2>Mistakes</h2>{img("mistakes", f"highest-loss {split} images (with captum: Grad-CAM of the predicted class)")}
<h2>Training samples</h2>{img("samples", "training images with labels")}
<h2>History</h2>{_table(history_rows(history), [k.replace("_", " ") for k in history[0]] if history else None)}
<h2>Configuration</h2><pre>{html.escape(json.dumps(config, indent=2))}</pre>
<h2>Environment</h2>{_table(environment_rows(summary))}
</body></html>"""


def notebook_html(title, rows, run_dir=None, pictures=("curves", "confusion")):
    """What Jupyter shows for a Result or a Model: a small table and the run's pictures, embedded
    (a notebook cannot load files outside its own folder by path)."""
    import base64
    import html

    table = "".join(f"<tr><td>{html.escape(str(k))}</td><td>{html.escape(str(v))}</td></tr>" for k, v in rows)
    images = ""
    for name in pictures if run_dir else ():
        path = os.path.join(str(run_dir), name + ".png")
        if os.path.exists(path):
            with open(path, "rb") as f:
                data = base64.b64encode(f.read()).decode("ascii")
            images += f'<img src="data:image/png;base64,{data}" width="420" alt="{name}">'
    return f"<b>{html.escape(title)}</b><table>{table}</table>{images}"
