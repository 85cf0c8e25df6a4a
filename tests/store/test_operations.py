"""Operators' store operations (issue 12), on every engine: pauses, the batch listing, retention.

A pause is what `batchd pause` writes beside a running daemon; the batcher sees it through
`active_holds`, the hold query it already consults. Pruning folds results into the report's totals
in the transaction that deletes them, so `batchd report` is the same before and after.
"""

from __future__ import annotations

import time

import orjson
import pytest

from batchd.metrics import families
from batchd.ops import held_until
from batchd.policy import canceled_results
from batchd.poller import end_canceled_leftovers
from batchd.store.contract import (
    PAUSE_UNTIL,
    BatchState,
    CancelReason,
    Fate,
    ItemState,
    PruneSummary,
    Store,
)

from .factories import (
    MODEL,
    PROFILE,
    claim,
    file_key,
    final,
    ingest,
    never_taken,
    newest_work,
    retry,
    submitted_batch,
    succeed_all,
)
from .factories import chunk as make_chunk


async def test_a_pause_holds_every_route_it_matches_until_resumed(store: Store, second_node: Store) -> None:
    now = time.time()
    assert await store.active_holds(now) == {}

    assert await store.pause(PROFILE, "*", "incident 42")
    assert not await store.pause(PROFILE, "*")  # idempotent: already paused
    # Any node sees it (the daemon is another process beside the command).
    holds = await second_node.active_holds(now)
    assert holds == {(PROFILE, "*"): PAUSE_UNTIL}
    assert held_until(holds, PROFILE, MODEL) == held_until(holds, PROFILE, "other-model") == PAUSE_UNTIL
    assert held_until(holds, "anthropic", MODEL) is None
    [pause] = await second_node.pauses()
    assert (pause.profile, pause.model, pause.reason) == (PROFILE, "*", "incident 42")
    assert pause.paused_at == pytest.approx(now, abs=60)

    assert await store.resume(PROFILE, "other-model") == 0  # not a pause of its own
    assert await store.resume(PROFILE) == 1
    assert await second_node.active_holds(now) == {}
    assert await store.pauses() == []

    await store.pause("*", "*")
    await store.pause(PROFILE, MODEL)
    assert held_until(await store.active_holds(now), "anthropic", "claude") == PAUSE_UNTIL
    assert await store.resume() == 2
    assert await store.active_holds(now) == {}


async def test_a_pause_is_not_lifted_by_a_released_token_hold_and_outlasts_it(store: Store) -> None:
    now = time.time()
    await store.pause(PROFILE, "*")
    await store.hold(PROFILE, MODEL, now + 60, 1, "token_limit_exceeded")
    assert held_until(await store.active_holds(now), PROFILE, MODEL) == PAUSE_UNTIL
    await store.release_hold(PROFILE, MODEL)  # what a successful batch does
    assert held_until(await store.active_holds(now), PROFILE, MODEL) == PAUSE_UNTIL


async def test_recent_batches_are_every_state_newest_first(store: Store, second_node: Store) -> None:
    await ingest(store, "a.jsonl", 4)
    first = await submitted_batch(store, max_requests=2)
    second = await submitted_batch(store, max_requests=2)
    await succeed_all(store, first)
    await store.finish_batch(first.id)
    listed = await second_node.recent_batches(10)
    assert [b.id for b in listed] == [second.id, first.id]
    assert [b.state for b in listed] == [BatchState.SUBMITTED, BatchState.DONE]
    assert listed[0].owner == "n1"
    assert [b.id for b in await store.recent_batches(1)] == [second.id]


async def _finished_file(store: Store, name: str, count: int, cost: float = 0.25) -> int:
    """A file whose lines all have results (one invalid), its batch done and the file complete."""
    row = await store.begin_file(file_key(name), never_taken)
    assert await store.add_chunk(row.id, make_chunk(1, count, invalid_lines=[count]))
    await store.finish_file(row.id, count)
    batch = await submitted_batch(store)
    items = await store.submitted_items(batch.id)
    await store.record_outcomes(batch.id, [final(i, tokens=10, cost=cost) for i in items], [])
    await store.finish_batch(batch.id)
    await store.complete_file(row.id)
    return row.id


