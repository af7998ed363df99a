"""Every model API end to end through the real llama-server and bundled model, with the clients
people use: the official `anthropic` SDK on the Messages API and the `openai` SDK's Responses
API (whole and streamed, with a JWT and with an API key), llama-server's own tokenize, template
and infill routes, each charged what its API reports, and each stream freeing the model's slot
when its client leaves."""

from __future__ import annotations

import asyncio
import logging
import socket
import time
from typing import Any

import aiohttp
import anthropic
import openai
import orjson
import pytest

from proxy.server import Running
from tests.conftest import ADMIN_HEADERS, Llama, ProxyFactory, token_for
from tests.kit.helpers import eventually
from tests.kit.limits import charged

ASK = "Name three colours."


async def api_key(proxy: Running, name: str = "sdk") -> str:
    async with aiohttp.ClientSession(headers=ADMIN_HEADERS) as admin:
        async with admin.post(proxy.base_url + "/admin/keys", json={"name": name}) as r:
            assert r.status == 201
            return str((await r.json())["key"])


def anthropic_client(proxy: Running, *, jwt: str | None = None, key: str | None = None,
                     retries: int = 0) -> anthropic.AsyncAnthropic:
    """A JWT as Claude Code sends one (Authorization: Bearer), an API key as x-api-key."""
    return anthropic.AsyncAnthropic(base_url=proxy.base_url, auth_token=jwt, api_key=key,
                                    max_retries=retries)


@pytest.mark.parametrize("credential", ["jwt", "api_key"])
async def test_the_anthropic_sdk_answers_and_streams(model_proxy: Running, llama: Llama,
                                                     credential: str) -> None:
    if credential == "jwt":
        client = anthropic_client(model_proxy, jwt=token_for(model_proxy))
    else:
        client = anthropic_client(model_proxy, key=await api_key(model_proxy))
    async with client:
        whole = await client.messages.create(
            model=llama.model, max_tokens=16, messages=[{"role": "user", "content": ASK}])
        assert whole.content[0].type == "text" and whole.content[0].text
        assert whole.model == llama.model  # the id the client knows, never a file path
        assert whole._request_id  # the `request-id` header Anthropic's SDKs read
        assert whole.usage.output_tokens > 0
        pieces = []
        async with client.messages.stream(
                model=llama.model, max_tokens=24,
                messages=[{"role": "user", "content": ASK}]) as stream:
            async for text in stream.text_stream:
                pieces.append(text)
            final = await stream.get_final_message()
        assert len(pieces) > 3 and "".join(pieces) == final.content[0].text
        # A token per delta, and perhaps the end-of-turn one that shows no text.
        assert len(pieces) <= final.usage.output_tokens <= len(pieces) + 1
        counted = await client.messages.count_tokens(
            model=llama.model, messages=[{"role": "user", "content": ASK}])
        assert counted.input_tokens > 5


async def test_the_anthropic_sdk_sees_its_own_errors(make_proxy: ProxyFactory, llama: Llama,
                                                     redis_url: str) -> None:
    proxy = await make_proxy(upstreams=[llama.url], upstream_api_key=llama.key, limit_rpm=1)
    ask: dict[str, Any] = {"model": llama.model, "max_tokens": 4,
                           "messages": [{"role": "user", "content": "Hi"}]}
    async with anthropic_client(proxy, key="not-a-key") as client:
        with pytest.raises(anthropic.AuthenticationError) as refused:
            await client.messages.create(**ask)
    assert refused.value.body["error"]["type"] == "authentication_error"  # type: ignore[index]
    async with anthropic_client(proxy, jwt=token_for(proxy, "limited")) as client:
        await client.messages.create(**ask)
        with pytest.raises(anthropic.RateLimitError) as limited:
            await client.messages.create(**ask)
    headers = limited.value.response.headers
    # What the SDK's retry reads: how long to wait, in the header it honours.
    assert 1 <= int(headers["retry-after"]) <= 60
    assert headers["anthropic-ratelimit-requests-remaining"] == "0"
    assert limited.value.body["error"]["type"] == "rate_limit_error"  # type: ignore[index]


