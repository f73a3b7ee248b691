"""Learning-rate schedules: `cnnlab.training.optim.lr_factor` over whole random runs, against
torch.optim.lr_scheduler's own schedulers and against formulas written out by hand."""
import io
import math

import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from torch.optim import lr_scheduler as S

from cnnlab.config import make_config
from cnnlab.training.optim import lr_factor


@st.composite
def runs(draw, schedules=("constant", "step", "cosine", "onecycle"), whole_warmup=True):
    """(config, steps_per_epoch). Warm-ups span whole epochs and stop before the end unless
    `whole_warmup` is False, when they are any fraction of the run (up to all of it)."""
    schedule, epochs = draw(st.sampled_from(schedules)), draw(st.integers(1, 8))
    if whole_warmup:
        warmup = float(draw(st.integers(0, epochs - 1)))
    else:
        warmup = draw(st.floats(0, epochs, exclude_min=True))
    cfg = make_config({"schedule": schedule, "epochs": epochs, "warmup_epochs": warmup,
                       "step_epochs": draw(st.integers(1, epochs + 1)), "gamma": draw(st.floats(0.01, 1))})
    return cfg, draw(st.integers(1, 30))


def ours(cfg, steps_per_epoch):
    return [lr_factor(cfg, step, steps_per_epoch) for step in range(cfg.epochs * steps_per_epoch)]


def torch_schedule(cfg, steps_per_epoch):
    """The same run as torch's schedulers: LinearLR warm-up, then StepLR, CosineAnnealingLR or
    (one-cycle) a LinearLR decay to 0, chained by SequentialLR; factors read before each step."""
    total, warm = cfg.epochs * steps_per_epoch, int(cfg.warmup_epochs * steps_per_epoch)
    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0)
    ramp = (warm or total // 4) if cfg.schedule == "onecycle" else warm
    after = {"constant": lambda: S.ConstantLR(opt, factor=1.0, total_iters=0),
             "step": lambda: S.StepLR(opt, step_size=steps_per_epoch * cfg.step_epochs, gamma=cfg.gamma),
             "cosine": lambda: S.CosineAnnealingLR(opt, T_max=total - warm),
             "onecycle": lambda: S.LinearLR(opt, 1.0, 0.0, total_iters=total - ramp)}[cfg.schedule]
    if ramp:
        warmup = S.LinearLR(opt, start_factor=1 / ramp, end_factor=1.0, total_iters=ramp - 1)
        scheduler = S.SequentialLR(opt, [warmup, after()], milestones=[ramp])
    else:
        scheduler = after()
    factors = []
    for _ in range(total):
        factors.append(opt.param_groups[0]["lr"])
        opt.step()
        scheduler.step()
    return factors


@settings(max_examples=150, deadline=None)
@given(runs())
def test_schedules_match_torch_schedulers(run):
    cfg, steps_per_epoch = run
    total, warm = cfg.epochs * steps_per_epoch, cfg.warmup_epochs * steps_per_epoch
    # torch's StepLR counts from the end of the warm-up, ours from step 0 (see the hand formula below)
    assume(not (cfg.schedule == "step" and warm))
    # a one-cycle ramp of total/4 steps needs a whole number of steps to have a LinearLR twin
    assume(not (cfg.schedule == "onecycle" and not warm and total % 4))
    assert ours(cfg, steps_per_epoch) == pytest.approx(torch_schedule(cfg, steps_per_epoch), rel=1e-9, abs=1e-12)


@settings(max_examples=150, deadline=None)
@given(runs(), st.data())
def test_schedules_match_hand_formulas(run, data):
    """Any step of any run, with the formulas spelled out: a linear warm-up over W steps, then
    gamma^(epoch // step_epochs) counted from step 0, a half cosine over the steps after W, or
    (one-cycle) a linear climb over R = W (else total/4) steps and a linear fall to 0 at the end."""
    cfg, n = run
    total, warm = cfg.epochs * n, int(cfg.warmup_epochs) * n
    step = data.draw(st.integers(0, total - 1))
    if cfg.schedule == "onecycle":
        ramp = warm or total / 4
        assume(ramp == int(ramp))
        expected = (step + 1) / ramp if step < ramp else (total - step) / (total - ramp)
    elif step < warm:
        expected = (step + 1) / warm
    else:
        expected = {"constant": 1.0, "step": cfg.gamma ** (step // (n * cfg.step_epochs)),
                    "cosine": (1 + math.cos(math.pi * (step - warm) / (total - warm))) / 2}[cfg.schedule]
    assert lr_factor(cfg, step, n) == pytest.approx(expected, rel=1e-12, abs=1e-15)


@settings(max_examples=300, deadline=None)
@given(runs(whole_warmup=False))
def test_lr_never_exceeds_the_peak(run):
    """The configured lr is the peak: no step of any run, whatever its warm-up, goes above it."""
    cfg, steps_per_epoch = run
    factors = ours(cfg, steps_per_epoch)
    assert all(0 <= f <= 1 for f in factors), max(factors)


@given(optimizer=st.sampled_from(["sgd", "adam", "adamw"]), lr=st.floats(1e-4, 0.5),
       momentum=st.sampled_from([0.0, 0.5, 0.9]), nesterov=st.booleans(), weight_decay=st.sampled_from([0.0, 5e-4, 0.1]),
       seed=st.integers(0, 2**16))
@settings(max_examples=40, deadline=None)
def test_build_optimizer_steps_exactly_as_torch_optim(optimizer, lr, momentum, nesterov,
                                                                         weight_decay, seed):
    """build_optimizer's updates are those of torch.optim built by hand from what the settings mean
    (nesterov only with momentum, weight decay as the optimizer's own), bit for bit: SGD's
    single-tensor path (foreach=True is bit-identical but measured no faster on the CPU), Adam's
    and AdamW's fused kernel."""
    from cnnlab.training.optim import build_optimizer

    torch.manual_seed(seed)
    ours_net = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3), torch.nn.Flatten(), torch.nn.Linear(4 * 6 * 6, 3))
    plain_net = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3), torch.nn.Flatten(), torch.nn.Linear(4 * 6 * 6, 3))
    plain_net.load_state_dict(ours_net.state_dict())
    cfg = make_config({"optimizer": optimizer, "lr": lr, "momentum": momentum, "nesterov": nesterov,
                       "weight_decay": weight_decay})
    ours_opt = build_optimizer(cfg, ours_net)
    if optimizer == "sgd":
        plain_opt = torch.optim.SGD(plain_net.parameters(), lr=lr, momentum=momentum,
                                    nesterov=nesterov and momentum > 0, weight_decay=weight_decay)
    else:
        kind = torch.optim.Adam if optimizer == "adam" else torch.optim.AdamW
        plain_opt = kind(plain_net.parameters(), lr=lr, weight_decay=weight_decay, fused=True)
    g = torch.Generator().manual_seed(seed)
    for _ in range(5):
        x, y = torch.randn(8, 1, 8, 8, generator=g), torch.randint(0, 3, (8,), generator=g)
        for net, opt in ((ours_net, ours_opt), (plain_net, plain_opt)):
            opt.zero_grad()
            torch.nn.functional.cross_entropy(net(x), y).backward()
            opt.step()
    for a, b in zip(ours_net.parameters(), plain_net.parameters()):
        assert torch.equal(a, b)


