"""/api/chat and /api/conversations, end to end through the real model: conversations kept per
user (and never shown to another), streamed events, validation before the model, the same rate
limits as /v1, answers kept when the client stops, and conversations surviving a Redis restart."""

from __future__ import annotations

import itertools
import time
from typing import Any

import aiohttp
import orjson

from proxy.server import Running
from tests.conftest import KillableRedis, Llama, ProxyFactory, token_for
from tests.kit.helpers import eventually


def auth(proxy: Running, subject: str = "alice") -> dict[str, str]:
    return {"Authorization": f"Bearer {token_for(proxy, subject)}"}


async def chat(http: aiohttp.ClientSession, proxy: Running, body: dict[str, Any],
               subject: str = "alice") -> tuple[int, dict[str, Any]]:
    async with http.post(proxy.base_url + "/api/chat", json=body,
                         headers=auth(proxy, subject)) as resp:
        return resp.status, await resp.json()


async def events(resp: aiohttp.ClientResponse,
                 arrived: list[float] | None = None) -> list[tuple[str, Any]]:
    """Named SSE events of a response, in order (comments skipped); arrived: when each event's
    data line was read."""
    out, name = [], "message"
    async for raw in resp.content:
        line = raw.decode().rstrip("\r\n")
        if line.startswith("event:"):
            name = line[6:].strip()
        elif line.startswith("data:"):
            out.append((name, orjson.loads(line[5:].strip())))
            if arrived is not None:
                arrived.append(time.monotonic())
            name = "message"
    return out


async def test_a_conversation_is_kept_and_continued(model_proxy: Running, llama: Llama) -> None:
    async with aiohttp.ClientSession() as http:
        status, first = await chat(http, model_proxy, {"message": "My name is Ada. Say hi.",
                                                       "max_tokens": 16})
        assert status == 200, first
        assert first["response"] and first["model"] == llama.model
        assert first["usage"]["completion_tokens"] > 0
        cid = first["conversation_id"]
        status, second = await chat(http, model_proxy, {"message": "What is my name?",
                                                        "conversation_id": cid,
                                                        "max_tokens": 16})
        assert status == 200 and second["conversation_id"] == cid
        # The history went to the model: the second prompt is longer than the first.
        assert second["usage"]["prompt_tokens"] > first["usage"]["prompt_tokens"]
        async with http.get(f"{model_proxy.base_url}/api/conversations/{cid}",
                            headers=auth(model_proxy)) as resp:
            kept = await resp.json()
        assert [m["role"] for m in kept["messages"]] == ["user", "assistant"] * 2
        assert kept["messages"][0]["content"] == "My name is Ada. Say hi."
        assert kept["messages"][3]["content"] == second["response"]
        assert kept["title"].startswith("My name is Ada")
        async with http.get(model_proxy.base_url + "/api/conversations",
                            headers=auth(model_proxy)) as resp:
            listed = (await resp.json())["data"]
        assert listed[0]["id"] == cid and listed[0]["messages"] == 4


async def test_a_streamed_answer_arrives_as_events_and_is_kept(model_proxy: Running) -> None:
    async with aiohttp.ClientSession() as http:
        async with http.post(model_proxy.base_url + "/api/chat", headers=auth(model_proxy),
                             json={"message": "Count from one to twenty, one number per "
                                              "line.", "stream": True,
                                   "max_tokens": 24}) as resp:
            assert resp.status == 200
            assert resp.headers["Content-Type"].startswith("text/event-stream")
            arrived: list[float] = []
            got = await events(resp, arrived)
        names = [name for name, _ in got]
        assert names[0] == "start" and names[-1] == "done"
        assert names.count("delta") > 3
        # Token by token as the model makes them, not one blob at the end: the deltas arrive in
        # separate reads, a token's time apart (milliseconds), not within microseconds of one read.
        times = [at for (name, _), at in zip(got, arrived, strict=True) if name == "delta"]
        apart = sum(1 for a, b in itertools.pairwise(times) if b - a > 0.001)
        assert apart >= 3, times
        text = "".join(data["content"] for name, data in got if name == "delta")
        done = got[-1][1]
        assert done["response"] == text and done["usage"]["completion_tokens"] > 0
        cid = got[0][1]["conversation_id"]
        async with http.get(f"{model_proxy.base_url}/api/conversations/{cid}",
                            headers=auth(model_proxy)) as resp:
            kept = await resp.json()
        assert kept["messages"][1] == {"role": "assistant", "content": text}


