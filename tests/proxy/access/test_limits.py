"""Rate limits and fair admission against real Redis (fake upstream for the mechanics)."""

from __future__ import annotations

import asyncio
import json
import logging
import random
import time

import aiohttp
import pytest
import redis as redis_sync

from proxy.access.limits import prompt_tokens
from proxy.server import Running
from proxy.upstream.pool import CATALOG
from tests.conftest import Fake, KillableRedis, ProxyFactory, token_for
from tests.kit.fake_upstream import chat_body as body
from tests.kit.helpers import eventually
from tests.kit.limits import charged, leases

CHAT = "/v1/chat/completions"


async def post(proxy: Running, token: str, payload: dict | None = None
               ) -> tuple[int, dict, dict[str, str]]:
    async with aiohttp.ClientSession() as http:
        async with http.post(proxy.base_url + CHAT, json=payload or body(),
                             headers={"Authorization": f"Bearer {token}"}) as resp:
            await resp.read()
            data = {} if resp.content_type == "text/event-stream" else await resp.json()
            return resp.status, data, dict(resp.headers)


async def test_exactly_n_of_200_concurrent_requests_are_admitted(
    make_proxy: ProxyFactory, fake: Fake
) -> None:
    proxy = await make_proxy(upstreams=[fake.url], limit_rpm=20)
    token = token_for(proxy)
    results = await asyncio.gather(*(post(proxy, token) for _ in range(200)))
    statuses = [status for status, _, _ in results]
    assert statuses.count(200) == 20 and statuses.count(429) == 180
    assert fake.record.requests == 20
    _, data, headers = next(r for r in results if r[0] == 429)
    assert data["error"]["type"] == "rate_limit_exceeded"
    assert data["error"]["code"] == "rate_limit_exceeded"
    assert "requests per minute (limit 20)" in data["error"]["message"]
    assert 1 <= int(headers["Retry-After"]) <= 60
    assert headers["x-ratelimit-remaining-requests"] == "0"


async def test_the_window_slides_no_burst_at_a_boundary(make_proxy: ProxyFactory, fake: Fake
                                                        ) -> None:
    proxy = await make_proxy(upstreams=[fake.url], limit_rpm=5, limit_window=1.0)
    token = token_for(proxy)
    # Start late in a wall-clock second: a fixed window would reset 0.2 s from now.
    await asyncio.sleep((0.8 - time.time() % 1.0) % 1.0)
    first = await asyncio.gather(*(post(proxy, token) for _ in range(5)))
    assert [s for s, _, _ in first] == [200] * 5
    await asyncio.sleep(0.4)  # now in the next wall-clock second
    second = await asyncio.gather(*(post(proxy, token) for _ in range(5)))
    assert [s for s, _, _ in second] == [429] * 5
    await asyncio.sleep(0.7)  # the first five have left the sliding window
    third = await asyncio.gather(*(post(proxy, token) for _ in range(5)))
    assert [s for s, _, _ in third] == [200] * 5


async def test_retry_after_says_when_the_window_admits(make_proxy: ProxyFactory, fake: Fake
                                                       ) -> None:
    proxy = await make_proxy(upstreams=[fake.url], limit_rpm=2, limit_window=3.0)
    token = token_for(proxy)
    assert (await post(proxy, token))[0] == 200
    await asyncio.sleep(1.0)
    assert (await post(proxy, token))[0] == 200
    status, _, headers = await post(proxy, token)
    assert status == 429
    assert headers["Retry-After"] == "2"  # the first request leaves 2 s from now, not 3
    await asyncio.sleep(2.1)
    assert (await post(proxy, token))[0] == 200


