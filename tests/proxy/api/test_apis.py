"""Every model API behind the same door, against the fast fake model server: the guard covers
every route but the public few, Anthropic's API answers refusals and rate-limit headers in its
own shape, each API's budget is reserved from its own cap and settled from its own usage,
cheap APIs take no slot, and what a client sends (tools, formats) reaches the model untouched."""

from __future__ import annotations

import asyncio
from typing import Any

import aiohttp
import orjson
import pytest

from proxy.access.authn import PUBLIC, PUBLIC_PREFIXES
from proxy.server import Running
from proxy.upstream.apis import APIS
from proxy.upstream.pool import CATALOG
from tests.conftest import ADMIN_HEADERS, Fake, ProxyFactory, token_for
from tests.kit.helpers import eventually
from tests.kit.limits import charged

ANTHROPIC_TYPES = {"authentication_error", "permission_error", "not_found_error",
                   "request_too_large", "rate_limit_error", "overloaded_error", "api_error",
                   "invalid_request_error"}
MESSAGES = {"model": "fake-model", "max_tokens": 64,
            "messages": [{"role": "user", "content": "hi"}]}
RESPONSES = {"model": "fake-model", "max_output_tokens": 64, "input": "hi"}


def anthropic_error(body: dict[str, Any], kind: str) -> None:
    assert body["type"] == "error" and body["error"]["type"] == kind, body
    assert kind in ANTHROPIC_TYPES and body["error"]["message"]


async def test_every_route_but_the_public_ones_needs_a_credential(
        make_proxy: ProxyFactory, fake: Fake) -> None:
    """Read from the router itself, so a route added later is covered without a new test."""
    proxy = await make_proxy(upstreams=[fake.url], auth_fail_limit=1000)
    routes = {(r.method, r.resource.canonical) for r in proxy.app.router.routes()
              if r.resource is not None and r.method != "HEAD"}
    guarded = [(m, p) for m, p in routes
               if p not in PUBLIC and not p.startswith(PUBLIC_PREFIXES)]
    # The public few, spelled out: a route that slipped into PUBLIC fails here.
    assert PUBLIC == {"/", "/health", "/ready", "/metrics", "/openapi.json"}
    assert PUBLIC_PREFIXES == ("/static/",)
    assert {("POST", path) for path in APIS} <= set(guarded)
    async with aiohttp.ClientSession() as http:
        for method, path in sorted(guarded):
            url = proxy.base_url + path.replace("{", "").replace("}", "")
            async with http.request(method, url, json={}) as resp:
                assert resp.status == 401, (method, path, resp.status)
        for path in ("/", "/health", "/ready", "/openapi.json"):
            async with http.get(proxy.base_url + path) as resp:
                assert resp.status == 200, path
        async with http.get(proxy.base_url + "/no/such/path") as resp:
            assert resp.status == 404  # no route: nothing to guard


async def test_refusals_on_the_messages_api_are_anthropic_shaped(
        make_proxy: ProxyFactory, fake: Fake) -> None:
    proxy = await make_proxy(upstreams=[fake.url], limit_rpm=2, max_body_bytes=4096)
    url = proxy.base_url + "/v1/messages"
    token = token_for(proxy, "ann")
    async with aiohttp.ClientSession() as http:
        async with http.post(url, json=MESSAGES) as resp:
            assert resp.status == 401
            anthropic_error(await resp.json(), "authentication_error")
        async with http.post(url, json=MESSAGES, headers={"x-api-key": "nope"}) as resp:
            assert resp.status == 401
            anthropic_error(await resp.json(), "authentication_error")
        narrow = token_for(proxy, "ann", models=["other-model"])
        async with http.post(url, json=MESSAGES, headers={"x-api-key": narrow}) as resp:
            assert resp.status == 403
            anthropic_error(await resp.json(), "permission_error")
        async with http.post(url, data=b"x" * 8192, headers={
                "x-api-key": token, "Content-Type": "application/json"}) as resp:
            assert resp.status == 413
            anthropic_error(await resp.json(), "request_too_large")
        async with http.post(url, data=b"{", headers={
                "x-api-key": token, "Content-Type": "application/json"}) as resp:
            assert resp.status == 400
            anthropic_error(await resp.json(), "invalid_request_error")
        async with http.post(proxy.base_url + "/v1/messages/nope", json={},
                             headers={"x-api-key": token}) as resp:
            assert resp.status == 404
            anthropic_error(await resp.json(), "not_found_error")
        statuses = []
        for _ in range(3):
            async with http.post(url, json=MESSAGES, headers={"x-api-key": token}) as resp:
                statuses.append(resp.status)
                last, headers = await resp.json(), resp.headers
        assert statuses == [200, 200, 429]
        anthropic_error(last, "rate_limit_error")
        assert int(headers["retry-after"]) >= 1
        assert headers["anthropic-ratelimit-requests-limit"] == "2"
        assert headers["anthropic-ratelimit-requests-remaining"] == "0"
        assert headers["anthropic-ratelimit-requests-reset"].endswith("Z")
        assert "x-ratelimit-limit-requests" not in headers
        # Everything else stays in OpenAI's shape and names.
        async with http.post(proxy.base_url + "/v1/responses", json=RESPONSES,
                             headers={"x-api-key": token}) as resp:
            assert resp.status == 429
            assert (await resp.json())["error"]["type"] == "rate_limit_exceeded"
            assert resp.headers["x-ratelimit-limit-requests"] == "2"


