"""The OpenAPI 3 document of the appliance's own API, served at /openapi.json.

It describes what the appliance itself checks and answers. Model requests (OpenAI's, Anthropic's
Messages, OpenAI's Responses, llama-server's own): beyond a JSON object with a string `model`
and a boolean `stream`, their fields go to the model server, which validates them, so they are
listed for clients but left open here. /v1/messages* answer errors in Anthropic's shape. A
test checks that every route is in it and every path in it is a route, and schemathesis runs
against it.
"""

from __future__ import annotations

from typing import Any

from aiohttp import web

from proxy import __version__
from proxy.api.admin import MAX_COUNT, MAX_HOURS

JSON = "application/json"
ERROR = {"$ref": "#/components/schemas/Error"}
ANTHROPIC_ERROR = {"$ref": "#/components/schemas/AnthropicError"}
SECURED: list[dict[str, list[str]]] = [{"bearer": []}, {"apiKey": []}]


def _error(description: str, retry_after: bool = False) -> dict[str, Any]:
    out: dict[str, Any] = {"description": description, "content": {JSON: {"schema": ERROR}}}
    if retry_after:
        out["headers"] = {"Retry-After": {"schema": {"type": "string"},
                                          "description": "seconds to wait before retrying"}}
    return out


AUTH_ERRORS = {
    "401": _error("no valid credential"),
    "403": _error("the credential lacks the scope or model"),
    "429": _error("too many requests or failed logins from this client", retry_after=True),
    "503": _error("the credential store or the rate limits cannot be checked, or the model "
                  "is loading, busy or down", retry_after=True),
}
BODY_ERRORS = {
    "400": _error("not a JSON object, or a field the appliance reads has the wrong type"),
    "408": _error("the body did not arrive within body_timeout"),
    "413": _error("the body is larger than max_body_bytes"),
}
MODEL_ERRORS = {
    "404": _error("no such model (when several are served)"),
    "502": _error("the model server could not be reached or broke off"),
    "504": _error("the model server did not answer in time"),
}


def _anthropic(responses: dict[str, Any]) -> dict[str, Any]:
    """The same answers, errors in Anthropic's shape."""
    return {status: {**answer, "content": {JSON: {"schema": ANTHROPIC_ERROR}}}
            if answer.get("content", {}).get(JSON, {}).get("schema") == ERROR else answer
            for status, answer in responses.items()}


def _model_request(summary: str, fields: dict[str, Any], *, anthropic: bool = False,
                   slot: bool = True, required: tuple[str, ...] = ()) -> dict[str, Any]:
    """slot: whether it waits for a turn at the model (cheap APIs do not); required: fields
    the appliance itself insists on."""
    if not slot:
        summary += " (no model slot)"
    body = {
        "type": "object",
        "additionalProperties": True,
        "properties": {
            "model": {"type": "string", "description": "a model id from /v1/models"},
            "stream": {"type": "boolean", "description": "answer as server-sent events"},
            **fields,
        },
        **({"required": list(required)} if required else {}),
    }
    responses = {
        "200": {"description": "the model's answer, whole or as text/event-stream",
                "content": {JSON: {"schema": {"type": "object"}},
                            "text/event-stream": {"schema": {}}}},
        **BODY_ERRORS, **AUTH_ERRORS, **MODEL_ERRORS,
    }
    return {
        "summary": summary,
        "security": SECURED,
        "requestBody": {"required": True, "content": {JSON: {"schema": body}}},
        "responses": _anthropic(responses) if anthropic else responses,
    }


def _admin(summary: str, *, body: dict[str, Any] | None = None, ok: str = "200",
           path_param: str | None = None) -> dict[str, Any]:
    operation: dict[str, Any] = {
        "summary": summary,
        "security": [{"bearer": []}],
        "responses": {ok: {"description": "done", "content": {JSON: {"schema":
                                                                       {"type": "object"}}}},
                      **AUTH_ERRORS, **({"404": _error("no such key")} if path_param else {})},
    }
    if body is not None:
        operation["requestBody"] = {"required": True, "content": {JSON: {"schema": body}}}
        operation["responses"].update(BODY_ERRORS)
    if path_param:
        operation["parameters"] = [{"name": path_param, "in": "path", "required": True,
                                    "schema": {"type": "string"}}]
    return operation