async def test_headers_on_whole_and_streamed_responses(make_proxy: ProxyFactory, fake: Fake
                                                       ) -> None:
    proxy = await make_proxy(upstreams=[fake.url], limit_rpm=10, limit_tpm=10_000)
    token = token_for(proxy)
    for payload in (body(), body(stream=True)):
        status, _, headers = await post(proxy, token, payload)
        assert status == 200
        for kind in ("requests", "tokens"):
            assert f"x-ratelimit-limit-{kind}" in headers
            assert f"x-ratelimit-remaining-{kind}" in headers
            assert f"x-ratelimit-reset-{kind}" in headers
    assert headers["x-ratelimit-limit-requests"] == "10"
    assert headers["x-ratelimit-remaining-requests"] == "8"
    fresh = token_for(proxy, "fresh")
    _, _, first = await post(proxy, fresh)  # the first request of an empty window
    assert first["x-ratelimit-reset-requests"] == "1m0s"  # when this request leaves it


async def test_tokens_are_reserved_before_generation(make_proxy: ProxyFactory, fake: Fake,
                                                     redis_url: str) -> None:
    proxy = await make_proxy(upstreams=[fake.url], limit_tpm=300)
    token = token_for(proxy, "tina")
    slow = body(ttfb=0.5)
    slow["max_tokens"] = 200
    results = await asyncio.gather(*(post(proxy, token, slow) for _ in range(3)))
    assert sorted(s for s, _, _ in results) == [200, 429, 429]  # no overshoot while generating
    refused = next(r for r in results if r[0] == 429)
    assert "tokens per minute (limit 300)" in refused[1]["error"]["message"]
    # Settled to the real usage (the fake reports 5 tokens), so there is room again.
    await eventually(lambda: charged(redis_url, "tina") == 5, 2, "the reservation to settle")
    assert (await post(proxy, token, slow))[0] == 200


async def test_concurrency_leases_are_released_on_disconnect(
    make_proxy: ProxyFactory, fake: Fake, redis_url: str
) -> None:
    proxy = await make_proxy(upstreams=[fake.url], limit_concurrency=2)
    headers = {"Authorization": f"Bearer {token_for(proxy, 'cora')}"}
    long_stream = body(stream=True, chunks=1000, gap=0.05)
    async with aiohttp.ClientSession(headers=headers) as http:
        first = await http.post(proxy.base_url + CHAT, json=long_stream)
        second = await http.post(proxy.base_url + CHAT, json=long_stream)
        async with http.post(proxy.base_url + CHAT, json=body()) as third:
            assert third.status == 429 and third.headers["Retry-After"] == "1"
        first.close()  # the client goes away mid-stream
        await eventually(lambda: leases(redis_url, "cora") == 1, 2, "the lease to be released")
        async with http.post(proxy.base_url + CHAT, json=body()) as fourth:
            assert fourth.status == 200
        second.close()
    await eventually(lambda: leases(redis_url, "cora") == 0, 2, "every lease released")


async def test_a_daily_limit_refuses_past_its_count(make_proxy: ProxyFactory,
                                                    fake: Fake) -> None:
    proxy = await make_proxy(upstreams=[fake.url], limit_rpd=3)
    token = token_for(proxy, "dana")
    results = [await post(proxy, token) for _ in range(4)]
    assert [status for status, _, _ in results] == [200, 200, 200, 429]
    _, data, headers = results[-1]
    assert "requests per day" in data["error"]["message"]
    assert headers["x-ratelimit-limit-requests"] == "3"
    assert int(headers["Retry-After"]) > 3600  # the day's window, not a minute's


async def test_two_appliances_share_one_limit(make_proxy: ProxyFactory, fake: Fake) -> None:
    one = await make_proxy(upstreams=[fake.url], limit_rpm=10)
    two = await make_proxy(upstreams=[fake.url], limit_rpm=10)
    token = token_for(one)  # same data dir, same secret
    results = await asyncio.gather(*(post(p, token) for p in [one, two] * 15))
    assert sorted(s for s, _, _ in results).count(200) == 10


async def test_per_ip_limit_for_anonymous_traffic(make_proxy: ProxyFactory, fake: Fake) -> None:
    proxy = await make_proxy(upstreams=[fake.url], auth="disabled", limit_ip_rpm=3)
    async with aiohttp.ClientSession() as http:
        statuses = []
        for _ in range(5):
            async with http.post(proxy.base_url + CHAT, json=body()) as resp:
                statuses.append(resp.status)
    assert statuses == [200, 200, 200, 429, 429]