async def test_a_refusal_after_the_keep_alives_began_ends_the_stream_in_its_apis_shape(
        make_proxy: ProxyFactory, fake: Fake) -> None:
    """The model server answers an error after the stream's headers went out (keep-alives
    while it waited): an `event: error` in Anthropic's shape, a bare data event in OpenAI's."""
    proxy = await make_proxy(upstreams=[fake.url], auth="disabled", sse_keepalive=0.05)
    slow = {"ttfb": 0.4, "status": 400}
    async with aiohttp.ClientSession() as http:
        async with http.post(proxy.base_url + "/v1/messages",
                             json={**MESSAGES, "stream": True, "fake": slow}) as resp:
            assert resp.status == 200  # sent with the first keep-alive
            text = (await resp.read()).decode()
        last = text.strip().split("\n\n")[-1].split("\n")
        assert last[0] == "event: error", text
        anthropic_error(orjson.loads(last[1].removeprefix("data: ")), "invalid_request_error")
        async with http.post(proxy.base_url + "/v1/responses",
                             json={**RESPONSES, "stream": True, "fake": slow}) as resp:
            text = (await resp.read()).decode()
        last = text.strip().split("\n\n")[-1]
        assert orjson.loads(last.removeprefix("data: "))["error"]["message"] == "fake refusal"


async def test_a_model_server_error_is_anthropic_shaped_whole_and_mid_stream(
        make_proxy: ProxyFactory, fake: Fake) -> None:
    proxy = await make_proxy(upstreams=[fake.url], auth="disabled")
    url = proxy.base_url + "/v1/messages"
    async with aiohttp.ClientSession() as http:
        async with http.post(url, json={**MESSAGES, "fake": {"status": 503}}) as resp:
            assert resp.status == 503 and resp.headers["Retry-After"]
            anthropic_error(await resp.json(), "overloaded_error")
        async with http.post(url, json={**MESSAGES, "stream": True,
                                        "fake": {"chunks": 5, "break_after": 2}}) as resp:
            assert resp.status == 200
            text = (await resp.read()).decode()
    last = text.strip().split("\n\n")[-1].split("\n")
    assert last[0] == "event: error", text
    anthropic_error(orjson.loads(last[1].removeprefix("data: ")), "api_error")


@pytest.mark.parametrize("path,body,cap,prompt,reported", [
    ("/v1/messages", MESSAGES, "max_tokens", 3, 3 + 2),  # prompt 1 + 2 cached, 2 out
    ("/v1/responses", RESPONSES, "max_output_tokens", 3, 3 + 2),
])
@pytest.mark.parametrize("stream", [False, True], ids=["whole", "stream"])
async def test_each_api_is_charged_its_own_usage(
        make_proxy: ProxyFactory, fake: Fake, redis_url: str, path: str, body: dict[str, Any],
        cap: str, prompt: int, reported: int, stream: bool) -> None:
    proxy = await make_proxy(upstreams=[fake.url], limit_tpm=100_000)
    who = f"usage-{path.rsplit('/', 1)[-1]}-{stream}"
    sent = {**body, "stream": stream, "fake": {"chunks": 2}}
    del sent[cap]  # no cap asked: the default one is set, in this API's own field
    async with aiohttp.ClientSession() as http:
        async with http.post(proxy.base_url + path, json=sent,
                             headers={"x-api-key": token_for(proxy, who)}) as resp:
            assert resp.status == 200
            await resp.read()
    assert fake.record.bodies[-1][cap] == proxy.settings.limit_default_max_tokens
    assert "stream_options" not in fake.record.bodies[-1]  # OpenAI's, not this API's
    await eventually(lambda: charged(redis_url, who) == reported, 3, "settled from its usage")