def torch_twin(kind):
    """cnnlab's CPU optimizer and the torch.optim one whose steps and state dict it reproduces."""
    from cnnlab.training import cpu_optim

    if kind == "sgd":
        return cpu_optim.SGD, torch.optim.SGD
    decoupled = kind == "adamw"
    return (lambda groups, **kw: cpu_optim.Adam(groups, decoupled=decoupled, **kw),
            lambda groups, **kw: (torch.optim.AdamW if decoupled else torch.optim.Adam)(groups, fused=True, **kw))


@given(kind=st.sampled_from(["sgd", "adam", "adamw"]), momentum=st.sampled_from([0.0, 0.9]), nesterov=st.booleans(),
       weight_decay=st.sampled_from([0.0, 5e-4]), mult=st.sampled_from([1.0, 0.1]), ours_first=st.booleans(),
       seed=st.integers(0, 2**16))
@settings(max_examples=40, deadline=None)
def test_cpu_optimizer_state_dicts_move_between_cnnlab_and_torch_optim(kind, momentum, nesterov, weight_decay, mult,
                                                                       ours_first, seed):
    """cnnlab's CPU SGD and Adam save torch.optim's state dict layouts: a checkpoint of either, loaded
    into the other half-way, continues bit for bit as the one that saved it (momentum buffers, Adam's
    moments and step counts, the backbone group's lr_mult), and a grad-less parameter is skipped by both."""
    from cnnlab.training.optim import set_lr

    torch.manual_seed(seed)
    nets = [torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3), torch.nn.Flatten(), torch.nn.Linear(4 * 6 * 6, 3), torch.nn.Linear(3, 3))
            for _ in range(3)]
    for net in nets[1:]:
        net.load_state_dict(nets[0].state_dict())
    kinds = torch_twin(kind) if ours_first else torch_twin(kind)[::-1]
    kinds = (kinds[0], kinds[0], kinds[1])   # [reference, first half, second half]
    settings_ = (dict(momentum=momentum, nesterov=nesterov and momentum > 0) if kind == "sgd" else {})

    def groups(net):   # the last layer gets no gradient
        return [{"params": list(net[0].parameters()), "lr_mult": mult}, {"params": list(net[2].parameters()), "lr_mult": 1.0},
                {"params": list(net[3].parameters()), "lr_mult": 1.0}]
    opts = [make(groups(net), lr=0.1, weight_decay=weight_decay, **settings_) for make, net in zip(kinds, nets)]
    opts[2].param_groups[0]["lr_mult"] = 1 / 3   # the saved group settings must replace it
    g = torch.Generator().manual_seed(seed)
    batches = [(torch.randn(8, 1, 8, 8, generator=g), torch.randint(0, 3, (8,), generator=g)) for _ in range(6)]

    def save(state):
        buffer = io.BytesIO()
        torch.save(state, buffer)
        return buffer.getvalue()

    def train(net, opt, part):
        for x, y in part:
            set_lr(opt, 0.05)
            opt.zero_grad()
            torch.nn.functional.cross_entropy(net[:3](x), y).backward()
            opt.step()
    train(nets[0], opts[0], batches)
    train(nets[1], opts[1], batches[:3])
    nets[2].load_state_dict(nets[1].state_dict())
    opts[2].load_state_dict(torch.load(io.BytesIO(save(opts[1].state_dict())), weights_only=True))   # as in last.pt
    train(nets[2], opts[2], batches[3:])
    for a, b in zip(nets[0].parameters(), nets[2].parameters()):
        assert torch.equal(a, b)


