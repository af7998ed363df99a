"""Auto-pipelining: Redis calls made in the same event-loop turn travel in one round trip.

At one request at a time nothing waits (the batch is sent on the next turn of the loop); under
load, dozens of rate-limit checks share a round trip and redis-py's per-call overhead.
"""

from __future__ import annotations

import asyncio
import hashlib
from typing import Any

from redis.asyncio import Redis
from redis.exceptions import NoScriptError


class AutoPipeline:
    def __init__(self, redis: Redis) -> None:
        self.redis = redis
        self._pending: list[tuple[tuple[Any, ...], asyncio.Future[Any]]] = []
        self._sending: set[asyncio.Task[None]] = set()

    def call(self, *command: Any) -> asyncio.Future[Any]:
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        if not self._pending:
            # The task starts on the next turn of the loop and takes everything queued by then.
            task = asyncio.create_task(self._send())
            self._sending.add(task)
            task.add_done_callback(self._sending.discard)
        self._pending.append((command, future))
        return future

    async def flush(self) -> None:
        """Wait until every queued call has been sent and answered (before the client closes:
        a settlement still queued would otherwise be lost)."""
        while self._sending:
            await asyncio.gather(*self._sending, return_exceptions=True)

    async def _send(self) -> None:
        batch, self._pending = self._pending, []
        try:
            pipe = self.redis.pipeline(transaction=False)
            for command, _ in batch:
                pipe.execute_command(*command)
            results = await pipe.execute(raise_on_error=False)
        except BaseException as exc:  # the connection failed: every caller learns it
            for _, future in batch:
                if not future.done():
                    future.set_exception(exc if isinstance(exc, Exception) else
                                         ConnectionError("cancelled"))
            return
        for (_, future), result in zip(batch, results, strict=True):
            if future.done():
                continue
            if isinstance(result, Exception):
                future.set_exception(result)
            else:
                future.set_result(result)


class PipelinedScript:
    """A Lua script run by SHA through the auto-pipeline; its source is sent only when Redis does
    not know it yet (first use, or a Redis that restarted empty), which also registers it."""

    def __init__(self, pipeline: AutoPipeline, source: str) -> None:
        self.pipeline = pipeline
        self.source = source
        self.sha = hashlib.sha1(source.encode()).hexdigest()  # the name Redis gives the script

    def send(self, keys: list[str], args: list[Any]) -> asyncio.Future[Any]:
        """Queue a call without waiting for it (the returned future tells how it went)."""
        result: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        first = self.pipeline.call("EVALSHA", self.sha, len(keys), *keys, *args)
        first.add_done_callback(lambda done: self._resend_if_unknown(done, result, keys, args))
        return result

    def _resend_if_unknown(self, done: asyncio.Future[Any], result: asyncio.Future[Any],
                           keys: list[str], args: list[Any]) -> None:
        if result.done():
            return
        exc = None if done.cancelled() else done.exception()
        if isinstance(exc, NoScriptError):
            again = self.pipeline.call("EVAL", self.source, len(keys), *keys, *args)
            again.add_done_callback(lambda second: _copy(second, result))
        else:
            _copy(done, result)



def _copy(source: asyncio.Future[Any], target: asyncio.Future[Any]) -> None:
    if target.done():
        return
    if source.cancelled():
        target.cancel()
    elif (exc := source.exception()) is not None:
        target.set_exception(exc)
    else:
        target.set_result(source.result())
