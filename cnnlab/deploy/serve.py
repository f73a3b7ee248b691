"""`cnnlab serve`: FastAPI on uvicorn. The model is loaded once, before the server starts, so a bad
checkpoint fails at once with the clear error instead of at the first request.

One client must not be able to take the server down, so every size and time taken from a client
is bounded: the body while it streams in (`--max-bytes`), the pixels an image decodes to
(`--max-pixels`, checked from its header), the images decoding at once (DecodeSlots), the time
to send headers and body (`--timeout`) and the connections open at once (CONNECTIONS)."""
import asyncio
import base64
import errno
import functools
import hashlib
import hmac
import io
import ipaddress
import os
import re
import socket
import time
from contextlib import asynccontextmanager

import h11
import torch
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse
from uvicorn.protocols.http.h11_impl import H11Protocol

from ..data.images import open_header
from ..errors import CnnlabError, UsageError, note

PAGE = os.path.join(os.path.dirname(__file__), "static", "index.html")
PROTECTED = ("/predict", "/explain", "/model", "/metrics")   # what --api-key guards; the page and /health stay open
CONNECTIONS = 32   # uvicorn answers 503 beyond: at most ~32 request bodies of --max-bytes in memory
SLOTS = max(1, min(4, os.cpu_count() or 1))   # images decoding at once: more only queue for the same cores
QUEUE = 8 * SLOTS   # requests that may wait for a slot; one more is answered 503 with Retry-After
CLOSE = {"Connection": "close"}   # after a refusal that leaves nothing more worth reading


class Refused(Exception):
    """A request answered with an error status and `{"error": message}`."""

    def __init__(self, status, message, headers=None):
        super().__init__(message)
        self.status, self.headers = status, headers or {}


