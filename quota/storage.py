"""Where the windows are counted: the storage interface, with two implementations that must
enforce the same rule (tests/quota/test_windows.py runs every case against both):
quota/redis_storage.py (shared by every process and machine using one Redis) and
quota/memory.py (this process only; the fallback while Redis is unreachable)."""

from __future__ import annotations

import asyncio
from typing import Protocol

from quota.windows import Counts, Window


class Storage(Protocol):
    async def admit(self, request_id: str, windows: list[Window]) -> Counts:
        """Admit one request against every window at once, or record nothing."""
        ...

    def settle(self, request_id: str, charged: list[tuple[Window, int]],
               leases: list[Window]) -> asyncio.Future[None]:
        """Replace token reservations by their real use and release leases; queued, not
        waited for (the future tells how it went)."""
        ...

    async def flush(self) -> None:
        """Wait until everything queued has been carried out."""
        ...
