"""The Optuna study: its storage, the trials budget shared by every worker, and one trial as an
ordinary cnnlab run (cnnlab.api.train) that reports its validation accuracy after each epoch.

Several `cnnlab tune` processes may share one study (one SQLite file, or a PostgreSQL server for
workers on several machines): --trials is the study's total, counted in the storage, so together
they run that many trials and none twice. Killed workers are found by Optuna's heartbeat."""
import dataclasses
import os
import time
import warnings
from contextlib import contextmanager

from ..errors import CnnlabError, UsageError, note

try:
    import optuna
except ImportError:
    raise UsageError("cnnlab tune needs Optuna: pip install 'cnnlab[tune]' (or pip install optuna).") from None

from ..training.callbacks import Callback, Stop
from ..training.engine import Interrupted
from .space import config_with, suggest

# A running trial writes a heartbeat this often; one silent for twice as long belongs to a killed
# worker: it is marked failed and its settings tried again once (RetryHeartbeatStaleTrialCallback).
HEARTBEAT_SECONDS = 5
TrialState = optuna.trial.TrialState


@contextmanager
def quiet_experimental():
    """The heartbeat and the stale-trial retry are marked experimental by Optuna (since 2.8/2.9,
    unchanged since); cnnlab tests the versions it allows, so the warning is only noise on stderr."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        yield


class TrialFailed(Exception):
    """A trial that could not train: recorded as failed (with its error), and the search goes on."""


class TrialReporter(Callback):
    """A trial's training hooks. The run's end-of-training evaluation is pointed at the validation
    split, so its summary and report are complete while the search never sees the test split; each
    epoch's validation accuracy goes to Optuna, whose pruner may end the trial there."""

    def __init__(self, trial):
        self.trial, self.pruned_at = trial, None

    def on_start(self, state):
        state.data = dataclasses.replace(state.data, test=state.data.val)

    def on_epoch_end(self, state):
        epoch = state.row["epoch"]
        self.trial.report(state.row["val_acc"], epoch)
        if epoch < state.cfg.epochs and self.trial.should_prune():   # at the last epoch, nothing is left to save
            self.pruned_at = epoch
            return Stop("pruned")
        return None

    def on_end(self, state):
        """What a trial measured at the end is validation accuracy: say so in summary.json, and
        leave the test fields empty rather than let a validation number pass for a test one."""
        state.summary.update(evaluated_split="val", final_val_acc=state.summary["test_acc"], test_acc=None,
                             test_loss=None, test_top5_acc=None, final_test_acc=None, final_test_loss=None,
                             test_balanced_acc=None, test_recall=None)
        state.run.write_json("summary.json", state.summary)


def open_study(storage, name, pruner):
    """The study `name` in `storage` (an RDB URL), created on first use; maximises val accuracy."""
    optuna.logging.set_verbosity(optuna.logging.ERROR)   # cnnlab says what happens, once, on stderr
    from sqlalchemy.exc import SQLAlchemyError   # Optuna's RDB storage is SQLAlchemy

    kwargs = {"connect_args": {"timeout": 60}} if storage.startswith("sqlite") else {}  # workers wait for the lock
    retry = optuna.storages.RetryHeartbeatStaleTrialCallback(max_retry=1)
    try:
        rdb = optuna.storages.RDBStorage(storage, engine_kwargs=kwargs, heartbeat_interval=HEARTBEAT_SECONDS,
                                         heartbeat_stale_trial_callback=retry)
        return optuna.create_study(storage=rdb, study_name=name, direction="maximize", pruner=pruner,
                                   sampler=optuna.samplers.TPESampler(), load_if_exists=True)
    except ImportError as e:
        raise UsageError(f"--storage {hide_password(storage)} needs a database driver: {e} "
                         "(PostgreSQL: pip install 'psycopg[binary]').") from None
    except (SQLAlchemyError, ValueError) as e:   # a bad URL, a server that does not answer
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UsageError(f"cannot open --storage {hide_password(storage)}: {first}") from None


