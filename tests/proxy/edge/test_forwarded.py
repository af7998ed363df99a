"""The real client behind a tunnel: nginx in front, standing in for ngrok, with "clients" on
different loopback addresses (127.0.0.2, 127.0.0.3), which nginx names in X-Forwarded-For.
Per-address limits and the failed-login block see each client; a forged X-Forwarded-For is
ignored; a stream waiting for a slot is kept alive through nginx's read timeout."""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path

import aiohttp
import pytest

from proxy.edge.forwarded import TrustedProxies, client_of
from proxy.server import Running
from tests.conftest import Fake, ProxyFactory, token_for
from tests.kit.nginx import Nginx

CHAT = "/v1/chat/completions"
BODY = {"model": "fake-model", "messages": []}


@pytest.fixture
def nginx_for(tmp_path: Path) -> Iterator[Callable[..., Nginx]]:
    started: list[Nginx] = []

    def make(proxy: Running, read_timeout: float = 60) -> Nginx:
        port = int(proxy.base_url.rsplit(":", 1)[1])
        server = Nginx(tmp_path / f"nginx{len(started)}", port, read_timeout)
        started.append(server)
        return server

    yield make
    for server in started:
        server.stop()


@pytest.fixture
async def client_at() -> AsyncIterator[Callable[[str], aiohttp.ClientSession]]:
    sessions: list[aiohttp.ClientSession] = []

    def make(address: str) -> aiohttp.ClientSession:
        session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(
            local_addr=(address, 0), force_close=True))
        sessions.append(session)
        return session

    yield make
    for session in sessions:
        await session.close()


async def statuses(http: aiohttp.ClientSession, url: str, headers: dict[str, str],
                   count: int) -> list[int]:
    out = []
    for _ in range(count):
        async with http.post(url + CHAT, json=BODY, headers=headers) as resp:
            out.append(resp.status)
    return out


def test_the_client_is_the_rightmost_address_no_trusted_proxy_wrote() -> None:
    trusted = TrustedProxies(["10.0.0.0/8"], loopback=True)
    assert client_of("127.0.0.1", ["9.9.9.9", "203.0.113.5", "10.1.1.1"], trusted) == (
        "203.0.113.5", 1)
    assert client_of("203.0.113.9", ["9.9.9.9"], trusted) == ("203.0.113.9", None)
    assert client_of("::1", ["[2001:db8::1]:4711"], trusted) == ("2001:db8::1", 0)
    assert client_of("127.0.0.1", ["10.0.0.2"], trusted) == ("10.0.0.2", 0)  # all trusted
    assert client_of("::ffff:127.0.0.1", ["198.51.100.1:80"], trusted) == ("198.51.100.1", 0)


async def test_clients_behind_the_tunnel_get_their_own_per_address_window(
    make_proxy: ProxyFactory, fake: Fake, nginx_for, client_at
) -> None:
    proxy = await make_proxy(upstreams=[fake.url], trusted_proxies=["127.0.0.1"],
                             limit_ip_rpm=3)
    tunnel = nginx_for(proxy)
    alice, bob = client_at("127.0.0.2"), client_at("127.0.0.3")
    auth = {"Authorization": f"Bearer {token_for(proxy)}"}
    assert await statuses(alice, tunnel.url, auth, 4) == [200, 200, 200, 429]
    assert await statuses(bob, tunnel.url, auth, 1) == [200]  # not the same window
    # Alice cannot pass for Bob, or for a fresh address, by writing the header herself.
    for forged in ("127.0.0.3", "203.0.113.77", "203.0.113.77, 127.0.0.3"):
        spoofed = {**auth, "X-Forwarded-For": forged}
        assert await statuses(alice, tunnel.url, spoofed, 1) == [429]
        # Straight to the appliance, from an untrusted peer, the header is not even read.
        assert await statuses(alice, proxy.base_url, spoofed, 1) == [429]
    assert await statuses(bob, tunnel.url, auth, 2) == [200, 200]


