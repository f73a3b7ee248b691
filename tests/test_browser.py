"""Headless Chromium (Debian's package) driven by Playwright: the report renders with every image,
and the serve page turns a drawn digit into a prediction. Screenshots are saved as artifacts."""
import os

import pytest

from .test_serve import free_port, start_server

ARTIFACTS = os.path.join(os.path.dirname(__file__), "..", "runs", "test-artifacts")
FLAGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
         "--disable-component-update", "--disable-sync"]


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
    errors = []
    page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.goto("file://" + os.path.abspath(os.path.join(demo_run, "report.html")))
    images = page.eval_on_selector_all("img", "els => els.map(e => [e.complete, e.naturalWidth])")
    assert len(images) == 5 and all(done and width > 0 for done, width in images), images
    assert "cnnlab report" in page.title() and not errors, errors
    page.screenshot(path=os.path.join(ARTIFACTS, "report.png"), full_page=True)


def test_draw_a_digit_and_see_a_prediction(browser, demo_run):
    port = free_port()
    server = start_server(demo_run, port)
    try:
        page = browser.new_page()
        page.goto(f"http://127.0.0.1:{port}/")
        page.wait_for_selector("#canvas", state="visible")
        box = page.locator("#canvas").bounding_box()
        # a "1": one vertical stroke down the middle of the canvas
        page.mouse.move(box["x"] + 140, box["y"] + 50)
        page.mouse.down()
        for y in range(50, 240, 10):
            page.mouse.move(box["x"] + 140, box["y"] + y)
        page.mouse.up()
        page.wait_for_selector(".prediction", timeout=15000)
        bars = page.locator(".prediction").all_inner_texts()
        assert len(bars) >= 3 and bars[0].split()[0] in [str(i) for i in range(10)]
        os.makedirs(ARTIFACTS, exist_ok=True)
        page.screenshot(path=os.path.join(ARTIFACTS, "serve.png"))
    finally:
        server.terminate()
        server.wait(timeout=10)
