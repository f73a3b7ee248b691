"""`cnnlab tune`: a tiny study end to end, resume after a kill, two workers on one study (SQLite,
then a real PostgreSQL), and one-line errors for bad search spaces. Trials train a 426-parameter
net on synthetic 12x12 images for a few epochs (about 0.1 s each)."""
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time

import optuna
import pytest
import yaml

import cnnlab
from cnnlab.cli import main

from .conftest import FAULT_REPORT, ROOT, run_cli

# Two classes of synthetic images: lr 0.03 learns them by epoch 3 (over 90% val), lr 1e-5 never does.
BASE = {"data": "synthetic:1x12x12:2:400", "val_fraction": 0.25, "model": "mnist_cnn",
        "model_args": {"width": 4, "hidden": 8}, "epochs": 4, "batch_size": 16, "threads": 1}
GOOD, BAD = 0.03, 1e-5


def write_yaml(path, values):
    path.write_text(yaml.safe_dump(values))
    return str(path)


def files(tmp_path, base=None, space=None):
    """The base config and search space files of a test study."""
    return (write_yaml(tmp_path / "base.yaml", {**BASE, **(base or {})}),
            write_yaml(tmp_path / "space.yaml", space or {"lr": {"log_uniform": [BAD, 0.1]}}))


def open_study(out):
    """The study a `cnnlab tune --out OUT` keeps in OUT/study.db (named after the folder)."""
    return optuna.load_study(study_name=os.path.basename(out), storage=f"sqlite:///{os.path.join(out, 'study.db')}")


def created_study(out, lrs):
    """OUT/study.db with trials queued at these learning rates, so the sampler's picks (random in
    the first trials) cannot make a test pass or fail by luck."""
    os.makedirs(out)
    study = optuna.create_study(study_name=os.path.basename(out), storage=f"sqlite:///{os.path.join(out, 'study.db')}",
                                direction="maximize")
    for lr in lrs:
        study.enqueue_trial({"lr": lr})
    return study


def counted(study):
    return [t for t in study.get_trials() if t.state.name in ("COMPLETE", "PRUNED")]


def start_tune(*args):
    return subprocess.Popen([sys.executable, "-m", "cnnlab", "tune", *map(str, args)], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def wait_for(path, proc, timeout=120):
    """Until `path` exists (the event a test waits for), failing if `proc` ends first."""
    deadline = time.time() + timeout
    while not os.path.exists(path):
        assert proc.poll() is None, proc.communicate()[1]
        assert time.time() < deadline, f"{path} never appeared"
        time.sleep(0.05)


# ---- a tiny study, end to end ------------------------------------------------------------------------

def test_tiny_study_prunes_writes_a_run_per_trial_best_yaml_and_tune_html(tmp_path):
    base, space = files(tmp_path)
    out = str(tmp_path / "tune")
    created_study(out, [GOOD, BAD, GOOD, BAD])
    result = run_cli("tune", "--config", base, "--space", space, "--trials", 4, "--out", out)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].split() == ["trial", "state", "best", "val", "epochs", "seconds", "lr"]   # stdout: the table alone
    assert len(lines) == 1 + 4 + 2 and lines[-2].startswith("best: trial 0, val 9")
    study = open_study(out)
    states = {t.number: t.state.name for t in study.get_trials()}
    assert states == {0: "COMPLETE", 1: "PRUNED", 2: "COMPLETE", 3: "PRUNED"}   # 50% < the median at epoch 3
    for t in study.get_trials():
        run = os.path.join(out, f"trial-{t.number:04d}")
        summary = json.load(open(os.path.join(run, "summary.json")))
        assert summary["epochs"] < 4 if t.state.name == "PRUNED" else summary["epochs"] == 4
        assert "Confusion matrix (val)" in open(os.path.join(run, "report.html"), encoding="utf-8").read()
        # the trial's end-of-run evaluation is of the validation split: with the best weights it
        # gives the best validation accuracy again, and no test number is written
        assert summary["evaluated_split"] == "val" and summary["test_acc"] is None
        assert summary["final_val_acc"] == pytest.approx(summary["best_val_acc"])
    trials = run_cli("compare", os.path.join(out, "trial-0000"), os.path.join(out, "trial-0001"))   # no test acc: "-"
    assert trials.returncode == 0 and trials.stdout.splitlines()[1].split()[-2] == "-", trials.stderr
    page = open(os.path.join(out, "tune.html")).read()
    assert page.count('src="data:image/png;base64,') == 4 and 'href="trial-0001/report.html"' in page
    tested = json.load(open(os.path.join(out, "best", "summary.json")))
    assert tested["test_acc"] > 0.8 and tested["splits"]["test"] == 80
    again = run_cli("train", "--config", os.path.join(out, "best.yaml"), "--epochs", 1, "--out", tmp_path / "again",
                    "--report", "false")
    assert again.returncode == 0, again.stderr


