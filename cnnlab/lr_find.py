"""`cnnlab lr-find`: the LR range test (Smith 2017; fastai's lr_find). The LR grows exponentially
from 1e-7 to 10 over up to 100 steps; we stop when the loss explodes and suggest the LR of the
steepest descent of the smoothed loss."""
import math

from torch.nn import functional as F

from .data import default_augment, load_data
from .data.loader import BatchLoader
from .models import create_model
from .optim import build_optimizer, set_lr
from .plots import save_lr_find
from .runtime import setup


def lr_find(cfg, out="lr_find.png", start=1e-7, end=10.0, steps=100):
    ctx = setup(cfg)
    data = load_data(cfg)
    model = create_model(cfg.model, data.shape, len(data.classes), **cfg.model_args).to(ctx.device)
    optimizer = build_optimizer(cfg, model)
    loader = BatchLoader(*data.train, cfg.batch_size, data.mean, data.std, ctx.device, shuffle=True,
                         seed=cfg.seed, augment=default_augment(data, cfg.augment))
    lrs, losses, smooth, best = [], [], 0.0, math.inf
    batches = (b for epoch in range(10**6) for b in loader.batches(epoch))
    for i in range(steps):
        lr = start * (end / start) ** (i / (steps - 1))
        set_lr(optimizer, lr)
        xb, yb = next(batches)
        loss = F.cross_entropy(model(xb), yb)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        smooth = 0.9 * smooth + 0.1 * loss.item()
        value = smooth / (1 - 0.9 ** (i + 1))  # bias-corrected moving average
        if not math.isfinite(value) or value > 4 * best:
            break
        best = min(best, value)
        lrs.append(lr)
        losses.append(value)
    slopes = [(losses[i + 1] - losses[i]) for i in range(len(losses) - 1)]
    suggestion = lrs[min(range(len(slopes)), key=slopes.__getitem__)] if slopes else cfg.lr
    save_lr_find(lrs, losses, suggestion, out)
    print(f"lr-find: {len(lrs)} steps from {lrs[0]:.1e} to {lrs[-1]:.1e}; suggested lr {suggestion:.2e} "
          f"(steepest loss descent); plot: {out}")
    return suggestion
