"""The usage meter reads token usage out of SSE streams however the events are cut or ended
(LF or CRLF blank lines), removes the usage event only when the appliance asked for it, and
never holds back bytes that are not events."""

from __future__ import annotations

import pytest

from proxy.upstream.usage import MAX_PENDING, UsageMeter

DELTA = b'data: {"choices":[{"delta":{"content":"a"}}]}'
USAGE = (b'data: {"choices":[],"usage":{"prompt_tokens":3,"completion_tokens":2,'
         b'"total_tokens":5}}')
DONE = b"data: [DONE]"


def feed(meter: UsageMeter, data: bytes, cuts: list[int]) -> bytes:
    out, start = b"", 0
    for cut in [*cuts, len(data)]:
        out += meter.filter(data[start:cut])
        start = cut
    return out + meter.flush()


@pytest.mark.parametrize("end", [b"\n\n", b"\r\n\r\n"])
@pytest.mark.parametrize("cuts", [[], [7], [7, 60, 61], list(range(1, 200, 13))])
def test_usage_is_read_and_its_event_removed_when_we_asked(end: bytes, cuts: list[int]) -> None:
    stream = DELTA + end + DELTA + end + USAGE + end + DONE + end
    meter = UsageMeter(strip=True)
    assert feed(meter, stream, cuts) == DELTA + end + DELTA + end + DONE + end
    assert (meter.prompt, meter.completion, meter.chunks) == (3, 2, 4)


@pytest.mark.parametrize("end", [b"\n\n", b"\r\n\r\n"])
def test_a_client_that_asked_for_usage_gets_it_untouched(end: bytes) -> None:
    stream = DELTA + end + USAGE + end + DONE + end
    meter = UsageMeter(strip=False)
    assert feed(meter, stream, [5, 50]) == stream
    assert (meter.prompt, meter.completion) == (3, 2)


def test_bytes_that_never_end_an_event_are_passed_on() -> None:
    meter = UsageMeter(strip=True)
    blob = b"x" * (MAX_PENDING + 10)
    assert meter.filter(blob[:100]) == b""  # may still become an event
    assert meter.filter(blob[100:]) == blob  # past the bound: not held back any longer
    assert meter.flush() == b""


def test_a_client_that_left_is_charged_what_the_model_did() -> None:
    never_sent = UsageMeter(strip=False, prompt_estimate=30, completion_cap=200)
    never_sent.left()
    assert never_sent.spent() == (0, 0) and never_sent.total() == 0  # cut while queued

    before_first_token = UsageMeter(strip=False, prompt_estimate=30, completion_cap=200)
    before_first_token.sent(stream=True)
    before_first_token.left()
    assert before_first_token.total() == 30  # its prompt, nothing more

    mid_stream = UsageMeter(strip=False, prompt_estimate=30, completion_cap=200)
    mid_stream.sent(stream=True)
    mid_stream.filter(DELTA + b"\n\n" + DELTA + b"\n\n")
    mid_stream.left()
    assert mid_stream.spent() == (30, 2)

    whole = UsageMeter(strip=False, prompt_estimate=30, completion_cap=200)
    whole.sent(stream=False)
    whole.left()
    assert whole.spent() == (30, 200)  # its progress is unknown: the reservation stands

    chatty = UsageMeter(strip=False, prompt_estimate=30, completion_cap=2)
    chatty.sent(stream=True)
    chatty.filter((DELTA + b"\n\n") * 5)  # role, finish and usage events count as well
    chatty.left()
    assert chatty.spent() == (30, 2)  # never more than it reserved

    answered = UsageMeter(strip=False, prompt_estimate=30, completion_cap=200)
    answered.sent(stream=False)
    answered.from_body(b'{"usage": {"prompt_tokens": 7, "completion_tokens": 3, '
                       b'"total_tokens": 10}}')
    answered.left()  # it left while its answer was written: the real usage
    assert answered.spent() == (7, 3) and answered.total() == 10


def typed(name: str, data: str) -> bytes:
    return f"event: {name}\ndata: {data}\n\n".encode()


MESSAGE_START = typed("message_start", '{"type":"message_start","message":{"id":"m","usage":'
                      '{"input_tokens":4,"cache_read_input_tokens":30,"output_tokens":0}}}')
TEXT = typed("content_block_delta", '{"type":"content_block_delta","index":0,"delta":'
             '{"type":"text_delta","text":"a"}}')
MESSAGE_DELTA = typed("message_delta", '{"type":"message_delta","delta":{"stop_reason":'
                      '"end_turn"},"usage":{"output_tokens":2}}')


@pytest.mark.parametrize("cuts", [[], [9], list(range(1, 400, 11))])
def test_a_messages_stream_is_metered_in_anthropics_names(cuts: list[int]) -> None:
    """The prompt is the uncached input plus what was read from the cache."""
    stream = MESSAGE_START + TEXT + TEXT + MESSAGE_DELTA + typed("message_stop", "{}")
    meter = UsageMeter(strip=False)
    meter.sent(True)
    assert feed(meter, stream, cuts) == stream  # nothing of it removed
    assert (meter.prompt, meter.completion, meter.total()) == (34, 2, 36)


def test_a_messages_client_that_left_is_charged_the_prompt_the_model_reported() -> None:
    meter = UsageMeter(strip=False, prompt_estimate=500, completion_cap=100)
    meter.sent(True)
    feed(meter, MESSAGE_START + TEXT + TEXT, [])
    meter.left()
    assert meter.spent() == (34, 3)  # the reported prompt, not the estimate; 3 events


def test_a_messages_stream_without_its_start_is_charged_the_prompt_estimate() -> None:
    """No message_start (llama-server drops it when the first token is part of a character):
    the prompt is still charged, as estimated, not left out."""
    meter = UsageMeter(strip=False, prompt_estimate=190, completion_cap=20)
    meter.sent(True)
    feed(meter, TEXT + MESSAGE_DELTA, [])
    assert (meter.prompt, meter.completion, meter.total()) == (190, 2, 192)


def test_a_responses_stream_is_metered_from_its_last_event() -> None:
    done = typed("response.completed", '{"type":"response.completed","response":{"id":"r",'
                 '"usage":{"input_tokens":31,"output_tokens":3,"total_tokens":34,'
                 '"input_tokens_details":{"cached_tokens":30}}}}')
    meter = UsageMeter(strip=False)
    assert feed(meter, typed("response.output_text.delta", '{"delta":"a"}') + done, [20]) \
        == typed("response.output_text.delta", '{"delta":"a"}') + done
    assert (meter.prompt, meter.completion, meter.total()) == (31, 3, 34)


def test_llama_servers_own_api_is_metered_from_its_last_event_only() -> None:
    """/infill reports running counts in every event; only the last (stop) one is read."""
    event = b'data: {"content":"x","stop":false,"tokens_predicted":%d,"tokens_evaluated":9}\n\n'
    last = b'data: {"content":"","stop":true,"tokens_predicted":3,"tokens_evaluated":9}\n\n'
    meter = UsageMeter(strip=False, marker=b'"stop":true')
    stream = event % 1 + event % 2 + last
    assert feed(meter, stream, [30]) == stream
    assert (meter.prompt, meter.completion, meter.total()) == (9, 3, 12)
    whole = UsageMeter(strip=False, marker=b'"stop":true')
    whole.from_body(last[6:-2])
    assert whole.total() == 12
