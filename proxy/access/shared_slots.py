"""--workers N: the first process lends its models to the other workers.

The bound on requests reaching each model, the turn-taking across principals and the decision to
start or stop a model must hold across every worker, so they are made once, in the first
process (its catalog and each model's FairQueue), and the extra workers borrow from it over an
owner-only UNIX socket in the data dir. One process granting is simpler than leases in Redis: a
grant is one local round trip, a waiter needs no polling, one start serves every worker, and a
worker that dies gives its slots back the moment its connection closes.

The protocol is JSON lines. Worker to lender: {"op": "acquire", "id": n, "who": principal,
"model": name, "slot": bool} (the model started if it must be, held, and one of its slots if
slot), {"op": "release", "id": n} (for a lease granted or still waited for: the lender knows
which), and {"op": "stats", "id": n}. Lender to worker: {"id": n, "ok": true}, {"id": n,
"refused": kind, "message": text, "retry_after": s} or {"id": n, "stats": {...}}. An
operator's {"op": "admin" | "load" | "unload" | "restart" | "reload", "id": n, "model": name}
is answered with the admin view, {"id": n, "stats": {...}}. A grant names the child to send
to ("child": [name, url, key]) when the model runs in the first process: a restart moves it.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import os
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import orjson

from proxy.observe.logs import register_secret
from proxy.upstream.backends import Backend, ModelLoading, ModelNotFound, NoBackend, State
from proxy.upstream.catalog import Catalog, Hold, NoRoom, Unloaded
from quota.slots import SHUTTING_DOWN, Busy, QueueClosed, QueueFull, QueueTimeout

log = logging.getLogger("proxy.slots")

BUSY_ERRORS: dict[str, type[Busy]] = {e.code: e for e in (QueueFull, QueueTimeout, QueueClosed)}
OPERATIONS = ("admin", "load", "unload", "restart", "reload")
LENDER_GRACE = 5.0  # a borrower gives up this long after the lender's own waits


def refusal(exc: Exception) -> tuple[str, str, int]:
    """An error of the lender's, as the borrower raises it again: kind, message, retry-after."""
    match exc:
        case Busy():
            return exc.code, str(exc), exc.retry_after
        case ModelNotFound():
            return "model_not_found", str(exc.model), 0
        case NoBackend():
            return "backend_unavailable", exc.reasons, exc.retry_after
        case ModelLoading() | NoRoom():
            return type(exc).__name__, str(exc), exc.retry_after
        case Unloaded():
            return "Unloaded", str(exc), 0
    log.exception("slot lender: an unexpected error")  # the worker hears of it at once
    return "backend_unavailable", "an internal error (see the appliance's log)", 5


def refused(kind: str, message: str, retry_after: int) -> Exception:
    if kind in BUSY_ERRORS:
        return BUSY_ERRORS[kind](message)
    if kind == "model_not_found":
        return ModelNotFound(message)
    error: Exception
    if kind == "backend_unavailable":
        error = NoBackend(message)
    elif kind == "NoRoom":
        error = NoRoom(message)
    elif kind == "ModelLoading":
        error = ModelLoading(message)
    elif kind == "Unloaded":
        error = Unloaded(message)
    else:
        error = Busy(message)
    error.retry_after = retry_after  # type: ignore[attr-defined]
    return error