async def test_a_cap_above_the_budget_is_lowered_in_the_apis_own_field(
        make_proxy: ProxyFactory, fake: Fake) -> None:
    proxy = await make_proxy(upstreams=[fake.url], limit_tpm=500)
    async with aiohttp.ClientSession() as http:
        for path, body, cap in (("/v1/messages", MESSAGES, "max_tokens"),
                                ("/v1/responses", RESPONSES, "max_output_tokens"),
                                ("/infill", {"input_prefix": "def f(", "input_suffix": ")"},
                                 "n_predict")):
            async with http.post(proxy.base_url + path, json={**body, cap: 100_000},
                                 headers={"x-api-key": token_for(proxy, path)}) as resp:
                assert resp.status == 200, await resp.text()
            assert 0 < fake.record.bodies[-1][cap] < 500


async def test_what_a_client_sends_reaches_the_model_untouched(fake_proxy: Running,
                                                               fake: Fake) -> None:
    """Tools, tool choice, structured output and Claude Code's request shape (system blocks
    with cache_control, thinking, metadata; its version and beta headers accepted) pass
    through on every API."""
    tools_anthropic = [{"name": "get_weather", "description": "Weather in a city",
                        "input_schema": {"type": "object", "properties": {
                            "city": {"type": "string"}}, "required": ["city"]}}]
    tools_openai = [{"type": "function", "name": "get_weather", "parameters": {
        "type": "object", "properties": {"city": {"type": "string"}}}}]
    claude_code = {**MESSAGES, "stream": True, "tools": tools_anthropic,
                   "tool_choice": {"type": "auto"},
                   "system": [{"type": "text", "text": "You are a coding agent.",
                               "cache_control": {"type": "ephemeral"}}],
                   "thinking": {"type": "enabled", "budget_tokens": 1024},
                   "metadata": {"user_id": "user_abc"}}
    sent = {
        "/v1/messages": claude_code,
        "/v1/responses": {**RESPONSES, "tools": tools_openai, "tool_choice": "auto",
                          "text": {"format": {"type": "json_object"}}},
        "/v1/chat/completions": {"model": "fake-model", "messages": [
            {"role": "user", "content": "hi"}], "tools": [{"type": "function", "function": {
                "name": "f", "parameters": {"type": "object"}}}], "tool_choice": "required",
            "response_format": {"type": "json_object"}, "max_tokens": 8},
    }
    headers = {"anthropic-version": "2023-06-01",
               "anthropic-beta": "prompt-caching-2024-07-31,interleaved-thinking-2025-05-14"}
    async with aiohttp.ClientSession() as http:
        for path, body in sent.items():
            async with http.post(fake_proxy.base_url + path, json=body,
                                 headers=headers) as resp:
                assert resp.status == 200, (path, await resp.text())
                await resp.read()
            arrived = fake.record.bodies[-1]
            assert {k: arrived[k] for k in body} == body, path


async def test_cheap_apis_answer_while_every_slot_is_busy(make_proxy: ProxyFactory,
                                                          fake: Fake) -> None:
    proxy = await make_proxy(upstreams=[fake.url], auth="disabled", admission_slots=1,
                             queue_timeout=30)
    async with aiohttp.ClientSession() as http:
        holder = asyncio.create_task(http.post(proxy.base_url + "/v1/messages", json={
            **MESSAGES, "fake": {"ttfb": 2}}))
        await eventually(lambda: fake.record.in_flight == 1, 5, "the slot taken")
        for path, body in (("/tokenize", {"content": "hi"}), ("/detokenize", {"tokens": [1]}),
                           ("/apply-template", {"messages": MESSAGES["messages"]}),
                           ("/v1/messages/count_tokens", MESSAGES),
                           ("/v1/responses/input_tokens", RESPONSES)):
            async with http.post(proxy.base_url + path, json=body) as resp:
                assert resp.status == 200, path
                assert (await resp.json())["echo"] == path
        queue = proxy.app[CATALOG].models[0].queue
        assert (await queue.stats())["free"] == 0  # the holder's, alone
        async with http.post(proxy.base_url + "/infill", json={
                "input_prefix": "a", "fake": {"ttfb": 0}}) as resp:  # generates: waits
            assert resp.status == 200 and fake.record.in_flight == 0
        (await holder).close()


