"""The chat page at `/` in headless Chromium, through the real llama-server and bundled model:
signing in (a pasted key, a #token= link), streaming, stopping, conversations, errors."""

from __future__ import annotations

import json
import logging
import re

import aiohttp
import pytest
from playwright.async_api import Browser, Page, expect

from proxy.api.page import CSP, STATIC
from proxy.server import Running
from tests.browser.conftest import ARTEFACTS, DESKTOP, PHONE, Problems
from tests.conftest import ADMIN_HEADERS, Fake, Llama, ProxyFactory, token_for
from tests.kit.helpers import eventually

COUNTING = "Count from one to twenty, one number per line."  # a long answer, many pieces
TIMEOUT = 20_000  # ms: the longest any one DOM condition may take to come true
expect.set_options(timeout=TIMEOUT)


@pytest.fixture
async def short_answers(make_proxy: ProxyFactory, llama: Llama) -> Running:
    """The appliance on the real model, with answers cut at 40 tokens to keep the tests quick
    (the small model likes to ramble)."""
    return await make_proxy(upstreams=[llama.url], upstream_api_key=llama.key,
                            chat_max_tokens=40)


async def api_key(proxy: Running) -> str:
    async with aiohttp.ClientSession(headers=ADMIN_HEADERS) as admin:
        async with admin.post(proxy.base_url + "/admin/keys", json={"name": "browser"}) as r:
            assert r.status == 201, await r.text()
            return str((await r.json())["key"])


async def open_page(browser: Browser, url: str, viewport: dict[str, int] = PHONE
                    ) -> tuple[Page, Problems]:
    page = await browser.new_page(viewport=viewport)
    page.set_default_timeout(TIMEOUT)
    problems = Problems()
    problems.attach(page)
    await page.goto(url)
    return page, problems


async def sign_in(page: Page, credential: str) -> None:
    await expect(page.locator("#signin")).to_be_visible()
    await page.get_by_label("API key or token").fill(credential)
    await page.get_by_role("button", name="Sign in").click()


async def signed_in(page: Page, model: str) -> None:
    """The app is shown and the model list came from GET /v1/models."""
    await expect(page.locator("#app")).to_be_visible()
    await expect(page.locator("#model option")).to_have_text([model])
    await expect(page.locator("#signin")).to_be_hidden()


def assert_clean(problems: Problems, *, refusals: bool = False) -> None:
    """No CSP refusal and no uncaught error; and, unless the test provokes refusals, no
    console error at all (a missing file or a failed call would show as one)."""
    assert not problems.csp(), problems.csp()
    assert not problems.uncaught, problems.uncaught
    if not refusals:
        assert not problems.console, problems.console


async def test_the_page_files_are_served_under_the_csp(fake_proxy: Running) -> None:
    names = sorted(p.name for p in STATIC.iterdir() if p.is_file())
    assert {"index.html", "app.js", "style.css"} <= set(names)
    async with aiohttp.ClientSession() as http:
        for path in ["/", *(f"/static/{n}" for n in names)]:
            async with http.get(fake_proxy.base_url + path) as r:
                assert r.status == 200, path
                assert r.headers["Content-Security-Policy"] == CSP, path
                body = await r.text()
            if path == "/":  # nothing the CSP would refuse: inline code or styles
                assert not re.search(r"<script(?![^>]*\bsrc=)", body)
                assert not re.search(r"<style|\sstyle=|\son[a-z]+=", body, re.I)
        app_js = (STATIC / "app.js").read_text()
        assert "innerHTML" not in app_js and "insertAdjacentHTML" not in app_js
        assert ".style." not in app_js and "eval(" not in app_js


