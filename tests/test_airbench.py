"""airbench's network (models/airbench.py) and what it asks of training: a whitening layer set from
the data before the first step (training/finetune.adapt_to_data), batch-norm shifts with their own
lr (optim.param_groups), fixed parameters that stay fixed."""
import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.nn import functional as F

import cnnlab
from cnnlab.config import make_config
from cnnlab.data import load_data
from cnnlab.models import create_model
from cnnlab.models.airbench import BIAS_LR, Whiten
from cnnlab.training.finetune import adapt_to_data
from cnnlab.training.optim import build_optimizer, set_lr

TINY = dict(data="mnist-5k", model="airbench", model_args={"width": 8}, train_samples=200, val_samples=50,
            test_samples=50, batch_size=50, report=False)


@given(channels=st.integers(1, 3), seed=st.integers(0, 2**16), scale=st.floats(0.01, 100))
@settings(max_examples=25, deadline=None)
def test_whitened_patches_have_the_covariance_numpy_predicts(channels, seed, scale):
    """Over correlated random images: the adapted filters turn 2x2 patches into uncorrelated
    features of variance lambda / (lambda + eps), lambda the patch covariance's eigenvalues (numpy's
    eigh, largest first); the second half of the filters is the first's negative."""
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(channels, channels, generator=g, dtype=torch.float64)
    x = torch.einsum("dc,nchw->ndhw", mix, torch.randn(40, channels, 9, 9, generator=g, dtype=torch.float64)) * scale
    x = x + F.avg_pool2d(x, 3, 1, 1)                       # neighbouring pixels correlated too
    layer = Whiten(channels).double()
    layer.adapt(x)
    patches = F.unfold(x, 2).transpose(1, 2).reshape(-1, channels * 4).numpy()
    eigenvalues = np.linalg.eigh(patches.T @ patches / len(patches))[0][::-1]
    k = channels * 4
    filters = layer.weight.reshape(2 * k, k).numpy()
    features = patches @ filters[:k].T
    covariance = features.T @ features / len(features)
    np.testing.assert_allclose(covariance, np.diag(eigenvalues / (eigenvalues + layer.eps)), atol=1e-6, rtol=1e-6)
    np.testing.assert_array_equal(filters[k:], -filters[:k])


@given(lr=st.floats(1e-4, 2.0), weight_decay=st.sampled_from([0.0, 1e-3, 0.05]), momentum=st.sampled_from([0.0, 0.85]),
       seed=st.integers(0, 2**16))
