"""The limiter against a real Redis: bursts, callers that leave mid-check, and settlement."""

from __future__ import annotations

import asyncio
import itertools

import pytest
import redis as redis_sync

from proxy.state.store import make_client
from quota.limiter import Limiter
from quota.windows import Limits
from tests.conftest import KillableRedis
from tests.kit.helpers import eventually

_ids = itertools.count()
# Redis's reply timeout where a test is not about timeouts: on a loaded 2-core machine a burst of
# 300 checks can take longer than the shipped 0.25 s, which would read as an outage.
ROOMY = 2.0


def rid() -> str:
    return f"lim{next(_ids)}"


def redis_number(url: str, command: str, key: str) -> int:
    client = redis_sync.Redis.from_url(url)
    try:
        return int(client.execute_command(command, key) or 0)
    finally:
        client.close()


async def test_a_burst_is_not_mistaken_for_an_outage(redis_url: str) -> None:
    # redis-py's default pool raises on the 101st concurrent call; that must not look like
    # "Redis is down" and switch the limiter to (per-process) local windows.
    redis = make_client(redis_url, ROOMY)
    limiter = Limiter.on_redis(redis, Limits(rpm=50))
    admissions = await asyncio.gather(*(limiter.admit(rid(), "user:burst", "127.0.0.1", 1)
                                        for _ in range(300)))
    assert not limiter.degraded
    assert sum(1 for a in admissions if a and a.allowed) == 50
    await redis.aclose()


async def test_a_caller_leaving_while_redis_decides_leaves_no_lease(redis_url: str) -> None:
    redis = make_client(redis_url, ROOMY)
    limiter = Limiter.on_redis(redis, Limits(concurrency=2, tpm=1000))
    for _ in range(20):
        task = asyncio.create_task(limiter.admit(rid(), "user:leaver", "127.0.0.1", 100))
        await asyncio.sleep(0)  # the check is on its way to Redis ...
        task.cancel()  # ... when the client hangs up
        with pytest.raises(asyncio.CancelledError):
            await task
    await limiter.aclose()
    assert redis_number(redis_url, "ZCARD", "llp:rl:{user:leaver}:conc") == 0
    assert redis_number(redis_url, "GET", "llp:rl:{user:leaver}:tpm:sum") == 0
    admitted = await limiter.admit(rid(), "user:leaver", "127.0.0.1", 100)
    assert admitted is not None and admitted.allowed
    await redis.aclose()


async def test_settlement_charges_real_use_and_frees_leases(redis_url: str) -> None:
    redis = make_client(redis_url, ROOMY)
    limiter = Limiter.on_redis(redis, Limits(concurrency=1, tpm=1000))
    admission = await limiter.admit(rid(), "user:sam", "127.0.0.1", 600)
    assert admission is not None and admission.allowed
    refused = await limiter.admit(rid(), "user:sam", "127.0.0.1", 600)
    assert refused is not None and {w.name for w in refused.denied()} == {"tpm", "concurrency"}
    admission.usage = 42
    limiter.settle(admission)
    limiter.settle(admission)  # a second settle does nothing
    await limiter.aclose()
    assert redis_number(redis_url, "GET", "llp:rl:{user:sam}:tpm:sum") == 42
    assert redis_number(redis_url, "ZCARD", "llp:rl:{user:sam}:conc") == 0
    await redis.aclose()


async def test_a_settled_window_expires_whole_and_the_limit_holds_after(redis_url: str
                                                                       ) -> None:
    """A window whose only entry was settled keeps its expiry: when the window has passed,
    the next requests find it empty, not a leftover entry that would drive its sum below zero
    (and admit twice the limit)."""
    redis = make_client(redis_url, ROOMY)
    limiter = Limiter.on_redis(redis, Limits(tpm=300, window_s=0.5))
    key = "llp:rl:{user:lone}:tpm"
    admission = await limiter.admit(rid(), "user:lone", "127.0.0.1", 250)
    assert admission is not None and admission.allowed
    admission.usage = 280
    limiter.settle(admission)
    await limiter.aclose()
    assert redis_number(redis_url, "GET", key + ":sum") == 280
    assert 0 < redis_number(redis_url, "PTTL", key) <= 1500
    await eventually(lambda: redis_number(redis_url, "EXISTS", key) == 0, 3, "the window gone")
    limiter = Limiter.on_redis(redis, Limits(tpm=300, window_s=0.5))
    first = await limiter.admit(rid(), "user:lone", "127.0.0.1", 200)
    second = await limiter.admit(rid(), "user:lone", "127.0.0.1", 200)
    assert first is not None and first.allowed
    assert second is not None and not second.allowed
    await limiter.aclose()
    await redis.aclose()


