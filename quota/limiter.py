"""The limiter: admits requests against their windows in Redis, settles them afterwards, and
keeps the same windows in process while Redis is unreachable (policy "open", the default) or
refuses (policy "closed"); Redis is tried again every second."""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

from redis.asyncio import Redis
from redis.exceptions import RedisError

from quota.memory import MemoryStorage
from quota.redis_storage import RedisStorage
from quota.storage import Storage
from quota.windows import Admission, Counts, Limits, Window, charges, plan

log = logging.getLogger("proxy.ratelimit")

REDIS_RETRY_S = 1.0


class LimitsUnavailable(Exception):
    """Redis is unreachable and the policy is to refuse."""


class RateLimited(Exception):
    """A window has no room for this request; the admission says which and for how long."""

    def __init__(self, admission: Admission) -> None:
        super().__init__("rate limited")
        self.admission = admission


class Limiter:
    def __init__(self, shared: Storage, limits: Limits, *, fail_open: bool = True,
                 local: Storage | None = None) -> None:
        """shared: where the windows are kept for every process (Redis); local: the fallback
        while it is unreachable (this process's memory)."""
        self.limits = limits
        self.fail_open = fail_open
        self.shared = shared
        self.local = local or MemoryStorage()
        self.degraded = False
        self._retry_redis_at = 0.0
        self._checking: set[asyncio.Future[Counts]] = set()

    @classmethod
    def on_redis(cls, redis: Redis, limits: Limits, *, fail_open: bool = True) -> Limiter:
        return cls(RedisStorage(redis), limits, fail_open=fail_open)

    async def admit(self, request_id: str, who: str, ip: str, tokens: int, *,
                    rpm: int | None = None, tpm: int | None = None) -> Admission | None:
        """The request's admission (allowed or not), or None when no limit applies."""
        windows = plan(self.limits, who, ip, tokens, rpm=rpm, tpm=tpm)
        if not windows:
            return None
        if time.monotonic() >= self._retry_redis_at:
            checking = asyncio.ensure_future(self.shared.admit(request_id, windows))
            self._checking.add(checking)
            checking.add_done_callback(self._checking.discard)
            try:
                # Shielded: a caller that leaves while Redis decides must not leave a lease or
                # a reservation behind that nobody settles.
                counts = await asyncio.shield(checking)
            except asyncio.CancelledError:
                checking.add_done_callback(lambda done: self._abandoned(request_id, windows,
                                                                        done))
                raise
            except (RedisError, OSError) as exc:
                self._failed(exc)
            else:
                self._recovered()
                return Admission(request_id, windows, counts, in_store=True)
        if not self.fail_open:
            raise LimitsUnavailable
        counts = await self.local.admit(request_id, windows)
        return Admission(request_id, windows, counts, in_store=False)

    @property
    def round_trips(self) -> int:
        """Batches sent to the shared store so far (checks and settlements ride together)."""
        return int(getattr(self.shared, "round_trips", 0))

    def settle(self, admission: Admission) -> None:
        """Charge real usage instead of the reservation and release the lease; once each.
        Queued, not waited for: it rides with other requests' calls."""
        if admission.settled or not admission.allowed:
            return
        admission.settled = True
        charged, leases = charges(admission)
        if not charged and not leases:
            return
        storage = self.shared if admission.in_store else self.local
        storage.settle(admission.id, charged, leases).add_done_callback(
            lambda done: _log_failed_settle(admission.id, done))

    async def aclose(self) -> None:
        """Send what is still queued before the Redis client closes: checks still under way
        (a caller that left gives its admission back when the answer comes), then settlements."""
        while self._checking:
            await asyncio.gather(*self._checking, return_exceptions=True)
            await asyncio.sleep(0)  # their give-backs are queued by callbacks of their own
        await self.shared.flush()

    def _abandoned(self, request_id: str, windows: list[Window], done: asyncio.Future[Any]
                   ) -> None:
        """Redis admitted a request whose caller had already left: give everything back."""
        if done.cancelled() or done.exception() is not None:
            return
        admission = Admission(request_id, windows, done.result(), in_store=True)
        admission.usage = 0  # nothing reached the model
        self.settle(admission)

    def _failed(self, exc: BaseException) -> None:
        self._retry_redis_at = time.monotonic() + REDIS_RETRY_S
        if not self.degraded:
            self.degraded = True
            log.error("rate limiter: Redis unreachable (%s); %s", type(exc).__name__,
                      "enforcing the same limits in process" if self.fail_open
                      else "refusing requests (limit_on_redis_down = closed)")

    def _recovered(self) -> None:
        if self.degraded:
            self.degraded = False
            log.warning("rate limiter: Redis is back; shared limits restored")


def _log_failed_settle(request_id: str, done: asyncio.Future[Any]) -> None:
    exc = None if done.cancelled() else done.exception()
    if exc is not None:
        # The lease's TTL is the backstop; the reservation stands as the charge.
        log.warning("could not settle request %s in Redis (%s: %s)", request_id,
                    type(exc).__name__, exc)
