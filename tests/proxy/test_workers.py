"""--workers N: one bound on the model and one turn order across every worker process."""

from __future__ import annotations

import asyncio
import re
import time
from pathlib import Path

import aiohttp

from tests.conftest import Fake
from tests.kit.helpers import Appliance, eventually, http_status, pid_alive, wait_until

CHAT = "/v1/chat/completions"


async def test_slots_and_turns_hold_across_workers(fake: Fake, tmp_path: Path) -> None:
    app = Appliance(tmp_path, "--upstream", fake.url, "--workers", "2", "--admission-slots", "2",
                    "--auth", "disabled")
    try:
        await asyncio.to_thread(app.wait_ready)
        await asyncio.to_thread(wait_until, lambda: "worker listening" in app.log, 20,
                                "the extra worker")
        await asyncio.to_thread(
            wait_until, lambda: all(http_status(app.base + "/ready") == 200 for _ in range(6)),
            20, "both processes to be ready")

        async def one(user: str) -> tuple[int, float]:
            # A fresh connection each time, so the kernel spreads them over both processes.
            async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True)
                                             ) as http:
                started = time.monotonic()
                async with http.post(app.base + CHAT, headers={"X-User-Id": user},
                                     json={"model": "fake-model", "messages": [],
                                           "fake": {"ttfb": 0.3}}) as resp:
                    await resp.read()
                    return resp.status, time.monotonic() - started

        async def waiting_at_least(count: int) -> bool:
            async with aiohttp.ClientSession() as http:
                async with http.get(app.base + "/health") as resp:
                    return (await resp.json())["queue"]["waiting"] >= count

        heavy = [asyncio.create_task(one("heavy")) for _ in range(16)]
        # Both slots busy and the rest queued, whichever worker each one reached.
        await eventually(lambda: waiting_at_least(14), 5, "the heavy user's flood to queue")
        light = await asyncio.gather(*(one("light") for _ in range(4)))
        heavy_done = await asyncio.gather(*heavy)
        assert [s for s, _ in light + heavy_done] == [200] * 20
        assert fake.record.max_in_flight <= 2  # never more than the model's slots
        # Taking turns, the light user gets every other slot: its four are done after about
        # 0.6, 0.9, 1.2 and 1.5 s. First come, first served would put all four behind the 14
        # queued heavy ones: 7 rounds of 0.3 s on 2 slots, then their own, 2.4 s and more.
        assert max(t for _, t in light) < 2.0, light
        serving = set(re.findall(r"proxy\.access\[(\d+)\]", app.log))
        assert len(serving) == 2  # both processes served requests
        async def all_free() -> bool:
            async with aiohttp.ClientSession() as http:
                async with http.get(app.base + "/health") as resp:
                    queue = (await resp.json())["queue"]
            return queue["slots"] == 2 and queue["free"] == 2 and queue["waiting"] == 0

        await eventually(all_free, 2, "every slot back (releases are not acknowledged)")
        worker = int(re.search(r"proxy\[(\d+)\]: worker listening", app.log).group(1))
    finally:
        code = await asyncio.to_thread(app.stop)
    assert code == 0
    assert not pid_alive(worker)
    assert not list(app.data_dir.glob("slots-*.sock"))


async def test_an_upstream_pool_and_a_catalog_look_the_same_from_every_worker(
        fake: Fake, tmp_path: Path) -> None:
    # --upstream servers naming their own model, beside a [models] table: the pool stays the
    # default model in every process, its ids learned there too.
    config = tmp_path / "config.toml"
    config.write_text(f'[models.other]\nurl = "{fake.url}"\naliases = ["o"]\n')
    app = Appliance(tmp_path, "--config", str(config), "--upstream", fake.url, "--workers", "2",
                    "--auth", "disabled")
    try:
        await asyncio.to_thread(app.wait_ready)
        await asyncio.to_thread(wait_until, lambda: "worker listening" in app.log, 20,
                                "the extra worker")
        seen: set[str] = set()
        for _ in range(12):  # fresh connections: the kernel spreads them over both processes
            async with aiohttp.ClientSession() as http:
                async with http.get(app.base + "/v1/models") as resp:
                    ids = [m["id"] for m in (await resp.json())["data"]]
                assert ids == ["fake-model", "other"], ids
                async with http.post(app.base + "/v1/chat/completions", json={
                        "model": "no-such", "messages": [{"role": "user", "content": "x"}]}
                        ) as resp:
                    assert resp.status == 404  # two models: an unknown name is not guessed
                async with http.post(app.base + "/v1/chat/completions", json={
                        "messages": [{"role": "user", "content": "x"}]}) as resp:
                    assert resp.status == 200
        seen = set(re.findall(r"proxy\.access\[(\d+)\].*model=fake-model", app.log))
        assert len(seen) == 2, "both processes answered for the default model"
    finally:
        app.stop()
