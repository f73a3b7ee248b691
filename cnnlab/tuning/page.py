"""What a search shows: the trials table (the terminal's, and tune.html's) and tune.html with
Optuna's matplotlib visualisations embedded as PNGs and a link to every trial's report."""
import base64
import html
import os
import warnings

from ..atomic import atomic_path, write_text
from .study import counts, fmt_param

TABLE_HEADER = ("trial", "state", "best val", "epochs", "seconds")


def trial_rows(study):
    """One row per trial that ran (skipped places and interrupted runs left out), best first:
    (number, state, best val, epochs, seconds, params, run folder name)."""
    rows = []
    for t in study.get_trials(deepcopy=False):
        if not (counts(t) or t.state.name == "RUNNING"):
            continue
        values = [v for v in t.intermediate_values.values()]
        best = t.value if t.value is not None and t.state.name == "COMPLETE" else max(values, default=None)
        rows.append((t.number, t.state.name.lower(), best, t.user_attrs.get("epochs"), t.user_attrs.get("seconds"),
                     t.params, t.user_attrs.get("run")))
    return sorted(rows, key=lambda r: (r[2] is None, -(r[2] or 0), r[0]))


def table_lines(rows, param_names):
    """The trials as aligned text: numbers right-aligned, then one column per searched setting."""
    header = TABLE_HEADER + tuple(param_names)
    cells = [header] + [row_cells(row, param_names) for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(header))]
    align = lambda i, text: text.ljust(widths[i]) if i == 1 else text.rjust(widths[i])
    return ["  ".join(align(i, text) for i, text in enumerate(row)).rstrip() for row in cells]


def row_cells(row, param_names):
    """One trial's table cells, as text."""
    number, state, best, epochs, seconds, params, _ = row
    return (str(number), state, "-" if best is None else f"{best:.2%}", "-" if epochs is None else str(epochs),
            "-" if seconds is None else f"{seconds:.1f}", *(fmt_param(params[p]) if p in params else "-"
                                                             for p in param_names))


def save_figures(study, out):
    """history.png, importances.png, parallel.png and intermediate.png (Optuna's matplotlib
    plots) in `out`; returns {title: path or the reason it could not be drawn}."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import optuna.visualization.matplotlib as vis

    plots = {"optimization history": ("history", vis.plot_optimization_history),
             "parameter importances": ("importances", vis.plot_param_importances),
             "parallel coordinates": ("parallel", vis.plot_parallel_coordinate),
             "validation accuracy per epoch (pruned trials stop early)": ("intermediate", vis.plot_intermediate_values)}
    figures = {}
    for title, (name, plot) in plots.items():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")   # Optuna marks its matplotlib plots experimental
            try:
                axes = plot(study)
            except (ValueError, RuntimeError) as e:   # e.g. importances need two finished trials
                figures[title] = f"not drawn: {e}"
                continue
        figure = (axes.flat[0] if hasattr(axes, "flat") else axes).figure
        figure.set_size_inches(9, 5)
        path = os.path.join(out, name + ".png")
        with atomic_path(path) as tmp:
            figure.savefig(tmp, dpi=90, bbox_inches="tight")
        plt.close(figure)
        figures[title] = path
    return figures


def write_page(out, study, summary, rows, param_names):
    """tune.html in `out`: the summary, the figures, and the trials table linking each trial's report."""
    figures = save_figures(study, out)
    page = render(study.study_name, summary, figures, rows, param_names)
    path = os.path.join(out, "tune.html")
    write_text(path, page)
    return path


def _embed(path):
    with open(path, "rb") as f:
        return "data:image/png;base64," + base64.b64encode(f.read()).decode()


def _figure(title, path):
    if not os.path.isfile(path):
        return f"<h2>{html.escape(title)}</h2><p>{html.escape(path)}</p>"
    return f'<h2>{html.escape(title)}</h2><img src="{_embed(path)}" alt="{html.escape(title)}">'


def _link(run):
    return f'<a href="{html.escape(run)}/report.html">{html.escape(run)}</a>' if run else "-"


def render(name, summary, figures, rows, param_names):
    body = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in row_cells(r, param_names))
                   + f"<td>{_link(r[6])}</td></tr>" for r in rows)
    head = "".join(f"<th>{html.escape(h)}</th>" for h in TABLE_HEADER + tuple(param_names) + ("report",))
    facts = "".join(f"<tr><td>{html.escape(k)}</td><td>{v}</td></tr>" for k, v in summary.items())
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>cnnlab tune: {html.escape(name)}</title>
<style>body{{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;color:#222}}
table{{border-collapse:collapse;margin:1em 0}}td,th{{border:1px solid #ccc;padding:3px 8px;text-align:left}}
img{{max-width:100%}}</style></head>
<body><h1>cnnlab tune: {html.escape(name)}</h1>
<table><tbody>{facts}</tbody></table>
{"".join(_figure(title, path) for title, path in figures.items())}
<h2>Trials</h2><table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>
</body></html>"""

