"""Capacity gating before the provider says no (issue 11): estimates and admission, as pure functions.

The estimate of a request's enqueued tokens needs no network at run time. tiktoken would fetch its
encodings on first use, so batchd uses a heuristic instead, chosen to over-count:

- text: one token per 3 bytes of UTF-8 in the request body, JSON syntax and keys included
  (English runs near 4 characters a token and CJK near 1 character = 3 bytes a token, so this is
  above the real count for both);
- token arrays (embeddings or completions given token ids): one token per id, counted exactly,
  because their decimal text is up to 7 bytes a token and bytes/3 would under-count;
- plus a fixed overhead per request.

The gate then keeps a safety margin below each declared limit, and a limit learned from
`token_limit_exceeded` (the provider counted more than we did) only ever lowers it.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from typing import Any

BYTES_PER_TOKEN = 3
REQUEST_OVERHEAD = 8
# After token_limit_exceeded, the usable limit drops this far below the total the provider refused.
LEARN_STEP = 0.1


def _token_ids(value: Any) -> int:
    """Token ids in an embeddings/completions input: a list of ints, or a list of such lists."""
    if isinstance(value, list) and value:
        if all(isinstance(v, int) for v in value):
            return len(value)
        if all(isinstance(v, list) and all(isinstance(t, int) for t in v) for v in value):
            return sum(len(v) for v in value)
    return 0


def estimate_tokens(endpoint: str, body: dict[str, Any], body_bytes: int) -> int:
    """Enqueued input tokens of one request, over-counted (see the module docstring)."""
    ids = 0
    if endpoint in ("/v1/embeddings", "/v1/completions"):
        ids = _token_ids(body.get("input" if endpoint == "/v1/embeddings" else "prompt"))
    if ids:
        return ids + REQUEST_OVERHEAD
    return math.ceil(body_bytes / BYTES_PER_TOKEN) + REQUEST_OVERHEAD


def embedding_inputs(body: dict[str, Any]) -> int:
    """Inputs an embeddings request carries (OpenAI caps a batch at 50,000 of them)."""
    value = body.get("input")
    if isinstance(value, list) and value and not all(isinstance(v, int) for v in value):
        return len(value)
    return 1


def usable(limit: int, margin: float) -> int:
    """What the gate lets in flight under a limit: the limit less the safety margin."""
    return max(0, math.floor(limit * (1.0 - margin)))


def room(limit: int | None, margin: float, in_flight: int) -> int | None:
    """Tokens that may still be enqueued (None: no limit declared)."""
    if limit is None:
        return None
    return max(0, usable(limit, margin) - in_flight)


def fitting(sizes: Iterable[int], space: int | None) -> int:
    """How many leading requests of `sizes` fit in `space` (all of them when space is None)."""
    count = 0
    total = 0
    for size in sizes:
        if space is not None and total + size > space:
            break
        total += size
        count += 1
    return count


def split(sizes: Sequence[int], capacity: int) -> list[int]:
    """Cut requests (in order) into batches of at most `capacity` tokens; returns batch lengths.

    A single request larger than the capacity gets a batch of its own (it could never fit; the
    provider then says so for that one batch, instead of the whole queue waiting behind it).
    """
    lengths: list[int] = []
    start = 0
    while start < len(sizes):
        take = max(1, fitting(sizes[start:], capacity))
        lengths.append(take)
        start += take
    return lengths


def lowered_limit(current: int, refused_total: int, step: float = LEARN_STEP) -> int:
    """The limit to use after the provider refused a batch at `refused_total` estimated tokens.

    Only ever lowers: the provider counts its own way, so our estimate of what it refused is
    where its real limit lies at most.
    """
    return min(current, max(1, math.floor(refused_total * (1.0 - step))))


def batches_this_hour(created: Iterable[float], now: float) -> int:
    """Batches created in the hour before `now` (for a batches-per-hour limit)."""
    return sum(1 for at in created if now - 3600.0 < at <= now)


def next_creation_slot(created: Sequence[float], per_hour: int, now: float) -> float:
    """When the next batch may be created under `per_hour` (now, if there is room)."""
    recent = sorted(at for at in created if now - 3600.0 < at <= now)
    if len(recent) < per_hour:
        return now
    return recent[len(recent) - per_hour] + 3600.0
