"""Seed 002's `net` (or `digits_fast`, the BN net of the speed configs) training on a busy CPU: torch's thread count and
OpenMP wait policy, alone and beside competing CPU-bound processes (issue 21, item 3b).

    python benchmarks/busy_cpu.py                      # every setting, 0 / 1 / 2 competitors, 3 repeats
    python benchmarks/busy_cpu.py --busy 2 --repeats 5 --settings "old default" "new default"
    python benchmarks/busy_cpu.py --model digits_fast --busy 0 1   # the BN digits net, batch 128
    python benchmarks/busy_cpu.py --cli 3000 --busy 1   # whole `cnnlab train` commands instead

Each measurement is a fresh process (OpenMP reads its environment once, when torch loads it) that
times `--seconds` of training steps of `net` (SGD, batch 64, random 3x32x32 images: CIFAR-2's shape,
channels_last as cnnlab trains; `--model digits_fast`: batch 128 of 1x28x28) after a warm-up. The competitors are pure-Python busy loops, one
per `--busy`. Settings are measured in interleaved rounds, and the median of each is printed with
its slowdown against the same setting alone and against the best setting in the same scenario.
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WAIT_VARS = ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "OMP_NUM_THREADS")

SPIN = {"GOMP_SPINCOUNT": "300000"}   # libgomp's own default, set explicitly so that cnnlab leaves it
# name -> (environment, --threads as cnnlab takes it: 0 = cnnlab's automatic choice)
SETTINGS = {
    "old default": (SPIN, 2),    # torch's own: 2 threads on 2 CPUs, libgomp's spin-wait
    "threads 1": (SPIN, 1),
    "threads 2 passive": ({"OMP_WAIT_POLICY": "PASSIVE"}, 2),
    "threads 1 passive": ({"OMP_WAIT_POLICY": "PASSIVE"}, 1),
    "threads 2 spin 1k": ({"GOMP_SPINCOUNT": "1000"}, 2),
    "threads 2 spin 3k": ({"GOMP_SPINCOUNT": "3000"}, 2),
    "threads 2 spin 5k": ({"GOMP_SPINCOUNT": "5000"}, 2),
    "threads 2 spin 10k": ({"GOMP_SPINCOUNT": "10000"}, 2),
    "threads 2 spin 30k": ({"GOMP_SPINCOUNT": "30000"}, 2),
    "threads 2 spin 50k": ({"GOMP_SPINCOUNT": "50000"}, 2),
    "auto, spinning": (SPIN, 0),   # torch imported before cnnlab: threads from the others' CPU use
    "new default": ({}, 0),        # `cnnlab train` as it starts now
}


# --model -> (input shape, classes, batch): seed 002's net on CIFAR-2, digits_fast and mnist_fast's old batch
MODELS = {"net": ((3, 32, 32), 2, 64), "digits_fast": ((1, 28, 28), 10, 128)}


def worker(threads, seconds, model):
    """In the child: cnnlab's start-up policy, then the timed steps; prints one JSON line."""
    sys.path.insert(0, ROOT)
    from cnnlab import runtime   # noqa: E402  (`import cnnlab` sets the wait policy before torch loads)
    import torch

    from cnnlab.models import create_model

    chosen, _ = runtime.thread_count(threads, 1, torch.device("cpu"))
    if chosen:
        torch.set_num_threads(chosen)
    torch.manual_seed(0)
    shape, classes, batch = MODELS[model]
    net = create_model(model, shape, classes).to(memory_format=torch.channels_last)
    opt = torch.optim.SGD(net.parameters(), lr=1e-2)
    x = torch.randn(batch, *shape).contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, classes, (batch,))

    def step():
        opt.zero_grad(set_to_none=True)
        torch.nn.functional.cross_entropy(net(x), y).backward()
        opt.step()

    for _ in range(3):
        step()
    start, done = time.perf_counter(), 0   # at least 5 steps, then until `seconds` have passed: a
    while done < 5 or time.perf_counter() - start < seconds:   # collapsed setting takes as long as a fast one
        step()
        done += 1
    print(json.dumps({"img_s": batch * done / (time.perf_counter() - start), "threads": torch.get_num_threads(),
                      "wait": " ".join(f"{k}={os.environ[k]}" for k in WAIT_VARS[:2] if k in os.environ)}))


