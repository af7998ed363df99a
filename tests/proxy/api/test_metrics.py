"""/metrics: after known traffic (served, refused, left mid-stream) one scrape shows exactly
those counts, the model server's own metrics ride along, and only this host (or the admin or
the metrics token) may read it. The fake upstream drives the mechanics; one test runs the real
model."""

from __future__ import annotations

import asyncio
import json
import logging
import re
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from proxy.server import Running
from tests.conftest import ADMIN_HEADERS, Fake, ProxyFactory, token_for
from tests.kit.fake_upstream import chat_body as body
from tests.kit.helpers import Appliance, eventually, wait_until
from tests.kit.metrics import Scrape, scrape

CHAT = "/v1/chat/completions"
ROUTE = "/v1/chat/completions"
METRICS_TOKEN = "metrics-token-0123456789abcdefghijklmnopqrstuvwxyz"


async def post(http: aiohttp.ClientSession, proxy: Running, payload: Any,
               headers: dict[str, str]) -> int:
    data = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
    async with http.post(proxy.base_url + CHAT, data=data,
                         headers={"Content-Type": "application/json", **headers}) as resp:
        await resp.read()
        return resp.status


async def test_one_scrape_counts_what_was_served_and_refused(make_proxy: ProxyFactory,
                                                             fake: Fake) -> None:
    proxy = await make_proxy(upstreams=[fake.url], limit_rpm=5)
    auth = {"Authorization": f"Bearer {token_for(proxy, 'alice')}"}
    async with aiohttp.ClientSession() as http:
        whole = [await post(http, proxy, body(), auth) for _ in range(2)]
        streams = [await post(http, proxy, body(stream=True, chunks=4), auth)
                   for _ in range(3)]
        bad = await post(http, proxy, b"{not json", auth)
        refused = [await post(http, proxy, body(), auth) for _ in range(2)]  # past 5 a minute
        missing = await post(http, proxy, body(), {})
        forged = await post(http, proxy, body(), {"Authorization": "Bearer eyJhbGciOiJub25l"
                                                                   "In0.eyJzdWIiOiJ4In0."})
    assert whole == [200, 200] and streams == [200, 200, 200]
    assert bad == 400 and refused == [429, 429] and missing == 401 and forged == 401

    m = await scrape(proxy)
    requests = "llama_proxy_requests_total"
    assert m.value(requests, route=ROUTE, status="2xx", model="fake-model",
                   credential="jwt") == 5
    assert m.value(requests, route=ROUTE, status="4xx", credential="jwt") == 3
    assert m.value(requests, route=ROUTE, status="4xx", credential="none") == 2
    assert m.value("llama_proxy_rate_limited_total", window="rpm") == 2
    assert m.value("llama_proxy_auth_failures_total", reason="missing") == 1
    assert m.value("llama_proxy_auth_failures_total", reason="invalid") == 1
    # The fake reports 3 prompt tokens for each answer, 2 completion tokens for a whole one
    # and one per event for a stream (asked for by the appliance, not by the client).
    assert m.value("llama_proxy_tokens_total", model="fake-model", type="prompt") == 5 * 3
    assert m.value("llama_proxy_tokens_total", model="fake-model",
                   type="completion") == 2 * 2 + 3 * 4
    assert m.value("llama_proxy_time_to_first_token_seconds_count", route=ROUTE) == 3
    assert m.value("llama_proxy_request_duration_seconds_count", route=ROUTE) == 10
    assert m.value("llama_proxy_open_streams") == 0
    assert m.value("llama_proxy_build_info") == 1
    assert m.value("llama_proxy_backend_state", backend="upstream-1", state="ready") == 1
    assert m.value("llama_proxy_redis_degraded") == 0
    # The model server's own metrics, in the same scrape, labelled with their backend.
    assert m.value("llamacpp:prompt_tokens_total", backend="upstream-1",
                   model="fake-model") == 42
    assert m.value("llamacpp:n_tokens_max", backend="upstream-1") == 7  # its own name
    # The scrape before this one is counted too, under its own route.
    m2 = await scrape(proxy)
    assert m2.value(requests, route="/metrics", status="2xx") == 1


