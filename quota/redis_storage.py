"""The sliding windows in Redis: one atomic Lua script admits a request against every window
(quota/admit.lua), another settles it (quota/settle.lua), both riding the auto-pipeline so calls
made in the same loop turn share a round trip. Redis's own clock is used, so every process and
machine sharing the Redis enforces one limit."""

from __future__ import annotations

import asyncio
from pathlib import Path

from redis.asyncio import Redis

from quota.pipeline import AutoPipeline, PipelinedScript
from quota.windows import Counts, Window

ADMIT_LUA = (Path(__file__).parent / "admit.lua").read_text()
SETTLE_LUA = (Path(__file__).parent / "settle.lua").read_text()


class RedisStorage:
    def __init__(self, redis: Redis) -> None:
        self.pipeline = AutoPipeline(redis)
        self._admit = PipelinedScript(self.pipeline, ADMIT_LUA)
        self._settle = PipelinedScript(self.pipeline, SETTLE_LUA)

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
        return self._settle.send(keys, args)

    async def flush(self) -> None:
        await self.pipeline.flush()