class SlotLender:
    """Serves the first process's catalog to the extra workers."""

    def __init__(self, catalog: Catalog, path: Path,
                 reload: Callable[[], Awaitable[Any]] | None = None) -> None:
        """reload: re-reads the configuration (an operator's, asked of a worker)."""
        self.catalog = catalog
        self.reload = reload
        self.path = path
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()
        self._tasks: set[asyncio.Task[None]] = set()

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
                    leases[lease] = asyncio.create_task(self._grant(
                        writer, leases, lease, str(message["who"]), message.get("model"),
                        bool(message.get("slot", True))))
                elif message["op"] == "release":
                    self._end(leases.pop(lease, None))
                elif message["op"] == "stats":
                    _send(writer, {"id": lease, "stats": await self.catalog.public()})
                elif message["op"] in OPERATIONS:  # an operator's, asked of a worker
                    self._tasks.add(task := asyncio.create_task(self._operate(
                        writer, lease, message["op"], message.get("model"))))
                    task.add_done_callback(self._tasks.discard)
                else:
                    raise KeyError(message["op"])
        except (ConnectionError, orjson.JSONDecodeError, KeyError) as exc:
            log.warning("slot lender: a worker's connection failed (%s)", type(exc).__name__)
        finally:
            for entry in leases.values():  # a worker gone: its slots come back at once
                self._end(entry)
            writer.close()
            self._writers.discard(writer)

    async def _grant(self, writer: asyncio.StreamWriter, leases: dict[int, Any], lease: int,
                     who: str, name: str | None, slot: bool) -> None:
        try:
            model = self.catalog.find(name)
            hold = await self.catalog.enter(model, who, slot)
        except Exception as exc:
            leases.pop(lease, None)
            kind, message, retry_after = refusal(exc)
            _send(writer, {"id": lease, "refused": kind, "message": message,
                           "retry_after": retry_after})
            return
        leases[lease] = hold  # no await since the grant: a release now finds it
        grant: dict[str, Any] = {"id": lease, "ok": True}
        child = model.child
        if child is not None and child in model.ready_backends():  # where it runs now (a
            grant["child"] = [child.name, child.base_url, child.api_key]  # restart moves it)
        _send(writer, grant)

    async def _operate(self, writer: asyncio.StreamWriter, lease: int, op: str,
                       name: str | None) -> None:
        try:
            if op == "reload" and self.reload is not None:
                await self.reload()
            elif op != "admin":
                model = self.catalog.find(name)
                work = {"load": self.catalog.load, "unload": self.catalog.unload,
                        "restart": self.catalog.restart}[op]
                await work(model)
        except Exception as exc:
            kind, message, retry_after = refusal(exc)
            _send(writer, {"id": lease, "refused": kind, "message": message,
                           "retry_after": retry_after})
            return
        _send(writer, {"id": lease, "stats": await self.catalog.admin()})

    def _end(self, entry: Any) -> None:
        if isinstance(entry, Hold):
            self.catalog.leave(entry)
        elif isinstance(entry, asyncio.Task):
            entry.cancel()  # still waiting; if granted this very turn, the queue passes it on


def _send(writer: asyncio.StreamWriter, message: dict[str, Any]) -> None:
    if not writer.is_closing():
        writer.write(orjson.dumps(message) + b"\n")


class SlotBorrower:
    """A worker's view of the first process's catalog: use() as Catalog.use()."""

    def __init__(self, path: Path, timeout: float, on_lost: Callable[[], None]) -> None:
        """timeout: the longest the lender may make a request wait (for room, a start and a
        slot); on_lost: called if the lender goes away while we still serve (the worker
        restarts)."""
        self.path = path
        self.timeout = timeout
        self.on_lost = on_lost
        self.closed = False
        self._ids = itertools.count()
        self._replies: dict[int, asyncio.Future[dict[str, Any]]] = {}
        self._writer: asyncio.StreamWriter | None = None
        self._reader: asyncio.Task[None] | None = None
        # Models the lender said cannot answer (a start failed), until their backoff ends: so
        # this worker refuses them before rate limits are charged, as the first process does.
        self._down: dict[str, tuple[float, str]] = {}
        self._children: dict[str, Backend] = {}

    def refuse_early(self, model: str) -> None:
        until, reasons = self._down.get(model, (0.0, ""))
        left = until - time.monotonic()
        if left > 0:
            error = NoBackend(reasons)
            error.retry_after = max(1, round(left))
            raise error

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
    async def use(self, model: str, who: str, slot: bool) -> AsyncIterator[Backend | None]:
        """As Catalog.use, in the first process; yields the child to send to, when the model
        runs there (its address moves with a restart)."""
        lease = next(self._ids)
        reply = await self._ask({"op": "acquire", "id": lease, "who": who, "model": model,
                                 "slot": slot}, self.timeout + LENDER_GRACE)
        if "refused" in reply:
            if reply["refused"] == "backend_unavailable" and reply["retry_after"]:
                self._down[model] = (time.monotonic() + reply["retry_after"], reply["message"])
            raise refused(reply["refused"], reply["message"], int(reply["retry_after"]))
        try:
            yield self._child(*reply["child"]) if "child" in reply else None
        finally:
            self._tell({"op": "release", "id": lease})

    def _child(self, name: str, url: str, key: str) -> Backend:
        """One Backend per child address, kept (its parsed URLs are reused)."""
        known = self._children.get(url)
        if known is None or known.api_key != key:
            known = self._children[url] = Backend(name, url, key, supervised=True,
                                                  llama_cpp=True, state=State.READY)
            register_secret(key)
        return known

    async def stats(self) -> dict[str, Any]:
        try:
            reply = await self._ask({"op": "stats", "id": next(self._ids)}, 2.0)
        except Busy:
            return {"models": [], "status": "down", "lender": "unreachable"}
        return reply["stats"]

    async def operate(self, op: str, model: str = "") -> dict[str, Any]:
        """An operator's view (admin), load or unload, done by the first process: its
        catalog's admin view."""
        reply = await self._ask({"op": op, "id": next(self._ids), "model": model},
                                self.timeout + LENDER_GRACE)
        if "refused" in reply:
            raise refused(reply["refused"], reply["message"], int(reply["retry_after"]))
        return reply["stats"]

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
