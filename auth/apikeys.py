"""API keys kept hashed in Redis, and the JWT revocation list beside them.

A key looks like `sk-<prefix>_<secret>`: the 8-character prefix names it (safe to show and log),
only the SHA-256 of the whole key is stored. Verified lookups are cached in process for
key_cache_ttl seconds, so a request does not cost a Redis round trip and a revocation still takes
effect within seconds everywhere. While Redis is down, keys seen recently keep working from the
cache; unknown ones get 503.
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import hmac
import logging
import re
import secrets
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import orjson
from redis.asyncio import Redis
from redis.exceptions import RedisError

from auth.errors import CredentialRejected, CredentialStoreDown
from auth.principal import Principal, model_set, positive_int, scope_set

log = logging.getLogger("proxy.auth")

KEY_PATTERN = re.compile(r"sk-([a-z0-9]{8})_([A-Za-z0-9_-]{20,200})")
INDEX = "llp:keys"
STALE_LIMIT = 3600.0  # how long a cached key may serve while Redis is unreachable
CACHE_MAX = 10_000
JTI_DEFAULT_TTL = 400 * 86400
# Set the given fields of an existing record; nothing if it does not exist. Returns the record.
UPDATE_LUA = """
if redis.call("EXISTS", KEYS[1]) == 0 then return {} end
redis.call("HSET", KEYS[1], unpack(ARGV))
return redis.call("HGETALL", KEYS[1])
"""


def record_key(prefix: str) -> str:
    return f"llp:key:{{{prefix}}}"  # hash-tagged: each key's data stays on one cluster slot


def jti_key(jti: str) -> str:
    return f"llp:jti:{{{jti}}}"


def digest(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def parse_key(credential: str) -> str | None:
    """The prefix of a well-formed key, else None."""
    match = KEY_PATTERN.fullmatch(credential)
    return match.group(1) if match else None


@dataclass
class KeyRecord:
    prefix: str
    name: str
    hash: str = field(repr=False)
    owner: str = ""
    created: float = 0.0
    expires: float | None = None
    last_used: float | None = None
    scopes: list[str] = field(default_factory=lambda: ["inference"])
    models: list[str] | None = None
    rpm: int | None = None
    tpm: int | None = None
    disabled: bool = False
    revoked: float | None = None

    def to_redis(self) -> dict[str, str]:
        return {k: orjson.dumps(v).decode() for k, v in asdict(self).items()}

    @classmethod
    def from_redis(cls, data: dict[str, str]) -> KeyRecord:
        known = cls.__dataclass_fields__
        return cls(**{k: orjson.loads(v) for k, v in data.items() if k in known})

    def public(self) -> dict[str, Any]:
        """Everything but the hash, for listings."""
        out = asdict(self)
        del out["hash"]
        out["status"] = self.status()
        return out

    def status(self, now: float | None = None) -> str:
        if self.revoked:
            return "revoked"
        if self.disabled:
            return "disabled"
        if self.expires is not None and self.expires <= (now or time.time()):
            return "expired"
        return "active"

    @functools.cached_property
    def principal(self) -> Principal:
        """Built once per fetched record: requests served from the cache reuse it."""
        return Principal(id=f"key:{self.prefix}", kind="apikey", scopes=scope_set(self.scopes),
                         models=model_set(self.models), rpm=positive_int(self.rpm),
                         tpm=positive_int(self.tpm), credential=self.prefix)


class KeyStore:
    def __init__(self, redis: Redis, cache_ttl: float) -> None:
        self.redis = redis
        self.cache_ttl = cache_ttl
        self._keys: dict[str, tuple[KeyRecord | None, float]] = {}
        self._jtis: dict[str, tuple[bool, float]] = {}
        self._touches: set[asyncio.Task[Any]] = set()
        self._update = redis.register_script(UPDATE_LUA)

    # -- managing keys ---------------------------------------------------------------------
    async def create(self, name: str, *, owner: str = "", scopes: list[str] | None = None,
                     models: list[str] | None = None, expires: float | None = None,
                     rpm: int | None = None, tpm: int | None = None) -> tuple[str, KeyRecord]:
        """A new key; the caller shows it once, since only its hash is kept."""
        while True:
            prefix = secrets.token_hex(4)
            key = f"sk-{prefix}_{secrets.token_urlsafe(32)}"
            record = KeyRecord(prefix=prefix, name=name, hash=digest(key), owner=owner,
                               created=time.time(), expires=expires,
                               scopes=scopes or ["inference"], models=models or None,
                               rpm=rpm, tpm=tpm)
            # HSETNX on the hash field guards against the (tiny) chance of a prefix collision.
            if await self.redis.hsetnx(record_key(prefix), "prefix", orjson.dumps(prefix).decode()):
                break
        await self.redis.hset(record_key(prefix), mapping=record.to_redis())
        await self.redis.sadd(INDEX, prefix)
        return key, record

    async def get(self, prefix: str) -> KeyRecord | None:
        data = await self.redis.hgetall(record_key(prefix))
        return KeyRecord.from_redis(data) if data else None

    async def list(self) -> list[KeyRecord]:
        prefixes = sorted(await self.redis.smembers(INDEX))
        records = [await self.get(p) for p in prefixes]
        return sorted((r for r in records if r), key=lambda r: r.created)

    async def update(self, prefix: str, **changes: Any) -> KeyRecord | None:
        """Write only the changed fields, and only if the key exists, in one atomic step: a
        concurrent revoke is never undone by rewriting the whole record."""
        unknown = set(changes) - set(KeyRecord.__dataclass_fields__)
        if unknown:
            raise ValueError(f"not a key field: {sorted(unknown)}")
        mapping = [x for name, value in changes.items()
                   for x in (name, orjson.dumps(value).decode())]
        if not mapping:
            return await self.get(prefix)
        data = await self._update(keys=[record_key(prefix)], args=mapping)
        self._keys.pop(prefix, None)
        if not data:
            return None
        return KeyRecord.from_redis(dict(zip(data[0::2], data[1::2], strict=True)))

    async def revoke(self, prefix: str) -> bool:
        return await self.update(prefix, revoked=time.time()) is not None

    # -- JWT revocation --------------------------------------------------------------------
    async def revoke_jti(self, jti: str, expires_at: float | None = None) -> None:
        ttl = int(expires_at - time.time()) + 60 if expires_at else JTI_DEFAULT_TTL
        await self.redis.set(jti_key(jti), "1", ex=max(ttl, 60))
        self._jtis.pop(jti, None)

    async def jti_revoked(self, jti: str) -> bool:
        """Cached like keys; while Redis is down JWTs keep working (documented policy)."""
        if not jti:
            return False
        now = time.monotonic()
        cached = self._jtis.get(jti)
        if cached and now - cached[1] < self.cache_ttl:
            return cached[0]
        try:
            revoked = bool(await self.redis.exists(jti_key(jti)))
        except (RedisError, OSError):
            return cached[0] if cached else False
        self._remember(self._jtis, jti, revoked, now)
        return revoked

    # -- verifying a presented key ---------------------------------------------------------
    async def verify(self, key: str) -> Principal:
        prefix = parse_key(key)
        if prefix is None:
            raise CredentialRejected("malformed API key", kind="malformed")
        record, fetched = await self._lookup(prefix)
        if record is None or not hmac.compare_digest(record.hash, digest(key)):
            raise CredentialRejected(f"unknown API key {prefix}", kind="unknown")
        status = record.status()
        if status != "active":
            raise CredentialRejected(f"API key {prefix} is {status}", f"API key {status}",
                                     kind=status)
        if fetched:  # a real use, recorded at most once per cache period
            self._touch(prefix)
        return record.principal

    async def _lookup(self, prefix: str) -> tuple[KeyRecord | None, bool]:
        """The record (from the cache while it is fresh) and whether it came from Redis now."""
        now = time.monotonic()
        cached = self._keys.get(prefix)
        if cached and now - cached[1] < self.cache_ttl:
            return cached[0], False
        try:
            record = await self.get(prefix)
        except (RedisError, OSError) as exc:
            if cached and cached[0] is not None and now - cached[1] < STALE_LIMIT:
                return cached[0], False
            log.warning("key store unreachable (%s); refusing unverified key %s",
                        type(exc).__name__, prefix)
            raise CredentialStoreDown from None
        self._remember(self._keys, prefix, record, now)
        return record, True

    def _touch(self, prefix: str) -> None:
        """Record last use in the background, at most once per cache period per key."""
        task = asyncio.create_task(self._write_last_used(prefix))
        self._touches.add(task)
        task.add_done_callback(self._touches.discard)

    async def _write_last_used(self, prefix: str) -> None:
        try:
            now = orjson.dumps(time.time()).decode()
            await self._update(keys=[record_key(prefix)], args=["last_used", now])
        except (RedisError, OSError):
            pass

    async def drain(self) -> None:
        """Wait for the background last-used writes (before the Redis client closes)."""
        await asyncio.gather(*self._touches, return_exceptions=True)

    @staticmethod
    def _remember(cache: dict[str, Any], name: str, value: Any, now: float) -> None:
        if len(cache) >= CACHE_MAX:
            cache.clear()  # bounded: a flood of made-up keys cannot grow memory
        cache[name] = (value, now)
