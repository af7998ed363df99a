"""Sliding-window rate limits in Redis: requests and tokens per principal, requests per IP,
concurrent requests per principal; one atomic script per request.

Tokens are reserved when a request is admitted (prompt estimate + max_tokens) and settled to the
real usage when it ends, so a burst of long generations cannot overshoot a budget. While Redis is
unreachable the same windows are kept in process (policy "open", the default) or requests are
refused (policy "closed"); Redis is tried again every second.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from redis.asyncio import Redis
from redis.exceptions import RedisError

from auth.pipeline import AutoPipeline, PipelinedScript
from auth.principal import Principal
from config import Settings
from proxy.ids import new_id

log = logging.getLogger("proxy.ratelimit")

ADMIT_LUA = (Path(__file__).parent / "ratelimit.lua").read_text()
SETTLE_LUA = (Path(__file__).parent / "ratelimit_settle.lua").read_text()
DAY_MS = 86_400_000
LEASE_MS = 3_600_000  # backstop for a lease whose process died; normal requests release it
REDIS_RETRY_S = 1.0
REQUEST_WINDOWS = ("rpm", "rpd", "ip_rpm")


@dataclass(frozen=True, slots=True)
class Window:
    name: str  # rpm, rpd, tpm, ip_rpm, concurrency
    key: str
    kind: str  # "r": requests (one each); "t": tokens (weighted); "c": concurrency leases
    limit: int
    window_ms: int
    cost: int


@dataclass
class Admission:
    id: str
    windows: list[Window]
    used: list[int]
    resets_ms: list[int]
    allowed: bool
    retry_ms: int
    in_redis: bool
    usage: int | None = None  # real tokens, once the response reports them
    chunks: int = 0  # streamed events seen, the fallback measure when usage never came
    prompt_estimate: int = 0
    settled: bool = field(default=False, repr=False)

    def spent(self) -> int:
        """Real usage if the answer said; else, if the client left mid-stream, the prompt plus
        what was streamed (about a token an event); nothing if nothing was generated."""
        if self.usage is not None:
            return self.usage
        return self.prompt_estimate + self.chunks if self.chunks else 0

    @property
    def token_window(self) -> Window | None:
        return next((w for w in self.windows if w.name == "tpm"), None)

    def denied(self) -> list[Window]:
        return [w for w, used in zip(self.windows, self.used, strict=True)
                if used + w.cost > w.limit]

    def headers(self) -> dict[str, str]:
        """OpenAI's x-ratelimit-* headers for the binding request and token windows."""
        out: dict[str, str] = {}
        for label, names in (("requests", REQUEST_WINDOWS), ("tokens", ("tpm",))):
            rows = [(w, u, r) for w, u, r in zip(self.windows, self.used, self.resets_ms,
                                                 strict=True) if w.name in names]
            if not rows:
                continue
            window, used, reset = min(rows, key=lambda row: row[0].limit - row[1])
            out[f"x-ratelimit-limit-{label}"] = str(window.limit)
            out[f"x-ratelimit-remaining-{label}"] = str(max(window.limit - used, 0))
            # A window that was empty before this request resets when this request leaves it.
            out[f"x-ratelimit-reset-{label}"] = duration((reset or window.window_ms) if used
                                                         else 0)
        return out


def duration(ms: int) -> str:
    """OpenAI's reset format: 20ms, 1.5s, 6m0s, 1h2m3s."""
    if ms < 1000:
        return f"{max(ms, 0)}ms"
    seconds = ms / 1000
    if seconds < 60:
        return f"{seconds:.3g}s"
    minutes, secs = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes}m{secs}s" if hours else f"{minutes}m{secs}s"


def _tag(identity: str) -> str:
    """Braces would break the hash tag that keeps one principal's keys on one cluster slot."""
    return identity.replace("{", "(").replace("}", ")")


