"""Token budgets through the real model: reservations settle to the usage llama-server reports."""

from __future__ import annotations

import aiohttp
import orjson

from proxy.access.limits import completion_budget, prompt_tokens
from proxy.upstream.apis import APIS
from tests.conftest import Llama, ProxyFactory, token_for
from tests.kit.helpers import eventually
from tests.kit.limits import charged

MESSAGES = [{"role": "user", "content": "Tell me about the sea."}]


async def events(resp: aiohttp.ClientResponse) -> list[dict]:
    raw = await resp.read()
    return [orjson.loads(line[6:]) for line in raw.split(b"\n\n")
            if line.startswith(b"data: {")]


async def test_streamed_and_whole_answers_are_charged_their_real_usage(
    make_proxy: ProxyFactory, llama: Llama, redis_url: str
) -> None:
    proxy = await make_proxy(upstreams=[llama.url], upstream_api_key=llama.key,
                             limit_tpm=100_000)
    headers = {"Authorization": f"Bearer {token_for(proxy, 'sam')}"}
    base = {"model": llama.model, "messages": MESSAGES, "max_tokens": 20, "ignore_eos": True,
            "temperature": 0}
    url = proxy.base_url + "/v1/chat/completions"
    async with aiohttp.ClientSession(headers=headers) as http:
        # 1. The client asks for usage: it gets the usage event, and that is what is charged.
        asked = {**base, "stream": True, "stream_options": {"include_usage": True}}
        async with http.post(url, json=asked) as resp:
            assert resp.headers["x-ratelimit-limit-tokens"] == "100000"
            got = await events(resp)
        usage = next(e["usage"] for e in got if e.get("usage"))
        assert any(e.get("usage") and not e.get("choices") for e in got)  # what step 2 strips
        total = usage["total_tokens"]
        assert usage["completion_tokens"] == 20
        await eventually(lambda: charged(redis_url, "sam") == total, 2, "settlement")
        reserved = (prompt_tokens(orjson.dumps(asked))
                    + completion_budget(asked, APIS["/v1/chat/completions"], 512))
        assert reserved != total  # so the check below tells settlement from reservation

        # 2. The client did not ask: usage is requested upstream, charged, and stripped again.
        plain = {**base, "stream": True}
        async with http.post(url, json=plain) as resp:
            got = await events(resp)
        assert not any("usage" in e and not e.get("choices") for e in got)
        assert sum(1 for e in got if e["choices"] and e["choices"][0]["delta"].get("content")) > 5
        await eventually(lambda: charged(redis_url, "sam") == 2 * total, 2, "settlement")

        # 3. A whole answer is charged its usage too.
        async with http.post(url, json=base) as resp:
            answer = await resp.json()
        assert answer["usage"]["total_tokens"] == total
        await eventually(lambda: charged(redis_url, "sam") == 3 * total, 2, "settlement")


async def test_a_request_without_max_tokens_stops_at_the_reservation(
    make_proxy: ProxyFactory, llama: Llama
) -> None:
    proxy = await make_proxy(upstreams=[llama.url], upstream_api_key=llama.key,
                             limit_tpm=2000, limit_default_max_tokens=40)
    headers = {"Authorization": f"Bearer {token_for(proxy, 'endless')}"}
    body = {"model": llama.model, "messages": MESSAGES, "ignore_eos": True, "stream": True,
            "stream_options": {"include_usage": True}}
    async with aiohttp.ClientSession(headers=headers) as http:
        async with http.post(proxy.base_url + "/v1/chat/completions", json=body) as resp:
            got = await events(resp)
    usage = next(e["usage"] for e in got if e.get("usage"))
    assert usage["completion_tokens"] == 40  # ignore_eos would otherwise run to the context end