@settings(max_examples=30, deadline=None)
def test_a_parameters_own_lr_mult_scales_its_lr_but_not_its_decay(lr, weight_decay, momentum, seed):
    """build_optimizer on airbench steps exactly as torch.optim.SGD given by hand: batch-norm shifts
    at lr x BIAS_LR with weight decay / BIAS_LR (airbench's param groups), the rest at lr."""
    torch.manual_seed(seed)
    ours = create_model("airbench", (1, 12, 12), 3, width=4)
    plain = create_model("airbench", (1, 12, 12), 3, width=4)
    plain.load_state_dict(ours.state_dict())
    cfg = make_config({"optimizer": "sgd", "lr": lr, "momentum": momentum, "nesterov": momentum > 0,
                       "weight_decay": weight_decay})
    ours_opt = build_optimizer(cfg, ours)
    set_lr(ours_opt, lr)   # as every training step does first
    shifts = [p for n, p in plain.named_parameters() if p.requires_grad and getattr(p, "lr_mult", 1) != 1]
    rest = [p for n, p in plain.named_parameters() if p.requires_grad and getattr(p, "lr_mult", 1) == 1]
    assert len(shifts) == 6 and all(p.dim() == 1 for p in shifts)
    plain_opt = torch.optim.SGD([{"params": rest}, {"params": shifts, "lr": lr * BIAS_LR,
                                                   "weight_decay": weight_decay / BIAS_LR}],
                                lr=lr, momentum=momentum, nesterov=momentum > 0, weight_decay=weight_decay)
    g = torch.Generator().manual_seed(seed)
    for _ in range(3):
        x, y = torch.randn(6, 1, 12, 12, generator=g), torch.randint(0, 3, (6,), generator=g)
        for net, opt in ((ours, ours_opt), (plain, plain_opt)):
            opt.zero_grad()
            F.cross_entropy(net(x), y).backward()
            opt.step()
    for a, b in zip(ours.parameters(), plain.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


def test_models_without_own_lr_mults_keep_one_group():
    cfg = make_config({"optimizer": "sgd"})
    assert len(build_optimizer(cfg, create_model("resnet_small", (3, 32, 32), 10)).param_groups) == 1


def test_a_new_run_whitens_from_its_seeded_sample_and_init_keeps_the_loaded_filters(tmp_path):
    """The run's saved filters are adapt_to_data's on the same data and seed (not the random
    init); a run started from it with --init (another seed) keeps them; the fixed batch-norm scales
    stay 1 through training, also when --freeze-epochs frees the backbone again."""
    first = cnnlab.train(**TINY, epochs=1, out=str(tmp_path / "a"), quiet=True)
    saved = torch.load(tmp_path / "a" / "best.pt", weights_only=True)["state_dict"]
    data = load_data(make_config({k: v for k, v in TINY.items() if k not in ("model", "model_args", "report",
                                                                                "batch_size")}).data_config())
    rows = torch.randperm(len(data.train[0]), generator=torch.Generator().manual_seed(0)).sort().values
    mean, std = (torch.tensor(v).view(1, -1, 1, 1) for v in (data.mean, data.std))
    expected = Whiten(1)
    expected.adapt((data.train[0][rows].float() / 255 - mean) / std)   # all 200 images: fewer than 5,000
    torch.testing.assert_close(saved["0.weight"], expected.weight, rtol=1e-5, atol=1e-5)
    assert first.summary["epochs"] == 1

    cnnlab.train(**TINY, epochs=2, freeze_epochs=1, seed=5, init=str(tmp_path / "a"), out=str(tmp_path / "b"),
                 quiet=True)
    tuned = torch.load(tmp_path / "b" / "best.pt", weights_only=True)["state_dict"]
    torch.testing.assert_close(tuned["0.weight"], saved["0.weight"], rtol=0, atol=0)
    scales = [v for k, v in tuned.items() if k.endswith(".weight") and v.dim() == 1]
    assert len(scales) == 6 and all(torch.equal(v, torch.ones_like(v)) for v in scales)


def test_unfreezing_the_backbone_leaves_a_networks_fixed_parameters_fixed():
    """--freeze-epochs' FreezeBackbone: in the frozen epoch only the head trains; after it,
    everything that trained as built, and still not airbench's fixed batch-norm scales."""
    from types import SimpleNamespace

    from cnnlab.training.finetune import FreezeBackbone

    model = create_model("airbench", (3, 32, 32), 10, width=8)
    state = SimpleNamespace(cfg=SimpleNamespace(freeze_epochs=1), ctx=SimpleNamespace(world=1), model=model,
                            progress=SimpleNamespace(epoch=0), data=SimpleNamespace(classes=list(range(10))))
    hook = FreezeBackbone()
    hook.on_setup(state)
    fixed = {n for n, p in model.named_parameters() if not p.requires_grad}
    assert len(fixed) == 6
    hook.on_epoch_start(state)
    assert {n for n, p in model.named_parameters() if p.requires_grad} == {"7.weight"}   # the linear head
    state.progress.epoch = 1
    hook.on_epoch_start(state)
    assert {n for n, p in model.named_parameters() if not p.requires_grad} == fixed


def test_lookahead_with_ema_is_refused():
    from cnnlab.errors import UsageError

    with pytest.raises(UsageError, match="give one of them"):
        make_config({"lookahead": True, "ema": 0.999})


def test_large_images_are_whitened_from_fewer_of_them():
    """At 224 px, 5,000 images would be 9 GB of patches: the sample holds at most 5 million pixel
    positions (100 images), as airbench's 5,000 CIFAR images do."""
    from types import SimpleNamespace

    seen = []
    model = torch.nn.Sequential(Whiten(3))
    model[0].adapt = lambda x: seen.append(x.shape)
    images = torch.zeros(300, 3, 224, 224, dtype=torch.uint8)
    data = SimpleNamespace(train=(images, None), shape=(3, 224, 224), input_size=0,
                           preprocess=SimpleNamespace(normalise=lambda x: x.float()))
    adapt_to_data(model, data, seed=0)
    assert seen == [(99, 3, 224, 224)]


def test_the_network_starts_as_identity_convolutions_and_takes_any_size():
    model = create_model("airbench", (3, 64, 48), 5, width=8)
    for conv in (model[2][0].weight, model[3][4].weight):   # 24 -> 8 channels, 32 -> 32
        k = min(conv.shape[:2])
        identity = torch.zeros(k, conv.shape[1], 3, 3)
        identity[range(k), range(k), 1, 1] = 1
        assert torch.equal(conv[:k], identity)
    assert model(torch.randn(2, 3, 64, 48)).shape == (2, 5)


@given(height=st.integers(2, 20), width=st.integers(2, 20), channels=st.integers(1, 3))
@settings(max_examples=25, deadline=None)
def test_images_too_small_for_the_network_get_a_usage_error(height, width, channels):
    """Sides under 9 px pool away to nothing: refused when the network is built, naming the size to
    give, instead of a max-pool's RuntimeError at the first step; every other size trains a step."""
    from cnnlab.errors import UsageError

    if min(height, width) < 9:
        with pytest.raises(UsageError, match="at least 9 px a side.*--image-size 9"):
            create_model("airbench", (channels, height, width), 3, width=4)
        return
    model = create_model("airbench", (channels, height, width), 3, width=4)
    F.cross_entropy(model(torch.randn(2, channels, height, width)), torch.tensor([0, 2])).backward()


@pytest.mark.parametrize("shape", [(1, 28, 28), (3, 32, 32)])
def test_adapting_twice_to_the_same_images_is_the_same(shape):
    torch.manual_seed(0)
    layer = Whiten(shape[0])
    x = torch.randn(20, *shape)
    layer.adapt(x)
    once = layer.weight.clone()
    layer.adapt(x)
    assert torch.equal(layer.weight, once)


class AirbenchLookahead:
    """The oracle: airbench94's own LookaheadState and alpha schedule (legacy/airbench94.py), as
    its training loop calls them; the schedule in float64, as cnnlab computes it (airbench's float32
    decays differ in the 8th digit)."""

    def __init__(self, net, total):
        self.net_ema = {k: v.clone() for k, v in net.state_dict().items()}
        self.alpha = 0.95**5 * (torch.arange(total + 1, dtype=torch.float64) / total) ** 3
        self.total = total

    def update(self, net, decay):
        for ema_param, net_param in zip(self.net_ema.values(), net.state_dict().values()):
            if net_param.dtype in (torch.half, torch.float):
                ema_param.lerp_(net_param, 1 - decay)
                net_param.copy_(ema_param)

    def after_step(self, net, step):
        if step % 5 == 0:
            self.update(net, decay=self.alpha[step].item())
        if step >= self.total:
            self.update(net, decay=1.0)


@given(total=st.integers(1, 23), seed=st.integers(0, 2**16))
@settings(max_examples=30, deadline=None)
def test_lookahead_matches_airbenchs_own_code(total, seed):
    """Random SGD steps on a net with batch norm (float statistics, an integer step count): after
    each, cnnlab's Lookahead and airbench's code (above) leave the two copies of the net equal."""
    from cnnlab.training.lookahead import Lookahead

    torch.manual_seed(seed)
    ours = torch.nn.Sequential(torch.nn.Conv2d(2, 3, 3), torch.nn.BatchNorm2d(3), torch.nn.Flatten(), torch.nn.Linear(12, 2))
    theirs = torch.nn.Sequential(torch.nn.Conv2d(2, 3, 3), torch.nn.BatchNorm2d(3), torch.nn.Flatten(), torch.nn.Linear(12, 2))
    theirs.load_state_dict(ours.state_dict())
    lookahead, oracle = Lookahead(ours), AirbenchLookahead(theirs, total)
    optimizers = [torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9) for net in (ours, theirs)]
    g = torch.Generator().manual_seed(seed)
    for step in range(1, total + 1):
        x, y = torch.randn(5, 2, 4, 4, generator=g), torch.randint(0, 2, (5,), generator=g)
        for net, opt in zip((ours, theirs), optimizers):
            opt.zero_grad()
            F.cross_entropy(net(x), y).backward()
            opt.step()
        lookahead.after_step(step, total)
        oracle.after_step(theirs, step)
        for (name, a), b in zip(ours.state_dict().items(), theirs.state_dict().values()):
            torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6, msg=f"{name} after step {step}")
    assert torch.equal(ours.state_dict()["1.num_batches_tracked"], torch.tensor(total))