async def test_labels_stay_few_whatever_clients_send(make_proxy: ProxyFactory,
                                                     fake: Fake) -> None:
    """Free-form model names and paths never become series of their own."""
    proxy = await make_proxy(upstreams=[fake.url])
    auth = {"Authorization": f"Bearer {token_for(proxy)}"}
    async with aiohttp.ClientSession() as http:
        for i in range(5):
            assert await post(http, proxy, body(model=f"made-up-{i}"), auth) == 200
            async with http.get(f"{proxy.base_url}/scan/{i}/wp-login.php") as resp:
                assert resp.status == 404
    m = await scrape(proxy)
    assert m.label_values("llama_proxy_requests_total", "model") <= {"fake-model", ""}
    assert m.value("llama_proxy_requests_total", route=ROUTE, model="fake-model") == 5
    assert m.value("llama_proxy_requests_total", route="unmatched", status="4xx") == 5
    assert not any("made-up" in s or "wp-login" in s for s in
                   m.label_values("llama_proxy_requests_total", "route")
                   | m.label_values("llama_proxy_requests_total", "model"))
    assert "alice" not in m.text  # no user or key by default


async def test_a_client_that_leaves_mid_stream_is_counted_and_its_stream_closed(
        make_proxy: ProxyFactory, fake: Fake) -> None:
    proxy = await make_proxy(upstreams=[fake.url])
    auth = {"Authorization": f"Bearer {token_for(proxy)}"}
    async with aiohttp.ClientSession() as http:
        resp = await http.post(proxy.base_url + CHAT, json=body(stream=True, chunks=50,
                                                                  gap=0.05), headers=auth)
        await resp.content.readline()  # the first event has come
        during = await scrape(proxy)
        assert during.value("llama_proxy_open_streams") == 1
        resp.close()  # the client leaves
    await eventually(lambda: fake.record.cancelled == 1, 10, "the upstream stream to be cut")

    async def settled() -> bool:
        m = await scrape(proxy)
        return (m.value("llama_proxy_client_disconnects_total", reason="gone") == 1
                and m.value("llama_proxy_open_streams") == 0)

    for _ in range(100):
        if await settled():
            break
        await asyncio.sleep(0.05)
    m = await scrape(proxy)
    assert m.value("llama_proxy_client_disconnects_total", reason="gone") == 1
    assert m.value("llama_proxy_open_streams") == 0


async def test_queue_refusals_and_waits_are_counted(make_proxy: ProxyFactory,
                                                    fake: Fake) -> None:
    proxy = await make_proxy(upstreams=[fake.url], admission_slots=1, queue_max=0)
    auth = {"Authorization": f"Bearer {token_for(proxy)}"}
    async with aiohttp.ClientSession() as http:
        holder = await http.post(proxy.base_url + CHAT, headers=auth,
                                 json=body(stream=True, chunks=400, gap=0.05))
        await holder.content.readline()
        busy = await scrape(proxy)
        assert busy.value("llama_proxy_slots_busy") == 1
        assert busy.value("llama_proxy_slots") == 1
        assert await post(http, proxy, body(), auth) == 503  # no room to wait
        holder.close()
        await eventually(lambda: fake.record.cancelled == 1, 10, "the held stream to be cut")

    async def holder_ended() -> bool:  # a request's wait is counted when the request ends
        return (await scrape(proxy)).value("llama_proxy_queue_wait_seconds_count") >= 1

    await eventually(holder_ended, 10, "the holder's request to end")
    m = await scrape(proxy)
    assert m.value("llama_proxy_queue_refusals_total", reason="full") == 1
    assert m.value("llama_proxy_queue_wait_seconds_count") == 1  # the holder got its slot


@pytest.mark.parametrize("headers,status", [
    ({"X-Forwarded-For": "203.0.113.9"}, 401),  # relayed by a proxy on this host
    ({"X-Real-IP": "203.0.113.9"}, 401),
    ({"Forwarded": "for=203.0.113.9"}, 401),
    ({"Host": "rebound.example:8000"}, 401),  # a page whose DNS name now points here
    ({"Sec-Fetch-Site": "cross-site"}, 401),  # a browser says another site asked
    ({"Host": "localhost"}, 200),
    ({"X-Forwarded-For": "203.0.113.9", "Authorization": f"Bearer {METRICS_TOKEN}"}, 200),
    ({"X-Forwarded-For": "203.0.113.9", **ADMIN_HEADERS}, 200),
    ({"X-Forwarded-For": "203.0.113.9", "Authorization": "Bearer wrong-token"}, 401),
    ({}, 200),  # this host, asking directly
])
async def test_who_may_scrape(make_proxy: ProxyFactory, fake: Fake, headers: dict[str, str],
                              status: int) -> None:
    proxy = await make_proxy(upstreams=[fake.url], metrics_token=METRICS_TOKEN)
    async with aiohttp.ClientSession() as http:
        async with http.get(proxy.base_url + "/metrics", headers=headers) as resp:
            text = await resp.text()
            assert resp.status == status, text
            if status != 200:
                assert json.loads(text)["error"]["type"] == "authentication_error"
                assert METRICS_TOKEN not in text


