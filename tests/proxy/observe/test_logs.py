"""Secrets never reach a log line, not even inside a library's traceback."""

from __future__ import annotations

import io
import logging

from proxy.observe.logs import JsonFormatter, RedactingFormatter, register_secret
from tests.kit.helpers import wait_until


def test_tracebacks_and_messages_are_redacted() -> None:
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(RedactingFormatter(logging.Formatter("%(message)s")))
    log = logging.getLogger("test.redaction")
    log.addHandler(handler)
    register_secret("child-internal-key-123")
    token = "eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiJhIn0.c2lnbmF0dXJl"
    try:
        raise ValueError(f"bad header: Bearer {token} and sk-abcdef12_{'z' * 40}")
    except ValueError:
        log.exception("failed for key child-internal-key-123 and x-api-key: hunter2hunter2")
    log.removeHandler(handler)
    text = stream.getvalue()
    assert "Traceback" in text and "ValueError" in text
    for secret in (token, "z" * 40, "child-internal-key-123", "hunter2hunter2"):
        assert secret not in text


def test_json_lines_are_redacted_too() -> None:
    formatter = RedactingFormatter(JsonFormatter())
    record = logging.LogRecord("x", logging.WARNING, __file__, 1, "Authorization: Bearer %s",
                               ("abc.def.ghi",), None)
    assert "abc.def.ghi" not in formatter.format(record)


def test_a_stuck_log_writer_costs_bounded_memory_and_says_what_it_dropped() -> None:
    import threading

    from proxy.observe.logs import QUEUE_LINES, add_threaded_handler

    release = threading.Event()
    lines: list[str] = []

    class Stuck(logging.Handler):  # a disk that stops answering, then comes back
        def emit(self, record: logging.LogRecord) -> None:
            release.wait(10)
            lines.append(record.getMessage())

    log = logging.getLogger("test.stuck-writer")
    log.propagate = False
    front = add_threaded_handler(log, Stuck())
    try:
        for i in range(QUEUE_LINES + 500):
            log.warning("line %d", i)  # returns at once although nothing is written
        writer = front.writer
        assert writer.records.qsize() <= QUEUE_LINES and writer.dropped >= 499
        release.set()
        wait_until(lambda: writer.records.qsize() == 0, 10, "the writer to catch up")
        log.warning("after")
        wait_until(lambda: "after" in lines, 10, "the next line to be written")
        assert any("lines were dropped" in line for line in lines)
        assert lines[-1] == "after" and len(lines) < QUEUE_LINES + 10
    finally:
        log.removeHandler(front)
        writer.stop()