def test_an_airbench_run_with_lookahead_resumes_exactly(tmp_path, monkeypatch):
    """4 steps an epoch, 3 epochs: cut after step 7 (between two pulls of the slow copy, in an odd
    epoch of altflip's); the resumed run ends with the uninterrupted run's weights and metrics."""
    from .test_train import assert_resume_is_exact

    settings = {**TINY, "epochs": 3, "optimizer": "sgd", "lr": 0.05, "nesterov": True, "weight_decay": 5e-4,
                "schedule": "onecycle", "lookahead": True, "augment": "crop+altflip", "crop_padding_mode": "reflect"}
    assert_resume_is_exact(settings, tmp_path, monkeypatch, stop_step=7)


@pytest.mark.parametrize("recipe", ["cifar10_fast", "cifar10_cpu"])
def test_the_cifar_recipes_train_an_epoch(recipe, tmp_path):
    """Every setting of the recipe works with the others (one step on 300 CIFAR-shaped images)."""
    from cnnlab.cli import recipe_path
    from cnnlab.config import load_yaml

    result = cnnlab.train(config=make_config(load_yaml(recipe_path(recipe))), data="synthetic:3x32x32:10:400", epochs=1, out=str(tmp_path / recipe),
                          report=False, quiet=True)
    assert result.summary["epochs"] == 1 and 0 <= result.summary["test_acc"] <= 1


def test_airbench_learns_digits_on_two_ddp_processes(tmp_path):
    """Two ranks of 25 digits a batch, with --lookahead: with airbench's BN eps of 1e-12 this run
    stayed at chance (channels of no variance on a rank scaled by 1e6); it must learn."""
    from .conftest import run_cli

    result = run_cli("train", "--nproc", "2", "--data", "mnist-5k", "--model", "airbench", "--model-arg", "width=8",
                     "--train-samples", "400", "--val-samples", "100", "--test-samples", "100", "--batch-size", "50",
                     "--epochs", "2", "--optimizer", "sgd", "--lr", "0.5", "--momentum", "0.85", "--nesterov",
                     "--lookahead", "--report", "false", "--out", tmp_path / "ddp")
    assert result.returncode == 0, result.stderr[-2000:]
    import json
    summary = json.load(open(tmp_path / "ddp" / "summary.json"))
    assert summary["test_acc"] > 0.2, summary   # chance: 0.1
