"""What rendering a long answer as Markdown costs the chat page (python -m bench.page).

A 2,000-token answer (about 8,000 characters of Markdown: paragraphs, inline code, a fenced
block every tenth paragraph) streamed from the fake upstream into headless Chromium at a phone's
viewport: as fast as the fake can send it, and at 100 tokens a second (a fast local model), each
with the CPU as it is and slowed 4x (Chrome's own throttling, as its DevTools emulate a
mid-range phone). The page renders at most once an animation frame, and only the blocks still
growing; this prints and writes (bench/results/page.md) how many renders that was, the time
spent in them, the longest one, and the main thread's share of the streaming time.
"""

from __future__ import annotations

import asyncio
import json
import sys
from pathlib import Path
from typing import Any

from bench.stack import appliance, credential, stack

RESULTS = Path(__file__).with_name("results")
CHROMIUM = "/usr/bin/chromium"
BLOCK = ("A paragraph with `inline code`, **bold** and a [link](https://example.com), "
         "long enough to wrap on a phone.\n\n")
FENCE = "```python\nfor n in range(3):\n    print(n * n)\n```\n\n"


UNIT = BLOCK * 9 + FENCE
REPEAT = -(-8000 // len(UNIT))  # about 2,000 tokens of 4 characters


async def measure(base: str, token: str, slowdown: int, gap: float) -> dict[str, Any]:
    from playwright.async_api import async_playwright

    async with async_playwright() as p:
        browser = await p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        page = await browser.new_page(viewport={"width": 390, "height": 844})
        if slowdown > 1:
            cdp = await page.context.new_cdp_session(page)
            await cdp.send("Emulation.setCPUThrottlingRate", {"rate": slowdown})
        await page.goto(base + "/")
        await page.get_by_label("API key or token").fill(token)
        await page.get_by_role("button", name="Sign in").click()
        await page.locator("#model option").first.wait_for(state="attached")
        steer = "fake:" + json.dumps({"say": UNIT, "repeat": REPEAT, "piece": 4, "gap": gap})
        await page.get_by_role("textbox", name="Message").fill(steer)
        started = await page.evaluate("performance.now()")
        await page.get_by_role("button", name="Send").click()
        await page.locator(".message.assistant:not(.streaming) .message-meta").wait_for(
            timeout=120_000)
        ended = await page.evaluate("performance.now()")
        stats = await page.evaluate("window.answerMarkdown.stats")
        await browser.close()
    return {"slowdown": slowdown, "gap": gap, "pieces": -(-len(UNIT) * REPEAT // 4),
            "renders": stats["renders"],
            "render_ms": stats["ms"], "longest_ms": stats["longestMs"],
            "wall_ms": ended - started}


def table(rows: list[dict[str, Any]]) -> str:
    lines = ["| tokens arrive | CPU | pieces | renders | time rendering, ms | longest render, ms |"
             " share of the stream's time | answer on screen after, ms |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        cpu = "as is" if r["slowdown"] == 1 else f"{r['slowdown']}x slower"
        rate = "at once" if not r["gap"] else f"{1 / r['gap']:.0f}/s"
        lines.append(f"| {rate} | {cpu} | {r['pieces']} | {r['renders']} | "
                     f"{r['render_ms']:.0f} | {r['longest_ms']:.1f} | "
                     f"{r['render_ms'] / r['wall_ms']:.0%} | {r['wall_ms']:.0f} |")
    return "\n".join(lines) + "\n"


def main() -> int:
    with stack() as s:
        base, _ = appliance(s.procs, "appliance", s.fake, s.redis_url, s.data)
        token = credential(s.data, s.redis_url, "page-bench", "1")
        rows = [asyncio.run(measure(base, token, slowdown, gap))
                for gap in (0.0, 0.01) for slowdown in (1, 4)]
    out = ("Rendering a 2,000-token Markdown answer in the chat page (bench/page.py; headless "
           "Chromium at 390x844; the answer streamed from the fake upstream at once, or at 100 "
           "tokens a second).\n\n" + table(rows))
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "page.md").write_text(out)
    print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
