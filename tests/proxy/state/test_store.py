"""The embedded Redis: started with the appliance, restarted if it dies, its data kept."""

from __future__ import annotations

import asyncio
import os
import re
import signal
from pathlib import Path

import openai

from tests.kit.helpers import Appliance, pid_alive, redis_servers_with, wait_until
from tests.test_generate_token import chat, generate, last_line


def redis_pids(app: Appliance) -> list[int]:
    return [int(p) for p in re.findall(r"embedded Redis \(pid (\d+)\)", app.log)]


def test_embedded_redis_is_restarted_and_keeps_its_keys(tmp_path: Path) -> None:
    app = Appliance(tmp_path)
    try:
        app.wait_ready()
        key = last_line(generate(app.data_dir, "before", "--api-key"))
        prefix = key[3:11].encode()
        aof = app.data_dir / "redis" / "appendonlydir"
        wait_until(lambda: any(prefix in f.read_bytes() for f in aof.glob("*.aof")), 5,
                   "the key to reach the append-only file (appendfsync everysec)")
        first = redis_pids(app)[-1]
        os.kill(first, signal.SIGKILL)
        wait_until(lambda: len(redis_pids(app)) == 2, 15, "the embedded Redis to restart")
        assert "embedded Redis killed by SIGKILL; restarting" in app.log
        assert not pid_alive(first)
        assert chat(app.base, key).strip()  # a key from before the crash, read from disk
        after = last_line(generate(app.data_dir, "after", "--api-key"))
        assert chat(app.base, after).strip()
        try:
            chat(app.base, "sk-00000000_" + "x" * 43)
            raise AssertionError("an unknown key was accepted")
        except openai.AuthenticationError:
            pass
        second = redis_pids(app)[-1]
    finally:
        assert app.stop() == 0
    wait_until(lambda: not pid_alive(second), 10, "Redis to stop with the appliance")


async def test_the_appliance_takes_over_a_redis_it_only_shared(tmp_path: Path) -> None:
    """generate_token.py started Redis for itself; the appliance came up meanwhile and shared
    it; when the tool ends and stops its Redis, the appliance starts its own, with the data."""
    from proxy.state.store import EmbeddedRedis, make_client

    data = tmp_path / "data"
    tool = EmbeddedRedis(data, "redis-server", 0.25)
    await tool.start(keep=False)
    assert tool.owned
    client = make_client(tool.url, 0.25)
    await client.set("llp:test", "kept")
    await client.aclose()
    app = Appliance(tmp_path / "app", data_dir=data)
    try:
        await asyncio.to_thread(app.wait_ready)
        assert "using the running embedded Redis" in app.log
        await tool.stop()  # the tool ends
        await asyncio.to_thread(wait_until, lambda: redis_pids(app), 10,
                                "the appliance to start its own Redis")
        key = last_line(await asyncio.to_thread(generate, data, "after", "--api-key"))
        assert (await asyncio.to_thread(chat, app.base, key)).strip()
        assert len(redis_servers_with(data / "redis.sock")) == 1
        client = make_client(tool.url, 0.25)
        assert await client.get("llp:test") == "kept"  # the same append-only data
        await client.aclose()
    finally:
        assert await asyncio.to_thread(app.stop) == 0
