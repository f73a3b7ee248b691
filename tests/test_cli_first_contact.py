"""A user's first minutes with the CLI (issue 14, items 4, 5, 6, 9): --version, recipes by name from
any folder, a bare path as --data, --data-dir wherever data is loaded, stdout that stays one JSON
document, and what is shown before and while a folder decodes. Tiny data, one epoch each."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

import cnnlab
from cnnlab.cli import build_parser
from cnnlab.config import load_yaml

from .conftest import ROOT, run_cli
from .test_data import make_folder, write_cifar

QUICK = ["--epochs", 1, "--report", "false"]


def test_version():
    result = run_cli("--version")
    assert result.returncode == 0 and result.stdout.strip() == f"cnnlab {cnnlab.__version__}"


@pytest.fixture(scope="module")
def cifar_run(tmp_path_factory):
    """One epoch on a tiny CIFAR-10 folder whose files differ from the official checksums (loading
    it prints a note), trained with a relative --data-dir as users do."""
    root = tmp_path_factory.mktemp("cifar")
    write_cifar(root / "cifar-data")
    result = run_cli("train", "--data", "cifar10", "--data-dir", "cifar-data", *QUICK, "--out", "run", cwd=root,
                     env={"CNNLAB_CACHE": str(root / "cache")})
    assert result.returncode == 0, result.stderr
    return root, root / "run"


def test_evaluate_json_stays_json_on_a_first_load(cifar_run, tmp_path):
    root, out = cifar_run
    result = run_cli("evaluate", out, "--json", cwd=root, env={"CNNLAB_CACHE": str(tmp_path / "empty-cache")})
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["samples"] == 20          # stdout is pure JSON...
    assert "note:" in result.stderr                            # ...though the first load said something


def test_evaluate_and_report_take_data_dir(cifar_run, tmp_path):
    root, out = cifar_run
    env = {"CNNLAB_CACHE": str(tmp_path / "cache")}
    lost = run_cli("evaluate", out, cwd=tmp_path, env=env)     # the run's relative data dir is not here
    assert lost.returncode == 1 and "--data-dir" in lost.stderr
    found = run_cli("evaluate", out, "--data-dir", root / "cifar-data", "--json", cwd=tmp_path, env=env)
    assert found.returncode == 0, found.stderr
    assert json.loads(found.stdout)["samples"] == 20
    other = run_cli("evaluate", out, "--data", "cifar2", "--data-dir", root / "cifar-data", cwd=tmp_path, env=env)
    assert other.returncode == 2 and "2 classes" in other.stderr      # found there, then refused
    deep = root / "cifar-data" / "cifar-10-batches-py"                # one level too deep: used all the same
    report = run_cli("report", out, "--data-dir", deep, cwd=tmp_path, env=env)
    assert report.returncode == 0, report.stderr
    assert "folder itself" in report.stderr and (out / "report.html").exists()


def test_bare_paths_as_data(tmp_path):
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "digits.npz", x_train=rng.integers(0, 256, (60, 28, 28), dtype=np.uint8),
             y_train=np.arange(60) % 3)
    env = {"CNNLAB_CACHE": str(tmp_path / "cache")}
    result = run_cli("train", "--data", tmp_path / "digits.npz", *QUICK, cwd=tmp_path, env=env)
    assert result.returncode == 0, result.stderr
    (run,) = os.listdir(tmp_path / "runs")                     # one folder, not a path's worth of them
    assert run.startswith("mnist_cnn-npz-")
    assert load_yaml(tmp_path / "runs" / run / "config.yaml")["data"] == f"npz:{tmp_path / 'digits.npz'}"
    make_folder(tmp_path / "photos")
    check = run_cli("data", "check", tmp_path / "photos", env=env)
    assert check.returncode == 0 and "photos" in check.stdout and "cat" in check.stdout, check.stderr
    missing = run_cli("train", "--data", tmp_path / "nowhere", cwd=tmp_path)
    assert missing.returncode == 2 and "no such folder or .npz file" in missing.stderr
    assert len(missing.stderr.strip().splitlines()) == 1


def test_datasets_command_lists_the_registry(tmp_path):
    from cnnlab.data import datasets

    result = run_cli("datasets", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    names = [line.split()[0] for line in result.stdout.strip().splitlines()[1:]]
    assert names == [d.usage for d in datasets()] and names[:2] == ["mnist-5k", "mnist"]
    assert {"npz:PATH", "folder:PATH", "synthetic[:CxHxW:K:N]", "cifar2"} <= set(names)


def test_recipes_by_name_from_any_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    parse = lambda *argv: build_parser().parse_args(["train", *argv]).config
    assert load_yaml(parse("--config", "seed004_cifar10"))["model"] == "simple_cnn"
    assert load_yaml(parse("--config", "recipes/seed003_mnist.yaml"))["model"] == "mnist_cnn"   # the old path
    (tmp_path / "mine.yaml").write_text("epochs: 3\n")
    assert parse("--config", "mine.yaml") == "mine.yaml"                                       # a file still works
    lr_find = build_parser().parse_args(["lr-find", "--config", "mnist_fast"]).config
    assert load_yaml(lr_find)["model"] == "digits_s2d"


def test_recipes_command_lists_every_recipe(tmp_path):
    result = run_cli("recipes", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    rows = dict(line.split(None, 1) for line in result.stdout.strip().splitlines()[1:])
    recipes = os.path.join(os.path.dirname(cnnlab.__file__), "recipes")
    shipped = sorted(f[:-5] for f in os.listdir(recipes) if f.endswith(".yaml"))
    assert sorted(rows) == shipped and len(shipped) >= 14
    assert rows["seed004_cifar10"].startswith("Seed 004: CIFAR-10 with SimpleCNN")
    typo = run_cli("train", "--config", "seed04_cifar10", cwd=tmp_path)
    assert typo.returncode == 2 and "Did you mean 'seed004_cifar10'" in typo.stderr


def test_training_a_recipe_from_another_folder(tmp_path):
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "tiny.npz", x_train=rng.integers(0, 256, (60, 32, 32, 3), dtype=np.uint8),
             y_train=np.arange(60) % 10)
    # seed 004's own index ranges need CIFAR-10's 50,000 images: this tiny set is split the usual way
    result = run_cli("train", "--config", "seed004_cifar10", "--split-ranges", "", "--data", "tiny.npz", *QUICK, "--out", "r",
                     cwd=tmp_path, env={"CNNLAB_CACHE": str(tmp_path / "cache")})
    assert result.returncode == 0, result.stderr
    assert "model      simple_cnn" in result.stdout and "batch 32" in result.stdout


def merged_output(*args, cache):
    """stdout and stderr in the order the user sees them."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "CNNLAB_CACHE": str(cache)}
    done = subprocess.run([sys.executable, "-m", "cnnlab", *map(str, args)], stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True, cwd=ROOT, env=env, timeout=600)
    assert done.returncode == 0, done.stdout
    return done.stdout