async def test_behind_a_declared_proxy_loopback_is_not_enough(make_proxy: ProxyFactory,
                                                              fake: Fake) -> None:
    """With a relay on this host (trust_loopback_proxy), every client arrives from loopback,
    with or without a forwarding header: /metrics needs the token then."""
    proxy = await make_proxy(upstreams=[fake.url], trust_loopback_proxy=True,
                             metrics_token=METRICS_TOKEN)
    async with aiohttp.ClientSession() as http:
        async with http.get(proxy.base_url + "/metrics") as resp:
            assert resp.status == 401
        async with http.get(proxy.base_url + "/metrics",
                            headers={"Authorization": f"Bearer {METRICS_TOKEN}"}) as resp:
            assert resp.status == 200


async def test_a_local_scrape_on_a_dual_stack_listener_needs_no_credential(
    make_proxy: ProxyFactory, fake: Fake
) -> None:
    """Listening on "::", an IPv4 scrape from this host arrives as ::ffff:127.0.0.1."""
    proxy = await make_proxy(upstreams=[fake.url], host="::")
    port = proxy.base_url.rsplit(":", 1)[1]
    async with aiohttp.ClientSession() as http:
        async with http.get(f"http://127.0.0.1:{port}/metrics") as resp:
            assert resp.status == 200, await resp.text()


async def test_an_inference_credential_may_not_scrape(make_proxy: ProxyFactory,
                                                      fake: Fake) -> None:
    proxy = await make_proxy(upstreams=[fake.url])
    headers = {"X-Forwarded-For": "203.0.113.9",
               "Authorization": f"Bearer {token_for(proxy)}"}
    async with aiohttp.ClientSession() as http:
        async with http.get(proxy.base_url + "/metrics", headers=headers) as resp:
            assert resp.status == 403
    m = await scrape(proxy)
    assert m.value("llama_proxy_auth_failures_total", reason="scope") == 1


async def test_per_principal_series_only_when_asked(make_proxy: ProxyFactory,
                                                    fake: Fake) -> None:
    proxy = await make_proxy(upstreams=[fake.url], metrics_per_principal=True)
    async with aiohttp.ClientSession() as http:
        for who in ("alice", "bob", "bob"):
            auth = {"Authorization": f"Bearer {token_for(proxy, who)}"}
            assert await post(http, proxy, body(), auth) == 200
    m = await scrape(proxy)
    assert m.value("llama_proxy_principal_requests_total", principal="user:alice") == 1
    assert m.value("llama_proxy_principal_requests_total", principal="user:bob") == 2
    assert m.value("llama_proxy_principal_tokens_total", principal="user:bob",
                   type="completion") == 4


async def test_the_access_line_says_who_what_and_how_long(
        make_proxy: ProxyFactory, fake: Fake, caplog: pytest.LogCaptureFixture) -> None:
    proxy = await make_proxy(upstreams=[fake.url], limit_rpm=100)
    token = token_for(proxy, "carol")
    caplog.set_level(logging.INFO, logger="proxy.access")
    async with aiohttp.ClientSession() as http:
        assert await post(http, proxy, body(stream=True, chunks=2),
                          {"Authorization": f"Bearer {token}"}) == 200
    lines = [r for r in caplog.records if r.name == "proxy.access" and CHAT in r.getMessage()]
    assert len(lines) == 1
    access = lines[0].access  # type: ignore[attr-defined]
    assert access["principal"] == "user:carol" and access["model"] == "fake-model"
    assert access["status"] == 200 and access["limit"] == "ok"
    assert access["prompt_tokens"] == 3 and access["completion_tokens"] == 2
    assert access["ttft_ms"] >= 0 and access["duration_ms"] >= access["ttft_ms"]
    assert access["client"] == "127.0.0.1" and access["request_id"]
    message = lines[0].getMessage()
    assert "principal=user:carol" in message and "completion_tokens=2" in message
    assert token not in message and token not in json.dumps(access)


