"""Reading a caller's rate-limit state straight from Redis in tests: the tokens its token window
holds (reservations in flight, settlements after) and its open concurrency leases."""

from __future__ import annotations

import redis as redis_sync


def charged(url: str, who: str) -> int:
    """Tokens in the user's per-minute window: reservations of requests in flight, the real
    cost of those settled."""
    client = redis_sync.Redis.from_url(url)
    try:
        return int(client.get(f"llp:rl:{{user:{who}}}:tpm:sum") or 0)
    finally:
        client.close()


def leases(url: str, who: str) -> int:
    """The user's requests holding a concurrency lease now."""
    client = redis_sync.Redis.from_url(url)
    try:
        return int(client.zcard(f"llp:rl:{{user:{who}}}:conc"))
    finally:
        client.close()
