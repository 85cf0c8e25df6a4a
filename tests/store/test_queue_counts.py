"""The queue's read models (queued_groups, next_not_before, status, metrics) as the queue moves.

Both engines read them from kept counts and small indexes instead of the whole queue (SQLite
migration 014, PostgreSQL 007_scale): these tests pin the contract's exact figures through every
way an item enters or leaves the queue (ingest in chunks or whole files, claims, requeues with and
without a backoff, the real-time fallback, cancelled files), with `now` passed in, never slept.
"""

from __future__ import annotations

import time

import pytest

from batchd.policy import canceled_results
from batchd.store.contract import Group, Store

from .factories import claim, final, ingest, never_taken, retry, submitted_batch, whole_file

GPT = ("openai", "/v1/chat/completions", "gpt-4o-mini")


def figures(groups: list[Group]) -> dict[tuple[str, str, str], tuple[int, int]]:
    return {(g.profile, g.endpoint, g.model): (g.count, g.bytes) for g in groups}


async def status_queued(store: Store) -> dict[tuple[str, str, str], int]:
    queue = (await store.status())["queue"]
    return {(r["provider"], r["endpoint"], r["model"]): r["queued"] for r in queue if r["queued"]}


async def test_counts_follow_claims_requeues_and_finals(store: Store) -> None:
    """count and bytes after a claim, a requeue that is due at once and a final; oldest stays the
    oldest never-claimed item (a requeued item's age starts when it goes back)."""
    before = time.time()
    await ingest(store, "a.jsonl", 4, size=100)
    await ingest(store, "b.jsonl", 3, size=10)
    after = time.time()
    now = time.time()
    [group] = await store.queued_groups(now)
    assert (group.count, group.bytes) == (7, 430)
    assert before <= group.oldest <= after
    batch = await submitted_batch(store, max_requests=2, now=now)
    [group] = await store.queued_groups(now)
    assert (group.count, group.bytes) == (5, 230)
    first, second = await store.submitted_items(batch.id)
    await store.record_outcomes(batch.id, [final(first)], [retry(second, now)])
    [requeued] = await store.queued_groups(now + 1)
    assert (requeued.count, requeued.bytes) == (6, 330)
    assert requeued.oldest == group.oldest
    assert await status_queued(store) == {GPT: 6}
    [row] = (await store.metrics())["queue"]
    assert (row["queued"], row["oldest"]) == (6, pytest.approx(group.oldest))


async def test_oldest_is_the_earliest_queued_at_not_the_lowest_id(store: Store) -> None:
    """A requeued item keeps its low id but is younger than an item ingested before its requeue."""
    await ingest(store, "first.jsonl", 2, size=100)
    batch = await submitted_batch(store)
    waited = time.time()
    await ingest(store, "second.jsonl", 1, size=10)
    ingested = time.time()
    first, second = await store.submitted_items(batch.id)
    await store.record_outcomes(batch.id, [final(first)], [retry(second, 0.0)])
    [group] = await store.queued_groups(time.time())
    assert (group.count, group.bytes) == (2, 110)
    assert waited <= group.oldest <= ingested


async def test_held_back_items_leave_the_counts_until_due(store: Store) -> None:
    await ingest(store, count=4, size=100)
    now = time.time()
    batch = await submitted_batch(store, max_requests=3, now=now)
    items = await store.submitted_items(batch.id)
    await store.record_outcomes(
        batch.id, [], [retry(items[0], now + 100), retry(items[1], now + 50), retry(items[2], now)]
    )
    [group] = await store.queued_groups(now + 1)
    assert (group.count, group.bytes) == (2, 200)
    assert await store.next_not_before(now + 1) == pytest.approx(now + 50)
    [group] = await store.queued_groups(now + 60)
    assert (group.count, group.bytes) == (3, 300)
    assert await store.next_not_before(now + 60) == pytest.approx(now + 100)
    [group] = await store.queued_groups(now + 100)
    assert (group.count, group.bytes) == (4, 400)
    assert await store.next_not_before(now + 100) is None
    # Held back or not, every queued item is queued for status and /metrics.
    assert await status_queued(store) == {GPT: 4}
    assert [r["queued"] for r in (await store.metrics())["queue"]] == [4]