@pytest.mark.parametrize("prefix", [64, 128])
async def test_an_ipv6_client_is_counted_as_its_network(
    make_proxy: ProxyFactory, fake: Fake, caplog: pytest.LogCaptureFixture, prefix: int
) -> None:
    """A subscriber gets a whole /64: rotating through it escapes neither the per-address
    limit nor the failed-login block (unless ipv6_prefix says to count each address)."""
    caplog.set_level(logging.INFO, logger="proxy.access")
    proxy = await make_proxy(upstreams=[fake.url], trusted_proxies=["127.0.0.1"],
                             limit_ip_rpm=3, auth_fail_limit=3, ipv6_prefix=prefix)
    good = {"Authorization": f"Bearer {token_for(proxy)}"}
    bad = {"Authorization": "Bearer sk-00000000_" + "x" * 43}

    async def status(client: str, headers: dict[str, str]) -> int:
        return (await statuses(http, proxy.base_url, {**headers, "X-Forwarded-For": client},
                               1))[0]

    async with aiohttp.ClientSession() as http:
        rotating = [await status(f"2001:db8:1:2::{n:x}", good) for n in range(1, 5)]
        neighbour = await status("2001:db8:1:3::1", good)  # the next /64: someone else
        for n in range(1, 4):
            assert await status(f"2001:db8:9:9::{n:x}", bad) == 401
        after_failures = await status("2001:db8:9:9::77", good)
        elsewhere = await status("2001:db8:9:a::1", good)
    if prefix == 64:
        assert rotating == [200, 200, 200, 429] and after_failures == 429
    else:
        assert rotating == [200] * 4 and after_failures == 200
    assert neighbour == 200 and elsewhere == 200
    access = [r.getMessage() for r in caplog.records if r.name == "proxy.access"]
    assert any(" 2001:db8:1:2::4 " in line for line in access)  # logs keep the address


async def test_one_clients_failed_logins_do_not_block_another(
    make_proxy: ProxyFactory, fake: Fake, nginx_for, client_at, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="proxy.access")
    proxy = await make_proxy(upstreams=[fake.url], trust_loopback_proxy=True,
                             auth_fail_limit=20)
    tunnel = nginx_for(proxy)
    alice, bob = client_at("127.0.0.2"), client_at("127.0.0.3")
    bad = {"Authorization": "Bearer sk-00000000_" + "x" * 43}
    got = await statuses(alice, tunnel.url, bad, 25)
    assert got[:20] == [401] * 20 and set(got[20:]) == {429}
    good = {"Authorization": f"Bearer {token_for(proxy)}"}
    assert await statuses(alice, tunnel.url, good, 1) == [429]  # Alice is blocked
    assert await statuses(bob, tunnel.url, good, 1) == [200]  # Bob is not
    access = [r.getMessage() for r in caplog.records if r.name == "proxy.access"]
    assert any(" 127.0.0.2 " in line for line in access)
    assert any(" 127.0.0.3 " in line for line in access)
    assert not any(" 127.0.0.1 " in line for line in access)  # never the tunnel itself


async def test_a_preflight_needs_no_credential_and_is_no_failed_login(
    make_proxy: ProxyFactory, fake: Fake
) -> None:
    origin = "https://app.example"
    proxy = await make_proxy(upstreams=[fake.url], cors_origins=[origin], auth_fail_limit=3)
    preflight = {"Origin": origin, "Access-Control-Request-Method": "POST",
                 "Access-Control-Request-Headers": "authorization, content-type, "
                                                   "ngrok-skip-browser-warning"}
    async with aiohttp.ClientSession() as http:
        for _ in range(10):
            async with http.options(proxy.base_url + CHAT, headers=preflight) as resp:
                assert resp.status == 204
                assert resp.headers["Access-Control-Allow-Origin"] == origin
                assert "Origin" in resp.headers["Vary"]
                assert "POST" in resp.headers["Access-Control-Allow-Methods"]
                assert "Access-Control-Allow-Credentials" not in resp.headers
        other = {**preflight, "Origin": "https://evil.example"}
        async with http.options(proxy.base_url + CHAT, headers=other) as resp:
            assert resp.status == 403
            assert "Access-Control-Allow-Origin" not in resp.headers
        auth = {"Authorization": f"Bearer {token_for(proxy)}", "Origin": origin}
        async with http.post(proxy.base_url + CHAT, json=BODY, headers=auth) as resp:
            assert resp.status == 200  # ten preflights later, no block
            assert resp.headers["Access-Control-Allow-Origin"] == origin
            assert "x-request-id" in resp.headers["Access-Control-Expose-Headers"]
        async with http.post(proxy.base_url + CHAT, json=BODY, headers={"Origin": origin}
                             ) as resp:  # a 401 a page can read
            assert resp.status == 401
            assert resp.headers["Access-Control-Allow-Origin"] == origin


