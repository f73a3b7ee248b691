"""bf16 autocast against fp32 on this CPU: training-step images/s of the zoo's networks
(channels_last, one fixed batch in memory, SGD), fp32 and bf16 alternating, median of 3 rounds.
The measurement behind the settings block's hint on CPUs with AMX or AVX512-BF16 (runtime.amp_label): `amp auto`
stays fp32 on the CPU, `--amp bf16` is the flag it names.

    python benchmarks/cpu_bf16.py [MODEL ...]
"""
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from cnnlab.models import create_model  # noqa: E402
from cnnlab.runtime import cpu_bf16_units  # noqa: E402

CASES = [("tv/resnet18", (3, 128, 128), 32), ("resnet_small", (3, 32, 32), 256), ("net_bn", (3, 32, 32), 64),
         ("net", (3, 32, 32), 64), ("simple_cnn", (3, 32, 32), 64), ("mnist_cnn", (1, 28, 28), 64),
         ("digits_fast", (1, 28, 28), 128), ("airbench", (3, 32, 32), 1024)]


def images_per_second(model, x, y, bf16, steps):
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)

    def step():
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            loss = torch.nn.functional.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    step()
    step()   # warm-up: oneDNN picks and caches its kernels
    start = time.perf_counter()
    for _ in range(steps):
        step()
    return len(x) * steps / (time.perf_counter() - start)


def main():
    only = sys.argv[1:]
    print(f"CPU: bf16 units {cpu_bf16_units() or 'none'}, {torch.get_num_threads()} threads, torch {torch.__version__}")
    for name, shape, batch in CASES:
        if only and name not in only:
            continue
        torch.manual_seed(0)
        model = create_model(name, shape, 10).to(memory_format=torch.channels_last)
        x = torch.randn(batch, *shape).contiguous(memory_format=torch.channels_last)
        y = torch.randint(0, 10, (batch,))
        steps = 3 if name.startswith("tv/") or batch >= 1024 else 20
        rates = {"fp32": [], "bf16": []}
        for _ in range(3):
            for mode in rates:
                rates[mode].append(images_per_second(model, x, y, mode == "bf16", steps))
        fp32, bf16 = statistics.median(rates["fp32"]), statistics.median(rates["bf16"])
        print(f"| `{name}` | {batch} | {fp32:,.0f} | {bf16:,.0f} | {bf16 / fp32:.2f}x |", flush=True)


if __name__ == "__main__":
    main()
