"""Structured logging: JSON lines for journald, a readable console renderer on a TTY.

Events have stable dotted names (`batch.submitted`, `spool.rejected`, …) and key=value context.
A processor drops anything that looks like a secret before a line is rendered.
"""

from __future__ import annotations

import logging
import os
import re
import sys
from collections.abc import MutableMapping
from typing import Any, TextIO

import orjson
import structlog

_SECRET_KEYS = re.compile(r"(api_key|secret|token|authorization|password)$", re.IGNORECASE)
_SECRET_VALUES = re.compile(r"\b(sk-[A-Za-z0-9_-]{6,}|sk-ant-[A-Za-z0-9_-]{6,})")
# Counters such as input_tokens are numbers, not secrets.
_ALLOWED_KEYS = re.compile(r"(_tokens|tokens)$")

Logger = structlog.stdlib.BoundLogger


def _redact(_logger: Any, _method: str, event: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    for key, value in list(event.items()):
        if _SECRET_KEYS.search(key) and not _ALLOWED_KEYS.search(key):
            event[key] = "[redacted]"
        elif isinstance(value, str) and _SECRET_VALUES.search(value):
            event[key] = _SECRET_VALUES.sub("[redacted]", value)
    return event


def _json_dumps(data: Any, default: Any = None) -> str:
    return orjson.dumps(data, default=default or str).decode()


def configure_logging(log_format: str = "auto", level: str = "info", stream: TextIO | None = None) -> None:
    """Set up structlog once per process. `auto` means JSON unless stdout is a terminal."""
    out = stream or sys.stdout
    if log_format == "auto":
        under_journal = bool(os.environ.get("JOURNAL_STREAM") or os.environ.get("INVOCATION_ID"))
        log_format = "console" if out.isatty() and not under_journal else "json"
    renderer: Any
    if log_format == "json":
        renderer = structlog.processors.JSONRenderer(serializer=_json_dumps)
    else:
        renderer = structlog.dev.ConsoleRenderer(colors=out.isatty())
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            _redact,
            structlog.processors.format_exc_info,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(logging.getLevelName(level.upper())),
        logger_factory=structlog.PrintLoggerFactory(file=out),
        cache_logger_on_first_use=False,
    )
    # Libraries (httpx2, aiohttp) log through the standard library; keep their chatter out.
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)


def get_logger(name: str) -> Any:
    """A bound logger carrying `logger=name`."""
    return structlog.get_logger(name)
