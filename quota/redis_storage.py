"""The sliding windows in Redis: one atomic Lua script admits a request against every window
(quota/admit.lua), another settles it (quota/settle.lua), both riding the auto-pipeline so calls
made in the same loop turn share a round trip; settlements are deferred to ride with the next
check. Redis's own clock is used, so every process and machine sharing the Redis enforces one
limit. A settlement Redis could not take is tried again (settle.lua is idempotent) for about a
minute; until it lands, the reservation stands as the charge."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

from redis.asyncio import Redis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from quota.pipeline import AutoPipeline, PipelinedScript, copy_result
from quota.windows import Counts, Window

ADMIT_LUA = (Path(__file__).parent / "admit.lua").read_text()
SETTLE_LUA = (Path(__file__).parent / "settle.lua").read_text()


# Seconds between tries of a settlement while Redis is away (about a minute in all).
SETTLE_RETRIES = (0.5, 1.0, 2.0, 4.0, 8.0, 16.0, 30.0)
UNREACHABLE = (RedisConnectionError, RedisTimeoutError, OSError)
Retry = tuple[asyncio.TimerHandle, list[str], list[str | int]]


class RedisStorage:
    def __init__(self, redis: Redis) -> None:
        self.pipeline = AutoPipeline(redis)
        self._admit = PipelinedScript(self.pipeline, ADMIT_LUA)
        self._settle = PipelinedScript(self.pipeline, SETTLE_LUA)
        self._retries: dict[asyncio.Future[None], Retry] = {}  # by the caller's future
        self._closing = False

    async def admit(self, request_id: str, windows: list[Window]) -> Counts:
        args: list[str | int] = [request_id]
        for w in windows:
            args += [w.kind, w.limit, w.window_ms, w.cost]
        result = [int(x) for x in await self._admit.send([w.key for w in windows], args)]
        rows = result[2:]
        return Counts(bool(result[0]), result[1], rows[0::2], rows[1::2])

    def settle(self, request_id: str, charged: list[tuple[Window, int]],
               leases: list[Window]) -> asyncio.Future[None]:
        args: list[str | int] = [request_id, len(charged)]
        for window, actual in charged:
            args += [window.cost, actual]
        keys = [w.key for w, _ in charged] + [w.key for w in leases]
        result: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._try_settle(keys, args, result, 0)
        return result

    def _try_settle(self, keys: list[str], args: list[str | int], result: asyncio.Future[None],
                    attempt: int) -> None:
        sent = self._settle.send(keys, args, deferred=True)
        sent.add_done_callback(lambda done: self._tried(done, keys, args, result, attempt))

    def _tried(self, done: asyncio.Future[Any], keys: list[str], args: list[str | int],
               result: asyncio.Future[None], attempt: int) -> None:
        exc = None if done.cancelled() else done.exception()
        if (isinstance(exc, UNREACHABLE) and attempt < len(SETTLE_RETRIES)
                and not self._closing):
            loop = asyncio.get_running_loop()
            handle = loop.call_later(SETTLE_RETRIES[attempt], self._retry, keys, args, result,
                                     attempt + 1)
            self._retries[result] = (handle, keys, args)
            return
        copy_result(done, result)

    def _retry(self, keys: list[str], args: list[str | int], result: asyncio.Future[None],
               attempt: int) -> None:
        self._retries.pop(result, None)
        self._try_settle(keys, args, result, attempt)

    @property
    def round_trips(self) -> int:
        return self.pipeline.round_trips

    async def flush(self) -> None:
        """At shutdown: settlements waiting to be tried again get one last try now (none is
        scheduled after this); then everything queued is sent and answered."""
        self._closing = True
        for result, (handle, keys, args) in list(self._retries.items()):
            handle.cancel()
            self._try_settle(keys, args, result, len(SETTLE_RETRIES))
        self._retries.clear()
        await self.pipeline.release()
