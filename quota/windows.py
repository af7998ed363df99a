"""The rule: which sliding windows apply to a request, and what an admission decided.

A window counts requests ("r", one each), tokens ("t", weighted) or concurrency leases ("c", one
each, held until the request ends) over a length of time. A request is admitted only if every
window that applies has room; then it is recorded in all of them at once. Tokens are reserved up
front (prompt estimate + completion budget) and settled to the real usage when the request ends.
The storages (quota/redis_storage.py, quota/memory.py) keep the counts; this module holds the
plain values both speak.
"""

from __future__ import annotations

from dataclasses import dataclass, field

DAY_MS = 86_400_000
LEASE_MS = 3_600_000  # backstop for a lease whose process died; normal requests release it
REQUEST_WINDOWS = ("rpm", "rpd", "ip_rpm")
WINDOW_NAMES = {"rpm": "requests per minute", "rpd": "requests per day",
                "tpm": "tokens per minute", "concurrency": "concurrent requests",
                "ip_rpm": "requests per minute from this IP"}


@dataclass(frozen=True, slots=True)
class Limits:
    """The global limits (0 = off); per-credential rpm/tpm override the first and third."""

    rpm: int = 0
    rpd: int = 0
    tpm: int = 0
    concurrency: int = 0
    ip_rpm: int = 0
    window_s: float = 60.0  # the length of a "minute"


@dataclass(frozen=True, slots=True)
class Window:
    name: str  # rpm, rpd, tpm, ip_rpm, concurrency
    key: str
    kind: str  # "r": requests (one each); "t": tokens (weighted); "c": concurrency leases
    limit: int
    window_ms: int
    cost: int


@dataclass(frozen=True, slots=True)
class Counts:
    """What a storage answers for one admit: the decision, and per window the use and the time
    until its oldest entry leaves (used includes this request's cost when it was admitted)."""

    allowed: bool
    retry_ms: int
    used: list[int]
    resets_ms: list[int]


@dataclass
class Admission:
    """One request's standing with the limits, from admission to settlement."""

    id: str
    windows: list[Window]
    counts: Counts
    in_store: bool  # recorded in the shared store, or (store unreachable) in process
    usage: int | None = None  # tokens the request cost, once it has ended
    settled: bool = field(default=False, repr=False)

    @property
    def allowed(self) -> bool:
        return self.counts.allowed

    @property
    def retry_ms(self) -> int:
        return self.counts.retry_ms

    def spent(self) -> int:
        """What it cost, as the caller measured it (nothing if it never said)."""
        return self.usage or 0

    @property
    def token_window(self) -> Window | None:
        return next((w for w in self.windows if w.name == "tpm"), None)

    def denied(self) -> list[Window]:
        return [w for w, used in zip(self.windows, self.counts.used, strict=True)
                if used + w.cost > w.limit]

    def rows(self) -> list[tuple[Window, int, int]]:
        """(window, used, ms until its oldest entry leaves) for each window."""
        return list(zip(self.windows, self.counts.used, self.counts.resets_ms, strict=True))


def _tag(identity: str) -> str:
    """Braces would break the hash tag that keeps one principal's keys on one cluster slot."""
    return identity.replace("{", "(").replace("}", ")")


def plan(limits: Limits, who: str, ip: str, tokens: int, *, rpm: int | None = None,
         tpm: int | None = None) -> list[Window]:
    """The windows that apply to one request of `who` from `ip` that may use `tokens`;
    rpm/tpm: the credential's own limits, which beat the global ones."""
    minute = int(limits.window_s * 1000)
    prefix = f"llp:rl:{{{_tag(who)}}}"
    windows: list[Window] = []
    if rpm := rpm or limits.rpm:
        windows.append(Window("rpm", f"{prefix}:rpm", "r", rpm, minute, 1))
    if limits.rpd:
        windows.append(Window("rpd", f"{prefix}:rpd", "r", limits.rpd, DAY_MS, 1))
    if tpm := tpm or limits.tpm:
        # Never reserve more than the whole budget, or a large request could never run.
        windows.append(Window("tpm", f"{prefix}:tpm", "t", tpm, minute, max(min(tokens, tpm), 1)))
    if limits.concurrency:
        windows.append(Window("concurrency", f"{prefix}:conc", "c", limits.concurrency,
                              LEASE_MS, 1))
    if limits.ip_rpm:
        windows.append(Window("ip_rpm", f"llp:rl:{{ip:{_tag(ip)}}}:rpm", "r", limits.ip_rpm,
                              minute, 1))
    return windows


def charges(admission: Admission) -> tuple[list[tuple[Window, int]], list[Window]]:
    """What settling an admission does: token windows charged their real use instead of the
    reservation, and concurrency leases released."""
    token_window = admission.token_window
    charged = [(token_window, max(admission.spent(), 0))] if token_window is not None else []
    return charged, [w for w in admission.windows if w.kind == "c"]
