"""What the connection layer (proxy/edge/connection.py) relies on inside aiohttp, which builds
its protocol objects itself: if an aiohttp upgrade renames or reshapes any of it, this fails
first, naming the hook, instead of the edge quietly losing a defence."""

from __future__ import annotations

import inspect

from aiohttp import web
from aiohttp.web_protocol import RequestHandler
from aiohttp.web_request import BaseRequest

# Attributes set in RequestHandler.__init__ that the edge reads or writes.
HANDLER_STATE = ("_manager", "_loop", "_messages", "_request_in_progress", "_waiter", "_close",
                 "_current_request", "_task_handler")
# Methods the edge overrides or calls, with the parameters it passes.
HANDLER_METHODS = {
    "_handle_request": ["request", "start_time", "request_handler"],
    "finish_response": ["request", "resp", "start_time"],
    "handle_error": ["request", "status", "exc", "message"],
    "data_received": ["data"],
    "eof_received": [],
    "connection_made": ["transport"],
    "connection_lost": ["exc"],
    "force_close": [],
    "close": [],
}


def defines(cls: type, name: str) -> bool:
    """Whether cls or a base sets the attribute (in a __slots__ or its __init__)."""
    for klass in cls.__mro__[:-1]:
        if name in getattr(klass, "__slots__", ()):
            return True
        init = klass.__dict__.get("__init__")
        if init is not None and f"self.{name}" in inspect.getsource(init):
            return True
    return False


def test_the_request_handler_keeps_what_the_edge_relies_on() -> None:
    for name in HANDLER_STATE:
        assert defines(RequestHandler, name), f"RequestHandler lost {name}"
    assert not defines(RequestHandler, "_no_such_thing")  # the check itself can fail
    for name, params in HANDLER_METHODS.items():
        method = getattr(RequestHandler, name, None)
        assert callable(method), f"RequestHandler lost {name}()"
        assert list(inspect.signature(method).parameters)[1:] == params, name
    # Ours returns whether to keep the transport open; aiohttp's must still be a hook
    # asyncio calls, not something the handler uses itself.
    assert "eof_received" not in inspect.getsource(RequestHandler.data_received)


def test_the_server_and_runner_keep_what_the_edge_relies_on() -> None:
    for name in ("_connections", "_kwargs", "_loop"):
        assert defines(web.Server, name), f"web.Server lost {name}"
    assert "def __call__" in inspect.getsource(web.Server)  # the protocol factory we replace
    assert callable(getattr(web.AppRunner, "_make_server", None)), "AppRunner lost _make_server"


def test_a_request_keeps_its_headers_where_the_edge_edits_them() -> None:
    # _expect() drops the Expect header: the field, and reify's cache of it.
    assert defines(BaseRequest, "_headers") and defines(BaseRequest, "_cache")
