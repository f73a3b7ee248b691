"""Crash safety: SIGKILL `cnnlab train` at random moments (some during checkpoint writes), resume
each time with --resume, and compare the final weights with an uninterrupted run.

    python benchmarks/crash_resume.py --kills 20

Prints the number of kills, how many found a readable last.pt, and whether the final weights are
bitwise equal to the uninterrupted run's. Exit status 0 only if every check held."""
import argparse
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time

import torch

TRAIN = ["--data", "mnist-5k", "--train-samples", "3600", "--val-samples", "200", "--test-samples", "200",
         "--model", "net_dropout", "--batch-size", "16", "--augment", "crop", "--ema", "0.9",
         "--schedule", "onecycle", "--save-every-steps", "3", "--report", "false"]


def cnnlab(*args):
    return [sys.executable, "-m", "cnnlab", *args]


def weights(run_dir):
    from cnnlab.training.checkpoint import load

    return load(os.path.join(run_dir, "last.pt"), "last.pt")["state_dict"]


def mtime(path):
    return os.stat(path).st_mtime_ns if os.path.exists(path) else None


def wait_for_checkpoint(proc, run_dir, before):
    """Block until this process has written last.pt (its mtime differs from `before`) or ended, so
    every kill lands after the run has made progress, however slow the machine is."""
    path = os.path.join(run_dir, "last.pt")
    while mtime(path) == before and proc.poll() is None:
        time.sleep(0.05)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--kills", type=int, default=20)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--epochs", type=int, default=80)
    ap.add_argument("--min-delay", type=float, default=0.5, help="seconds after the first last.pt at least")
    ap.add_argument("--max-delay", type=float, default=3.0, help="seconds after the first last.pt at most")
    args = ap.parse_args()
    rng = random.Random(args.seed)
    train = TRAIN + ["--epochs", str(args.epochs)]
    work = tempfile.mkdtemp(prefix="cnnlab-crash-")
    reference, victim = os.path.join(work, "reference"), os.path.join(work, "victim")
    subprocess.run(cnnlab("train", *train, "--out", reference), check=True, capture_output=True)
    kills = readable = unreadable = 0
    while kills < args.kills:
        resuming = os.path.exists(os.path.join(victim, "last.pt"))
        cmd = cnnlab("train", "--resume", victim) if resuming else cnnlab("train", *train, "--out", victim)
        before = mtime(os.path.join(victim, "last.pt"))
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        started = time.perf_counter()
        wait_for_checkpoint(proc, victim, before)   # an event, not a guess: slow machines start slower
        time.sleep(rng.uniform(args.min_delay, args.max_delay))
        if proc.poll() is not None:      # finished before the kill: the run is complete
            if proc.returncode != 0:
                print(proc.stderr.read().decode(), file=sys.stderr)
                return 1
            break
        proc.kill()
        proc.wait()
        kills += 1
        state = "not written yet"
        if os.path.exists(os.path.join(victim, "last.pt")):
            try:
                weights(victim)
                readable, state = readable + 1, "readable"
            except Exception as e:  # the failure this script exists to catch
                unreadable, state = unreadable + 1, f"UNREADABLE ({e})"
        print(f"kill {kills} after {time.perf_counter() - started:.1f}s: last.pt {state}")
    final = subprocess.run(cnnlab("train", "--resume", victim), capture_output=True, text=True)
    if final.returncode != 0:
        print(final.stderr, file=sys.stderr)
        return 1
    a, b = weights(reference), weights(victim)
    equal = a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    print(f"kills: {kills}; last.pt readable after {readable}, unreadable after {unreadable}, "
          f"not yet written after {kills - readable - unreadable}; final weights equal to the uninterrupted run: "
          f"{'yes' if equal else 'NO'}")
    shutil.rmtree(work, ignore_errors=True)
    return 0 if equal and not unreadable else 1


if __name__ == "__main__":
    sys.exit(main())
