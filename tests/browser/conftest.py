"""Headless Chromium for the browser tests (Debian's, driven by Playwright's async API)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

CHROMIUM = Path("/usr/bin/chromium")
# Screenshots and other artefacts of a run (build/ is not tracked; docs/screenshots/ holds the
# copies the README shows, refreshed by hand, never by a test run).
ARTEFACTS = Path(__file__).resolve().parents[2] / "build" / "screenshots"
PHONE = {"width": 390, "height": 844}
DESKTOP = {"width": 1280, "height": 800}


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    if CHROMIUM.exists():
        return
    skip = pytest.mark.skip(reason=f"no Chromium at {CHROMIUM} (apt-get install chromium)")
    for item in items:
        if item.path.parent == Path(__file__).parent:
            item.add_marker(skip)


@pytest.fixture
async def browser() -> AsyncIterator[object]:
    from playwright.async_api import async_playwright

    async with async_playwright() as p:
        launched = await p.chromium.launch(executable_path=str(CHROMIUM),
                                           args=["--no-sandbox"])
        try:
            yield launched
        finally:
            await launched.close()


@dataclass
class Problems:
    """What the page reported: console errors (CSP refusals among them) and uncaught errors."""

    console: list[str] = field(default_factory=list)
    uncaught: list[str] = field(default_factory=list)

    def attach(self, page: object) -> None:
        page.on("console", lambda m: m.type == "error" and self.console.append(m.text))
        page.on("pageerror", lambda e: self.uncaught.append(str(e)))

    def csp(self) -> list[str]:
        return [m for m in self.console if "Content Security Policy" in m]
