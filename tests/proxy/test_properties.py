"""Property tests for what the edge parses and rewrites: request bodies, completion caps, and
the usage meter that watches streams chunk by chunk."""

from __future__ import annotations

import orjson
from hypothesis import given
from hypothesis import strategies as st

from proxy.access.limits import capped, completion_budget
from proxy.api.routes import parse_body
from proxy.errors import OpenAIError
from proxy.upstream.apis import ALL_CAPS, APIS, Api
from proxy.upstream.usage import UsageMeter

json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**63), 2**64 - 1) | st.floats(allow_nan=False)
    | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner,
                                                                max_size=4),
    max_leaves=12)


@given(st.binary(max_size=300) | json_values.map(orjson.dumps)
       | st.integers().map(lambda n: b'{"max_tokens": %d}' % n))
def test_any_body_is_parsed_or_refused_with_a_400(raw: bytes) -> None:
    try:
        body = parse_body(raw)
    except OpenAIError as exc:
        assert exc.status == 400
        return
    assert isinstance(body, dict)
    assert isinstance(body.get("model", ""), str) and isinstance(body.get("stream", False), bool)


@given(st.dictionaries(st.text(max_size=8), json_values, max_size=4),
       st.none() | st.text(max_size=20), st.none() | st.booleans())
def test_every_well_typed_body_is_parsed_as_sent(extra: dict, model: str | None,
                                                stream: bool | None) -> None:
    """The other side of the refusals above: a parser that refused everything would pass it."""
    body = {**extra, **({"model": model} if model is not None else {}),
            **({"stream": stream} if stream is not None else {})}
    assert parse_body(orjson.dumps(body)) == orjson.loads(orjson.dumps(body))


GENERATING = [api for api in APIS.values() if api.generates]
CAP_FIELDS = [*ALL_CAPS, "other"]


@given(st.sampled_from(GENERATING),
       st.dictionaries(st.sampled_from(CAP_FIELDS), json_values, max_size=4),
       st.integers(1, 10_000))
def test_generation_is_never_allowed_past_the_reservation(api: Api, body: dict,
                                                          allowed: int) -> None:
    """On every API that generates: one of its own caps is set, and no cap of any API's is
    above the reservation (llama-server honours some foreign ones)."""
    sent = {**body, **capped(body, api, allowed)}

    def caps(names: tuple[str, ...]) -> list[int]:
        return [v for k, v in sent.items() if k in names and isinstance(v, int)
                and not isinstance(v, bool) and v > 0]

    assert caps(api.caps) and max(caps(ALL_CAPS)) <= allowed
    assert 0 < completion_budget(sent, api, 512) <= allowed


def events(texts: list[str], usage: int | None) -> bytes:
    out = b"".join(b"data: " + orjson.dumps({"choices": [{"delta": {"content": t}}]}) + b"\n\n"
                   for t in texts)
    if usage is not None:
        out += b"data: " + orjson.dumps({"choices": [], "usage": {"total_tokens": usage}})
        out += b"\n\n"
    return out + b"data: [DONE]\n\n"


def meter() -> UsageMeter:
    return UsageMeter(strip=False)


@given(st.lists(st.text(max_size=12), max_size=8), st.none() | st.integers(0, 10**6),
       st.lists(st.integers(1, 400), max_size=12))
def test_a_stream_cut_anywhere_passes_through_whole_and_its_usage_is_seen(
    texts: list[str], usage: int | None, cuts: list[int]
) -> None:
    stream = events(texts, usage)
    chunks, at = [], 0
    for size in cuts:
        chunks.append(stream[at:at + size])
        at += size
    chunks.append(stream[at:])
    watcher = meter()
    out = b"".join(watcher.filter(c) for c in chunks if c) + watcher.flush()
    assert out == stream  # nothing changed, nothing lost, however the bytes arrived
    assert watcher.reported == usage