@pytest.mark.parametrize("credential", ["jwt", "api_key"])
async def test_the_openai_responses_api_answers_and_streams(model_proxy: Running, llama: Llama,
                                                            credential: str) -> None:
    key = token_for(model_proxy) if credential == "jwt" else await api_key(model_proxy)
    async with openai.AsyncOpenAI(base_url=model_proxy.base_url + "/v1", api_key=key,
                                  max_retries=0) as client:
        whole = await client.responses.create(model=llama.model, input=ASK,
                                              max_output_tokens=16)
        assert whole.output_text and whole.usage is not None and whole.usage.output_tokens > 0
        assert whole.model == llama.model
        deltas, completed = [], None
        async with await client.responses.create(model=llama.model, input=ASK,
                                                 max_output_tokens=24, stream=True) as stream:
            async for event in stream:
                if event.type == "response.output_text.delta":
                    deltas.append(event.delta)
                elif event.type == "response.completed":
                    completed = event.response
        assert len(deltas) > 3 and completed is not None
        assert completed.usage is not None
        assert len(deltas) <= completed.usage.output_tokens <= len(deltas) + 1
        with pytest.raises(openai.BadRequestError) as refused:
            await client.responses.create(model=llama.model, input=ASK,
                                          previous_response_id="resp_earlier")
    assert refused.value.body["param"] == "previous_response_id"  # type: ignore[index]


async def test_a_tool_call_request_is_answered_on_every_api(model_proxy: Running,
                                                            llama: Llama) -> None:
    """The bundled model is too small to call tools reliably; what matters here is that a
    request carrying them goes through and gets a well-formed answer on each API."""
    schema = {"type": "object", "properties": {"city": {"type": "string"}},
              "required": ["city"]}
    ask = "What is the weather in Paris?"
    token = token_for(model_proxy)
    async with anthropic_client(model_proxy, jwt=token) as claude:
        message = await claude.messages.create(
            model=llama.model, max_tokens=24, messages=[{"role": "user", "content": ask}],
            tools=[{"name": "get_weather", "description": "Weather now",
                    "input_schema": schema}])
    assert message.content and message.stop_reason in ("end_turn", "max_tokens", "tool_use")
    async with openai.AsyncOpenAI(base_url=model_proxy.base_url + "/v1", api_key=token,
                                  max_retries=0) as client:
        response = await client.responses.create(
            model=llama.model, input=ask, max_output_tokens=24,
            tools=[{"type": "function", "name": "get_weather", "parameters": schema,
                    "strict": False}])
        assert response.status == "completed" and response.output
        chat = await client.chat.completions.create(
            model=llama.model, max_tokens=24, messages=[{"role": "user", "content": ask}],
            tools=[{"type": "function", "function": {"name": "get_weather",
                                                     "parameters": schema}}])
        assert chat.choices[0].finish_reason in ("stop", "length", "tool_calls")


async def test_tokenize_round_trip_and_the_chat_template(model_proxy: Running) -> None:
    headers = {"x-api-key": token_for(model_proxy)}
    async with aiohttp.ClientSession(headers=headers) as http:
        async with http.post(model_proxy.base_url + "/tokenize",
                             json={"content": "Hello world"}) as resp:
            assert resp.status == 200
            tokens = (await resp.json())["tokens"]
        async with http.post(model_proxy.base_url + "/detokenize",
                             json={"tokens": tokens}) as resp:
            assert (await resp.json())["content"].strip() == "Hello world"
        async with http.post(model_proxy.base_url + "/apply-template", json={
                "messages": [{"role": "user", "content": "Hi there"}]}) as resp:
            assert "Hi there" in (await resp.json())["prompt"]
        async with http.post(model_proxy.base_url + "/tokenize", json={"content": "x"},
                             headers={"x-api-key": "wrong"}) as resp:
            assert resp.status == 401


