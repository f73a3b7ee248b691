"""`synthetic[:CxHxW:K:N]`: learnable random images for benchmarks, made in memory (no files)."""
import torch

from ..errors import UsageError
from .registry import Source, register_dataset


@register_dataset("synthetic", arg="CxHxW:K:N", arg_optional=True, shape="1x28x28", classes=10,
                  sizes="2000 / 400", description="learnable random images for benchmarks")
def synthetic(spec, cfg):
    """`synthetic` or `synthetic:CxHxW:K[:N]` (`spec` is what follows the colon, or "").
    Each class has its own random template; samples are template plus noise."""
    parts = spec.split(":") if spec else []
    try:
        c, h, w = (int(v) for v in (parts[0] if parts else "1x28x28").split("x"))
        k = int(parts[1]) if len(parts) > 1 else 10
        n = int(parts[2]) if len(parts) > 2 else 2000
    except ValueError:
        raise UsageError(f"bad synthetic spec 'synthetic:{spec}': use synthetic:CxHxW:CLASSES[:N], "
                         "e.g. synthetic:3x32x32:10:5000") from None
    g = torch.Generator().manual_seed(1234)
    templates = torch.rand(k, c, h, w, generator=g) * 255
    def draw(count):
        y = torch.arange(count) % k
        x = templates[y] * 0.6 + torch.rand(count, c, h, w, generator=g) * 255 * 0.4
        return x.to(torch.uint8), y
    train_x, train_y = draw(n)
    test_x, test_y = draw(max(k, n // 5))
    return Source(train_x, train_y, test_x, test_y, classes=[f"class{i}" for i in range(k)])
