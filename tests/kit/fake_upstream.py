"""A fast fake model server for relay mechanics and benchmarks
(python -m tests.kit.fake_upstream): OpenAI's chat and text completions, and Anthropic's
Messages and OpenAI's Responses with their typed events; every other API path the appliance
relays answers a small JSON echo of its body.

Each request steers the fake through a "fake" object in its JSON body, which the appliance
forwards untouched:
  {"fake": {"chunks": 5, "gap": 0.01, "ttfb": 0.0, "status": 200, "raw": "text",
            "raw_size": 1000000, "content_type": "text/html", "stall_after": 2,
            "set_cookie": "session=abc", "server": "llama.cpp", "say": "text", "piece": 4}}
or, where the appliance builds the request itself (/api/chat), through a last user message
`fake:{...}` with the same fields. "say": the answer's text (`repeat` times), streamed `piece`
characters an event (a token or so).
It records what it saw so tests can check what reached the upstream, and each request its
client (the appliance) gave up on, streamed or not.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from typing import Any

import orjson
from aiohttp import web
from multidict import CIMultiDict

from proxy.upstream.apis import APIS

MODEL = "fake-model"


@dataclass
class Record:
    requests: int = 0
    in_flight: int = 0  # requests being answered now, streamed or not
    max_in_flight: int = 0
    headers: list[CIMultiDict[str]] = field(default_factory=list)
    bodies: list[dict[str, Any]] = field(default_factory=list)
    open_streams: int = 0
    max_open_streams: int = 0
    cancelled: int = 0
    cancelled_at: list[float] = field(default_factory=list)


RECORD = web.AppKey("record", Record)


def chat_body(stream: bool = False, model: str = MODEL, **fake: object) -> dict[str, Any]:
    """A chat completion request for the fake, steered by `fake` (see the module's doc)."""
    out: dict[str, Any] = {"model": model, "messages": [{"role": "user", "content": "hi"}],
                           "stream": stream}
    if fake:
        out["fake"] = fake
    return out


def chunk(i: int, text: str | None = None) -> bytes:
    body = {"id": "chatcmpl-fake", "object": "chat.completion.chunk", "model": MODEL,
            "choices": [{"index": 0, "delta": {"content": f"tok{i} " if text is None else text},
                         "finish_reason": None}]}
    return b"data: " + orjson.dumps(body) + b"\n\n"


def steering(body: dict[str, Any]) -> dict[str, Any]:
    """The request's "fake" object, and a last user message `fake:{...}`."""
    fake = body.get("fake") if isinstance(body.get("fake"), dict) else {}
    messages = body.get("messages") if isinstance(body.get("messages"), list) else []
    last = messages[-1].get("content") if messages and isinstance(messages[-1], dict) else None
    if isinstance(last, str) and last.startswith("fake:"):
        fake = {**orjson.loads(last[5:]), **fake}
    return fake


def pieces(fake: dict[str, Any]) -> list[str] | None:
    """What "say" streams: its text in pieces of `piece` characters (None: not steered)."""
    if "say" not in fake:
        return None
    text, size = str(fake["say"]) * int(fake.get("repeat", 1)), int(fake.get("piece", 4))
    return [text[i:i + size] for i in range(0, len(text), size)]


def completion(text: str) -> dict[str, Any]:
    return {"id": "chatcmpl-fake", "object": "chat.completion", "model": MODEL,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                         "finish_reason": "stop"}],
            "usage": {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5}}


MESSAGE = {"id": "msg_fake", "type": "message", "role": "assistant", "model": MODEL,
           "content": [], "stop_reason": None, "stop_sequence": None}


def typed(name: str, data: dict[str, Any]) -> bytes:
    """An event of the typed APIs (Anthropic's, Responses): `event:` line, then its data."""
    return b"event: " + name.encode() + b"\ndata: " + orjson.dumps({"type": name, **data}) + \
        b"\n\n"


def anthropic_events(chunks: int) -> tuple[bytes, list[bytes], bytes]:
    """The head, a delta per token and the tail of a Messages stream (prompt: 1 + 2 cached)."""
    head = typed("message_start", {"message": {**MESSAGE, "usage": {
        "input_tokens": 1, "cache_read_input_tokens": 2, "output_tokens": 0}}}) + typed(
        "content_block_start", {"index": 0, "content_block": {"type": "text", "text": ""}})
    deltas = [typed("content_block_delta", {"index": 0, "delta": {
        "type": "text_delta", "text": f"tok{i} "}}) for i in range(chunks)]
    tail = typed("content_block_stop", {"index": 0}) + typed("message_delta", {
        "delta": {"stop_reason": "end_turn", "stop_sequence": None},
        "usage": {"output_tokens": chunks}}) + typed("message_stop", {})
    return head, deltas, tail


def responses_events(chunks: int) -> tuple[bytes, list[bytes], bytes]:
    """The head, a delta per token and the tail of a Responses stream (prompt: 3 tokens)."""
    head = typed("response.created", {"response": {"id": "resp_fake", "status": "in_progress"}})
    deltas = [typed("response.output_text.delta", {"item_id": "msg_fake", "delta": f"tok{i} "})
              for i in range(chunks)]
    tail = typed("response.completed", {"response": {
        "id": "resp_fake", "object": "response", "status": "completed", "model": MODEL,
        "output": [], "usage": {"input_tokens": 3, "output_tokens": chunks,
                                "total_tokens": 3 + chunks}}})
    return head, deltas, tail


