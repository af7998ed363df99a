"""The one table that turns what the rooms raise (auth, quota, the model servers, the
conversations, aiohttp itself) into errors in OpenAI's shape, as the client sees them."""

from __future__ import annotations

import math

from aiohttp import web

from auth.errors import (
    CredentialRejected,
    CredentialStoreDown,
    MissingCredential,
    NotPermitted,
    TooManyFailures,
)
from proxy.api.routes import MAX_BODY
from proxy.errors import WWW_AUTHENTICATE, OpenAIError
from proxy.state.conversations import ConversationsUnavailable
from proxy.upstream.backends import (
    ModelLoading,
    ModelNotFound,
    NoBackend,
    UpstreamBroke,
    UpstreamTimeout,
    UpstreamUnreachable,
    upstream_error,
)
from proxy.upstream.catalog import NoRoom
from quota.limiter import LimitsUnavailable, RateLimited
from quota.slots import Busy
from quota.windows import WINDOW_NAMES


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
            return OpenAIError(404, f"The model `{str(exc.model)[:200]}` does not exist",
                               code="model_not_found", param="model")
        case ModelLoading():
            return _unavailable(str(exc) or "The model is loading; retry shortly",
                                "model_loading", exc.retry_after)
        case NoRoom():
            return _unavailable(str(exc), "no_room_for_model", exc.retry_after)
        case NoBackend():
            return _unavailable(f"No model server is available ({exc.reasons})",
                                "backend_unavailable", exc.retry_after)
        case UpstreamTimeout() | UpstreamBroke():
            return upstream_error(exc)
        case UpstreamUnreachable():
            return OpenAIError(502, "The model server could not be reached",
                               code="upstream_unreachable")
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
