"""Bad requests get OpenAI-shaped errors with the right status, and never reach the upstream."""

from __future__ import annotations

import aiohttp
import pytest

from proxy.server import Running
from tests.conftest import Fake, ProxyFactory

CHAT = "/v1/chat/completions"


async def call(proxy: Running, method: str, path: str, **kwargs) -> tuple[int, dict, dict]:
    async with aiohttp.ClientSession() as client:
        async with client.request(method, proxy.base_url + path, **kwargs) as resp:
            return resp.status, await resp.json(), dict(resp.headers)


def assert_openai_error(body: dict) -> dict:
    assert set(body) == {"error"}
    assert set(body["error"]) == {"message", "type", "param", "code"}
    assert body["error"]["message"]
    return body["error"]


@pytest.mark.parametrize(
    ("kwargs", "code"),
    [
        ({"data": b"{not json", "headers": {"Content-Type": "application/json"}}, "invalid_json"),
        ({"data": b"[1, 2]", "headers": {"Content-Type": "application/json"}}, "invalid_json"),
        ({"data": b"model=x", "headers": {"Content-Type": "application/x-www-form-urlencoded"}},
         "invalid_content_type"),
        ({"json": {"messages": [], "stream": "yes"}}, None),
        ({"json": {"messages": [], "model": 7}}, None),
    ],
)
async def test_malformed_requests_are_400(fake_proxy: Running, fake: Fake, kwargs: dict,
                                          code: str | None) -> None:
    status, body, _ = await call(fake_proxy, "POST", CHAT, **kwargs)
    error = assert_openai_error(body)
    assert status == 400 and error["type"] == "invalid_request_error" and error["code"] == code
    assert fake.record.requests == 0


async def test_oversized_body_is_413(make_proxy: ProxyFactory, fake: Fake) -> None:
    proxy = await make_proxy(upstreams=[fake.url], auth="disabled", max_body_bytes=1024)
    big = {"messages": [{"role": "user", "content": "x" * 4096}]}
    status, body, _ = await call(proxy, "POST", CHAT, json=big)
    assert status == 413 and assert_openai_error(body)["code"] == "request_too_large"
    assert fake.record.requests == 0


async def test_unknown_route_and_wrong_method(fake_proxy: Running) -> None:
    status, body, _ = await call(fake_proxy, "POST", "/v1/nothing-here", json={})
    assert status == 404
    assert assert_openai_error(body)["message"] == "Invalid URL (POST /v1/nothing-here)"
    status, body, headers = await call(fake_proxy, "GET", CHAT)
    assert status == 405 and "POST" in headers["Allow"]
    assert_openai_error(body)


async def test_unknown_model_with_several_models_is_404(
    make_proxy: ProxyFactory, fake: Fake, llama
) -> None:
    proxy = await make_proxy(upstreams=[fake.url, llama.url], upstream_api_key=llama.key,
                             auth="disabled")
    status, body, _ = await call(proxy, "POST", CHAT, json={"model": "gpt-4", "messages": []})
    assert status == 404
    error = assert_openai_error(body)
    assert error["code"] == "model_not_found" and error["param"] == "model"


async def test_responses_carry_security_headers_without_banner(fake_proxy: Running) -> None:
    _, _, headers = await call(fake_proxy, "GET", "/health")
    assert headers["X-Content-Type-Options"] == "nosniff"
    assert headers["Server"] == "llama-proxy"
