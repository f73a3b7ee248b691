"""Torch's CPU threads on a busy machine (issue 21, item 3b): the wait policy set before torch loads,
the automatic thread count, and who wins. Nothing here depends on the machine's speed."""
import os
import subprocess
import sys
import threading

import pytest

from cnnlab import threads as T
from cnnlab.runtime import thread_count

from .conftest import ROOT

TORCH_OMP = ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "OMP_NUM_THREADS")


def cnnlab_cli(*args, env=None):
    """`python -m cnnlab ARGS` from this checkout, with none of the caller's OpenMP settings but `env`."""
    clean = {k: v for k, v in os.environ.items() if k not in TORCH_OMP}
    result = subprocess.run([sys.executable, "-m", "cnnlab", *map(str, args)], capture_output=True, text=True,
                            cwd=ROOT, timeout=600, env={**clean, "PYTHONPATH": ROOT, **(env or {})})
    assert result.returncode == 0, result.stderr[-500:]
    return result


def openmp_spincount(env):
    """The spin count torch's OpenMP runs with in a fresh `python -m cnnlab models` (a command that
    loads torch), as libgomp itself reports it (OMP_DISPLAY_ENV=verbose, printed when torch loads)."""
    result = cnnlab_cli("models", env={"OMP_DISPLAY_ENV": "verbose", **env})
    lines = [line for line in result.stderr.splitlines() if "GOMP_SPINCOUNT" in line]
    if not lines:
        pytest.skip("torch's OpenMP is not libgomp (no GOMP_SPINCOUNT in OMP_DISPLAY_ENV's report)")
    return lines[0].split("=")[1].strip().strip("'")


def test_the_cli_makes_openmp_threads_sleep_soon_before_torch_loads():
    """libgomp spins 300,000 times by default; cnnlab's entry sets a short spin count early enough
    that the OpenMP inside torch runs with it (the code before issue 21: '300000')."""
    assert openmp_spincount({}) == str(T.SPINS)


@pytest.mark.parametrize("env, spins", [({"OMP_WAIT_POLICY": "ACTIVE"}, "30000000000"),
                                        ({"GOMP_SPINCOUNT": "5000"}, "5000"),
                                        ({"OMP_WAIT_POLICY": "PASSIVE"}, "0")])
def test_a_users_openmp_wait_setting_wins(env, spins):
    assert openmp_spincount(env) == spins


def test_quiet_waits_sets_short_spins_unless_the_user_chose_or_torch_is_loaded(monkeypatch):
    monkeypatch.delitem(sys.modules, "torch")   # as when the CLI starts
    env = {}
    assert T.quiet_waits(env) and env == {"GOMP_SPINCOUNT": "10000", "OMP_WAIT_POLICY": "PASSIVE"}
    for user in ({"OMP_WAIT_POLICY": "active"}, {"GOMP_SPINCOUNT": "100"}):
        assert not T.quiet_waits(user) and len(user) == 1
    monkeypatch.undo()   # torch loaded (runtime imports it): OpenMP has read its environment already
    env = {}
    assert not T.quiet_waits(env) and env == {}


@pytest.mark.parametrize("env, short", [({"OMP_WAIT_POLICY": "PASSIVE"}, True), ({"OMP_WAIT_POLICY": " passive "}, True),
                                        ({}, False), ({"OMP_WAIT_POLICY": "ACTIVE"}, False),
                                        ({"GOMP_SPINCOUNT": "0"}, True), ({"GOMP_SPINCOUNT": "10000"}, True),
                                        ({"GOMP_SPINCOUNT": "10k"}, True), ({"GOMP_SPINCOUNT": " 10 K "}, True),
                                        ({"GOMP_SPINCOUNT": "10001"}, False), ({"GOMP_SPINCOUNT": "300000"}, False),
                                        ({"GOMP_SPINCOUNT": "1M"}, False), ({"GOMP_SPINCOUNT": "infinite"}, False),
                                        ({"GOMP_SPINCOUNT": "-5"}, False), ({"GOMP_SPINCOUNT": "-0"}, True),
                                        ({"GOMP_SPINCOUNT": "1_000"}, False), ({"GOMP_SPINCOUNT": "lots"}, False),
                                        ({"OMP_WAIT_POLICY": "PASSIVE", "GOMP_SPINCOUNT": "lots"}, True),
                                        ({"OMP_WAIT_POLICY": "PASSIVE", "GOMP_SPINCOUNT": "300000"}, False),
                                        ({"OMP_WAIT_POLICY": "ACTIVE", "GOMP_SPINCOUNT": "10000"}, True)])
