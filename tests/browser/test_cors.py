"""A web app on another origin calls the appliance from headless Chromium: it streams a chat
completion when its origin is in cors_origins, and the browser blocks it when it is not."""

from __future__ import annotations

import re
from collections.abc import AsyncIterator
from dataclasses import dataclass

import pytest
from aiohttp import web
from playwright.async_api import Browser, expect

from proxy.server import Running
from tests.conftest import Fake, ProxyFactory, token_for
from tests.kit.helpers import free_port

PAGE = """<!doctype html><html><head><meta charset="utf-8"><title>elsewhere</title>
<script src="/client.js" defer></script></head>
<body><p id="status">loading</p><p id="out"></p><p id="chunks"></p><p id="rid"></p>
<p id="error"></p></body></html>"""

# Reads the appliance's address and the credential from the fragment (#api=...&token=...),
# streams one completion, and shows what happened in the DOM.
CLIENT = """
(async () => {
  const params = new URLSearchParams(location.hash.slice(1));
  const show = (id, text) => { document.getElementById(id).textContent = text; };
  try {
    const response = await fetch(params.get("api") + "/v1/chat/completions", {
      method: "POST",
      headers: {"Authorization": "Bearer " + params.get("token"),
                "Content-Type": "application/json", "ngrok-skip-browser-warning": "1"},
      body: JSON.stringify({messages: [{role: "user", content: "hi"}], stream: true,
                            fake: {chunks: 5, gap: 0.05}}),
    });
    show("rid", response.headers.get("x-request-id") || "");
    const reader = response.body.getReader();
    const decoder = new TextDecoder();
    let buffer = "", text = "", reads = 0;
    for (;;) {
      const {value, done} = await reader.read();
      if (done) break;
      reads += 1;
      buffer += decoder.decode(value, {stream: true});
      const events = buffer.split("\\n\\n");
      buffer = events.pop();
      for (const event of events) {
        const data = event.split("\\n").filter((l) => l.startsWith("data: "))
          .map((l) => l.slice(6)).join("");
        if (!data || data === "[DONE]") continue;
        const delta = JSON.parse(data).choices[0].delta.content;
        if (delta) { text += delta; show("out", text); }
      }
    }
    show("chunks", String(reads));
    show("status", "done " + response.status);
  } catch (err) {
    show("error", err.name + ": " + err.message);
    show("status", "failed");
  }
})();
"""


@dataclass
class Elsewhere:
    origin: str


@pytest.fixture
async def elsewhere() -> AsyncIterator[Elsewhere]:
    """A tiny web app on another port: another origin than the appliance's."""
    async def page(_: web.Request) -> web.Response:
        return web.Response(text=PAGE, content_type="text/html")

    async def script(_: web.Request) -> web.Response:
        return web.Response(text=CLIENT, content_type="application/javascript")

    app = web.Application()
    app.router.add_get("/", page)
    app.router.add_get("/client.js", script)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    yield Elsewhere(f"http://127.0.0.1:{port}")
    await runner.cleanup()


async def run_client(browser: Browser, elsewhere: Elsewhere, proxy: Running):
    page = await browser.new_page()
    await page.goto(f"{elsewhere.origin}/#api={proxy.base_url}&token={token_for(proxy)}")
    await expect(page.locator("#status")).not_to_have_text("loading", timeout=15_000)
    return page


async def test_an_allowed_origin_streams_a_completion(
    make_proxy: ProxyFactory, fake: Fake, elsewhere: Elsewhere, browser: Browser
) -> None:
    proxy = await make_proxy(upstreams=[fake.url], cors_origins=[elsewhere.origin])
    page = await run_client(browser, elsewhere, proxy)
    await expect(page.locator("#error")).to_have_text("")
    await expect(page.locator("#status")).to_have_text("done 200")
    await expect(page.locator("#out")).to_have_text("tok0 tok1 tok2 tok3 tok4 ")
    assert int(await page.locator("#chunks").text_content() or 0) > 1  # streamed, not buffered
    await expect(page.locator("#rid")).to_have_text(re.compile(r"\S{8,}"))  # an exposed header
    assert fake.record.requests == 1


async def test_another_origin_is_blocked(
    make_proxy: ProxyFactory, fake: Fake, elsewhere: Elsewhere, browser: Browser
) -> None:
    proxy = await make_proxy(upstreams=[fake.url],
                             cors_origins=["https://app.example.com"])
    page = await run_client(browser, elsewhere, proxy)
    await expect(page.locator("#status")).to_have_text("failed")
    await expect(page.locator("#error")).to_have_text(re.compile(r"^TypeError: "))
    await expect(page.locator("#out")).to_have_text("")
    assert fake.record.requests == 0  # refused at the preflight: the model never saw it