async def test_pruning_removes_finished_rows_and_keeps_the_report_totals(store: Store) -> None:
    file_id = await _finished_file(store, "old.jsonl", 5)
    kept = await newest_work(store)  # not complete: never pruned
    reports = {by: await store.report(0, by) for by in ("model", "provider", "day", "file")}
    assert sum(r["requests"] for r in reports["file"]) == 6
    counted = (await store.metrics())["results"]  # /metrics counters: they must never go down
    status_results = (await store.status())["results"]

    assert await store.prune_finished(time.time() - 3600) == PruneSummary()  # nothing that old yet
    pruned = await store.prune_finished(time.time() + 1)
    assert pruned == PruneSummary(files=1, results=5, batches=1)
    assert await store.prune_finished(time.time() + 1) == PruneSummary()  # a repeat finds nothing

    assert await store.file(file_id) is None
    assert await store.query_results("old.jsonl", None, None, 100) == []
    assert await store.file(kept.id) is not None
    for by, before in reports.items():
        assert await store.report(0, by) == before, by
    assert (await store.metrics())["results"] == counted
    assert (await store.status())["results"] == status_results  # lifetime counts, as the savings line
    # `--since` still applies to what was pruned (by the hour it was made).
    assert await store.report(time.time() + 7200, "model") == []


async def test_work_after_pruning_everything_gets_new_ids_and_flows(store: Store) -> None:
    """Retention on a quiet system may find every row finished. An id handed out again after that
    (SQLite reuses the largest rowid once its row is deleted) would sit at or below the queue counts'
    mark and the sinks' cursors: new requests never counted as queued, new results never delivered,
    and a stale remote batch's custom_ids matching new items."""
    await _finished_file(store, "old.jsonl", 3)
    [old_batch] = await store.recent_batches(10)
    old_results = await store.results_after(0, 100)
    cursor = max(r.id for r in old_results)
    old_items = max(item.id for item in await store.file_items(old_results[0].file_id))
    await store.prune_finished(time.time() + 1)

    fresh = await ingest(store, "new.jsonl", 2)
    [group] = await store.queued_groups(time.time())
    assert group.count == 2  # the batcher sees the new requests
    batch = await submitted_batch(store)
    assert batch.id > old_batch.id
    items = await store.submitted_items(batch.id)
    assert min(item.id for item in items) > old_items
    await store.record_outcomes(batch.id, [final(i) for i in items], [])
    delivered = await store.results_after(cursor, 100)
    assert sorted(orjson.loads(r.payload)["line"] for r in delivered if r.file_id == fresh.id) == [1, 2]


def _counters(data: dict[str, list[dict[str, object]]]) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every counter and histogram sample /metrics would show for the store's read."""
    samples = {}
    for family in families(data, time.time()):
        if family.type in ("counter", "histogram"):
            for sample in family.samples:
                samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


async def test_pruning_never_takes_anything_from_a_metrics_counter(store: Store) -> None:
    # A file whose requests went out twice: the first batch answered retryable, the second for good.
    row = await store.begin_file(file_key("retried.jsonl"), never_taken)
    assert await store.add_chunk(row.id, make_chunk(1, 4))
    await store.finish_file(row.id, 4)
    first = await submitted_batch(store)
    items = await store.submitted_items(first.id)
    await store.record_outcomes(first.id, [], [retry(i, 0.0) for i in items])
    await store.finish_batch(first.id)
    second = await submitted_batch(store)
    await succeed_all(store, second)
    await store.finish_batch(second.id)
    await store.complete_file(row.id)
    await _finished_file(store, "plain.jsonl", 3)
    await newest_work(store)
    before = _counters(await store.metrics())
    assert before[("batchd_retries_total", (("model", MODEL), ("profile", PROFILE)))] == 4
    assert before[("batchd_ingested_files_total", ())] == 3
    assert before[("batchd_batch_turnaround_seconds_count", (("profile", PROFILE),))] == 3

    assert await store.prune_finished(time.time() + 1) == PruneSummary(files=2, results=7, batches=3)
    assert await store.file(row.id) is None
    assert _counters(await store.metrics()) == before
    # What is pruned later adds to what was folded before, never replaces it.
    await _finished_file(store, "later.jsonl", 2)
    await newest_work(store)
    grown = _counters(await store.metrics())
    assert (await store.prune_finished(time.time() + 1)).files == 1
    assert _counters(await store.metrics()) == grown
    assert grown[("batchd_ingested_lines_total", ())] == before[("batchd_ingested_lines_total", ())] + 4


async def test_a_file_with_parked_results_is_not_pruned(store: Store) -> None:
    file_id = await _finished_file(store, "parked.jsonl", 3)
    pending = await store.results_after(0, 10)
    await store.park("hook", [pending[0].id], "receiver down", None)
    assert (await store.prune_finished(time.time() + 1)).files == 0
    assert await store.file(file_id) is not None