async def test_nobody_sees_another_users_conversations(model_proxy: Running) -> None:
    async with aiohttp.ClientSession() as http:
        status, mine = await chat(http, model_proxy, {"message": "A secret: 42.",
                                                      "max_tokens": 4})
        assert status == 200
        cid, base, bob = mine["conversation_id"], model_proxy.base_url, auth(model_proxy, "bob")
        async with http.get(base + "/api/conversations", headers=bob) as resp:
            assert (await resp.json())["data"] == []
        async with http.get(f"{base}/api/conversations/{cid}", headers=bob) as resp:
            assert resp.status == 404
        async with http.delete(f"{base}/api/conversations/{cid}", headers=bob) as resp:
            assert resp.status == 404
        status, body = await chat(http, model_proxy, {"message": "What was the secret?",
                                                      "conversation_id": cid}, subject="bob")
        assert status == 404 and body["error"]["code"] == "conversation_not_found"
        async with http.get(f"{base}/api/conversations/{cid}",
                            headers=auth(model_proxy)) as resp:  # still the owner's
            assert len((await resp.json())["messages"]) == 2
        async with http.delete(f"{base}/api/conversations/{cid}",
                               headers=auth(model_proxy)) as resp:
            assert (await resp.json())["deleted"] is True
        async with http.get(f"{base}/api/conversations/{cid}",
                            headers=auth(model_proxy)) as resp:
            assert resp.status == 404


async def test_bad_input_is_refused_before_the_model(make_proxy: ProxyFactory,
                                                     llama: Llama) -> None:
    proxy = await make_proxy(upstreams=[llama.url], upstream_api_key=llama.key,
                             chat_max_message_chars=100, chat_max_tokens=8,
                             chat_context_tokens=64)
    cases = [({}, "message"), ({"message": ""}, "message"),
             ({"message": "x" * 101}, "message"), ({"message": "hi", "stream": "yes"}, "stream"),
             ({"message": "hi", "max_tokens": 0}, "max_tokens"),
             ({"message": "hi", "conversation_id": "../../etc"}, "conversation_id"),
             ({"message": "é" * 90}, "message")]  # fits the characters, not the context
    async with aiohttp.ClientSession() as http:
        for body, param in cases:
            status, answer = await chat(http, proxy, body)
            assert status == 400 and answer["error"]["param"] == param, (body, answer)
        status, answer = await chat(http, proxy, {"message": "hi",
                                                  "conversation_id": "conv_" + "a" * 16})
        assert status == 404
        # max_tokens above the setting is capped, not refused.
        status, answer = await chat(http, proxy, {"message": "Count to fifty.",
                                                  "max_tokens": 500})
        assert status == 200 and answer["usage"]["completion_tokens"] <= 8


async def test_the_same_rate_limits_as_v1(make_proxy: ProxyFactory, llama: Llama) -> None:
    proxy = await make_proxy(upstreams=[llama.url], upstream_api_key=llama.key, limit_rpm=2)
    async with aiohttp.ClientSession() as http:
        statuses = []
        for _ in range(3):
            async with http.post(proxy.base_url + "/api/chat", headers=auth(proxy),
                                 json={"message": "hi", "max_tokens": 2}) as resp:
                statuses.append(resp.status)
                retry_after = resp.headers.get("Retry-After")
        assert statuses == [200, 200, 429] and retry_after is not None