@pytest.mark.parametrize("kind", ["sgd", "adam"])
def test_a_loaded_state_takes_the_parameters_layout(kind):
    """The fused Adam kernel assumes a parameter, its gradient and its buffers share one memory
    layout: a channels_last buffer loaded against an NCHW parameter (a run resumed with
    --channels-last changed) updated the weights wrongly without a word. Loaded buffers now take
    the parameter's layout, and the continuation equals the one from same-layout buffers."""
    ours, _ = torch_twin(kind)
    torch.manual_seed(0)
    conv = [torch.nn.Conv2d(3, 4, 3) for _ in range(2)]
    conv[1].load_state_dict(conv[0].state_dict())
    x = torch.randn(2, 3, 6, 6)
    opt = ours(list(conv[0].parameters()), lr=0.01, **({"momentum": 0.9} if kind == "sgd" else {}))
    conv[0](x).square().sum().backward()
    opt.step()
    saved = opt.state_dict()
    conv[1].load_state_dict(conv[0].state_dict())
    twisted = {i: {k: v.contiguous(memory_format=torch.channels_last) if torch.is_tensor(v) and v.ndim == 4 else v
                   for k, v in s.items()} for i, s in saved["state"].items()}
    continued = []
    for net, state in ((conv[0], saved["state"]), (conv[1], twisted)):
        fresh = ours(list(net.parameters()), lr=0.01, **({"momentum": 0.9} if kind == "sgd" else {}))
        fresh.load_state_dict({"state": state, "param_groups": saved["param_groups"]})
        net.zero_grad()
        net(x).square().sum().backward()
        fresh.step()
        continued.append(net.weight.detach().clone())
    assert torch.equal(continued[0], continued[1])


def test_an_adam_state_with_amsgrad_is_refused():
    """cnnlab's CPU Adam has no amsgrad or maximize: a torch.optim state dict using one is refused,
    not followed as plain Adam."""
    from cnnlab.training.cpu_optim import Adam

    p = torch.nn.Parameter(torch.ones(3))
    theirs = torch.optim.Adam([p], lr=0.1, amsgrad=True)
    p.grad = torch.ones(3)
    theirs.step()
    with pytest.raises(ValueError, match="amsgrad"):
        Adam([torch.nn.Parameter(torch.ones(3))], lr=0.1).load_state_dict(theirs.state_dict())
