"""Structured logging: JSON lines for journald, a readable console renderer on a TTY.

Events have stable dotted names (`batch.submitted`, `spool.rejected`, …) and key=value context.
When stdout is the journal (systemd sets JOURNAL_STREAM to its device:inode), each line starts
with its sd-daemon priority (`<3>` error, `<4>` warning, `<6>` info, `<7>` debug) so that
`journalctl -p warning` finds the warnings; elsewhere the lines stay plain JSON.

Secrets are taken out twice: values under secret-looking keys before a line is rendered, and
every configured secret (and anything shaped like an API key) from the final rendered text, so a
key inside an exception's message or traceback never reaches the log either.
"""

from __future__ import annotations

import io
import logging
import os
import re
import sys
from collections.abc import Callable, Iterable, Mapping, MutableMapping
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


# Shorter secrets would blank out ordinary words; no real key or webhook secret is this short.
MIN_SECRET_LENGTH = 6


def redact_text(text: str, secrets: Iterable[str] = ()) -> str:
    """`text` with every configured secret, in raw and JSON-escaped form, and every key-shaped word removed."""
    for secret in sorted(secrets, key=len, reverse=True):
        for form in {secret, orjson.dumps(secret).decode()[1:-1]}:
            if len(form) >= MIN_SECRET_LENGTH and form in text:
                text = text.replace(form, "[redacted]")
    return _SECRET_VALUES.sub("[redacted]", text)


class _RedactRendered:
    """Wraps the final renderer: redaction runs on the text as written, tracebacks included."""

    def __init__(self, renderer: Callable[..., Any], secrets: Iterable[str]) -> None:
        self._renderer = renderer
        self._secrets = tuple(secrets)

    def __call__(self, logger: Any, method: str, event: MutableMapping[str, Any]) -> Any:
        rendered = self._renderer(logger, method, event)
        if isinstance(rendered, bytes):
            return redact_text(rendered.decode("utf-8", "replace"), self._secrets).encode()
        return redact_text(str(rendered), self._secrets)


class _RedactingFormatter(logging.Formatter):
    """For libraries that log through the standard library (their tracebacks too)."""

    def __init__(self, secrets: Iterable[str]) -> None:
        super().__init__("%(levelname)s %(name)s: %(message)s")
        self._secrets = tuple(secrets)

    def format(self, record: logging.LogRecord) -> str:
        return redact_text(super().format(record), self._secrets)


# sd-daemon(3) priorities, by structlog's level names.
SYSLOG_PRIORITY = {
    "debug": 7,
    "info": 6,
    "warning": 4,
    "warn": 4,
    "error": 3,
    "exception": 3,
    "critical": 2,
    "fatal": 2,
}


def is_journal(stream: TextIO, environ: Mapping[str, str] | None = None) -> bool:
    """True when `stream` is the journal's stream socket: JOURNAL_STREAM names its device:inode."""
    value = (os.environ if environ is None else environ).get("JOURNAL_STREAM", "")
    device, _, inode = value.partition(":")
    if not (device.isdigit() and inode.isdigit()):
        return False
    try:
        info = os.fstat(stream.fileno())
    except (OSError, ValueError, io.UnsupportedOperation):
        return False
    return info.st_dev == int(device) and info.st_ino == int(inode)


class _JournalPriority:
    """Wraps the final renderer: `<N>` in front of each line, for journald's stream protocol."""

    def __init__(self, renderer: Callable[..., Any]) -> None:
        self._renderer = renderer

    def __call__(self, logger: Any, method: str, event: MutableMapping[str, Any]) -> Any:
        priority = SYSLOG_PRIORITY.get(str(event.get("level", method)).lower(), 6)
        rendered = self._renderer(logger, method, event)
        # A multi-line entry (a console traceback) keeps its priority on every line.
        if isinstance(rendered, bytes):
            rendered = rendered.decode("utf-8", "replace")
        return "\n".join(f"<{priority}>{line}" for line in str(rendered).split("\n"))


class _JournalFormatter(logging.Formatter):
    """The standard library's lines (on stderr) with their priority, when stderr is the journal."""

    def __init__(self, inner: logging.Formatter) -> None:
        super().__init__()
        self._inner = inner

    def format(self, record: logging.LogRecord) -> str:
        priority = SYSLOG_PRIORITY.get(record.levelname.lower(), 6)
        return "\n".join(f"<{priority}>{line}" for line in self._inner.format(record).split("\n"))


def _json_dumps(data: Any, default: Any = None) -> str:
    return orjson.dumps(data, default=default or str).decode()


def configure_logging(
    log_format: str = "auto", level: str = "info", stream: TextIO | None = None, secrets: Iterable[str] = ()
) -> None:
    """Set up structlog once per process. `auto` means JSON unless stdout is a terminal.

    `secrets` (the resolved API keys and webhook secrets) are removed from every rendered line.
    """
    out = stream or sys.stdout
    journal = is_journal(out)
    if log_format == "auto":
        under_journal = bool(os.environ.get("JOURNAL_STREAM") or os.environ.get("INVOCATION_ID"))
        log_format = "console" if out.isatty() and not under_journal else "json"
    renderer: Any
    if log_format == "json":
        renderer = structlog.processors.JSONRenderer(serializer=_json_dumps)
    else:
        renderer = structlog.dev.ConsoleRenderer(colors=out.isatty())
    secrets = tuple(secrets)
    final: Callable[..., Any] = _RedactRendered(renderer, secrets)
    if journal:
        final = _JournalPriority(final)
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            _redact,
            # A plain traceback (no local variables) for both renderers; the wrapper below redacts it.
            structlog.processors.format_exc_info,
            final,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(logging.getLevelName(level.upper())),
        logger_factory=structlog.PrintLoggerFactory(file=out),
        cache_logger_on_first_use=False,
    )
    # Libraries (httpx2, aiohttp) log through the standard library; keep their chatter out.
    handler = logging.StreamHandler(sys.stderr)
    formatter: logging.Formatter = _RedactingFormatter(secrets)
    handler.setFormatter(_JournalFormatter(formatter) if is_journal(sys.stderr) else formatter)
    logging.basicConfig(level=logging.WARNING, handlers=[handler])


def get_logger(name: str) -> Any:
    """A bound logger carrying `logger=name`."""
    return structlog.get_logger(name)
