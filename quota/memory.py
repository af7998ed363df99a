"""The sliding windows in this process's memory: the fallback while Redis is unreachable (one
process only), with the same rule as the Lua script in quota/admit.lua."""

from __future__ import annotations

import asyncio
import time

from quota.windows import Counts, Window

Entry = tuple[float, str, int]  # (score, request id, cost)


def _leaves(window: Window, score: float, now: float) -> int:
    """Milliseconds until an entry leaves its window (a lease: until it expires)."""
    return int(score - now if window.kind == "c" else score + window.window_ms - now)


class MemoryStorage:
    def __init__(self) -> None:
        self._sets: dict[str, list[Entry]] = {}

    def _live(self, window: Window, now: float) -> list[Entry]:
        entries = self._sets.setdefault(window.key, [])
        horizon = now if window.kind == "c" else now - window.window_ms
        drop = 0
        while drop < len(entries) and entries[drop][0] <= horizon:
            drop += 1
        del entries[:drop]
        return entries

    async def admit(self, request_id: str, windows: list[Window]) -> Counts:
        now = time.time() * 1000
        allowed, retry, used, resets = True, 0, [], []
        for w in windows:
            entries = self._live(w, now)
            total = sum(cost for _, _, cost in entries)
            used.append(total)
            resets.append(_leaves(w, entries[0][0], now) if entries else 0)
            if total + w.cost > w.limit:
                allowed = False
                retry = max(retry, _wait(w, entries, total, now))
        if allowed:
            for i, w in enumerate(windows):
                score = now + w.window_ms if w.kind == "c" else now
                self._sets[w.key].append((score, request_id, w.cost))
                used[i] += w.cost
        return Counts(allowed, retry, used, resets)

    def settle(self, request_id: str, charged: list[tuple[Window, int]],
               leases: list[Window]) -> asyncio.Future[None]:
        for window, actual in charged:
            entries = self._sets.get(window.key, [])
            for i, (score, rid, _) in enumerate(entries):
                if rid == request_id:
                    entries[i] = (score, rid, actual)
        for window in leases:
            entries = self._sets.get(window.key, [])
            entries[:] = [e for e in entries if e[1] != request_id]
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        done.set_result(None)
        return done

    async def flush(self) -> None:
        """Nothing is ever queued here."""


def _wait(window: Window, entries: list[Entry], total: int, now: float) -> int:
    """How long until enough leaves the window for this request to fit."""
    if window.kind == "c":
        return 1000  # a lease is usually released long before it expires: retry in a second
    need, freed = total + window.cost - window.limit, 0
    for score, _, cost in entries:
        freed += cost
        if freed >= need:
            return _leaves(window, score, now)
    return window.window_ms
