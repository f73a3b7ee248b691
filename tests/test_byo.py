"""Bring your own model and data (issue 24): your nn.Module and arrays through cnnlab.train, exact
resume, reloading with the plugin (and only with it), ONNX parity, register_model/register_dataset
plugins on the command line."""

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image

import cnnlab
from cnnlab.config import DataConfig
from cnnlab.data import arrays
from cnnlab.data.registry import open_source
from cnnlab.errors import UsageError
from cnnlab.training.engine import Interrupted

from .conftest import FAULT_REPORT, run_cli
from .test_train import assert_same_weights, interrupt_at_step, metric_rows, weights

# ---- seed 003's network, verbatim (../shared/seeds/003: "五、构建CNN网络"), comments translated
num_classes = 10  # 图片的类别数


class Model(nn.Module):
    def __init__(self):
        super().__init__()
        # 特征提取网络 (feature extraction)
        self.conv1 = nn.Conv2d(1, 32, kernel_size=3)  # 第一层卷积,卷积核大小为3*3
        self.pool1 = nn.MaxPool2d(2)  # 设置池化层,池化核大小为2*2
        self.conv2 = nn.Conv2d(32, 64, kernel_size=3)  # 第二层卷积,卷积核大小为3*3
        self.pool2 = nn.MaxPool2d(2)
        # 分类网络 (classifier)
        self.fc1 = nn.Linear(1600, 64)
        self.fc2 = nn.Linear(64, num_classes)

    # 前向传播
    def forward(self, x):
        x = self.pool1(F.relu(self.conv1(x)))
        x = self.pool2(F.relu(self.conv2(x)))
        x = torch.flatten(x, start_dim=1)
        x = F.relu(self.fc1(x))
        x = self.fc2(x)
        return x
# ---- end of seed 003's code


class Wide(nn.Module):
    """A network with a constructor argument cnnlab cannot see on an instance."""

    def __init__(self, width=8):
        super().__init__()
        self.conv = nn.Conv2d(1, width, 3)
        self.fc = nn.Linear(width, num_classes)

    def forward(self, x):
        return self.fc(F.adaptive_avg_pool2d(F.relu(self.conv(x)), 1).flatten(1))


@pytest.fixture(autouse=True)
def own_registries():
    """The models, datasets and plugins a test registers are gone after it (test_models and
    test_validation build every registered model)."""
    from cnnlab import plugins
    from cnnlab.data.registry import REGISTRY as DATASETS
    from cnnlab.models import REGISTRY as MODELS, model_names

    model_names()   # the built-in families are imported (once per process) before the snapshot
    saved = [(r, dict(r)) for r in (MODELS, DATASETS, plugins.LOADED)]
    yield
    for registry, before in saved:
        registry.clear()
        registry.update(before)


def mnist_arrays(n_train=600, n_test=200):
    """MNIST as a user has it: numpy arrays (the embedded 5k sample, shuffled once)."""
    src = open_source(DataConfig())
    idx = torch.randperm(len(src.train_y), generator=torch.Generator().manual_seed(0))
    x, y = src.train_x[idx].numpy(), src.train_y[idx].numpy()
    return x[:n_train], y[:n_train], x[n_train:n_train + n_test], y[n_train:n_train + n_test]


SMALL = dict(batch_size=50, epochs=2, report=False, quiet=True)   # 540 train images: 11 steps an epoch


