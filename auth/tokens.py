"""JWTs: issue them (generate_token.py, /admin/tokens) and verify them on every request.

The accepted algorithms come from settings, never from the token; exp is required; iss/aud are
required when configured. HS* tokens use a secret (generated once into the data dir, owner-only);
RS*/ES* tokens use a public key file or a JWKS whose key is picked by the token's kid.
"""

from __future__ import annotations

import asyncio
import math
import os
import secrets
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jwt

from auth.errors import CredentialRejected
from auth.principal import Principal, model_set, positive_int, scope_set
from config import Settings

VERIFIED_CACHE_MAX = 10_000
VERIFIED_CACHE_SECONDS = 300.0
MAX_TOKEN_BYTES = 4096  # below aiohttp's 8190-byte header limit, so this check is reachable
SECRET_FILE = "jwt.secret"


def load_or_create_secret(settings: Settings) -> str:
    """The HS* secret: from settings, else <data_dir>/jwt.secret, created owner-only once."""
    if settings.jwt_secret:
        return settings.jwt_secret
    path = settings.data_dir / SECRET_FILE
    settings.data_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        return path.read_text().strip()
    secret = secrets.token_urlsafe(48)
    with os.fdopen(fd, "w") as fh:
        fh.write(secret + "\n")
    return secret


def _uses_hmac(settings: Settings) -> bool:
    return settings.jwt_algorithms[0].startswith("HS")


class LocalJwks:
    """A JWKS file picked by kid, re-read when it changes, so keys rotate without a restart.

    Whether it changed is checked at most once a second (a stat() is blocking I/O on the event
    loop, and tokens with made-up kids must not turn into one each).
    """

    CHECK_EVERY = 1.0

    def __init__(self, path: Path, clock: Callable[[], float] = time.monotonic) -> None:
        self.path = path
        self._clock = clock
        self._checked = -math.inf
        self._mtime = -1.0
        self._keys: dict[str, Any] = {}

    def key_for(self, token: str) -> Any:
        kid = jwt.get_unverified_header(token).get("kid")
        now = self._clock()
        if now - self._checked >= self.CHECK_EVERY:
            self._checked = now
            mtime = self.path.stat().st_mtime
            if mtime != self._mtime:
                keyset = jwt.PyJWKSet.from_json(self.path.read_text())
                self._keys = {k.key_id: k.key for k in keyset.keys if k.key_id}
                self._mtime = mtime
        if kid not in self._keys:
            raise jwt.PyJWKClientError(f"no key with kid {kid!r}")
        return self._keys[kid]


