"""Every registered model: shapes, finiteness, gradients, overfitting one batch, and the
parameter counts of the seeds' own code."""
import pytest
import torch
from torch import nn
from torch.nn import functional as F

from cnnlab.errors import UsageError
from cnnlab.models import count_params, create_model, model_names

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
    grads = [p.grad for p in model.parameters()]
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


def test_net_res_deep_100_blocks_trains_a_step():
    model = create_model("net_res_deep", (3, 32, 32), 2, n_blocks=100)
    opt = torch.optim.SGD(model.parameters(), lr=3e-3)
    loss = F.cross_entropy(model(torch.randn(2, 3, 32, 32)), torch.tensor([0, 1]))
    loss.backward()
    opt.step()
    assert torch.isfinite(loss)


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
