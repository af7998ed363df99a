"""A whole answer put together from a stream, as OpenAI's streaming rules say (the relay asks
llama-server for streams so that a client that leaves frees the slot:
proxy/upstream/assemble.py)."""

from __future__ import annotations

import json
from typing import Any, TypeVar

import pytest

from proxy.upstream.assemble import Assembly, Events, assembly_for, stream_request

E = TypeVar("E", bound=Events)


def sse(*events: dict[str, Any] | str, end: bytes = b"\n\n") -> bytes:
    return b"".join(b"data: " + (e.encode() if isinstance(e, str) else json.dumps(e).encode())
                    + end for e in events)


def chunk(delta: dict[str, Any] | None = None, finish: str | None = None, index: int = 0,
          **extra: Any) -> dict[str, Any]:
    return {"id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 7, "model": "m",
            "choices": [{"index": index, "delta": delta or {}, "finish_reason": finish,
                         **extra}]}


USAGE = {"id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 7, "model": "m",
         "choices": [], "usage": {"prompt_tokens": 5, "completion_tokens": 3,
                                  "total_tokens": 8}, "timings": {"predicted_n": 3}}


def in_pieces(whole: E, data: bytes, pieces: int) -> E:
    """Fed in awkward pieces: events and lines cut anywhere."""
    for at in range(0, len(data), pieces):
        whole.feed(data[at:at + pieces])
    whole.end()
    return whole


def assembled(data: bytes, chat: bool = True, pieces: int = 7) -> Assembly:
    return in_pieces(Assembly(chat), data, pieces)


@pytest.mark.parametrize("end", [b"\n\n", b"\r\n\r\n"])
def test_text_and_reasoning_are_joined_and_usage_comes_from_the_last_event(end: bytes) -> None:
    data = sse(chunk({"role": "assistant", "content": None}),
               chunk({"reasoning_content": "Think"}), chunk({"reasoning_content": "ing."}),
               chunk({"content": "Hel"}), chunk({"content": "lo"}), chunk({}, "stop"),
               USAGE, "[DONE]", end=end)
    whole = assembled(data)
    assert whole.done and whole.error is None
    assert whole.answer() == {
        "id": "chatcmpl-1", "created": 7, "model": "m", "object": "chat.completion",
        "choices": [{"index": 0, "message": {"role": "assistant", "content": "Hello",
                                             "reasoning_content": "Thinking."},
                     "logprobs": None, "finish_reason": "stop"}],
        "usage": USAGE["usage"], "timings": USAGE["timings"]}


def test_tool_calls_are_joined_per_index() -> None:
    data = sse(chunk({"role": "assistant", "content": None, "tool_calls": [
                   {"index": 0, "id": "call_a", "type": "function",
                    "function": {"name": "get_weather", "arguments": ""}}]}),
               chunk({"tool_calls": [{"index": 0, "function": {"arguments": "{\"city\": "}}]}),
               chunk({"tool_calls": [{"index": 1, "id": "call_b", "type": "function",
                                      "function": {"name": "now", "arguments": "{}"}}]}),
               chunk({"tool_calls": [{"index": 0, "function": {"arguments": "\"Oslo\"}"}}]}),
               chunk({}, "tool_calls"), "[DONE]")
    message = assembled(data).answer()["choices"][0]["message"]
    assert message == {"role": "assistant", "content": None, "tool_calls": [
        {"id": "call_a", "type": "function",
         "function": {"name": "get_weather", "arguments": "{\"city\": \"Oslo\"}"}},
        {"id": "call_b", "type": "function", "function": {"name": "now", "arguments": "{}"}}]}


def test_logprobs_are_joined_and_choices_kept_apart() -> None:
    def probs(token: str) -> dict[str, Any]:
        return {"content": [{"token": token, "logprob": -0.5}]}

    data = sse(chunk({"content": "a"}, logprobs=probs("a")),
               chunk({"content": "x"}, index=1), chunk({"content": "b"}, logprobs=probs("b")),
               chunk({}, "length", index=1), chunk({}, "stop"), "[DONE]")
    choices = assembled(data).answer()["choices"]
    assert [c["message"]["content"] for c in choices] == ["ab", "x"]
    assert [c["finish_reason"] for c in choices] == ["stop", "length"]
    assert choices[0]["logprobs"] == {"content": [{"token": "a", "logprob": -0.5},
                                                  {"token": "b", "logprob": -0.5}]}
    assert choices[1]["logprobs"] is None


