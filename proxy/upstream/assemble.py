"""A whole answer put together from a stream: OpenAI's chunks, Anthropic's Messages events, the
Responses API's events.

llama-server notices that its client has gone only between the events of a stream: a
non-streamed request whose client left is generated to its end (llama.cpp issues 9273, 24496),
holding a slot that nobody waits for. So the relay asks llama-server for a stream and answers
the client with the whole answer assembled here; when the client leaves, closing the stream
frees the slot at once, and the events read so far say what the model produced.

The assembly follows OpenAI's rules for streamed deltas: text is concatenated, a tool call's
arguments are concatenated per call index, the last finish_reason wins, and the usage (and
llama.cpp's timings) come from the last event. A Messages answer is `message_start`'s message
with each content block built from its deltas (text, thinking, a tool call's JSON input) and
`message_delta`'s stop reason and usage; a Responses answer is the response its last event
carries whole.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import orjson

_TOP = ("id", "created", "model", "system_fingerprint")
_LAST = ("usage", "timings")


def stream_request(raw: bytes, openai: bool = True) -> bytes:
    """The request, asking for a stream (OpenAI's: with usage in its last event)."""
    body = orjson.loads(raw)
    if not openai:  # the typed APIs report usage in their streams unasked
        return orjson.dumps({**body, "stream": True})
    options = body.get("stream_options") if isinstance(body.get("stream_options"), dict) else {}
    return orjson.dumps({**body, "stream": True,
                         "stream_options": {**options, "include_usage": True}})


def assembly_for(path: str, request_id: str = "", model: str = "") -> Events:
    """The assembly of a whole answer for an API path; request_id and model stand in for what
    a stream may leave out."""
    if path == "/v1/messages":
        return MessageAssembly(request_id, model)
    if path == "/v1/responses":
        return ResponseAssembly()
    return Assembly(chat=path.endswith("/chat/completions"))


class Events:
    """A stream's data lines as JSON events, fed its bytes as they come; what the events add up
    to is the subclass's."""

    def __init__(self) -> None:
        self.error: dict[str, Any] | None = None  # an error event ends the stream
        self.done = False  # the stream said it was complete
        self._rest = b""  # a line not yet whole

    def feed(self, data: bytes) -> None:
        """The stream's bytes, as they come."""
        data = self._rest + data
        cut = data.rfind(b"\n") + 1
        self._rest = data[cut:]
        for line in data[:cut].splitlines():
            self._line(line)

    def end(self) -> None:
        """The stream ended: a last line without its newline counts too."""
        rest, self._rest = self._rest, b""
        self._line(rest)

    def _line(self, line: bytes) -> None:
        field, _, value = line.partition(b":")
        value = value.strip()
        if field not in (b"data", b"error") or not value:
            return
        if value == b"[DONE]":
            self.done = True
            return
        try:
            event = orjson.loads(value)
        except orjson.JSONDecodeError:
            return
        if field == b"error":  # older llama.cpp: `error: {...}` lines
            event = {"error": event}
        if not isinstance(event, dict):
            return
        if event.get("error") is not None:
            error = event["error"]
            self.error = error if isinstance(error, dict) else {"message": str(error)}
        elif event.get("type") == "error":  # the Responses API's error event
            self.error = {"message": str(event.get("message") or "Model server error"),
                          "code": event.get("code")}
        else:
            self._event(event)

    def _event(self, event: dict[str, Any]) -> None:
        raise NotImplementedError

    def answer(self) -> dict[str, Any]:
        """The whole answer, as the model server would have sent it."""
        raise NotImplementedError


class Assembly(Events):
    """The whole answer of one chat or text completion, from its streamed events."""

    def __init__(self, chat: bool) -> None:
        super().__init__()
        self.chat = chat
        self.top: dict[str, Any] = {}
        self.choices: dict[int, dict[str, Any]] = {}

    def _event(self, event: dict[str, Any]) -> None:
        for name in _TOP:
            if name in event and name not in self.top:
                self.top[name] = event[name]
        for name in _LAST:
            if event.get(name) is not None:
                self.top[name] = event[name]
        for delta in event.get("choices") or ():
            if isinstance(delta, dict):
                self._choice(delta)

    def _choice(self, delta: dict[str, Any]) -> None:
        index = delta.get("index", 0)
        choice = self.choices.setdefault(index if isinstance(index, int) else 0, {})
        if delta.get("finish_reason") is not None:
            choice["finish_reason"] = delta["finish_reason"]
            self.done = True
        _logprobs(choice, delta.get("logprobs"))
        if not self.chat:
            choice["text"] = choice.get("text", "") + str(delta.get("text") or "")
            return
        part = delta.get("delta")
        if not isinstance(part, dict):
            return
        message = choice.setdefault("message", {"role": "assistant"})
        if isinstance(part.get("role"), str):
            message["role"] = part["role"]
        for name in ("content", "reasoning_content"):
            if isinstance(part.get(name), str):
                message[name] = (message.get(name) or "") + part[name]
        for call in part.get("tool_calls") or ():
            if isinstance(call, dict):
                _tool_call(message, call)

    def answer(self) -> dict[str, Any]:
        choices = []
        for index in sorted(self.choices):
            choice = self.choices[index]
            out: dict[str, Any] = {"index": index}
            if self.chat:
                message = choice.get("message", {"role": "assistant"})
                # As llama-server writes a whole answer: text, even empty; null beside calls.
                message.setdefault("content", None if "tool_calls" in message else "")
                if "tool_calls" in message:
                    message["tool_calls"] = [message["tool_calls"][i]
                                             for i in sorted(message["tool_calls"])]
                out["message"] = message
            else:
                out["text"] = choice.get("text", "")
            out["logprobs"] = choice.get("logprobs")
            out["finish_reason"] = choice.get("finish_reason")
            choices.append(out)
        top = {name: self.top[name] for name in _TOP if name in self.top}
        kind = "chat.completion" if self.chat else "text_completion"
        return {**top, "object": kind, "choices": choices,
                **{name: self.top[name] for name in _LAST if name in self.top}}


def first_message(request_id: str, model: str) -> dict[str, Any]:
    """What message_start says, when a stream leaves it out (llama-server does when the first
    token is part of a character): the message's id, type, role and model."""
    return {"id": f"msg_{request_id}", "type": "message", "role": "assistant", "content": [],
            "model": model, "stop_reason": None, "stop_sequence": None,
            "usage": {"input_tokens": 0, "output_tokens": 0}}


async def with_message_start(chunks: AsyncIterator[bytes], request_id: str, model: str
                             ) -> AsyncIterator[bytes]:
    """A Messages stream that begins with message_start, as Anthropic's clients require."""
    first = True
    async for chunk in chunks:
        if first and not chunk.lstrip().startswith(b"event: message_start"):
            start = {"type": "message_start", "message": first_message(request_id, model)}
            yield b"event: message_start\ndata: " + orjson.dumps(start) + b"\n\n"
        first = False
        yield chunk


class MessageAssembly(Events):
    """The whole answer of Anthropic's Messages API, from its typed events."""

    def __init__(self, request_id: str = "", model: str = "") -> None:
        super().__init__()
        # What message_start says; llama-server leaves that event out when the first token is
        # part of a character, and the message still needs its id, type, role and model.
        self.message = first_message(request_id, model)
        self.blocks: dict[int, dict[str, Any]] = {}
        self._json: dict[int, str] = {}  # a tool call's input, as it streams

    def _event(self, event: dict[str, Any]) -> None:
        kind, index = event.get("type"), event.get("index", 0)
        if kind == "message_start" and isinstance(event.get("message"), dict):
            self.message.update(event["message"])
        elif kind == "content_block_start" and isinstance(event.get("content_block"), dict):
            block = self.blocks[index] = dict(event["content_block"])
            if block.get("type") == "tool_use":  # as a whole answer has it, even when empty
                block.setdefault("input", {})
        elif kind == "content_block_delta" and isinstance(event.get("delta"), dict):
            self._delta(self.blocks.setdefault(index, {}), index, event["delta"])
        elif kind == "content_block_stop" and index in self._json:
            try:
                whole = orjson.loads(self._json.pop(index) or b"{}")
            except orjson.JSONDecodeError:
                whole = None  # the model's own malformed JSON: the input stays empty
            if isinstance(whole, dict):
                self.blocks[index]["input"] = whole
        elif kind == "message_delta":
            self.message.update(event.get("delta") or {})
            self.message["usage"] = {**(self.message.get("usage") or {}),
                                     **(event.get("usage") or {})}
        elif kind == "message_stop":
            self.done = True

    def _delta(self, block: dict[str, Any], index: int, delta: dict[str, Any]) -> None:
        for name, field in (("text_delta", "text"), ("thinking_delta", "thinking"),
                            ("signature_delta", "signature")):
            if delta.get("type") == name and isinstance(delta.get(field), str):
                block[field] = block.get(field, "") + delta[field]
        if delta.get("type") == "input_json_delta" and isinstance(
                delta.get("partial_json"), str):
            self._json[index] = self._json.get(index, "") + delta["partial_json"]

    def answer(self) -> dict[str, Any]:
        return {**self.message, "content": [self.blocks[i] for i in sorted(self.blocks)]}


class ResponseAssembly(Events):
    """The whole answer of the Responses API: its last event carries the response whole."""

    ENDS = ("response.completed", "response.incomplete", "response.failed")

    def __init__(self) -> None:
        super().__init__()
        self.response: dict[str, Any] = {}

    def _event(self, event: dict[str, Any]) -> None:
        if event.get("type") in self.ENDS and isinstance(event.get("response"), dict):
            self.response = event["response"]
            self.done = True

    def answer(self) -> dict[str, Any]:
        return self.response


def _tool_call(message: dict[str, Any], call: dict[str, Any]) -> None:
    calls: dict[int, dict[str, Any]] = message.setdefault("tool_calls", {})
    index = call.get("index", len(calls))
    whole = calls.setdefault(index if isinstance(index, int) else len(calls),
                             {"type": "function", "function": {"name": "", "arguments": ""}})
    if call.get("id"):
        whole["id"] = call["id"]
    if call.get("type"):
        whole["type"] = call["type"]
    function = call.get("function")
    if isinstance(function, dict):
        for name in ("name", "arguments"):
            if isinstance(function.get(name), str):
                whole["function"][name] += function[name]


def _logprobs(choice: dict[str, Any], logprobs: Any) -> None:
    """Chat logprobs come as {"content": [...]} per event: the lists are joined."""
    if not isinstance(logprobs, dict):
        return
    whole = choice.setdefault("logprobs", {})
    for name, value in logprobs.items():
        if isinstance(value, list):
            whole[name] = [*whole.get(name, []), *value]
        else:
            whole[name] = value
