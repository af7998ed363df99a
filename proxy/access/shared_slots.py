"""--workers N: the first process lends the model's slots to the other workers.

The bound on requests reaching the model, and the turn-taking across principals, must hold across
every worker, so there is one FairQueue, in the first process, and the extra workers borrow slots
from it over an owner-only UNIX socket in the data dir. One process granting is simpler than
leases in Redis: a grant is one local round trip, a waiter needs no polling, and a worker that
dies gives its slots back the moment its connection closes.

The protocol is JSON lines. Worker to lender: {"op": "acquire", "id": n, "who": principal},
{"op": "release", "id": n} (for a slot held or still waited for: the lender knows which), and
{"op": "stats", "id": n}. Lender to worker: {"id": n, "ok": true}, {"id": n, "busy": code,
"message": text} or {"id": n, "stats": {...}}.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import os
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import orjson

from quota.slots import SHUTTING_DOWN, Busy, FairQueue, QueueClosed, QueueFull, QueueTimeout

log = logging.getLogger("proxy.slots")

BUSY_ERRORS: dict[str, type[Busy]] = {e.code: e for e in (QueueFull, QueueTimeout, QueueClosed)}
LENDER_GRACE = 5.0  # a borrower gives up this long after the lender's own queue timeout
_HELD = object()  # a lease whose slot is granted (else its entry is the task waiting for it)


class SlotLender:
    """Serves the first process's FairQueue to the extra workers."""

    def __init__(self, queue: FairQueue, path: Path) -> None:
        self.queue = queue
        self.path = path
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()

    async def start(self) -> None:
        self.path.unlink(missing_ok=True)  # named after our pid: a stale one is ours to remove
        self._server = await asyncio.start_unix_server(self._serve, path=str(self.path))
        os.chmod(self.path, 0o600)

    async def close(self) -> None:
        """Stop lending; connections still open are closed, so their slots come back."""
        if self._server is not None:
            self._server.close()
            for writer in list(self._writers):
                writer.close()  # each connection's reader sees its end and cleans up
            await self._server.wait_closed()
        self.path.unlink(missing_ok=True)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._writers.add(writer)
        leases: dict[int, Any] = {}
        try:
            async for line in reader:
                message = orjson.loads(line)
                lease = message["id"]
                if message["op"] == "acquire":
                    leases[lease] = asyncio.create_task(
                        self._grant(writer, leases, lease, str(message["who"])))
                elif message["op"] == "release":
                    self._end(leases.pop(lease, None))
                else:
                    _send(writer, {"id": lease, "stats": await self.queue.stats()})
        except (ConnectionError, orjson.JSONDecodeError, KeyError) as exc:
            log.warning("slot lender: a worker's connection failed (%s)", type(exc).__name__)
        finally:
            for entry in leases.values():  # a worker gone: its slots come back at once
                self._end(entry)
            writer.close()
            self._writers.discard(writer)

    async def _grant(self, writer: asyncio.StreamWriter, leases: dict[int, Any], lease: int,
                     who: str) -> None:
        try:
            await self.queue.acquire(who)
        except Busy as exc:
            leases.pop(lease, None)
            _send(writer, {"id": lease, "busy": exc.code, "message": str(exc)})
            return
        leases[lease] = _HELD  # no await since the grant: a release now finds it held
        _send(writer, {"id": lease, "ok": True})

    def _end(self, entry: Any) -> None:
        if entry is _HELD:
            self.queue.release()
        elif isinstance(entry, asyncio.Task):
            entry.cancel()  # still waiting; if granted this very turn, the queue passes it on


def _send(writer: asyncio.StreamWriter, message: dict[str, Any]) -> None:
    if not writer.is_closing():
        writer.write(orjson.dumps(message) + b"\n")


class SlotBorrower:
    """A worker's view of the first process's queue, with the FairQueue's interface."""

    def __init__(self, path: Path, slots: int, timeout: float,
                 on_lost: Callable[[], None]) -> None:
        """on_lost: called if the lender goes away while we still serve (the worker restarts)."""
        self.path = path
        self.slots = slots
        self.timeout = timeout
        self.on_lost = on_lost
        self.closed = False
        self._ids = itertools.count()
        self._replies: dict[int, asyncio.Future[dict[str, Any]]] = {}
        self._writer: asyncio.StreamWriter | None = None
        self._reader: asyncio.Task[None] | None = None

    async def connect(self) -> None:
        reader, self._writer = await asyncio.open_unix_connection(str(self.path))
        self._reader = asyncio.create_task(self._read(reader), name="slot-borrower")

    async def aclose(self) -> None:
        self.close()
        if self._writer is not None:
            self._writer.close()
        if self._reader is not None:
            self._reader.cancel()
            await asyncio.gather(self._reader, return_exceptions=True)

    @asynccontextmanager
    async def slot(self, who: str) -> AsyncIterator[None]:
        lease = next(self._ids)
        reply = await self._ask({"op": "acquire", "id": lease, "who": who},
                                self.timeout + LENDER_GRACE)
        if "busy" in reply:
            raise BUSY_ERRORS.get(reply["busy"], Busy)(reply["message"])
        try:
            yield
        finally:
            self._tell({"op": "release", "id": lease})

    async def stats(self) -> dict[str, Any]:
        try:
            reply = await self._ask({"op": "stats", "id": next(self._ids)}, 2.0)
        except Busy:
            return {"slots": self.slots, "shared": True, "lender": "unreachable"}
        return {**reply["stats"], "shared": True}

    def close(self) -> None:
        """Shutting down: pending requests are refused (the lender releases what they had)."""
        self.closed = True
        for future in self._replies.values():
            if not future.done():
                future.set_exception(QueueClosed(SHUTTING_DOWN))

    async def _ask(self, message: dict[str, Any], limit: float) -> dict[str, Any]:
        if self.closed or self._writer is None or self._writer.is_closing():
            raise QueueClosed(SHUTTING_DOWN)
        future: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self._replies[message["id"]] = future
        self._tell(message)
        try:
            async with asyncio.timeout(limit):
                return await future
        except BaseException as exc:
            if message["op"] == "acquire":  # gave up: the lender drops or frees it
                self._tell({"op": "release", "id": message["id"]})
            if isinstance(exc, TimeoutError):
                raise QueueTimeout("The model stayed busy; retry shortly") from None
            raise
        finally:
            self._replies.pop(message["id"], None)

    def _tell(self, message: dict[str, Any]) -> None:
        if self._writer is not None:
            _send(self._writer, message)

    async def _read(self, reader: asyncio.StreamReader) -> None:
        try:
            async for line in reader:
                reply = orjson.loads(line)
                future = self._replies.get(reply["id"])
                if future is not None and not future.done():
                    future.set_result(reply)
        except Exception as exc:  # whatever broke the connection, the lender is lost
            log.error("slot lender connection failed (%s)", type(exc).__name__)
        if self.closed:
            return  # we are shutting down ourselves
        log.error("slot lender went away; this worker restarts to reconnect")
        self.close()
        self.on_lost()
