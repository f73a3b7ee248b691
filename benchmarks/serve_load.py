"""Load test of `cnnlab serve` on loopback: 2,000 mixed good and bad requests from 8 concurrent
clients, bounded in time. Reports server errors (5xx: must be 0), client errors (expected for the
bad requests), and p50 / p99 latency.

    python benchmarks/serve_load.py RUN_DIR [--requests 2000] [--clients 8] [--time-limit 300]
"""
import argparse
import glob
import io
import os
import socket
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import httpx

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def payloads():
    """(kind, body) pairs: real sample images, a drawn image, and four kinds of bad request."""
    from PIL import Image

    good = [open(p, "rb").read() for p in sorted(glob.glob(os.path.join(ROOT, "..", "shared", "datasets", "samples", "*.png")))]
    buf = io.BytesIO()
    Image.new("L", (280, 280), 0).save(buf, "PNG")
    good.append(buf.getvalue())
    sys.path.insert(0, ROOT)
    from tests.conftest import bomb_png

    bad = [b"", b"not an image at all", os.urandom(3000), b"\x89PNG\r\n\x1a\n" + os.urandom(100),
           bomb_png(), b"\0" * (6 * 2**20)]          # decompression bomb; over the 5 MiB request cap
    return [("good", g) for g in good] + [("bad", b) for b in bad] * 6   # about 30% bad requests


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("run")
    ap.add_argument("--requests", type=int, default=2000)
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--time-limit", type=float, default=300)
    args = ap.parse_args()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = subprocess.Popen([sys.executable, "-m", "cnnlab", "serve", args.run, "--port", str(port)],
                              cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(300):
            try:
                if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.1)
        kinds = payloads()
        deadline = time.monotonic() + args.time_limit
        client = httpx.Client(timeout=30)

        def one(i):
            if time.monotonic() > deadline:
                return None
            kind, body = kinds[i % len(kinds)]
            t = time.perf_counter()
            r = client.post(f"{url}/predict", content=body) if i % 2 else \
                client.post(f"{url}/predict", files={"file": (f"{i}.png", body, "image/png")})
            return kind, r.status_code, time.perf_counter() - t
        start = time.perf_counter()
        with ThreadPoolExecutor(args.clients) as pool:
            results = [r for r in pool.map(one, range(args.requests)) if r]
        wall = time.perf_counter() - start
    finally:
        server.terminate()
        server.wait(timeout=10)
    latencies = sorted(r[2] for r in results)
    server_errors = sum(code >= 500 for _, code, _ in results)
    good_ok = sum(kind == "good" and code == 200 for kind, code, _ in results)
    bad_4xx = sum(kind == "bad" and 400 <= code < 500 for kind, code, _ in results)
    n_good = sum(kind == "good" for kind, _, _ in results)
    print(f"requests: {len(results)} in {wall:.1f} s ({len(results) / wall:.0f}/s) from {args.clients} clients")
    print(f"server errors (5xx): {server_errors}; good answered 200: {good_ok}/{n_good}; "
          f"bad answered 4xx: {bad_4xx}/{len(results) - n_good}")
    print(f"latency p50 {statistics.median(latencies) * 1000:.1f} ms, p99 {latencies[int(0.99 * (len(latencies) - 1))] * 1000:.1f} ms")
    return 1 if server_errors or good_ok != n_good else 0


if __name__ == "__main__":
    sys.exit(main())
