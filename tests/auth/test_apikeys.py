"""The API key store against a real Redis: hashing, caching, revocation, and Redis outages."""

from __future__ import annotations

import asyncio
import time

import pytest
import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

from auth.apikeys import KeyStore, digest
from auth.errors import AuthError, CredentialRejected, CredentialStoreDown
from tests.conftest import KillableRedis


async def client(url: str) -> aioredis.Redis:
    return aioredis.Redis.from_url(url, decode_responses=True, socket_timeout=0.2,
                                   socket_connect_timeout=0.2, retry=Retry(NoBackoff(), 0))


async def test_only_a_hash_is_stored(redis_url: str) -> None:
    redis = await client(redis_url)
    key, record = await KeyStore(redis, 5).create("alice", rpm=60, models=["m1"])
    assert key.startswith(f"sk-{record.prefix}_")
    dump = []
    async for name in redis.scan_iter("*"):
        kind = await redis.type(name)
        dump.append(str(await redis.hgetall(name) if kind == "hash" else name))
    everything = "\n".join(dump)
    assert key.split("_", 1)[1] not in everything
    assert digest(key) in everything
    principal = await KeyStore(redis, 5).verify(key)
    assert principal.id == f"key:{record.prefix}" and principal.rpm == 60
    assert principal.models == frozenset({"m1"})
    await redis.aclose()


async def test_revocation_reaches_other_instances_within_the_cache_ttl(redis_url: str) -> None:
    redis = await client(redis_url)
    here, there = KeyStore(redis, 0.3), KeyStore(redis, 0.3)
    key, record = await here.create("bob")
    await there.verify(key)  # now cached over there
    await here.revoke(record.prefix)
    await there.verify(key)  # still inside the cache period
    await asyncio.sleep(0.35)
    with pytest.raises(CredentialRejected) as err:
        await there.verify(key)
    assert err.value.message == "API key revoked"
    await redis.aclose()


async def test_disabled_and_expired_keys(redis_url: str) -> None:
    redis = await client(redis_url)
    store = KeyStore(redis, 0)
    disabled_key, disabled = await store.create("d")
    await store.update(disabled.prefix, disabled=True)
    expired_key, _ = await store.create("e", expires=time.time() - 1)
    for key, status in ((disabled_key, "disabled"), (expired_key, "expired")):
        with pytest.raises(AuthError) as err:
            await store.verify(key)
        assert err.value.message == f"API key {status}"
    await redis.aclose()


async def test_redis_outage_keeps_known_keys_refuses_unknown(own_redis: KillableRedis) -> None:
    redis = await client(own_redis.url)
    store = KeyStore(redis, 0.05)
    known, _ = await store.create("known")
    unknown_to_cache, _ = await store.create("other")
    await store.verify(known)
    own_redis.kill()
    await asyncio.sleep(0.1)  # past the cache period: Redis would be asked now
    started = time.monotonic()
    assert (await store.verify(known)).kind == "apikey"  # served stale from the cache
    with pytest.raises(CredentialStoreDown):
        await store.verify(unknown_to_cache)
    assert time.monotonic() - started < 1.0  # failing fast, never hanging
    assert await store.jti_revoked("some-jti") is False  # JWTs keep working
    own_redis.restart()
    assert (await store.verify(unknown_to_cache)).kind == "apikey"  # nothing lost
    await redis.aclose()


async def test_failed_guesses_do_not_count_as_use(redis_url: str) -> None:
    redis = await client(redis_url)
    store = KeyStore(redis, 0)
    key, record = await store.create("target")
    guess = f"sk-{record.prefix}_" + "A" * 43  # the right prefix, a wrong secret
    for _ in range(3):
        with pytest.raises(AuthError):
            await store.verify(guess)
    await store.drain()
    assert (await store.get(record.prefix)).last_used is None
    await store.verify(key)
    await store.drain()
    assert (await store.get(record.prefix)).last_used > time.time() - 5
    await redis.aclose()


async def test_a_revoke_always_wins_over_a_concurrent_update(redis_url: str) -> None:
    redis = await client(redis_url)
    store = KeyStore(redis, 0)
    for round_ in range(10):
        _, record = await store.create(f"k{round_}")
        calls = [store.revoke(record.prefix),
                 store.update(record.prefix, name="renamed", rpm=7)]
        if round_ % 2:
            calls.reverse()
        await asyncio.gather(*calls)
        after = await store.get(record.prefix)
        assert after.status() == "revoked", round_
        assert (after.name, after.rpm) == ("renamed", 7)  # the update kept what it changed
    assert await store.update("nosuchk1", rpm=3) is None
    assert await store.get("nosuchk1") is None  # an update never creates a key
    await redis.aclose()