def plan(settings: Settings, principal: Principal, ip: str, tokens: int) -> list[Window]:
    """The windows that apply to this request; per-credential limits beat the global ones."""
    minute = int(settings.limit_window * 1000)
    who = f"llp:rl:{{{_tag(principal.id)}}}"
    windows: list[Window] = []
    rpm = principal.rpm or settings.limit_rpm
    if rpm:
        windows.append(Window("rpm", f"{who}:rpm", "r", rpm, minute, 1))
    if settings.limit_rpd:
        windows.append(Window("rpd", f"{who}:rpd", "r", settings.limit_rpd, DAY_MS, 1))
    tpm = principal.tpm or settings.limit_tpm
    if tpm:
        # Never reserve more than the whole budget, or a large request could never run.
        windows.append(Window("tpm", f"{who}:tpm", "t", tpm, minute, max(min(tokens, tpm), 1)))
    if settings.limit_concurrency:
        windows.append(Window("concurrency", f"{who}:conc", "c", settings.limit_concurrency,
                              LEASE_MS, 1))
    if settings.limit_ip_rpm:
        windows.append(Window("ip_rpm", f"llp:rl:{{ip:{_tag(ip)}}}:rpm", "r",
                              settings.limit_ip_rpm, minute, 1))
    return windows


class StoreDown(Exception):
    """Redis is unreachable and the policy is to refuse."""


class RateLimiter:
    def __init__(self, redis: Redis, settings: Settings) -> None:
        self.settings = settings
        self.pipeline = AutoPipeline(redis)
        self._admit = PipelinedScript(self.pipeline, ADMIT_LUA)
        self._settle = PipelinedScript(self.pipeline, SETTLE_LUA)
        self.local = LocalWindows()
        self.degraded = False
        self._retry_redis_at = 0.0

    async def admit(self, principal: Principal, ip: str, tokens: int) -> Admission | None:
        windows = plan(self.settings, principal, ip, tokens)
        if not windows:
            return None
        request_id = new_id()
        if time.monotonic() >= self._retry_redis_at:
            sent = self._admit.send([w.key for w in windows], [request_id, *_window_args(windows)])
            try:
                # Shielded: a caller that leaves while Redis decides must not leave a lease or
                # a reservation behind that nobody settles.
                result = await asyncio.shield(sent)
            except asyncio.CancelledError:
                sent.add_done_callback(lambda done: self._abandoned(request_id, windows, done))
                raise
            except (RedisError, OSError) as exc:
                self._failed(exc)
            else:
                self._recovered()
                return _admission(request_id, windows, [int(x) for x in result], True)
        if self.settings.limit_on_redis_down == "closed":
            raise StoreDown
        allowed, retry, rows = self.local.admit(request_id, windows)
        return _admission(request_id, windows, [allowed, retry, *rows], False)

    def settle(self, admission: Admission) -> None:
        """Charge real usage instead of the reservation and release the lease; call once.

        Queued on the auto-pipeline without waiting: it rides with other requests' calls.
        """
        if admission.settled or not admission.allowed:
            return
        admission.settled = True
        charges = []
        token_window = admission.token_window
        if token_window is not None:
            charges.append((token_window, max(admission.spent(), 0)))
        leases = [w for w in admission.windows if w.kind == "c"]
        if not charges and not leases:
            return
        if not admission.in_redis:
            self.local.settle(admission.id, charges, leases)
            return
        args: list[str | int] = [admission.id, len(charges)]
        for window, actual in charges:
            args += [window.cost, actual]
        keys = [w.key for w, _ in charges] + [w.key for w in leases]
        self._settle.send(keys, args).add_done_callback(
            lambda done: self._settled(admission.id, done))

    def _abandoned(self, request_id: str, windows: list[Window], done: asyncio.Future[Any]
                   ) -> None:
        """Redis admitted a request whose caller had already left: give everything back."""
        if done.cancelled() or done.exception() is not None:
            return
        admission = _admission(request_id, windows, [int(x) for x in done.result()], True)
        admission.usage = 0  # nothing reached the model
        self.settle(admission)

    async def aclose(self) -> None:
        """Send what is still queued (settlements), before the Redis client closes."""
        await self.pipeline.flush()

    @staticmethod
    def _settled(request_id: str, done: asyncio.Future[Any]) -> None:
        exc = None if done.cancelled() else done.exception()
        if exc is not None:
            # The lease's TTL is the backstop; the reservation stands as the charge.
            log.warning("could not settle request %s in Redis (%s: %s)", request_id,
                        type(exc).__name__, exc)

    def _failed(self, exc: BaseException) -> None:
        self._retry_redis_at = time.monotonic() + REDIS_RETRY_S
        if not self.degraded:
            self.degraded = True
            policy = self.settings.limit_on_redis_down
            log.error("rate limiter: Redis unreachable (%s); %s", type(exc).__name__,
                      "enforcing the same limits in process" if policy == "open"
                      else "refusing requests (limit_on_redis_down = closed)")

    def _recovered(self) -> None:
        if self.degraded:
            self.degraded = False
            log.warning("rate limiter: Redis is back; shared limits restored")


