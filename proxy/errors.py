"""Errors in OpenAI's shape, {"error": {"message", "type", "param", "code"}}: what every room
answers with; on Anthropic's Messages API (/v1/messages*) the same errors in Anthropic's shape,
{"type": "error", "error": {"type", "message"}}. The table that turns what the rooms raise into
them is proxy/api/failures.py."""

from __future__ import annotations

from collections.abc import Mapping

import orjson
from aiohttp import web

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


def error_type(status: int) -> str:
    """The "type" for a status: OpenAI's, else by class (4xx the caller's, 5xx ours)."""
    return ERROR_TYPES.get(status, "invalid_request_error" if status < 500 else "server_error")


# The "type" Anthropic's clients see for each status.
ANTHROPIC_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    413: "request_too_large",
    429: "rate_limit_error",
    503: "overloaded_error",
    529: "overloaded_error",
}


# The status each Anthropic error type stands for (overloaded_error: 503, Anthropic's 529).
STATUS_OF_TYPE = {kind: status for status, kind in ANTHROPIC_TYPES.items() if status != 529}


def anthropic_type(status: int) -> str:
    return ANTHROPIC_TYPES.get(status, "invalid_request_error" if status < 500 else "api_error")


def speaks_anthropic(path: str) -> bool:
    """Whether a path is Anthropic's Messages API, whose clients read errors in its shape."""
    return path == "/v1/messages" or path.startswith("/v1/messages/")


WWW_AUTHENTICATE = 'Bearer realm="llama-proxy", error="invalid_token"'


class OpenAIError(Exception):
    """An HTTP answer in OpenAI's shape; raised by the edge itself, or made by to_openai()
    (proxy/api/failures.py)."""

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
        self.type = type or error_type(status)
        self.headers = dict(headers or {})

    def body(self, anthropic: bool = False) -> dict[str, object]:
        if anthropic:
            return {"type": "error", "error": {"type": anthropic_type(self.status),
                                               "message": self.message}}
        return error_body(self.message, self.type, self.code, self.param)

    def response(self, anthropic: bool = False) -> web.Response:
        response = web.Response(
            status=self.status,
            body=orjson.dumps(self.body(anthropic)),
            content_type="application/json",
            headers=self.headers,
        )
        if self.close:
            response.force_close()
        return response

    def sse_event(self, anthropic: bool = False) -> bytes:
        """The same error as the SSE event that ends a stream already under way (Anthropic's
        is a named `error` event)."""
        data = b"data: " + orjson.dumps(self.body(anthropic)) + b"\n\n"
        return b"event: error\n" + data if anthropic else data


def error_body(
    message: str, type: str, code: str | None = None, param: str | None = None
) -> dict[str, dict[str, str | None]]:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}