async def test_responses_that_need_stored_state_are_refused_before_the_model(
        fake_proxy: Running, fake: Fake) -> None:
    async with aiohttp.ClientSession() as http:
        for extra, param in (({"previous_response_id": "resp_1"}, "previous_response_id"),
                             ({"store": True}, "store")):
            async with http.post(fake_proxy.base_url + "/v1/responses",
                                 json={**RESPONSES, **extra}) as resp:
                assert resp.status == 400
                error = (await resp.json())["error"]
                assert error["param"] == param and error["type"] == "invalid_request_error"
        async with http.post(fake_proxy.base_url + "/v1/responses",
                             json={**RESPONSES, "store": False}) as resp:
            assert resp.status == 200
    assert fake.record.requests == 1  # only the one that could be answered


async def test_a_browser_page_may_call_the_anthropic_and_root_apis(
        make_proxy: ProxyFactory, fake: Fake) -> None:
    proxy = await make_proxy(upstreams=[fake.url], cors_origins=["https://app.example"])
    async with aiohttp.ClientSession() as http:
        for path in ("/v1/messages", "/infill", "/tokenize"):
            async with http.options(proxy.base_url + path, headers={
                    "Origin": "https://app.example", "Access-Control-Request-Method": "POST",
                    "Access-Control-Request-Headers": "x-api-key, anthropic-version, "
                                                      "anthropic-beta, content-type"}) as resp:
                assert resp.status == 204, path
                allowed = resp.headers["Access-Control-Allow-Headers"]
                assert {"x-api-key", "anthropic-version", "anthropic-beta"} <= set(
                    allowed.split(", "))
        async with http.post(proxy.base_url + "/v1/messages", json=MESSAGES, headers={
                "Origin": "https://app.example",
                "x-api-key": token_for(proxy)}) as resp:
            assert resp.status == 200
            assert resp.headers["Access-Control-Allow-Origin"] == "https://app.example"
            assert "anthropic-ratelimit-requests-reset" in resp.headers[
                "Access-Control-Expose-Headers"]


async def test_an_api_key_works_on_every_api_until_it_is_revoked(
        make_proxy: ProxyFactory, fake: Fake) -> None:
    proxy = await make_proxy(upstreams=[fake.url], key_cache_ttl=0)
    base = proxy.base_url
    bodies = {"/v1/messages": MESSAGES, "/v1/responses": RESPONSES,
              "/v1/messages/count_tokens": MESSAGES, "/infill": {"input_prefix": "a"},
              "/tokenize": {"content": "a"}}
    async with aiohttp.ClientSession(headers=ADMIN_HEADERS) as admin, \
            aiohttp.ClientSession() as user:
        async with admin.post(base + "/admin/keys", json={"name": "editor"}) as r:
            created = await r.json()
        for header in ("x-api-key", "Authorization"):
            value = created["key"] if header == "x-api-key" else f"Bearer {created['key']}"
            for path, body in bodies.items():
                async with user.post(base + path, json=body, headers={header: value}) as r:
                    assert r.status == 200, (header, path)
        async with admin.delete(base + f"/admin/keys/{created['prefix']}") as r:
            assert r.status == 200
        for path, body in bodies.items():
            async with user.post(base + path, json=body,
                                 headers={"x-api-key": created["key"]}) as r:
                assert r.status == 401, path


async def test_a_foreign_cap_cannot_lift_generation_past_the_budget(
        make_proxy: ProxyFactory, fake: Fake) -> None:
    """llama-server honours `n_predict` on /v1/responses: it is lowered like the API's own
    cap. A cap field of another API is lowered too, and the API's own is set beside it."""
    proxy = await make_proxy(upstreams=[fake.url], limit_tpm=500)
    async with aiohttp.ClientSession() as http:
        for path, body, own in (("/v1/responses", RESPONSES, "max_output_tokens"),
                                ("/v1/messages", MESSAGES, "max_tokens")):
            sent = {k: v for k, v in body.items() if k != own}
            async with http.post(proxy.base_url + path, json={**sent, "n_predict": 100_000},
                                 headers={"x-api-key": token_for(proxy, path)}) as resp:
                assert resp.status == 200
            arrived = fake.record.bodies[-1]
            assert 0 < arrived["n_predict"] < 500, path
            if path == "/v1/messages":  # n_predict is not its cap: its own is set
                assert arrived["max_tokens"] == arrived["n_predict"]


async def test_token_counts_reserve_no_tokens(make_proxy: ProxyFactory, fake: Fake,
                                              redis_url: str) -> None:
    """A long conversation's count (Claude Code asks before each turn) is a request, not a
    prompt: it fits however small the token budget is, and costs none of it."""
    proxy = await make_proxy(upstreams=[fake.url], limit_tpm=100)
    long = {**MESSAGES, "messages": [{"role": "user", "content": "word " * 2000}]}
    async with aiohttp.ClientSession(headers={"x-api-key": token_for(proxy, "counter")}) as http:
        for path, body in (("/v1/messages/count_tokens", long), ("/tokenize", {
                "content": "word " * 2000}), ("/v1/responses/input_tokens", {
                "input": "word " * 2000})):
            async with http.post(proxy.base_url + path, json=body) as resp:
                assert resp.status == 200, path
    await eventually(lambda: charged(redis_url, "counter") == 0, 3, "settled at nothing")


