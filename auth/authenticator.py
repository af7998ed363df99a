"""Turn the credential a request presents into a Principal, or an AuthError saying why not."""

from __future__ import annotations

import hmac
from collections.abc import Mapping

from auth.apikeys import KeyStore, parse_key
from auth.errors import CredentialRejected, MissingCredential
from auth.principal import ADMIN, INFERENCE, Principal
from auth.tokens import MAX_TOKEN_BYTES, TokenVerifier

ADMIN_PRINCIPAL = Principal(id="admin", kind="admin", scopes=frozenset({ADMIN, INFERENCE}),
                            credential="admin-key")
_DEV_USER_MAX = 64


def presented_credential(headers: Mapping[str, str]) -> str | None:
    """`Authorization: Bearer <x>` or `X-API-Key: <x>`; garbage is a 401, not a crash."""
    auth = headers.get("Authorization")
    if auth is not None:
        scheme, _, value = auth.strip().partition(" ")
        if scheme.lower() != "bearer" or not value.strip():
            raise CredentialRejected("Authorization header is not `Bearer <credential>`",
                                     kind="malformed")
        credential = value.strip()
    else:
        credential = headers.get("X-API-Key", "").strip()
        if not credential:
            return None
    if (len(credential) > MAX_TOKEN_BYTES or not credential.isascii()
            or not credential.isprintable() or len(credential.split()) != 1):
        raise CredentialRejected("credential is oversized or not printable ASCII",
                                 kind="malformed")
    return credential


class Authenticator:
    def __init__(self, keys: KeyStore, tokens: TokenVerifier, *, required: bool,
                 dev_mode: bool, admin_key: str | None) -> None:
        """dev_mode: without a credential, X-User-Id names the user (loopback development
        only, and never while credentials are required)."""
        self.keys = keys
        self.tokens = tokens
        self.required = required
        self.dev_mode = dev_mode and not required
        self.admin_key = admin_key

    async def identify(self, headers: Mapping[str, str], client_ip: str, *, admin: bool = False
                       ) -> Principal:
        credential = presented_credential(headers)
        if credential is None:
            return self._without_credential(headers, client_ip, admin)
        admin_key = self.admin_key
        if admin_key and hmac.compare_digest(credential.encode(), admin_key.encode()):
            return ADMIN_PRINCIPAL
        if self.tokens.looks_like_jwt(credential):
            principal = await self.tokens.verify(credential)
            if await self.keys.jti_revoked(principal.credential):
                raise CredentialRejected(f"JWT {principal.credential} is revoked", "Token revoked",
                                         kind="revoked")
            return principal
        if parse_key(credential):
            return await self.keys.verify(credential)
        raise CredentialRejected("credential is neither a JWT nor an API key")

    def _without_credential(self, headers: Mapping[str, str], client_ip: str, admin: bool
                            ) -> Principal:
        user = headers.get("X-User-Id")
        if admin or self.required:
            if user:
                raise CredentialRejected(
                    "X-User-Id sent without a credential while auth is required",
                    "X-User-Id is accepted only in development mode")
            raise MissingCredential
        if user and self.dev_mode:
            if len(user) > _DEV_USER_MAX or not user.isprintable():
                raise CredentialRejected("malformed X-User-Id")
            return Principal(id=f"user:{user}", kind="dev")
        return Principal(id=f"ip:{client_ip}", kind="anonymous")
