"""audit.html: one self-contained page (inline PNG thumbnails, no scripts) of an audit's findings."""
import base64
import html
import io

import numpy as np

from ..atomic import write_text
from .audit import weak_folds


def thumbnail(img, side=64):
    """A (C, H, W) uint8 image as a data: URL of a PNG scaled (nearest) to about `side` px."""
    from PIL import Image

    a = np.asarray(img)
    picture = Image.fromarray(a[0] if a.shape[0] == 1 else a.transpose(1, 2, 0))
    scale = max(1, side // max(picture.size))
    picture = picture.resize((picture.width * scale, picture.height * scale), Image.NEAREST)
    buffer = io.BytesIO()
    picture.save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def _img(x, row, alt):
    return f'<img src="{thumbnail(x[row])}" alt="{html.escape(alt)}">'


def _where(r):
    return html.escape(f"{r['split']}[{r['index']}]" + (f" {r['file']}" if r["file"] else ""))


def _table(header, rows):
    head = "".join(f"<th>{h}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{c}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>" if rows else "<p>None found.</p>"


def label_section(report, x):
    if "label_issues" not in report:
        return "<h2>Label issues</h2><p>Not checked (--no-labels).</p>"
    rec = report["label_recipe"]
    rows = [(_img(x, r["row"], f"suspect {r['split']} {r['index']}"), _where(r), html.escape(r["label"]),
             f"{r['given_probability']:.0%}", html.escape(r["suggested"]), f"{r['suggested_probability']:.0%}")
            for r in report["label_issues"]]
    return (f"<h2>Label issues ({len(rows)})</h2><p>Out-of-sample probabilities from {rec['folds']}-fold "
            f"cross-training of {html.escape(rec['model'])} ({rec['epochs']} epochs; out-of-fold accuracy "
            f"{rec['out_of_fold_accuracy']:.1%}), ranked by cleanlab's find_label_issues, most suspect first.</p>"
            + (f"<p class='warn'><b>{html.escape(warning)}</b></p>" if (warning := weak_folds(report)) else "")
            + _table(["image", "where", "given", "p(given)", "suggested", "p(suggested)"], rows))


def outlier_section(report, x):
    if "outliers" not in report:
        return "<h2>Outliers</h2><p>Not checked (--no-labels: the embedding is the fold models').</p>"
    rows = [(_img(x, r["row"], f"outlier {r['split']} {r['index']}"), _where(r), html.escape(r["label"]),
             f"{r['distance']:.2f}") for r in report["outliers"]]
    return (f"<h2>Outliers ({len(rows)})</h2><p>Images far from every class centre in the penultimate-layer "
            "embedding of the fold models (each image embedded by the model that never saw it); distance in "
            "units of a typical image's distance to its own class centre, farthest first.</p>"
            + _table(["image", "where", "label", "distance"], rows))


def duplicate_section(report, x):
    rows = [(_img(x, d["a"]["row"], "first of pair"), _img(x, d["b"]["row"], "second of pair"),
             _where(d["a"]), _where(d["b"]), d["kind"], "<b>leak</b>" if d["leak"] else "same split")
            for d in report["duplicates"]]
    return (f"<h2>Duplicates and leaks ({len(rows)})</h2><p>Pairs proposed by a perceptual hash (imagehash pHash) "
            "and confirmed pixel by pixel; a pair across splits is a leak: the model is tested on what it trained on.</p>"
            + _table(["image", "duplicate", "where", "where", "kind", "splits"], rows))


def odd_section(report, x):
    rows = [(_img(x, r["row"], r["reason"]), _where(r), html.escape(r["label"]), html.escape(r["reason"]))
            for r in report["odd_images"]]
    return f"<h2>Odd images ({len(rows)})</h2>" + _table(["image", "where", "label", "why"], rows)


def imbalance_section(report):
    imb = report["imbalance"]
    rows = [(html.escape(c), *(imb["counts"][s][k] for s in ("train", "val", "test")), imb["class_weights"][k])
            for k, c in enumerate(imb["classes"])]
    return (f"<h2>Class balance</h2><p>Largest / smallest training class: {imb['ratio']}. The weights are "
            "N / (K x count), inverse frequency.</p>" + _table(["class", "train", "val", "test", "weight"], rows))


def write_page(path, report, x):
    page = f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>cnnlab audit: {html.escape(report['data'])}</title>
<style>.warn{{color:#a33}}body{{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;color:#222}}
table{{border-collapse:collapse;margin:1em 0}}td,th{{border:1px solid #ccc;padding:3px 8px;text-align:left}}
img{{image-rendering:pixelated;display:block}}</style></head>
<body><h1>cnnlab audit</h1><p>{html.escape(report['data'])}: {report['images']} images,
{len(report['classes'])} classes, every split.</p>
{label_section(report, x)}
{outlier_section(report, x)}
{duplicate_section(report, x)}
{odd_section(report, x)}
{imbalance_section(report)}
</body></html>"""
    write_text(path, page)
    return path
