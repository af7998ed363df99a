"""The usage ledger: requests and prompt/completion tokens per principal per day (UTC), in Redis.

Counts are added up in memory and written in batches (HINCRBY, so any number of processes can
write the same day), at least every FLUSH_EVERY seconds and on close; a batch that cannot be
written (Redis away) is kept and tried again, so a blip loses nothing. A batch whose reply is
lost after Redis applied it is counted again when retried: counts are at least once. Each
day's record expires `retention_days` after that day.

    llp:usage:{principal}:2026-12-03   hash: requests, prompt_tokens, completion_tokens
    llp:usage:days:2026-12-03          set of the principals with usage that day
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import logging
import time
from dataclasses import dataclass

from redis.asyncio import Redis
from redis.exceptions import RedisError

log = logging.getLogger("quota.ledger")

FLUSH_EVERY = 0.5  # seconds between batches
MAX_BACKOFF = 60.0  # the longest wait between tries while Redis is away
MAX_DAYS = 366  # the longest range one read may ask for
EARLIEST = dt.date(2000, 1, 1)  # keeps the date arithmetic far from year 1
FIELDS = ("requests", "prompt_tokens", "completion_tokens")
PREFIX = "llp:usage:"


@dataclass
class Row:
    principal: str
    date: str  # YYYY-MM-DD, UTC
    requests: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens

    def public(self) -> dict[str, object]:
        return {"principal": self.principal, "date": self.date, "requests": self.requests,
                "prompt_tokens": self.prompt_tokens,
                "completion_tokens": self.completion_tokens, "total_tokens": self.total_tokens}


def total(rows: list[Row]) -> dict[str, int]:
    """The sum of rows: requests, prompt, completion and total tokens."""
    out = {"requests": sum(r.requests for r in rows),
           "prompt_tokens": sum(r.prompt_tokens for r in rows),
           "completion_tokens": sum(r.completion_tokens for r in rows)}
    out["total_tokens"] = out["prompt_tokens"] + out["completion_tokens"]
    return out


def today() -> dt.date:
    return dt.datetime.now(dt.UTC).date()


def day_key(principal: str, day: str) -> str:
    return f"{PREFIX}{principal}:{day}"


def index_key(day: str) -> str:
    return f"{PREFIX}days:{day}"


def days(start: dt.date, end: dt.date) -> list[str]:
    """The days from start to end (none if start is later), at most the MAX_DAYS up to end."""
    count = min((end - start).days + 1, MAX_DAYS)
    return [(end - dt.timedelta(days=i)).isoformat() for i in reversed(range(count))]


def date_range(start: str | None, end: str | None, default_days: int
               ) -> tuple[dt.date, dt.date]:
    """The days one read covers, from `from`/`to` query values (YYYY-MM-DD; `to` defaults to
    today, `from` to default_days before it): at most MAX_DAYS, ending at `to`; ValueError
    for what is not a date."""
    last = parse_day(end, today())
    given = parse_day(start, EARLIEST)  # checked whatever `to` says
    if last < EARLIEST:  # nothing was kept then: an empty range, without date arithmetic
        return EARLIEST, last
    first = given if start is not None else last - dt.timedelta(days=default_days - 1)
    return max(first, last - dt.timedelta(days=MAX_DAYS - 1)), last


class Ledger:
    def __init__(self, redis: Redis, retention_days: int) -> None:
        self.redis = redis
        self.retention_s = retention_days * 86400
        self._pending: dict[tuple[str, str], list[int]] = {}
        self._task: asyncio.Task[None] | None = None
        self._lock = asyncio.Lock()
        self._warned = 0.0

    @property
    def enabled(self) -> bool:
        return self.retention_s > 0

    def record(self, principal: str, prompt: int, completion: int) -> None:
        """One model request of `principal` (no I/O: written with the next batch)."""
        if not self.enabled or not principal:
            return
        counts = self._pending.setdefault((principal, today().isoformat()), [0, 0, 0])
        counts[0] += 1
        counts[1] += max(prompt, 0)
        counts[2] += max(completion, 0)
        if self._task is None or self._task.done():
            self._task = asyncio.create_task(self._keep_writing())

    async def _keep_writing(self) -> None:
        """While anything is pending (counted during a write, or kept from a failed one):
        wait, write; waits double (to a minute) while Redis does not take the batches."""
        delay = FLUSH_EVERY
        while self._pending:
            await asyncio.sleep(delay)
            delay = FLUSH_EVERY if await self.flush() else min(delay * 2, MAX_BACKOFF)

    async def flush(self) -> bool:
        """Write what is pending; False (and it stays pending) if Redis did not take it."""
        async with self._lock:
            batch, self._pending = self._pending, {}
            if not batch:
                return True
            try:
                await self._write(batch)
            except BaseException as exc:  # cancelled too: the batch is kept, not dropped
                for key, counts in batch.items():  # back in line, merged with newer counts
                    merged = self._pending.setdefault(key, [0, 0, 0])
                    for i, value in enumerate(counts):
                        merged[i] += value
                if not isinstance(exc, RedisError | OSError):
                    raise
                self._warn(exc)
                return False
            return True

    async def _write(self, batch: dict[tuple[str, str], list[int]]) -> None:
        pipe = self.redis.pipeline(transaction=False)
        for (principal, day), counts in batch.items():
            key = day_key(principal, day)
            for name, value in zip(FIELDS, counts, strict=True):
                if value:
                    pipe.hincrby(key, name, value)
            pipe.sadd(index_key(day), principal)
            expires = self._expiry(day)
            pipe.expireat(key, expires)
            pipe.expireat(index_key(day), expires)
        await pipe.execute()

    def _expiry(self, day: str) -> int:
        start = dt.datetime.fromisoformat(day).replace(tzinfo=dt.UTC).timestamp()
        return int(start + 86400 + self.retention_s)

    def _warn(self, exc: Exception) -> None:
        now = time.monotonic()
        if now - self._warned > 60:
            self._warned = now
            log.warning("usage ledger: Redis did not take a batch (%s); kept, retrying", exc)

    async def aclose(self) -> None:
        """Write what is pending (a batch under way when cancelled here is kept for this)."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        if not await self.flush():
            lost = sum(c[0] for c in self._pending.values())
            log.error("usage ledger: %d requests' usage could not be written at shutdown", lost)

    # -- reading -----------------------------------------------------------------------------
    async def read(self, principal: str | None, start: dt.date, end: dt.date) -> list[Row]:
        """Rows for one principal (or every principal) over [start, end], oldest first, days
        without usage left out."""
        dates = days(start, end)
        await self.flush()  # what this process has counted so far is included
        if principal is not None:
            wanted = [(principal, day) for day in dates]
        else:
            pipe = self.redis.pipeline(transaction=False)
            for day in dates:
                pipe.smembers(index_key(day))
            members = await pipe.execute()
            wanted = [(_text(who), day) for day, found in zip(dates, members, strict=True)
                      for who in sorted(found, key=_text)]
        pipe = self.redis.pipeline(transaction=False)
        for who, day in wanted:
            pipe.hmget(day_key(who, day), *FIELDS)
        values = await pipe.execute() if wanted else []
        rows = []
        for (who, day), counts in zip(wanted, values, strict=True):
            if any(counts):
                rows.append(Row(who, day, *(int(c or 0) for c in counts)))
        return rows


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


def parse_day(value: str | None, default: dt.date) -> dt.date:
    if value is None:
        return default
    try:
        return dt.date.fromisoformat(value)
    except ValueError:
        raise ValueError(f"`{value}` is not a date (YYYY-MM-DD)") from None