def test_waits_short_reads_the_environment_as_libgomp_does(env, short):
    """A valid GOMP_SPINCOUNT overrides the policy's spin count in libgomp (env.c, parse_spincount:
    k/M/G/T suffixes, 'infinite', strtoull's wrap-around of a minus sign); an invalid one is ignored."""
    assert T.waits_short(env) is short


@pytest.mark.parametrize("cpus, load, threads", [(2, 0.0, 2), (2, 0.4, 2), (2, 0.6, 1), (2, 1.0, 1), (2, 2.3, 1),
                                                 (2, 40.0, 1), (1, 0.0, 1), (8, 0.0, 8), (8, 3.0, 5), (8, 2.5, 6),
                                                 (8, 7.6, 1), (16, 7.4, 9)])
def test_free_threads_counts_the_cpus_others_leave_idle(cpus, load, threads):
    assert T.free_threads(cpus, load) == threads


def test_auto_threads_use_every_cpu_with_short_waits_and_the_free_ones_with_long_spins(monkeypatch):
    monkeypatch.setattr(T, "others_busy", lambda: 1.3)
    assert T.auto_threads(2, {"OMP_WAIT_POLICY": "PASSIVE"}) == (2, "OpenMP waits short")
    assert T.auto_threads(2, {"GOMP_SPINCOUNT": "10000"}) == (2, "OpenMP waits short")
    threads, why = T.auto_threads(2, {})
    assert threads == 1 and why.startswith("other processes busy on 1.3 of 2 CPUs; OpenMP threads spin")


@pytest.mark.parametrize("everyone, mine, others", [(2.0, 2.0, 0.0), (2.0, 0.5, 1.5), (0.0, 0.0, 0.0),
                                                     (1.9, 2.0, 0.0), (1.0, 0.0, 1.0)])
def test_others_busy_leaves_out_this_process_own_work(monkeypatch, everyone, mine, others):
    """The load average counted a process's own last run as competition: speed.py's in-process
    runs after the tutorial's got 1 thread instead of 2, at half the speed."""
    monkeypatch.setattr(T, "cpu_use", lambda seconds=0.1: (everyone, mine))
    assert T.others_busy() == pytest.approx(others)


def test_others_busy_falls_back_to_the_load_average_without_proc(monkeypatch):
    def no_proc(seconds=0.1):
        raise FileNotFoundError("/proc/stat")
    monkeypatch.setattr(T, "cpu_use", no_proc)
    monkeypatch.setattr(T, "load_average", lambda: 0.7)
    assert T.others_busy() == 0.7


PROC_STAT = """cpu  900 90 300 5000 50 7 3 1 0 0
cpu0 100 10 50 1000 10 1 1 0 0 0
cpu1 200 20 60 1000 10 2 1 1 0 0
cpu12 600 60 190 3000 30 4 1 0 0 0
intr 12345 0 0
ctxt 999
"""


@pytest.mark.parametrize("cpus, niced, busy", [({0}, False, 152), ({0, 1}, False, 416), ({1}, True, 284),
                                               ({12}, False, 795), ({0, 5}, False, 152)])
def test_busy_ticks_count_only_this_process_cpus(cpus, niced, busy):
    """user + system + irq + softirq + steal of the CPUs in the affinity mask (not the aggregate
    `cpu` line: a container's host has cores that are not ours), nice too when we are niced."""
    assert T.busy_ticks(PROC_STAT, cpus, niced) == busy