async def test_redis_outage_fails_open_to_local_limits_and_recovers(
    make_proxy: ProxyFactory, fake: Fake, own_redis: KillableRedis,
    caplog: pytest.LogCaptureFixture,
) -> None:
    proxy = await make_proxy(upstreams=[fake.url], redis_url=own_redis.url, limit_rpm=3)
    token = token_for(proxy)
    assert [(await post(proxy, token))[0] for _ in range(2)] == [200, 200]
    own_redis.kill()
    caplog.set_level(logging.WARNING)
    started = time.monotonic()
    during = [(await post(proxy, token))[0] for _ in range(5)]
    assert time.monotonic() - started < 2  # no hang, no retry storm
    assert during == [200, 200, 200, 429, 429]  # the same limit, kept in process
    assert "Redis unreachable" in caplog.text
    async with aiohttp.ClientSession() as http:
        async with http.get(proxy.base_url + "/health") as resp:
            assert (await resp.json())["limits"] == "local"
    own_redis.restart()
    await asyncio.sleep(1.1)  # the limiter retries Redis every second
    after = [(await post(proxy, token))[0] for _ in range(3)]
    assert after == [200, 429, 429]  # back on Redis, whose window still holds the first two
    assert "Redis is back" in caplog.text


async def test_redis_outage_closed_policy_refuses(make_proxy: ProxyFactory, fake: Fake,
                                                  own_redis: KillableRedis) -> None:
    proxy = await make_proxy(upstreams=[fake.url], redis_url=own_redis.url, limit_rpm=3,
                             limit_on_redis_down="closed")
    token = token_for(proxy)
    own_redis.kill()
    status, data, headers = await post(proxy, token)
    assert status == 503 and data["error"]["code"] == "limits_unavailable"
    assert headers["Retry-After"]


async def test_fair_queue_keeps_a_light_user_fast_under_a_flood(
    make_proxy: ProxyFactory, fake: Fake
) -> None:
    proxy = await make_proxy(upstreams=[fake.url], admission_slots=1)
    heavy, light = token_for(proxy, "heavy"), token_for(proxy, "light")
    slow = body(ttfb=0.1)
    flood = [asyncio.create_task(post(proxy, heavy, slow)) for _ in range(16)]
    queue = proxy.app[CATALOG].models[0].queue
    await eventually(lambda: queue.waiting == 15, 2, "the flood to be queued")
    started = time.monotonic()
    status, _, _ = await post(proxy, light, slow)
    light_latency = time.monotonic() - started
    assert status == 200
    assert [r[0] for r in await asyncio.gather(*flood)] == [200] * 16
    # First come, first served would put it behind 16 x 0.1 s; taking turns, one or two.
    assert light_latency < 0.45, light_latency
    async with aiohttp.ClientSession() as http:
        async with http.get(proxy.base_url + "/health") as resp:
            queue = (await resp.json())["queue"]
    assert queue["slots"] == 1 and queue["waiting"] == 0 and queue["waited"] >= 15


async def test_queue_overflow_and_wait_limit_are_fast_503s(make_proxy: ProxyFactory, fake: Fake
                                                          ) -> None:
    proxy = await make_proxy(upstreams=[fake.url], admission_slots=1, queue_max=2,
                             queue_timeout=0.3)
    token = token_for(proxy)
    started = time.monotonic()
    results = await asyncio.gather(*(post(proxy, token, body(ttfb=1.0)) for _ in range(6)))
    codes = sorted((s, d.get("error", {}).get("code")) for s, d, _ in results)
    assert codes.count((503, "queue_full")) == 3
    assert codes.count((503, "queue_timeout")) == 2
    assert codes.count((200, None)) == 1
    assert all(h["Retry-After"] for s, _, h in results if s == 503)
    assert time.monotonic() - started < 1.6