async def test_the_anthropic_sdk_reads_a_stream_that_waited_behind_keep_alives(
        make_proxy: ProxyFactory, fake: Fake) -> None:
    """Keep-alive comments while the model is slow to start, then Anthropic's typed events:
    the SDK skips the comments and assembles the message."""
    import anthropic

    proxy = await make_proxy(upstreams=[fake.url], sse_keepalive=0.05)
    slow = {**MESSAGES, "stream": True, "fake": {"ttfb": 0.4, "chunks": 5}}
    async with aiohttp.ClientSession() as http:
        async with http.post(proxy.base_url + "/v1/messages", json=slow,
                             headers={"x-api-key": token_for(proxy)}) as resp:
            raw = await resp.read()
    assert raw.startswith(b": keep-alive\n\n") and b"event: message_start" in raw
    async with anthropic.AsyncAnthropic(base_url=proxy.base_url, api_key=token_for(proxy),
                                        max_retries=0) as client:
        async with client.messages.stream(
                model="fake-model", max_tokens=64, messages=[{"role": "user", "content": "hi"}],
                extra_body={"fake": {"ttfb": 0.4, "chunks": 5}}) as stream:
            text = "".join([piece async for piece in stream.text_stream])
            final = await stream.get_final_message()
    assert text == "".join(f"tok{i} " for i in range(5))
    assert final.usage.output_tokens == 5 and final.usage.cache_read_input_tokens == 2


async def test_the_messages_api_refuses_what_anthropic_refuses_before_the_model(
        fake_proxy: Running, fake: Fake) -> None:
    async with aiohttp.ClientSession() as http:
        for body, param in (({"model": "fake-model", "max_tokens": 5}, "messages"),
                            ({**MESSAGES, "messages": "hi"}, "messages"),
                            ({**MESSAGES, "max_tokens": -5}, "max_tokens"),
                            ({**MESSAGES, "max_tokens": "lots"}, "max_tokens"),
                            ({**MESSAGES, "max_tokens": None}, "max_tokens")):
            async with http.post(fake_proxy.base_url + "/v1/messages", json=body) as resp:
                assert resp.status == 400, body
                error = await resp.json()
            anthropic_error(error, "invalid_request_error")
            assert param in error["error"]["message"]
    assert fake.record.requests == 0


async def test_a_model_allow_list_is_checked_against_the_model_that_answers(
        make_proxy: ProxyFactory, fake: Fake) -> None:
    """One model served: any name reaches it, so a credential allowed only another model
    must not get it by asking for that other name."""
    proxy = await make_proxy(upstreams=[fake.url])
    elsewhere = token_for(proxy, "elsewhere", models=["gpt-4"])
    local = token_for(proxy, "local", models=["fake-model"])
    async with aiohttp.ClientSession() as http:
        for token, model, status in ((elsewhere, "gpt-4", 403), (elsewhere, "", 403),
                                     (local, "gpt-4", 200), (local, "fake-model", 200)):
            async with http.post(proxy.base_url + "/v1/messages", json={
                    **MESSAGES, "model": model}, headers={"x-api-key": token}) as resp:
                assert resp.status == status, (model, status)


async def test_cheap_apis_take_turns_in_a_lane_as_wide_as_the_model(
        make_proxy: ProxyFactory, fake: Fake) -> None:
    """A flood of huge token counts must not take all of llama-server's CPU: with one slot,
    two slow counts run one after the other, while generation still has its own slot."""
    proxy = await make_proxy(upstreams=[fake.url], auth="disabled", admission_slots=1,
                             queue_timeout=30)
    slow = {**MESSAGES, "fake": {"ttfb": 0.5}}
    async with aiohttp.ClientSession() as http:
        counts = [asyncio.create_task(http.post(proxy.base_url + "/v1/messages/count_tokens",
                                                json=slow)) for _ in range(2)]
        await eventually(lambda: fake.record.in_flight == 1, 5, "the first count")
        async with http.post(proxy.base_url + "/v1/messages", json=MESSAGES) as resp:
            assert resp.status == 200  # generation is not behind the counts
        assert fake.record.max_in_flight == 2  # that one, beside a single count
        for task in counts:
            (await task).close()
    assert fake.record.max_in_flight == 2
