"""glibc's malloc told to keep freed memory (no torch here: cli.main runs it for every command)."""
import ctypes
import sys

# glibc's mallopt parameters, and the largest mmap threshold it accepts on 64-bit systems
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD, MMAP_THRESHOLD_MAX = -1, -3, 32 * 2**20


def reuse_freed_memory():
    """Let glibc's malloc keep freed memory for the next step instead of handing it back to the
    kernel: each training step allocates and frees the same activation-sized blocks, and mapping
    them afresh costs page faults every step (digits_fast's bf16 step 8.1 -> 7.1 ms on 2 cores).
    PyTorch's CPU tuning guide gets this from jemalloc or tcmalloc; glibc needs only two settings.
    The process keeps its peak heap until it exits, and glibc's adaptive default cannot be brought
    back: so the command line sets it (cli.main), and a Python caller may call this. No-op
    without glibc (macOS, musl, Windows)."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError, TypeError):
        return False
    # both or neither: either one alone turns off glibc's adaptive threshold and measured slower
    return bool(mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_MAX)) and bool(mallopt(M_TRIM_THRESHOLD, 2**30))
