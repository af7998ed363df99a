"""Why a caller is not let in, independent of HTTP; the edge maps each to an OpenAI error.

`message` goes to the client; `reason` goes to the log and may say more (never a secret).
"""

from __future__ import annotations


class AuthError(Exception):
    def __init__(self, message: str, *, reason: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.reason = reason or message


class CredentialRejected(AuthError):
    """No valid credential. One vague message for every bad one, so probing learns nothing.
    kind: a word for the metrics (invalid, malformed, expired, revoked, unknown, missing)."""

    def __init__(self, reason: str, message: str = "Invalid credential", *,
                 kind: str = "invalid") -> None:
        super().__init__(message, reason=reason)
        self.kind = kind


class MissingCredential(CredentialRejected):
    def __init__(self) -> None:
        super().__init__("no credential", "Missing credential: send `Authorization: Bearer "
                         "<token or key>` or `X-API-Key: <key>`", kind="missing")


class NotPermitted(AuthError):
    """A valid credential without the scope or model it needs."""

    def __init__(self, message: str, *, reason: str | None = None, param: str | None = None,
                 code: str = "insufficient_scope") -> None:
        super().__init__(message, reason=reason)
        self.param = param
        self.code = code


class CredentialStoreDown(AuthError):
    """The key store is unreachable and this key is not known from before."""

    retry_after = 5

    def __init__(self) -> None:
        super().__init__("The credential store is unavailable; retry shortly")


class TooManyFailures(AuthError):
    """This client address failed too often lately; it may try again in retry_after seconds."""

    def __init__(self, retry_after: int) -> None:
        super().__init__("Too many failed authentication attempts; try again later")
        self.retry_after = retry_after
