"""Attack the appliance's authentication; every bad credential is refused and reaches no model."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
import logging
import time
from pathlib import Path

import aiohttp
import jwt
import orjson
import pytest

from auth.tokens import load_or_create_secret
from proxy.server import Running
from tests.conftest import ADMIN_HEADERS, Fake, KillableRedis, ProxyFactory, token_for
from tests.kit.helpers import eventually
from tests.kit.tokens import claims, rsa_pair

CHAT = "/v1/chat/completions"
BODY = {"model": "fake-model", "messages": [{"role": "user", "content": "hi"}]}


async def call(proxy: Running, headers: dict[str, str], path: str = CHAT,
               body: dict | None = None) -> tuple[int, dict, aiohttp.typedefs.LooseHeaders]:
    async with aiohttp.ClientSession() as client:
        async with client.post(proxy.base_url + path, json=body or BODY, headers=headers) as r:
            return r.status, await r.json(), r.headers


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def b64(data: dict) -> str:
    return base64.urlsafe_b64encode(json.dumps(data).encode()).rstrip(b"=").decode()


@pytest.fixture
async def proxy(make_proxy: ProxyFactory, fake: Fake) -> Running:
    return await make_proxy(upstreams=[fake.url])


def secret_of(proxy: Running) -> str:
    return load_or_create_secret(proxy.settings)


async def assert_refused(proxy: Running, fake: Fake, headers: dict[str, str], status: int = 401,
                         message: str | None = None) -> dict:
    got, body, resp_headers = await call(proxy, headers)
    assert got == status, body
    assert set(body["error"]) == {"message", "type", "param", "code"}
    if status == 401:
        assert resp_headers["WWW-Authenticate"].startswith("Bearer")
    if message:
        assert body["error"]["message"] == message
    assert fake.record.requests == 0  # nothing reached the model
    return body["error"]


async def test_valid_token_passes(proxy: Running, fake: Fake) -> None:
    status, body, _ = await call(proxy, bearer(token_for(proxy)))
    assert status == 200 and body["choices"]
    assert fake.record.requests == 1
    assert "Authorization" not in fake.record.headers[0]  # the client's credential stays here


async def test_no_credential(proxy: Running, fake: Fake) -> None:
    error = await assert_refused(proxy, fake, {})
    assert error["code"] == "missing_credential"


async def test_alg_none(proxy: Running, fake: Fake) -> None:
    token = f"{b64({'alg': 'none', 'typ': 'JWT'})}.{b64(claims())}."
    await assert_refused(proxy, fake, bearer(token))
    unsigned = jwt.encode(claims(), None, algorithm="none")
    await assert_refused(proxy, fake, bearer(unsigned))


async def test_tampered_payload(proxy: Running, fake: Fake) -> None:
    header, _, signature = token_for(proxy, "alice").split(".")
    forged = f"{header}.{b64(claims(sub='admin', scope='admin inference'))}.{signature}"
    await assert_refused(proxy, fake, bearer(forged))


async def test_signed_with_another_secret(proxy: Running, fake: Fake) -> None:
    await assert_refused(proxy, fake, bearer(jwt.encode(claims(), "x" * 48, algorithm="HS256")))


async def test_expired(proxy: Running, fake: Fake) -> None:
    old = int(time.time()) - 7200
    token = jwt.encode(claims(iat=old, exp=old + 60), secret_of(proxy), algorithm="HS256")
    await assert_refused(proxy, fake, bearer(token), message="Token expired")


async def test_not_yet_valid(proxy: Running, fake: Fake) -> None:
    token = jwt.encode(claims(nbf=int(time.time()) + 3600), secret_of(proxy), algorithm="HS256")
    await assert_refused(proxy, fake, bearer(token))


async def test_missing_exp(proxy: Running, fake: Fake) -> None:
    no_exp = claims()
    del no_exp["exp"]
    await assert_refused(proxy, fake, bearer(jwt.encode(no_exp, secret_of(proxy), "HS256")))


@pytest.mark.parametrize("claim", ["exp", "nbf", "iat"])
async def test_dates_that_are_not_json_numbers(proxy: Running, fake: Fake, claim: str) -> None:
    """NumericDate claims are numbers: PyJWT would take "1796310000" as one."""
    good = claims(nbf=int(time.time()) - 10)
    for value in (str(good[claim]), True, [good[claim]]):
        token = jwt.encode({**good, claim: value}, secret_of(proxy), "HS256")
        await assert_refused(proxy, fake, bearer(token))
    assert (await call(proxy, bearer(jwt.encode(good, secret_of(proxy), "HS256"))))[0] == 200


async def test_wrong_audience_and_issuer(make_proxy: ProxyFactory, fake: Fake) -> None:
    proxy = await make_proxy(upstreams=[fake.url], jwt_audience="llama-proxy",
                             jwt_issuer="https://issuer.example")
    secret = secret_of(proxy)
    good = claims(aud="llama-proxy", iss="https://issuer.example")
    for bad in (claims(aud="someone-else", iss="https://issuer.example"),
                claims(aud="llama-proxy", iss="https://evil.example"),
                claims(iss="https://issuer.example"),  # aud missing
                claims(aud="llama-proxy")):  # iss missing
        await assert_refused(proxy, fake, bearer(jwt.encode(bad, secret, "HS256")))
    status, _, _ = await call(proxy, bearer(jwt.encode(good, secret, "HS256")))
    assert status == 200


async def test_rs256_rejects_hs256_signed_with_the_public_key(
    make_proxy: ProxyFactory, fake: Fake, tmp_path: Path
) -> None:
    private, public_path = rsa_pair(tmp_path, "k1")
    proxy = await make_proxy(upstreams=[fake.url], jwt_algorithms=["RS256"],
                             jwt_public_key=str(public_path))
    public_pem = public_path.read_text()
    # The classic confusion attack: the public key used as an HMAC secret.
    header = b64({"alg": "HS256", "typ": "JWT"})
    payload = b64(claims())
    signature = base64.urlsafe_b64encode(hmac.new(
        public_pem.encode(), f"{header}.{payload}".encode(), hashlib.sha256).digest()
    ).rstrip(b"=").decode()
    await assert_refused(proxy, fake, bearer(f"{header}.{payload}.{signature}"))
    status, _, _ = await call(proxy, bearer(jwt.encode(claims(), private, algorithm="RS256")))
    assert status == 200


async def test_jwks_picks_key_by_kid_and_rejects_unknown_kid(
    make_proxy: ProxyFactory, fake: Fake, tmp_path: Path
) -> None:
    old, _ = rsa_pair(tmp_path, "old")
    new, _ = rsa_pair(tmp_path, "new")
    jwks = {"keys": [
        {**json.loads(jwt.algorithms.RSAAlgorithm.to_jwk(k.public_key())), "kid": kid,
         "use": "sig", "alg": "RS256"} for k, kid in ((old, "2025"), (new, "2026"))]}
    jwks_path = tmp_path / "jwks.json"
    jwks_path.write_text(json.dumps(jwks))
    proxy = await make_proxy(upstreams=[fake.url], jwt_algorithms=["RS256"],
                             jwt_jwks_url=jwks_path.as_uri())
    for key, kid in ((old, "2025"), (new, "2026")):  # both live during a rotation
        token = jwt.encode(claims(), key, algorithm="RS256", headers={"kid": kid})
        assert (await call(proxy, bearer(token)))[0] == 200
    requests = fake.record.requests
    fake.record.requests = 0
    for kid in ("1999", None):
        token = jwt.encode(claims(), new, algorithm="RS256",
                           headers={"kid": kid} if kid else None)
        await assert_refused(proxy, fake, bearer(token))
    fake.record.requests = requests


async def test_revoked_token(proxy: Running, fake: Fake) -> None:
    token = token_for(proxy, "bob")
    jti = jwt.decode(token, options={"verify_signature": False})["jti"]
    async with aiohttp.ClientSession() as client:
        async with client.delete(f"{proxy.base_url}/admin/tokens/{jti}",
                                 headers=ADMIN_HEADERS) as r:
            assert r.status == 200
    await assert_refused(proxy, fake, bearer(token), message="Token revoked")


async def test_a_token_revoked_after_use_is_refused_at_once_and_on_another_appliance(
    make_proxy: ProxyFactory, fake: Fake
) -> None:
    """Revoked while it is cached as good: refused at once where it was revoked, and within
    key_cache_ttl on a second appliance sharing the Redis (and the signing secret)."""
    one = await make_proxy(upstreams=[fake.url], key_cache_ttl=1.0)
    two = await make_proxy(upstreams=[fake.url], key_cache_ttl=1.0)
    token = token_for(one, "eve")
    assert (await call(one, bearer(token)))[0] == 200
    assert (await call(two, bearer(token)))[0] == 200
    jti = jwt.decode(token, options={"verify_signature": False})["jti"]
    async with aiohttp.ClientSession() as client:
        async with client.delete(f"{one.base_url}/admin/tokens/{jti}",
                                 headers=ADMIN_HEADERS) as r:
            assert r.status == 200
    revoked = time.monotonic()
    status, body, _ = await call(one, bearer(token))
    assert status == 401 and body["error"]["message"] == "Token revoked"

    async def refused_on_two() -> bool:
        return (await call(two, bearer(token)))[0] == 401

    await eventually(refused_on_two, 3.0, "the second appliance to refuse it")
    assert time.monotonic() - revoked < 1.0 + 1.0  # its cache's ttl, and a busy machine


async def test_oversized_token_and_garbage_headers(proxy: Running, fake: Fake) -> None:
    await assert_refused(proxy, fake, bearer(token_for(proxy) + "A" * 5_000))
    async with aiohttp.ClientSession() as client:  # past the HTTP parser's header limit
        async with client.post(proxy.base_url + CHAT, json=BODY,
                               headers=bearer("eyJ" + "A" * 10_000)) as resp:
            assert resp.status == 431  # in OpenAI's shape, the header not echoed
            body = await resp.read()
            assert b"AAAA" not in body and orjson.loads(body)["error"]["code"]
    assert fake.record.requests == 0
    for headers in ({"Authorization": "Basic YWxpY2U6c2VjcmV0"}, {"Authorization": "Bearer"},
                    {"Authorization": "Bearer    "}, {"Authorization": "Token abc"},
                    {"X-API-Key": "sk-short_x"}, {"X-API-Key": "not-a-key-at-all"},
                    {"Authorization": "Bearer eyJ.eyJ.x"},
                    {"Authorization": "Bearer sk-00000000_" + "a" * 43}):
        await assert_refused(proxy, fake, headers)


async def test_scopes_and_model_allow_list(proxy: Running, fake: Fake) -> None:
    admin_only = token_for(proxy, scopes=["admin"])
    error = await assert_refused(proxy, fake, bearer(admin_only), status=403)
    assert error["code"] == "insufficient_scope"
    other_model = token_for(proxy, models=["some-other-model"])
    error = await assert_refused(proxy, fake, bearer(other_model), status=403)
    assert error["code"] == "model_not_allowed" and error["param"] == "model"
    allowed = token_for(proxy, models=["fake-model"])
    assert (await call(proxy, bearer(allowed)))[0] == 200


async def test_dev_user_header_only_when_auth_is_disabled(
    make_proxy: ProxyFactory, proxy: Running, fake: Fake
) -> None:
    error = await assert_refused(proxy, fake, {"X-User-Id": "alice"})
    assert "development mode" in error["message"]
    dev = await make_proxy(upstreams=[fake.url], auth="disabled")
    assert (await call(dev, {"X-User-Id": "alice"}))[0] == 200


async def test_repeated_failures_block_the_ip(make_proxy: ProxyFactory, fake: Fake) -> None:
    proxy = await make_proxy(upstreams=[fake.url], auth_fail_limit=3, auth_fail_window=60)
    for _ in range(3):
        assert (await call(proxy, bearer("eyJ.bad.token")))[0] == 401
    status, body, headers = await call(proxy, bearer(token_for(proxy)))
    assert status == 429 and body["error"]["code"] == "auth_blocked"
    assert 50 <= int(headers["Retry-After"]) <= 61
    assert fake.record.requests == 0


async def test_failures_are_logged_without_secrets(
    proxy: Running, fake: Fake, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    expired = jwt.encode(claims(exp=int(time.time()) - 999), secret_of(proxy), "HS256")
    wrong_key = "sk-abcdef12_" + "s" * 43
    await assert_refused(proxy, fake, {"X-API-Key": wrong_key})
    for _ in range(15):  # under auth_fail_limit (20): refused, not yet blocked
        await assert_refused(proxy, fake, bearer(expired))
    text = "\n".join(r.getMessage() for r in caplog.records)
    assert "auth refused (unknown)" in text and "abcdef12" in text  # the prefix names the key
    assert expired not in text and wrong_key not in text and "s" * 43 not in text
    assert text.count("auth refused") == 1  # a flood is one line, the rest counted in the next


async def test_a_key_store_outage_refuses_unknown_keys_with_503(
    make_proxy: ProxyFactory, fake: Fake, own_redis: KillableRedis
) -> None:
    proxy = await make_proxy(upstreams=[fake.url], redis_url=own_redis.url, key_cache_ttl=0.05)
    keys = []
    async with aiohttp.ClientSession(headers=ADMIN_HEADERS) as admin:
        for name in ("known", "unknown"):
            async with admin.post(proxy.base_url + "/admin/keys", json={"name": name}) as r:
                keys.append((await r.json())["key"])
    known, unknown = keys
    assert (await call(proxy, {"X-API-Key": known}))[0] == 200  # now cached
    own_redis.kill()
    await asyncio.sleep(0.1)  # past key_cache_ttl: Redis would be asked now
    assert (await call(proxy, {"X-API-Key": known}))[0] == 200  # served from the cache
    status, body, headers = await call(proxy, {"X-API-Key": unknown})
    assert status == 503 and body["error"]["code"] == "auth_unavailable"
    assert headers["Retry-After"] == "5"