def test_seed003_model_trains_resumes_exactly_reloads_with_its_plugin_and_exports(tmp_path, monkeypatch):
    """The issue's "Done when": seed 003's Model, trained on MNIST arrays, interrupted mid-epoch 2
    and resumed to bitwise-equal weights, reloaded in a fresh process only with the plugin, and
    exported to ONNX whose outputs match PyTorch's."""
    data = mnist_arrays()
    torch.manual_seed(0)   # the instance's own initial weights are where a run starts: give both the same
    first = Model()
    torch.manual_seed(0)
    interrupt_at_step(monkeypatch, 15)
    with pytest.raises(Interrupted):
        cnnlab.train(model=Model(), data=data, out=str(tmp_path / "cut"), seed=1, **SMALL)
    monkeypatch.undo()
    cnnlab.train(resume=str(tmp_path / "cut"), model=Model, data=data, quiet=True)
    whole = cnnlab.train(model=first, data=data, out=str(tmp_path / "whole"), seed=1, **SMALL)
    assert whole.summary["test_acc"] > 0.3 and whole.summary["model"] == "tests.test_byo:Model"   # chance: 0.1
    assert_same_weights(weights(tmp_path / "whole"), weights(tmp_path / "cut"))
    assert_same_weights(weights(tmp_path / "whole", "best.pt"), weights(tmp_path / "cut", "best.pt"))
    assert metric_rows(tmp_path / "whole") == metric_rows(tmp_path / "cut")
    assert_same_weights(first.state_dict(), weights(tmp_path / "whole", "best.pt"))   # the instance holds them

    run = tmp_path / "whole"
    digit = tmp_path / "digit.png"
    Image.fromarray(data[2][0, 0]).save(digit)
    refused = run_cli("predict", run, digit)
    assert refused.returncode == 2 and "--plugin" in refused.stderr and "test_byo.py" in refused.stderr, refused.stderr
    assert len(refused.stderr.strip().splitlines()) == 1 and "Traceback" not in refused.stderr
    answered = run_cli("predict", run, digit, "--plugin", "tests.test_byo", "--json")
    assert answered.returncode == 0, answered.stderr
    expected = cnnlab.load(run).predict([data[2][0, 0]])[0][0]["label"]
    assert f'"label": "{expected}"' in answered.stdout
    exported = run_cli("export", run, "--format", "onnx", "--plugin", "tests.test_byo", "--out", tmp_path / "m.onnx")
    assert exported.returncode == 0, exported.stderr
    onnx_model, torch_model = cnnlab.load(tmp_path / "m.onnx"), cnnlab.load(run)   # the .onnx needs no user code
    batch = torch.from_numpy(data[2][:32])
    assert torch.allclose(onnx_model.probabilities(batch), torch.softmax(torch_model.logits(batch), 1), atol=1e-5)
    assert whole.summary["test_acc"] == pytest.approx(cnnlab.evaluate(run, plugins=["tests.test_byo"])["accuracy"])


@pytest.mark.parametrize("layout", ["NCHW uint8", "NHWC uint8", "NHWC float", "NHW float64", "torch NCHW float",
                                    "Dataset"])
def test_every_array_layout_is_the_same_data(layout):
    """(N, C, H, W), (N, H, W, C), (N, H, W), uint8 or floats in [0, 1], numpy, torch or a Dataset
    of ToTensor-like items: one set of pixels, so one memory:ID (the oracle: the uint8 NCHW arrays)."""
    x, y, xt, yt = mnist_arrays(100, 20)
    reference = arrays.memory_name((x, y, xt, yt))
    float01 = lambda a: a.astype(np.float32) / 255
    given = {"NCHW uint8": lambda a: a, "NHWC uint8": lambda a: a.transpose(0, 2, 3, 1),
             "NHWC float": lambda a: float01(a.transpose(0, 2, 3, 1)), "NHW float64": lambda a: a[:, 0] / 255.0,
             "torch NCHW float": lambda a: torch.from_numpy(float01(a))}
    if layout == "Dataset":
        as_set = lambda a, b: torch.utils.data.TensorDataset(torch.from_numpy(float01(a)), torch.from_numpy(b))
        name = arrays.memory_name((as_set(x, y), as_set(xt, yt)))
    else:
        name = arrays.memory_name((given[layout](x), y, given[layout](xt), yt))
    assert name == reference
    assert torch.equal(arrays.MEMORY[name[len("memory:"):]].train_x, torch.from_numpy(x))


