"""Headless Chromium (Debian's package) driven by Playwright: the report renders with every image,
and the serve page turns a drawn digit into a prediction. Screenshots are saved as artifacts."""
import os

import httpx
import pytest

from .conftest import FAULT_REPORT
from .test_serve import free_port, start_server

ARTIFACTS = os.path.join(os.path.dirname(__file__), "..", "runs", "test-artifacts")
from .browser import FLAGS, capture_errors


@pytest.fixture(scope="module")
def browser(chromium):
    sync_api = pytest.importorskip("playwright.sync_api")
    with sync_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=chromium, headless=True, args=FLAGS)
        yield b
        b.close()


def test_report_renders_with_all_images(browser, demo_run):
    os.makedirs(ARTIFACTS, exist_ok=True)
    page = browser.new_page()
    errors = capture_errors(page)
    page.goto("file://" + os.path.abspath(os.path.join(demo_run, "report.html")))
    images = page.eval_on_selector_all("img", "els => els.map(e => [e.complete, e.naturalWidth])")
    assert len(images) == 6 and all(done and width > 0 for done, width in images), images
    assert "cnnlab report" in page.title() and not errors, errors
    page.screenshot(path=os.path.join(ARTIFACTS, "report.png"), full_page=True)


@pytest.fixture(scope="module", params=["torch", "onnx"])
def serve_url(demo_run, request):
    """The page served by each backend: the same tests pass on both."""
    port = free_port()
    server = start_server(demo_run, port, "--backend", request.param)
    yield f"http://127.0.0.1:{port}"
    server.terminate()
    server.wait(timeout=10)


def draw_a_one(page):
    """A "1": one vertical stroke down the middle of the canvas."""
    box = page.locator("#canvas").bounding_box()
    page.mouse.move(box["x"] + 140, box["y"] + 50)
    page.mouse.down()
    for y in range(50, 240, 10):
        page.mouse.move(box["x"] + 140, box["y"] + y)
    page.mouse.up()


def open_page(browser, url):
    page = browser.new_page()
    page.goto(url)
    page.wait_for_selector("#canvas", state="visible")
    return page


def wait_for_result(page, source, answers):
    """Until the page has handled `answers` replies and shows the result titled `source`."""
    page.wait_for_function("([s, n]) => document.getElementById('source').textContent.includes(s) && "
                           "+(document.body.dataset.answered || 0) >= n && document.querySelector('.prediction')",
                           arg=[source, answers], timeout=15000)


def shown_labels(page):
    return page.eval_on_selector_all(".prediction span", "els => els.map(e => e.textContent)")


def canvas_is_blank(page):
    return page.evaluate("""() => { const c = document.getElementById('canvas');
        const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;
        return d.every((v, i) => i % 4 === 3 || v === 0); }""")


def test_draw_a_digit_and_see_a_prediction(browser, serve_url):
    page = open_page(browser, serve_url)
    draw_a_one(page)
    wait_for_result(page, "the drawing", 1)
    labels = shown_labels(page)   # textContent: innerText reads "190.8%" for a row not laid out yet
    assert len(labels) == 5 and set(labels) <= {str(i) for i in range(10)}
    os.makedirs(ARTIFACTS, exist_ok=True)
    page.screenshot(path=os.path.join(ARTIFACTS, "serve.png"))


def upload_expectation(serve_url, shared_datasets, name="mnist_07_9.png"):
    path = os.path.join(shared_datasets, "samples", name)
    answer = httpx.post(f"{serve_url}/predict", files={"file": (name, open(path, "rb").read())}).json()
    return path, [p["label"] for p in answer["predictions"]]


def test_upload_shows_a_preview_and_replaces_the_drawing(browser, serve_url, shared_datasets):
    path, labels = upload_expectation(serve_url, shared_datasets)
    page = open_page(browser, serve_url)
    draw_a_one(page)
    wait_for_result(page, "the drawing", 1)
    assert not canvas_is_blank(page)
    page.set_input_files("#file", path)
    wait_for_result(page, "mnist_07_9.png", 2)
    preview = page.eval_on_selector("#preview", "e => [e.hidden, e.complete, e.naturalWidth, e.offsetWidth]")
    assert preview[:3] == [False, True, 28] and preview[3] > 0, preview   # shown, decoded, on screen
    assert canvas_is_blank(page) and shown_labels(page) == labels
    os.makedirs(ARTIFACTS, exist_ok=True)
    page.screenshot(path=os.path.join(ARTIFACTS, "serve_upload.png"))
    # and back: drawing again drops the upload, its preview and its result
    draw_a_one(page)
    wait_for_result(page, "the drawing", 3)
    assert page.eval_on_selector("#preview", "e => e.hidden") and page.input_value("#file") == ""
    assert "mnist_07_9.png" not in page.inner_text("body")


DROP = """([b64, name]) => {   // what a browser dispatches when a file is dropped on the zone
  const bytes = Uint8Array.from(atob(b64), c => c.charCodeAt(0)), data = new DataTransfer();
  data.items.add(new File([bytes], name, {type: "image/png"}));
  document.getElementById("drop").dispatchEvent(new DragEvent("drop", {dataTransfer: data, bubbles: true, cancelable: true}));
}"""