async def test_infill_on_a_model_without_fim_tokens_is_a_clean_501(model_proxy: Running
                                                                   ) -> None:
    """The request as llama.vscode sends it; the bundled model has no FIM tokens."""
    body = {"input_prefix": "def add(a, b):\n    return ", "input_suffix": "\n",
            "input_extra": [{"filename": "util.py", "text": "import math\n"}],
            "prompt": "", "n_predict": 16, "n_indent": 4, "top_k": 40, "top_p": 0.99,
            "stream": False, "samplers": ["top_k", "top_p", "infill"], "cache_prompt": True,
            "t_max_prompt_ms": 500, "t_max_predict_ms": 1000}
    async with aiohttp.ClientSession() as http:
        async with http.post(model_proxy.base_url + "/infill", json=body, headers={
                "Authorization": f"Bearer {token_for(model_proxy)}"}) as resp:
            assert resp.status == 501
            error = (await resp.json())["error"]
    assert error["type"] == "not_supported_error" and "infill" in error["message"].lower()


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "stream"])
async def test_each_api_is_charged_what_the_model_reports(
        make_proxy: ProxyFactory, llama: Llama, redis_url: str, stream: bool) -> None:
    proxy = await make_proxy(upstreams=[llama.url], upstream_api_key=llama.key,
                             limit_tpm=1_000_000)
    ask = [{"role": "user", "content": ASK}]
    async with aiohttp.ClientSession() as http:
        for path, body in (("/v1/messages", {"messages": ask, "max_tokens": 12}),
                           ("/v1/responses", {"input": ASK, "max_output_tokens": 12})):
            who = f"charged-{path.rsplit('/', 1)[-1]}-{stream}"
            async with http.post(proxy.base_url + path, json={
                    **body, "model": llama.model, "stream": stream},
                    headers={"x-api-key": token_for(proxy, who)}) as resp:
                assert resp.status == 200
                raw = await resp.read()
            usage = reported_usage(raw, stream)
            await eventually(lambda who=who, usage=usage: charged(redis_url, who) == usage,
                             3, f"{path} charged its reported usage ({usage})")


@pytest.mark.parametrize("path,body", [
    ("/v1/messages", {"messages": [{"role": "user", "content": ASK}], "max_tokens": 24}),
    ("/v1/responses", {"input": ASK, "max_output_tokens": 24}),
])
async def test_an_assembled_whole_answer_is_the_model_servers_own(
        model_proxy: Running, llama: Llama, path: str, body: dict[str, Any]) -> None:
    """At temperature 0 the answer put together from the stream equals the one llama-server
    writes whole, but for what differs between any two requests (ids, times, the cache)."""
    sent = {**body, "model": llama.model, "temperature": 0, "seed": 1}
    async with aiohttp.ClientSession() as http:
        async with http.post(llama.url + path, json=sent,
                             headers={"Authorization": f"Bearer {llama.key}"}) as resp:
            own = await resp.json()
        async with http.post(model_proxy.base_url + path, json=sent,
                             headers={"x-api-key": token_for(model_proxy)}) as resp:
            assert resp.status == 200
            assembled = await resp.json()
    assert comparable(assembled) == comparable(own)


def comparable(answer: dict[str, Any]) -> dict[str, Any]:
    """An answer without ids, times and cache counters (prompt totals stay)."""
    out = {k: v for k, v in answer.items()
           if k not in ("id", "created_at", "completed_at", "timings")}
    usage = dict(out.pop("usage"))
    prompt = sum(usage.pop(k, 0) for k in ("input_tokens", "cache_read_input_tokens"))
    usage.pop("input_tokens_details", None)
    out["usage"] = {**usage, "prompt": prompt}
    for item in out.get("output") or ():  # Responses: ids of the output items
        item.pop("id", None)
    return out


def reported_usage(raw: bytes, stream: bool) -> int:
    """Prompt plus output tokens as the API reported them (Anthropic's prompt: input plus
    cached input)."""
    if not stream:
        usage = orjson.loads(raw)["usage"]
    else:
        datas = [orjson.loads(line[6:]) for line in raw.split(b"\n")
                 if line.startswith(b"data: ")]
        usage = {}
        for data in datas:
            inner = data.get("message") or data.get("response") or data
            usage.update(inner.get("usage") or {})
    return sum(usage.get(k, 0) for k in ("input_tokens", "cache_read_input_tokens",
                                         "output_tokens"))


