"""The chat page renders answers as Markdown while they stream, safely: code blocks with a copy
button, tables, lists, links that open apart; nothing a model writes runs or loads anything.
Answers come from the fast fake model server, steered by the message (`fake:{"say": ...}`)."""

from __future__ import annotations

import json
import re

import pytest
from playwright.async_api import Browser, Page, expect

from proxy.server import Running
from tests.browser.conftest import ARTEFACTS, DESKTOP, PHONE, Problems
from tests.browser.test_page import (
    TIMEOUT,
    assert_clean,
    open_page,
    send,
    sign_in,
    signed_in,
)
from tests.conftest import Fake, ProxyFactory, token_for
from tests.kit.fake_upstream import MODEL

CODE = "def add(a, b):\n    return a + b  # " + "a long line that must scroll " * 4
RICH = (f"Here is the function:\n\n```python\n{CODE}\n```\n\n"
        "| name | use |\n|:---|---:|\n| `add` | sums two numbers |\n| `sub` | subtracts |\n\n"
        "- one\n- two with `inline code`\n\n> a quote\n\n"
        "See <https://example.com/docs> or [the site](https://example.com).")
HOSTILE = (
    "<script>window.__pwned = 'script'</script>\n\n"
    "<img src=x onerror=\"window.__pwned='img'\">\n\n"
    "[click me](javascript:window.__pwned='js') "
    "[entity](javascript&#58;window.__pwned='entity') "
    "[vb](vbscript:msgbox) [data](data:text/html;base64,PHNjcmlwdD5hbGVydCgxKTwvc2NyaXB0Pg==)\n\n"
    "![pixel](https://tracker.example/p.png)\n\n"
    "Session expired. [Continue here](#token=ATTACKER-TOKEN) and press OK.\n\n"
    "[x](https://example.com\" onmouseover=\"window.__pwned='attr')\n\n"
    "<a href=\"https://example.com\" onclick=\"window.__pwned='a'\">raw link</a>\n\n"
    "```html\n<script>window.__pwned='fence'</script>\n```\n\n"
    "<iframe src=\"https://example.com\"></iframe> <style>body{display:none}</style>")


def say(text: str, piece: int = 4, gap: float = 0.0, repeat: int = 1) -> str:
    """The message that makes the fake model answer `text` (`repeat` times), streamed `piece`
    characters an event."""
    return "fake:" + json.dumps({"say": text, "piece": piece, "gap": gap, "repeat": repeat})


@pytest.fixture
async def page_proxy(make_proxy: ProxyFactory, fake: Fake) -> Running:
    return await make_proxy(upstreams=[fake.url])


async def ask(page: Page, message: str) -> None:
    """Send a message and wait for its whole answer."""
    await send(page, message)
    await expect(page.locator(".message.assistant").last).not_to_have_class(
        re.compile(r"\bstreaming\b"), timeout=TIMEOUT)
    await expect(page.get_by_role("button", name="Send")).to_be_visible()


async def signed_in_page(browser: Browser, proxy: Running, viewport: dict[str, int] = PHONE
                         ) -> tuple[Page, Problems]:
    page, problems = await open_page(browser, proxy.base_url + "/", viewport)
    await sign_in(page, token_for(proxy))
    await signed_in(page, MODEL)
    return page, problems


@pytest.mark.parametrize("viewport", [PHONE, DESKTOP], ids=["phone", "desktop"])
async def test_code_tables_lists_and_links_render_while_streaming(
        page_proxy: Running, browser: Browser, viewport: dict[str, int]) -> None:
    page, problems = await signed_in_page(browser, page_proxy, viewport)
    await page.context.grant_permissions(["clipboard-read", "clipboard-write"])
    await ask(page, say(RICH, gap=0.002))
    answer = page.locator(".message.assistant .markdown").last
    code = answer.locator("pre > code.language-python")
    await expect(code).to_have_text(CODE)
    await expect(answer.locator(".code-bar")).to_contain_text("python")
    await expect(answer.locator("table tr")).to_have_count(3)
    await expect(answer.locator("table td code")).to_have_text(["add", "sub"])
    # Alignment as a class (the CSP refuses inline styles, and assert_clean would see it).
    assert await answer.locator("th").nth(1).get_attribute("class") == "align-right"
    assert await answer.locator("th").nth(1).evaluate(
        "e => getComputedStyle(e).textAlign") == "right"
    await expect(answer.locator("ul > li")).to_have_count(2)
    await expect(answer.locator("blockquote")).to_have_text("a quote")
    links = answer.locator("a")
    await expect(links).to_have_count(2)
    for i in range(2):
        assert await links.nth(i).get_attribute("target") == "_blank"
        assert await links.nth(i).get_attribute("rel") == "noopener noreferrer"
    # The long line scrolls inside its block; the page itself never gets wider than a phone.
    pre = answer.locator("pre")
    assert await pre.evaluate("p => p.scrollWidth > p.clientWidth")
    assert await page.evaluate("document.documentElement.scrollWidth") <= viewport["width"]
    await answer.get_by_role("button", name="Copy the code").click()
    await expect(answer.get_by_role("button", name="Copy the code")).to_have_text("Copied")
    assert await page.evaluate("navigator.clipboard.readText()") == CODE + "\n"
    # The user's own message stays plain text (its Markdown is not rendered).
    mine = page.locator(".message.user .message-text").last
    await expect(mine).to_have_text(say(RICH, gap=0.002))
    assert await mine.locator("pre, table, a").count() == 0
    ARTEFACTS.mkdir(parents=True, exist_ok=True)
    await page.screenshot(path=str(ARTEFACTS / f"markdown-{viewport['width']}.png"))
    assert_clean(problems)


