"""The store's side of issue 11's batcher: deadline look-ups, claims within a capacity budget, items
left to the real-time fallback, batch creations per hour, learned limits and forced-flush intents.
Every test runs on both engines (tests/store/conftest.py)."""

from __future__ import annotations

import asyncio
import time

from batchd.store.contract import BatchState, Budget, Deadline, Group, Store

from .factories import ENDPOINT, MODEL, PROFILE, ingest


async def group_of(store: Store, now: float, model: str = MODEL) -> Group:
    (group,) = [g for g in await store.queued_groups(now) if g.model == model]
    return group


async def test_claim_keeps_the_running_tokens_within_the_budget(store: Store) -> None:
    await ingest(store, "a.jsonl", 10, per_line=lambda n: {"tokens": 10 * n})  # 10, 20, ... 100
    now = time.time()
    group = await group_of(store, now)
    batch = await store.claim_batch(group, "openai", 100, 10**9, now, budget=Budget(tokens=100))
    assert batch is not None
    assert (batch.requests, batch.tokens) == (4, 100)  # 10+20+30+40
    again = await store.claim_batch(group, "openai", 100, 10**9, now, budget=Budget(tokens=49))
    assert again is None  # the next item (50 tokens) does not fit: nothing is claimed
    stored = await store.batch(batch.id)
    assert stored is not None and stored.tokens == 100


async def test_an_item_larger_than_the_whole_limit_goes_alone_only_when_allowed(store: Store) -> None:
    await ingest(store, "a.jsonl", 3, per_line=lambda n: {"tokens": 500 if n == 1 else 10})
    now = time.time()
    group = await group_of(store, now)
    assert await store.claim_batch(group, "openai", 100, 10**9, now, budget=Budget(tokens=100)) is None
    alone = await store.claim_batch(group, "openai", 100, 10**9, now, budget=Budget(tokens=100, lone_oversize=True))
    assert alone is not None and (alone.requests, alone.tokens) == (1, 500)
    rest = await store.claim_batch(group, "openai", 100, 10**9, now, budget=Budget(tokens=100, lone_oversize=True))
    assert rest is not None and (rest.requests, rest.tokens) == (2, 20)


async def test_claim_counts_embedding_inputs_not_requests(store: Store) -> None:
    await ingest(store, "e.jsonl", 6, endpoint="/v1/embeddings", model="emb", inputs=40)
    now = time.time()
    group = await group_of(store, now, "emb")
    batch = await store.claim_batch(group, "openai", 100, 10**9, now, budget=Budget(inputs=100))
    assert batch is not None and (batch.requests, batch.inputs) == (2, 80)


async def test_items_whose_fallback_is_due_are_neither_grouped_nor_claimed(store: Store) -> None:
    now = time.time()
    # Lines 1-3 are due for the real-time fallback already; 4-6 have time; 7-8 have no deadline.
    row = await ingest(
        store,
        "d.jsonl",
        8,
        per_line=lambda n: (
            {"deadline": now + 10, "fallback_at": now - 1}
            if n <= 3
            else {"deadline": now + 7200 + n, "fallback_at": now + 3600 + n}
            if n <= 6
            else {}
        ),
    )
    group = await group_of(store, now)
    assert group.count == 5
    batch = await store.claim_batch(group, "openai", 100, 10**9, now)
    assert batch is not None and batch.requests == 5
    assert [item.line for item in await store.queued_items(row.id)] == [1, 2, 3]  # left to the fallback
    assert await store.queued_groups(now) == []