def busy_loops(n):
    code = "while True: pass"
    return [subprocess.Popen([sys.executable, "-c", code]) for _ in range(n)]


def setting_env(name):
    env = {k: v for k, v in os.environ.items() if k not in WAIT_VARS}
    return {**env, **SETTINGS[name][0], "PYTHONPATH": ROOT}


def measure(name, args):
    threads = SETTINGS[name][1]
    if args.cli:
        return measure_cli(name, threads, args)
    out = subprocess.run([sys.executable, __file__, "--worker", str(threads), "--seconds", str(args.seconds),
                          "--model", args.model],
                         env=setting_env(name), capture_output=True, text=True, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def measure_cli(name, threads, args):
    """The whole `cnnlab train` command: one epoch of `net` on --cli N synthetic CIFAR-2-shaped images."""
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "-m", "cnnlab", "train", "--model", "net", "--data", f"synthetic:3x32x32:2:{args.cli}",
               "--epochs", "1", "--batch-size", "64", "--val-fraction", "0", "--test-samples", "64",
               "--report", "false", "--out", os.path.join(tmp, "run"), *(["--threads", str(threads)] if threads else [])]
        out = subprocess.run(cmd, env=setting_env(name), cwd=ROOT, capture_output=True, text=True, check=True).stdout
        with open(os.path.join(tmp, "run", "summary.json")) as f:
            img_s = json.load(f)["samples_per_second"]
    device = next(line for line in out.splitlines() if line.startswith("device"))
    return {"img_s": img_s, "threads": device.split("threads ")[-1] if "threads" in device else "?",
            "wait": " ".join(f"{k}={v}" for k, v in SETTINGS[name][0].items()) or "cnnlab's choice"}


def scenario(busy, names, args):
    """Median img/s of each setting with `busy` competing loops running."""
    loops = busy_loops(busy)
    try:
        time.sleep(0.5 if busy else 0)   # the loops reach full speed (a startup wait, not a synchronisation)
        runs = {name: [] for name in names}
        for _ in range(args.repeats):
            for name in names:
                runs[name].append(measure(name, args))
    finally:
        for p in loops:
            p.kill()
            p.wait()
    return {name: (statistics.median(r["img_s"] for r in rs), rs[-1]) for name, rs in runs.items()}


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--worker", type=int, default=None, help=argparse.SUPPRESS)
    p.add_argument("--seconds", type=float, default=2.0, help="timed per measurement, after 3 warm-up steps")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--busy", type=int, nargs="+", default=[0, 1, 2], help="competing busy loops per scenario")
    p.add_argument("--cli", type=int, default=0, metavar="N",
                   help="time whole `cnnlab train` runs (one epoch of N images, summary.json's img/s) instead of steps")
    p.add_argument("--model", default="net", choices=list(MODELS), help="the network stepped (not with --cli)")
    p.add_argument("--settings", nargs="+", default=list(SETTINGS), choices=list(SETTINGS))
    args = p.parse_args()
    if args.worker is not None:
        return worker(args.worker, args.seconds, args.model)
    print(f"machine: {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.2f} at start "
          f"(shared with other users: compare ratios within one scenario)", flush=True)
    alone = {}
    for busy in args.busy:
        result = scenario(busy, args.settings, args)
        best = max(v for v, _ in result.values())
        what = (f"`cnnlab train` on {args.cli} images" if args.cli
                else f"{args.seconds:g} s of batch-{MODELS[args.model][2]} steps of {args.model}")
        print(f"\n{busy} competing busy loop(s), median of {args.repeats}, {what} each, "
              f"load average {os.getloadavg()[0]:.1f}:")
        for name, (img_s, last) in result.items():
            alone.setdefault(name, img_s if busy == 0 else None)
            vs_alone = f", {alone[name] / img_s:.1f}x slower than alone" if alone.get(name) and busy else ""
            print(f"  {name:<18} {img_s:6.0f} img/s  {best / img_s:4.1f}x the best{vs_alone}  "
                  f"(threads {last['threads']}, {last['wait'] or 'libgomp default'})", flush=True)


if __name__ == "__main__":
    main()
