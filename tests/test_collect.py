"""Collection applies result chunks in order while the next chunk is decided (poller._apply_all).

Real store (SQLite), real policy; the chunks are what a provider adapter yields, so no SDK is
involved. What must hold: every item gets exactly one outcome, a repeat in a later chunk is
ignored, a foreign id is ignored, and a failure part-way leaves every chunk before it committed
and the rest still waiting (so the next attempt finishes them, exactly once).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from batchd.crashpoints import CrashPoints
from batchd.formats import Outcome, provider_custom_id
from batchd.poller import Pollers
from batchd.providers import ProviderError, ProviderPool
from batchd.store import open_store
from batchd.store.contract import BatchRow, Chunk, FileKey, NewItem, Store

from .conftest import make_settings, wait_until


async def submitted_batch(store: Store, count: int) -> BatchRow:
    row = await store.begin_file(FileKey("f.jsonl", "sha", 10, 0, 1), out_taken=lambda name: False)
    items = [
        NewItem(n, f"c{n}", "openai", "/v1/chat/completions", "gpt-4o-mini", b"{}", 10) for n in range(1, count + 1)
    ]
    assert await store.add_chunk(row.id, Chunk(1, count, count * 10, items, []))
    await store.finish_file(row.id, count)
    now = time.time()
    [group] = await store.queued_groups(now)
    batch = await store.claim_batch(group, "openai", 1000, 10**9, now)
    assert batch is not None
    await store.mark_submitted(batch.id, "batch_x", "completed", now)
    submitted = await store.batch(batch.id)
    assert submitted is not None
    return submitted


def succeeded(item_id: int, instance: str, text: str) -> Outcome:
    usage = {"input_tokens": 3, "output_tokens": 1, "cached_input_tokens": 0}
    return Outcome(provider_custom_id(item_id, instance), "succeeded", {"text": text}, None, usage, False)


async def chunks_of(chunks: list[list[Outcome]], fail_after: int | None = None) -> AsyncIterator[list[Outcome]]:
    for number, chunk in enumerate(chunks):
        if number == fail_after:
            raise ProviderError("download cut", retryable=True)
        yield chunk


@pytest.fixture
async def setup(tmp_path: Path) -> AsyncIterator[tuple[Store, Pollers, list[str]]]:
    settings = make_settings(tmp_path, None)
    store = open_store(f"sqlite:///{tmp_path / 'db.sqlite3'}", "test-node")
    await store.open()
    providers = ProviderPool(settings.providers)
    committed: list[str] = []
    pollers = Pollers(
        settings,
        store,
        providers,
        tmp_path,
        on_results=lambda: committed.append("results"),
        on_requeued=lambda: None,
        crashpoints=CrashPoints(""),
    )
    try:
        yield store, pollers, committed
    finally:
        await providers.close()
        await store.close()


async def test_chunks_are_applied_once_each_and_repeats_and_strangers_are_ignored(
    setup: tuple[Store, Pollers, list[str]],
) -> None:
    store, pollers, committed = setup
    batch = await submitted_batch(store, 30)
    instance = await store.instance_id()
    pollers._instance = instance
    ids = await store.batch_item_ids(batch.id)
    chunks = [
        [succeeded(i, instance, "first") for i in ids[:10]],
        # A repeat of an item decided by the chunk before, and another database's id: both ignored.
        [succeeded(ids[0], instance, "repeat"), succeeded(ids[10], "f" * 32, "stranger")]
        + [succeeded(i, instance, "first") for i in ids[10:20]],
        [succeeded(i, instance, "first") for i in ids[20:]],
    ]
    summary = await pollers._apply_all(batch, chunks_of(chunks), None)
    assert (summary.final, summary.requeued, summary.ignored) == (30, 0, 2)
    assert committed == ["results"] * 3  # one commit per chunk, each announced once
    assert await store.submitted_items(batch.id) == []
    results = await store.results_after(0, 100)
    assert len(results) == 30 and len({r.payload for r in results}) == 30
    assert all(b'"text":"first"' in r.payload for r in results)


async def test_a_failure_part_way_keeps_what_was_committed_and_the_rest_waits(
    setup: tuple[Store, Pollers, list[str]],
) -> None:
    store, pollers, _ = setup
    batch = await submitted_batch(store, 30)
    instance = await store.instance_id()
    pollers._instance = instance
    ids = await store.batch_item_ids(batch.id)
    chunks = [[succeeded(i, instance, "x") for i in ids[start : start + 10]] for start in (0, 10, 20)]
    with pytest.raises(ProviderError):
        await pollers._apply_all(batch, chunks_of(chunks, fail_after=2), None)
    # Both chunks before the failure are committed, the one in flight included.
    waiting = await store.submitted_items(batch.id)
    assert [item.id for item in waiting] == ids[20:]
    assert len(await store.results_after(0, 100)) == 20
    # The next attempt reads the whole output again: only the rest is applied.
    summary = await pollers._apply_all(batch, chunks_of(chunks), None)
    assert (summary.final, summary.ignored) == (10, 20)
    assert len(await store.results_after(0, 100)) == 30


async def test_a_cancelled_run_takes_its_batch_pollers_down_with_it(setup: tuple[Store, Pollers, list[str]]) -> None:
    # The daemon cancels what has not stopped within the graceful timeout; a poller left running
    # after that would still write to the store after release_leases let another node take over.
    store, pollers, _ = setup
    await submitted_batch(store, 3)
    running = asyncio.create_task(pollers.run(asyncio.Event()))
    await wait_until(lambda: pollers.live == 1, timeout=10, interval=0.01)
    polling = list(pollers._tasks.values())
    running.cancel()
    with pytest.raises(asyncio.CancelledError):
        await running
    assert all(task.done() for task in polling) and pollers.live == 0