@pytest.mark.parametrize("bad, words", [
    (lambda x, y: ((x.astype(np.float32) - 128) / 64, y), "drop any Normalize"),
    (lambda x, y: (np.repeat(x, 5, axis=1), y), "1 (grayscale) or 3 (RGB) channels"),
    (lambda x, y: (x, y[:-1]), "one class index per image"),
    (lambda x, y: (x, y - 1), "labels are class indices"),
    (lambda x, y: (x, y, x), "got 3 item(s)"),
], ids=["normalised", "5-channels", "short-labels", "negative-label", "three-items"])
def test_bad_arrays_are_refused_in_one_line(bad, words):
    x, y, _, _ = mnist_arrays(60, 0)
    with pytest.raises(UsageError, match=None) as e:
        cnnlab.train(model=Model(), data=bad(x, y), epochs=1, report=False, quiet=True)
    assert words in str(e.value) and "\n" not in str(e.value)


def test_wrong_class_count_names_both_numbers(tmp_path):
    x, y, _, _ = mnist_arrays(200, 0)
    keep = y < 3
    with pytest.raises(UsageError) as e:
        cnnlab.train(model=Model(), data=(x[keep], y[keep]), epochs=1, out=str(tmp_path / "r"), report=False, quiet=True)
    assert "(10,) per image, but the data has 3 classes" in str(e.value)


def test_an_instance_with_arguments_cnnlab_cannot_see_is_refused_the_class_with_them_trains(tmp_path):
    data = mnist_arrays(200, 50)
    with pytest.raises(UsageError, match=r"model=Wide, model_args=\{\.\.\.\}"):
        cnnlab.train(model=Wide(width=4), data=data, epochs=1, out=str(tmp_path / "a"), report=False, quiet=True)
    result = cnnlab.train(model=Wide(width=4), model_args={"width": 4}, data=data, epochs=1, out=str(tmp_path / "b"),
                          report=False, quiet=True)
    assert result.summary["model_args"] == {"width": 4} and result.summary["num_params"] == 4 * 9 + 4 + 4 * 10 + 10


