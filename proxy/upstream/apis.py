"""Every API a model server speaks that the appliance relays, and what each one's requests need:
a model slot or not, the field that caps its output (the token budget is reserved from it), how
its usage is reported, and whether a whole answer is assembled from a stream.

One table, read by the routes (which paths exist), the access room (budget, slot) and the relay
(assembly, usage); the error shape by path is proxy/errors.py's.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Api:
    path: str
    slot: bool = True  # takes a turn at the model (generation, embeddings); cheap ones do not
    caps: tuple[str, ...] = ()  # output-cap fields the model server honours here, its own first
    sets: str = ""  # the cap set when none is asked for (default: the first of caps)
    stream_usage: bool = False  # OpenAI's stream_options.include_usage asks for usage
    assembled: bool = False  # a whole answer from llama-server is assembled from its stream
    # Bytes present in an event or body that reports usage (others pass through unparsed).
    usage_marker: bytes = b'"usage"'
    streams: bool = True  # its answers may be SSE streams
    typed: bool = False  # its stream's events are named (`event:`), not bare `data:` chunks

    @property
    def cap(self) -> str:
        return self.sets or self.caps[0]

    @property
    def generates(self) -> bool:
        """Whether a completion budget is reserved for it."""
        return bool(self.caps)


_OPENAI_CAPS = ("max_completion_tokens", "max_tokens", "n_predict")
# Every field that caps output on some API: all are lowered to the budget wherever they appear,
# as llama-server honours some beyond an API's own (`n_predict` on /v1/responses: measured on
# the pinned build).
ALL_CAPS = (*_OPENAI_CAPS, "max_output_tokens")
_NATIVE_END = b'"stop":true'  # llama-server's own API reports usage in its last event

APIS: dict[str, Api] = {api.path: api for api in (
    # OpenAI's
    Api("/v1/chat/completions", caps=_OPENAI_CAPS, sets="max_tokens", stream_usage=True,
        assembled=True),
    Api("/v1/completions", caps=_OPENAI_CAPS, sets="max_tokens", stream_usage=True,
        assembled=True),
    Api("/v1/embeddings", streams=False),
    Api("/v1/rerank", streams=False),
    # Anthropic's Messages
    Api("/v1/messages", caps=("max_tokens",), assembled=True, typed=True),
    Api("/v1/messages/count_tokens", slot=False, streams=False),
    # OpenAI's Responses
    Api("/v1/responses", caps=("max_output_tokens", "n_predict", "max_tokens"),
        assembled=True, typed=True),
    Api("/v1/responses/input_tokens", slot=False, streams=False),
    # llama-server's own: fill-in-the-middle, the tokenizer, the chat template
    Api("/infill", caps=("n_predict", "max_tokens"), usage_marker=_NATIVE_END),
    Api("/tokenize", slot=False, streams=False),
    Api("/detokenize", slot=False, streams=False),
    Api("/apply-template", slot=False, streams=False),
)}

# Paths at the root (editor plugins call them there): outside /v1/, so named to the guard.
ROOT_PATHS = tuple(path for path in APIS if not path.startswith("/v1/"))


def api_of(path: str) -> Api:
    """The API of a model server path (/api/chat goes to chat completions)."""
    return APIS.get(path) or Api(path)
