"""Self-describing safe checkpoints; predict (export: test_onnx.py)."""
import glob
import json
import os
import pickle
import re

import pytest
import torch
from torch.nn import functional as F

import cnnlab
from cnnlab.training.checkpoint import load as load_checkpoint
from cnnlab.training.checkpoint import save as save_checkpoint
from cnnlab.config import make_config
from cnnlab.errors import CnnlabError
from cnnlab.models import create_model
from cnnlab.training.checkpoint import payload

from .conftest import SHARED, run_cli


def test_load_gives_identical_logits(tmp_path):
    """A model trained in memory, saved by training's own payload() and checkpoint.save(), computes
    the same logits once loaded: weights, batch-norm statistics, model args (as the CLI gives them,
    strings), eval mode and the per-channel normalisation all survive the file."""
    torch.manual_seed(0)
    args, mean, std = {"n_chans1": "8"}, [0.2, 0.5, 0.7], [0.3, 0.2, 0.25]
    net = create_model("net_bn", (3, 16, 16), 3, **args)
    x, y = torch.randint(0, 256, (6, 3, 16, 16), dtype=torch.uint8), torch.arange(6) % 3
    normalised = (x.float() / 255 - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    for _ in range(3):  # move the weights and the running statistics away from their initial values
        opt.zero_grad()
        F.cross_entropy(net(normalised), y).backward()
        opt.step()
    net.eval()
    with torch.no_grad():
        expected = net(normalised)
    meta = {"model": "net_bn", "model_args": args, "in_shape": [3, 16, 16], "classes": ["a", "b", "c"],
            "preprocess": {"channels": 3, "image_size": 16, "mean": mean, "std": std, "invert": False}}
    save_checkpoint(payload(net.state_dict(), meta, make_config({"model": "net_bn", "model_args": args})),
                    tmp_path / "m.pt")
    loaded = cnnlab.load(tmp_path / "m.pt")
    torch.testing.assert_close(loaded.logits(x), expected, rtol=1e-5, atol=1e-5)
    assert loaded.classes == ["a", "b", "c"]


def test_checkpoint_describes_itself(demo_run):
    model, ckpt = cnnlab.load(demo_run), load_checkpoint(demo_run)
    assert model.classes == [str(i) for i in range(10)] and ckpt["model"]["name"] == "mnist_cnn"
    assert set(ckpt["preprocess"]) >= {"channels", "image_size", "mean", "std", "invert"}
    assert ckpt["config"]["data"] == "mnist-5k"


def test_predict_api_accepts_arrays_images_and_paths(demo_run, shared_datasets):
    from PIL import Image

    model = cnnlab.load(demo_run)
    path = os.path.join(shared_datasets, "samples", "mnist_07_9.png")
    img = Image.open(path)
    import numpy as np

    arr = np.asarray(img)
    outs = model.predict([path, img, arr, arr / 255.0], top_k=2)
    assert len(outs) == 4 and all(len(o) == 2 for o in outs)
    assert len({o[0]["label"] for o in outs}) == 1
    assert abs(sum(p["probability"] for p in model.predict(path, top_k=10)[0]) - 1) < 1e-5


def test_predict_cli_on_real_samples(demo_run, shared_datasets):
    files = sorted(glob.glob(os.path.join(shared_datasets, "samples", "mnist_*.png")))
    result = run_cli("predict", demo_run, *files, "--json")
    assert result.returncode == 0, result.stderr
    rows = json.loads(result.stdout)
    right = sum(r["predictions"][0]["label"] == re.findall(r"_(\d+)\.png$", r["path"])[0] for r in rows)
    assert len(rows) == 20 and right >= 17, right


def test_predict_reports_bad_files_and_goes_on(demo_run, tmp_path):
    from PIL import Image

    Image.new("L", (28, 28), 0).save(tmp_path / "good.png")
    (tmp_path / "bad.png").write_bytes(b"")
    result = run_cli("predict", demo_run, tmp_path, "--json")
    assert result.returncode == 1
    rows = {os.path.basename(r["path"]): r for r in json.loads(result.stdout)}
    assert "predictions" in rows["good.png"] and "error" in rows["bad.png"]
    text = run_cli("predict", demo_run, tmp_path / "bad.png")
    (line,) = [line for line in text.stderr.splitlines() if "error" in line and "bad.png" in line]
    assert line.count("bad.png") == 1, line          # was "bad.png: error: bad.png: not an image ..."


@pytest.mark.parametrize("k", [0, -3])
def test_predict_refuses_a_top_k_below_one(demo_run, tmp_path, k):
    """--top-k 0 printed a path and nothing else (exit 0); a negative k crashed inside torch.topk.
    Both are one line, exit 2, before anything is loaded; the Python API refuses them too."""
    from PIL import Image

    import cnnlab
    from cnnlab.errors import UsageError

    Image.new("L", (28, 28), 0).save(tmp_path / "digit.png")
    result = run_cli("predict", demo_run, tmp_path / "digit.png", "--top-k", k)
    assert result.returncode == 2 and result.stdout == "", result.stdout
    assert result.stderr.count("\n") == 1 and f"--top-k {k}" in result.stderr and "Traceback" not in result.stderr
    with pytest.raises(UsageError, match="at least 1"):
        cnnlab.load(demo_run).predict([str(tmp_path / "digit.png")], top_k=k)
    served = run_cli("serve", demo_run, "--top-k", k, "--port", 0, timeout=120)   # refused before it listens
    assert served.returncode == 2 and f"--top-k {k}" in served.stderr and "Traceback" not in served.stderr


class Marker:
    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


def test_pickle_with_code_is_refused_and_never_runs(tmp_path):
    marker = tmp_path / "marker"
    bad = tmp_path / "evil.pt"
    torch.save({"format": "cnnlab-checkpoint", "payload": Marker(str(marker))}, bad)
    assert not marker.exists()
    with pytest.raises(CnnlabError, match="refused"):
        load_checkpoint(str(bad))
    assert not marker.exists()
    with open(tmp_path / "raw.pkl", "wb") as f:
        pickle.dump(Marker(str(marker)), f)
    result = run_cli("predict", tmp_path / "raw.pkl", os.path.join(SHARED, "samples", "mnist_07_9.png"))
    assert result.returncode == 1 and "Traceback" not in result.stderr and not marker.exists()


def test_truncated_and_foreign_files(demo_run, tmp_path):
    data = open(os.path.join(demo_run, "best.pt"), "rb").read()
    (tmp_path / "cut.pt").write_bytes(data[: len(data) // 2])
    with pytest.raises(CnnlabError, match="not a readable checkpoint"):
        load_checkpoint(str(tmp_path / "cut.pt"))
    (tmp_path / "text.pt").write_text("hello")
    with pytest.raises(CnnlabError, match="not a readable checkpoint"):
        load_checkpoint(str(tmp_path / "text.pt"))
    torch.save({"a": 1}, tmp_path / "dict.pt")
    with pytest.raises(CnnlabError, match="not a cnnlab checkpoint"):
        load_checkpoint(str(tmp_path / "dict.pt"))


def test_bare_state_dict_gets_a_helpful_message(tmp_path):
    torch.save(torch.nn.Linear(2, 2).state_dict(), tmp_path / "bare.pt")
    with pytest.raises(CnnlabError, match="bare state_dict.*load_state_dict"):
        load_checkpoint(str(tmp_path / "bare.pt"))


def test_checkpoint_for_a_different_class_count(demo_run, tmp_path):
    ckpt = load_checkpoint(demo_run)
    ckpt["model"]["num_classes"], ckpt["classes"] = 7, ckpt["classes"][:7]   # the weights still have 10 outputs
    torch.save(ckpt, tmp_path / "wrong.pt")
    with pytest.raises(CnnlabError, match="do not fit"):
        cnnlab.load(tmp_path / "wrong.pt")


def test_version_1_checkpoints_are_upgraded_and_newer_ones_refused(tmp_path):
    """Version 1 (before the Preprocess object and Progress.lr) still loads, in today's layout."""
    net = create_model("lenet5", (1, 28, 28), 10)
    optimizer = torch.optim.SGD(net.parameters(), lr=0.05)
    v1 = {"format": "cnnlab-checkpoint", "version": 1, "classes": [str(i) for i in range(10)],
          "model": {"name": "lenet5", "args": {}, "in_shape": [1, 28, 28], "num_classes": 10},
          "preprocess": {"channels": 1, "image_size": 28, "mean": [0.1], "std": [0.3], "invert": False},
          "config": {}, "metrics": {}, "state_dict": net.state_dict(),
          "train_state": {"optimizer": optimizer.state_dict(), "ema": None, "rng": {},
                          "progress": {"epoch": 1, "step": 0, "global_step": 9, "sums": [0.0, 0, 0]}}}
    torch.save(v1, tmp_path / "v1.pt")
    ckpt = load_checkpoint(str(tmp_path / "v1.pt"))
    assert ckpt["version"] == 2 and ckpt["preprocess"]["resize"] == "stretch"
    assert ckpt["train_state"]["progress"]["lr"] == 0.05
    assert cnnlab.load(tmp_path / "v1.pt").classes[0] == "0"
    torch.save({**v1, "version": 99}, tmp_path / "v99.pt")
    with pytest.raises(CnnlabError, match="newer cnnlab.*version 99"):
        load_checkpoint(str(tmp_path / "v99.pt"))


def test_a_text_file_or_a_missing_onnx_file_as_the_model_is_one_plain_line(tmp_path, shared_datasets):
    """A text file given as the checkpoint said "(... another kind of file: 105)", a number from
    inside the unpickler; a missing .onnx file got onnxruntime's NO_SUCHFILE dump."""
    sample = os.path.join(shared_datasets, "samples", "mnist_00_7.png")
    (tmp_path / "note.txt").write_text("hi\n")
    text = run_cli("predict", tmp_path / "note.txt", sample)
    assert text.returncode == 1 and "not a torch.save file, or damaged" in text.stderr
    gone = run_cli("predict", tmp_path / "gone.onnx", sample)
    assert gone.returncode == 1 and "no such ONNX file" in gone.stderr and "NO_SUCHFILE" not in gone.stderr
    for result in (text, gone):
        assert result.stderr.count("\n") == 1 and "Traceback" not in result.stderr
