"""`/api/chat`: the simple endpoint, one message in and the answer out, with the conversation
kept for the caller (proxy/state/conversations.py); and `/api/conversations` to list, read
and delete them. Same authentication, rate limits, fair queue and token accounting as /v1: the
request is built as an OpenAI chat completion and goes through the same path to the model. Streamed
answers are events the appliance makes itself (aiohttp-sse): `start`, `delta`..., then `done`
or `error`.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import orjson
from aiohttp import ClientError, ClientSession, web
from aiohttp_sse import EventSourceResponse, sse_response

from proxy.access.authn import PRINCIPAL
from proxy.access.limits import limited, model_slot
from proxy.api.failures import to_openai
from proxy.api.routes import json_response, model_call, read_json
from proxy.edge.drain import OPEN_STREAM
from proxy.errors import OpenAIError
from proxy.state.conversations import ID, Conversations, new_id
from proxy.state.store import REDIS
from proxy.upstream.backends import Backend, UpstreamBroke
from proxy.upstream.call import ModelCall
from proxy.upstream.catalog import CatalogModel
from proxy.upstream.relay import HTTP_CLIENT, RELAY, ModelRefused, is_stream
from proxy.upstream.usage import UsageMeter

log = logging.getLogger("proxy.chat")

PATH = "/v1/chat/completions"  # what /api/chat is, to the model and the limits
MAX_MESSAGES = 400  # per conversation: past that, start a new one
NO_PING = 1e9  # aiohttp-sse wants a positive interval; sse_keepalive = 0 means none


@dataclass(frozen=True)
class ChatLimits:
    max_message_chars: int = 32_000
    max_tokens: int = 1024
    context_tokens: int = 0  # 0: ask the model server
    keepalive: float = 15.0  # seconds between SSE comments (0: none)
    write_timeout: float = 30.0  # longest wait for a client to take an event


CHAT = web.AppKey("chat", ChatLimits)
CONVERSATIONS = web.AppKey("conversations", Conversations)
CONTEXTS = web.AppKey("contexts", dict)  # backend name -> its slot's context, once asked


@dataclass(frozen=True)
class Ask:
    message: str
    conversation_id: str | None
    model: str | None
    stream: bool
    max_tokens: int


def parse_ask(body: dict[str, Any], limits: ChatLimits) -> Ask:
    """What /api/chat accepts, checked before anything reaches the model (clear 400s)."""
    message = body.get("message")
    if not isinstance(message, str) or not message:
        raise OpenAIError(400, "`message` must be a non-empty string", param="message")
    if len(message) > limits.max_message_chars:
        raise OpenAIError(400, f"`message` is longer than {limits.max_message_chars} characters",
                          param="message", code="message_too_long")
    cid = body.get("conversation_id")
    if cid is not None and not (isinstance(cid, str) and ID.fullmatch(cid)):
        raise OpenAIError(400, "`conversation_id` is not a conversation id",
                          param="conversation_id")
    # `model` and `stream` were checked by read_json (a string, a boolean).
    model, stream = body.get("model"), body.get("stream") is True
    max_tokens = body.get("max_tokens")
    if max_tokens is None:
        max_tokens = limits.max_tokens
    if isinstance(max_tokens, float) and max_tokens.is_integer():  # 16.0 is JSON's 16
        max_tokens = int(max_tokens)
    if not isinstance(max_tokens, int) or isinstance(max_tokens, bool) or max_tokens < 1:
        raise OpenAIError(400, "`max_tokens` must be a positive integer", param="max_tokens")
    return Ask(message, cid, model or None, stream, min(max_tokens, limits.max_tokens))


def estimate(text: str) -> int:
    """Tokens a message takes, on the high side for prose (about 4 bytes a token) though not
    for digits or punctuation (a token a byte): half its bytes, plus its framing."""
    return len(text.encode()) // 2 + 4


FALLBACK_CONTEXT = 2048


async def context_of(request: web.Request, model: CatalogModel, configured: int) -> int:
    """The context of one model slot: the setting, or its catalog entry's ctx_size over its
    slots, or what llama-server's /props says (asked once per server, once it runs); 2048
    when none can tell yet."""
    if configured:
        return configured
    entry = model.entry
    if entry.ctx_size and entry.parallel:
        return entry.ctx_size // entry.parallel
    up = model.ready_backends()
    if not up:  # not running yet: asked again next time
        return FALLBACK_CONTEXT
    known = request.app[CONTEXTS]
    if up[0].name not in known:
        known[up[0].name] = await _ask_context(request.app[HTTP_CLIENT], up[0])
    return known[up[0].name]


async def _ask_context(client: ClientSession, backend: Backend) -> int:
    try:
        async with asyncio.timeout(5):
            async with client.get(backend.url("/props"), headers=backend.auth_headers()) as r:
                props = await r.json() if r.status == 200 else {}
        n_ctx = int(props["default_generation_settings"]["n_ctx"])
    except (ClientError, TimeoutError, KeyError, TypeError, ValueError):
        log.info("backend %s does not say its context size; /api/chat assumes %d tokens "
                 "(set chat_context_tokens)", backend.name, FALLBACK_CONTEXT)
        return FALLBACK_CONTEXT
    return n_ctx if n_ctx > 0 else FALLBACK_CONTEXT


def fit(history: list[dict[str, str]], message: str, context: int, max_tokens: int
        ) -> list[dict[str, str]]:
    """The newest history that fits the model's context with the new message and room for the
    answer; it starts with a question, never halfway through an exchange."""
    budget = context - max_tokens - estimate(message)
    if budget < 0:
        raise OpenAIError(400, "The message and its answer do not fit the model's context "
                          f"of {context} tokens", param="message",
                          code="context_length_exceeded")
    kept: list[dict[str, str]] = []
    for turn in reversed(history):
        budget -= estimate(turn["content"])
        if budget < 0:
            break
        kept.append(turn)
    kept.reverse()
    while kept and kept[0]["role"] != "user":
        kept.pop(0)
    return [*kept, {"role": "user", "content": message}]


@dataclass
class Answer:
    """What the model said, gathered from its stream or its whole answer."""

    parts: list[str] = field(default_factory=list)
    usage: dict[str, int] | None = None
    kept: bool = False  # in the conversation already

    @property
    def text(self) -> str:
        return "".join(self.parts)

    def public_usage(self) -> dict[str, int]:
        u = self.usage or {}
        prompt, completion = int(u.get("prompt_tokens", 0)), int(u.get("completion_tokens", 0))
        return {"prompt_tokens": prompt, "completion_tokens": completion,
                "total_tokens": prompt + completion}


async def deltas(chunks: AsyncIterator[bytes], answer: Answer) -> AsyncIterator[str]:
    """The text pieces of an OpenAI chat stream; its usage is noted in `answer`."""
    buffer = b""
    async for chunk in chunks:
        buffer += chunk.replace(b"\r\n", b"\n")
        *events, buffer = buffer.split(b"\n\n")
        for event in events:
            for line in event.split(b"\n"):
                if not line.startswith(b"data:"):
                    continue  # comments (pings) and other fields
                data = line[5:].strip()
                if data == b"[DONE]":
                    return
                piece = _piece(orjson.loads(data), answer)
                if piece:
                    answer.parts.append(piece)
                    yield piece


def _piece(event: Any, answer: Answer) -> str:
    if not isinstance(event, dict):
        return ""
    if isinstance(event.get("error"), dict):
        raise UpstreamBroke(str(event["error"].get("message") or "The model failed"))
    if isinstance(event.get("usage"), dict):
        answer.usage = event["usage"]
    choices = event.get("choices") or [{}]
    delta = choices[0].get("delta") if isinstance(choices[0], dict) else None
    content = delta.get("content") if isinstance(delta, dict) else None
    return content if isinstance(content, str) else ""


def from_whole(body: bytes) -> Answer:
    try:
        parsed = orjson.loads(body)
        content = parsed["choices"][0]["message"]["content"] or ""
    except (orjson.JSONDecodeError, KeyError, IndexError, TypeError):
        raise UpstreamBroke("The model's answer could not be read") from None
    usage = parsed.get("usage")
    return Answer([str(content)], usage if isinstance(usage, dict) else None)


async def chat(request: web.Request) -> web.StreamResponse:
    limits = request.app[CHAT]
    _, body = await read_json(request)
    ask = parse_ask(body, limits)
    principal = request[PRINCIPAL]
    store = request.app[CONVERSATIONS]
    cid, history = ask.conversation_id, []
    if cid is not None:
        found = await store.get(principal.id, cid)
        if found is None:
            raise OpenAIError(404, f"No conversation `{cid}`", param="conversation_id",
                              code="conversation_not_found")
        if len(found.messages) >= MAX_MESSAGES:
            raise OpenAIError(400, "This conversation is full; start a new one",
                              param="conversation_id", code="conversation_full")
        history = found.messages
    cid = cid or new_id()
    call = model_call(request, PATH, ask.model, ask.stream)
    model = ask.model or call.model.id
    context = await context_of(request, call.model, limits.context_tokens)
    payload: dict[str, Any] = {"messages": fit(history, ask.message, context, ask.max_tokens),
                               "max_tokens": ask.max_tokens, "stream": ask.stream}
    if ask.model:
        payload["model"] = ask.model
    if ask.stream:
        payload["stream_options"] = {"include_usage": True}
    raw = orjson.dumps(payload)
    turn = Turn(call, store, cid, model, ask.message)
    async with limited(call, raw, payload) as (sent, meter):
        if ask.stream:
            return await turn.streamed(sent, meter, limits)
        return await turn.whole(sent, meter)


@dataclass
class Turn:
    """One question to the model within a conversation, and keeping what it answered."""

    call: ModelCall
    store: Conversations
    cid: str
    model: str
    message: str

    @property
    def request(self) -> web.Request:
        return self.call.request

    async def whole(self, sent: bytes, meter: UsageMeter) -> web.Response:
        async with model_slot(self.call):
            whole = await self.request.app[RELAY].whole(self.call, sent, meter)
        answer = from_whole(whole.body if isinstance(whole.body, bytes) else b"")
        try:
            await self.keep(answer)
        except asyncio.CancelledError:  # the client left as it was stored: it was paid for
            self._keep_later(answer)
            raise
        return json_response({"response": answer.text, "conversation_id": self.cid,
                              "model": self.model, "usage": answer.public_usage()})

    async def streamed(self, sent: bytes, meter: UsageMeter, limits: ChatLimits
                       ) -> web.StreamResponse:
        """Started at once (the conversation id comes first, and pings keep a waiting stream
        alive through tunnels); errors from here on are `error` events."""
        async with sse_response(
            self.request, allow_all_methods=True, send_timeout=limits.write_timeout,
            ping_interval=limits.keepalive or NO_PING,
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        ) as sse:
            self.request[OPEN_STREAM] = sse  # a shutdown past its grace ends it
            await send(sse, "start", {"conversation_id": self.cid, "model": self.model})
            answer = Answer()
            try:
                await self._relay(sent, meter, sse, answer)
                await self.keep(answer)
            except asyncio.CancelledError:
                if not answer.kept:
                    self._keep_later(answer)  # the client left: keep what it saw
                raise
            except (TimeoutError, ConnectionResetError) as exc:
                self.call.outcome.disconnect = (
                    "write_timeout" if isinstance(exc, TimeoutError) else "gone")
                return sse  # the client stopped reading or left: nobody to tell
            except Exception as exc:
                error = to_openai(exc, self.request)
                if error is None:
                    raise
                log.warning("%s: /api/chat stream ended with %s", self.call.request_id,
                            error.code or error.status)
                data: dict[str, Any] = error.body()
                if retry := error.headers.get("Retry-After"):  # no status line to carry it
                    data["retry_after"] = int(retry)
                await send(sse, "error", data)
                return sse
            await send(sse, "done", {"conversation_id": self.cid, "response": answer.text,
                                     "usage": answer.public_usage()})
        return sse

    async def _relay(self, sent: bytes, meter: UsageMeter, sse: EventSourceResponse,
                     answer: Answer) -> None:
        relay = self.request.app[RELAY]
        outcome = self.call.outcome
        async with model_slot(self.call):
            upstream = await relay.open_stream(self.call, sent, meter)
            try:
                if not is_stream(upstream):
                    raise ModelRefused.from_body(upstream.status,
                                                 await relay.read_whole(upstream))
                async for piece in deltas(relay.chunks(upstream, meter), answer):
                    if outcome.first_token is None:
                        outcome.first_token = time.perf_counter() - outcome.started
                    await send(sse, "delta", {"content": piece})
            finally:
                upstream.close()  # the slot is free at once, whatever happened

    async def keep(self, answer: Answer) -> None:
        await self.store.append(self.call.principal.id, self.cid, self.model,
                                {"role": "user", "content": self.message},
                                {"role": "assistant", "content": answer.text})
        answer.kept = True

    def _keep_later(self, answer: Answer) -> None:
        if not answer.parts:
            return
        task = asyncio.create_task(self.keep(answer))
        _KEEPING.add(task)
        task.add_done_callback(_kept)


_KEEPING: set[asyncio.Task[None]] = set()


def _kept(task: asyncio.Task[None]) -> None:
    _KEEPING.discard(task)
    if not task.cancelled() and task.exception() is not None:
        log.warning("a stopped answer could not be kept: %s", task.exception())


async def send(sse: EventSourceResponse, event: str, data: Any) -> None:
    await sse.send(orjson.dumps(data).decode(), event=event)


async def list_conversations(request: web.Request) -> web.Response:
    found = await request.app[CONVERSATIONS].list(request[PRINCIPAL].id)
    return json_response({"object": "list", "data": [c.public() for c in found]})


async def get_conversation(request: web.Request) -> web.Response:
    cid = request.match_info["id"]
    found = await request.app[CONVERSATIONS].get(request[PRINCIPAL].id, cid)
    if found is None:
        raise OpenAIError(404, f"No conversation `{cid}`", code="conversation_not_found")
    return json_response(found.public())


async def delete_conversation(request: web.Request) -> web.Response:
    cid = request.match_info["id"]
    if not await request.app[CONVERSATIONS].delete(request[PRINCIPAL].id, cid):
        raise OpenAIError(404, f"No conversation `{cid}`", code="conversation_not_found")
    return json_response({"id": cid, "object": "conversation.deleted", "deleted": True})


def setup_chat(app: web.Application, *, limits: ChatLimits, ttl_s: float,
               max_conversations: int) -> None:
    """Call after setup_store (the conversations live in its Redis) and setup_routes."""
    app[CHAT] = limits
    app[CONTEXTS] = {}
    app.cleanup_ctx.append(functools.partial(_conversations, ttl_s, max_conversations))
    app.router.add_post("/api/chat", chat)
    app.router.add_get("/api/conversations", list_conversations)
    app.router.add_get("/api/conversations/{id}", get_conversation)
    app.router.add_delete("/api/conversations/{id}", delete_conversation)


async def _conversations(ttl_s: float, max_conversations: int, app: web.Application
                         ) -> AsyncIterator[None]:
    app[CONVERSATIONS] = Conversations(app[REDIS], ttl_s, max_conversations)
    yield
    for task in list(_KEEPING):  # stopped answers still being kept
        await asyncio.wait([task], timeout=2)
