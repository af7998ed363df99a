"""Auto-pipelining: Redis calls made in the same event-loop turn travel in one round trip.

At one request at a time nothing waits (the batch is sent on the next turn of the loop); under
load, dozens of rate-limit checks share a round trip and redis-py's per-call overhead.

Deferred calls (settlements, which nobody waits for) do not travel on their own: they ride with
the next call that is sent, or go out after `defer_for` seconds if none comes, so a request's
settlement never costs a round trip of its own nor delays the next request's check.
"""

from __future__ import annotations

import asyncio
import hashlib
import math
from typing import Any

from redis.asyncio import Redis

try:
    from hiredis import pack_command as _pack_command
except ImportError:  # hiredis is optional to redis-py: its Python packer does the same
    _pack_command = None
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import NoScriptError, ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

Call = tuple[tuple[Any, ...], asyncio.Future[Any]]
DEFER_FOR = 0.2  # seconds a deferred call may wait for company


class AutoPipeline:
    """For calls that never answer nil (the limits' scripts answer arrays or 1): a nil reply is
    taken for what redis-py turns a failed read into when no timeout of its own is set."""

    def __init__(self, redis: Redis, defer_for: float = DEFER_FOR) -> None:
        self.redis = redis
        self.defer_for = defer_for
        self._pending: list[Call] = []
        self._deferred: list[Call] = []
        self._timer: asyncio.TimerHandle | None = None
        self._sending: set[asyncio.Task[None]] = set()
        self._in_flight = asyncio.Lock()
        self._conn: Any = None  # a connection of the client's pool, kept for the batches
        self.round_trips = 0  # batches sent, for the metrics

    def call(self, *command: Any) -> asyncio.Future[Any]:
        """Send on the next turn of the loop, with whatever else is queued by then."""
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        if not self._pending:
            self._start_send()
        self._pending.append((command, future))
        return future

    def defer(self, *command: Any) -> asyncio.Future[Any]:
        """Send with the next call, or within defer_for seconds."""
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._deferred.append((command, future))
        if self._timer is None:
            self._timer = asyncio.get_running_loop().call_later(self.defer_for, self._due)
        return future

    def _due(self) -> None:
        self._timer = None
        if self._deferred and not self._pending:
            self._start_send()  # a send already coming takes them along

    def _start_send(self) -> None:
        # The task starts on the next turn of the loop and takes everything queued by then.
        task = asyncio.create_task(self._send())
        self._sending.add(task)
        task.add_done_callback(self._sending.discard)

    async def flush(self) -> None:
        """Send what is deferred now and wait until every queued call has been answered
        (before the client closes: a settlement still queued would otherwise be lost)."""
        if self._deferred and not self._pending:
            self._start_send()
        while self._sending:
            await asyncio.gather(*self._sending, return_exceptions=True)

    async def _send(self) -> None:
        async with self._in_flight:  # one batch at a time: the next one gathers meanwhile
            batch, self._pending = self._deferred + self._pending, []
            self._deferred = []
            if self._timer is not None:
                self._timer.cancel()
                self._timer = None
            if not batch:
                return
            self.round_trips += 1
            try:
                results = await self._round_trip([command for command, _ in batch])
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

    async def _round_trip(self, commands: list[tuple[Any, ...]]) -> list[Any]:
        """The commands written at once on a connection of our own and their replies read
        (an error reply is returned, not raised, and the next replies are still read). The
        lean path: redis-py's Pipeline object costs more per batch than the Lua it carries."""
        conn = self._conn
        if conn is None:
            conn = self._conn = await self.redis.connection_pool.get_connection()
        try:
            # One deadline (the client's socket timeout) for the whole batch, not one per
            # reply: each asyncio deadline costs a timer, and a batch is answered at once.
            async with asyncio.timeout(conn.socket_timeout):
                await conn.send_packed_command(pack(conn, commands), check_health=False)
                replies: list[Any] = []
                for _ in commands:
                    try:
                        reply = await conn.read_response(timeout=math.inf)
                    except ResponseError as exc:
                        replies.append(exc)
                        continue
                    if reply is None:  # how redis-py reports a read that failed underneath
                        raise RedisConnectionError("Redis's reply was lost")
                    replies.append(reply)
            return replies
        except BaseException as exc:
            # Where the replies stand is unknown: this connection is never used again.
            self._conn = None
            await conn.disconnect()
            await self.redis.connection_pool.release(conn)
            if isinstance(exc, TimeoutError):  # ours: in redis-py's terms, as callers expect
                raise RedisTimeoutError("Timeout reading from Redis") from None
            raise

    async def release(self) -> None:
        """Give the connection back to the client's pool (before the client closes)."""
        await self.flush()
        conn, self._conn = self._conn, None
        if conn is not None:
            await self.redis.connection_pool.release(conn)


def pack(conn: Any, commands: list[tuple[Any, ...]]) -> bytes | list[bytes]:
    """The commands in Redis's protocol: hiredis's C packer when it is there (redis-py's own,
    in Python, takes ten times as long for a call with a few windows' arguments)."""
    if _pack_command is None:
        return conn.pack_commands(commands)  # type: ignore[no-any-return]
    return b"".join(_pack_command(command) for command in commands)


class PipelinedScript:
    """A Lua script run by SHA through the auto-pipeline; its source is sent only when Redis does
    not know it yet (first use, or a Redis that restarted empty), which also registers it."""

    def __init__(self, pipeline: AutoPipeline, source: str) -> None:
        self.pipeline = pipeline
        self.source = source
        self.sha = hashlib.sha1(source.encode()).hexdigest()  # the name Redis gives the script

    def send(self, keys: list[str], args: list[Any], *, deferred: bool = False
             ) -> asyncio.Future[Any]:
        """Queue a call without waiting for it (the returned future tells how it went);
        deferred: it may wait for the next call (AutoPipeline.defer)."""
        result: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        queue = self.pipeline.defer if deferred else self.pipeline.call
        first = queue("EVALSHA", self.sha, len(keys), *keys, *args)
        first.add_done_callback(lambda done: self._resend_if_unknown(done, result, keys, args))
        return result

    def _resend_if_unknown(self, done: asyncio.Future[Any], result: asyncio.Future[Any],
                           keys: list[str], args: list[Any]) -> None:
        if result.done():
            return
        exc = None if done.cancelled() else done.exception()
        if isinstance(exc, NoScriptError):
            again = self.pipeline.call("EVAL", self.source, len(keys), *keys, *args)
            again.add_done_callback(lambda second: copy_result(second, result))
        else:
            copy_result(done, result)



def copy_result(source: asyncio.Future[Any], target: asyncio.Future[Any]) -> None:
    if target.done():
        return
    if source.cancelled():
        target.cancel()
    elif (exc := source.exception()) is not None:
        target.set_exception(exc)
    else:
        target.set_result(source.result())