def _window_args(windows: list[Window]) -> list[str | int]:
    args: list[str | int] = []
    for w in windows:
        args += [w.kind, w.limit, w.window_ms, w.cost]
    return args


def _admission(request_id: str, windows: list[Window], result: list[int], in_redis: bool
               ) -> Admission:
    rows = result[2:]
    return Admission(id=request_id, windows=windows, used=rows[0::2], resets_ms=rows[1::2],
                     allowed=bool(result[0]), retry_ms=result[1], in_redis=in_redis)


def _leaves(window: Window, score: float, now: float) -> int:
    """Milliseconds until an entry leaves its window (a lease: until it expires)."""
    return int(score - now if window.kind == "c" else score + window.window_ms - now)


class LocalWindows:
    """The same sliding windows in process, for when Redis is unreachable (one process only)."""

    def __init__(self) -> None:
        self._sets: dict[str, list[tuple[float, str, int]]] = {}  # key -> [(score, id, cost)]

    def _live(self, key: str, kind: str, window: int, now: float) -> list[tuple[float, str, int]]:
        entries = self._sets.setdefault(key, [])
        horizon = now if kind == "c" else now - window
        drop = 0
        while drop < len(entries) and entries[drop][0] <= horizon:
            drop += 1
        del entries[:drop]
        return entries

    def admit(self, request_id: str, windows: list[Window]) -> tuple[int, int, list[int]]:
        now = time.time() * 1000
        allowed, retry, rows = 1, 0, []
        for w in windows:
            entries = self._live(w.key, w.kind, w.window_ms, now)
            total = sum(cost for _, _, cost in entries)
            rows += [total, _leaves(w, entries[0][0], now) if entries else 0]
            if total + w.cost > w.limit:
                allowed = 0
                need, freed, wait = total + w.cost - w.limit, 0, w.window_ms
                if w.kind == "c":
                    wait, freed = 1000, need
                for score, _, cost in entries:
                    if freed >= need:
                        break
                    freed += cost
                    if freed >= need:
                        wait = _leaves(w, score, now)
                retry = max(retry, wait)
        if allowed:
            for i, w in enumerate(windows):
                score = now + w.window_ms if w.kind == "c" else now
                self._sets[w.key].append((score, request_id, w.cost))
                rows[i * 2] += w.cost
        return allowed, retry, rows

    def settle(self, request_id: str, charges: list[tuple[Window, int]],
               leases: list[Window]) -> None:
        for window, actual in charges:
            entries = self._sets.get(window.key, [])
            for i, (score, rid, _) in enumerate(entries):
                if rid == request_id:
                    entries[i] = (score, rid, actual)
        for window in leases:
            entries = self._sets.get(window.key, [])
            entries[:] = [e for e in entries if e[1] != request_id]
