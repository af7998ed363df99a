"""Usage per credential: what each principal used, per day, as the model reported it; read by
the caller (/v1/usage), the operator (/admin/usage) and generate_token.py --usage; nothing lost
when Redis blinks. The fake upstream drives the mechanics; the real model's run is
test_usage_matches_what_the_model_reported."""

from __future__ import annotations

import asyncio
import datetime as dt
import subprocess
import sys
from typing import Any

import aiohttp
import openai
import pytest

from proxy.api.ledger import LEDGER
from proxy.server import Running
from quota.ledger import Ledger, today
from tests.conftest import ADMIN_HEADERS, Fake, KillableRedis, ProxyFactory, token_for
from tests.kit.fake_upstream import chat_body as body
from tests.kit.helpers import REPO, eventually

CHAT = "/v1/chat/completions"


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


async def post(http: aiohttp.ClientSession, proxy: Running, payload: dict, token: str) -> int:
    async with http.post(proxy.base_url + CHAT, json=payload, headers=bearer(token)) as resp:
        await resp.read()
        return resp.status


async def get(proxy: Running, path: str, headers: dict[str, str]) -> tuple[int, Any]:
    async with aiohttp.ClientSession() as http:
        async with http.get(proxy.base_url + path, headers=headers) as resp:
            return resp.status, await resp.json()


async def traffic(proxy: Running) -> tuple[str, str]:
    """alice: two whole answers (3 + 2 tokens each) and a stream of 4 events (3 + 4), then one
    refused by her rate limit; bob: one whole answer."""
    alice, bob = token_for(proxy, "alice"), token_for(proxy, "bob")
    async with aiohttp.ClientSession() as http:
        assert await post(http, proxy, body(), alice) == 200
        assert await post(http, proxy, body(), alice) == 200
        assert await post(http, proxy, body(stream=True, chunks=4), alice) == 200
        assert await post(http, proxy, body(), alice) == 429  # limit_rpm=3: not counted
        assert await post(http, proxy, body(), bob) == 200
    return alice, bob


async def test_each_caller_sees_their_own_usage(make_proxy: ProxyFactory, fake: Fake) -> None:
    proxy = await make_proxy(upstreams=[fake.url], limit_rpm=3)
    alice, bob = await traffic(proxy)
    status, mine = await get(proxy, "/v1/usage", bearer(alice))
    assert status == 200, mine
    day = today().isoformat()
    assert mine["principal"] == "user:alice"
    assert mine["data"] == [{"principal": "user:alice", "date": day, "requests": 3,
                             "prompt_tokens": 9, "completion_tokens": 8, "total_tokens": 17}]
    assert mine["total"] == {"requests": 3, "prompt_tokens": 9, "completion_tokens": 8,
                             "total_tokens": 17}
    status, his = await get(proxy, "/v1/usage", bearer(bob))
    assert his["total"]["requests"] == 1 and his["total"]["completion_tokens"] == 2
    # A caller cannot ask for someone else's: the query is not theirs to choose.
    status, still_his = await get(proxy, "/v1/usage?principal=user:alice", bearer(bob))
    assert still_his["principal"] == "user:bob"


async def test_the_operator_sees_everyone_and_filters(make_proxy: ProxyFactory,
                                                      fake: Fake) -> None:
    proxy = await make_proxy(upstreams=[fake.url], limit_rpm=3)
    alice, _ = await traffic(proxy)
    status, everyone = await get(proxy, "/admin/usage", ADMIN_HEADERS)
    assert status == 200
    assert {(r["principal"], r["requests"]) for r in everyone["data"]} == {
        ("user:alice", 3), ("user:bob", 1)}
    assert everyone["total"]["requests"] == 4
    status, one = await get(proxy, "/admin/usage?principal=user:bob", ADMIN_HEADERS)
    assert [r["principal"] for r in one["data"]] == ["user:bob"]
    yesterday = (today() - dt.timedelta(days=1)).isoformat()
    status, before = await get(proxy, f"/admin/usage?from={yesterday}&to={yesterday}",
                               ADMIN_HEADERS)
    assert status == 200 and before["data"] == []
    # Not the operator: refused. Not a date: a 400 that says why.
    status, _ = await get(proxy, "/admin/usage", bearer(alice))
    assert status == 403
    for query in ("from=yesterday", "to=", "to=2026-13-01"):
        status, error = await get(proxy, f"/admin/usage?{query}", ADMIN_HEADERS)
        assert status == 400 and error["error"]["code"] == "invalid_date_range", query
    # A range backwards is empty; a range of years is its last 366 days.
    status, backwards = await get(proxy, f"/admin/usage?from={today()}&to={yesterday}",
                                  ADMIN_HEADERS)
    assert status == 200 and backwards["data"] == []
    status, ancient = await get(proxy, "/admin/usage?to=0001-01-05", ADMIN_HEADERS)
    assert status == 200 and ancient["data"] == []  # not a 500 from date arithmetic
    status, years = await get(proxy, "/admin/usage?from=2000-01-01", ADMIN_HEADERS)
    assert years["from"] == (today() - dt.timedelta(days=365)).isoformat()
    assert years["total"]["requests"] == 4