def test_python_api_returns_the_best_and_its_test_accuracy(tmp_path):
    out = str(tmp_path / "tune")
    created_study(out, [BAD, GOOD])
    result = cnnlab.tune({**BASE, "report": False}, {"lr": {"log_uniform": [BAD, 0.1]}}, trials=2, out=out,
                         pruner="none", quiet=True)
    assert result.best_params == {"lr": GOOD} and result.best_val_acc > 0.9
    assert result.test_acc == json.load(open(os.path.join(out, "best", "summary.json")))["test_acc"]
    with pytest.raises(cnnlab.errors.UsageError, match="started with another search space"):   # no mixed studies
        cnnlab.tune({**BASE, "report": False}, {"lr": {"uniform": [0.01, 0.1]}}, trials=3, out=out, quiet=True)


def test_a_failing_trial_is_recorded_and_the_search_goes_on(tmp_path):
    base, space = files(tmp_path, base={"report": False}, space={"model_args.width": {"choice": [0, 4]}})
    out = str(tmp_path / "tune")
    os.makedirs(out)
    study = optuna.create_study(study_name="tune", storage=f"sqlite:///{out}/study.db", direction="maximize")
    study.enqueue_trial({"model_args.width": 0})      # a conv of width 0 cannot be built
    study.enqueue_trial({"model_args.width": 4})
    result = run_cli("tune", "--config", base, "--space", space, "--trials", 2, "--out", out, "--pruner", "none")
    assert result.returncode == 0, result.stderr
    assert "trial 0 failed: model 'mnist_cnn' cannot be built" in result.stderr
    assert [t.state.name for t in open_study(out).get_trials()] == ["FAIL", "COMPLETE"]
    FAULT_REPORT.append("tune: a trial whose model cannot be built -> recorded as failed with its error, "
                        "the next trial ran")


def test_timeout_lets_the_running_trial_finish_and_starts_no_other(tmp_path):
    base, space = files(tmp_path, base={"epochs": 60, "report": False})   # a trial takes over 2 s here
    out = str(tmp_path / "tune")
    result = run_cli("tune", "--config", base, "--space", space, "--trials", 5, "--timeout", 1, "--out", out,
                     "--pruner", "none")
    assert result.returncode == 0, result.stderr
    assert len(counted(open_study(out))) == 1 and len(result.stdout.splitlines()) == 1 + 1 + 2


# ---- interruption and workers --------------------------------------------------------------------------

@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGKILL], ids=["SIGINT", "SIGKILL"])
def test_a_killed_study_resumes_where_it_stopped(tmp_path, signum):
    base, space = files(tmp_path, base={"epochs": 40, "report": False})
    out = str(tmp_path / "tune")
    args = ("--config", base, "--space", space, "--trials", 3, "--out", out, "--pruner", "none")
    proc = start_tune(*args)
    wait_for(os.path.join(out, "trial-0001", "metrics.csv"), proc)    # trial 0 done, trial 1 under way
    os.kill(proc.pid, signum)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == (130 if signum == signal.SIGINT else -signal.SIGKILL)
    if signum == signal.SIGINT:
        assert "tune interrupted" in err and "Traceback" not in err
    first = os.path.getmtime(os.path.join(out, "trial-0000", "metrics.csv"))
    result = run_cli(*("tune",) + args)
    assert result.returncode == 0, result.stderr
    done = counted(open_study(out))
    assert len(done) == 3 and done[0].number == 0                          # trial 0 was kept, not run again
    assert os.path.getmtime(os.path.join(out, "trial-0000", "metrics.csv")) == first
    interrupted = next(t for t in open_study(out).get_trials() if t.number == 1)
    assert interrupted.state.name == "FAIL"
    assert any(t.params == interrupted.params for t in done[1:])        # its settings were tried again
    FAULT_REPORT.append(f"tune: worker killed with signal {signum.name} mid-trial -> re-run finished the study "
                        "(3 trials), trial 0 kept, the stopped trial's settings tried again")


def run_two_workers(tmp_path, out, storage_args, trials):
    """Two `cnnlab tune` processes on one study; returns the trial numbers each one ran."""
    base, space = files(tmp_path, base={"epochs": 2, "report": False})
    args = ("--config", base, "--space", space, "--trials", trials, "--out", out, "--pruner", "none", *storage_args)
    first = start_tune(*args)
    wait_for(os.path.join(out, "trial-0000"), first)   # the study exists: the second worker joins it
    second = start_tune(*args)
    ran = []
    for proc in (first, second):
        stdout, stderr = proc.communicate(timeout=300)
        assert proc.returncode == 0, stderr
        assert stdout.splitlines()[0].startswith("trial")
        ran.append({int(line.split()[1].rstrip(":")) for line in stderr.splitlines() if line.startswith("trial ")})
    return ran