async def test_items_due_for_the_fallback_are_left_out_once(store: Store) -> None:
    """An item both held back and due for the fallback is subtracted once, not twice."""
    now = time.time()
    await ingest(store, "d.jsonl", 3, size=100, deadline=now + 100, fallback_at=now + 50)
    await ingest(store, "plain.jsonl", 1, size=7)
    batch = await submitted_batch(store, max_requests=3, now=now)
    held, due, done = await store.submitted_items(batch.id)
    await store.record_outcomes(batch.id, [final(done)], [retry(held, now + 100), retry(due, now)])
    assert figures(await store.queued_groups(now + 10)) == {GPT: (2, 107)}
    # From fallback_at on, both belong to the real-time fallback (held or not): only plain is left.
    assert figures(await store.queued_groups(now + 60)) == {GPT: (1, 7)}
    assert figures(await store.queued_groups(now + 200)) == {GPT: (1, 7)}
    await ingest(store, "late.jsonl", 1, size=1000, deadline=now + 100, fallback_at=now + 50)
    assert figures(await store.queued_groups(now + 60)) == {GPT: (1, 7)}
    assert figures(await store.queued_groups(now + 10)) == {GPT: (3, 1107)}


async def test_items_handed_to_the_fallback_leave_the_queue(store: Store) -> None:
    now = time.time()
    await ingest(store, "d.jsonl", 2, size=100, deadline=now + 100, fallback_at=now + 10)
    await ingest(store, "plain.jsonl", 2, size=10)
    await store.fallback_due(now + 10)
    for moment in (now, now + 20):
        assert figures(await store.queued_groups(moment)) == {GPT: (2, 20)}
    assert await status_queued(store) == {GPT: 2}


async def test_cancelled_files_leave_the_counts(store: Store) -> None:
    gone = await ingest(store, "gone.jsonl", 3, size=100)
    await ingest(store, "kept.jsonl", 2, size=10, model="gpt-4o")
    await ingest(store, "kept-too.jsonl", 1, size=5)
    items = await store.queued_items(gone.id)
    await store.cancel_file(gone.id, canceled_results(items), time.time())
    now = time.time()
    assert figures(await store.queued_groups(now)) == {
        GPT: (1, 5),
        ("openai", "/v1/chat/completions", "gpt-4o"): (2, 20),
    }
    assert await status_queued(store) == {GPT: 1, ("openai", "/v1/chat/completions", "gpt-4o"): 2}


async def test_whole_files_are_counted_and_claimed(store: Store) -> None:
    """Files committed whole (add_files) count like files ingested in chunks, before and after a claim."""
    await store.add_files([whole_file("s1.jsonl", 3, size=100), whole_file("s2.jsonl", 2, size=10)], never_taken)
    now = time.time()
    assert figures(await store.queued_groups(now)) == {GPT: (5, 320)}
    assert await status_queued(store) == {GPT: 5}
    batch = await claim(store, max_requests=4, now=now)
    assert batch.requests == 4
    assert figures(await store.queued_groups(now)) == {GPT: (1, 10)}
    assert await status_queued(store) == {GPT: 1}
    await store.add_files([whole_file("s3.jsonl", 1, size=1)], never_taken)
    # Before any queued_groups (which may fold what the engine keeps per statement), and after.
    assert await status_queued(store) == {GPT: 2}
    assert [r["queued"] for r in (await store.metrics())["queue"]] == [2]
    assert figures(await store.queued_groups(now)) == {GPT: (2, 11)}
    assert await status_queued(store) == {GPT: 2}


async def test_an_empty_route_is_no_group(store: Store) -> None:
    await ingest(store, count=2, size=100)
    now = time.time()
    await claim(store, now=now)
    assert await store.queued_groups(now) == []
    assert await status_queued(store) == {}
    assert (await store.metrics())["queue"] == []


async def test_status_counts_the_requests_of_live_batches_per_state(store: Store) -> None:
    """batched and submitted are what each live batch still holds, per route and state."""
    gpt4o = ("openai", "/v1/chat/completions", "gpt-4o")
    await ingest(store, "a.jsonl", 5, size=10)
    await ingest(store, "b.jsonl", 4, size=10, model="gpt-4o")
    now = time.time()
    await claim(store, max_requests=2, now=now, model="gpt-4o-mini")
    sent = await submitted_batch(store, max_requests=3, now=now, model="gpt-4o")
    items = await store.submitted_items(sent.id)
    # A batch being collected: one request final, one requeued, one still waiting.
    await store.record_outcomes(sent.id, [final(items[0])], [retry(items[1], now)])

    def counts(queue: list[dict[str, object]]) -> dict[tuple[object, ...], tuple[object, ...]]:
        return {(r["provider"], r["endpoint"], r["model"]): (r["queued"], r["batched"], r["submitted"]) for r in queue}

    assert counts((await store.status())["queue"]) == {GPT: (3, 2, 0), gpt4o: (2, 0, 1)}
    await store.finish_batch(sent.id)
    assert counts((await store.status())["queue"]) == {GPT: (3, 2, 0), gpt4o: (2, 0, 0)}
