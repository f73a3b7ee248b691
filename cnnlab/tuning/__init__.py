"""`cnnlab tune` / `cnnlab.tune()`: a hyperparameter search with Optuna (TPE sampling, pruning on
each epoch's validation accuracy). Each trial is an ordinary run folder under the tune folder;
the test split is used once, at the end, by a re-run of the best settings.

    OUT/study.db         the study (SQLite) unless --storage names another database
    OUT/trial-NNNN/      one run folder per trial (its report.html measured on validation)
    OUT/best.yaml        the best settings, a recipe for `cnnlab train --config`
    OUT/best/            the best settings trained again and tested
    OUT/tune.html        history, importances, parallel coordinates, every trial linked
"""
import fcntl
import html
import os
import time

from ..atomic import write_text
from ..config import TrainConfig, load_yaml, make_config
from ..errors import CnnlabError, UsageError, note
from .space import read_space

SAME_STUDY_HINT = "resume it with the same --config and --space, or start another with a new --out or --study"


class TuneResult:
    """What `cnnlab.tune()` returns: the tune folder, the best trial and the tested re-run."""

    def __init__(self, out, best_params, best_val_acc, test_acc, best_config, best_run, lines):
        self.out, self.best_params, self.best_val_acc, self.test_acc = out, best_params, best_val_acc, test_acc
        self.best_config, self.best_run, self.lines = best_config, best_run, lines

    def __repr__(self):
        return f"TuneResult(out={self.out!r}, best_val_acc={self.best_val_acc}, test_acc={self.test_acc})"


def tune(config=None, space=None, trials=20, timeout=None, out=None, storage=None, study=None, pruner="median",
         quiet=False):
    """Search the settings in `space` (a YAML path, a shipped space's name, or a dict) on top of
    `config` (a TrainConfig, a YAML path or a dict of settings); see `cnnlab tune --help`."""
    from ..training.run_folder import default_name
    from .study import Objective, make_pruner, open_study, quiet_experimental, run_trials

    base, space = check_arguments(config, space, trials, timeout, pruner)
    out = out or os.path.join("runs", "tune-" + default_name(base))
    storage = storage or default_storage(out)
    with quiet_experimental():
        optuna_study = open_study(storage, study or os.path.basename(os.path.abspath(out)), make_pruner(pruner, trials))
        check_same_search(optuna_study, base, space)
        if not quiet:
            note(f"tune folder {out}: {trials} trials in study '{optuna_study.study_name}' (interrupted? run the same "
                 "command again to resume)")
        deadline = time.time() + timeout if timeout else None
        run_trials(optuna_study, Objective(base, space, out, trials, quiet), trials, deadline)
    return finish(optuna_study, base, space, out, storage)


def default_storage(out):
    """The study in OUT/study.db: SQLite, nothing to install (the folder is made for it)."""
    os.makedirs(out, exist_ok=True)
    return "sqlite:///" + os.path.abspath(os.path.join(out, "study.db"))


def check_arguments(config, space, trials, timeout, pruner):
    """The base TrainConfig and the parsed space, or one-line errors before anything is written."""
    from ..training.loop import check_names

    if isinstance(trials, bool) or not isinstance(trials, int) or trials <= 0:
        raise UsageError(f"--trials must be a positive whole number, got {trials!r}.")
    if timeout is not None and not timeout > 0:
        raise UsageError(f"--timeout must be a positive number of seconds, got {timeout!r}.")
    if pruner not in ("median", "halving", "none"):
        raise UsageError(f"unknown pruner '{pruner}'. Valid: median, halving, none.")
    if space is None:
        raise UsageError("tune needs a search space: --space SPACE.yaml (e.g. lr: {log_uniform: [1.0e-4, 1.0e-1]}).")
    base = base_config(config)
    if not base.val_fraction > 0 and not base.val_samples:
        raise UsageError("tune judges trials on the validation split: set val_fraction above 0 in the base config.")
    check_names(base)
    return base, read_space(space, base)