def explained(model, image, name, target=None):
    """The /explain answer for one decoded image. Grad-CAM hooks into the network, so it runs on a
    copy: /predict's batches share the original meanwhile."""
    import copy

    from ..evaluation.explain import explain_batch, overlay

    net = copy.deepcopy(model.net)
    r = explain_batch(net, model.preprocess, image[None], model.classes, target)[0]
    buffer = io.BytesIO()
    overlay(image, r.pop("heatmap")).save(buffer, format="PNG")
    return {"path": name, **r, "overlay": "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()}


def decode(model, raw, name, max_pixels):
    """One uploaded file as the model's uint8 (C, S, S) input, or the error message (str) when it
    is not a readable image or decodes to more than `max_pixels` (checked from its header)."""
    try:
        img = open_header(io.BytesIO(raw), name, model.preprocess.decode_size, max_pixels, "--max-pixels")
        return model.preprocess.image(img, name=name)
    except CnnlabError as e:
        return str(e)


def decode_all(model, files, max_pixels):
    return [(name, decode(model, raw, name, max_pixels)) for name, raw in files]


async def answer(model, batcher, decoded, k):
    """(JSON body, status) for [(name, input or error)]. One file: `{path, predictions}` or
    `{path, error}` (400). Several: a list in the same order, 400 only when none is readable
    (one message naming them all). The readable ones go through `batcher` together."""
    images = [x for _, x in decoded if not isinstance(x, str)]
    preds = iter(model.top_k(await batcher.probabilities(torch.stack(images)), k) if images else [])
    results = [{"path": name, "error": x} if isinstance(x, str) else {"path": name, "predictions": next(preds)}
               for name, x in decoded]
    if len(results) == 1:
        return results[0], 400 if "error" in results[0] else 200
    if all("error" in r for r in results):  # each error message starts with its file's name
        return {"error": "no file is a readable image: " + " ".join(r["error"] for r in results)}, 400
    return results, 200


async def read_body(request, max_bytes, timeout):
    """The request's body, read as it streams in: refused (413) as soon as it passes `max_bytes`,
    so a chunked upload of any size costs at most `max_bytes` of memory, and refused (408) when
    it has not all arrived within `timeout` seconds. After a 413 uvicorn reads and drops the rest
    (closing at once would reset the connection, losing the answer to a client still sending)
    until TimedH11Protocol's deadline."""
    declared = int(request.headers.get("content-length") or 0)
    if declared > max_bytes:
        raise Refused(413, f"request of {declared} bytes is over the {max_bytes}-byte limit (--max-bytes)")

    async def collect():
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > max_bytes:
                raise Refused(413, f"request is over the {max_bytes}-byte limit (--max-bytes)")
            chunks.append(chunk)
        return b"".join(chunks)
    try:
        return await asyncio.wait_for(collect(), timeout)
    except asyncio.TimeoutError:
        raise Refused(408, f"the request's body did not arrive within {timeout:g} s (--timeout)", CLOSE) from None
    except ClientDisconnect:   # nobody is left to read the answer; no traceback in the log either
        raise Refused(400, "the client went away before sending its whole body", CLOSE) from None


async def uploaded_files(request, max_bytes, timeout):
    """[(file name, bytes)]: the raw body, or every file of a multipart form in the order sent;
    Refused over `max_bytes` (413), after `timeout` (408) or without any file content (400)."""
    body = await read_body(request, max_bytes, timeout)
    files = [("upload", body)]
    if request.headers.get("content-type", "").startswith("multipart/form-data"):
        async def replay():   # the form is parsed from the body already read, within its limit
            return {"type": "http.request", "body": body, "more_body": False}
        form = await Request(request.scope, replay).form()
        # multi_items keeps repeated field names and their order (values() keeps only the last)
        files = [(v.filename or "upload", await v.read()) for _, v in form.multi_items() if hasattr(v, "read")]
        if not files:
            raise Refused(400, "multipart request without a file field")
    if not any(raw for _, raw in files):
        raise Refused(400, "empty request: send an image as the body or a multipart file")
    return files


class DecodeSlots:
    """At most `slots` requests decode and classify at once, and at most `queue` more wait for a
    slot; beyond that a request is refused at once (503, Retry-After), so a burst of large
    images costs a bounded amount of memory instead of one decode per client."""

    def __init__(self, slots=SLOTS, queue=QUEUE):
        self.free, self.room, self.inside = asyncio.Semaphore(slots), slots + queue, 0

    @asynccontextmanager
    async def hold(self):
        if self.inside >= self.room:
            raise Refused(503, f"the server is busy: {self.room} requests are decoding or waiting; retry in a second",
                          {"Retry-After": "1"})
        self.inside += 1
        try:
            async with self.free:
                yield
        finally:
            self.inside -= 1


def inline_hashes(page, tag):
    """CSP source expressions ('sha256-...') allowing exactly the page's own inline <tag> blocks."""
    blocks = re.findall(rf"<{tag}>(.*?)</{tag}>", page, re.S)
    return " ".join(f"'sha256-{base64.b64encode(hashlib.sha256(b.encode()).digest()).decode()}'" for b in blocks)


def security_headers(page, docs):
    """Headers for every response. The policy lets the page run only its own inline script and
    style (by hash): a class name that reached the page as HTML could not run script. FastAPI's
    /docs and /redoc (with --docs) load their script from a CDN, so they get a looser policy."""
    common = {"X-Content-Type-Options": "nosniff", "X-Frame-Options": "DENY", "Referrer-Policy": "no-referrer"}
    strict = (f"default-src 'none'; script-src {inline_hashes(page, 'script')}; "
              f"style-src {inline_hashes(page, 'style')}; img-src 'self' blob:; connect-src 'self'; "
              "base-uri 'none'; form-action 'none'; frame-ancestors 'none'")
    cdn = "https://cdn.jsdelivr.net"
    loose = (f"default-src 'none'; script-src 'unsafe-inline' {cdn}; "
             f"style-src 'unsafe-inline' {cdn} https://fonts.googleapis.com; font-src https://fonts.gstatic.com; "
             "img-src 'self' data: https:; connect-src 'self'; worker-src blob:; frame-ancestors 'none'")
    return ({**common, "Content-Security-Policy": strict},
            {**common, "Content-Security-Policy": loose} if docs else None)


def asgi_headers(headers):
    return [(name.lower().encode(), value.encode()) for name, value in headers.items()]


class Guard:
    """ASGI middleware: the security headers on every response, and, with an API key, 401 for
    PROTECTED paths unless the request carries `Authorization: Bearer KEY` or `X-API-Key: KEY`."""

    def __init__(self, app, page, api_key=None, docs=False):
        self.app, self.api_key = app, api_key
        page_headers, docs_headers = security_headers(page, docs)
        self.headers, self.docs_headers = asgi_headers(page_headers), docs_headers and asgi_headers(docs_headers)

    def authorized(self, headers):
        scheme, _, token = headers.get(b"authorization", b"").partition(b" ")
        given = headers.get(b"x-api-key") or (token if scheme.lower() == b"bearer" else b"")
        return hmac.compare_digest(given, self.api_key.encode())   # constant time: no guessing by timing

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path = scope["path"]
        extra = self.docs_headers if self.docs_headers and path.startswith(("/docs", "/redoc")) else self.headers

        async def send_with_headers(message):
            if message["type"] == "http.response.start":
                message = {**message, "headers": list(message.get("headers", [])) + extra}
            await send(message)
        if self.api_key and path.startswith(PROTECTED) and not self.authorized(dict(scope["headers"])):
            refusal = JSONResponse({"error": "this server needs its API key: send Authorization: Bearer KEY or "
                                             "X-API-Key: KEY"}, 401, headers={"WWW-Authenticate": "Bearer"})
            return await refusal(scope, receive, send_with_headers)
        await self.app(scope, receive, send_with_headers)


class Metrics:
    """Prometheus counters of one app (its own registry: several apps in one process stay apart)."""

    def __init__(self, model):
        from prometheus_client import CollectorRegistry, Counter, Histogram, Info

        self.registry = CollectorRegistry()
        self.requests = Counter("cnnlab_requests", "/predict requests by HTTP status", ["status"], registry=self.registry)
        self.seconds = Histogram("cnnlab_request_seconds", "/predict time from request to answer", registry=self.registry)
        self.batch = Histogram("cnnlab_batch_images", "images per forward pass", registry=self.registry,
                               buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256))
        Info("cnnlab_model", "the model served", registry=self.registry).info(
            {"model": str(model.config.get("model")), "backend": model.backend})

    def observe(self, status, seconds):
        self.requests.labels(str(status)).inc()
        self.seconds.observe(seconds)

    def text(self):
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        return generate_latest(self.registry), CONTENT_TYPE_LATEST


