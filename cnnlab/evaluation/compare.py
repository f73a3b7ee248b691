"""`cnnlab compare`: several finished runs side by side, a table and overlaid validation curves,
read from their run folders (summary.json, metrics.csv); nothing is evaluated again."""
import os

from . import plots
from ..errors import CnnlabError, note
from ..training.run_folder import read_json, read_metrics
from .report import fmt_count

COMPARE_HEADER = ("run", "model", "data", "params", "epochs", "best val", "test acc", "last-epoch test", "seconds")
SUMMARY_KEYS = ("model", "data", "num_params", "epochs", "best_val_acc", "test_acc", "train_seconds")  # required


def compare(run_dirs, out=None):
    """Rows of (run, model, data, params, epochs, best val, test acc, last-epoch test acc, seconds) and the overlaid
    validation curves, written to `out` or else to compare.png in the runs' common parent folder
    (beside the runs, not wherever the command happens to run). Returns (rows, picture path)."""
    summaries, problems = {}, []
    # `compare runs/*` meets the compare.png it wrote before: files are no runs, unless all are
    for d in [d for d in run_dirs if not os.path.isfile(d)] or run_dirs:
        try:
            summaries[d] = read_summary(d)
        except CnnlabError as e:
            problems.append(str(e))
    if not summaries:
        raise CnnlabError(problems[0])
    for problem in problems:   # `compare runs/*` with one run still training compares the others
        note(f"warning: left out: {problem}")
    parent = os.path.commonpath([os.path.dirname(os.path.abspath(d)) for d in summaries])
    rows, histories = [], {}
    for d, s in summaries.items():
        name = os.path.relpath(os.path.abspath(d), parent)   # unique even when two runs share a basename
        histories[name] = read_metrics(d)
        # final_test_acc: runs of cnnlab before it was recorded have none ("-")
        rows.append((name, *(s[k] for k in SUMMARY_KEYS[:-1]), s.get("final_test_acc"), s["train_seconds"]))
    out = out or os.path.join(parent, "compare.png")
    try:
        plots.save_compare(histories, out)
    except CnnlabError as e:
        raise CnnlabError(f"{e} --out writes the picture elsewhere.") from None
    return rows, out


def read_summary(run_dir):
    """A run's summary.json, with the keys compare shows; CnnlabError for an unfinished or damaged run."""
    path = os.path.join(run_dir, "summary.json")
    if not os.path.exists(run_dir):
        raise CnnlabError(f"run folder not found: {run_dir}")
    if not os.path.exists(path):
        raise CnnlabError(f"{run_dir} has no summary.json; is it a finished cnnlab run folder?")
    s = read_json(path)
    lacking = [k for k in SUMMARY_KEYS if not isinstance(s, dict) or k not in s]
    if lacking:
        raise CnnlabError(f"{path} lacks '{lacking[0]}' (damaged?); `cnnlab train --resume {run_dir}` writes it again.")
    return s


def fmt_val(acc):
    """A run without a validation split has no best val accuracy, a tune trial no test accuracy
    (summary.json: null), a run of an older cnnlab no last-epoch test accuracy."""
    return "-" if acc is None else f"{acc:.2%}"


def compare_table(rows):
    """The compare rows as text lines, every column as wide as its longest cell: names of any
    length stay aligned. Text left-aligned, numbers right-aligned."""
    cells = [COMPARE_HEADER] + [(*r[:3], fmt_count(r[3]), fmt_count(r[4]), fmt_val(r[5]), fmt_val(r[6]), fmt_val(r[7]),
                                 f"{r[8]:.1f}")
                                for r in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(COMPARE_HEADER))]
    align = lambda i, text: text.ljust(widths[i]) if i < 3 else text.rjust(widths[i])
    return ["  ".join(align(i, text) for i, text in enumerate(row)).rstrip() for row in cells]