async def test_sign_in_with_a_pasted_key(model_proxy: Running, llama: Llama, browser: Browser
                                         ) -> None:
    key = await api_key(model_proxy)
    page, problems = await open_page(browser, model_proxy.base_url + "/")
    sent: list[dict[str, str]] = []

    async def record(request) -> None:
        if "/v1/models" in request.url:
            sent.append(await request.all_headers())

    page.on("request", record)
    await sign_in(page, key)
    await signed_in(page, llama.model)
    assert sent and sent[0]["authorization"] == f"Bearer {key}"
    assert sent[0]["ngrok-skip-browser-warning"] == "1"
    assert await page.evaluate("localStorage.getItem('llama-proxy.credential')") == key

    await page.reload()  # kept across visits
    await signed_in(page, llama.model)

    await page.get_by_role("button", name="Conversations").click()  # the drawer, on a phone
    await page.get_by_role("button", name="Sign out").click()
    await expect(page.locator("#signin")).to_be_visible()
    assert await page.evaluate("localStorage.getItem('llama-proxy.credential')") is None
    await page.reload()
    await expect(page.locator("#signin")).to_be_visible()
    assert_clean(problems)


async def test_sign_in_link_keeps_the_token_out_of_the_url_and_the_server(
    model_proxy: Running, llama: Llama, browser: Browser, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    token = token_for(model_proxy, "linked")
    page, problems = await open_page(browser, f"{model_proxy.base_url}/#token={token}")
    await signed_in(page, llama.model)
    assert page.url == model_proxy.base_url + "/"  # the fragment is gone from the address bar
    assert token not in await page.evaluate("location.href")
    assert await page.evaluate("localStorage.getItem('llama-proxy.credential')") == token

    access = [r.getMessage() for r in caplog.records if r.name == "proxy.access"]
    assert any('"GET /" 200' in line for line in access), access
    assert any('"GET /v1/models" 200' in line for line in access), access
    assert all(token not in r.getMessage() for r in caplog.records)
    assert all(token[-20:] not in r.getMessage() for r in caplog.records)
    assert_clean(problems)


async def test_a_bad_key_asks_to_sign_in_again(model_proxy: Running, llama: Llama,
                                               browser: Browser) -> None:
    page, problems = await open_page(browser, model_proxy.base_url + "/")
    await sign_in(page, "sk-not-a-real-key-000000000000000000000000000")
    error = page.locator("#signin-error")
    await expect(error).to_be_visible()
    await expect(error).to_contain_text(re.compile("not accepted.*sign in again", re.I))
    await expect(page.locator("#app")).to_be_hidden()
    assert await page.evaluate("localStorage.getItem('llama-proxy.credential')") is None

    # A stored credential that has since stopped working (here: a link with a bad token).
    # A link opened in the tab that shows the page: only the fragment changes, no reload.
    bad = "eyJhbGciOiJIUzI1NiJ9.e30.bad"
    async with page.expect_response(lambda r: "/v1/models" in r.url) as answer:
        await page.goto(f"{model_proxy.base_url}/#token={bad}")
    assert (await answer.value).status == 401
    assert (await answer.value).request.headers["authorization"] == f"Bearer {bad}"
    await expect(error).to_contain_text("sign in again")
    await expect(page.locator("#app")).to_be_hidden()
    assert "#" not in page.url
    assert await page.evaluate("localStorage.getItem('llama-proxy.credential')") is None
    assert_clean(problems, refusals=True)


# Records every length the newest answer's text has had, to tell streaming from one blob.
WATCH_ANSWER = """() => {
  window.__lengths = [];
  new MutationObserver(() => {
    const texts = document.querySelectorAll('.message.assistant .message-text');
    const last = texts[texts.length - 1];
    if (last) window.__lengths.push(last.textContent.length);
  }).observe(document.getElementById('messages'),
             {subtree: true, childList: true, characterData: true});
}"""


async def send(page: Page, text: str) -> None:
    await page.get_by_role("textbox", name="Message").fill(text)
    await page.get_by_role("button", name="Send").click()


async def answered(page: Page, count: int) -> str:
    """Wait for the count-th answer to be complete; its text."""
    answer = page.locator(".message.assistant").nth(count - 1)
    await expect(answer).not_to_have_class(re.compile(r"\bstreaming\b"))
    await expect(answer.locator(".message-meta")).to_have_text(re.compile(r"^\d+ tokens$"))
    await expect(page.get_by_role("button", name="Send")).to_be_visible()
    text = await answer.locator(".message-text").text_content()
    assert text and text.strip()
    return text


async def rendered(page: Page, markdown: str) -> str:
    """The text of an answer as the page shows it (its Markdown rendered)."""
    return str(await page.evaluate("""text => { const box = document.createElement('div');
        window.answerMarkdown.render(box, text); return box.textContent; }""", markdown))


async def conversation(proxy: Running, token: str, cid: str | None = None) -> dict:
    path = f"/api/conversations/{cid}" if cid else "/api/conversations"
    async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {token}"}) as http:
        async with http.get(proxy.base_url + path) as r:
            assert r.status == 200, await r.text()
            return await r.json()


async def test_chat_streams_and_conversations_can_be_reopened(
    short_answers: Running, llama: Llama, browser: Browser
) -> None:
    model_proxy = short_answers
    token = token_for(model_proxy, "chatter")
    page, problems = await open_page(browser, f"{model_proxy.base_url}/#token={token}")
    await signed_in(page, llama.model)
    await page.evaluate(WATCH_ANSWER)

    await send(page, COUNTING)
    await expect(page.locator(".message.user .message-text")).to_have_text([COUNTING])
    first = await answered(page, 1)
    lengths = await page.evaluate("window.__lengths")
    # It grew piece by piece, not in one go (which shows at most two lengths: empty, then
    # all). The sampled model sometimes answers in three short pieces, so three will do.
    assert len({n for n in lengths if n > 0}) >= 3, lengths
    listed = (await conversation(model_proxy, token))["data"]
    assert len(listed) == 1
    kept = await conversation(model_proxy, token, listed[0]["id"])
    assert [m["role"] for m in kept["messages"]] == ["user", "assistant"]
    assert kept["messages"][0]["content"] == COUNTING
    # What was kept is what the page showed: the answer's Markdown, rendered as the page does.
    assert await rendered(page, kept["messages"][1]["content"]) == first
    ARTEFACTS.mkdir(parents=True, exist_ok=True)
    await page.screenshot(path=ARTEFACTS / "phone.png")

    # A new conversation starts empty, and its answer is kept apart from the first one.
    await page.get_by_role("button", name="New conversation").click()
    await expect(page.locator(".message")).to_have_count(0)
    await expect(page.locator("#empty")).to_be_visible()
    await send(page, "What is the capital of France?")
    await answered(page, 1)
    await expect(page.locator(".message")).to_have_count(2)
    assert len((await conversation(model_proxy, token))["data"]) == 2

    # The drawer lists both, newest first; reopening the first shows its exchange again.
    await page.get_by_role("button", name="Conversations").click()
    items = page.locator("#conversations .conversation-title")
    await expect(items).to_have_text(["What is the capital of France?", COUNTING])
    await page.get_by_role("button", name=re.compile("^" + re.escape(COUNTING[:20]))).click()
    await expect(page.locator("#drawer")).not_to_have_class(re.compile(r"\bopen\b"))
    await expect(page.locator(".message .message-text")).to_have_text(
        [COUNTING, first])

    # Asking on in the reopened conversation adds to it, not to a new one.
    await send(page, "And one more?")
    await answered(page, 2)
    assert len((await conversation(model_proxy, token))["data"]) == 2
    kept = await conversation(model_proxy, token, listed[0]["id"])
    contents = [m["content"] for m in kept["messages"]][:3]
    assert [contents[0], await rendered(page, contents[1]), contents[2]] == [
        COUNTING, first, "And one more?"]

    # Deleting takes two clicks; the other conversation stays.
    await page.get_by_role("button", name="Conversations").click()
    delete = page.get_by_role("button", name="Delete conversation: What is the capital")
    await delete.click()
    await page.get_by_role("button", name=re.compile("^Confirm: delete conversation What")).click()
    await expect(items).to_have_text([COUNTING])
    assert [c["id"] for c in (await conversation(model_proxy, token))["data"]] == [
        listed[0]["id"]]

    # The desktop layout: the list stays beside the chat.
    wide = await browser.new_page(viewport=DESKTOP)
    wide.set_default_timeout(TIMEOUT)
    problems.attach(wide)
    await wide.goto(f"{model_proxy.base_url}/#token={token}")
    await signed_in(wide, llama.model)
    await expect(wide.locator("#drawer")).to_be_visible()
    await expect(wide.get_by_role("button", name="Conversations")).to_be_hidden()
    await wide.get_by_role("button", name=re.compile("^" + re.escape(COUNTING[:20]))).click()
    await expect(wide.locator(".message")).to_have_count(4)
    await wide.screenshot(path=ARTEFACTS / "desktop.png")
    assert_clean(problems)


async def appliance_idle(proxy: Running, llama: Llama) -> bool:
    async with aiohttp.ClientSession() as http:
        async with http.get(proxy.base_url + "/health") as r:
            queue = (await r.json())["queue"]
        async with http.get(llama.url + "/slots",
                            headers={"Authorization": f"Bearer {llama.key}"}) as r:
            slots = await r.json()
    return (queue["free"] == queue["slots"] and queue["waiting"] == 0
            and not any(s["is_processing"] for s in slots))


async def test_stop_ends_the_answer_and_frees_the_model(
    model_proxy: Running, llama: Llama, browser: Browser
) -> None:
    token = token_for(model_proxy, "stopper")
    page, problems = await open_page(browser, f"{model_proxy.base_url}/#token={token}")
    await signed_in(page, llama.model)
    await send(page, "Write a very long story about a dragon who learns to cook. "
                     "Use at least twenty paragraphs.")
    answer = page.locator(".message.assistant .message-text")
    await expect(answer).to_have_text(re.compile(r"\S{3}.{20}", re.S))  # streaming has begun
    assert not await appliance_idle(model_proxy, llama)
    before = len(await answer.text_content() or "")
    await page.get_by_role("button", name="Stop").click()

    # At once, not when the (1024-token) answer would have ended by itself.
    stopped = page.locator(".message.assistant .stopped-note")
    await expect(stopped).to_have_text("Stopped", timeout=3000)
    await expect(page.get_by_role("button", name="Send")).to_be_visible()
    await expect(page.get_by_role("button", name="Stop")).to_be_hidden()
    shown = await answer.text_content() or ""
    assert len(shown) < before + 200  # at most the pieces already on their way
    await eventually(lambda: appliance_idle(model_proxy, llama), 3, "the model to be idle")
    assert await answer.text_content() == shown  # nothing arrived after the stop
    # What was shown is kept as the answer.
    listed = await eventually(lambda: _listed(model_proxy, token), 5, "the kept answer")
    kept = await conversation(model_proxy, token, listed[0]["id"])
    assert kept["messages"][1]["content"].startswith(shown.strip()[:10])
    await expect(page.get_by_role("textbox", name="Message")).to_be_focused()
    assert_clean(problems)


async def _listed(proxy: Running, token: str) -> list[dict]:
    return (await conversation(proxy, token))["data"]


def refusal(status: int, message: str, code: str, retry_after: str | None = None) -> dict:
    headers = {"Retry-After": retry_after} if retry_after else {}
    body = {"error": {"message": message, "type": "error", "param": None, "code": code}}
    return {"status": status, "headers": headers, "content_type": "application/json",
            "body": json.dumps(body)}


def answering(answer: dict | None):
    async def route(r) -> None:
        if answer is None:
            await r.abort("connectionrefused")
        else:
            await r.fulfill(**answer)
    return route


async def test_refusals_are_explained_and_the_message_kept(
    make_proxy: ProxyFactory, fake: Fake, browser: Browser
) -> None:
    """403, 429, 503, a network failure and an error mid-stream, as /api/chat would answer
    them (served by the browser's router, so each is certain to happen)."""
    proxy = await make_proxy(upstreams=[fake.url])
    page, problems = await open_page(browser, f"{proxy.base_url}/#token={token_for(proxy)}")
    await signed_in(page, "fake-model")
    notice = page.locator("#notice")
    box = page.get_by_role("textbox", name="Message")
    cases = [
        (refusal(403, "This credential may not use model `x`", "model_not_allowed"),
         "Not allowed: This credential may not use model `x`"),
        (refusal(429, "Rate limit reached", "rate_limit_exceeded", "7"),
         "Too many requests. Try again in 7 seconds."),
        (refusal(503, "The model is loading", "model_loading", "3"),
         "The model is busy or still loading. Retry in 3 seconds."),
        (None, "Cannot reach the appliance (network error)."),
    ]
    for answer, shown in cases:
        await page.route("**/api/chat", answering(answer))
        await send(page, "Hello there")
        await expect(notice).to_be_visible()
        await expect(notice).to_contain_text(shown)
        await expect(box).to_have_value("Hello there")  # given back, to send again
        await expect(page.locator(".message")).to_have_count(0)
        await page.unroute("**/api/chat")

    # An error event ends a stream that had started: shown under the partial answer.
    stream = ('event: start\ndata: {"conversation_id": "c1", "model": "fake-model"}\n\n'
              ': ping\n\nevent: delta\ndata: {"content": "Half an"}\n\n'
              'event: delta\ndata: {"content": " answer"}\n\n'
              'event: error\ndata: {"error": {"message": "The model server went away", '
              '"type": "server_error", "param": null, "code": "upstream_error"}}\n\n')
    await page.route("**/api/chat", lambda r: r.fulfill(
        status=200, content_type="text/event-stream", body=stream))
    await send(page, "Hello again")
    await expect(notice).to_be_hidden()
    answer = page.locator(".message.assistant")
    await expect(answer.locator(".message-text")).to_have_text("Half an answer")
    await expect(answer.locator(".message-meta")).to_have_text("The model server went away")
    await expect(box).to_have_value("")
    assert_clean(problems, refusals=True)


async def test_a_long_model_name_fits_a_phone(fake_proxy: Running, browser: Browser) -> None:
    long_id = "SmolLM2-135M-Instruct.Q4_1-with-an-even-longer-quantisation-name"
    page, problems = await open_page(browser, fake_proxy.base_url + "/")
    await page.route("**/v1/models", lambda r: r.fulfill(json={
        "object": "list", "data": [{"id": long_id, "object": "model"}]}))
    await sign_in(page, token_for(fake_proxy))
    await signed_in(page, long_id)
    assert await page.evaluate("document.documentElement.scrollWidth") <= PHONE["width"]
    for name in ("Send", "New conversation"):
        box = await page.get_by_role("button", name=name).first.bounding_box()
        assert box is not None and box["x"] + box["width"] <= PHONE["width"], (name, box)
    assert_clean(problems)


async def test_a_link_for_another_account_asks_before_switching(
    model_proxy: Running, llama: Llama, browser: Browser
) -> None:
    mine, theirs = token_for(model_proxy, "me"), token_for(model_proxy, "someone-else")
    page, problems = await open_page(browser, model_proxy.base_url + "/")
    await sign_in(page, mine)
    await signed_in(page, llama.model)
    stored = "localStorage.getItem('llama-proxy.credential')"
    asked: list[str] = []

    async def refuse(dialog) -> None:
        asked.append(dialog.message)
        await dialog.dismiss()

    page.once("dialog", refuse)
    await page.evaluate(f"location.hash = '#token={theirs}'")
    await eventually(lambda: asked, 5, "the question")
    assert await page.evaluate(stored) == mine
    assert "#token" not in await page.evaluate("location.href")

    async def agree(dialog) -> None:
        await dialog.accept()

    page.once("dialog", agree)
    await page.evaluate(f"location.hash = '#token={theirs}'")
    await eventually(lambda: page.evaluate(f"{stored} === {json.dumps(theirs)}"), 5,
                     "the switch once accepted")
    assert_clean(problems)
