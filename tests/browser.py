"""Headless Chromium for the dashboard's tests, its bench and the README's screenshots: Debian's
``chromium`` (``ops/setup --tests`` installs it) driven by Playwright, which is told that
executable and never downloads a browser of its own."""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from playwright.sync_api import Browser, Page, sync_playwright

CHROMIUM = Path(os.environ.get("HAUL_CHROMIUM", "/usr/bin/chromium"))
#: As root in a container, without a sandbox; and nothing that reaches for Google's hosts.
FLAGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
#: Where a test run leaves its screenshots (never a tracked folder: CI must not rewrite those).
ARTIFACTS = Path(os.environ.get("HAUL_TEST_ARTIFACTS", Path(__file__).resolve().parent.parent / ".artifacts"))
DESKTOP = {"width": 1280, "height": 800}
PHONE = {"width": 390, "height": 844}


class NoChromium(RuntimeError):
    """Debian's chromium is not where the tests look for it."""


@contextmanager
def chromium() -> Iterator[Browser]:
    if not CHROMIUM.exists():
        raise NoChromium(f"{CHROMIUM} is missing: run `ops/setup --tests` (apt's chromium), or set HAUL_CHROMIUM")
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=FLAGS)
        try:
            yield browser
        finally:
            browser.close()


def signed_in(browser: Browser, url: str, token: str, viewport: dict[str, int] = DESKTOP) -> Page:
    """A new browser context's page, signed in to the dashboard at ``url`` with ``token``
    through the sign-in form, as an operator would."""
    page = browser.new_context(viewport=viewport).new_page()  # type: ignore[arg-type]
    page.goto(f"{url}/ui/sign-in")
    page.fill("#token", token)
    page.click("main button[type=submit]")
    page.wait_for_url(f"{url}/ui/")
    return page


def screenshot(page: Page, name: str, folder: Path | None = None) -> Path:
    """The whole page as ``<folder>/<name>.png`` (ARTIFACTS/screenshots by default)."""
    target = (folder or ARTIFACTS / "screenshots") / f"{name}.png"
    target.parent.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(target), full_page=True)
    return target
