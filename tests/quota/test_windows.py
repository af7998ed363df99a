"""The rule, run against both storages: Redis (the Lua scripts) and memory (the fallback while
Redis is down) must admit, refuse, slide, reserve and settle exactly alike."""

from __future__ import annotations

import asyncio
import itertools
import time
from collections.abc import AsyncIterator

import pytest

from proxy.state.store import make_client
from quota.memory import MemoryStorage
from quota.redis_storage import RedisStorage
from quota.storage import Storage
from quota.windows import Counts, Window

_ids = itertools.count()


def rid() -> str:
    return f"req{next(_ids)}"


@pytest.fixture(params=["redis", "memory"])
async def storage(request: pytest.FixtureRequest, redis_url: str) -> AsyncIterator[Storage]:
    if request.param == "memory":
        yield MemoryStorage()
        return
    client = make_client(redis_url, 1.0)
    shared = RedisStorage(client)
    yield shared
    await shared.flush()
    await client.aclose()


def requests(limit: int, window_ms: int = 60_000, key: str = "k:rpm") -> Window:
    return Window("rpm", key, "r", limit, window_ms, 1)


def tokens(limit: int, cost: int, window_ms: int = 60_000, key: str = "k:tpm") -> Window:
    return Window("tpm", key, "t", limit, window_ms, cost)


def leases(limit: int, key: str = "k:conc") -> Window:
    return Window("concurrency", key, "c", limit, 3_600_000, 1)


async def test_exactly_n_of_many_concurrent_requests(storage: Storage) -> None:
    window = requests(20)
    results = await asyncio.gather(*(storage.admit(rid(), [window]) for _ in range(200)))
    assert sum(c.allowed for c in results) == 20
    last = await storage.admit(rid(), [window])
    assert not last.allowed and last.used == [20] and 0 < last.retry_ms <= 60_000


async def test_nothing_is_recorded_unless_every_window_has_room(storage: Storage) -> None:
    roomy, tight = requests(100, key="k:roomy"), requests(1, key="k:tight")
    assert (await storage.admit(rid(), [roomy, tight])).allowed
    refused = await storage.admit(rid(), [roomy, tight])
    assert not refused.allowed
    assert refused.used == [1, 1]  # the roomy window did not count the refused request
    assert (await storage.admit(rid(), [roomy])).used == [2]


async def test_the_window_slides(storage: Storage) -> None:
    """Bounds from the clock, not from the sleeps: a busy machine may oversleep."""
    window = requests(3, window_ms=1500)
    started = time.monotonic()
    for _ in range(3):
        assert (await storage.admit(rid(), [window])).allowed
    refused = await storage.admit(rid(), [window])
    spent_ms = (time.monotonic() - started) * 1000
    assert not refused.allowed and 1500 - spent_ms - 50 <= refused.retry_ms <= 1500
    await asyncio.sleep(0.8)  # past a fixed window's half: it might reset here, this one not
    still = await storage.admit(rid(), [window])
    assert not still.allowed or time.monotonic() - started >= 1.5, "a window let go early"
    await asyncio.sleep(max(0.0, 1.55 - (time.monotonic() - started)))  # the three have left
    assert (await storage.admit(rid(), [window])).allowed


async def test_retry_after_names_when_enough_leaves(storage: Storage) -> None:
    """The first request leaves a window after it came, not a window from now; the bounds come
    from the clock around each call (a busy machine may oversleep)."""
    window = requests(2, window_ms=1000)
    before_first = time.monotonic()
    assert (await storage.admit(rid(), [window])).allowed
    after_first = time.monotonic()
    await asyncio.sleep(0.4)
    assert (await storage.admit(rid(), [window])).allowed
    before_refused = time.monotonic()
    refused = await storage.admit(rid(), [window])
    after_refused = time.monotonic()
    assert (1 - (after_refused - before_first)) * 1000 - 20 <= refused.retry_ms
    assert refused.retry_ms <= (1 - (before_refused - after_first)) * 1000 + 20  # <= 0.6 s