class Flattens(nn.Module):
    """Tutorial style: `x.view(-1, n)`, which fails on the NHWC tensors cnnlab trains with."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3, stride=2)
        self.fc = nn.Linear(4 * 13 * 13, num_classes)

    def forward(self, x):
        return self.fc(F.relu(self.conv(x)).view(-1, 4 * 13 * 13))


def test_a_network_that_flattens_with_view_trains_predicts_and_exports(tmp_path):
    data = mnist_arrays(200, 50)
    run = str(tmp_path / "r")
    cnnlab.train(model=Flattens(), data=data, epochs=1, ema=0.9, out=run, report=False, quiet=True)
    model = cnnlab.load(run)
    assert len(model.predict(list(data[2][:3, 0]))) == 3
    assert cnnlab.export(run, "onnx", out=str(tmp_path / "f.onnx")).endswith("f.onnx")
    assert "to" in vars(model.net)   # kept NCHW (plugins.keep_nchw)
    assert "to" not in vars(torch_model_of(Model))   # a network that takes NHWC keeps it (no wrapper)


def torch_model_of(cls):
    from cnnlab.models import create_model
    from cnnlab.plugins import add_model, import_path

    return create_model(add_model(import_path(cls), cls), (1, 28, 28), 10)


def test_resuming_without_the_arrays_says_to_pass_them_again(tmp_path, monkeypatch):
    data = mnist_arrays(200, 50)
    cnnlab.train(model=Model, data=data, epochs=1, out=str(tmp_path / "r"), report=False, quiet=True)
    monkeypatch.setattr(arrays, "MEMORY", {})   # as in a new Python process
    with pytest.raises(UsageError, match="pass the same arrays or Dataset again"):
        cnnlab.train(resume=str(tmp_path / "r"), model=Model, epochs=2, quiet=True)


PLUGIN = '''
import pathlib

import numpy as np
import torch.nn as nn

import cnnlab

pathlib.Path(__file__).with_name("imported.txt").write_text("imported")   # a side effect: was it run?


@cnnlab.register_model("tiny_byo")
class Tiny(nn.Module):
    def __init__(self, in_shape, num_classes, width=4):
        super().__init__()
        self.net = nn.Sequential(nn.Conv2d(in_shape[0], width, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                                 nn.Linear(width, num_classes))

    def forward(self, x):
        return self.net(x)


@cnnlab.register_dataset("stripes_byo", shape="1x12x12", classes=2)
def stripes():
    """horizontal or vertical stripes"""
    rng = np.random.default_rng(0)
    y = np.arange(300) % 2
    lines = (np.arange(12) % 4 < 2) * 200
    x = np.where(y[:, None, None] == 0, lines[:, None], lines[None, :]) + rng.integers(0, 50, (300, 12, 12))
    return x.astype(np.uint8), y
'''


def test_a_plugin_file_adds_a_model_and_a_dataset_to_the_cli_and_is_imported_only_when_given(tmp_path):
    plugin = tmp_path / "myplugin.py"
    plugin.write_text(PLUGIN)
    run = tmp_path / "run"
    trained = run_cli("train", "--plugin", plugin, "--model", "tiny_byo", "--model-arg", "width=6", "--data",
                      "stripes_byo", "--epochs", 1, "--out", run, "--report", "false")
    assert trained.returncode == 0, trained.stderr
    (tmp_path / "imported.txt").unlink()
    refused = run_cli("evaluate", run)
    assert refused.returncode == 2 and f"({plugin})" in refused.stderr and "--plugin" in refused.stderr, refused.stderr
    assert not (tmp_path / "imported.txt").exists()   # reading the checkpoint ran none of the plugin's code
    evaluated = run_cli("evaluate", run, "--plugin", plugin, "--json")
    assert evaluated.returncode == 0 and '"accuracy"' in evaluated.stdout, evaluated.stderr
    resumed = run_cli("train", "--resume", run, "--epochs", 2, "--plugin", plugin)
    assert resumed.returncode == 0, resumed.stderr
    listed = run_cli("models", "--plugin", plugin, "--data", "stripes_byo")
    assert "tiny_byo" in listed.stdout and "your own: myplugin:Tiny" in listed.stdout, listed.stderr


def test_a_checkpoint_naming_a_library_function_as_its_model_runs_nothing(tmp_path):
    """A tampered best.pt whose model is "os:system" with a shell command for argument: refused,
    with or without `plugins=["os"]`, and the command never runs."""
    data = mnist_arrays(200, 50)
    cnnlab.train(model=Model, data=data, epochs=1, out=str(tmp_path / "r"), report=False, quiet=True)
    path = tmp_path / "r" / "best.pt"
    ckpt = torch.load(path, weights_only=True)
    marker = tmp_path / "pwned"
    ckpt["model"].update(name="os:system", args={"command": f"touch {marker}"}, plugin="os")
    torch.save(ckpt, path)
    for plugins in ([], ["os"]):
        with pytest.raises(cnnlab.errors.CnnlabError, match="os:system' is your own code"):
            cnnlab.load(path, plugins=plugins)
    assert not marker.exists()
    FAULT_REPORT.append("byo: best.pt rewritten to name model os:system(command='touch ...'): load refused it, "
                        "with and without plugins=['os']; the command never ran")


def test_lr_find_takes_your_own_model_and_arrays():
    curve = cnnlab.lr_find(model=Model, data=mnist_arrays(300, 0), batch_size=32)
    assert len(curve.lrs) == len(curve.losses) > 10 and 1e-7 <= curve.suggestion <= 10


def test_notebooks_show_a_result_and_a_model_with_their_pictures(tmp_path):
    """Jupyter renders _repr_html_: the summary, and the curves and confusion matrix embedded (a
    notebook cannot show files outside its folder by path)."""
    import base64

    result = cnnlab.train(data="mnist-5k", model="mnist_cnn", epochs=1, train_samples=300, test_samples=100,
                          out=str(tmp_path / "r"), quiet=True)
    page = result._repr_html_()
    for name in ("curves", "confusion"):
        with open(tmp_path / "r" / f"{name}.png", "rb") as f:
            assert base64.b64encode(f.read()).decode("ascii") in page, name
    assert f"{result.summary['test_acc']}" in page
    model_page = cnnlab.load(result.run_dir)._repr_html_()
    assert "mnist_cnn" in model_page and "data:image/png;base64," in model_page and "1x28x28" in model_page
