"""`cnnlab serve`: FastAPI on uvicorn. The model is loaded once, before the server starts, so a bad
checkpoint fails at once with the clear error instead of at the first request."""
import errno
import io
import os
import socket

from ..errors import CnnlabError, UsageError, note

PAGE = os.path.join(os.path.dirname(__file__), "static", "index.html")


class Refused(Exception):
    """A request answered with an error status and `{"error": message}`."""

    def __init__(self, status, message):
        super().__init__(message)
        self.status = status


def classify(model, raw, name, k):
    """`{path, predictions}` for one uploaded file, or `{path, error}` when it is not a readable image."""
    try:
        x = model.preprocess.image(io.BytesIO(raw), name=name)
    except CnnlabError as e:
        return {"path": name, "error": str(e)}
    return {"path": name, "predictions": model.top_k(model.logits(x[None]), k)[0]}


def answer(model, files, k):
    """(JSON body, status). One file: its result (400 if unreadable). Several: a list in the same
    order, 400 only when none is readable (one message naming them all)."""
    results = [classify(model, raw, name, k) for name, raw in files]
    if len(results) == 1:
        return results[0], 400 if "error" in results[0] else 200
    if all("error" in r for r in results):  # each error message starts with its file's name
        return {"error": "no file is a readable image: " + " ".join(r["error"] for r in results)}, 400
    return results, 200


async def uploaded_files(request, max_bytes):
    """[(file name, bytes)]: the raw body, or every file of a multipart form in the order sent;
    Refused over `max_bytes` (413) or without any file content (400)."""
    declared = int(request.headers.get("content-length") or 0)
    if declared > max_bytes:
        raise Refused(413, f"request of {declared} bytes is over the {max_bytes}-byte limit")
    body = await request.body()
    if len(body) > max_bytes:
        raise Refused(413, f"request is over the {max_bytes}-byte limit")
    files = [("upload", body)]
    if request.headers.get("content-type", "").startswith("multipart/form-data"):
        form = await request.form()
        # multi_items keeps repeated field names and their order (values() keeps only the last)
        files = [(v.filename or "upload", await v.read()) for _, v in form.multi_items() if hasattr(v, "read")]
        if not files:
            raise Refused(400, "multipart request without a file field")
    if not any(raw for _, raw in files):
        raise Refused(400, "empty request: send an image as the body or a multipart file")
    return files


def create_app(model, top_k=5, max_bytes=5 * 2**20):
    from fastapi import FastAPI, Request
    from fastapi.concurrency import run_in_threadpool
    from fastapi.responses import HTMLResponse, JSONResponse

    app = FastAPI(title="cnnlab", description="Image classification with a cnnlab checkpoint.")
    digits = model.classes == [str(i) for i in range(10)]

    @app.post("/predict")
    async def predict(request: Request, top_k: int = top_k):
        """Classify the image sent as the raw body, or every file of a multipart form.

        One image answers `{path, predictions: [{label, index, probability}]}`. A multipart form
        with several files (any field names) answers a list with one entry per file, in the order
        sent, each `{path, predictions}` or, for a file that is not a readable image, `{path, error}`;
        `path` is the file's name. The status is 200 when at least one file was read, 400 when none
        was (or the body is empty or has no file), 413 above `--max-bytes` for the whole request."""
        try:
            files = await uploaded_files(request, max_bytes)
        except Refused as e:
            return JSONResponse({"error": str(e)}, e.status)
        body, status = await run_in_threadpool(answer, model, files, max(1, min(top_k, len(model.classes))))
        return JSONResponse(body, status)

    @app.get("/health")
    def health():
        return {"status": "ok"}

    @app.get("/model")
    def info():
        return {"model": model.config.get("model"), "classes": model.classes, "input_shape": list(model.in_shape),
                "preprocess": model.preprocess.to_dict(), "metrics": model.metrics, "digits": digits}

    @app.get("/", response_class=HTMLResponse)
    def page():
        with open(PAGE, encoding="utf-8") as f:
            return f.read()

    return app


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


def serve(checkpoint_path, host="127.0.0.1", port=8000, top_k=5, max_bytes=5 * 2**20):
    import uvicorn

    from .inference import load

    sock = listen(host, port)
    try:
        model = load(checkpoint_path)  # fails here, before serving, on a bad checkpoint
        app = create_app(model, top_k=top_k, max_bytes=max_bytes)
        port = sock.getsockname()[1]  # the real one when --port 0 asked for any free port
        note(f"serving {model.path} ({len(model.classes)} classes) on http://{host}:{port}/  (Ctrl-C stops)")
        uvicorn.Server(uvicorn.Config(app, log_level="warning")).run(sockets=[sock])
    finally:
        sock.close()