@pytest.mark.parametrize("keepalive", [2.0, 0.0], ids=["keep-alive", "silent"])
async def test_a_queued_stream_outlasts_the_tunnels_read_timeout(
    make_proxy: ProxyFactory, fake: Fake, nginx_for, keepalive: float
) -> None:
    proxy = await make_proxy(upstreams=[fake.url], auth="disabled", admission_slots=1,
                             sse_keepalive=keepalive)
    tunnel = nginx_for(proxy, read_timeout=5)
    long = {**BODY, "stream": True, "fake": {"chunks": 24, "gap": 0.5}}  # the slot for 12 s
    queued = {**BODY, "stream": True, "fake": {"chunks": 3}}
    async with aiohttp.ClientSession() as http:
        first = await http.post(proxy.base_url + CHAT, json=long)
        assert (await first.content.readline()).startswith(b"data:")  # it holds the slot
        async with http.post(tunnel.url + CHAT, json=queued) as resp:
            status, text = resp.status, await resp.text()
        first.close()
    if keepalive:
        assert status == 200 and text.count(": keep-alive") >= 3
        assert text.rstrip().endswith("data: [DONE]")
        events = [json.loads(line[6:]) for line in text.splitlines()
                  if line.startswith("data: {")]
        assert len(events) == 3
    else:  # what users saw before: the tunnel gives up while the appliance still waits
        assert status == 504



def test_odd_hops_unknown_clients_and_zones() -> None:
    from proxy.edge.forwarded import BadForwarding

    trusted = TrustedProxies([], loopback=True)
    assert client_of("127.0.0.1", ["unknown"], trusted) == ("unknown", 0)  # RFC 7239
    assert client_of("127.0.0.1", ["9.9.9.9", "_hidden"], trusted) == ("unknown", 1)
    for junk in ('fe80::1%x "GET admin" 200', "::1%zz", "not-an-address"):
        with pytest.raises(BadForwarding):  # a zone id could carry text into the log
            client_of("127.0.0.1", [junk], trusted)


async def test_only_the_header_the_proxy_writes_is_read(make_proxy: ProxyFactory, fake: Fake,
                                                        caplog: pytest.LogCaptureFixture
                                                        ) -> None:
    caplog.set_level(logging.INFO, logger="proxy.access")
    proxy = await make_proxy(upstreams=[fake.url], trust_loopback_proxy=True,
                             forwarded_header="forwarded")
    async with aiohttp.ClientSession() as http:
        # The proxy writes Forwarded; the client's own X-Forwarded-For passes through it.
        headers = {"X-Forwarded-For": "1.2.3.8", "Forwarded": "for=5.6.7.9;proto=https"}
        async with http.get(proxy.base_url + "/health", headers=headers) as resp:
            assert resp.status == 200
            assert "Strict-Transport-Security" in resp.headers
    access = [r.getMessage() for r in caplog.records if r.name == "proxy.access"]
    assert any(" 5.6.7.9 " in line for line in access), access
    assert not any("1.2.3.8" in line for line in access)


def test_auth_off_behind_a_trusted_proxy_is_refused() -> None:
    from config import ConfigError, load_settings

    for values in ({"trust_loopback_proxy": "true"}, {"trusted_proxies": ["10.0.0.1"]}):
        with pytest.raises(ConfigError, match="needs auth"):
            load_settings({"auth": "disabled", **values}, env={}, serving=False)


async def test_a_browser_app_may_send_its_client_librarys_headers(
    make_proxy: ProxyFactory, fake: Fake
) -> None:
    origin = "https://app.example"
    proxy = await make_proxy(upstreams=[fake.url], cors_origins=[origin])
    asked = "authorization, content-type, x-stainless-os, x-stainless-lang"
    async with aiohttp.ClientSession() as http:
        async with http.options(proxy.base_url + CHAT, headers={
                "Origin": origin, "Access-Control-Request-Method": "POST",
                "Access-Control-Request-Headers": asked}) as resp:
            assert resp.status == 204
            allowed = resp.headers["Access-Control-Allow-Headers"]
            assert "x-stainless-os" in allowed and "authorization" in allowed
        async with http.options(proxy.base_url + CHAT, headers={
                "Origin": origin, "Access-Control-Request-Method": "POST",
                "Access-Control-Request-Headers": "bad header, (x)"}) as resp:
            assert resp.status == 403