async def test_an_answer_that_tries_to_inject_runs_nothing(page_proxy: Running,
                                                            browser: Browser) -> None:
    page, problems = await signed_in_page(browser, page_proxy)
    dialogs: list[str] = []
    page.on("dialog", lambda d: (dialogs.append(d.message), d.dismiss()))
    requested: list[str] = []
    page.on("request", lambda r: requested.append(r.url))
    await ask(page, say(HOSTILE))
    answer = page.locator(".message.assistant .markdown").last
    await expect(answer).to_contain_text("<script>window.__pwned = 'script'</script>")
    for link in await answer.locator("a").all():  # clicking any link runs nothing either
        href = await link.get_attribute("href") or ""
        assert href.startswith("https://"), href
    assert await page.evaluate("window.__pwned") is None
    # Only markdown-it's own elements, and none with an on* attribute or a script URL.
    found = await answer.evaluate("""el => [...el.querySelectorAll('*')].map(e => [
        e.tagName, [...e.attributes].map(a => a.name + '=' + a.value)])""")
    tags = {tag for tag, _ in found}
    assert tags <= {"P", "A", "PRE", "CODE", "DIV", "SPAN", "BUTTON", "EM", "STRONG"}, tags
    for tag, attributes in found:
        for attribute in attributes:
            name, _, value = attribute.partition("=")
            assert not name.startswith("on"), (tag, attribute)
            assert not value.strip().lower().startswith(("javascript:", "data:", "vbscript:"))
    assert not [u for u in requested if "tracker.example" in u or "example.com" in u]
    await expect(answer).to_contain_text("pixel")  # an image is its alt text, not a link
    assert await answer.locator("a[href*='tracker'], a[href^='#']").count() == 0
    assert not dialogs
    assert_clean(problems)