def test_two_workers_share_one_sqlite_study(tmp_path):
    out = str(tmp_path / "tune")
    ran = run_two_workers(tmp_path, out, (), trials=6)
    assert not ran[0] & ran[1] and len(ran[0] | ran[1]) == 6       # no trial run twice, 6 in all
    assert len(counted(open_study(out))) == 6


@pytest.fixture
def postgres_url():
    """A throwaway PostgreSQL cluster in a temporary folder (Debian's `postgresql` package), run as
    the `postgres` user when the tests run as root (the server refuses root)."""
    initdb, pg_ctl = shutil.which("initdb"), shutil.which("pg_ctl")
    if not (initdb and pg_ctl):
        pytest.skip("PostgreSQL binaries (initdb, pg_ctl) are absent: apt-get install -y postgresql")
    pytest.importorskip("psycopg", reason="the PostgreSQL driver SQLAlchemy uses: pip install 'psycopg[binary]'")
    folder = tempfile.mkdtemp(prefix="cnnlab-pg-")   # not tmp_path: its parents are closed to other users
    as_user = []
    if os.geteuid() == 0:
        as_user = ["runuser", "-u", "postgres", "--"]
        shutil.chown(folder, "postgres")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    data = os.path.join(folder, "data")
    subprocess.run(as_user + [initdb, "-D", data, "-U", "postgres", "--auth=trust"], check=True, capture_output=True)
    subprocess.run(as_user + [pg_ctl, "-D", data, "-l", os.path.join(folder, "log"), "-w", "-o",
                              f"-p {port} -k {folder} -c listen_addresses=127.0.0.1", "start"],
                   check=True, capture_output=True, timeout=120)
    yield f"postgresql://postgres@127.0.0.1:{port}/postgres"
    subprocess.run(as_user + [pg_ctl, "-D", data, "-m", "immediate", "stop"], capture_output=True, timeout=120)
    shutil.rmtree(folder, ignore_errors=True)


def test_two_workers_share_one_postgresql_study(tmp_path, postgres_url):
    out = str(tmp_path / "tune")
    ran = run_two_workers(tmp_path, out, ("--storage", postgres_url, "--study", "pg"), trials=4)
    assert not ran[0] & ran[1] and len(ran[0] | ran[1]) == 4
    study = optuna.load_study(study_name="pg", storage=postgres_url)
    assert len(counted(study)) == 4 and not os.path.exists(os.path.join(out, "study.db"))


# ---- bad inputs -------------------------------------------------------------------------------------------

@pytest.mark.parametrize("space, trials, expected", [
    ({"lrr": {"uniform": [0.1, 0.2]}}, 2, "unknown search space key in SPACE (a setting of `cnnlab train`, or "
                                          "model_args.KNOB) 'lrr'. Did you mean 'lr'?"),
    ({"lr": {"loguniform": [1e-4, 1e-1]}}, 2, "unknown distribution for 'lr' in SPACE 'loguniform'. "
                                              "Did you mean 'log_uniform'?"),
    ({"lr": {"log_uniform": [0, 1e-1]}}, 2, "a log scale needs low > 0"),
    ({"lr": {"uniform": [0.1]}}, 2, "needs [low, high] as floats"),
    ({"model": {"choice": ["net", "nett"]}}, 2, "'model' value 'nett'"),
    ({"data": {"choice": ["mnist-5k", "cifar2"]}}, 2, "'data' cannot be searched"),
    ({"lr": {"uniform": [0.1, 0.2]}}, 0, "--trials must be a positive whole number, got 0."),
])
def test_bad_inputs_are_one_line_errors(tmp_path, capsys, space, trials, expected):
    base, space_file = files(tmp_path, space=space)
    out = tmp_path / "tune"
    code = main(["tune", "--config", base, "--space", space_file, "--trials", str(trials), "--out", str(out)])
    err = capsys.readouterr().err.replace(space_file, "SPACE")
    assert code == 2 and len(err.strip().splitlines()) == 1 and expected in err, err
    assert not out.exists()                                  # refused before anything is written
    FAULT_REPORT.append(f"tune: bad input {space} trials={trials} -> exit 2, {err.strip()[:90]}")


def test_a_storage_that_cannot_be_opened_is_one_line(tmp_path, capsys):
    base, space = files(tmp_path)
    code = main(["tune", "--config", base, "--space", space, "--out", str(tmp_path / "tune"),
                 "--storage", "postgresql://cnnlab:secret@127.0.0.1:1/nothing"])
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert "cannot open --storage postgresql://cnnlab:***@127.0.0.1:1/nothing" in err and "secret" not in err
    assert not (tmp_path / "tune").exists()
    FAULT_REPORT.append(f"tune: --storage at a closed port -> exit 2, {err.strip()[:100]}")
