"""Authentication failures, independent of HTTP; the proxy maps them to OpenAI errors."""

from __future__ import annotations


class AuthError(Exception):
    """401 (no valid credential), 403 (valid but not allowed), 429 (blocked) or 503 (store down).

    `message` goes to the client; `reason` goes to the log and may say more (never a secret).
    """

    def __init__(self, status: int, message: str, *, code: str, reason: str | None = None,
                 param: str | None = None, retry_after: int | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.code = code
        self.reason = reason or message
        self.param = param
        self.retry_after = retry_after


def unauthorized(reason: str, message: str = "Invalid credential") -> AuthError:
    """One vague message for every bad credential, so probing learns nothing; the log says why."""
    return AuthError(401, message, code="invalid_api_key", reason=reason)