async def test_a_stream_refused_by_the_queue_before_its_first_keep_alive_is_a_real_503(
    make_proxy: ProxyFactory, fake: Fake
) -> None:
    """Its headers are kept back until there is something to say, so a queue timeout is a
    503 with Retry-After that the SDKs retry, not a 200 ending in an error event."""
    proxy = await make_proxy(upstreams=[fake.url], admission_slots=1, queue_timeout=0.5,
                             sse_keepalive=15)
    token = token_for(proxy)
    holder = asyncio.create_task(post(proxy, token, body(ttfb=3.0)))
    await eventually(lambda: fake.record.in_flight == 1, 5, "the slot to be taken")
    status, data, headers = await post(proxy, token, body(stream=True))
    assert status == 503 and data["error"]["code"] == "queue_timeout"
    assert headers["Content-Type"].startswith("application/json") and headers["Retry-After"]
    assert (await holder)[0] == 200


async def test_a_client_leaving_mid_stream_is_charged_prompt_and_streamed_tokens(
    make_proxy: ProxyFactory, fake: Fake, redis_url: str
) -> None:
    proxy = await make_proxy(upstreams=[fake.url], limit_tpm=100_000)
    headers = {"Authorization": f"Bearer {token_for(proxy, 'leaver')}"}
    payload = json.dumps(body(stream=True, chunks=1000, gap=0.02)).encode()
    async with aiohttp.ClientSession(headers=headers) as http:
        resp = await http.post(proxy.base_url + CHAT, data=payload,
                               headers={"Content-Type": "application/json"})
        for _ in range(5):
            await resp.content.readline()
        resp.close()

    # Reserved: the prompt (~40) plus 512 default completion tokens; settled: far less.
    cost = await eventually(lambda: 0 < charged(redis_url, "leaver") < 300 and
                            charged(redis_url, "leaver"), 2, "settlement below the reservation")
    assert cost > prompt_tokens(payload)  # the prompt and what streamed, not events alone


async def test_requests_refused_before_the_model_do_not_count(
    make_proxy: ProxyFactory, fake: Fake, llama
) -> None:
    proxy = await make_proxy(upstreams=[fake.url, llama.url], upstream_api_key=llama.key,
                             limit_rpm=1)
    token = token_for(proxy)
    for _ in range(3):  # two models are served, so an unknown one is a 404
        status, data, _ = await post(proxy, token, {**body(), "model": "no-such-model"})
        assert status == 404 and data["error"]["code"] == "model_not_found"
    assert (await post(proxy, token))[0] == 200  # the only request that counted
    assert (await post(proxy, token))[0] == 429


def command_calls(url: str) -> dict[str, int]:
    client = redis_sync.Redis.from_url(url)
    try:
        stats = client.info("commandstats")
    finally:
        client.close()
    return {name.removeprefix("cmdstat_"): int(row["calls"]) for name, row in stats.items()}


async def test_scripts_are_sent_in_full_once_then_by_sha(make_proxy: ProxyFactory, fake: Fake,
                                                         redis_url: str) -> None:
    client = redis_sync.Redis.from_url(redis_url)
    client.config_resetstat()
    client.close()
    proxy = await make_proxy(upstreams=[fake.url], limit_tpm=100_000, limit_concurrency=5)
    token = token_for(proxy)
    for _ in range(20):
        assert (await post(proxy, token))[0] == 200
    await eventually(lambda: leases(redis_url, "alice") == 0, 2, "every request settled")
    calls = command_calls(redis_url)
    # Admit and settle: the source goes once each (Redis did not know them), then the SHA.
    assert calls.get("eval", 0) <= 2, calls
    assert calls.get("evalsha", 0) >= 40, calls