@pytest.mark.parametrize("path,body", [
    # llama-server drops ignore_eos on /v1/messages: a prompt that makes 500 tokens at
    # temperature 0 (about 5 s) instead.
    ("/v1/messages", {"messages": [{"role": "user", "content": "Write a long essay about the "
                                                                "history of Rome."}],
                      "max_tokens": 500, "temperature": 0}),
    ("/v1/responses", {"input": "Tell me a long story.", "max_output_tokens": 500,
                       "ignore_eos": True}),
])
@pytest.mark.parametrize("stream", [False, True], ids=["whole", "stream"])
async def test_a_client_leaving_frees_the_slot_on_each_api(
        make_proxy: ProxyFactory, llama: Llama, caplog: pytest.LogCaptureFixture,
        path: str, body: dict[str, Any], stream: bool) -> None:
    """Whole answers too: llama-server would finish a whole answer nobody waits for, so it
    is asked for a stream the appliance assembles."""
    caplog.set_level(logging.INFO, logger="proxy.access")
    proxy = await make_proxy(upstreams=[llama.url], upstream_api_key=llama.key,
                             admission_slots=1)
    payload = orjson.dumps({**body, "model": llama.model, "stream": stream})
    head = (f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            f"x-api-key: {token_for(proxy)}\r\nContent-Length: {len(payload)}\r\n\r\n")
    port = int(proxy.base_url.rsplit(":", 1)[1])
    sock = socket.create_connection(("127.0.0.1", port))
    sock.sendall(head.encode() + payload)
    await eventually(lambda: busy_slots(llama, 1), 5, "the model at work")
    await asyncio.sleep(0.3)  # some tokens streamed
    sock.close()
    left = time.monotonic()
    await eventually(lambda: busy_slots(llama, 0), 3, "llama-server to free the slot")
    assert time.monotonic() - left < 1.0
    await eventually(lambda: any(getattr(r, "access", {}).get("status") == 499
                                 and r.access["path"] == path for r in caplog.records),
                     3, "the 499 access line")


async def busy_slots(llama: Llama, count: int) -> bool:
    async with aiohttp.ClientSession() as http:
        async with http.get(f"{llama.url}/slots",
                            headers={"Authorization": f"Bearer {llama.key}"}) as answer:
            return sum(1 for s in await answer.json() if s.get("is_processing")) == count


async def test_a_trimmed_claude_code_request_streams_from_the_real_model(
        model_proxy: Running, llama: Llama) -> None:
    """What Claude Code sends, cut to fit the bundled model's context: system blocks with
    cache_control, tools, thinking, metadata, the beta header, a stream."""
    async with anthropic_client(model_proxy, jwt=token_for(model_proxy)) as client:
        async with client.messages.stream(
                model=llama.model, max_tokens=2048,
                system=[{"type": "text", "text": "You are a coding agent. Be brief.",
                         "cache_control": {"type": "ephemeral"}}],
                messages=[{"role": "user", "content": [
                    {"type": "text", "text": "Which file holds the config?",
                     "cache_control": {"type": "ephemeral"}}]}],
                tools=[{"name": "Read", "description": "Read a file",
                        "input_schema": {"type": "object", "properties": {
                            "file_path": {"type": "string"}}, "required": ["file_path"]}}],
                thinking={"type": "enabled", "budget_tokens": 1024},
                metadata={"user_id": "user_trimmed"},
                extra_headers={"anthropic-beta": "interleaved-thinking-2025-05-14,"
                                                 "fine-grained-tool-streaming-2025-05-14"},
        ) as stream:
            events = [event.type async for event in stream]
            final = await stream.get_final_message()
    assert events[0] == "message_start" and "message_stop" in events
    assert final.content and final.usage.output_tokens > 0
    assert final.model == llama.model


async def test_a_messages_answer_that_starts_inside_a_character_is_still_whole(
        make_proxy: ProxyFactory, llama: Llama, redis_url: str) -> None:
    """At temperature 0 the bundled model answers this prompt starting with part of an emoji;
    llama-server's stream then leaves out message_start. The SDK still gets a message with its
    id and model, streamed and whole, and the prompt is still charged."""
    proxy = await make_proxy(upstreams=[llama.url], upstream_api_key=llama.key,
                             limit_tpm=1_000_000)
    ask: dict[str, Any] = {
        "model": llama.model, "max_tokens": 12, "extra_body": {"temperature": 0},
        "messages": [{"role": "user", "content": "\U0001F600" * 50
                      + " Write a long essay about the history of Rome."}]}
    async with anthropic_client(proxy, jwt=token_for(proxy, "emoji")) as client:
        whole = await client.messages.create(**ask)
        async with client.messages.stream(**ask) as stream:
            final = await stream.get_final_message()
    for message in (whole, final):
        assert message.id and message.type == "message" and message.model == llama.model
        assert message.usage.output_tokens > 0 and message.content
    # Each charged its prompt as estimated (the model's own count never came: 50 emoji are
    # 200 bytes at least, 50 tokens by the estimate) besides the 12 tokens it made.
    await eventually(lambda: charged(redis_url, "emoji") >= 2 * (50 + 12), 3,
                     "the prompt charged")
