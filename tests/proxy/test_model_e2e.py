"""End to end through the real llama-server and bundled model, with the official openai client."""

from __future__ import annotations

import asyncio
import socket
import time

import aiohttp
import openai
import orjson
import pytest

from proxy.server import Running
from tests.conftest import Llama, ProxyFactory, token_for
from tests.kit.helpers import eventually

MESSAGES = [{"role": "user", "content": "Name three colours."}]


def client_for(proxy: Running) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=proxy.base_url + "/v1", api_key=token_for(proxy),
                              max_retries=0)


def auth(proxy: Running) -> dict[str, str]:
    return {"Authorization": f"Bearer {token_for(proxy)}"}


async def test_chat_completion(model_proxy: Running, llama: Llama) -> None:
    async with client_for(model_proxy) as client:
        reply = await client.chat.completions.create(model=llama.model, messages=MESSAGES,
                                                     max_tokens=16)
    assert reply.choices[0].message.content
    assert reply.usage is not None and reply.usage.completion_tokens > 0


async def test_streamed_chat_arrives_token_by_token(model_proxy: Running, llama: Llama) -> None:
    async with client_for(model_proxy) as client:
        # ignore_eos: exactly 24 tokens, however briefly the model would have answered.
        stream = await client.chat.completions.create(model=llama.model, messages=MESSAGES,
                                                      max_tokens=24, stream=True,
                                                      extra_body={"ignore_eos": True})
        pieces = [c.choices[0].delta.content async for c in stream
                  if c.choices and c.choices[0].delta.content]
    assert len(pieces) > 5  # many chunks, not one buffered blob
    assert "".join(pieces).strip()


async def test_text_completion_and_models(model_proxy: Running, llama: Llama) -> None:
    async with client_for(model_proxy) as client:
        models = await client.models.list()
        done = await client.completions.create(model=llama.model, prompt="The sky is",
                                               max_tokens=8)
    assert [m.id for m in models.data] == [llama.model]
    assert done.choices[0].text


async def test_embeddings_without_support_is_a_clean_error(model_proxy: Running, llama: Llama
                                                           ) -> None:
    async with client_for(model_proxy) as client:
        with pytest.raises(openai.APIStatusError) as err:
            await client.embeddings.create(model=llama.model, input="hello")
    assert err.value.status_code in (400, 501)
    body = err.value.body
    assert isinstance(body, dict) and body["message"]  # the client unwraps {"error": ...}


async def test_alternating_streamed_and_whole_requests_never_fail(
    model_proxy: Running, llama: Llama
) -> None:
    # llama-server drops the connection right after a stream despite keep-alive; a pooled
    # connection reused at once fails. Back-to-back requests must all succeed anyway.
    url = model_proxy.base_url + "/v1/chat/completions"
    async with aiohttp.ClientSession(headers=auth(model_proxy)) as http:
        for i in range(30):
            body = {"model": llama.model, "messages": MESSAGES, "max_tokens": 2,
                    "stream": i % 2 == 0}
            async with http.post(url, json=body) as resp:
                assert resp.status == 200, await resp.text()
                await resp.read()
    async with client_for(model_proxy) as client:
        for _ in range(3):
            stream = await client.chat.completions.create(
                model=llama.model, messages=MESSAGES, max_tokens=3, stream=True)
            assert [c async for c in stream]
            reply = await client.chat.completions.create(
                model=llama.model, messages=MESSAGES, max_tokens=3)
            assert reply.choices


async def busy_slots(llama: Llama, http: aiohttp.ClientSession) -> int:
    async with http.get(llama.url + "/slots",
                        headers={"Authorization": f"Bearer {llama.key}"}) as resp:
        slots = await resp.json()
    return sum(1 for s in slots if s.get("is_processing"))


async def test_client_leaving_mid_stream_frees_the_slot(model_proxy: Running, llama: Llama
                                                        ) -> None:
    body = {"model": llama.model, "prompt": "Once upon a time", "max_tokens": 1500,
            "ignore_eos": True, "stream": True}
    async with aiohttp.ClientSession() as http:
        resp = await http.post(model_proxy.base_url + "/v1/completions", json=body,
                               headers=auth(model_proxy))
        for _ in range(3):
            assert await resp.content.readline()
        assert await busy_slots(llama, http) == 1
        resp.close()
        # llama-server frees a slot within about half a second of the connection closing.
        for _ in range(30):
            await asyncio.sleep(0.05)
            if not await busy_slots(llama, http):
                break
        assert await busy_slots(llama, http) == 0


async def test_a_client_that_stops_reading_gives_the_model_back(
    make_proxy: ProxyFactory, llama: Llama, caplog: pytest.LogCaptureFixture
) -> None:
    # A small send buffer fills after a few dozen tokens, so the cut comes soon even when the
    # model is slow (a busy machine); what is tested is what happens after it.
    proxy = await make_proxy(upstreams=[llama.url], upstream_api_key=llama.key,
                             admission_slots=1, client_write_timeout=1.0,
                             client_send_buffer=4096)
    port = int(proxy.base_url.rsplit(":", 1)[1])
    stalled = socket.socket()
    stalled.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # and never reads
    stalled.setblocking(False)
    await asyncio.get_running_loop().sock_connect(stalled, ("127.0.0.1", port))
    body = orjson.dumps({"model": llama.model, "prompt": "Once upon a time", "stream": True,
                         "max_tokens": 4000, "ignore_eos": True})
    stalled.send(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                 b"Authorization: Bearer " + token_for(proxy).encode() +
                 b"\r\nContent-Length: %d\r\n\r\n" % len(body) + body)
    async with aiohttp.ClientSession() as http:
        await eventually(lambda: busy_slots(llama, http), 10, "the model to be generating")
        # Its buffers fill at the model's pace (seconds, longer on a loaded machine), then the
        # write deadline cuts it; the slot must come back at once, not when the model is done.
        await eventually(lambda: any("stopped reading" in r.getMessage()
                                     for r in caplog.records), 60, "the stream to be cut")
        cut = time.monotonic()
        await eventually(lambda: _idle(llama, http), 5, "llama-server to free the slot")
        freed_after = time.monotonic() - cut
        reply = await client_for(proxy).completions.create(model=llama.model, prompt="Hi",
                                                           max_tokens=2)
        assert reply.choices
    assert freed_after < 5, freed_after
    stalled.close()


async def _idle(llama: Llama, http: aiohttp.ClientSession) -> bool:
    return await busy_slots(llama, http) == 0
