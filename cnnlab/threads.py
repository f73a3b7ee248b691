"""How torch's CPU threads wait, and how many there are: chosen so that a machine busy with other
processes slows training down gracefully instead of ten-fold (issue 21, item 3b; measured in
benchmarks/busy_cpu.py). No heavy imports here: `quiet_waits` must run before torch is imported,
because torch's OpenMP (libgomp) reads its environment once, when torch loads it.
"""
import os
import re
import sys
import time

# Between parallel regions libgomp's idle threads spin 300,000 times before sleeping (its default).
# On a 2-core machine beside one competing busy loop, the spinning thread burns the core its peer
# needs: seed 002's `net` fell to 68 img/s with 2 threads, against 990 with 1. Sleeping at once
# (OMP_WAIT_POLICY=PASSIVE, cnnlab's first fix) never collapsed, but every parallel region then
# starts with a futex wake: small nets on an idle machine lost 1.3-1.7x (digits_fast
# 7.5k against 13.1k img/s). Spinning 10,000 times, then sleeping, kept the idle speed and stayed
# within 1.3x of the best 2-thread wait setting beside 1 or 2 busy loops (benchmarks/README.md,
# busy_cpu.py). GOMP_SPINCOUNT is libgomp's (torch's OpenMP on Linux), and when set it overrides
# the policy's spin count there; other OpenMP runtimes (LLVM's libomp on macOS) ignore it and take
# the passive policy, cnnlab's previous default, which never collapsed.
SPINS = 10_000
SHORT_SPINS = {"GOMP_SPINCOUNT": str(SPINS), "OMP_WAIT_POLICY": "PASSIVE"}
USER_CHOICES = ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")


def quiet_waits(environ=None):
    """Set OpenMP's spin count to SPINS (SHORT_SPINS) in the environment while it can still take
    effect (torch not yet imported) and the user chose none (OMP_WAIT_POLICY or GOMP_SPINCOUNT set
    wins); child processes (torchrun's workers) inherit it. Returns True when it was set here."""
    environ = os.environ if environ is None else environ
    if "torch" in sys.modules or any(name in environ for name in USER_CHOICES):
        return False
    environ.update(SHORT_SPINS)
    return True


def waits_short(environ=None):
    """Whether OpenMP's idle threads soon sleep rather than spin on, as the environment says: a
    GOMP_SPINCOUNT of at most SPINS (libgomp takes a valid one over the policy), or else a
    PASSIVE policy."""
    environ = os.environ if environ is None else environ
    spins = spin_count(environ.get("GOMP_SPINCOUNT", ""))
    if spins is None:
        return environ.get("OMP_WAIT_POLICY", "").strip().upper() == "PASSIVE"
    return spins <= SPINS


def spin_count(text):
    """GOMP_SPINCOUNT as libgomp reads it (env.c, parse_spincount): a whole number with an optional
    k, M, G or T (x1000 each), or infinite / infinity; a minus sign wraps around to a huge count
    (strtoull). None when libgomp would ignore it as invalid (e.g. '1_000', '', 'lots')."""
    text = text.strip().lower()
    if text in ("infinite", "infinity"):
        return float("inf")
    number = re.fullmatch(r"([+-]?)(\d+)\s*([kmgt]?)", text)
    if not number:
        return None
    sign, digits, unit = number.groups()
    value = int(digits) * 1000 ** " kmgt".index(unit or " ")
    return float("inf") if sign == "-" and value else value


def cpu_count():
    """The CPUs this process may run on (its affinity mask, e.g. a container's share), not the machine's."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def free_threads(cpus, busy):
    """Threads for long-spinning OpenMP waits (pure: CPUs, CPUs' worth of other processes' work ->
    threads): one per CPU the other processes leave idle, at least 1. Long-spinning threads that
    outnumber the free cores collapse (above); briefly spinning ones don't, so with short waits
    every CPU is used, and the thread count (hence a run's last bits) does not depend on the load."""
    return max(1, min(cpus, int(cpus - busy + 0.5)))


def load_average():
    """The 1-minute load average (0 where the system has none, e.g. Windows)."""
    try:
        return os.getloadavg()[0]
    except (AttributeError, OSError):
        return 0.0


def busy_ticks(proc_stat, cpus, niced=False):
    """Clock ticks the CPUs numbered in `cpus` spent busy, from /proc/stat's text (pure). Only those
    CPUs: in a container, the host's other cores are not ours to fight over. Niced processes' time
    is left out unless `niced` (this process is niced itself): they yield their core to a thread of
    ours that wakes up, so they cannot make spinning waits collapse."""
    busy, seen = 0, False
    for line in proc_stat.splitlines():
        name, *ticks = line.split() or [""]
        if name.startswith("cpu") and name[3:].isdigit() and int(name[3:]) in cpus:
            user, nice, system, _idle, _iowait, irq, softirq, steal = map(int, ticks[:8])
            busy += user + system + irq + softirq + steal + (nice if niced else 0)
            seen = True
    if not seen:   # e.g. LXCFS renumbers a container's CPUs: no figure beats "always idle"
        raise ValueError("/proc/stat has no line for this process's CPUs")
    return busy


def cpu_ticks(niced=False):
    """(busy clock ticks of the CPUs this process may run on, clock ticks of this process), from
    /proc (Linux)."""
    with open("/proc/stat") as f:
        busy = busy_ticks(f.read(), os.sched_getaffinity(0), niced)
    with open("/proc/self/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()   # after the command name, which may hold spaces
    return busy, int(fields[11]) + int(fields[12])     # utime, stime: stat fields 14 and 15


def cpu_use(seconds=0.1):
    """(CPUs' worth of work every process did over the next `seconds` on this process's CPUs, niced
    ones aside unless this process is niced too; this process's share of it)."""
    niced = os.nice(0) > 0
    busy, own = cpu_ticks(niced)
    start = time.monotonic()
    time.sleep(seconds)
    busy_after, own_after = cpu_ticks(niced)
    cpus_worth = os.sysconf("SC_CLK_TCK") * (time.monotonic() - start)
    return (busy_after - busy) / cpus_worth, (own_after - own) / cpus_worth


def others_busy(seconds=0.1):
    """CPUs' worth of work that OTHER processes are doing now, sampled over `seconds`. Not the load
    average: that counts this process's own recent work, so a notebook's second run (or a benchmark
    right after another) saw its own first run as competition and halved its threads. The load
    average stands in where /proc is missing."""
    try:
        everyone, mine = cpu_use(seconds)
    except (OSError, ValueError, IndexError, AttributeError):   # no /proc (macOS), no os.nice (Windows)
        return load_average()
    return max(0.0, everyone - mine)


def auto_threads(cpus, environ=None):
    """--threads 0 on one process: (threads, why) for the settings block."""
    if waits_short(environ):
        return cpus, "OpenMP waits short"
    busy = others_busy()
    return free_threads(cpus, busy), (f"other processes busy on {busy:.1f} of {cpus} CPUs; OpenMP threads spin "
                                      "long (torch was imported before cnnlab, or OMP_WAIT_POLICY / "
                                      "GOMP_SPINCOUNT set so)")