async def test_generate_token_prints_the_usage_table(make_proxy: ProxyFactory, fake: Fake,
                                                     redis_url: str) -> None:
    proxy = await make_proxy(upstreams=[fake.url], limit_rpm=3)
    await traffic(proxy)
    await proxy.app[LEDGER].flush()
    env = {"LLAMA_PROXY_REDIS_URL": redis_url, "PATH": "/usr/bin:/bin"}

    def usage(*args: str) -> str:
        result = subprocess.run([sys.executable, "generate_token.py", "--data-dir",
                                 str(proxy.settings.data_dir), "--usage", *args], cwd=REPO,
                                capture_output=True, text=True, timeout=60, env=env)
        assert result.returncode == 0, result.stderr
        return result.stdout

    day = today().isoformat()
    lines = usage("alice").splitlines()
    assert lines[0].split() == ["date", "principal", "requests", "prompt", "completion",
                                "total"]
    assert lines[1].split() == [day, "user:alice", "3", "9", "8", "17"]
    assert lines[-1].split() == ["total", "3", "9", "8", "17"]
    everyone = usage()
    assert "user:alice" in everyone and "user:bob" in everyone
    assert usage("nobody").startswith("no usage recorded")


async def test_a_redis_blip_loses_no_usage(own_redis: KillableRedis) -> None:
    from redis.asyncio import Redis

    client = Redis.from_url(own_redis.url, socket_timeout=1, socket_connect_timeout=1)
    ledger = Ledger(client, retention_days=7)
    ledger.record("user:alice", 10, 5)
    assert await ledger.flush()
    own_redis.kill()
    ledger.record("user:alice", 1, 2)
    ledger.record("key:3f9a0c1d", 4, 0)
    assert not await ledger.flush()  # Redis is away: kept for the next try
    own_redis.restart()
    ledger.record("user:alice", 100, 200)
    assert await ledger.flush()
    rows = {r.principal: r for r in await ledger.read(None, today(), today())}
    assert (rows["user:alice"].requests, rows["user:alice"].prompt_tokens,
            rows["user:alice"].completion_tokens) == (3, 111, 207)
    assert rows["key:3f9a0c1d"].requests == 1
    # Each day's record expires retention_days after the day.
    ttl = await client.ttl(f"llp:usage:user:alice:{today().isoformat()}")
    assert 7 * 86400 < ttl <= 8 * 86400
    await ledger.aclose()
    await client.aclose()


@pytest.mark.parametrize("stream", [False, True])
async def test_usage_matches_what_the_model_reported(model_proxy: Running, stream: bool) -> None:
    """Through the real model: the ledger holds exactly the usage llama-server reported."""
    token = token_for(model_proxy, "dora")
    client = openai.AsyncOpenAI(base_url=model_proxy.base_url + "/v1", api_key=token,
                                max_retries=0)
    model = (await client.models.list()).data[0].id
    reported = {"prompt": 0, "completion": 0}
    for prompt in ("Say hello.", "Name a colour."):
        messages = [{"role": "user", "content": prompt}]
        if stream:
            chunks = await client.chat.completions.create(
                model=model, messages=messages, max_tokens=8, stream=True,  # type: ignore
                stream_options={"include_usage": True})
            usage = None
            async for chunk in chunks:
                usage = chunk.usage or usage
        else:
            answer = await client.chat.completions.create(model=model, messages=messages,
                                                          max_tokens=8)  # type: ignore
            usage = answer.usage
        assert usage is not None
        reported["prompt"] += usage.prompt_tokens
        reported["completion"] += usage.completion_tokens
    await client.close()
    status, mine = await get(model_proxy, "/v1/usage", bearer(token))
    assert status == 200
    assert mine["total"] == {"requests": 2, "prompt_tokens": reported["prompt"],
                             "completion_tokens": reported["completion"],
                             "total_tokens": reported["prompt"] + reported["completion"]}


async def test_kept_counts_land_without_further_traffic(own_redis: KillableRedis) -> None:
    """A batch Redis did not take is tried again on its own: no later request is needed."""
    import redis as redis_sync
    from redis.asyncio import Redis

    client = Redis.from_url(own_redis.url, socket_timeout=1, socket_connect_timeout=1)
    ledger = Ledger(client, retention_days=7)
    own_redis.kill()
    ledger.record("user:zed", 2, 3)
    await asyncio.sleep(1.0)  # its first try has failed by now
    own_redis.restart()
    reader = redis_sync.Redis.from_url(own_redis.url)
    key = f"llp:usage:user:zed:{today().isoformat()}"
    await eventually(lambda: reader.hget(key, "completion_tokens") == b"3", 10,
                     "the kept batch to be written")
    reader.close()
    await ledger.aclose()
    await client.aclose()