def test_banner_comes_before_a_folder_decodes(tmp_path):
    make_folder(tmp_path / "imgs")
    args = ("train", "--data", f"folder:{tmp_path / 'imgs'}", *QUICK, "--out", tmp_path / "run")
    first = merged_output(*args, cache=tmp_path / "cache")
    order = [first.index(text) for text in ("===== cnnlab train", "first load of 12 images", "decoding 12 images",
                                            "data       folder:")]
    assert order == sorted(order)
    again = merged_output(*args[:-1], tmp_path / "run2", cache=tmp_path / "cache")
    assert "first load" not in again and "decoding" not in again      # cached: nothing to announce


@pytest.fixture(scope="module")
def digit_model(tmp_path_factory):
    out = tmp_path_factory.mktemp("digits") / "run"
    result = run_cli("train", "--data", "synthetic:1x28x28:3:60", *QUICK, "--out", out)
    assert result.returncode == 0, result.stderr
    return out


def test_predict_warns_once_about_unlike_inputs(digit_model, tmp_path):
    rng = np.random.default_rng(0)
    y, x = np.mgrid[0:375, 0:500]
    photo = np.stack([x * 255 // 500, y * 255 // 375, np.full_like(x, 60)], axis=2).astype(np.uint8)
    for name in ("photo.jpg", "photo2.jpg"):      # 500x375 colour photos into a 28x28 grayscale model
        Image.fromarray(photo).save(tmp_path / name)
    Image.fromarray(rng.integers(0, 256, (28, 28), dtype=np.uint8)).save(tmp_path / "digit.png")
    result = run_cli("predict", digit_model, tmp_path / "photo.jpg", tmp_path / "photo2.jpg",
                     tmp_path / "digit.png", "--json")
    assert result.returncode == 0, result.stderr
    assert len(json.loads(result.stdout)) == 3
    warnings = [line for line in result.stderr.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 1 and "photo.jpg (500x375 colour)" in warnings[0] and "1x28x28 grayscale" in warnings[0]
    assert "1 more" in warnings[0]
    alike = run_cli("predict", digit_model, tmp_path / "digit.png")
    assert alike.returncode == 0 and "warning" not in alike.stderr


def test_python_api_names_a_bare_path_like_the_cli(tmp_path, monkeypatch):
    """cnnlab.train(data="/path/x.npz") stores npz:PATH and names the run folder after the source
    kind, as the CLI does (it used to nest the path inside the run folder's name)."""
    path = tmp_path / "tiny.npz"
    rng = np.random.default_rng(0)
    np.savez(path, x_train=rng.integers(0, 256, (60, 8, 8), dtype=np.uint8), y_train=np.arange(60) % 2)
    monkeypatch.chdir(tmp_path)
    result = cnnlab.train(data=str(path), model="net_width", epochs=1, report=False, quiet=True)
    assert result.summary["data"] == f"npz:{path}"
    assert os.path.dirname(result.run_dir) == "runs" and os.path.basename(result.run_dir).startswith("net_width-npz-")


@pytest.mark.parametrize("argv, help_of", [(["data", "check", "x", "--json"], "cnnlab data check"),
                                           (["train", "--bogus", "1"], "cnnlab train"), (["--bogus"], "cnnlab")])
def test_an_unknown_flag_names_the_commands_own_help(argv, help_of):
    """`cnnlab data check DIR --json` pointed at `cnnlab --help`, which lists no flag of data check."""
    result = run_cli(*argv)
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr.strip().endswith(f"(see `{help_of} --help`)"), result.stderr


def test_compare_names_a_missing_run_folder(tmp_path):
    result = run_cli("compare", tmp_path / "nope", tmp_path / "nope2")
    assert result.returncode == 1 and f"run folder not found: {tmp_path / 'nope'}" in result.stderr, result.stderr