async def test_a_long_answer_renders_once_a_frame_not_once_a_token(
        page_proxy: Running, browser: Browser) -> None:
    """2,000 pieces as fast as the fake can send them: the page draws far fewer times than it
    gets pieces, and ends with the whole answer (its cost is measured by make bench)."""
    page, problems = await signed_in_page(browser, page_proxy)
    line = "A line with `code` and **bold** text.\n\n"
    await ask(page, say(line, piece=4, repeat=250))
    answer = page.locator(".message.assistant .markdown").last
    await expect(answer.locator("p")).to_have_count(250)
    stats = await page.evaluate("window.answerMarkdown.stats")
    pieces = -(-len(line) * 250 // 4)
    assert pieces >= 2000 and 1 <= stats["renders"] < pieces / 4, stats
    assert_clean(problems)


async def test_a_reopened_conversation_shows_its_answers_as_markdown(
        page_proxy: Running, browser: Browser) -> None:
    page, problems = await signed_in_page(browser, page_proxy)
    await ask(page, say(RICH))
    await page.reload()
    await signed_in(page, MODEL)
    await page.get_by_role("button", name="Conversations").click()
    await page.locator("#conversations .conversation-title").first.click()
    answer = page.locator(".message.assistant .markdown").last
    await expect(answer.locator("pre > code")).to_have_text(CODE)
    assert_clean(problems)


async def test_a_phone_shows_a_code_block(page_proxy: Running, browser: Browser) -> None:
    """What docs/screenshots/phone-code.png shows (copied there by hand from build/): a
    question typed as a person would, the fake model's answer steered on the way out."""
    page, problems = await signed_in_page(browser, page_proxy)
    answer_text = ("Here is a loop that prints the first three squares:\n\n"
                   "```python\nfor n in range(1, 4):\n    print(f\"{n} squared is {n * n}\")\n"
                   "```\n\nIt prints **1**, **4** and **9**, one per line. Use `range(1, 11)` "
                   "for the first ten.")

    async def steer(route: object) -> None:
        body = json.loads(route.request.post_data or "{}")  # type: ignore[attr-defined]
        body["message"] = say(answer_text, gap=0.01)
        await route.continue_(post_data=json.dumps(body))  # type: ignore[attr-defined]

    await page.route("**/api/chat", steer)
    await ask(page, "Show me a loop in Python.")
    answer = page.locator(".message.assistant .markdown").last
    await expect(answer.locator("pre > code")).to_contain_text("for n in range(1, 4):")
    await expect(page.locator(".message.user .message-text")).to_have_text(
        "Show me a loop in Python.")
    ARTEFACTS.mkdir(parents=True, exist_ok=True)
    await page.screenshot(path=str(ARTEFACTS / "phone-code.png"))
    assert_clean(problems)


async def test_blocks_render_while_the_answer_is_still_streaming(
        page_proxy: Running, browser: Browser) -> None:
    """A finished block shows as Markdown before the answer ends (not raw until the end), and
    the text after a fence still being written stays inside its code block."""
    page, problems = await signed_in_page(browser, page_proxy)
    text = ("Intro paragraph.\n\n```js\nlet a = 1;\n\nlet b = 2;\n```\n\n"
            + "More words follow here. " * 40)
    await send(page, say(text, piece=3, gap=0.01))
    streaming = page.locator(".message.assistant.streaming .markdown")
    await expect(streaming.locator("pre > code")).to_have_text("let a = 1;\n\nlet b = 2;\n")
    assert await streaming.count() == 1  # seen before the end
    await expect(page.locator(".message.assistant.streaming")).to_have_count(0)
    answer = page.locator(".message.assistant .markdown").last
    await expect(answer.locator("pre")).to_have_count(1)
    await expect(answer.locator(".live")).to_have_count(0)  # one full render at the end
    assert_clean(problems)


WATCH_BLOCKS = """() => { window.__seen = new Set();
  new MutationObserver(() => document.querySelectorAll('.message.streaming .markdown *')
    .forEach((e) => window.__seen.add(e.tagName + (e.closest('.live') ? ':live' : ''))))
    .observe(document.getElementById('messages'), {childList: true, subtree: true}); }"""


async def test_what_streams_inside_a_fence_stays_code_until_it_closes(
        page_proxy: Running, browser: Browser) -> None:
    """A fence that holds fences (a model explaining Markdown), a blank line and a heading
    inside it: nothing in it ever shows as a heading, while it streams or after; and the
    fence still being written has no Copy button (it would be redrawn under the pointer)."""
    page, problems = await signed_in_page(browser, page_proxy)
    await page.evaluate(WATCH_BLOCKS)
    text = ("Intro.\n\n````md\n```js\nx\n```\n\n# not a heading\n\n__init__ stays code\n"
            "````\n\nAfter " + "the fence, words. " * 30)
    await ask(page, say(text, piece=2, gap=0.005))
    seen = set(await page.evaluate("[...window.__seen]"))
    assert "PRE" in seen or "PRE:live" in seen, seen  # it rendered while streaming
    assert not {"H1", "H1:live", "STRONG", "STRONG:live"} & seen, seen
    assert "BUTTON:live" not in seen, seen
    answer = page.locator(".message.assistant .markdown").last
    await expect(answer.locator("h1")).to_have_count(0)
    await expect(answer.locator("pre > code")).to_contain_text("# not a heading")
    await expect(answer.get_by_role("button", name="Copy the code")).to_have_count(1)
    assert_clean(problems)


async def test_a_wide_table_scrolls_inside_its_bubble_on_a_phone(
        page_proxy: Running, browser: Browser) -> None:
    page, problems = await signed_in_page(browser, page_proxy)
    await ask(page, say("| Language | Typing | Paradigm | First release | Typical use |\n"
                        "|---|---|---|---|---|\n| Python | dynamic, strong | multi-paradigm |"
                        " 1991 | scripting, data science |\n"))
    wrap = page.locator(".message.assistant .markdown .table-wrap").last
    # It scrolls rather than squeezing its columns until words break.
    assert await wrap.evaluate("w => w.scrollWidth > w.clientWidth")
    assert await page.evaluate("document.documentElement.scrollWidth") <= PHONE["width"]
    assert_clean(problems)
