"""tv/ and timm/ networks by name, and --weights: what loads, what is adapted, what is refused."""
import os
import urllib.error
import warnings

import pytest
import torch

import cnnlab
from cnnlab.errors import CnnlabError, UsageError
from cnnlab.models import check_model_name, create_model
from cnnlab.models.backbones import backbone_names, build_backbone, head_names
from cnnlab.models.weights import cached_download, fit_weights, resolve_weights, torchvision_entry

from .conftest import FAULT_REPORT, run_cli

# One model of each torchvision family (all 80 take minutes on a busy 2-core machine). Left out:
# maxvit_t (its 7x7 windows need sides that are multiples of 224).
FAMILIES = ["alexnet", "convnext_tiny", "densenet121", "efficientnet_b0", "efficientnet_v2_s", "googlenet",
            "inception_v3", "mnasnet0_5", "mobilenet_v2", "mobilenet_v3_small", "regnet_y_400mf", "resnet18", "resnext50_32x4d",
            "shufflenet_v2_x0_5", "squeezenet1_1", "swin_t", "swin_v2_t", "vgg11_bn", "vit_b_32", "wide_resnet50_2"]


@pytest.mark.parametrize("name", [f"tv/{n}" for n in FAMILIES])
def test_every_torchvision_model_takes_gray_inputs_and_the_datas_classes(name):
    """Built on the meta device (shapes only, no memory): a 1-channel 96x96 input gives 3 logits."""
    with torch.device("meta"), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        net = build_backbone(name, (1, 96, 96), 3).eval()
        out = net(torch.empty(2, 1, 96, 96))
    assert out.shape == (2, 3)
    assert len(head_names(net, 3)) >= 1   # the head a freeze leaves trainable is found


def test_a_real_backbone_trains_a_step_on_gray_images():
    torch.manual_seed(0)
    net = create_model("tv/mobilenet_v3_small", (1, 32, 32), 4)
    loss = torch.nn.functional.cross_entropy(net(torch.randn(3, 1, 32, 32)), torch.tensor([0, 1, 3]))
    loss.backward()
    assert torch.isfinite(loss) and all(torch.isfinite(p.grad).all() for p in net.parameters() if p.grad is not None)


def test_unknown_backbones_get_the_closest_name():
    with pytest.raises(UsageError, match="Did you mean 'tv/resnet18'"):
        check_model_name("tv/resnet81")
    result = run_cli("train", "--model", "tv/efficientnet_b9", "--epochs", "1")
    assert result.returncode == 2 and len(result.stderr.strip().splitlines()) == 1
    assert "tv/efficientnet_b" in result.stderr and "Traceback" not in result.stderr


def test_timm_models_by_name():
    pytest.importorskip("timm", reason="timm is an optional extra (cnnlab[timm])")
    net = create_model("timm/resnet18", (1, 32, 32), 5)
    assert net(torch.randn(2, 1, 32, 32)).shape == (2, 5)
    with pytest.raises(UsageError, match="Did you mean 'timm/resnet18'"):
        check_model_name("timm/resnet81")


def rgb_imagenet_weights(path, name="tv/resnet18"):
    """A 3-channel 1000-class state_dict of `name` (random weights: shapes are what matters) saved as torch does."""
    torch.manual_seed(1)
    state = build_backbone(name, (3, 224, 224), 1000).state_dict()
    torch.save(state, path)
    return state


def test_pretrained_rgb_weights_fit_a_gray_two_class_network(tmp_path):
    """Oracle: plain tensor arithmetic. The stem is the RGB kernel summed over its input channels,
    the head is new, every other tensor is the file's."""
    theirs = rgb_imagenet_weights(tmp_path / "w.pth")
    net = build_backbone("tv/resnet18", (1, 32, 32), 2)
    head_before = net.fc.weight.clone()
    state, source, entry = resolve_weights(str(tmp_path / "w.pth"), "tv/resnet18")
    text = fit_weights(net, state, 2, source, "tv/resnet18")
    mine = net.state_dict()
    assert torch.allclose(mine["conv1.weight"], theirs["conv1.weight"].sum(1, keepdim=True))
    assert torch.equal(net.fc.weight, head_before)
    assert all(torch.equal(mine[k], theirs[k]) for k in theirs if k not in ("conv1.weight", "fc.weight", "fc.bias"))
    assert "summed over RGB" in text and "fc.weight, fc.bias re-made for 2 classes" in text and entry is None


def test_weights_for_another_architecture_are_refused_in_one_line(tmp_path):
    extra = set(rgb_imagenet_weights(tmp_path / "r34.pth", "tv/resnet34")) - set(
        build_backbone("tv/resnet18", (3, 224, 224), 1000).state_dict())
    net = build_backbone("tv/resnet18", (3, 32, 32), 2)
    state, source, _ = resolve_weights(str(tmp_path / "r34.pth"), "tv/resnet18")
    with pytest.raises(CnnlabError) as e:
        fit_weights(net, state, 2, source, "tv/resnet18")
    message = str(e.value)
    assert f"0 keys missing, {len(extra)} unexpected" in message and "looks like weights for tv/resnet34" in message
    assert "\n" not in message
    FAULT_REPORT.append(f"resnet34 weights given to tv/resnet18: refused, '0 keys missing, {len(extra)} unexpected', "
                        "architecture guessed as tv/resnet34")


