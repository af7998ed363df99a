"""The catalog under clients that leave at random points: while their model starts, while they
wait for room or a slot, mid-stream. Children are the fast stand-in (tests/kit/
fake_llama_server.py) so many swaps fit in seconds; afterwards every count is back to zero and
the caps held throughout."""

from __future__ import annotations

import asyncio
import json
import random
import stat
import sys
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from config.paths import bundled_model
from tests.kit.helpers import REPO, Appliance, eventually, wait_until

ADMIN = "c" * 40
MODELS = ("a", "b", "c")
MODEL = bundled_model()
pytestmark = pytest.mark.skipif(MODEL is None, reason="the bundled model is not installed")


def stand_in(tmp: Path, start_seconds: float) -> Path:
    script = tmp / "llama-server"
    script.write_text(f"#!/bin/sh\nexport PYTHONPATH={REPO} FAKE_LLAMA_START={start_seconds}\n"
                      f"exec {sys.executable} -m tests.kit.fake_llama_server \"$@\"\n")
    script.chmod(stat.S_IRWXU)
    return script


@pytest.fixture
def catalog_app(tmp_path: Path):
    started: list[Appliance] = []

    def make(top: str, start_seconds: float = 0.3) -> Appliance:
        tables = "".join(f'\n[models.{m}]\ngguf = "{MODEL}"\n' for m in MODELS)
        config = tmp_path / "config.toml"
        config.write_text(f'llama_server = "{stand_in(tmp_path, start_seconds)}"\n{top}\n'
                          + tables)
        app = Appliance(tmp_path / "app", "--config", str(config), "--auth", "disabled",
                        "--admin-key", ADMIN)
        started.append(app)
        wait_until(lambda: "listening on" in app.log, 30, "the appliance")
        return app

    yield make
    for app in started:
        app.stop()


async def one(http: aiohttp.ClientSession, base: str, model: str, stream: bool,
              leave_after: float | None) -> tuple[str, int | None]:
    """A request that may leave (close its connection) after leave_after seconds."""
    body = {"model": model, "stream": stream, "messages": [{"role": "user", "content": "x"}],
            "fake": {"chunks": 10, "gap": 0.03}}

    async def run() -> tuple[str, int | None]:
        async with http.post(base + "/v1/chat/completions", json=body) as resp:
            text = await resp.text()
            if resp.status == 200 and stream:
                assert text.rstrip().endswith("data: [DONE]"), text[-200:]  # never cut
            if resp.status != 200:
                assert resp.status == 503, (resp.status, text)
                assert json.loads(text)["error"]["code"] in (
                    "no_room_for_model", "queue_timeout", "model_loading"), text
            return "done", resp.status

    if leave_after is None:
        return await run()
    try:
        return await asyncio.wait_for(run(), leave_after)
    except TimeoutError:
        return "left", None


async def admin_models(http: aiohttp.ClientSession, base: str) -> dict[str, Any]:
    async with http.get(base + "/admin/models",
                        headers={"Authorization": f"Bearer {ADMIN}"}) as resp:
        assert resp.status == 200
        return await resp.json()


async def test_clients_leaving_anywhere_leave_nothing_held(catalog_app) -> None:
    app = catalog_app("max_loaded = 1\nadmission_slots = 1\nqueue_timeout = 3")
    rng = random.Random(25)
    most_running = 0
    async with aiohttp.ClientSession() as http:
        async def watch() -> None:
            nonlocal most_running
            while True:
                most_running = max(most_running, (await admin_models(http, app.base))["running"])
                await asyncio.sleep(0.05)

        watcher = asyncio.create_task(watch())
        for _ in range(3):  # waves: each a mix of models, streams, and clients that leave
            results = await asyncio.gather(*(
                one(http, app.base, rng.choice(MODELS), rng.random() < 0.5,
                    rng.uniform(0.0, 1.5) if rng.random() < 0.5 else None)
                for _ in range(30)))
            assert any(r == ("done", 200) for r in results), results
            assert any(kind == "left" for kind, _ in results)
        watcher.cancel()

        async def settled() -> bool:
            view = await admin_models(http, app.base)
            return all(m["in_use"] == 0 and m["queue"]["waiting"] == 0
                       and m["queue"]["free"] == m["queue"]["slots"] for m in view["models"])

        await eventually(settled, 15, "every hold and slot to be let go")
        view = await admin_models(http, app.base)
        assert most_running <= 1 and view["running"] <= 1, (most_running, view["running"])
        assert sum(m["evictions"].get("room", 0) for m in view["models"]) >= 2
        for model in MODELS:  # and every model still serves
            assert await one(http, app.base, model, True, None) == ("done", 200)
    own = [line for line in app.log.splitlines() if " llama-server[" not in line]  # the
    # stand-in's own complaints about connections the appliance closed are not ours
    assert not [line for line in own if "Traceback" in line or "Task exception" in line], own