def create_app(model, top_k=5, max_bytes=5 * 2**20, max_pixels=None, timeout=30.0, api_key=None, docs=False,
               max_batch=32, batch_wait=0.0):
    """The ASGI app: FastAPI wrapped in Guard. `max_pixels` None: default_max_pixels(model)."""
    from fastapi import FastAPI
    from fastapi.concurrency import run_in_threadpool
    from fastapi.responses import HTMLResponse, Response

    from .batching import Batcher

    urls = {} if docs else {"docs_url": None, "redoc_url": None, "openapi_url": None}
    app = FastAPI(title="cnnlab", description="Image classification with a cnnlab checkpoint.", **urls)
    digits = model.classes == [str(i) for i in range(10)]
    max_pixels = max_pixels or default_max_pixels(model)
    slots, metrics = DecodeSlots(), Metrics(model)
    batcher = Batcher(model, max_batch, batch_wait, on_batch=metrics.batch.observe)
    with open(PAGE, encoding="utf-8") as f:
        page = f.read()

    @app.post("/predict")
    async def predict(request: Request, top_k: int = top_k):
        """Classify the image sent as the raw body, or every file of a multipart form.

        One image answers `{path, predictions: [{label, index, probability}]}`. A multipart form
        with several files (any field names) answers a list with one entry per file, in the order
        sent, each `{path, predictions}` or, for a file that is not a readable image, `{path, error}`;
        `path` is the file's name. The status is 200 when at least one file was read, 400 when none
        was (or the body is empty or has no file, or an image decodes to over `--max-pixels`), 413
        above `--max-bytes` for the whole request, 408 when the body takes over `--timeout`, 503
        (with Retry-After) when too many requests are already decoding."""
        start = time.perf_counter()
        try:
            files = await uploaded_files(request, max_bytes, timeout)
            async with slots.hold():   # decoding is bounded; the forward pass is the batcher's
                decoded = await run_in_threadpool(decode_all, model, files, max_pixels)
            body, status = await answer(model, batcher, decoded, max(1, min(top_k, len(model.classes))))
            response = JSONResponse(body, status)
        except Refused as e:
            response = JSONResponse({"error": str(e)}, e.status, headers=e.headers)
        metrics.observe(response.status_code, time.perf_counter() - start)
        return response

    @app.post("/explain")
    async def explain(request: Request, target: str = None):
        """Grad-CAM of the image sent (the raw body, or a form's first file): `{path, predicted,
        probability, target, target_probability, layer, overlay}`, the overlay a PNG data URL;
        `target` a class name (default: the top-1). 400 for an unreadable image, an unknown class
        or the ONNX backend (Grad-CAM needs the PyTorch network)."""
        try:
            if model.backend != "torch":
                raise Refused(400, "POST /explain needs the PyTorch network: serve a checkpoint with --backend torch.")
            files = await uploaded_files(request, max_bytes, timeout)
            async with slots.hold():
                name, x = (await run_in_threadpool(decode_all, model, files[:1], max_pixels))[0]
                if isinstance(x, str):
                    raise Refused(400, x)
                response = JSONResponse(await run_in_threadpool(explained, model, x, name, target), 200)
        except Refused as e:
            response = JSONResponse({"error": str(e)}, e.status, headers=e.headers)
        except CnnlabError as e:   # an unknown --target class
            response = JSONResponse({"error": str(e)}, 400)
        return response

    @app.get("/metrics")
    def prometheus():
        """Request counts by status, request latency and batch sizes, in Prometheus text format."""
        body, media_type = metrics.text()
        return Response(body, media_type=media_type)

    @app.get("/health")
    def health():
        return {"status": "ok"}

    @app.get("/model")
    def info():
        return {"model": model.config.get("model"), "backend": model.backend, "classes": model.classes,
                "input_shape": list(model.in_shape), "preprocess": model.preprocess.to_dict(), "metrics": model.metrics,
                "digits": digits, "tta": model.tta}

    @app.get("/", response_class=HTMLResponse)
    def index():
        return page

    return Guard(app, page, api_key=api_key, docs=docs)


