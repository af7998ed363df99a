"""Errors in OpenAI's shape, {"error": {"message", "type", "param", "code"}}, and the one table
that turns what the rooms raise (auth, quota, the backends, aiohttp itself) into them."""

from __future__ import annotations

import math
from collections.abc import Mapping

import orjson
from aiohttp import web

from auth.errors import (
    CredentialRejected,
    CredentialStoreDown,
    MissingCredential,
    NotPermitted,
    TooManyFailures,
)
from proxy.backends import (
    ModelLoading,
    ModelNotFound,
    NoBackend,
    UpstreamBroke,
    UpstreamTimeout,
    UpstreamUnreachable,
)
from proxy.conversations import ConversationsUnavailable
from quota.limiter import LimitsUnavailable, RateLimited
from quota.slots import Busy
from quota.windows import WINDOW_NAMES

# The "type" OpenAI clients see for each status.
ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "invalid_request_error",
    405: "invalid_request_error",
    408: "invalid_request_error",
    413: "invalid_request_error",
    414: "invalid_request_error",
    431: "invalid_request_error",
    429: "rate_limit_exceeded",
    501: "not_supported_error",
}
MAX_BODY = web.AppKey("max_body_bytes", int)  # the edge's limit, named in its 413 message
WWW_AUTHENTICATE = 'Bearer realm="llama-proxy", error="invalid_token"'


class OpenAIError(Exception):
    """An HTTP answer in OpenAI's shape; raised by the edge itself, or made by to_openai()."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        code: str | None = None,
        param: str | None = None,
        type: str | None = None,
        headers: Mapping[str, str] | None = None,
        close: bool = False,
    ) -> None:
        """close: the connection is closed after this answer (the request was not read whole)."""
        super().__init__(message)
        self.close = close
        self.status = status
        self.message = message
        self.code = code
        self.param = param
        self.type = type or ERROR_TYPES.get(status, "server_error")
        self.headers = dict(headers or {})

    def body(self) -> dict[str, dict[str, str | None]]:
        return error_body(self.message, self.type, self.code, self.param)

    def response(self) -> web.Response:
        response = web.Response(
            status=self.status,
            body=orjson.dumps(self.body()),
            content_type="application/json",
            headers=self.headers,
        )
        if self.close:
            response.force_close()
        return response

    def sse_event(self) -> bytes:
        """The same error as the SSE event that ends a stream already under way."""
        return b"data: " + orjson.dumps(self.body()) + b"\n\n"


def error_body(
    message: str, type: str, code: str | None = None, param: str | None = None
) -> dict[str, dict[str, str | None]]:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


def to_openai(exc: BaseException, request: web.Request) -> OpenAIError | None:
    """The table: each error the rooms raise, as the client sees it; None for the unexpected."""
    match exc:
        case OpenAIError():
            return exc
        case MissingCredential():
            return OpenAIError(401, exc.message, code="missing_credential",
                               headers={"WWW-Authenticate": WWW_AUTHENTICATE})
        case CredentialRejected():
            return OpenAIError(401, exc.message, code="invalid_api_key",
                               headers={"WWW-Authenticate": WWW_AUTHENTICATE})
        case NotPermitted():
            return OpenAIError(403, exc.message, code=exc.code, param=exc.param)
        case TooManyFailures():
            return OpenAIError(429, exc.message, code="auth_blocked",
                               headers={"Retry-After": str(exc.retry_after)})
        case CredentialStoreDown():
            return _unavailable(exc.message, "auth_unavailable", exc.retry_after)
        case RateLimited():
            retry = max(1, math.ceil(exc.admission.retry_ms / 1000))
            which = ", ".join(f"{WINDOW_NAMES[w.name]} (limit {w.limit})"
                              for w in exc.admission.denied())
            return OpenAIError(429, f"Rate limit reached for {which}; retry in {retry}s",
                               code="rate_limit_exceeded", type="rate_limit_exceeded",
                               headers={"Retry-After": str(retry)})
        case ConversationsUnavailable():
            return _unavailable("Conversations cannot be read or kept right now; retry shortly",
                                "conversations_unavailable", 5)
        case LimitsUnavailable():
            return _unavailable("Rate limits cannot be checked right now; retry shortly",
                                "limits_unavailable", 5)
        case Busy():
            return _unavailable(str(exc), exc.code, exc.retry_after)
        case ModelNotFound():
            return OpenAIError(404, f"The model `{exc.model}` does not exist",
                               code="model_not_found", param="model")
        case ModelLoading():
            return _unavailable("The model is loading; retry shortly", "model_loading",
                                exc.retry_after)
        case NoBackend():
            return _unavailable(f"No model server is available ({exc.reasons})",
                                "backend_unavailable", exc.retry_after)
        case UpstreamTimeout():
            return OpenAIError(504, str(exc), code="upstream_timeout")
        case UpstreamUnreachable():
            return OpenAIError(502, "The model server could not be reached",
                               code="upstream_unreachable")
        case UpstreamBroke():
            return OpenAIError(502, str(exc), code="upstream_error")
        case web.HTTPException() if exc.status >= 400:
            return _from_aiohttp(exc, request)
    return None


def _unavailable(message: str, code: str, retry_after: int) -> OpenAIError:
    return OpenAIError(503, message, code=code, headers={"Retry-After": str(retry_after)})


def _from_aiohttp(exc: web.HTTPException, request: web.Request) -> OpenAIError:
    headers = {k: v for k, v in exc.headers.items() if k.lower() in ("allow", "retry-after")}
    path = request.rel_url.raw_path  # as sent, percent-encoded: never a raw control character
    if exc.status == 404:
        message, code = f"Invalid URL ({request.method} {path})", "not_found"
    elif exc.status == 405:
        message, code = f"Method {request.method} is not allowed on {path}", None
    elif exc.status == 413:
        message = f"Request body is larger than the limit of {request.app[MAX_BODY]} bytes"
        code = "request_too_large"
    else:
        message, code = exc.reason, None
    return OpenAIError(exc.status, message, code=code, headers=headers)
