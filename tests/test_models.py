"""Every registered model: shapes, finiteness, gradients, overfitting one batch, the parameter
counts of the seeds' own code, and how --model-arg values are read."""
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn
from torch.nn import functional as F

from cnnlab.errors import UsageError
from cnnlab.models import REGISTRY, count_params, create_model, model_names, parse_knob

from .conftest import run_cli
from .test_config import bool_spellings, not_a_bool_word

SHAPES = {"mnist": ((1, 28, 28), 10), "cifar": ((3, 32, 32), 10)}


@pytest.mark.parametrize("name", model_names())
@pytest.mark.parametrize("shape", SHAPES)
def test_forward_backward(name, shape):
    in_shape, k = SHAPES[shape]
    torch.manual_seed(0)
    model = create_model(name, in_shape, k)
    x = torch.randn(4, *in_shape)
    out = model(x)
    assert out.shape == (4, k) and torch.isfinite(out).all()
    F.cross_entropy(out, torch.arange(4) % k).backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]   # airbench's BN scales are fixed
    assert all(g is not None and torch.isfinite(g).all() for g in grads)


@pytest.mark.parametrize("name", model_names())
def test_overfits_one_batch(name):
    torch.manual_seed(0)
    model = create_model(name, (3, 32, 32), 4)
    x, y = torch.randn(8, 3, 32, 32), torch.arange(8) % 4
    opt = torch.optim.Adam(model.parameters(), lr=1e-3 if name == "vgg13_style" else 3e-3)  # deep, no BN
    for _ in range(60):
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    assert (model(x).argmax(1) == y).float().mean() == 1.0, f"{name} could not fit 8 images (loss {loss.item():.3f})"


# Parameter counts of the seeds' own classes on their own input shapes (../shared/seeds).
SEED_COUNTS = [("deeplizard_network", (1, 28, 28), 10, 32998), ("lenet5", (1, 32, 32), 10, 61706),
               ("mnist_cnn", (1, 28, 28), 10, 121930), ("simple_cnn", (3, 32, 32), 10, 296130),
               ("net", (3, 32, 32), 2, 18090), ("net_width", (3, 32, 32), 2, 38386)]


@pytest.mark.parametrize("name,shape,k,expected", SEED_COUNTS)
def test_parameter_counts_match_the_seeds(name, shape, k, expected):
    assert count_params(create_model(name, shape, k)) == expected