def test_an_answer_with_no_text_has_empty_content_as_llama_server_writes_it() -> None:
    data = sse(chunk({"role": "assistant"}), chunk({}, "length"), "[DONE]")
    assert assembled(data).answer()["choices"][0]["message"] == {"role": "assistant",
                                                                 "content": ""}


def test_text_completions() -> None:
    def piece(text: str, finish: str | None = None) -> dict[str, Any]:
        return {"id": "cmpl-1", "object": "text_completion", "created": 7, "model": "m",
                "choices": [{"index": 0, "text": text, "logprobs": None,
                             "finish_reason": finish}]}

    answer = assembled(sse(piece("Once"), piece(" upon"), piece("", "length"),
                           "[DONE]"), chat=False).answer()
    assert answer["object"] == "text_completion"
    assert answer["choices"] == [{"index": 0, "text": "Once upon", "logprobs": None,
                                  "finish_reason": "length"}]


@pytest.mark.parametrize("error", [
    b'data: {"error": {"code": 500, "message": "boom", "type": "server_error"}}\n\n',
    b'error: {"code": 500, "message": "boom", "type": "server_error"}\n\n',  # older llama.cpp
])
def test_an_error_event_is_the_answer(error: bytes) -> None:
    whole = assembled(sse(chunk({"content": "Hel"})) + error)
    assert whole.error == {"code": 500, "message": "boom", "type": "server_error"}


def test_a_stream_that_stops_without_saying_so_is_not_done() -> None:
    assert not assembled(sse(chunk({"content": "Hel"}))).done
    # A last line without its newline still counts.
    whole = assembled(sse(chunk({"content": "Hel"})) + b"data: [DONE]")
    assert whole.done


def test_the_request_asks_for_a_stream_with_usage_and_keeps_the_rest() -> None:
    raw = json.dumps({"model": "m", "messages": [], "stream": False, "seed": 3,
                      "stream_options": {"x": 1}}).encode()
    assert json.loads(stream_request(raw)) == {
        "model": "m", "messages": [], "stream": True, "seed": 3,
        "stream_options": {"x": 1, "include_usage": True}}


def typed(*events: dict[str, Any]) -> bytes:
    """Events of the typed APIs: an `event:` line naming each, then its data."""
    return b"".join(f"event: {e['type']}\n".encode() + b"data: " + json.dumps(e).encode()
                    + b"\n\n" for e in events)


def fed(path: str, data: bytes, pieces: int = 5) -> Events:
    return in_pieces(assembly_for(path), data, pieces)


def test_a_messages_stream_becomes_the_whole_message_with_text_thinking_and_a_tool_call(
        ) -> None:
    start = {"id": "msg_1", "type": "message", "role": "assistant", "content": [],
             "model": "m", "stop_reason": None, "stop_sequence": None,
             "usage": {"input_tokens": 4, "cache_read_input_tokens": 6, "output_tokens": 0}}
    data = typed(
        {"type": "message_start", "message": start},
        {"type": "content_block_start", "index": 0,
         "content_block": {"type": "thinking", "thinking": ""}},
        {"type": "content_block_delta", "index": 0,
         "delta": {"type": "thinking_delta", "thinking": "Paris, "}},
        {"type": "content_block_delta", "index": 0,
         "delta": {"type": "thinking_delta", "thinking": "so weather."}},
        {"type": "content_block_stop", "index": 0},
        {"type": "content_block_start", "index": 1,
         "content_block": {"type": "text", "text": ""}},
        {"type": "content_block_delta", "index": 1,
         "delta": {"type": "text_delta", "text": "Let me "}},
        {"type": "content_block_delta", "index": 1,
         "delta": {"type": "text_delta", "text": "check."}},
        {"type": "content_block_stop", "index": 1},
        {"type": "content_block_start", "index": 2, "content_block": {  # no input, as sent
            "type": "tool_use", "id": "toolu_1", "name": "get_weather"}},
        {"type": "content_block_delta", "index": 2,
         "delta": {"type": "input_json_delta", "partial_json": '{"city": "Pa'}},
        {"type": "content_block_delta", "index": 2,
         "delta": {"type": "input_json_delta", "partial_json": 'ris"}'}},
        {"type": "content_block_stop", "index": 2},
        {"type": "message_delta", "delta": {"stop_reason": "tool_use", "stop_sequence": None},
         "usage": {"output_tokens": 9}},
        {"type": "message_stop"})
    whole = fed("/v1/messages", data)
    assert whole.done and whole.error is None
    assert whole.answer() == {
        **start, "stop_reason": "tool_use",
        "usage": {"input_tokens": 4, "cache_read_input_tokens": 6, "output_tokens": 9},
        "content": [{"type": "thinking", "thinking": "Paris, so weather."},
                    {"type": "text", "text": "Let me check."},
                    {"type": "tool_use", "id": "toolu_1", "name": "get_weather",
                     "input": {"city": "Paris"}}]}


