"""Where training runs: device, threads, seeds, mixed precision and torch.distributed.

torchrun sets RANK / WORLD_SIZE / LOCAL_RANK; when they are present we join the process group
(nccl on CUDA, gloo on the CPU) and every other module asks `Context` instead of torch.distributed.
"""
import os
import random
from dataclasses import dataclass
from datetime import timedelta

import numpy as np
import torch

from .errors import UsageError, note
from .threads import auto_threads, cpu_count


@dataclass
class Context:
    device: torch.device
    amp_dtype: torch.dtype = None   # None: full fp32
    rank: int = 0
    world: int = 1
    threads: str = ""               # torch's CPU threads and why, for the settings block

    @property
    def is_main(self):
        return self.rank == 0

    @property
    def distributed(self):
        return self.world > 1

    def autocast(self):
        if self.amp_dtype is None:
            return torch.autocast(self.device.type, enabled=False)
        return torch.autocast(self.device.type, dtype=self.amp_dtype)

    def all_reduce(self, tensor):
        """Sum a tensor over ranks (no-op on one process); returns it for chaining."""
        if self.distributed:
            import torch.distributed as dist

            dist.all_reduce(tensor)
        return tensor


def pick_device(requested, local_rank=0):
    if requested == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda was asked for but no CUDA GPU is visible; use --device cpu or auto.")
    if requested == "cuda" or (requested == "auto" and torch.cuda.is_available()):
        torch.cuda.set_device(local_rank)
        return torch.device("cuda", local_rank)
    return torch.device("cpu")


def amp_dtype(requested, device):
    """auto: bf16 on CUDA (no loss scaling needed), fp32 on the CPU, as Lightning and Keras do: CPU
    results stay exact (DDP matches one process to 1e-4, evaluate matches training). On a CPU with
    bf16 units, `--amp bf16` trains 1.1-2.8x faster (benchmarks/cpu_bf16.py): the settings block says so."""
    if requested == "auto":
        return torch.bfloat16 if device.type == "cuda" else None
    return {"off": None, "bf16": torch.bfloat16, "fp16": torch.float16}[requested]


def cpu_bf16_units():
    """What this CPU computes bf16 with, "" if nothing: "AMX" (Intel Xeon since Sapphire Rapids;
    bf16 autocast trained 1.1-2.8x faster than fp32 there) or "AVX512-BF16" (e.g. AMD Zen 4:
    1.3-2.0x). Without either, oneDNN emulates bf16 (not measured here), so nothing is suggested."""
    probes = (("AMX", "_is_amx_tile_supported"), ("AVX512-BF16", "_is_avx512_bf16_supported"))
    for name, probe in probes:
        try:
            if getattr(torch.cpu, probe)():   # private, so guarded: absent means no
                return name
        except (AttributeError, RuntimeError):
            pass
    return ""


def amp_label(requested, ctx):
    """The settings block's amp: the setting, what auto chose, and a hint where bf16 would pay."""
    if requested != "auto":
        return requested
    if ctx.amp_dtype is not None:
        return "auto (bf16)"
    units = cpu_bf16_units() if ctx.device.type == "cpu" else ""
    if units:
        return f"auto (fp32; this CPU has {units}: --amp bf16 trains faster)"
    return "auto (fp32)"


def thread_count(requested, world, device):
    """Torch's CPU threads and why (for the settings block): --threads at most the CPUs here
    (torch.set_num_threads(100000) crashed the process with a segfault); under DDP on the CPU a fair
    share of the CPUs; a user's OMP_NUM_THREADS; else threads.auto_threads. 0: leave torch's own."""
    cpus = cpu_count()
    if requested > cpus:
        note(f"note: --threads {requested} is more than the {cpus} CPUs this process may use; using {cpus}.")
        return cpus, f"--threads {requested}, {cpus} CPUs"
    if requested:
        return requested, "--threads"
    if world > 1 and device.type == "cpu":   # before OMP_NUM_THREADS: torchrun sets it to 1 for every rank
        return max(1, cpus // world), f"{cpus} CPUs shared by {world} processes"
    if "OMP_NUM_THREADS" in os.environ:
        return 0, "OMP_NUM_THREADS"
    return auto_threads(cpus)


def available_memory(device=None):
    """Bytes that can still be allocated on `device` (default the CPU): the GPU's free memory, or
    the host's MemAvailable, lowered by a cgroup (container) limit when one is set."""
    if device is not None and torch.device(device).type == "cuda":
        return torch.cuda.mem_get_info(torch.device(device))[0]
    free = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    try:
        with open("/proc/meminfo") as f:
            free = next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable:"))
    except (OSError, StopIteration, ValueError):
        pass
    return min(free, cgroup_room())


def cgroup_room():
    """Bytes left under a cgroup v2 memory limit (a container's), or infinity without one."""
    try:
        with open("/sys/fs/cgroup/memory.max") as f:
            limit = f.read().strip()
        with open("/sys/fs/cgroup/memory.current") as f:
            used = int(f.read())
        return float("inf") if limit == "max" else max(0, int(limit) - used)
    except (OSError, ValueError):
        return float("inf")


def seed_everything(seed):
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def setup(cfg):
    """Join the process group if launched by torchrun, pick the device, threads and seeds."""
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    device = pick_device(cfg.device, local_rank)
    if world > 1:
        import torch.distributed as dist

        if not dist.is_initialized():
            backend = "nccl" if device.type == "cuda" else "gloo"
            # A bounded timeout: if a rank dies, the others fail within it instead of hanging.
            dist.init_process_group(backend, timeout=timedelta(seconds=int(os.environ.get("CNNLAB_DIST_TIMEOUT", 120))))
    threads, why = thread_count(cfg.threads, world, device)
    if threads:
        torch.set_num_threads(threads)
    seed_everything(cfg.seed)
    if device.type == "cpu":
        # Subnormal floats in the gradients slow real-MNIST
        # steps on x86; flushing them to zero measured 8.4-8.8k -> 9.6-10.1k img/s for digits_fast at no cost in accuracy.
        torch.set_flush_denormal(True)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    return Context(device=device, amp_dtype=amp_dtype(cfg.amp, device), rank=rank, world=world,
                   threads=f"{torch.get_num_threads()} ({why})")


def teardown(ctx, together=True):
    """Restore the process-wide float mode and leave the process group. `together`: wait for every rank first (a rank that tore gloo down
    while another was still sending made the latter abort, "terminate called without an active
    exception", in 1 of 3 runs); not after an error, when another rank may be gone."""
    if ctx.device.type == "cpu":
        torch.set_flush_denormal(False)   # a Python caller's later float code sees IEEE subnormals again
    if ctx.distributed:
        import torch.distributed as dist

        if dist.is_initialized():
            if together:
                dist.barrier()
            dist.destroy_process_group()


def rng_state(device):
    state = {"torch": torch.get_rng_state(), "numpy": torch.from_numpy(np.random.get_state()[1].astype(np.int64)),
             "python": torch.tensor(random.getstate()[1], dtype=torch.int64)}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state, device):
    torch.set_rng_state(state["torch"])
    np_state = np.random.get_state()
    np.random.set_state((np_state[0], state["numpy"].numpy().astype(np.uint32), 624, 0, 0.0))
    random.setstate((3, tuple(int(v) for v in state["python"].tolist()), None))
    if "cuda" in state and device.type == "cuda":
        torch.cuda.set_rng_state(state["cuda"], device)