async def test_a_stopped_answer_is_kept_and_the_model_freed(model_proxy: Running,
                                                            llama: Llama) -> None:
    async with aiohttp.ClientSession() as http:
        resp = await http.post(model_proxy.base_url + "/api/chat", headers=auth(model_proxy),
                               json={"message": "Write a very long story about a dragon.",
                                     "stream": True, "max_tokens": 1000})
        seen = 0
        async for line in resp.content:
            seen += line.startswith(b"event: delta")
            if seen == 5:
                break
        resp.close()  # the user pressed stop

        async def kept() -> list[dict[str, Any]]:
            async with http.get(model_proxy.base_url + "/api/conversations",
                                headers=auth(model_proxy)) as r:
                return [c for c in (await r.json())["data"] if c["messages"] == 2]

        found = await eventually(kept, 10, "the stopped answer to be kept")
        async with http.get(f"{model_proxy.base_url}/api/conversations/{found[0]['id']}",
                            headers=auth(model_proxy)) as r:
            answer = (await r.json())["messages"][1]["content"]
        assert answer  # what the user saw before stopping

        async def idle() -> bool:
            async with http.get(llama.url + "/slots",
                                headers={"Authorization": f"Bearer {llama.key}"}) as r:
                return not any(s["is_processing"] for s in await r.json())

        await eventually(idle, 5, "llama-server to free the slot")


async def test_conversations_survive_a_redis_restart(make_proxy: ProxyFactory, llama: Llama,
                                                     own_redis: KillableRedis) -> None:
    proxy = await make_proxy(upstreams=[llama.url], upstream_api_key=llama.key,
                             redis_url=own_redis.url)
    async with aiohttp.ClientSession() as http:
        status, first = await chat(http, proxy, {"message": "Remember me.", "max_tokens": 4})
        assert status == 200
        own_redis.kill()
        own_redis.restart()

        async def read_back() -> dict[str, Any] | None:
            async with http.get(f"{proxy.base_url}/api/conversations/"
                                f"{first['conversation_id']}", headers=auth(proxy)) as r:
                return await r.json() if r.status == 200 else None

        kept = await eventually(read_back, 10, "the conversation after the restart")
        assert kept["messages"][0]["content"] == "Remember me."


async def test_conversations_unavailable_is_a_clean_503(make_proxy: ProxyFactory, llama: Llama,
                                                        own_redis: KillableRedis) -> None:
    # Auth off (a development user): no credential check needs Redis, so what is refused is
    # the conversations' store itself.
    proxy = await make_proxy(upstreams=[llama.url], upstream_api_key=llama.key,
                             redis_url=own_redis.url, auth="disabled")
    own_redis.kill()
    async with aiohttp.ClientSession() as http:
        async with http.get(proxy.base_url + "/api/conversations",
                            headers={"X-User-Id": "ada"}) as resp:
            body = await resp.json()
            assert resp.status == 503, body
            assert body["error"]["code"] == "conversations_unavailable"
            assert "Retry-After" in resp.headers


async def test_the_context_size_comes_from_the_model_server(model_proxy: Running,
                                                            llama: Llama) -> None:
    from proxy.api.chat import CONTEXTS

    async with aiohttp.ClientSession() as http:
        async with http.get(llama.url + "/props",
                            headers={"Authorization": f"Bearer {llama.key}"}) as r:
            n_ctx = (await r.json())["default_generation_settings"]["n_ctx"]
        status, _ = await chat(http, model_proxy, {"message": "hi", "max_tokens": 2})
        assert status == 200
        assert list(model_proxy.app[CONTEXTS].values()) == [n_ctx]
        # A message that cannot fit that context is refused before the model, naming it.
        status, body = await chat(http, model_proxy, {"message": "9" * (2 * n_ctx),
                                                      "max_tokens": 2})
        assert status == 400 and body["error"]["code"] == "context_length_exceeded"
        assert str(n_ctx) in body["error"]["message"]