async def test_tokens_are_reserved_then_settled_to_real_use(storage: Storage) -> None:
    first, second = rid(), rid()
    assert (await storage.admit(first, [tokens(300, 200)])).allowed
    refused = await storage.admit(second, [tokens(300, 200)])
    assert not refused.allowed and refused.used == [200]
    await storage.settle(first, [(tokens(300, 200), 30)], [])  # it used 30 of its 200
    admitted = await storage.admit(second, [tokens(300, 200)])
    assert admitted.allowed and admitted.used == [230]


async def test_token_retry_waits_for_enough_to_leave(storage: Storage) -> None:
    before_first = time.monotonic()
    assert (await storage.admit(rid(), [tokens(100, 60, window_ms=800)])).allowed
    after_first = time.monotonic()
    await asyncio.sleep(0.3)
    assert (await storage.admit(rid(), [tokens(100, 30, window_ms=800)])).allowed
    before_refused = time.monotonic()
    refused = await storage.admit(rid(), [tokens(100, 50, window_ms=800)])
    after_refused = time.monotonic()
    # 40 must leave: the first entry (60) does it, 0.8 s after it came (about 0.5 s from now)
    assert not refused.allowed
    assert (0.8 - (after_refused - before_first)) * 1000 - 20 <= refused.retry_ms
    assert refused.retry_ms <= (0.8 - (before_refused - after_first)) * 1000 + 20


async def test_leases_are_held_until_released(storage: Storage) -> None:
    one, two = rid(), rid()
    assert (await storage.admit(one, [leases(2)])).allowed
    assert (await storage.admit(two, [leases(2)])).allowed
    refused = await storage.admit(rid(), [leases(2)])
    assert not refused.allowed and refused.retry_ms == 1000
    await storage.settle(one, [], [leases(2)])
    assert (await storage.admit(rid(), [leases(2)])).used == [2]


async def test_counts_report_use_and_reset(storage: Storage) -> None:
    window = requests(5, window_ms=2000)
    before_first = time.monotonic()
    first = await storage.admit(rid(), [window])
    after_first = time.monotonic()
    assert first == Counts(True, 0, [1], [0])  # nothing was there before it
    await asyncio.sleep(0.2)
    before_second = time.monotonic()
    second = await storage.admit(rid(), [window])
    after_second = time.monotonic()
    assert second.allowed and second.used == [2]
    # When the first one leaves: 2 s after it came.
    assert (2 - (after_second - before_first)) * 1000 - 20 <= second.resets_ms[0]
    assert second.resets_ms[0] <= (2 - (before_second - after_first)) * 1000 + 20


async def test_redis_and_memory_agree_on_a_mixed_sequence(redis_url: str) -> None:
    """The same random-ish sequence of admits and settles, side by side."""
    client = make_client(redis_url, 1.0)
    shared, local = RedisStorage(client), MemoryStorage()
    plan = [requests(4, key="m:rpm"), tokens(500, 0, key="m:tpm"), leases(3, key="m:conc")]
    held: list[tuple[str, Window]] = []
    started = time.monotonic()
    for step in range(40):
        cost = 40 + (step * 37) % 90
        windows = [plan[0], tokens(500, cost, key="m:tpm"), plan[2]]
        request = rid()
        a, b = await asyncio.gather(shared.admit(request, windows), local.admit(request, windows))
        assert (a.allowed, a.used) == (b.allowed, b.used), step
        if a.allowed:
            held.append((request, windows[1]))
        if step % 3 == 2 and held:  # one finishes, having used a third of its reservation
            done, reserved = held.pop(0)
            charge = [(reserved, reserved.cost // 3)]
            await asyncio.gather(shared.settle(done, charge, [plan[2]]),
                                 local.settle(done, charge, [plan[2]]))
    assert time.monotonic() - started < 30
    await shared.flush()
    await client.aclose()