async def test_clients_hanging_up_at_once_never_lock_their_user_out(
    make_proxy: ProxyFactory, fake: Fake, redis_url: str
) -> None:
    proxy = await make_proxy(upstreams=[fake.url], limit_concurrency=3)
    token = token_for(proxy, "flaky")
    payload = json.dumps(body()).encode()
    port = int(proxy.base_url.rsplit(":", 1)[1])
    request = (f"POST {CHAT} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {token}\r\n"
               f"Content-Type: application/json\r\nContent-Length: {len(payload)}\r\n\r\n"
               ).encode() + payload
    rng = random.Random(3)

    async def hang_up() -> None:
        _, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(request)
        await writer.drain()
        await asyncio.sleep(rng.uniform(0, 0.004))
        writer.transport.abort()

    for _ in range(10):
        await asyncio.gather(*(hang_up() for _ in range(5)))
    await eventually(lambda: leases(redis_url, "flaky") == 0, 3, "every lease given back")
    results = await asyncio.gather(*(post(proxy, token) for _ in range(3)))
    assert [s for s, _, _ in results] == [200, 200, 200]


async def test_generation_is_capped_at_what_was_reserved(make_proxy: ProxyFactory, fake: Fake
                                                         ) -> None:
    proxy = await make_proxy(upstreams=[fake.url], limit_tpm=1000)
    token = token_for(proxy)
    assert (await post(proxy, token, body()))[0] == 200  # no max_tokens: the default is the cap
    assert fake.record.bodies[-1]["max_tokens"] == 512
    greedy = {**body(), "max_tokens": 5000, "max_completion_tokens": 4000}
    # Only the whole budget can be reserved (a fresh user: nothing used in its window yet).
    assert (await post(proxy, token_for(proxy, "greedy"), greedy))[0] == 200
    allowed = 1000 - prompt_tokens(json.dumps(greedy).encode())
    sent = fake.record.bodies[-1]
    assert (sent["max_tokens"], sent["max_completion_tokens"]) == (allowed, allowed)
    modest = {**body(), "max_tokens": 7}
    assert (await post(proxy, token, modest))[0] == 200
    assert fake.record.bodies[-1] == modest  # within budget: forwarded as it came
    unlimited = await make_proxy(upstreams=[fake.url])
    assert (await post(unlimited, token_for(unlimited), body()))[0] == 200
    assert "max_tokens" not in fake.record.bodies[-1]  # no token limit, nothing to enforce


async def test_clients_hanging_up_in_the_queue_never_cost_a_slot(
    make_proxy: ProxyFactory, fake: Fake
) -> None:
    """Through HTTP: 1 slot, 50 clients per round of which half hang up at a random moment."""
    proxy = await make_proxy(upstreams=[fake.url], auth="disabled", admission_slots=1,
                             queue_max=100, queue_timeout=5)
    url = proxy.base_url + "/v1/chat/completions"
    rng = random.Random(42)

    async def one(http: aiohttp.ClientSession, i: int) -> int | None:
        body = {"model": "fake-model", "messages": [{"role": "user", "content": "hi"}],
                "fake": {"ttfb": rng.uniform(0.002, 0.012)}}
        timeout = aiohttp.ClientTimeout(total=rng.uniform(0, 0.3)) if i % 2 else None
        try:
            async with http.post(url, json=body, timeout=timeout) as resp:
                await resp.read()
                return resp.status
        except TimeoutError:
            return None  # hung up

    connector = aiohttp.TCPConnector(limit=0, force_close=True)
    async with aiohttp.ClientSession(connector=connector) as http:
        for _ in range(5):
            statuses = await asyncio.gather(*(one(http, i) for i in range(50)))
            assert set(statuses) <= {200, None}
            assert statuses.count(200) >= 25
        started = time.monotonic()
        async with http.post(url, json={"model": "fake-model", "messages": []}) as resp:
            assert resp.status == 200
        assert time.monotonic() - started < 0.5

        async def queue_idle() -> bool:
            async with http.get(proxy.base_url + "/health") as resp:
                queue = (await resp.json())["queue"]
            return queue["free"] == 1 and queue["waiting"] == 0

        await eventually(queue_idle, 2, "every slot free and nobody waiting")
