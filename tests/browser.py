"""Headless Chromium for the page tests: one place for the launch flags and the capture of console
errors and uncaught page errors (tests/test_audit.py, test_explain.py, test_browser.py)."""
from contextlib import contextmanager

import pytest

FLAGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
         "--disable-component-update", "--disable-sync"]


def capture_errors(page):
    """The list that the page's console errors and uncaught exceptions are appended to, as they come."""
    errors = []
    page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
    page.on("pageerror", lambda e: errors.append(str(e)))
    return errors


@contextmanager
def chromium_page(chromium):
    """(page, errors): a fresh page of a headless Chromium (Playwright; skipped without it) and its
    capture_errors list; the browser is closed on leaving, failed assertions included."""
    sync_api = pytest.importorskip("playwright.sync_api")
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium, headless=True, args=FLAGS)
        try:
            page = browser.new_page()
            yield page, capture_errors(page)
        finally:
            browser.close()
