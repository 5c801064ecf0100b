"""Headless Chromium for the UI tests: find it, launch it, keep what it saw.

The browser is Debian's `chromium` driven by Playwright for Python (no downloaded browsers).
Without it the UI tests skip, unless RUGPT_REQUIRE_BROWSER=1 (CI), which makes them fail.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import NoReturn

import pytest

from rugpt_assets_tests.e2e.dagster_dev import PROJECT_ROOT

ARTIFACTS_DIR = PROJECT_ROOT / "test-artifacts"
DOCS_IMG_DIR = PROJECT_ROOT / "docs" / "img"
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


def require_chromium() -> str:
    """Path of the Chromium binary; skips the calling module without one (fails it under CI)."""
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        _missing("the `playwright` package (pip install -e '.[test]')")
    path = os.environ.get("RUGPT_CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")
    if not path:
        _missing("Chromium (apt-get install chromium, or set RUGPT_CHROMIUM to its path)")
    return path


def _missing(what: str) -> NoReturn:
    if os.environ.get("RUGPT_REQUIRE_BROWSER") == "1":
        pytest.fail(f"RUGPT_REQUIRE_BROWSER=1 but {what} is not installed", pytrace=False)
    pytest.skip(f"the browser tests need {what}", allow_module_level=True)


@contextlib.contextmanager
def chromium(executable: str) -> Iterator:
    """A Playwright `Browser` on the given Chromium binary; closed (with Playwright) on exit."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=executable, args=CHROMIUM_ARGS)
        try:
            yield browser
        finally:
            browser.close()


def save_failure_artifacts(page, test_name: str) -> Path:
    """Screenshot and HTML of `page` under test-artifacts/, named after the test."""
    ARTIFACTS_DIR.mkdir(exist_ok=True)
    stem = ARTIFACTS_DIR / re.sub(r"[^\w.-]+", "_", test_name)
    page.screenshot(path=f"{stem}.png", full_page=True)
    Path(f"{stem}.html").write_text(page.content())
    return stem


def updating_screenshots() -> bool:
    return os.environ.get("RUGPT_UPDATE_SCREENSHOTS") == "1"


def doc_screenshot(target, name: str) -> None:
    """With RUGPT_UPDATE_SCREENSHOTS=1, save `target` (a page or a locator) as docs/img/<name>.png."""
    if updating_screenshots():
        DOCS_IMG_DIR.mkdir(parents=True, exist_ok=True)
        target.screenshot(path=str(DOCS_IMG_DIR / f"{name}.png"), animations="disabled")
