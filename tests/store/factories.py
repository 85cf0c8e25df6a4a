"""Builders for what crosses the store contract, shared by every contract test (never copied)."""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable, Sequence
from typing import Any

import orjson

from batchd.formats import Status
from batchd.store.contract import (
    BatchRow,
    Chunk,
    FileKey,
    FileRow,
    FinalResult,
    NewItem,
    NewResult,
    Retry,
    Store,
    SubmittedItem,
    WholeFile,
)

PROFILE = "openai"
ENDPOINT = "/v1/chat/completions"
MODEL = "gpt-4o-mini"
BODY = b'{"model":"gpt-4o-mini","messages":[]}'

_inodes = itertools.count(1000)


def file_key(name: str = "f.jsonl", sha256: str | None = None, size: int = 1000, ino: int | None = None) -> FileKey:
    """A spool file's identity; a fresh inode unless given (two drops of one name are two files)."""
    return FileKey(
        name=name, sha256=sha256 or f"sha-{name}", size=size, dev=1, ino=next(_inodes) if ino is None else ino
    )


def new_item(
    line: int,
    custom_id: str | None = None,
    *,
    profile: str = PROFILE,
    endpoint: str = ENDPOINT,
    model: str = MODEL,
    size: int = 100,
    tokens: int = 0,
    body: bytes = BODY,
    inputs: int = 1,
    deadline: float | None = None,
    fallback_at: float | None = None,
) -> NewItem:
    return NewItem(
        line=line,
        custom_id=custom_id or f"c{line}",
        profile=profile,
        endpoint=endpoint,
        model=model,
        body=body,
        size=size,
        tokens=tokens,
        inputs=inputs,
        deadline=deadline,
        fallback_at=fallback_at,
    )


def invalid(line: int, reason: str = "not JSON") -> NewResult:
    payload = orjson.dumps({"custom_id": None, "line": line, "status": "invalid", "error": {"message": reason}})
    return NewResult(line=line, status="invalid", payload=payload)


LINE_BYTES = 50  # a made-up line length, for offsets


def chunk(
    first: int,
    last: int,
    *,
    invalid_lines: Sequence[int] = (),
    custom_ids: dict[int, str] | None = None,
    per_line: Callable[[int], dict[str, Any]] | None = None,
    **item: Any,
) -> Chunk:
    """Lines first..last: an item each, except `invalid_lines` (invalid results); `per_line(n)` gives
    line n's own fields (tokens, deadline, ...) over `item`'s."""
    items = [
        new_item(n, (custom_ids or {}).get(n), **{**item, **(per_line(n) if per_line else {})})
        for n in range(first, last + 1)
        if n not in invalid_lines
    ]
    bad = [invalid(n) for n in invalid_lines]
    return Chunk(first_line=first, last_line=last, end_offset=last * LINE_BYTES, items=items, invalid=bad)


def whole_file(name: str, count: int, *, invalid_lines: Sequence[int] = (), **item: Any) -> WholeFile:
    """A small file of `count` lines for add_files: an item each, except `invalid_lines`."""
    lines = chunk(1, count, invalid_lines=invalid_lines, **item)
    return WholeFile(file_key(name, size=count * LINE_BYTES), count, lines.items, lines.invalid)


def never_taken(_name: str) -> bool:
    return False


async def ingest(
    store: Store,
    name: str = "f.jsonl",
    count: int = 10,
    *,
    chunk_lines: int = 1000,
    invalid_lines: Sequence[int] = (),
    key: Any = None,
    **item: Any,
) -> FileRow:
    """A whole file through the intake, in chunks of `chunk_lines`; returns its row once OPEN."""
    row = await store.begin_file(key or file_key(name), never_taken)
    for first in range(1, count + 1, chunk_lines):
        last = min(count, first + chunk_lines - 1)
        bad = [n for n in invalid_lines if first <= n <= last]
        assert await store.add_chunk(row.id, chunk(first, last, invalid_lines=bad, **item))
    await store.finish_file(row.id, count)
    opened = await store.file(row.id)
    assert opened is not None
    return opened


async def claim(
    store: Store, kind: str = "openai", max_requests: int = 10_000, now: float | None = None, model: str | None = None
) -> BatchRow:
    """A PENDING batch of the first due group's items (of `model`, if given; there must be one)."""
    now = time.time() if now is None else now
    groups = [g for g in await store.queued_groups(now) if model is None or g.model == model]
    assert groups, "nothing queued"
    batch = await store.claim_batch(groups[0], kind, max_requests, 10**12, now)
    assert batch is not None
    return batch


async def submitted_batch(
    store: Store,
    remote_id: str | None = None,
    max_requests: int = 10_000,
    now: float | None = None,
    model: str | None = None,
) -> BatchRow:
    """Claim the first due group (of `model`, if given) and mark it submitted."""
    now = time.time() if now is None else now
    batch = await claim(store, max_requests=max_requests, now=now, model=model)
    await store.mark_submitted(batch.id, remote_id or f"batch_{batch.id}", "validating", now)
    row = await store.batch(batch.id)
    assert row is not None
    return row


async def newest_work(store: Store) -> FileRow:
    """Work in flight holding the newest file, item, result and batch ids. Retention keeps the rows
    with the largest ids (an id is never handed out twice), so everything finished before this is
    prunable."""
    row = await ingest(store, "in-flight.jsonl", 2, invalid_lines=[2])
    await claim(store)
    return row


def final(
    item: SubmittedItem, status: Status = "succeeded", *, tokens: int | None = None, cost: float | None = None
) -> FinalResult:
    payload = orjson.dumps({"custom_id": item.custom_id, "line": item.line, "status": status})
    return FinalResult(
        item_id=item.id,
        file_id=item.file_id,
        line=item.line,
        status=status,
        payload=payload,
        input_tokens=tokens,
        output_tokens=tokens,
        cost_batch=cost,
        cost_realtime=None if cost is None else cost * 2,
        cost_paid=cost,  # a batch answer is paid at the batch price
    )


def retry(item: SubmittedItem, not_before: float, error: str = "overloaded") -> Retry:
    return Retry(item_id=item.id, not_before=not_before, error=error)


async def succeed_all(store: Store, batch: BatchRow) -> None:
    """Every waiting item of the batch gets a final success."""
    items = await store.submitted_items(batch.id)
    await store.record_outcomes(batch.id, [final(i) for i in items], [])