def default_max_pixels(model):
    """The pixels an uploaded image may decode to unless --max-pixels says otherwise: (16 x the
    model's input side)^2, at least 2048x2048, so one decode holds at most ~64 MiB for a small
    model (images.BYTES_PER_PIXEL). A phone photo sent as JPEG decodes at 1/8 scale, well below."""
    return max(2048 * 2048, (16 * model.preprocess.image_size) ** 2)


class TimedH11Protocol(H11Protocol):
    """uvicorn's HTTP/1.1 protocol, plus a deadline: `deadline` seconds after connecting, or after
    its last answer, a client that has not sent a complete request line and headers, or is still
    sending a body the server already refused, is disconnected. uvicorn's own keep-alive timer
    restarts on every byte received, so a client sending one byte a second (slowloris) would
    otherwise hold a connection forever. A body being read has the app's own --timeout (408)."""

    def __init__(self, *args, deadline=30.0, **kwargs):
        super().__init__(*args, **kwargs)
        self.deadline, self.timer = deadline, None

    def arm(self):
        if self.timer:
            self.timer.cancel()
        self.timer = self.loop.call_later(self.deadline, self.close_if_waiting)

    def close_if_waiting(self):
        no_request = self.conn.their_state is h11.IDLE
        refused_body = self.conn.their_state is h11.SEND_BODY and self.conn.our_state is h11.DONE
        if (no_request or refused_body) and not self.transport.is_closing():
            self.transport.close()

    def connection_made(self, transport):
        super().connection_made(transport)
        self.arm()

    def on_response_complete(self):
        super().on_response_complete()
        self.arm()

    def connection_lost(self, exc):
        if self.timer:
            self.timer.cancel()
        super().connection_lost(exc)


