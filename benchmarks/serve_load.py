"""Load test of `cnnlab serve` on loopback: 2,000 mixed requests from 8 concurrent clients, bounded
in time. Most are good images and bad bodies; one in 25 is hostile: a chunked upload far over
--max-bytes, an 8000x8000 RGBA PNG (1 GB to decode), or a slow client that sends its headers and
then stalls. Reports server errors (5xx other than 503: must be 0), how each kind was answered,
p50 / p99 latency of the good requests, whether the server survived, and its peak RSS.

    python benchmarks/serve_load.py RUN_DIR [--requests 2000] [--clients 8] [--time-limit 300]
        [--backend torch|onnx] [--max-batch 32] [--good-only]

--good-only sends only good images (throughput and p99 of the model path, for comparing backends
and batching).
"""
import argparse
import glob
import io
import os
import socket
import statistics
import subprocess
import sys
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor

import httpx

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from tests.conftest import bomb_png  # noqa: E402
from tests.test_serve_hostile import blank_png  # noqa: E402

TIMEOUT = 3   # the server's --timeout here: how long a slow client holds its connection


def payloads():
    """(kind, body) pairs: real sample images, a drawn image, and four kinds of bad request."""
    from PIL import Image

    samples = sorted(glob.glob(os.path.join(ROOT, "..", "shared", "datasets", "samples", "*.png")))
    good = [open(p, "rb").read() for p in samples]
    buf = io.BytesIO()
    Image.new("L", (280, 280), 0).save(buf, "PNG")
    good.append(buf.getvalue())
    bad = [b"", b"not an image at all", os.urandom(3000), b"\x89PNG\r\n\x1a\n" + os.urandom(100),
           bomb_png(), b"\0" * (6 * 2**20)]          # decompression bomb; over the 5 MiB request cap
    return [("good", g) for g in good] + [("bad", b) for b in bad] * 6   # about 30% bad requests


def chunked(url, client):
    """64 MiB streamed in chunks without a Content-Length: refused at 5 MiB (413), or the
    connection is closed under the sender."""
    def blocks():
        for _ in range(1024):
            yield bytes(65536)
    try:
        return client.post(f"{url}/predict", content=blocks()).status_code
    except httpx.HTTPError:
        return "closed"


def slow(url, client):
    """Headers promising 5,000 bytes, then 4 of them and silence: 408 after --timeout, or closed."""
    port = int(url.rsplit(":", 1)[1])
    with socket.create_connection(("127.0.0.1", port), timeout=60) as sock:
        sock.sendall(b"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Length: 5000\r\n\r\n\x89PNG")
        answer = sock.recv(64)
    return int(answer.split()[1]) if answer.startswith(b"HTTP/1.1 ") else "closed"


def start(run, port, extra=()):
    """The server, once it says it is serving (its socket is listening by then)."""
    server = subprocess.Popen([sys.executable, "-m", "cnnlab", "serve", run, "--port", str(port),
                               "--timeout", str(TIMEOUT), *extra], cwd=ROOT, stdout=subprocess.DEVNULL,
                              stderr=subprocess.PIPE, text=True)
    for line in server.stderr:
        if line.startswith("serving "):
            threading.Thread(target=server.stderr.read, daemon=True).start()   # keep the pipe drained
            return server
    raise SystemExit(f"the server did not start (exit status {server.wait()})")


def peak_rss_mib(pid):
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmHWM")) / 1024


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("run", help="a run folder or checkpoint (relative to the current folder)")
    ap.add_argument("--requests", type=int, default=2000)
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--time-limit", type=float, default=300)
    ap.add_argument("--backend", default="torch", choices=("torch", "onnx"))
    ap.add_argument("--max-batch", type=int, default=32)
    ap.add_argument("--good-only", action="store_true", help="only good images: no bad or hostile requests")
    args = ap.parse_args()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = start(os.path.abspath(args.run), port, ["--backend", args.backend, "--max-batch", str(args.max_batch)])   # the server runs in ROOT: the path must not be relative
    url = f"http://127.0.0.1:{port}"
    kinds, huge = payloads(), blank_png(8000, 8000)
    if args.good_only:
        kinds = [k for k in kinds if k[0] == "good"]
    client = httpx.Client(timeout=60)
    hostile = {"chunked": lambda: chunked(url, client), "slow": lambda: slow(url, client),
               "huge": lambda: client.post(f"{url}/predict", content=huge).status_code}
    deadline = time.monotonic() + args.time_limit

    def one(i):
        if time.monotonic() > deadline:
            return None
        if i % 25 == 24 and not args.good_only:   # 4% hostile, the three kinds in turn
            kind = list(hostile)[(i // 25) % 3]
            return kind, hostile[kind](), 0.0
        kind, body = kinds[i % len(kinds)]
        t = time.perf_counter()
        r = client.post(f"{url}/predict", content=body) if i % 2 else \
            client.post(f"{url}/predict", files={"file": (f"{i}.png", body, "image/png")})
        return kind, r.status_code, time.perf_counter() - t
    try:
        start_rss = peak_rss_mib(server.pid)
        t0 = time.perf_counter()
        with ThreadPoolExecutor(args.clients) as pool:
            results = [r for r in pool.map(one, range(args.requests)) if r]
        wall = time.perf_counter() - t0
        alive = server.poll() is None and client.get(f"{url}/health").status_code == 200
        peak = peak_rss_mib(server.pid) if server.poll() is None else float("nan")
    finally:
        server.terminate()
        server.wait(timeout=10)
    answers = {kind: Counter(code for k, code, _ in results if k == kind) for kind in ("good", "bad", *hostile)}
    latencies = sorted(t for kind, _, t in results if kind == "good")
    server_errors = sum(isinstance(c, int) and c >= 500 and c != 503 for _, c, _ in results)
    good_ok = answers["good"][200] == sum(answers["good"].values())
    print(f"backend {args.backend}, --max-batch {args.max_batch}")
    print(f"requests: {len(results)} in {wall:.1f} s ({len(results) / wall:.0f}/s) from {args.clients} clients")
    for kind, codes in answers.items():
        print(f"  {kind:<8} {sum(codes.values()):>5}: " + ", ".join(f"{c}: {n}" for c, n in sorted(codes.items(), key=str)))
    print(f"server errors (5xx but 503): {server_errors}; server alive at the end: {alive}")
    print(f"latency of good requests p50 {statistics.median(latencies) * 1000:.1f} ms, "
          f"p99 {latencies[int(0.99 * (len(latencies) - 1))] * 1000:.1f} ms")
    print(f"server peak RSS {peak:.0f} MiB (after start-up: {start_rss:.0f} MiB)")
    return 1 if server_errors or not good_ok or not alive else 0


if __name__ == "__main__":
    sys.exit(main())