def test_empty_state_then_a_dropped_file_is_classified(browser, serve_url, shared_datasets):
    import base64

    path, labels = upload_expectation(serve_url, shared_datasets)
    page = open_page(browser, serve_url)
    assert page.is_visible("#empty") and not shown_labels(page)   # says what to do before any result
    page.evaluate(DROP, [base64.b64encode(open(path, "rb").read()).decode(), "mnist_07_9.png"])
    wait_for_result(page, "mnist_07_9.png", 1)
    assert shown_labels(page) == labels and not page.is_visible("#empty")
    assert page.eval_on_selector("#preview", "e => [e.hidden, e.naturalWidth]") == [False, 28]
    assert "(torch)" in page.inner_text("#about") or "(onnx)" in page.inner_text("#about")


def test_errors_show_on_the_page(browser, serve_url):
    import base64

    page = open_page(browser, serve_url)
    page.evaluate(DROP, [base64.b64encode(b"not an image").decode(), "notes.png"])
    page.wait_for_function("() => +(document.body.dataset.answered || 0) >= 1", timeout=15000)
    assert "notes.png" in page.inner_text("#error") and not shown_labels(page)


# Holds the drawing's requests in the page until window.release() (the network stays real).
HOLD_DRAWING = """window.held = []; const realFetch = window.fetch;
window.fetch = (url, opts) => (opts && opts.body instanceof FormData && opts.body.get("file").name === "canvas.png")
    ? new Promise(resolve => window.held.push(() => resolve(realFetch(url, opts)))) : realFetch(url, opts);
window.release = () => window.held.splice(0).forEach(go => go());"""


def test_a_late_drawing_answer_does_not_replace_an_upload(browser, serve_url, shared_datasets):
    path, labels = upload_expectation(serve_url, shared_datasets)
    page = browser.new_page()
    page.add_init_script(HOLD_DRAWING)
    page.goto(serve_url)
    page.wait_for_selector("#canvas", state="visible")
    draw_a_one(page)
    # the drawing's answer is on its way (a function, not a string: the page's CSP forbids eval)
    page.wait_for_function("() => window.held.length === 1")
    page.set_input_files("#file", path)
    wait_for_result(page, "mnist_07_9.png", 1)
    page.evaluate("window.release()")
    page.wait_for_function("() => +document.body.dataset.answered >= 2", timeout=15000)   # the late answer came
    assert page.inner_text("#source") == "Result for mnist_07_9.png" and shown_labels(page) == labels


# Class names that run script if a page inserts them as HTML (issue 23 item 9).
EVIL = [f'<img src=x onerror="window.pwned = {i}">{i}' for i in range(10)]
KEY = "browser-key-42"


@pytest.fixture(scope="module")
def evil_url(demo_run, tmp_path_factory):
    """A server for a copy of the demo checkpoint whose class names are HTML, behind an API key."""
    import torch

    ckpt = torch.load(os.path.join(demo_run, "best.pt"), map_location="cpu", weights_only=True)
    ckpt["classes"] = EVIL
    path = str(tmp_path_factory.mktemp("evil") / "evil.pt")
    torch.save(ckpt, path)
    port = free_port()
    server = start_server(path, port, env={"CNNLAB_API_KEY": KEY})
    yield f"http://127.0.0.1:{port}"
    server.terminate()
    server.wait(timeout=10)


def open_with_key(browser, url):
    """The page of a server with --api-key: it asks for the key (a prompt) and keeps it for the tab."""
    page = browser.new_page()
    asked = []
    page.on("dialog", lambda d: (asked.append(d.message), d.accept(KEY)))
    page.goto(url)
    page.wait_for_function("() => document.getElementById('about').textContent.startsWith('Model ')")
    return page, asked


def test_html_class_names_are_shown_as_text(browser, evil_url, shared_datasets):
    page, asked = open_with_key(browser, evil_url)
    page.set_input_files("#file", os.path.join(shared_datasets, "samples", "mnist_07_9.png"))
    wait_for_result(page, "mnist_07_9.png", 1)
    assert len(asked) == 1 and "API key" in asked[0]   # asked once: /predict reused the kept key
    assert set(shown_labels(page)) <= set(EVIL) and len(shown_labels(page)) == 5   # the names, as text
    assert page.evaluate("() => window.pwned") is None and page.locator("#bars img").count() == 0


def test_the_page_policy_blocks_inline_script(browser, evil_url):
    """Had a name reached the page as HTML, its handler would not run: the Content-Security-Policy
    allows only the page's own script. The browser reports the violation, which the test waits for."""
    page, _ = open_with_key(browser, evil_url)
    page.evaluate("""() => {
        document.addEventListener("securitypolicyviolation", e => { window.blocked = e.violatedDirective; });
        document.body.insertAdjacentHTML("beforeend", '<img src="/nothing.png" onerror="window.pwned = 1">');
    }""")
    page.wait_for_function("() => window.blocked", timeout=15000)
    assert page.evaluate("() => window.pwned") is None
    assert page.evaluate("() => window.blocked").startswith("script-src")
    FAULT_REPORT.append("browser: 10 class names that are <img onerror> HTML: shown as text, none ran; "
                        "an injected inline handler blocked by the page's CSP")
