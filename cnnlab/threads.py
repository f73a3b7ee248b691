"""How torch's CPU threads wait, and how many there are: chosen so that a machine busy with other
processes slows training down gracefully instead of ten-fold (issue 21, item 3b; measured in
benchmarks/busy_cpu.py). No heavy imports here: `quiet_waits` must run before torch is imported,
because torch's OpenMP (libgomp) reads its environment once, when torch loads it.
"""
import os
import sys

# Between parallel regions libgomp's idle threads spin 300,000 times before sleeping (its default).
# On a 2-core machine beside one competing busy loop, the spinning thread burns the core its peer
# needs: seed 002's `net` fell to 68 img/s with 2 threads, against 990 with 1; sleeping at once
# (PASSIVE: GOMP_SPINCOUNT 0) kept 1,800-3,200 img/s with 2 threads (benchmarks/README.md).
PASSIVE = {"OMP_WAIT_POLICY": "PASSIVE"}
USER_CHOICES = ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")


def quiet_waits(environ=None):
    """Set OpenMP's passive wait policy in the environment while it can still take effect (torch not
    yet imported) and the user chose none (OMP_WAIT_POLICY or GOMP_SPINCOUNT set wins); child
    processes (torchrun's workers) inherit it. Returns True when it was set here."""
    environ = os.environ if environ is None else environ
    if "torch" in sys.modules or any(name in environ for name in USER_CHOICES):
        return False
    environ.update(PASSIVE)
    return True


def waits_passive(environ=None):
    """Whether OpenMP's idle threads sleep rather than spin, as the environment says: a PASSIVE
    policy, or a GOMP_SPINCOUNT under 1,000 (when set, libgomp takes it over the policy; 1,000
    spins still lost up to 3x beside a busy loop)."""
    environ = os.environ if environ is None else environ
    if environ.get("OMP_WAIT_POLICY", "").strip().upper() == "PASSIVE" and "GOMP_SPINCOUNT" not in environ:
        return True
    try:
        return int(environ.get("GOMP_SPINCOUNT", "").strip()) < 1000
    except ValueError:
        return False


def cpu_count():
    """The CPUs this process may run on (its affinity mask, e.g. a container's share), not the machine's."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def free_threads(cpus, load):
    """Threads for spinning OpenMP waits (pure: CPUs, 1-minute load average -> threads): one per CPU
    the other processes leave idle, at least 1. Spinning threads that outnumber the free cores
    collapse (above); sleeping ones don't, so with passive waits every CPU is used."""
    return max(1, min(cpus, int(cpus - load + 0.5)))


def load_average():
    """The 1-minute load average (0 where the system has none, e.g. Windows)."""
    try:
        return os.getloadavg()[0]
    except (AttributeError, OSError):
        return 0.0


def auto_threads(cpus, environ=None):
    """--threads 0 on one process: (threads, why) for the settings block."""
    if waits_passive(environ):
        return cpus, "OpenMP waits passive"
    load = load_average()
    return free_threads(cpus, load), (f"load {load:.1f} on {cpus} CPUs; OpenMP threads spin (torch was imported "
                                      "before cnnlab, or OMP_WAIT_POLICY set)")