async def test_clients_leaving_during_one_slow_start_share_and_finish_it(catalog_app) -> None:
    app = catalog_app("", start_seconds=1.5)
    async with aiohttp.ClientSession() as http:
        # Every first request gives up before the start is done; the start goes on for the
        # next one, which finds the model loaded, and nothing stays held.
        results = await asyncio.gather(*(one(http, app.base, "a", True, 0.3)
                                         for _ in range(5)))
        assert {kind for kind, _ in results} == {"left"}

        async def loaded() -> bool:
            view = await admin_models(http, app.base)
            row = next(m for m in view["models"] if m["id"] == "a")
            return row["state"] == "loaded" and row["in_use"] == 0

        await eventually(loaded, 10, "the start to finish with no one waiting")
        assert await one(http, app.base, "a", False, None) == ("done", 200)
        view = await admin_models(http, app.base)
        assert next(m for m in view["models"] if m["id"] == "a")["loads"] == 1
    assert app.log.count("model a: starting") == 1


async def test_upstream_servers_take_turns(make_proxy, fake) -> None:
    from aiohttp import web

    from tests.kit import fake_upstream
    from tests.kit.helpers import free_port

    second = fake_upstream.make_app()
    runner = web.AppRunner(second)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    try:
        proxy = await make_proxy(upstreams=[fake.url, f"http://127.0.0.1:{port}"],
                                 auth="disabled")
        async with aiohttp.ClientSession() as http:
            for _ in range(6):
                async with http.post(proxy.base_url + "/v1/chat/completions", json={
                        "messages": [{"role": "user", "content": "x"}]}) as resp:
                    assert resp.status == 200
        assert fake.record.requests == 3 and second[fake_upstream.RECORD].requests == 3
    finally:
        await runner.cleanup()


async def test_a_request_for_a_model_being_stopped_waits_and_is_served(catalog_app) -> None:
    # b is idle and loaded; c's request stops it for room, and b's request comes while b's
    # child is on its way out: it waits for the stop, then b starts again (c idle by then).
    app = catalog_app("max_loaded = 1", start_seconds=0.2)
    async with aiohttp.ClientSession() as http:
        for gap in (0.0, 0.01, 0.03, 0.06):
            assert await one(http, app.base, "b", False, None) == ("done", 200)
            first = asyncio.create_task(one(http, app.base, "c", False, None))
            await asyncio.sleep(gap)
            assert await one(http, app.base, "b", True, None) == ("done", 200)
            assert await first == ("done", 200)
    assert "unreachable" not in app.log, app.log[-3000:]


async def test_a_remote_models_key_stays_out_of_answers(make_proxy, fake, tmp_path) -> None:
    secret = "sk-remote-" + "s3cret" * 4
    config = tmp_path / "models.toml"
    config.write_text(f'[models.far]\nurl = "{fake.url}"\napi_key = "{secret}"\n')
    proxy = await make_proxy(config=str(config), auth="disabled")
    async with aiohttp.ClientSession() as http:
        for fake_steer, status, code in (
                ({"status": 500, "raw": f"internal error, header Bearer {secret}"}, 500,
                 "upstream_error"),
                ({"status": 401, "raw": f"Invalid API key: {secret}"}, 502, "upstream_auth")):
            for stream in (False, True):
                async with http.post(proxy.base_url + "/v1/chat/completions", json={
                        "model": "far", "stream": stream, "fake": fake_steer,
                        "messages": [{"role": "user", "content": "x"}]}) as resp:
                    text = await resp.text()
                assert secret not in text and "s3cret" not in text, text
                assert resp.status == status and code in text, (resp.status, text)
    assert fake.record.headers[-1]["Authorization"] == f"Bearer {secret}"  # it was sent