def test_busy_ticks_refuse_a_proc_stat_without_our_cpus():
    """No line for our CPUs (LXCFS renumbering them): an error, so the load average stands in,
    rather than 0, which would call a busy machine idle."""
    with pytest.raises(ValueError):
        T.busy_ticks(PROC_STAT, {5}, False)


LINUX = pytest.mark.skipif(not os.path.exists("/proc/self/stat"), reason="reads Linux's /proc")


@LINUX
def test_cpu_use_sees_a_busy_thread_of_this_process_as_its_own():
    stop = threading.Event()

    def spin():
        while not stop.is_set():
            pass
    spinner = threading.Thread(target=spin)
    spinner.start()
    try:
        everyone, mine = T.cpu_use(0.5)
    finally:
        stop.set()
        spinner.join()
    assert mine > 0.2                  # the spinning thread ran, and counts as this process's
    assert everyone >= mine - 0.1      # every process's busy time includes it (0.1: clock-tick rounding)


@LINUX
def test_others_busy_sees_another_process_busy_loop():
    loop = subprocess.Popen([sys.executable, "-c", "print('spinning', flush=True)\nwhile True: pass"],
                            stdout=subprocess.PIPE, text=True)
    try:
        assert loop.stdout.readline().strip() == "spinning"
        assert T.others_busy(0.5) > 0.2
    finally:
        loop.kill()
        loop.wait()


def test_explicit_threads_and_omp_num_threads_win(monkeypatch):
    import torch

    cpu = torch.device("cpu")
    monkeypatch.setattr(T, "others_busy", lambda: 50.0)
    monkeypatch.delenv("OMP_WAIT_POLICY", raising=False)
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setenv("GOMP_SPINCOUNT", "300000")
    assert thread_count(1, 1, cpu) == (1, "--threads")
    assert thread_count(0, 1, cpu)[0] == 1            # spinning waits on a loaded machine: one thread
    monkeypatch.setenv("OMP_NUM_THREADS", "2")
    assert thread_count(0, 1, cpu) == (0, "OMP_NUM_THREADS")   # 0: torch keeps what it read from it
    monkeypatch.setenv("OMP_NUM_THREADS", "1")                 # as torchrun sets it for each rank
    assert thread_count(0, 2, cpu)[0] == max(1, T.cpu_count() // 2)


def test_the_settings_block_names_the_threads(tmp_path):
    result = cnnlab_cli("train", "--model", "lenet5", "--epochs", 1, "--train-samples", 200, "--test-samples", 100,
                        "--report", "false", "--out", tmp_path / "run")
    device = next(line for line in result.stdout.splitlines() if line.startswith("device"))
    assert device.endswith(f", threads {T.cpu_count()} (OpenMP waits short)"), device


@pytest.mark.skipif(not os.path.exists("/proc/self/statm") or not hasattr(os, "confstr")
                    or "glibc" not in (os.confstr("CS_GNU_LIBC_VERSION") or ""), reason="glibc on Linux")
@pytest.mark.parametrize("tuned", [True, False])
def test_freed_step_sized_blocks_stay_for_reuse(tuned):
    """After reuse_freed_memory a freed 16 MiB block stays in the process for the next step
    (resident memory stays up); by glibc's default it goes back to the kernel, and the next
    step page-faults it in again."""
    code = f"""
import os
from cnnlab.allocator import reuse_freed_memory
if {tuned}:
    assert reuse_freed_memory()
page = os.sysconf("SC_PAGE_SIZE")
rss = lambda: int(open("/proc/self/statm").read().split()[1]) * page
before = rss()
block = bytearray(16 * 2**20)
block[::page] = bytes([1]) * len(range(0, len(block), page))   # every page touched
del block
print((rss() - before) / 2**20)
"""
    kept = float(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout)
    assert (kept > 12) == tuned, kept