def whole_answer(path: str, body: dict[str, Any]) -> dict[str, Any]:
    if path == "/v1/messages":
        return {**MESSAGE, "content": [{"type": "text", "text": "hello"}],
                "stop_reason": "end_turn",
                "usage": {"input_tokens": 1, "cache_read_input_tokens": 2, "output_tokens": 2}}
    if path == "/v1/responses":
        return {"id": "resp_fake", "object": "response", "status": "completed", "model": MODEL,
                "output": [], "usage": {"input_tokens": 3, "output_tokens": 2,
                                        "total_tokens": 5}}
    if path.endswith("completions"):
        return completion("hello")
    return {"echo": path, "keys": sorted(body)}


async def completions(request: web.Request) -> web.StreamResponse:
    record = request.app[RECORD]
    record.requests += 1
    record.headers.append(request.headers.copy())
    record.in_flight += 1
    record.max_in_flight = max(record.max_in_flight, record.in_flight)
    try:
        return await _answer(request, record)
    except (asyncio.CancelledError, ConnectionResetError):
        record.cancelled += 1
        record.cancelled_at.append(time.monotonic())
        raise
    finally:
        record.in_flight -= 1


async def _answer(request: web.Request, record: Record) -> web.StreamResponse:
    body = await request.json()
    record.bodies.append(body)
    fake = steering(body)
    await asyncio.sleep(fake.get("ttfb", 0))
    if "raw" in fake or "raw_size" in fake:
        text = fake["raw"] if "raw" in fake else "A" * int(fake["raw_size"])
        return web.Response(status=fake.get("status", 200), text=text,
                            content_type=fake.get("content_type", "text/plain"))
    if fake.get("status", 200) >= 400 and body.get("stream"):  # refused before streaming
        return web.json_response({"error": {"message": "fake refusal", "type": "fake_error"}},
                                 status=fake["status"])
    if not body.get("stream"):
        whole = whole_answer(request.path, body)
        if "say" in fake and request.path.endswith("/chat/completions"):
            whole["choices"][0]["message"]["content"] = str(fake["say"])
        response = web.json_response(whole,
                                     status=fake.get("status", 200))
        if "set_cookie" in fake:
            response.headers["Set-Cookie"] = fake["set_cookie"]
        if "server" in fake:
            response.headers["Server"] = fake["server"]
        return response
    return await _stream(request, record, fake, usage=_wants_usage(body))


def _wants_usage(body: dict[str, Any]) -> bool:
    options = body.get("stream_options")
    return isinstance(options, dict) and options.get("include_usage") is True


def usage_event(chunks: int) -> bytes:
    """The last event of a stream that asked for usage: no choices, the counts (3 + 1 each)."""
    body = {"id": "chatcmpl-fake", "object": "chat.completion.chunk", "model": MODEL,
            "choices": [], "usage": {"prompt_tokens": 3, "completion_tokens": chunks,
                                     "total_tokens": 3 + chunks}}
    return b"data: " + orjson.dumps(body) + b"\n\n"


async def _stream(request: web.Request, record: Record, fake: dict[str, Any],
                  usage: bool = False) -> web.StreamResponse:
    response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
    if "server" in fake:
        response.headers["Server"] = fake["server"]
    await response.prepare(request)
    record.open_streams += 1
    record.max_open_streams = max(record.max_open_streams, record.open_streams)
    said = pieces(fake)
    chunks = len(said) if said is not None else fake.get("chunks", 3)
    typed_api = TYPED.get(request.path)
    head, deltas, tail = typed_api(chunks) if typed_api else (
        b"", [chunk(i, said[i] if said else None) for i in range(chunks)],
        (usage_event(chunks) if usage else b"") + b"data: [DONE]\n\n")
    try:
        if head:
            await response.write(head)
        for i, delta in enumerate(deltas):
            if i == fake.get("stall_after"):
                await asyncio.sleep(3600)
            if i == fake.get("break_after"):  # the server dies mid-answer: no chunked end
                assert request.transport is not None
                request.transport.abort()
                return response
            await response.write(delta)
            await asyncio.sleep(fake.get("gap", 0))
        await response.write(tail)
    finally:
        record.open_streams -= 1
    return response


TYPED = {"/v1/messages": anthropic_events, "/v1/responses": responses_events}


async def models(request: web.Request) -> web.Response:
    return web.json_response({"object": "list", "data": [{"id": MODEL, "object": "model"}]})


# What llama-server's /metrics looks like (with --metrics), for the re-export.
METRICS_TEXT = """# HELP llamacpp:prompt_tokens_total Number of prompt tokens processed.
# TYPE llamacpp:prompt_tokens_total counter
llamacpp:prompt_tokens_total 42
# HELP llamacpp:requests_processing Number of requests processing.
# TYPE llamacpp:requests_processing gauge
llamacpp:requests_processing 0
# HELP llamacpp:n_tokens_max Largest observed n_tokens.
# TYPE llamacpp:n_tokens_max counter
llamacpp:n_tokens_max 7
"""


async def metrics(request: web.Request) -> web.Response:
    return web.Response(text=METRICS_TEXT, content_type="text/plain")


def make_app() -> web.Application:
    app = web.Application()
    app[RECORD] = Record()
    for path in APIS:
        app.router.add_post(path, completions)
    app.router.add_get("/v1/models", models)
    app.router.add_get("/metrics", metrics)
    return app


def main() -> None:
    import argparse

    import uvloop

    parser = argparse.ArgumentParser(description="A fast fake OpenAI upstream for benchmarks.")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=9100)
    args = parser.parse_args()
    from proxy.server import raise_open_files_limit

    raise_open_files_limit()
    uvloop.install()
    web.run_app(make_app(), host=args.host, port=args.port, access_log=None, print=None)


if __name__ == "__main__":
    main()
