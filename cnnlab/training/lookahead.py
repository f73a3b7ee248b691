"""--lookahead: airbench94's Lookahead (Zhang et al. 2019, "Lookahead optimizer: k steps forward,
1 step back", with airbench's schedule; legacy/airbench94.py, LookaheadState).

A slow copy of the network's floating-point state (weights and batch-norm statistics) follows the
trained one: every EVERY steps it moves toward it by 1 - decay, and training restarts from it. The
decay grows as DECAY x (step / total steps)^3: 0 at first (plain training), DECAY at the end, so
the last epochs average the weights over more and more steps (in the spirit of SWA); after the last
step the network becomes the slow copy (not when --patience stops the run early). The slow copy is
saved in last.pt: resume stays exact.
Measured on the full CIFAR-10 JPEGs (benchmarks/README.md, session 13): airbench's own code, 10
epochs, 90.12% with it and 89.17% without. In cnnlab's pipeline no gain showed while its crops
differed from airbench's (20 epochs: 89.36% with, 89.58% without); with airbench's shifts and
alternating flips (session 14) 90.38% with, 90.04% without, so `cifar10_cpu` takes it.
"""
import torch

EVERY = 5
DECAY = 0.95 ** EVERY


class Lookahead:
    def __init__(self, model):
        self.model = model
        self.slow = {k: v.detach().clone() for k, v in model.state_dict().items() if v.is_floating_point()}
        self.buffers = [k for k, v in model.named_buffers() if k in self.slow]

    @torch.no_grad()
    def after_step(self, step, total):
        """After global step `step` (counted from 1) of `total`."""
        if step % EVERY == 0:
            self.pull(DECAY * min(1.0, step / total) ** 3)
        if step == total:
            self.pull(1.0)

    def pull(self, decay):
        live = self.model.state_dict()
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            # batch-norm statistics differ between DDP ranks (DDP sends rank 0's at each forward):
            # rank 0's first, so every rank's slow copy stays the one last.pt saves
            for name in self.buffers:
                torch.distributed.broadcast(live[name], 0)
        for name, slow in self.slow.items():
            slow.lerp_(live[name], 1 - decay)
            live[name].copy_(slow)

    def state_dict(self):
        return dict(self.slow)

    def load_state_dict(self, saved):
        for name, slow in self.slow.items():
            slow.copy_(saved[name])