async def test_per_credential_limits_beat_the_global_ones(redis_url: str) -> None:
    redis = make_client(redis_url, ROOMY)
    limiter = Limiter.on_redis(redis, Limits(rpm=100))
    results = [await limiter.admit(rid(), "key:abc", "127.0.0.1", 1, rpm=2) for _ in range(3)]
    assert [a.allowed for a in results if a] == [True, True, False]
    assert await Limiter.on_redis(redis, Limits()).admit(rid(), "key:abc", "127.0.0.1", 1) is None
    await redis.aclose()


async def test_a_settlement_rides_with_the_next_check(redis_url: str) -> None:
    """One round trip per request: a settlement waits for the next check (or a few hundred
    ms), and goes first in that batch, so a lease it frees is free for the check."""
    redis = make_client(redis_url, ROOMY)
    limiter = Limiter.on_redis(redis, Limits(concurrency=1, tpm=1000))
    pipeline = limiter.shared.pipeline  # type: ignore[attr-defined]
    first = await limiter.admit(rid(), "user:seq", "127.0.0.1", 100)
    assert first is not None and first.allowed and pipeline.round_trips == 1
    first.usage = 7
    limiter.settle(first)
    second = await limiter.admit(rid(), "user:seq", "127.0.0.1", 100)
    assert second is not None and second.allowed  # the lease came back in the same batch
    assert pipeline.round_trips == 2
    second.usage = 5
    limiter.settle(second)  # alone: it goes out by itself, soon
    await eventually(lambda: redis_number(redis_url, "GET", "llp:rl:{user:seq}:tpm:sum") == 12,
                     2, "the lone settlement to land")
    assert pipeline.round_trips == 3
    await limiter.aclose()
    await redis.aclose()


async def test_a_settlement_outlives_a_redis_blip(own_redis: KillableRedis) -> None:
    redis = make_client(own_redis.url, 0.25)
    limiter = Limiter.on_redis(redis, Limits(concurrency=2, tpm=1000))
    admission = await limiter.admit(rid(), "user:blip", "127.0.0.1", 600)
    assert admission is not None and admission.allowed
    own_redis.kill()
    admission.usage = 42
    limiter.settle(admission)
    await asyncio.sleep(0.4)  # its first try fails while Redis is away (retried in 0.5 s)
    own_redis.restart()
    await eventually(lambda: redis_number(own_redis.url, "GET", "llp:rl:{user:blip}:tpm:sum")
                     == 42, 10, "the settlement to be tried again and land")
    assert redis_number(own_redis.url, "ZCARD", "llp:rl:{user:blip}:conc") == 0
    await limiter.aclose()
    await redis.aclose()


async def test_a_lost_reply_drops_the_connection_and_fails_the_batch(redis_url: str) -> None:
    """redis-py answers nil for a read that failed underneath when it set no timeout itself
    (the batch has one deadline of its own): that must fail the batch and drop the
    connection, not pass as an answer on a connection whose replies are out of step."""
    from quota.pipeline import AutoPipeline

    redis = make_client(redis_url, ROOMY)
    pipeline = AutoPipeline(redis)
    assert await pipeline.call("PING") in (b"PONG", "PONG", True)
    conn = pipeline._conn
    real = conn.read_response

    async def lost(*args: object, **kwargs: object) -> None:
        await real(*args, **kwargs)
        return None

    conn.read_response = lost
    with pytest.raises(redis_sync.exceptions.ConnectionError):
        await pipeline.call("PING")
    assert pipeline._conn is None and not conn.is_connected  # dropped, never used as it was
    del conn.read_response  # (the pool may hand the object out again, reconnected)
    assert await pipeline.call("PING") in (b"PONG", "PONG", True)
    await pipeline.release()
    await redis.aclose()


async def test_a_batch_past_the_socket_timeout_fails_as_redis_timeout_and_drops_it(
    redis_url: str
) -> None:
    """Redis that does not answer within the client's socket timeout: the batch fails with
    redis-py's TimeoutError (what the limiter's callers expect) and its connection, whose
    replies would come late and out of step, is dropped."""
    from quota.pipeline import AutoPipeline

    redis = make_client(redis_url, 0.25)
    pipeline = AutoPipeline(redis)
    assert await pipeline.call("PING") in (b"PONG", "PONG", True)
    conn = pipeline._conn
    slow = make_client(redis_url, 5)
    await slow.execute_command("CLIENT", "PAUSE", "800", "ALL")  # Redis silent for 0.8 s
    try:
        with pytest.raises(redis_sync.exceptions.TimeoutError):
            await pipeline.call("PING")
        assert pipeline._conn is None and not conn.is_connected
    finally:
        await slow.execute_command("CLIENT", "UNPAUSE")
    assert await pipeline.call("PING") in (b"PONG", "PONG", True)
    await pipeline.release()
    await redis.aclose()
    await slow.aclose()
