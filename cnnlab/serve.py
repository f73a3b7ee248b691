"""`cnnlab serve`: FastAPI on uvicorn. The model is loaded once, before the server starts, so a bad
checkpoint fails at once with the clear error instead of at the first request."""
import io
import os

from .errors import CnnlabError

PAGE = os.path.join(os.path.dirname(__file__), "static", "index.html")


def create_app(model, top_k=5, max_bytes=5 * 2**20):
    from fastapi import FastAPI, Request
    from fastapi.concurrency import run_in_threadpool
    from fastapi.responses import HTMLResponse, JSONResponse

    app = FastAPI(title="cnnlab", description="Image classification with a cnnlab checkpoint.")
    digits = model.classes == [str(i) for i in range(10)]

    def classify(raw, name, k):
        try:
            x = model.to_uint8(io.BytesIO(raw), name=name)
        except CnnlabError as e:
            return JSONResponse({"path": name, "error": str(e)}, status_code=400)
        return {"path": name, "predictions": model.top_k(model.logits(x[None]), k)[0]}

    @app.post("/predict")
    async def predict(request: Request, top_k: int = top_k):
        declared = int(request.headers.get("content-length") or 0)
        if declared > max_bytes:
            return JSONResponse({"error": f"request of {declared} bytes is over the {max_bytes}-byte limit"}, 413)
        body = await request.body()
        if len(body) > max_bytes:
            return JSONResponse({"error": f"request is over the {max_bytes}-byte limit"}, 413)
        name, raw = "upload", body
        if request.headers.get("content-type", "").startswith("multipart/form-data"):
            form = await request.form()
            files = [v for v in form.values() if hasattr(v, "read")]
            if not files:
                return JSONResponse({"error": "multipart request without a file field"}, 400)
            name, raw = files[0].filename or "upload", await files[0].read()
        if not raw:
            return JSONResponse({"error": "empty request: send an image as the body or a multipart file"}, 400)
        return await run_in_threadpool(classify, raw, name, max(1, min(top_k, len(model.classes))))

    @app.get("/health")
    def health():
        return {"status": "ok"}

    @app.get("/model")
    def info():
        return {"model": model.config.get("model"), "classes": model.classes, "input_shape": list(model.in_shape),
                "preprocess": model.preprocess, "metrics": model.metrics, "digits": digits}

    @app.get("/", response_class=HTMLResponse)
    def page():
        with open(PAGE, encoding="utf-8") as f:
            return f.read()

    return app


def serve(checkpoint_path, host="127.0.0.1", port=8000, top_k=5, max_bytes=5 * 2**20):
    import uvicorn

    from .inference import load

    model = load(checkpoint_path)  # fails here, before binding, on a bad checkpoint
    app = create_app(model, top_k=top_k, max_bytes=max_bytes)
    print(f"serving {model.path} ({len(model.classes)} classes) on http://{host}:{port}/  (Ctrl-C stops)")
    uvicorn.run(app, host=host, port=port, log_level="warning")