def hide_password(url):
    """An RDB URL as it may be printed: user:secret@host -> user:***@host."""
    head, at, tail = url.rpartition("@")
    if not at or ":" not in head.split("//")[-1]:
        return url
    scheme, _, auth = head.rpartition("//")
    return f"{scheme}//{auth.split(':')[0]}:***@{tail}"


def make_pruner(name, trials):
    """Median pruning (stop a trial whose val accuracy is below the median of earlier trials at the
    same epoch) after a quarter of the trials (at most 5) ran in full; or successive halving."""
    if name == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=min(5, max(1, trials // 4)))
    if name == "halving":
        return optuna.pruners.SuccessiveHalvingPruner()
    return optuna.pruners.NopPruner()


def counts(trial):
    """Trials that used up the budget: finished, pruned, or failed by their own settings (not a
    trial interrupted or killed with its worker, nor one a worker skipped)."""
    return trial.state in (TrialState.COMPLETE, TrialState.PRUNED) or (
        trial.state == TrialState.FAIL and "error" in trial.user_attrs)


def budget(study, below=None):
    """(trials done, trials running), running ones only below trial number `below` when given."""
    trials = study.get_trials(deepcopy=False)
    done = sum(map(counts, trials))
    running = sum(t.state == TrialState.RUNNING and (below is None or t.number < below) for t in trials)
    return done, running


def run_trials(study, objective, trials, deadline=None):
    """Run trials until the study holds `trials` done ones, or until `deadline` (time.time())
    passes: as Optuna's own timeout, the trial under way then finishes, and no new one starts.
    While the other workers' last trials run, wait: one may yet fail and leave a place."""
    while deadline is None or time.time() < deadline:
        optuna.storages.fail_stale_trials(study)
        done, running = budget(study)
        if done >= trials:
            return
        if done + running >= trials:
            time.sleep(HEARTBEAT_SECONDS)
        else:
            study.optimize(objective, n_trials=1, catch=(TrialFailed,))


class Objective:
    """One trial: sampled settings on top of the base config, trained as the run folder
    OUT/trial-NNNN; returns its best validation accuracy."""

    def __init__(self, base, space, out, trials, quiet=False):
        self.base, self.space, self.out, self.trials, self.quiet = base, space, out, trials, quiet

    def __call__(self, trial):
        done, running_before = budget(trial.study, below=trial.number)
        if done + running_before >= self.trials:   # another worker took the last place meanwhile
            trial.set_user_attr("skipped", "the study's trials budget was reached")
            raise TrialFailed("skipped")
        params = suggest(trial, self.space)
        name = f"trial-{trial.number:04d}"
        trial.set_user_attr("run", name)
        reporter = TrialReporter(trial)
        result = self.train(trial, params, name, reporter)
        summary = result.summary
        trial.set_user_attr("epochs", summary["epochs"])
        trial.set_user_attr("seconds", summary["train_seconds"])
        self.say(f"trial {trial.number}: best val {summary['best_val_acc']:.2%} in {summary['epochs']} epochs"
                 + (f", pruned at epoch {reporter.pruned_at}" if reporter.pruned_at else "") + f" ({describe(params)})")
        if reporter.pruned_at:
            raise optuna.TrialPruned(f"val accuracy below the median at epoch {reporter.pruned_at}")
        return summary["best_val_acc"]

    def train(self, trial, params, name, reporter):
        from ..api import train

        try:
            return train(config_with(self.base, params, os.path.join(self.out, name)), quiet=True, callbacks=[reporter])
        except Interrupted:
            # Ctrl-C: try these settings again first when the study resumes; the run itself ends here
            trial.study.enqueue_trial(trial.params, skip_if_exists=False)
            raise KeyboardInterrupt from None
        except (CnnlabError, ValueError, RuntimeError) as e:   # bad settings, NaN, out of memory: this trial only
            message = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            trial.set_user_attr("error", message)
            self.say(f"trial {trial.number} failed: {message} ({describe(params)})")
            raise TrialFailed(message) from None

    def say(self, text):
        if not self.quiet:
            note(text)


def describe(params):
    return ", ".join(f"{k}={fmt_param(v)}" for k, v in params.items())


def fmt_param(value):
    return f"{value:.3g}" if isinstance(value, float) else str(value)
