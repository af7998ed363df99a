"""Logging set-up: text or JSON lines on stderr, with secrets redacted from every record.

Handlers write from a thread of their own (a queue in between), so a slow disk or a full pipe
never stalls the event loop.
"""

from __future__ import annotations

import atexit
import contextlib
import copy
import logging
import queue
import re
import sys
import threading
import time
from logging.handlers import QueueHandler

import orjson

# Credentials that look like credentials are hidden even if nobody registered them.
_PATTERNS = [
    re.compile(r"(?i)(bearer\s+)[A-Za-z0-9._~+/=-]+"),
    re.compile(r"(?i)(x-api-key[\"']?\s*[:=]\s*[\"']?)[^\s\"',]+"),
    re.compile(r"()\bsk-[A-Za-z0-9]+_[A-Za-z0-9_-]+"),
    re.compile(r"()\beyJ[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+\.[A-Za-z0-9_-]*"),
]
_secrets: set[str] = set()


def register_secret(value: str | None) -> None:
    """Remember a secret so no log line ever prints it (keys, tokens, the child's API key)."""
    if value and len(value) >= 6:
        _secrets.add(value)


def redact(text: str) -> str:
    for secret in _secrets:
        if secret in text:
            text = text.replace(secret, "***")
    for pattern in _PATTERNS:
        text = pattern.sub(r"\1***", text)
    return text


class RedactingFilter(logging.Filter):
    """For handlers that format on their own (the child's log file): clean the message."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        clean = redact(message)
        if clean != message or record.args:
            record.msg, record.args = clean, None
        return True


class RedactingFormatter(logging.Formatter):
    """Redact the whole formatted line, tracebacks included (libraries log header values)."""

    def __init__(self, inner: logging.Formatter) -> None:
        super().__init__()
        self.inner = inner

    def format(self, record: logging.LogRecord) -> str:
        return redact(self.inner.format(record))


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "pid": record.process,
            "msg": record.getMessage(),
        }
        access = getattr(record, "access", None)  # the access line's fields, as keys
        if isinstance(access, dict):
            entry.update(access)
        if record.exc_info or record.exc_text:
            entry["exc"] = record.exc_text or self.formatException(record.exc_info)
        return orjson.dumps(entry).decode()


_PLAIN = logging.Formatter()
WRITER_STOP_WAIT = 2.0  # at exit; a writer stuck on a dead disk must not hang the exit
QUEUE_LINES = 10_000  # records waiting for a writer; past that they are counted, not kept


class _Writer(threading.Thread):
    """Takes records off a bounded queue and hands them to one handler, on its own thread.

    The handler is this thread's alone, so its lock is not taken: logging's own clean-up at exit
    would otherwise wait forever for a writer stuck on a dead disk. Records that find the queue
    full are dropped and counted, so a stuck writer costs bounded memory; the count is logged
    once the writer catches up.
    """

    def __init__(self, handler: logging.Handler) -> None:
        super().__init__(name=f"log-writer-{type(handler).__name__}", daemon=True)
        self.records: queue.Queue[logging.LogRecord | None] = queue.Queue(QUEUE_LINES)
        self.handler = handler
        self.dropped = 0

    def put(self, record: logging.LogRecord) -> None:
        try:
            self.records.put_nowait(record)
        except queue.Full:
            self.dropped += 1

    def run(self) -> None:
        while (record := self.records.get()) is not None:
            if self.dropped:
                dropped, self.dropped = self.dropped, 0
                self._write(logging.makeLogRecord({
                    "name": "proxy.logs", "levelno": logging.WARNING, "levelname": "WARNING",
                    "msg": f"the log writer fell behind: {dropped} lines were dropped"}))
            self._write(record)
        self.handler.flush()

    def _write(self, record: logging.LogRecord) -> None:
        if record.levelno >= self.handler.level and self.handler.filter(record):
            self.handler.emit(record)

    def stop(self) -> None:
        with contextlib.suppress(queue.Full):
            self.records.put(None, timeout=WRITER_STOP_WAIT)
        self.join(WRITER_STOP_WAIT)


class _Enqueue(QueueHandler):
    """Hand a record to a writer thread: its message and traceback rendered now (the arguments
    may change later), everything else kept for the writer's formatter."""

    def __init__(self, writer: _Writer) -> None:
        super().__init__(writer.records)  # type: ignore[arg-type]
        self.writer = writer

    def prepare(self, record: logging.LogRecord) -> logging.LogRecord:
        record = copy.copy(record)
        record.msg, record.args = record.getMessage(), None
        if record.exc_info:
            record.exc_text = record.exc_text or _PLAIN.formatException(record.exc_info)
            record.exc_info = None
        return record

    def enqueue(self, record: logging.LogRecord) -> None:
        self.writer.put(record)


_writers: list[_Writer] = []


def add_threaded_handler(logger: logging.Logger, handler: logging.Handler) -> QueueHandler:
    """Attach `handler` to `logger` so that it writes on a thread of its own."""
    writer = _Writer(handler)
    writer.start()
    _writers.append(writer)
    front = _Enqueue(writer)
    front.setLevel(handler.level)  # what the writer would drop is not even queued
    logger.addHandler(front)
    return front


@atexit.register
def stop_log_threads() -> None:
    """Write out what is queued (at exit, so no line is lost)."""
    while _writers:
        _writers.pop().stop()


def setup_logging(level: str, fmt: str) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setLevel(level.upper())  # loggers with their own level (the child's) obey it too
    text = "%(asctime)s %(levelname)-7s %(name)s[%(process)d]: %(message)s"
    inner = JsonFormatter() if fmt == "json" else logging.Formatter(text)
    handler.setFormatter(RedactingFormatter(inner))
    root = logging.getLogger()
    root.handlers.clear()
    add_threaded_handler(root, handler)
    root.setLevel(level.upper())
    # aiohttp's own access log is replaced by ours (request ids, no query strings).
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)
