"""Cheap unique ids for requests and rate-limit entries: a random per-process prefix + a counter.

uuid4() costs a system call and an object per request; this costs an increment. Ids stay unique
across processes and machines (64 random bits of prefix) and are not secrets.
"""

from __future__ import annotations

import itertools
import os

from aiohttp import web

REQUEST_ID = web.RequestKey("request_id", str)  # set by the front middleware, for every request
_prefix = os.urandom(8).hex()
_counter = itertools.count()


def new_id() -> str:
    return f"{_prefix}{next(_counter):016x}"

