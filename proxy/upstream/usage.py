"""Read the real token usage out of answers: the limiter settles what it reserved with it, and
the metrics, the usage ledger and the access log report it.

Whole answers carry `usage` in their JSON. OpenAI streams are asked for it
(stream_options.include_usage) and it comes in a last event with empty `choices`; when the client
did not ask for that event it is removed again. Anthropic's Messages stream reports the prompt in
`message_start` and the output in `message_delta` (its prompt is `input_tokens` plus the cached
`cache_read_input_tokens`); the Responses stream in `response.completed`; llama-server's own API
(/infill) as `tokens_evaluated` / `tokens_predicted` in its last event. Only complete SSE events
are examined; bytes still pass through unparsed unless they carry the API's usage marker.

A request whose client left before its usage came is charged what the model did up to the cut:
its prompt, and about a token for each event read from the model, relayed or not (whole answers
from llama-server are streamed from it too: proxy/upstream/assemble.py).
"""

from __future__ import annotations

import re
from typing import Any

import orjson

_USAGE = b'"usage"'
# Where an SSE event ends: a blank line, with LF or CRLF line ends.
_EVENT_END = re.compile(rb"(\r\n\r\n|\n\n)")
MAX_PENDING = 1 << 20  # an "event" longer than this is not one: pass the bytes on


def _end_of_last_event(data: bytes) -> int:
    """The index just past the last complete event in data, or -1."""
    lf, crlf = data.rfind(b"\n\n"), data.rfind(b"\r\n\r\n")
    return max(lf + 2 if lf >= 0 else -1, crlf + 4 if crlf >= 0 else -1)


# Events that end a Responses stream: their `response` holds the usage.
_RESPONSE_ENDS = ("response.completed", "response.incomplete", "response.failed")


def counted(usage: Any) -> tuple[int | None, int | None]:
    """(prompt, completion) tokens of a usage object in any API's names; None: not said."""
    if not isinstance(usage, dict):
        return None, None
    prompt, completion = _count(usage.get("prompt_tokens")), _count(usage.get("completion_tokens"))
    if prompt is None and completion is None:  # Anthropic's and the Responses API's names
        completion = _count(usage.get("output_tokens"))
        parts = [_count(usage.get(name)) for name in (
            "input_tokens", "cache_read_input_tokens", "cache_creation_input_tokens")]
        prompt = sum(p for p in parts if p is not None) if any(
            p is not None for p in parts) else None
    return prompt, completion