def base_config(config):
    from ..training.resume import with_data_name

    if isinstance(config, TrainConfig):
        cfg = config
    elif isinstance(config, str):
        cfg = make_config(load_yaml(config))
    else:
        cfg = make_config(dict(config or {}))
    return with_data_name(make_config({"out": "", "overwrite": False}, base=cfg))


def check_same_search(study, base, space):
    """A study remembers the base config and space it was started with: resuming it with others
    would mix two searches in one table."""
    record = {"base": base.to_dict(), "space": {k: [kind, list(args)] for k, (kind, args) in space.items()}}
    for key, value in record.items():
        saved = study.user_attrs.get(key)
        if saved is None:
            study.set_user_attr(key, value)
        elif saved != value:
            what = "base config" if key == "base" else "search space"
            raise UsageError(f"study '{study.study_name}' was started with another {what}; {SAME_STUDY_HINT}.")


def finish(study, base, space, out, storage):
    """best.yaml, the best settings trained again and tested (once per tune folder, even with
    several workers), tune.html and the table."""
    from .page import table_lines, trial_rows, write_page
    from .space import config_with
    from .study import hide_password

    try:
        best = study.best_trial
    except ValueError:
        raise CnnlabError(f"no trial of study '{study.study_name}' completed (see the failures above); "
                          "fix the space or base config and run again.") from None
    best_yaml = os.path.join(out, "best.yaml")
    cfg = config_with(base, best.params, os.path.join(out, "best"))
    summary = test_best(cfg, best, best_yaml)
    rows = trial_rows(study)
    facts = {"storage": html.escape(hide_password(storage)), "trials": summarize_states(rows),
             "best trial": f"{best.number}, validation {best.value:.2%}",
             "best settings": '<a href="best.yaml">best.yaml</a>',
             "best re-run, tested": f'<a href="best/report.html">best/</a> test accuracy {summary["test_acc"]:.2%}'}
    write_page(out, study, facts, rows, list(space))
    lines = table_lines(rows, list(space)) + [
        f"best: trial {best.number}, val {best.value:.2%}; re-run in {os.path.join(out, 'best')}: "
        f"test {summary['test_acc']:.2%}",
        f"settings: {best_yaml} (cnnlab train --config {best_yaml}); page: {os.path.join(out, 'tune.html')}"]
    return TuneResult(out, best.params, best.value, summary["test_acc"], best_yaml, os.path.join(out, "best"), lines)


def test_best(cfg, best, best_yaml):
    """Train the best settings once more into OUT/best (the test split's only use), unless that run
    is already there for the same settings. A lock makes a second worker wait, then reuse it."""
    import yaml

    from ..api import train
    from ..training.run_folder import read_json

    recipe = best_recipe(cfg, best)
    summary_path = os.path.join(cfg.out, "summary.json")
    with open(os.path.join(os.path.dirname(best_yaml), ".best.lock"), "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        done = os.path.exists(best_yaml) and os.path.exists(summary_path)
        if done and load_yaml(best_yaml) == yaml.safe_load(recipe):
            return read_json(summary_path)
        write_text(best_yaml, recipe)
        return train(make_config({"overwrite": True}, base=cfg), quiet=True).summary


def best_recipe(cfg, best):
    """best.yaml: the settings that differ from cnnlab's defaults, with a comment saying where they
    come from (its first line is what `cnnlab recipes`-style listings show)."""
    import yaml

    defaults = TrainConfig().to_dict()
    settings = {k: v for k, v in cfg.to_dict().items() if v != defaults[k] and k not in ("out", "overwrite")}
    return (f"# cnnlab tune: best of the study's trials (trial {best.number}, validation {best.value:.2%})\n"
            + yaml.safe_dump(settings, sort_keys=False))


def summarize_states(rows):
    states = [r[1] for r in rows]
    return ", ".join(f"{states.count(s)} {s}" for s in ("complete", "pruned", "fail", "running") if s in states)