async def test_a_file_a_webhook_sink_has_not_delivered_yet_is_not_pruned(store: Store) -> None:
    # A webhook sink that is behind (its receiver down for longer than the retention) keeps what it
    # has still to send: pruning would drop results it never delivered.
    first = await _finished_file(store, "first.jsonl", 2)
    behind = await _finished_file(store, "behind.jsonl", 2)
    await newest_work(store)
    delivered = max(r.id for r in await store.results_after(0, 100) if r.file_id == first)
    await store.advance_cursor("hook", delivered)
    later = time.time() + 1
    assert (await store.prune_finished(later, sinks=["hook", "new-hook"])).files == 0  # new-hook: nothing yet
    assert await store.prune_finished(later, sinks=["hook"]) == PruneSummary(files=1, results=2, batches=1)
    assert await store.file(first) is None and await store.file(behind) is not None
    await store.advance_cursor("hook", max(r.id for r in await store.results_after(0, 100) if r.file_id == behind))
    assert (await store.prune_finished(later, sinks=["hook"])).files == 1


async def test_pruning_goes_a_chunk_of_files_per_transaction(store: Store) -> None:
    for n in range(3):
        await _finished_file(store, f"f{n}.jsonl", 2)
    await newest_work(store)
    later = time.time() + 1
    assert [await store.prune_finished(later, limit=2) for _ in range(3)] == [
        PruneSummary(files=2, results=4, batches=2),
        PruneSummary(files=1, results=2, batches=1),
        PruneSummary(),
    ]
    assert sum(r["requests"] for r in await store.report(0, "file")) == 7


# -- `batchd cancel`: intents the lease holder carries out -------------------------------------------


async def test_request_cancel_marks_a_live_batch_for_its_lease_holder_and_operator_outranks_file(
    store: Store, second_node: Store
) -> None:
    await ingest(store, "c.jsonl", 2)
    batch = await submitted_batch(store)
    now = time.time()
    # The command runs as another process (here: another node) beside the daemon holding the lease.
    assert await second_node.request_cancel(batch.id, CancelReason.FILE, now)
    row = await store.batch(batch.id)
    assert row is not None and row.cancel_requested_at is None  # nothing was sent to the provider yet
    assert (row.cancel_reason, row.cancel_wanted_at, row.poll_requested_at) == (CancelReason.FILE, now, now)
    assert [b.id for b in await store.owned_batches(BatchState.SUBMITTED) if b.cancel_wanted_at] == [batch.id]

    assert await second_node.request_cancel(batch.id, CancelReason.OPERATOR, now + 1)
    assert await second_node.request_cancel(batch.id, CancelReason.FILE, now + 2)  # does not narrow it again
    row = await store.batch(batch.id)
    assert row is not None and (row.cancel_reason, row.cancel_wanted_at) == (CancelReason.OPERATOR, now)

    await store.note_cancel_requested(batch.id, "cancelled by an operator", CancelReason.OPERATOR)
    row = await store.batch(batch.id)
    assert row is not None and row.cancel_requested_at is not None
    await succeed_all(store, batch)
    await store.finish_batch(batch.id)
    assert not await second_node.request_cancel(batch.id, CancelReason.OPERATOR, now)  # ended: nothing to do


async def test_an_overdue_cancel_records_the_deadline_as_its_reason(store: Store) -> None:
    await ingest(store, "d.jsonl", 1)
    batch = await submitted_batch(store)
    await store.note_cancel_requested(batch.id, "past its window")
    row = await store.batch(batch.id)
    assert row is not None and (row.cancel_reason, row.cancel_wanted_at) == (CancelReason.EXPIRY, None)
    assert row.cancel_requested_at is not None


async def test_cancel_file_ends_its_queued_requests_and_marks_only_the_batches_holding_its_requests(
    store: Store, second_node: Store
) -> None:
    mine = await ingest(store, "mine.jsonl", 5)
    other = await ingest(store, "other.jsonl", 2)
    # One batch with 3 of mine, one with 2 of mine and 1 of the other file, one with the other's last.
    shared_first = await submitted_batch(store, max_requests=3)
    shared = await submitted_batch(store, max_requests=3)
    alone = await submitted_batch(store, max_requests=1)
    assert [i.file_id for i in await store.submitted_items(shared.id)] == [mine.id, mine.id, other.id]
    assert [i.file_id for i in await store.submitted_items(alone.id)] == [other.id]
    # Two more lines of mine still queued.
    extra = await ingest(store, "mine.jsonl", 2, key=file_key("mine.jsonl", sha256="b" * 64, ino=99))
    assert [f.id for f in await second_node.files_named("mine.jsonl")] == [mine.id, extra.id]
    assert await second_node.files_named("nope.jsonl") == []

    queued = await second_node.queued_items(extra.id)
    assert [(i.file_id, i.line) for i in queued] == [(extra.id, 1), (extra.id, 2)]
    recorded, batches = await second_node.cancel_file(extra.id, canceled_results(queued), time.time())
    assert (recorded, batches) == (2, [])
    assert await store.queued_items(extra.id) == []
    results = [r for r in await store.results_after(0, 100) if r.file_id == extra.id]
    assert [orjson.loads(r.payload)["status"] for r in results] == ["canceled", "canceled"]

    recorded, batches = await second_node.cancel_file(mine.id, canceled_results([]), time.time())
    assert (recorded, batches) == (0, [shared_first.id, shared.id])
    for batch_id in (shared_first.id, shared.id):
        row = await store.batch(batch_id)
        assert row is not None and row.cancel_reason == CancelReason.FILE and row.cancel_wanted_at
    untouched = await store.batch(alone.id)
    assert untouched is not None and untouched.cancel_wanted_at is None
    assert await store.canceled_files(shared.id) == {mine.id}
    assert await store.canceled_files(alone.id) == set()
    row = await store.file(mine.id)
    assert row is not None and row.canceled_at is not None
    # Idempotent: a repeat records nothing twice.
    assert await second_node.cancel_file(extra.id, canceled_results(queued), time.time()) == (0, [])
    assert len([r for r in await store.results_after(0, 100) if r.file_id == extra.id]) == 2