def test_a_tool_call_without_input_or_with_broken_json_has_an_empty_input() -> None:
    """Anthropic's clients read `input` as an object: never missing, never a string."""
    start = {"type": "message_start", "message": {"id": "msg_1", "content": []}}
    tool = {"type": "content_block_start", "index": 0, "content_block": {
        "type": "tool_use", "id": "toolu_1", "name": "f"}}
    stop = {"type": "content_block_stop", "index": 0}
    bare = fed("/v1/messages", typed(start, tool, stop, {"type": "message_stop"}))
    broken = fed("/v1/messages", typed(start, tool, {
        "type": "content_block_delta", "index": 0,
        "delta": {"type": "input_json_delta", "partial_json": '{"a": '}}, stop))
    assert bare.answer()["content"][0]["input"] == {}
    assert broken.answer()["content"][0]["input"] == {}


def test_a_messages_stream_without_its_start_still_makes_a_whole_message() -> None:
    """llama-server leaves message_start out when the first token is part of a character:
    the message still has its id, type, role and model, and the usage it did report."""
    data = typed(
        {"type": "content_block_start", "index": 0,
         "content_block": {"type": "text", "text": ""}},
        {"type": "content_block_delta", "index": 0,
         "delta": {"type": "text_delta", "text": "\U0001F600 hi"}},
        {"type": "content_block_stop", "index": 0},
        {"type": "message_delta", "delta": {"stop_reason": "max_tokens"},
         "usage": {"output_tokens": 3}},
        {"type": "message_stop"})
    whole = assembly_for("/v1/messages", "abc", "smollm2")
    whole.feed(data)
    whole.end()
    answer = whole.answer()
    assert whole.done
    assert {k: answer[k] for k in ("id", "type", "role", "model", "stop_reason")} == {
        "id": "msg_abc", "type": "message", "role": "assistant", "model": "smollm2",
        "stop_reason": "max_tokens"}
    assert answer["usage"] == {"input_tokens": 0, "output_tokens": 3}
    assert answer["content"] == [{"type": "text", "text": "\U0001F600 hi"}]


def test_a_messages_stream_cut_short_or_failing_says_so() -> None:
    start = {"type": "message_start", "message": {"id": "msg_1", "content": []}}
    cut = fed("/v1/messages", typed(start, {"type": "content_block_start", "index": 0,
                                            "content_block": {"type": "text", "text": ""}}))
    assert not cut.done and cut.error is None
    failed = fed("/v1/messages", typed(start, {"type": "error", "error": {
        "type": "overloaded_error", "message": "busy"}}))
    assert failed.error == {"type": "overloaded_error", "message": "busy"}


def test_a_responses_stream_becomes_the_response_its_last_event_carries() -> None:
    response = {"id": "resp_1", "object": "response", "status": "completed", "model": "m",
                "output": [{"type": "message", "content": [
                    {"type": "output_text", "text": "Hi"}]}],
                "usage": {"input_tokens": 3, "output_tokens": 1, "total_tokens": 4}}
    data = typed({"type": "response.created", "response": {"id": "resp_1"}},
                 {"type": "response.output_text.delta", "delta": "Hi"},
                 {"type": "response.completed", "response": response})
    whole = fed("/v1/responses", data)
    assert whole.done and whole.answer() == response
    failed = fed("/v1/responses", typed({"type": "error", "code": "server_error",
                                         "message": "boom"}))
    assert not failed.done and failed.error == {"message": "boom", "code": "server_error"}


def test_the_typed_apis_are_asked_for_a_stream_without_openais_stream_options() -> None:
    raw = json.dumps({"model": "m", "max_tokens": 5}).encode()
    assert json.loads(stream_request(raw, openai=False)) == {"model": "m", "max_tokens": 5,
                                                             "stream": True}