class Boom:
    """Unpickling this would create a file: the proof that code ran."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_a_weights_file_that_would_run_code_is_refused_and_nothing_runs(tmp_path):
    marker = tmp_path / "ran"
    torch.save({"conv1.weight": torch.zeros(1), "evil": Boom(str(marker))}, tmp_path / "evil.pth")
    result = run_cli("train", "--model", "tv/resnet18", "--weights", tmp_path / "evil.pth", "--epochs", "1",
                     "--train-samples", "20", "--out", tmp_path / "run")
    assert result.returncode == 1 and "was refused" in result.stderr and "Traceback" not in result.stderr
    assert not marker.exists()
    FAULT_REPORT.append("a .pth whose pickle opens a file given as --weights: refused, exit 1, the file never created")


def test_safetensors_weights_load(tmp_path):
    safetensors = pytest.importorskip("safetensors.torch", reason="safetensors comes with the timm extra")
    theirs = build_backbone("tv/mobilenet_v3_small", (3, 32, 32), 2).state_dict()
    safetensors.save_file({k: v.contiguous() for k, v in theirs.items()}, str(tmp_path / "w.safetensors"))
    net = build_backbone("tv/mobilenet_v3_small", (3, 32, 32), 2)
    state, source, _ = resolve_weights(str(tmp_path / "w.safetensors"), "tv/mobilenet_v3_small")
    fit_weights(net, state, 2, source, "tv/mobilenet_v3_small")
    assert all(torch.equal(v, theirs[k]) for k, v in net.state_dict().items())


def test_default_weights_offline_name_the_file_and_the_folder(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))

    def offline(url, dst, **kw):
        raise urllib.error.URLError("no network")
    monkeypatch.setattr(torch.hub, "download_url_to_file", offline)
    entry = torchvision_entry("tv/resnet18", "DEFAULT")
    with pytest.raises(CnnlabError) as e:
        cached_download(entry)
    folder = os.path.join(str(tmp_path / "hub"), "checkpoints")
    assert "resnet18-f37072fd.pth" in str(e.value) and folder in str(e.value) and "\n" not in str(e.value)
    with pytest.raises(UsageError, match="IMAGENET1K_V1"):
        torchvision_entry("tv/resnet18", "IMAGENET9K")
    FAULT_REPORT.append("--weights DEFAULT with the download failing: one line naming resnet18-f37072fd.pth and "
                        "the hub checkpoints folder")


def test_a_published_weights_file_brings_its_preprocessing_into_the_checkpoint(tmp_path):
    """A file named as torchvision publishes it (resnet18-f37072fd.pth) is those weights: the run
    normalises with ImageNet's mean/std, and the checkpoint rebuilds the model from its name alone."""
    path = tmp_path / "resnet18-f37072fd.pth"
    rgb_imagenet_weights(path)
    result = cnnlab.train(data="mnist-5k", model="tv/resnet18", weights=str(path), epochs=1, train_samples=64,
                          val_samples=32, test_samples=32, out=str(tmp_path / "run"), report=False, quiet=True)
    model = cnnlab.load(result.run_dir)
    assert model.preprocess.mean == [pytest.approx((0.485 + 0.456 + 0.406) / 3)]   # gray: RGB's average
    x = torch.randint(0, 255, (1, 28, 28), dtype=torch.uint8)
    assert model.predict(x.numpy()[0])   # rebuilt from "tv/resnet18" in the file, no code, no download


def test_the_family_listing_counts_like_plain_pytorch():
    """Oracle: torchvision's resnet18 built on the CPU and counted by torch's FLOP counter."""
    import torchvision
    from torch.utils.flop_counter import FlopCounterMode

    from cnnlab.models.zoo import list_backbones

    row = list_backbones("torchvision", "cifar2", image_size=64, contains="resnet18").splitlines()[-1].split()
    net = torchvision.models.resnet18(num_classes=2).eval()
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        net(torch.zeros(1, 3, 64, 64))
    assert row[0] == "tv/resnet18" and int(row[1].replace(",", "")) == sum(p.numel() for p in net.parameters())
    assert float(row[2]) == pytest.approx(counter.get_total_flops() / 1e6, abs=0.1)


def test_the_family_listing_refuses_a_negative_size_and_marks_what_does_not_fit():
    """--image-size -5 was an internal error (ViT's AssertionError); a size a network cannot take
    is one marked row, the others are still counted."""
    from cnnlab.errors import UsageError
    from cnnlab.models.zoo import list_backbones

    with pytest.raises(UsageError, match="--image-size -5"):
        list_backbones("torchvision", "cifar2", image_size=-5, contains="resnet18")
    rows = list_backbones("torchvision", "cifar2", image_size=20, contains="vit_b_16").splitlines()[2:]
    assert rows and all("does not fit this input" in row for row in rows)


def test_unobtainable_starting_weights_fail_before_the_data_is_decoded(tmp_path, monkeypatch):
    """`--weights DEFAULT` offline decoded a whole photo folder at 224 px before the download failed;
    a missing --weights file or --init run did the same. Now they stop before the data is read."""
    import cnnlab.training.loop

    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    monkeypatch.setattr(torch.hub, "download_url_to_file", lambda url, dst, **kw: (_ for _ in ()).throw(OSError("offline")))
    monkeypatch.setattr(cnnlab.training.loop, "load_data", lambda *a, **k: pytest.fail("the data was loaded"))
    for settings, error in (({"model": "tv/resnet18", "weights": "DEFAULT"}, "cannot download"),
                            ({"model": "tv/resnet18", "weights": str(tmp_path / "w.pth")}, "no such file"),
                            ({"init": str(tmp_path / "no-run")}, "checkpoint not found")):
        with pytest.raises(CnnlabError, match=error):
            cnnlab.train(data="synthetic", epochs=1, out=str(tmp_path / "run"), quiet=True, **settings)
        assert not (tmp_path / "run").exists()