def _reload() -> dict[str, Any]:
    operation = _admin("Re-read the config file: models added, removed and changed as it "
                       "says, the others untouched")
    operation["responses"].update({
        "400": _error("the configuration does not load: nothing changed"),
        "409": _error("started without a configuration it can read again (in process)"),
        "503": _error("a changed model's new child did not start", retry_after=True)})
    return operation


def _model_admin(summary: str, errors: dict[str, Any]) -> dict[str, Any]:
    operation = _admin(summary, path_param="model")
    operation["responses"].update({"404": _error("no such model"), **errors})
    return operation


OPEN_OBJECT: dict[str, Any] = {"type": "object", "additionalProperties": True}
STRINGS = {"type": "array", "items": {"type": "string", "minLength": 1}, "nullable": True}
COUNT = {"type": "integer", "minimum": 1, "maximum": MAX_COUNT, "nullable": True}
HOURS = {"type": "number", "minimum": 0, "exclusiveMinimum": True, "maximum": MAX_HOURS,
         "nullable": True}
KEY_FIELDS = {"owner": {"type": "string", "nullable": True}, "scopes": STRINGS, "models": STRINGS,
              "expires_in_hours": HOURS, "rpm": COUNT, "tpm": COUNT}


CONVERSATION_ID = "^conv_[A-Za-z0-9_-]{16}$"
CHAT_ANSWER = {"type": "object", "required": ["response", "conversation_id", "usage"],
               "properties": {"response": {"type": "string"},
                              "conversation_id": {"type": "string"},
                              "model": {"type": "string"}, "usage": OPEN_OBJECT}}


def _conversation(summary: str) -> dict[str, Any]:
    return {"summary": summary, "security": SECURED,
            "parameters": [{"name": "id", "in": "path", "required": True,
                            "schema": {"type": "string"}}],
            "responses": {"200": {"description": "done",
                                  "content": {JSON: {"schema": OPEN_OBJECT}}},
                          **AUTH_ERRORS, "404": _error("no such conversation")}}


def _body(required: list[str], **properties: Any) -> dict[str, Any]:
    out: dict[str, Any] = {"type": "object", "additionalProperties": True,
                           "properties": properties}
    if required:
        out["required"] = required
    return out


DAY = {"type": "string", "format": "date"}


def _usage(summary: str, security: list[dict[str, list[str]]], principal: bool
           ) -> dict[str, Any]:
    params = [{"name": name, "in": "query", "required": False, "schema": DAY,
               "description": f"UTC day, YYYY-MM-DD ({default})"}
              for name, default in (("from", "default: 29 days before `to`"),
                                    ("to", "default: today"))]
    if principal:
        params.append({"name": "principal", "in": "query", "required": False,
                       "schema": {"type": "string", "maxLength": 200},
                       "description": "user:SUB or key:PREFIX (default: everyone)"})
    return {"summary": summary, "security": security, "parameters": params,
            "responses": {"200": {"description": "requests and tokens per principal per day",
                                  "content": {JSON: {"schema": OPEN_OBJECT}}},
                          "400": _error("not a date (YYYY-MM-DD), or a principal over 200 "
                                        "characters"),
                          "503": _error("the ledger cannot be read now", retry_after=True),
                          **AUTH_ERRORS}}