class UsageMeter:
    """The usage of one model request: as the model server reported it, or (its client left
    first) what the model did up to the cut. prompt_estimate and completion_cap: what was
    reserved for it."""

    def __init__(self, strip: bool, prompt_estimate: int = 0, completion_cap: int = 0,
                 marker: bytes = _USAGE) -> None:
        """marker: bytes in every event or body that reports usage, in the API's own terms."""
        self.strip = strip
        self.marker = marker
        self.prompt_estimate, self.completion_cap = prompt_estimate, completion_cap
        self._pending = b""
        self.reported: int | None = None  # the total, as the model server reported it
        self.prompt: int | None = None
        self.completion: int | None = None
        self.chunks = 0  # streamed events read from the model
        self.asked_stream: bool | None = None  # how the model server was asked (None: never)
        self.cut: int | None = None  # completion tokens before the client left (None: it stayed)

    @property
    def reached(self) -> bool:
        """Whether it went to a model server (not refused, or left, before)."""
        return self.asked_stream is not None

    def sent(self, stream: bool) -> None:
        """The request goes to a model server now, asked for a stream or a whole answer."""
        self.asked_stream = stream

    def left(self) -> None:
        """The client left before the end: what the model did so far is what it costs. From a
        stream that is the events read; a whole answer's progress is unknown, so its
        reservation stands."""
        if self.asked_stream is None or self.cut is not None or self.reported is not None:
            return
        self.cut = 0 if self.asked_stream else self.completion_cap

    def spent(self) -> tuple[int, int]:
        """(prompt, completion) tokens: as reported; else (a client that left) the prompt
        estimate and about a token an event read, or the reservation of a whole answer, never
        more than was reserved; (0, 0) if the model did nothing for it."""
        if self.reported is not None:
            return self.prompt or 0, self.completion or 0
        if self.chunks or self.cut is not None:
            made = self.chunks + (self.cut or 0)  # events beside the tokens count too
            prompt = self.prompt if self.prompt is not None else self.prompt_estimate
            return prompt, min(made, self.completion_cap) if self.completion_cap else made
        return 0, 0

    def total(self) -> int:
        """What the request costs the caller's token budget."""
        return self.reported if self.reported is not None else sum(self.spent())

    def from_body(self, body: bytes) -> None:
        if self.marker not in body:
            return
        try:
            self._note(orjson.loads(body))
        except orjson.JSONDecodeError:
            pass

    def _note(self, answer: Any) -> None:
        """An answer (or one of its events) that may carry usage."""
        if not isinstance(answer, dict):
            return
        kind = answer.get("type")
        if kind == "message_start":  # Anthropic: the prompt, before any output
            message = answer.get("message")
            prompt, _ = counted(message.get("usage") if isinstance(message, dict) else None)
            self.prompt = prompt if prompt is not None else self.prompt
            return
        if kind in _RESPONSE_ENDS and isinstance(answer.get("response"), dict):
            answer = answer["response"]
        if "tokens_predicted" in answer and answer.get("stop") is True:  # llama-server's own
            usage: Any = {"prompt_tokens": answer.get("tokens_evaluated"),
                          "completion_tokens": answer.get("tokens_predicted")}
        else:
            usage = answer.get("usage")
        prompt, completion = counted(usage)
        total = _count(usage.get("total_tokens")) if isinstance(usage, dict) else None
        if prompt is None and completion is None and total is None:
            return  # some servers send "usage": null in every chunk
        if prompt is not None:
            self.prompt = prompt
        elif self.prompt is None and completion is not None:
            # Output without a prompt: a Messages stream whose message_start never came
            # (llama-server leaves it out when the first token is part of a character).
            self.prompt = self.prompt_estimate
        self.completion = completion
        self.reported = total if total is not None else (self.prompt or 0) + (completion or 0)
        if self.prompt is None and self.completion is None:
            self.prompt = total  # embeddings may report a total alone

    def filter(self, chunk: bytes) -> bytes:
        """Pass complete events on, noting usage; hold a trailing partial event back."""
        if not self._pending and chunk.endswith(b"\n\n") and self.marker not in chunk:
            self._count_events(chunk.count(b"\n\n"))  # the common case: no copy
            return chunk
        data = self._pending + chunk
        cut = _end_of_last_event(data)
        if cut < 0:
            if len(data) > MAX_PENDING:  # not SSE as we know it: passed on, not metered
                self._pending = b""
                return data
            self._pending = data
            return b""
        complete, self._pending = data[:cut], data[cut:]
        parts = _EVENT_END.split(complete)  # event, separator, event, separator, ..., b""
        events, separators = parts[0:-1:2], parts[1::2]
        self._count_events(len(events))
        if self.marker not in complete:
            return complete
        return b"".join(event + end for event, end in zip(events, separators, strict=True)
                        if not event or self._keep(event))

    def _count_events(self, events: int) -> None:
        self.chunks += events

    def flush(self) -> bytes:
        rest, self._pending = self._pending, b""
        return rest

    def _keep(self, event: bytes) -> bool:
        if self.marker not in event:
            return True
        data_at = event.find(b"data: ")  # after an `event:` line in the typed APIs
        if data_at < 0:
            return True
        try:
            data = orjson.loads(event[data_at + 6:])
        except orjson.JSONDecodeError:
            return True
        if not isinstance(data, dict):
            return True
        self._note(data)
        # The usage-only event (no choices) exists because we asked for it, not the client.
        return not (self.strip and not data.get("choices"))


def _count(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) and value >= 0 else None


def wants_usage_in_stream(body: dict[str, Any]) -> bool:
    options = body.get("stream_options")
    return isinstance(options, dict) and options.get("include_usage") is True


def usage_requested(body: dict[str, Any]) -> dict[str, Any]:
    """The request's stream_options, asking for the usage event."""
    options = body.get("stream_options") if isinstance(body.get("stream_options"), dict) else {}
    return {**options, "include_usage": True}
