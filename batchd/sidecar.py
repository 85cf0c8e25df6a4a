"""Per-file options: the `NAME.meta.json` sidecar a producer puts into new/ before `NAME.jsonl` (issue 11).

A sidecar is one small JSON object of known keys, today only `deadline`: an ISO 8601 time with a
UTC offset ("2026-12-01T07:00+01:00"), a time relative to the file's arrival ("8h", "90m"), or a
unix time (a number). The spool reads it once, from the same kind of descriptor as the input
file (safefs: no symlink, no FIFO, regular files only), and records what it said with the file's
row; from then on the row is the truth (a resumed ingest never reads a sidecar again).

Anything else (not UTF-8 JSON, not an object, an unknown key, a deadline that cannot be read,
over MAX_BYTES) is an error that rejects the input file with it: a producer that asked for a
deadline must not get a file queued without one.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import orjson

from .deadlines import DeadlineError, parse_deadline

SUFFIX = ".meta.json"
INPUT_SUFFIX = ".jsonl"
# A sidecar holds a few options, never data: anything larger is refused without being read.
MAX_BYTES = 64 << 10
KNOWN_KEYS = frozenset({"deadline"})


class SidecarError(ValueError):
    """A sidecar that cannot be used; the message says why, for the rejected file's report."""


@dataclass(frozen=True, slots=True)
class FileOptions:
    """What a sidecar said: its JSON object as recorded (files.options) and the deadline resolved."""

    text: str
    deadline: float | None


def sidecar_name(input_name: str) -> str:
    """NAME.meta.json for NAME.jsonl."""
    return input_name.removesuffix(INPUT_SUFFIX) + SUFFIX


def input_name(sidecar: str) -> str:
    """NAME.jsonl for NAME.meta.json."""
    return sidecar.removesuffix(SUFFIX) + INPUT_SUFFIX


def parse_options(data: bytes, arrival: float) -> FileOptions:
    """The options of a sidecar's bytes; a relative deadline counts from `arrival` (unix time)."""
    if len(data) > MAX_BYTES:
        raise SidecarError(f"over {MAX_BYTES} bytes")
    try:
        text = data.decode("utf-8")
        options = orjson.loads(text)
    except (UnicodeDecodeError, orjson.JSONDecodeError):
        raise SidecarError("not UTF-8 JSON") from None
    if not isinstance(options, dict):
        raise SidecarError("not a JSON object")
    unknown = sorted(set(options) - KNOWN_KEYS)
    if unknown:
        known = ", ".join(sorted(KNOWN_KEYS))
        raise SidecarError(f"unknown key {unknown[0]!r} (known: {known})")
    deadline = None
    if "deadline" in options:
        deadline = _deadline(options["deadline"], arrival)
    return FileOptions(orjson.dumps(options).decode(), deadline)


def _deadline(value: Any, arrival: float) -> float:
    if isinstance(value, int | float) and not isinstance(value, bool):
        if not math.isfinite(value) or value <= 0:
            raise SidecarError(f"deadline {value!r} is not a unix time")
        return float(value)
    if not isinstance(value, str):
        raise SidecarError("deadline must be a string (ISO 8601 with an offset, or 8h) or a unix time")
    try:
        return parse_deadline(value, arrival)
    except DeadlineError as exc:
        raise SidecarError(str(exc)) from None


def deadline_text(value: str | datetime | float) -> str:
    """A deadline given to `batchd submit` / `batchd.submit()` as a sidecar writes it, checked now.

    A string stays as given (a relative one counts from the file's arrival in the spool); a
    datetime must carry its time zone; a number is a unix time. Raises DeadlineError (a
    ValueError) naming what is wrong, before anything is written.
    """
    if isinstance(value, datetime):
        if value.tzinfo is None or value.utcoffset() is None:
            raise DeadlineError(f"deadline {value.isoformat()} has no time zone (give tzinfo)")
        return value.isoformat()
    if isinstance(value, int | float) and not isinstance(value, bool):
        if not math.isfinite(value) or value <= 0:
            raise DeadlineError(f"deadline {value!r} is not a unix time")
        return datetime.fromtimestamp(value, UTC).isoformat()
    if not isinstance(value, str):
        raise DeadlineError(f"deadline {value!r}: expected a string, a datetime with tzinfo, or a unix time")
    text = value.strip()
    parse_deadline(text, 0.0)
    return text


def encode_options(deadline: str | None) -> bytes:
    """A sidecar's bytes for these options (deadline as deadline_text returned it)."""
    options: dict[str, Any] = {}
    if deadline is not None:
        options["deadline"] = deadline
    return orjson.dumps(options) + b"\n"