async def test_one_scrape_sums_every_worker(fake: Fake, tmp_path: Path) -> None:
    """--workers 2: whichever process answers the scrape, it counts what both served."""
    app = Appliance(tmp_path, "--upstream", fake.url, "--workers", "2", "--auth", "disabled")
    try:
        await asyncio.to_thread(app.wait_ready)
        await asyncio.to_thread(wait_until, lambda: "worker listening" in app.log, 20,
                                "the extra worker")

        async def one(stream: bool) -> int:
            # A fresh connection each time, so the kernel spreads them over both processes.
            async with aiohttp.ClientSession(
                    connector=aiohttp.TCPConnector(force_close=True)) as http:
                async with http.post(app.base + CHAT, json=body(stream=stream, chunks=2)) as r:
                    await r.read()
                    return r.status

        statuses = [await one(stream=i % 2 == 0) for i in range(40)]
        assert statuses == [200] * 40
        serving = set(re.findall(r"proxy\.access\[(\d+)\]", app.log))
        assert len(serving) == 2, "both processes served requests"
        async with aiohttp.ClientSession() as http:
            async with http.get(app.base + "/metrics") as resp:
                assert resp.status == 200
                m = Scrape(await resp.text())
        assert m.value("llama_proxy_requests_total", route=ROUTE, status="2xx") == 40
        assert m.value("llama_proxy_tokens_total", type="prompt") == 40 * 3
        assert m.value("llama_proxy_tokens_total", type="completion") == 20 * 2 + 20 * 2
        assert m.value("llama_proxy_time_to_first_token_seconds_count") == 20
        assert m.value("llama_proxy_open_streams") == 0
        assert m.value("llamacpp:prompt_tokens_total") == 42  # the model server's, once
    finally:
        code = await asyncio.to_thread(app.stop)
    assert code == 0


async def test_after_real_traffic_one_scrape_shows_it_and_the_models_own(
        make_proxy: ProxyFactory, llama: Any) -> None:
    """Through the real llama-server: the counts sent, the tokens it reported, and its own
    llamacpp:* metrics, in one scrape."""
    import openai

    proxy = await make_proxy(upstreams=[llama.url], upstream_api_key=llama.key, limit_rpm=2)
    client = openai.AsyncOpenAI(base_url=proxy.base_url + "/v1", max_retries=0,
                                api_key=token_for(proxy, "erin"))
    model = (await client.models.list()).data[0].id  # a request, not a model request
    prompt, completion = 0, 0
    answer = await client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": "Say hi."}], max_tokens=8)
    assert answer.usage is not None
    prompt, completion = answer.usage.prompt_tokens, answer.usage.completion_tokens
    stream = await client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": "Count to three."}], max_tokens=8,
        stream=True, stream_options={"include_usage": True})
    async for chunk in stream:
        if chunk.usage is not None:
            prompt += chunk.usage.prompt_tokens
            completion += chunk.usage.completion_tokens
    with pytest.raises(openai.RateLimitError):  # the third model request in a minute
        await client.chat.completions.create(
            model=model, messages=[{"role": "user", "content": "Again."}], max_tokens=8)
    await client.close()

    m = await scrape(proxy)
    assert m.value("llama_proxy_requests_total", route=ROUTE, status="2xx", model=model,
                   credential="jwt") == 2
    assert m.value("llama_proxy_requests_total", route=ROUTE, status="4xx") == 1
    assert m.value("llama_proxy_requests_total", route="/v1/models", status="2xx") == 1
    assert m.value("llama_proxy_rate_limited_total", window="rpm") == 1
    assert m.value("llama_proxy_tokens_total", model=model, type="prompt") == prompt
    assert m.value("llama_proxy_tokens_total", model=model, type="completion") == completion
    assert m.value("llama_proxy_time_to_first_token_seconds_count", route=ROUTE,
                   model=model) == 1
    # llama-server's own view of the same traffic, labelled with the backend it came from.
    assert m.value("llamacpp:tokens_predicted_total", backend="upstream-1") >= completion
    assert m.value("llamacpp:prompt_tokens_total", backend="upstream-1") >= 1
    assert m.value("llama_proxy_upstream_scrape_errors_total") == 0


@pytest.mark.parametrize("ask", [True, False])
async def test_streams_ask_for_usage_unless_told_not_to(make_proxy: ProxyFactory, fake: Fake,
                                                        ask: bool) -> None:
    """By default a stream is asked for its usage (and the event removed for the client); an
    upstream that rejects the field gets the body as the client sent it."""
    proxy = await make_proxy(upstreams=[fake.url], upstream_stream_usage=ask)
    auth = {"Authorization": f"Bearer {token_for(proxy)}"}
    async with aiohttp.ClientSession() as http:
        async with http.post(proxy.base_url + CHAT, json=body(stream=True, chunks=2),
                             headers=auth) as resp:
            text = await resp.text()
    sent = fake.record.bodies[-1]
    assert ("stream_options" in sent) is ask
    assert '"usage"' not in text  # the client did not ask for it
    m = await scrape(proxy)
    completion = m.value("llama_proxy_tokens_total", type="completion")
    assert completion == 2 if ask else completion >= 2  # reported; else about one an event