async def test_file_items_are_a_files_requests_by_line_with_their_state(store: Store, second_node: Store) -> None:
    row = await ingest(store, "r.jsonl", 3, invalid_lines=[2])
    batch = await submitted_batch(store, max_requests=1)
    [first] = await store.submitted_items(batch.id)
    await store.record_outcomes(batch.id, [final(first, "errored")], [])
    items = await second_node.file_items(row.id)
    assert [(i.line, i.state) for i in items] == [(1, ItemState.ERRORED), (3, ItemState.QUEUED)]
    assert (items[0].id, items[0].custom_id, items[0].profile, items[0].model) == (
        first.id,
        first.custom_id,
        PROFILE,
        MODEL,
    )


async def test_requests_requeued_after_their_file_was_cancelled_end_canceled_not_batched_again(store: Store) -> None:
    # The race of `batchd cancel --file` with a collection: the cancel commits after the collection
    # read the batch's cancel reason, so the collection requeues the file's unfinished requests as
    # if nothing happened. end_canceled_leftovers (run by the poller after such a collection) ends them.
    victim = await ingest(store, "victim.jsonl", 3)
    batch = await submitted_batch(store, max_requests=3)
    waiting = await store.submitted_items(batch.id)
    recorded, batches = await store.cancel_file(victim.id, canceled_results([]), time.time())
    assert (recorded, batches) == (0, [batch.id])
    assert await store.canceled_with_queued() == []
    # The stale collection: every request of the batch back to the queue.
    summary = await store.record_outcomes(batch.id, [], [retry(item, time.time()) for item in waiting])
    assert summary.requeued == 3
    assert await store.canceled_with_queued() == [victim.id]
    assert await end_canceled_leftovers(store, time.time()) == 3
    assert await store.canceled_with_queued() == []
    assert await store.queued_groups(time.time() + 3600) == []
    results = [r for r in await store.results_after(0, 100) if r.file_id == victim.id]
    assert [orjson.loads(r.payload)["status"] for r in results] == ["canceled"] * 3
    assert await end_canceled_leftovers(store, time.time()) == 0


async def test_a_pending_batch_cancelled_before_its_create_ends_unsent(store: Store) -> None:
    # An intent cancelled before the provider ever saw it: the cancelled file's requests end canceled,
    # the others go back to the queue as they were, and the batch is done without a remote batch.
    cancelled = await ingest(store, "cancelled.jsonl", 2)
    other = await ingest(store, "other.jsonl", 2)
    batch = await claim(store)
    items = await store.batched_items(batch.id)
    assert [i.file_id for i in items] == [cancelled.id, cancelled.id, other.id, other.id]
    finals = canceled_results([i for i in items if i.file_id == cancelled.id])
    now = time.time()
    assert await store.drop_pending(batch.id, finals, Fate.CANCELLED, "never sent", now) == (2, 2)
    row = await store.batch(batch.id)
    assert row is not None and (row.state, row.fate, row.remote_id) == (BatchState.DONE, Fate.CANCELLED, None)
    assert [i.state for i in await store.file_items(cancelled.id)] == [ItemState.CANCELED] * 2
    assert [i.state for i in await store.file_items(other.id)] == [ItemState.QUEUED] * 2
    assert sum(g.count for g in await store.queued_groups(now)) == 2
    results = [orjson.loads(r.payload) for r in await store.results_after(0, 100)]
    assert [(r["custom_id"], r["status"]) for r in results] == [(i.custom_id, "canceled") for i in items[:2]]
    assert await store.drop_pending(batch.id, finals, Fate.CANCELLED, "never sent", now) == (0, 0)  # once
    # A batch that was created is never dropped: its requests are at the provider.
    sent = await submitted_batch(store)
    assert await store.drop_pending(sent.id, [], Fate.CANCELLED, "never sent", now) == (0, 0)
    assert (await store.batch(sent.id)).state == BatchState.SUBMITTED  # type: ignore[union-attr]