async def test_earliest_deadline_is_the_groups_first_fallback_after_now(store: Store, second_node: Store) -> None:
    now = time.time()
    await ingest(
        store,
        "d.jsonl",
        5,
        per_line=lambda n: {"deadline": now + 1000 * n, "fallback_at": now + 1000 * n - 600} if n > 1 else {},
    )
    await ingest(store, "other.jsonl", 2, model="other", deadline=now + 50, fallback_at=now + 10)
    group = await group_of(store, now)
    assert await second_node.earliest_deadline(group, now) == Deadline(now + 2000, now + 1400)
    # Once its fallback is due an item is the fallback's: the next one counts.
    assert await store.earliest_deadline(group, now + 1500) == Deadline(now + 3000, now + 2400)
    other = await group_of(store, now, "other")
    assert await store.earliest_deadline(other, now) == Deadline(now + 50, now + 10)
    # Claimed items are no longer queued: they do not count for the group's queue.
    await store.claim_batch(group, "openai", 3, 10**9, now)
    assert await store.earliest_deadline(group, now) == Deadline(now + 4000, now + 3400)
    await store.claim_batch(group, "openai", 10, 10**9, now)
    assert await store.earliest_deadline(group, now) is None


async def test_creations_count_created_batches_and_pending_intents_of_every_node(
    store: Store, second_node: Store
) -> None:
    await ingest(store, "a.jsonl", 4)
    now = time.time()
    group = await group_of(store, now)
    first = await store.claim_batch(group, "openai", 1, 10**9, now - 7200)
    second = await second_node.claim_batch(group, "openai", 1, 10**9, now - 60)
    pending = await store.claim_batch(group, "openai", 1, 10**9, now - 30)
    assert first is not None and second is not None and pending is not None
    await store.mark_submitted(first.id, "r1", "validating", now - 7000)  # more than an hour ago
    await second_node.mark_submitted(second.id, "r2", "validating", now - 50)
    times = await store.creations(PROFILE, now - 3600)
    assert times == [now - 50, now - 30]
    assert await second_node.creations("anthropic", now - 3600) == []
    await store.finish_batch(pending.id)  # ended without ever being created: not a creation
    assert await store.creations(PROFILE, now - 3600) == [now - 50]


async def test_learned_limits_only_ever_lower_and_are_shared(store: Store, second_node: Store) -> None:
    now = time.time()
    assert await store.learned_limits() == {}
    assert await store.lower_learned_limit(PROFILE, MODEL, 9000, now) == 9000
    assert await second_node.lower_learned_limit(PROFILE, MODEL, 12000, now) == 9000
    assert await second_node.lower_learned_limit(PROFILE, MODEL, 8000, now) == 8000
    assert await store.lower_learned_limit(PROFILE, "other", 500, now) == 500
    assert await store.learned_limits() == {(PROFILE, MODEL): 8000, (PROFILE, "other"): 500}
    # Concurrent lowerings: the lowest wins, whatever the order.
    await asyncio.gather(*(node.lower_learned_limit(PROFILE, MODEL, t, now) for node, t in (
        (store, 7000), (second_node, 6000), (store, 7500), (second_node, 6500)
    )))  # fmt: skip
    assert (await second_node.learned_limits())[(PROFILE, MODEL)] == 6000


async def test_flush_requests_are_cleared_by_compare_and_set(store: Store, second_node: Store) -> None:
    now = time.time()
    assert await store.flush_requests() == {}
    await store.request_flush("nightly", now)
    await second_node.request_flush("*", now + 1)
    requests = await second_node.flush_requests()
    assert requests == {"nightly": now, "*": now + 1}
    await store.request_flush("nightly", now + 2)  # asked again before the batcher got to it
    assert not await second_node.clear_flush_request("nightly", now)  # the older one: the newer survives
    assert (await store.flush_requests())["nightly"] == now + 2
    assert await second_node.clear_flush_request("nightly", now + 2)
    assert not await store.clear_flush_request("nightly", now + 2)  # idempotent
    assert await store.flush_requests() == {"*": now + 1}


async def test_batch_rows_carry_tokens_and_inputs(store: Store) -> None:
    await ingest(store, "e.jsonl", 3, endpoint=ENDPOINT, tokens=7, inputs=3)
    now = time.time()
    batch = await store.claim_batch(await group_of(store, now), "openai", 10, 10**9, now)
    assert batch is not None and (batch.tokens, batch.inputs, batch.state) == (21, 9, BatchState.PENDING)
    (live,) = await store.batches_in_state(BatchState.PENDING)
    assert (live.tokens, live.inputs) == (21, 9)
