"""Brute-force protection: too many failed authentications from one client IP block it a while."""

from __future__ import annotations

import collections
import time

MAX_TRACKED = 50_000


class FailureGuard:
    def __init__(self, limit: int, window: float) -> None:
        self.limit = limit
        self.window = window
        self._failures: dict[str, collections.deque[float]] = {}
        self._blocked: dict[str, float] = {}

    def blocked_for(self, ip: str) -> int:
        """Seconds this IP must still wait (0 when it may try)."""
        until = self._blocked.get(ip)
        if until is None:
            return 0
        left = until - time.monotonic()
        if left <= 0:
            del self._blocked[ip]
            return 0
        return int(left) + 1

    def record(self, ip: str) -> None:
        now = time.monotonic()
        if len(self._failures) >= MAX_TRACKED:
            self._failures.clear()  # bounded memory under a spray of addresses
        recent = self._failures.setdefault(ip, collections.deque())
        recent.append(now)
        while recent and now - recent[0] > self.window:
            recent.popleft()
        if len(recent) >= self.limit:
            self._blocked[ip] = now + self.window
            recent.clear()
