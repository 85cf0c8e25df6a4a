"""Store tier: real SQLite in tmp_path; claiming, limits, idempotent outcomes, delivery bookkeeping."""

from __future__ import annotations

import os
import stat
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from batchd.formats import Outcome, provider_custom_id
from batchd.store import Group, NewItem, Store


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[Store]:
    opened = Store(tmp_path / "state" / "batchd.sqlite3")
    await opened.open()
    try:
        yield opened
    finally:
        await opened.close()


async def queue(store: Store, count: int, size: int = 100, name: str = "f.jsonl") -> int:
    async with store.ingest(name, f"sha-{name}", count * size) as ingest:
        items = [
            NewItem(n, f"c{n}", "openai", "/v1/chat/completions", "gpt-4o-mini", b'{"model":"gpt-4o-mini"}', size)
            for n in range(1, count + 1)
        ]
        await ingest.add(items, [], count)
    return ingest.file_id


async def test_database_is_private_and_migrated(store: Store) -> None:
    mode = stat.S_IMODE(os.stat(store.path).st_mode)
    assert mode == 0o600
    assert await store.integrity_check() == "ok"
    assert len(await store.instance_id()) == 32


async def test_claim_never_exceeds_request_or_byte_limits(store: Store) -> None:
    await queue(store, 25, size=100)
    now = time.time()
    [group] = await store.queued_groups(now)
    assert (group.count, group.bytes) == (25, 2500)
    first = await store.claim_batch(group, "openai", max_requests=10, max_bytes=10_000, now=now)
    assert first is not None and first.requests == 10
    [group] = await store.queued_groups(now)
    second = await store.claim_batch(group, "openai", max_requests=100, max_bytes=750, now=now)
    assert second is not None and (second.requests, second.bytes) == (7, 700)
    [group] = await store.queued_groups(now)
    assert group.count == 8
    ids = [i for chunk in [c async for c in store.batch_bodies(first.id)] for i, _, _ in chunk]
    assert ids == sorted(ids) and len(ids) == 10


async def test_outcomes_are_idempotent_and_retries_stop_at_max_attempts(store: Store) -> None:
    file_id = await queue(store, 3)
    now = time.time()
    [group] = await store.queued_groups(now)
    batch = await store.claim_batch(group, "openai", 100, 10**9, now)
    assert batch is not None
    await store.mark_submitted(batch.id, "batch_remote", "validating", now)
    batch = await store.batch(batch.id)
    assert batch is not None
    item_ids = await store.batch_item_ids(batch.id)
    outcomes = [
        Outcome(provider_custom_id(item_ids[0]), "succeeded", {"ok": 1}, None, {"input_tokens": 3}, False),
        Outcome(provider_custom_id(item_ids[1]), "errored", None, {"message": "overloaded"}, None, True),
        Outcome("someone-elses-id", "succeeded", None, None, None, False),
    ]
    summary = await store.apply_outcomes(batch, outcomes, max_attempts=2, retry_at=now)
    assert (summary.final, summary.requeued, summary.ignored) == (1, 1, 1)
    again = await store.apply_outcomes(batch, outcomes, max_attempts=2, retry_at=now)
    assert (again.final, again.requeued) == (0, 0)
    leftover = await store.requeue_unanswered(batch, "errored", {"message": "no line"}, 2, now, refund=False)
    assert leftover.requeued == 1
    results = await store.results_after(0, 10)
    assert [r.file_id for r in results] == [file_id]

    # Second attempt: the two requeued items fail again and, at max_attempts, become final.
    [group] = await store.queued_groups(now)
    retry = await store.claim_batch(group, "openai", 100, 10**9, now)
    assert retry is not None and retry.requests == 2
    await store.mark_submitted(retry.id, "batch_retry", "validating", now)
    retry = await store.batch(retry.id)
    assert retry is not None
    final = await store.requeue_unanswered(retry, "expired", None, 2, now, refund=False)
    assert (final.final, final.requeued) == (2, 0)
    assert len(await store.results_after(0, 10)) == 3
    assert await store.queued_groups(now) == []


async def test_refunded_requeue_does_not_burn_attempts(store: Store) -> None:
    await queue(store, 2)
    now = time.time()
    for _ in range(3):
        [group] = await store.queued_groups(now)
        batch = await store.claim_batch(group, "openai", 100, 10**9, now)
        assert batch is not None
        await store.mark_submitted(batch.id, f"batch_{batch.id}", "validating", now)
        batch = await store.batch(batch.id)
        assert batch is not None
        summary = await store.requeue_unanswered(batch, "errored", None, max_attempts=1, retry_at=now, refund=True)
        assert summary.requeued == 2


async def test_hold_doubles_and_releases(store: Store) -> None:
    first = await store.hold_backoff("openai", "gpt-4o-mini", base=10, ceiling=1000, reason="token_limit_exceeded")
    second = await store.hold_backoff("openai", "gpt-4o-mini", base=10, ceiling=1000, reason="token_limit_exceeded")
    assert (first, second) == (10, 20)
    assert ("openai", "gpt-4o-mini") in await store.active_holds(time.time())
    await store.release_hold("openai", "gpt-4o-mini")
    assert await store.active_holds(time.time()) == {}


async def test_duplicate_custom_ids_become_invalid_at_ingest(store: Store) -> None:
    async with store.ingest("dup.jsonl", "sha", 10) as ingest:
        items = [
            NewItem(n, "same" if n != 2 else "other", "openai", "/v1/embeddings", "m", b"{}", 10) for n in (1, 2, 3, 4)
        ]
        await ingest.add(items, [], 4)
    assert (ingest.queued, ingest.invalid) == (2, 2)
    results = await store.results_after(0, 10)
    assert sorted(r.payload.count(b"duplicate custom_id") for r in results) == [1, 1]
    assert sum(g.count for g in await store.queued_groups(time.time())) == 2
    assert isinstance((await store.queued_groups(time.time()))[0], Group)


async def test_claim_avoids_request_counts_of_pending_batches(store: Store) -> None:
    await queue(store, 25)
    now = time.time()
    [group] = await store.queued_groups(now)
    batch = await store.claim_batch(group, "anthropic", 10, 10**9, now, avoid_counts=frozenset({10, 9}))
    assert batch is not None and batch.requests == 8
    [group] = await store.queued_groups(now)
    assert group.count == 17
    assert await store.claim_batch(group, "anthropic", 1, 10**9, now, avoid_counts=frozenset({1})) is None