def listen(host, port):
    """A socket already bound to host:port, so a port in use fails here with one line, before
    anything is printed, and nothing can take the port between this check and uvicorn."""
    if not 0 <= port <= 65535:
        raise UsageError(f"--port {port} is not a port number: use --port N with N from 1 to 65535 (0: any free port)")
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn does: restart without waiting
    try:
        sock.bind((host, port))
        sock.listen(2048)
    except OSError as e:
        sock.close()
        if e.errno == errno.EADDRINUSE:
            raise CnnlabError(f"port {port} on {host} is already in use: pick a free one with --port N "
                              "(or stop the process using it)") from None
        if e.errno == errno.EACCES:
            raise CnnlabError(f"no permission to listen on port {port}: use --port N with N above 1023") from None
        raise CnnlabError(f"cannot listen on {host}:{port} ({e.strerror or e}): check --host, "
                          "or pick another port with --port N") from None
    return sock


def reachable_from_network(host):
    """True unless `host` is a loopback address or 'localhost' (0.0.0.0 and :: mean every interface)."""
    if host.lower() == "localhost":
        return False
    try:
        return not ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:   # a host name: assume it is reachable
        return True


def check_settings(host, max_bytes, max_pixels, timeout, api_key, max_batch=1, batch_wait=0.0):
    """UsageError for a limit that is not positive; a warning when the API is open to the network."""
    for flag, value in (("--max-bytes", max_bytes), ("--max-pixels", max_pixels), ("--timeout", timeout),
                        ("--max-batch", max_batch)):
        if value is not None and not value > 0:
            raise UsageError(f"{flag} {value} must be positive")
    if not 0 <= batch_wait <= 1:
        raise UsageError(f"--batch-wait-ms {batch_wait * 1000:g} must be from 0 to 1000")
    if api_key == "":
        raise UsageError("--api-key (or CNNLAB_API_KEY) is empty: give a key, or leave it out")
    if reachable_from_network(host) and not api_key:
        note(f"warning: --host {host} makes this API reachable from the network, and it has no authentication: "
             "anyone who can reach it can use the model. Add --api-key KEY (or set CNNLAB_API_KEY) to require a key.")


def serve(checkpoint_path, host="127.0.0.1", port=8000, top_k=5, max_bytes=5 * 2**20, max_pixels=None,
          timeout=30.0, api_key=None, docs=False, backend=None, max_batch=32, batch_wait=0.0, tta="none"):
    import uvicorn

    from .inference import check_top_k, load

    check_settings(host, max_bytes, max_pixels, timeout, api_key, max_batch, batch_wait)
    check_top_k(top_k)
    sock = listen(host, port)
    try:
        model = load(checkpoint_path, backend=backend)  # fails here, before serving, on a bad checkpoint
        model.tta = tta   # every prediction averages these views' probabilities; /model says so
        app = create_app(model, top_k=top_k, max_bytes=max_bytes, max_pixels=max_pixels, timeout=timeout,
                         api_key=api_key, docs=docs, max_batch=max_batch, batch_wait=batch_wait)
        port = sock.getsockname()[1]  # the real one when --port 0 asked for any free port
        note(f"serving {model.path} ({len(model.classes)} classes, {model.backend}) on http://{host}:{port}/  (Ctrl-C stops)")
        protocol = functools.partial(TimedH11Protocol, deadline=timeout)
        uvicorn.Server(uvicorn.Config(app, log_level="warning", http=protocol, limit_concurrency=CONNECTIONS,
                                      timeout_keep_alive=min(5, timeout))).run(sockets=[sock])
    finally:
        sock.close()