def document() -> dict[str, Any]:
    return {
        "openapi": "3.0.3",
        "info": {"title": "llama-proxy", "version": __version__,
                 "description": "An authenticated, rate-limited OpenAI-compatible API in front "
                                "of a local llama.cpp model."},
        "components": {
            "securitySchemes": {
                "bearer": {"type": "http", "scheme": "bearer",
                           "description": "a JWT from generate_token.py, an API key, or the "
                                          "admin key"},
                "apiKey": {"type": "apiKey", "in": "header", "name": "X-API-Key"},
            },
            "schemas": {"Error": {
                "type": "object", "required": ["error"],
                "properties": {"error": {
                    "type": "object", "required": ["message", "type", "param", "code"],
                    "properties": {"message": {"type": "string"}, "type": {"type": "string"},
                                   "param": {"type": "string", "nullable": True},
                                   "code": {"type": "string", "nullable": True}}}}},
                "AnthropicError": {
                    "type": "object", "required": ["type", "error"],
                    "properties": {"type": {"type": "string", "enum": ["error"]}, "error": {
                        "type": "object", "required": ["type", "message"],
                        "properties": {"type": {"type": "string"},
                                       "message": {"type": "string"}}}}}},
        },
        "paths": {
            "/v1/chat/completions": {"post": _model_request("Chat completion", {
                "messages": {"description": "OpenAI's messages, checked by the model server"},
                "max_tokens": {"description": "capped at what the token limit reserved"}})},
            "/v1/completions": {"post": _model_request("Text completion", {
                "prompt": {"description": "a string or a list of strings"},
                "max_tokens": {"description": "capped at what the token limit reserved"}})},
            "/v1/embeddings": {"post": _model_request("Embeddings (when the model server has "
                                                      "them)", {"input": {}})},
            "/v1/rerank": {"post": _model_request("Rerank documents (when the model server "
                                                  "has it)", {"query": {}, "documents": {}})},
            "/v1/messages": {"post": _model_request("Anthropic's Messages API", {
                "messages": {"type": "array", "description": "Anthropic's messages"},
                "max_tokens": {"type": "integer", "minimum": 1,
                               "description": "capped at what the token limit reserved"}},
                anthropic=True, required=("messages",))},
            "/v1/messages/count_tokens": {"post": _model_request(
                "Anthropic's token count of a Messages request", {"messages": {"type": "array"}},
                anthropic=True, slot=False, required=("messages",))},
            "/v1/responses": {"post": _model_request("OpenAI's Responses API (nothing stored: "
                                                     "no `previous_response_id`, no `store`)", {
                "input": {"description": "a string or a list of input items"},
                "max_output_tokens": {"description": "capped at what the token limit "
                                                     "reserved"}})},
            "/v1/responses/input_tokens": {"post": _model_request(
                "The token count of a Responses request", {"input": {}}, slot=False)},
            "/infill": {"post": _model_request("Fill in the middle (llama-server's; 501 for a "
                                               "model without FIM tokens)", {
                "input_prefix": {"description": "the text before the cursor"},
                "input_suffix": {"description": "the text after it"},
                "n_predict": {"description": "capped at what the token limit reserved"}})},
            "/tokenize": {"post": _model_request("Text to the model's tokens", {
                "content": {"description": "the text"}}, slot=False)},
            "/detokenize": {"post": _model_request("The model's tokens to text", {
                "tokens": {"description": "a list of token ids"}}, slot=False)},
            "/apply-template": {"post": _model_request("Messages through the chat template", {
                "messages": {}}, slot=False)},
            "/v1/models": {"get": {
                "summary": "The model ids clients pass as `model`, each with its `state` "
                           "(loaded, loading, unloaded, failed)", "security": SECURED,
                "responses": {"200": {"description": "the models",
                                      "content": {JSON: {"schema": OPEN_OBJECT}}},
                              **AUTH_ERRORS}}},
            "/health": {"get": {
                "summary": "State of the model servers, the queue and the limits",
                "responses": {"200": {"description": "can serve",
                                      "content": {JSON: {"schema": OPEN_OBJECT}}},
                              "503": {"description": "cannot serve",
                                      "content": {JSON: {"schema": OPEN_OBJECT}}}}}},
            "/ready": {"get": {
                "summary": "200 when it can serve, for load balancers",
                "responses": {"200": {"description": "ready",
                                      "content": {JSON: {"schema": OPEN_OBJECT}}},
                              "503": {"description": "not ready",
                                      "content": {JSON: {"schema": OPEN_OBJECT}}}}}},
            "/api/chat": {"post": {
                "summary": "One message in, the answer out; the conversation is kept",
                "security": SECURED,
                "requestBody": {"required": True, "content": {JSON: {"schema": _body(
                    ["message"], message={"type": "string", "minLength": 1},
                    conversation_id={"type": "string", "pattern": CONVERSATION_ID,
                                     "nullable": True},
                    model={"type": "string"}, stream={"type": "boolean"},
                    max_tokens={"type": "integer", "minimum": 1, "nullable": True})}}},
                "responses": {
                    "200": {"description": "the answer (stream: events start, delta..., done "
                                           "or error)",
                            "content": {JSON: {"schema": CHAT_ANSWER},
                                        "text/event-stream": {"schema": {}}}},
                    **BODY_ERRORS, **AUTH_ERRORS, **MODEL_ERRORS,
                    "404": _error("no such conversation, or no such model")}}},
            "/api/conversations": {"get": {
                "summary": "The caller's conversations, newest first", "security": SECURED,
                "responses": {"200": {"description": "the conversations",
                                      "content": {JSON: {"schema": OPEN_OBJECT}}},
                              **AUTH_ERRORS}}},
            "/api/conversations/{id}": {
                "get": _conversation("One conversation with its messages"),
                "delete": _conversation("Delete a conversation"),
            },
            "/": {"get": {
                "summary": "The chat page",
                "responses": {"200": {"description": "HTML",
                                      "content": {"text/html": {"schema": {}}}}}}},
            "/static/{name}": {"get": {
                "summary": "The chat page's files",
                "parameters": [{"name": "name", "in": "path", "required": True,
                                "schema": {"type": "string"}}],
                "responses": {"200": {"description": "a file",
                                      "content": {"*/*": {"schema": {}}}},
                              "404": _error("no such file")}}},
            "/openapi.json": {"get": {
                "summary": "This document",
                "responses": {"200": {"description": "OpenAPI 3",
                                      "content": {JSON: {"schema": OPEN_OBJECT}}}}}},
            "/admin/keys": {
                "get": _admin("List API keys"),
                "post": _admin("Create an API key (shown once)", ok="201", body=_body(
                    ["name"], name={"type": "string", "minLength": 1}, **KEY_FIELDS)),
            },
            "/admin/keys/{prefix}": {
                "get": _admin("One API key", path_param="prefix"),
                "patch": _admin("Change an API key's limits, flags or names",
                                path_param="prefix", body=_body(
                                    [], name={"type": "string", "nullable": True},
                                    disabled={"type": "boolean"},
                                    **KEY_FIELDS)),
                "delete": _admin("Revoke an API key", path_param="prefix"),
            },
            "/admin/tokens": {
                "post": _admin("Issue a JWT", ok="201", body=_body(
                    ["sub"], sub={"type": "string", "minLength": 1}, hours=HOURS,
                    scopes=STRINGS, models=STRINGS, rpm=COUNT, tpm=COUNT)),
            },
            "/admin/tokens/{jti}": {"delete": _admin("Revoke a JWT by its id", path_param="jti")},
            "/admin/models": {"get": _admin("The catalog: each model's state, memory, use, "
                                            "loads and failures")},
            "/admin/models/{model}/load": {"post": _model_admin(
                "Start a model (waits until it is up)", {"503": _error(
                    "no room (what runs is in use), or its start failed", retry_after=True)})},
            "/admin/models/{model}/unload": {"post": _model_admin(
                "Stop a model run here", {"409": _error("requests hold it, or it is remote")})},
            "/admin/models/{model}/restart": {"post": _model_admin(
                "Restart a model with no downtime: a new child first, requests in flight "
                "finish on the old one", {
                    "409": _error("it is remote, or already restarting"),
                    "503": _error("no room for a second child, or it did not start",
                                  retry_after=True)})},
            "/admin/reload": {"post": _reload()},
            "/v1/usage": {"get": _usage("The caller's own usage per day", SECURED, False)},
            "/admin/usage": {"get": _usage("Anyone's usage per day", [{"bearer": []}], True)},
            # No security here: open to this host (the case a checker on loopback sees); from
            # elsewhere the admin credential or the metrics token, as the description says.
            "/metrics": {"get": {
                "summary": "Prometheus metrics (open to this host; else the admin credential "
                           "or the metrics token)",
                "responses": {"200": {"description": "Prometheus text format 0.0.4",
                                      "content": {"text/plain": {"schema": {}}}},
                              **AUTH_ERRORS}}},
        },
    }


async def serve_document(request: web.Request) -> web.Response:
    return web.json_response(request.app[DOCUMENT])


DOCUMENT = web.AppKey("openapi", dict)


def setup_openapi(app: web.Application) -> None:
    app[DOCUMENT] = document()
    app.router.add_get("/openapi.json", serve_document)