class TokenVerifier:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.algorithms = list(settings.jwt_algorithms)
        self._key: Any = None
        self._jwks: jwt.PyJWKClient | LocalJwks | None = None
        if _uses_hmac(settings):
            self._key = load_or_create_secret(settings)
        elif settings.jwt_jwks_url and settings.jwt_jwks_url.startswith(("https://", "http://")):
            self._jwks = jwt.PyJWKClient(settings.jwt_jwks_url, cache_keys=True, lifespan=300)
        elif settings.jwt_jwks_url:
            self._jwks = LocalJwks(Path(settings.jwt_jwks_url.removeprefix("file://")))
        else:
            assert settings.jwt_public_key is not None  # checked by the config loader
            self._key = Path(settings.jwt_public_key).read_text()
        # Exact token bytes -> (principal, trust until): the signature is checked once, not per
        # call; revocation is still checked per call (the jti deny-list).
        self._verified: dict[str, tuple[Principal, float]] = {}
        self._required = ["exp", "sub"]
        if settings.jwt_issuer:
            self._required.append("iss")
        if settings.jwt_audience:
            self._required.append("aud")

    @staticmethod
    def looks_like_jwt(credential: str) -> bool:
        return credential.count(".") == 2 and credential.startswith("eyJ")

    async def verify(self, token: str) -> Principal:
        """Who the token speaks for, or CredentialRejected saying why in the log."""
        now = time.time()
        cached = self._verified.get(token)
        if cached is not None and now < cached[1]:
            return cached[0]
        claims = await self._decode(token)
        principal = self._principal(claims)
        if len(self._verified) >= VERIFIED_CACHE_MAX:
            self._verified.clear()
        # Trusted until it expires (exp is required), and never longer than a few minutes.
        self._verified[token] = (principal,
                                 min(float(claims["exp"]), now + VERIFIED_CACHE_SECONDS))
        return principal

    async def _decode(self, token: str) -> dict[str, Any]:
        if len(token) > MAX_TOKEN_BYTES:
            raise CredentialRejected(f"JWT of {len(token)} bytes is over the limit",
                                     kind="malformed")
        try:
            key = self._key if self._jwks is None else await self._jwks_key(token)
            claims = jwt.decode(
                token, key, algorithms=self.algorithms, audience=self.settings.jwt_audience,
                issuer=self.settings.jwt_issuer, leeway=self.settings.jwt_leeway,
                options={"require": self._required, "verify_aud": bool(self.settings.jwt_audience)},
            )
        except jwt.ExpiredSignatureError:
            raise CredentialRejected("JWT expired", "Token expired", kind="expired") from None
        except jwt.PyJWTError as exc:
            raise CredentialRejected(f"JWT rejected: {type(exc).__name__}: {exc}") from None
        _numeric_dates(claims)
        return claims

    async def _jwks_key(self, token: str) -> Any:
        if isinstance(self._jwks, LocalJwks):
            return self._jwks.key_for(token)
        assert self._jwks is not None
        # The JWKS fetch is blocking (urllib) and cached; keep it off the event loop.
        signing = await asyncio.to_thread(self._jwks.get_signing_key_from_jwt, token)
        return signing.key

    @staticmethod
    def _principal(claims: dict[str, Any]) -> Principal:
        subject = str(claims["sub"])
        return Principal(
            id=f"user:{subject}", kind="jwt",
            scopes=scope_set(claims.get("scope", claims.get("scopes"))),
            models=model_set(claims.get("models")),
            rpm=positive_int(claims.get("rpm")), tpm=positive_int(claims.get("tpm")),
            credential=str(claims.get("jti", "")),
        )


def _numeric_dates(claims: dict[str, Any]) -> None:
    """RFC 7519's NumericDate claims are JSON numbers; PyJWT also takes numeric strings
    ("exp": "1796310000"), which no issuer of ours writes: refused."""
    for name in ("exp", "nbf", "iat"):
        value = claims.get(name)
        if name in claims and (isinstance(value, bool) or not isinstance(value, int | float)
                               or not math.isfinite(value)):
            raise CredentialRejected(f"JWT rejected: `{name}` is not a number")


def issue_token(settings: Settings, subject: str, hours: float, *, scopes: list[str] | None = None,
                models: list[str] | None = None, rpm: int | None = None, tpm: int | None = None
                ) -> tuple[str, str, int]:
    """Sign a JWT; returns (token, jti, exp)."""
    now = int(time.time())
    exp = now + int(hours * 3600)
    jti = uuid.uuid4().hex
    claims: dict[str, Any] = {"sub": subject, "iat": now, "nbf": now, "exp": exp, "jti": jti}
    if settings.jwt_issuer:
        claims["iss"] = settings.jwt_issuer
    if settings.jwt_audience:
        claims["aud"] = settings.jwt_audience
    if scopes:
        claims["scope"] = " ".join(scopes)
    if models:
        claims["models"] = list(models)
    if rpm:
        claims["rpm"] = rpm
    if tpm:
        claims["tpm"] = tpm
    algorithm = settings.jwt_algorithms[0]
    if _uses_hmac(settings):
        key: Any = load_or_create_secret(settings)
    elif settings.jwt_private_key:
        key = Path(settings.jwt_private_key).read_text()
    else:
        raise ValueError(f"{algorithm} tokens are issued by your identity provider; set "
                         "jwt_private_key to issue them here")
    return jwt.encode(claims, key, algorithm=algorithm), jti, exp
