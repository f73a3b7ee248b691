"""Data-parallel training: `launch` (`cnnlab train --nproc N`) starts torchrun on this machine, and
`wrap_for_training` puts DDP around the model inside each rank.

The training code itself only reads RANK / WORLD_SIZE (runtime.setup); the launcher just builds
the torchrun command line and passes signals on, so a Ctrl-C or SIGTERM reaches every rank and
each one saves before it exits. (torch is imported inside the functions: the launcher itself
never needs it.)"""
import signal
import subprocess
import sys
from contextlib import contextmanager

from ..errors import UsageError


@contextmanager
def handling_stop_signals(handler):
    """SIGINT and SIGTERM go to `handler` inside the block, to the previous handlers after it.
    Off the main thread (e.g. a notebook worker) Python allows no handlers: nothing is changed."""
    previous = {}
    try:
        for sig in (signal.SIGINT, signal.SIGTERM):
            previous[sig] = signal.signal(sig, handler)
    except ValueError:
        pass
    try:
        yield
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


def launch(nproc, train_argv):
    if nproc < 1:
        raise UsageError(f"--nproc must be at least 1, got {nproc}.")
    argv = []  # the user's train flags without --nproc N / --nproc=N
    for a, before in zip(train_argv, [None] + train_argv[:-1]):
        if a != "--nproc" and before != "--nproc" and not a.startswith("--nproc="):
            argv.append(a)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           "-m", "cnnlab", "train", *argv]
    child = subprocess.Popen(cmd)
    received = []

    def forward(signum, frame):
        received.append(signum)
        child.send_signal(signum)
    with handling_stop_signals(forward):
        code = child.wait()
    if received:
        return 128 + received[0]
    if code:
        print(f"cnnlab: distributed training failed (torchrun exit {code}); its report above names the rank "
              "that failed first. The run folder's last.pt, if written, resumes with --resume RUN_DIR.",
              file=sys.stderr)
    return code


def wrap_for_training(model, cfg, ctx):
    """The callable used for training forward passes: DDP and/or torch.compile around `model`."""
    import torch

    forward = model
    if ctx.distributed:
        from torch.nn.parallel import DistributedDataParallel as DDP

        if cfg.sync_bn:
            model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
        forward = DDP(model, device_ids=[ctx.device.index] if ctx.device.type == "cuda" else None)
    if cfg.compile:
        forward = torch.compile(forward)
    return forward
