"""The caller, once authenticated: who, by which credential, with which scopes, models, limits."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

INFERENCE = "inference"  # /v1 and /api
ADMIN = "admin"  # /admin
DEFAULT_SCOPES = frozenset({INFERENCE})


@dataclass(frozen=True, slots=True)
class Principal:
    id: str  # stable and safe to log: "user:alice", "key:3f9a0c1d", "ip:127.0.0.1"
    kind: str  # "jwt", "apikey", "admin", "dev", "anonymous"
    scopes: frozenset[str] = DEFAULT_SCOPES
    models: frozenset[str] | None = None  # None: every model
    rpm: int | None = None  # per-credential limits, used by the rate limiter
    tpm: int | None = None
    credential: str = ""  # key prefix or jti, for revocation and logs

    def can(self, scope: str) -> bool:
        return scope in self.scopes

    def may_use(self, model: str | None) -> bool:
        return self.models is None or (model is not None and model in self.models)


def scope_set(value: object) -> frozenset[str]:
    """Scopes from a claim or a stored field: "a b" (OAuth style) or a list; default inference."""
    if isinstance(value, str):
        items: Iterable[object] = value.split()
    elif isinstance(value, list | tuple | set | frozenset):
        items = value
    else:
        return DEFAULT_SCOPES
    scopes = frozenset(str(v) for v in items if str(v))
    return scopes or DEFAULT_SCOPES


def model_set(value: object) -> frozenset[str] | None:
    if isinstance(value, str) and value:
        return frozenset(m for m in value.split(",") if m)
    if isinstance(value, list | tuple | set | frozenset) and value:
        return frozenset(str(m) for m in value)
    return None


def positive_int(value: object) -> int | None:
    try:
        number = int(value)  # type: ignore[call-overload]
    except (TypeError, ValueError):
        return None
    return number if number > 0 else None
