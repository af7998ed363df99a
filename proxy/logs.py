"""Logging set-up: text or JSON lines on stderr, with secrets redacted from every record."""

from __future__ import annotations

import logging
import re
import sys
import time

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
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        return orjson.dumps(entry).decode()


def setup_logging(level: str, fmt: str) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setLevel(level.upper())  # loggers with their own level (the child's) obey it too
    text = "%(asctime)s %(levelname)-7s %(name)s[%(process)d]: %(message)s"
    inner = JsonFormatter() if fmt == "json" else logging.Formatter(text)
    handler.setFormatter(RedactingFormatter(inner))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # aiohttp's own access log is replaced by ours (request ids, no query strings).
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)
