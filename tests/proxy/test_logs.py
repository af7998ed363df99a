"""Secrets never reach a log line, not even inside a library's traceback."""

from __future__ import annotations

import io
import logging

from proxy.logs import JsonFormatter, RedactingFormatter, register_secret


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
