"""HTTP routes: every model API the model servers speak (OpenAI's under /v1, Anthropic's
Messages, OpenAI's Responses, llama-server's own at the root: proxy/upstream/apis.py) and the
unauthenticated ops endpoints."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import orjson
from aiohttp import web

from auth.errors import NotPermitted
from proxy.access.authn import PRINCIPAL
from proxy.access.limits import BORROWER, LIMITER, limited, model_slot
from proxy.errors import OpenAIError
from proxy.observe.outcome import outcome_of
from proxy.upstream.apis import APIS, api_of
from proxy.upstream.backends import ModelNotFound
from proxy.upstream.call import ModelCall
from proxy.upstream.heartbeat import Heartbeat
from proxy.upstream.pool import CATALOG
from proxy.upstream.relay import RELAY

CAN_SERVE = ("ok", "degraded")
MAX_BODY = web.AppKey("max_body_bytes", int)  # named in 413 answers too (failures.py)
BODY_TIMEOUT = web.AppKey("body_timeout", float)
SSE_KEEPALIVE = web.AppKey("sse_keepalive", float)
_STARTED = int(time.time())


def json_response(data: Any, status: int = 200) -> web.Response:
    return web.Response(status=status, body=orjson.dumps(data), content_type="application/json")


async def read_json(request: web.Request) -> tuple[bytes, dict[str, Any]]:
    """The body as raw bytes (to forward untouched) and parsed (to validate)."""
    if request.content_type != "application/json":
        raise OpenAIError(400, "Content-Type must be application/json",
                          code="invalid_content_type")
    if request.headers.get("Content-Encoding", "identity").lower() != "identity":
        raise OpenAIError(415, "Compressed request bodies are not accepted",
                          code="unsupported_content_encoding", close=True)
    limit = request.app[MAX_BODY]
    if request.content_length is not None and request.content_length > limit:
        raise OpenAIError(413, f"Request body is larger than the limit of {limit} bytes",
                          code="request_too_large", close=True)  # said up front: no wait
    if request.content.is_eof():  # all of it came with the headers: no deadline to set
        return (raw := await request.read()), parse_body(raw)
    try:
        async with asyncio.timeout(request.app[BODY_TIMEOUT]):
            raw = await request.read()  # raises 413 past the configured limit
    except TimeoutError:
        raise OpenAIError(408, "The request body did not arrive in time", code="body_timeout",
                          close=True) from None
    return raw, parse_body(raw)


def parse_body(raw: bytes) -> dict[str, Any]:
    """A JSON object with the fields the appliance itself reads well-typed, or a 400."""
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise OpenAIError(400, f"The request body is not valid JSON: {exc}",
                          code="invalid_json") from None
    if not isinstance(body, dict):
        raise OpenAIError(400, "The request body must be a JSON object", code="invalid_json")
    if not isinstance(body.get("stream", False), bool):
        raise OpenAIError(400, "`stream` must be true or false", param="stream")
    if not isinstance(body.get("model", ""), str):
        raise OpenAIError(400, "`model` must be a string", param="model")
    return body


def check_model_allowed(request: web.Request, served: str) -> None:
    """A credential with a model allow-list may use only those (the default model included;
    an alias is allowed when the id it stands for is)."""
    if not request[PRINCIPAL].may_use(served):
        raise NotPermitted(f"This credential may not use the model `{served}`",
                           code="model_not_allowed", param="model")


def model_endpoint(path: str) -> Any:
    async def handler(request: web.Request) -> web.StreamResponse:
        return await model_request(request, path)

    handler.__name__ = path.strip("/").replace("/", "_").replace("-", "_")
    return handler


def model_call(request: web.Request, path: str, model: str | None, stream: bool) -> ModelCall:
    """The call to a model, for every API: the credential's model allow-list, and whether the
    model can answer at all, come first, so a refusal there costs the caller nothing. No model
    named: the default one (the catalog's first)."""
    catalog = request.app[CATALOG]
    try:
        chosen = catalog.find(model)
    except ModelNotFound:  # to a credential with an allow-list, the same as one it may not use
        if request[PRINCIPAL].models is not None:
            check_model_allowed(request, str(model))
        raise
    # Checked against the model that would answer: with one model served, any name reaches
    # it, and a credential allowed only "gpt-4" must not get it that way.
    served = catalog.served(model)
    check_model_allowed(request, served)
    if BORROWER in request.app:  # an extra worker: what the first process last said
        request.app[BORROWER].refuse_early(chosen.id)
    else:
        catalog.refuse_early(chosen)
    outcome = outcome_of(request)
    outcome.model, outcome.stream = served, stream
    return ModelCall(request, request[PRINCIPAL], path, stream, chosen)


async def model_request(request: web.Request, path: str) -> web.StreamResponse:
    """Validate, make the call, take the rate limits and a slot, then relay."""
    raw, body = await read_json(request)
    if path == "/v1/responses":
        refuse_stored_state(body)
    elif path in ("/v1/messages", "/v1/messages/count_tokens"):
        check_messages(body, path == "/v1/messages")
    stream = body.get("stream") is True and api_of(path).streams  # tokenize never streams
    call = model_call(request, path, body.get("model"), stream)
    async with limited(call, raw, body) as (payload, meter):
        # A stream that waits (for a slot, for its first token) sends keep-alive comments.
        async with heartbeat(request, call.stream) as beat, model_slot(call):
            return await request.app[RELAY](call, payload, meter, beat)


def check_messages(body: dict[str, Any], generates: bool) -> None:
    """What Anthropic's API refuses and llama-server would not (or would with a 500)."""
    if not isinstance(body.get("messages"), list):
        raise OpenAIError(400, "`messages` must be a list of messages", param="messages")
    cap = body.get("max_tokens")
    if generates and "max_tokens" in body and (not isinstance(cap, int) or isinstance(cap, bool)
                                               or cap < 1):
        raise OpenAIError(400, "`max_tokens` must be a positive integer", param="max_tokens")


def refuse_stored_state(body: dict[str, Any]) -> None:
    """llama-server keeps no responses: a request that needs one kept, or an earlier one
    continued, is refused rather than answered as if it had been."""
    if body.get("previous_response_id") is not None:
        raise OpenAIError(400, "`previous_response_id` is not supported: no responses are "
                          "stored here; send the conversation in `input`",
                          param="previous_response_id", code="unsupported_parameter")
    if body.get("store") is True:
        raise OpenAIError(400, "`store: true` is not supported: no responses are stored here; "
                          "send `store: false`", param="store", code="unsupported_parameter")


def heartbeat(request: web.Request, stream: bool) -> Heartbeat:
    interval = request.app[SSE_KEEPALIVE] if stream else 0
    return Heartbeat(request, interval, request.app[RELAY].timeouts.client_write)


async def list_models(request: web.Request) -> web.Response:
    """What the caller may use, each with its state (loaded, loading, unloaded, failed)."""
    principal = request[PRINCIPAL]
    states = {row["id"]: row["state"] for row in (await models_public(request.app))["models"]}
    catalog = request.app[CATALOG]
    data = [{"id": m, "object": "model", "created": _STARTED, "owned_by": "llama-proxy",
             "state": states.get(catalog.find(m).id, "loaded")}
            for m in catalog.model_ids() if principal.may_use(m)]
    return json_response({"object": "list", "data": data})


async def models_public(app: web.Application) -> dict[str, Any]:
    """Each model's state and queue, and whether the appliance can serve: this process's
    catalog, or (an extra --workers process) the first process's, which runs them."""
    if BORROWER in app:
        return await app[BORROWER].stats()
    return await app[CATALOG].public()


async def health(request: web.Request) -> web.Response:
    catalog = request.app[CATALOG]
    models = await models_public(request.app)
    status = models["status"]
    rows = models["models"]
    backends = models.get("backends") or [b.public() for b in catalog.backends()]
    body = {"status": status, "model": rows[0]["id"] if rows else None,
            "models": rows, "backends": backends,
            "queue": rows[0]["queue"] if rows else None,
            "limits": "local" if request.app[LIMITER].degraded else "redis"}
    return json_response(body, 200 if status in CAN_SERVE else 503)


async def ready(request: web.Request) -> web.Response:
    can = (await models_public(request.app))["status"] in CAN_SERVE
    return json_response({"ready": can}, 200 if can else 503)


def setup_routes(app: web.Application, *, max_body: int, body_timeout: float,
                 sse_keepalive: float) -> None:
    """body_timeout: how long a client may take to send a request body; sse_keepalive:
    seconds between comments on a stream that waits (0: none)."""
    app[MAX_BODY] = max_body
    app[BODY_TIMEOUT] = body_timeout
    app[SSE_KEEPALIVE] = sse_keepalive
    for path in APIS:
        app.router.add_post(path, model_endpoint(path))
    app.router.add_get("/v1/models", list_models)
    app.router.add_get("/health", health)
    app.router.add_get("/ready", ready)