class SeedNetDepth(nn.Module):
    """Seed 002's NetDepth, verbatim, as the oracle."""

    def __init__(self, n_chans1=32):
        super().__init__()
        self.n_chans1 = n_chans1
        self.conv1 = nn.Conv2d(3, n_chans1, kernel_size=3, padding=1)
        self.conv2 = nn.Conv2d(n_chans1, n_chans1 // 2, kernel_size=3, padding=1)
        self.conv3 = nn.Conv2d(n_chans1 // 2, n_chans1 // 2, kernel_size=3, padding=1)
        self.fc1 = nn.Linear(4 * 4 * n_chans1 // 2, 32)
        self.fc2 = nn.Linear(32, 2)

    def forward(self, x):
        out = F.max_pool2d(torch.relu(self.conv1(x)), 2)
        out = F.max_pool2d(torch.relu(self.conv2(out)), 2)
        out = F.max_pool2d(torch.relu(self.conv3(out)), 2)
        out = out.view(-1, 4 * 4 * self.n_chans1 // 2)
        return self.fc2(torch.relu(self.fc1(out)))


def test_net_depth_computes_what_the_seed_computes():
    ours, seed = create_model("net_depth", (3, 32, 32), 2), SeedNetDepth()
    seed_params = [seed.conv1, seed.conv2, seed.conv3, seed.fc1, seed.fc2]
    ours_params = [m for m in ours.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    for a, b in zip(ours_params, seed_params):
        a.load_state_dict(b.state_dict())
    x = torch.randn(5, 3, 32, 32)
    assert torch.allclose(ours(x), seed(x), atol=1e-6)
    assert count_params(ours) == count_params(seed)


def test_net_res_deep_blocks_have_their_own_weights():
    model = create_model("net_res_deep", (3, 32, 32), 2, n_blocks=3)
    convs = [m.conv.weight for m in model.modules() if m.__class__.__name__ == "ResBlock"]
    assert len(convs) == 3 and len({w.data_ptr() for w in convs}) == 3
    assert not torch.equal(convs[0], convs[1])
    block = next(m for m in model.modules() if m.__class__.__name__ == "ResBlock")
    assert torch.all(block.batch_norm.weight == 0.5) and torch.all(block.batch_norm.bias == 0)


def test_net_res_deep_100_blocks_trains():
    """100 blocks deep, every part learns: each parameter gets a non-zero gradient and moves, and
    the loss on a fixed batch falls. 8x8 images keep it cheap; depth, not image size, is under test."""
    torch.manual_seed(0)
    model = create_model("net_res_deep", (3, 8, 8), 2, n_blocks=100)
    assert sum(m.__class__.__name__ == "ResBlock" for m in model.modules()) == 100
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    x, y = torch.randn(8, 3, 8, 8), torch.arange(8) % 2
    opt = torch.optim.Adam(model.parameters(), lr=1e-4)
    losses = []
    for step in range(6):
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        if step == 0:
            no_grad = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
        opt.step()
        losses.append(loss.item())
    assert not no_grad, f"no gradient reached {no_grad[:3]}"
    unchanged = [n for n, p in model.named_parameters() if torch.equal(p, before[n])]
    assert not unchanged, f"a step did not move {unchanged[:3]}"
    assert all(map(math.isfinite, losses)) and losses[-1] < losses[0] / 2, losses


def test_net_bn_has_a_norm_per_conv():
    model = create_model("net_bn", (3, 32, 32), 2)
    norms = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    assert [n.num_features for n in norms] == [32, 16]


def test_knobs_change_the_model():
    assert count_params(create_model("net_width", (3, 32, 32), 2, n_chans1=64)) > 38386


def test_unknown_model_and_knob():
    with pytest.raises(UsageError, match="Did you mean 'lenet5'"):
        create_model("lenet", (1, 28, 28), 10)
    with pytest.raises(UsageError, match="n_chans1"):
        create_model("net_width", (3, 32, 32), 2, n_chan1=8)


def toy_linear(in_shape, num_classes, bias=True):
    """A builder with a boolean knob, which the zoo itself does not have yet."""
    return nn.Linear(in_shape[0], num_classes, bias=bias)


@pytest.mark.parametrize("text,has_bias", [("false", False), ("no", False), ("0", False), ("True", True), ("yes", True)])
def test_boolean_knob_reads_false_as_false(monkeypatch, text, has_bias):
    """--model-arg bias=false arrives as the string 'false'; bool('false') is True."""
    monkeypatch.setitem(REGISTRY, "toy_linear", toy_linear)
    assert (create_model("toy_linear", (4, 1, 1), 2, bias=text).bias is not None) == has_bias


@given(bool_spellings())
def test_boolean_knobs_read_every_spelling(case):
    text, meaning = case
    assert parse_knob("toy", "bias", True, text) is meaning


@given(not_a_bool_word)
def test_other_text_for_a_boolean_knob_is_one_usage_line(text):
    with pytest.raises(UsageError, match="bias must be true or false") as e:
        parse_knob("toy", "bias", True, text)
    assert "\n" not in str(e.value) and "'toy'" in str(e.value)


@given(st.integers(-10**9, 10**9))
def test_int_knobs_take_whole_numbers_as_text_or_numbers(n):
    assert parse_knob("net_width", "n_chans1", 32, str(n)) == parse_knob("net_width", "n_chans1", 32, n) == n


fractions = st.floats(allow_nan=False, allow_infinity=False).filter(lambda x: not x.is_integer())


@given(st.one_of(fractions, fractions.map(repr), st.sampled_from(["", "wide", "3x", "1e3", "true", "²", True])))
def test_int_knobs_refuse_anything_else(value):
    """int(2.7) would silently give 2 (a YAML 2.7); a fraction or a word names the knob instead."""
    with pytest.raises(UsageError, match="n_chans1 must be a whole number"):
        parse_knob("net_width", "n_chans1", 32, value)


@given(st.floats(allow_nan=False, allow_infinity=False))
def test_float_knobs_take_finite_numbers(x):
    assert parse_knob("net_dropout", "p", 0.4, repr(x)) == parse_knob("net_dropout", "p", 0.4, x) == x


@given(st.sampled_from(["nan", "inf", "-inf", "high", "", "1,5"]))
def test_float_knobs_refuse_anything_else(text):
    with pytest.raises(UsageError, match="p must be a finite number"):
        parse_knob("net_dropout", "p", 0.4, text)


def test_knob_value_the_builder_refuses_is_a_usage_error():
    with pytest.raises(UsageError, match=r"net_dropout.*'p': 1.5.*dropout probability"):
        create_model("net_dropout", (3, 32, 32), 2, p="1.5")


def test_bad_model_arg_on_the_command_line_is_one_line(tmp_path):
    result = run_cli("train", "--model", "net_dropout", "--model-arg", "p=1.5", "--out", tmp_path / "never")
    assert result.returncode == 2 and "dropout probability" in result.stderr, result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and not (tmp_path / "never").exists()


def test_the_zoo_reads_registered_shapes_and_loads_the_rest(tmp_path):
    """`cnnlab models --data cifar10` needs no CIFAR files (its registration gives the shape);
    a generated or file dataset is loaded to learn it."""
    from cnnlab.models.zoo import data_shape

    assert data_shape("cifar10", str(tmp_path / "nowhere")) == ((3, 32, 32), 10)
    assert data_shape("synthetic:3x20x20:4:40", "data") == ((3, 20, 20), 4)


def test_models_listing_marks_the_networks_a_tiny_input_cannot_take():
    """A network too deep for 8x8 inputs is one row saying so, not the end of the listing."""
    from cnnlab.models.zoo import list_models

    table = list_models("synthetic:1x8x8:2:40")
    assert "lenet5" in table and "does not fit this input" in table
    assert "digits_fast" in table and len(table.splitlines()) > 5


@settings(max_examples=15, deadline=None)
@given(channels=st.sampled_from([1, 3]), height=st.integers(4, 20).map(lambda k: 2 * k + 1), width=st.integers(9, 40))
def test_digits_s2d_folds_an_odd_side_as_a_zero_row_or_column(channels, height, width):
    """digits_s2d on an odd-sized image computes what the same weights give on the image with a zero
    row and column added at the bottom and right (PixelUnshuffle needs even sides); its parameters'
    names do not depend on the size."""
    torch.manual_seed(0)
    odd = create_model("digits_s2d", (channels, height, width), 5).eval()
    even = create_model("digits_s2d", (channels, height + height % 2, width + width % 2), 5).eval()
    even.load_state_dict(odd.state_dict())
    x = torch.randn(3, channels, height, width)
    padded = F.pad(x, (0, width % 2, 0, height % 2))
    with torch.no_grad():
        torch.testing.assert_close(odd(x), even(padded), rtol=0, atol=0)
