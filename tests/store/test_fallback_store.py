"""The store's side of the real-time fallback (issue 11), on both engines: due requests handed over,
deadline cancels wished, the first final answer wins, duplicates are costs (once), the report's
fallback, deadline and duplicate figures, and their survival of pruning."""

from __future__ import annotations

import dataclasses
import time

import pytest

from batchd.policy import canceled_results
from batchd.store.contract import (
    ApplySummary,
    CancelReason,
    FinalResult,
    ItemState,
    Retry,
    Store,
    SubmittedItem,
)

from .factories import claim, final, ingest, newest_work, retry, submitted_batch


def realtime(item: SubmittedItem, tokens: int = 5, paid: float = 0.4) -> FinalResult:
    """The fallback's answer for `item`: served in real time, paid at the real-time price."""
    return dataclasses.replace(final(item, tokens=tokens, cost=paid / 2), via="realtime", cost_paid=paid)


async def states(store: Store, file_id: int) -> list[ItemState]:
    return [item.state for item in await store.file_items(file_id)]


async def test_due_queued_requests_of_this_node_go_realtime_once(store: Store, second_node: Store) -> None:
    now = time.time()
    mine = await ingest(store, "mine.jsonl", 3, deadline=now + 100, fallback_at=now + 10)
    later = await ingest(store, "later.jsonl", 2, deadline=now + 500, fallback_at=now + 400)
    theirs = await ingest(second_node, "theirs.jsonl", 2, deadline=now + 100, fallback_at=now + 10)
    await ingest(store, "none.jsonl", 2)
    assert await store.next_fallback_at(now) == pytest.approx(now + 10)
    assert await store.fallback_due(now) == dataclasses.replace(await store.fallback_due(now))  # nothing due yet
    due = await store.fallback_due(now + 10)
    assert (due.realtime, due.batches) == (3, ())
    assert await states(store, mine.id) == [ItemState.REALTIME] * 3
    assert await states(store, later.id) == [ItemState.QUEUED] * 2
    assert await states(store, theirs.id) == [ItemState.QUEUED] * 2  # node n2 sends its own files
    assert (await store.fallback_due(now + 10)).realtime == 0
    assert await store.next_fallback_at(now + 10) == pytest.approx(now + 400)
    # Items gone to the fallback, or due for it (node n2's, which its own fallback takes), are not
    # claimed into batches: only later.jsonl and none.jsonl are queued for a batch.
    assert sum(g.count for g in await store.queued_groups(now + 10)) == 4


async def test_a_batch_holding_a_due_request_is_marked_for_a_deadline_cancel_once(store: Store) -> None:
    now = time.time()
    await ingest(store, "d.jsonl", 2, deadline=now + 100, fallback_at=now + 10)
    batch = await submitted_batch(store, now=now)
    due = await store.fallback_due(now + 10)
    assert (due.realtime, due.batches) == (0, (batch.id,))
    row = await store.batch(batch.id)
    assert row is not None
    assert row.cancel_reason == CancelReason.DEADLINE and row.cancel_wanted_at == pytest.approx(now + 10)
    assert row.poll_requested_at == pytest.approx(now + 10)  # the lease holder's poller acts on it
    assert (await store.fallback_due(now + 20)).batches == ()


async def test_an_operator_cancel_is_never_overridden_by_a_deadline(store: Store) -> None:
    now = time.time()
    await ingest(store, "d.jsonl", 2, deadline=now + 100, fallback_at=now + 10)
    batch = await submitted_batch(store, now=now)
    assert await store.request_cancel(batch.id, CancelReason.OPERATOR, now)
    assert (await store.fallback_due(now + 10)).batches == ()
    row = await store.batch(batch.id)
    assert row is not None and row.cancel_reason == CancelReason.OPERATOR


async def test_hand_over_takes_only_waiting_requests_with_a_deadline(store: Store) -> None:
    now = time.time()
    await ingest(store, "d.jsonl", 2, deadline=now + 100, fallback_at=now + 10)
    await ingest(store, "n.jsonl", 2)
    batch = await submitted_batch(store, now=now)
    items = await store.submitted_items(batch.id)
    assert [i.deadline is not None for i in items] == [True, True, False, False]
    await store.record_outcomes(batch.id, [final(items[0])], [])
    assert await store.hand_over(batch.id) == 1
    assert await store.hand_over(batch.id) == 0
    waiting = await store.submitted_items(batch.id)
    assert [(i.id, i.state) for i in waiting] == [
        (items[1].id, ItemState.REALTIME),
        (items[2].id, ItemState.SUBMITTED),
        (items[3].id, ItemState.SUBMITTED),
    ]


async def test_realtime_items_are_this_nodes_with_bodies_earliest_deadline_first(
    store: Store, second_node: Store
) -> None:
    now = time.time()
    late = await ingest(store, "late.jsonl", 2, deadline=now + 200, fallback_at=now)
    early = await ingest(store, "early.jsonl", 2, deadline=now + 100, fallback_at=now, body=b'{"model":"m"}')
    await ingest(second_node, "theirs.jsonl", 2, deadline=now + 50, fallback_at=now)
    await store.fallback_due(now)
    await second_node.fallback_due(now)
    items = await store.realtime_items(10)
    assert [(i.file_id, i.line) for i in items] == [(early.id, 1), (early.id, 2), (late.id, 1), (late.id, 2)]
    assert items[0].body == b'{"model":"m"}' and items[0].deadline == pytest.approx(now + 100)
    assert items[0].batch_id is None and items[0].custom_id == "c1"
    assert [i.id for i in await store.realtime_items(2, exclude=[items[0].id])] == [items[1].id, items[2].id]
    assert len(await second_node.realtime_items(10)) == 2


async def test_the_fallbacks_answer_is_the_result_once_with_via_cost_paid_and_deadline(store: Store) -> None:
    now = time.time()
    row = await ingest(store, "d.jsonl", 2, deadline=now + 100, fallback_at=now)
    await store.fallback_due(now)
    items = await store.realtime_items(10)
    waiting = [SubmittedItem(i.id, i.file_id, i.line, i.custom_id, 0) for i in items]
    assert await store.record_realtime([realtime(waiting[0])]) == ApplySummary(final=1)
    assert await store.record_realtime([realtime(waiting[0])]) == ApplySummary(ignored=1)  # no second result
    assert await states(store, row.id) == [ItemState.SUCCEEDED, ItemState.REALTIME]
    assert [i.id for i in await store.realtime_items(10)] == [waiting[1].id]  # its body is gone with it
    [report] = await store.report(now - 60, "file")
    assert report["fallback_requests"] == 1 and report["fallback_cost"] == pytest.approx(0.4)
    assert report["cost_paid"] == pytest.approx(0.4) and report["deadlines_met"] == 1
    assert report["deadlines_missed"] == 0 and report["duplicate_requests"] == 0


async def test_first_final_wins_and_the_second_answer_is_a_duplicate_cost_once(store: Store) -> None:
    now = time.time()
    await ingest(store, "d.jsonl", 3, deadline=now + 100, fallback_at=now + 10)
    batch = await submitted_batch(store, now=now)
    assert await store.hand_over(batch.id) == 3
    a, b, c = await store.submitted_items(batch.id)
    assert {a.state, b.state, c.state} == {ItemState.REALTIME}
    # A retryable batch outcome of a REALTIME request is not the batch's to requeue.
    assert await store.record_outcomes(batch.id, [], [retry(c, now)]) == ApplySummary(ignored=1)
    # The batch answers `a` first: it wins, and the fallback's answer is a duplicate cost.
    assert await store.record_outcomes(batch.id, [final(a, tokens=3, cost=0.1)], []) == ApplySummary(final=1)
    assert await store.record_realtime([realtime(a)]) == ApplySummary(duplicates=1)
    assert await store.record_realtime([realtime(a)]) == ApplySummary(ignored=1)
    # The fallback answers `b` first: the batch's late answer is a duplicate cost, once.
    assert await store.record_realtime([realtime(b)]) == ApplySummary(final=1)
    assert [i.id for i in await store.fallback_answered(batch.id)] == [b.id]
    late = final(b, tokens=3, cost=0.1)
    assert await store.record_outcomes(batch.id, [late], []) == ApplySummary(duplicates=1)
    assert await store.record_outcomes(batch.id, [late], []) == ApplySummary(ignored=1)
    # An unbilled answer is no cost at all.
    assert await store.record_outcomes(batch.id, [final(b)], []) == ApplySummary(ignored=1)
    results = await store.results_after(0, 10)
    assert len(results) == 2  # one result each for a and b, never a second
    [report] = await store.report(now - 60, "model")
    assert report["duplicate_requests"] == 2
    assert report["duplicate_cost"] == pytest.approx(0.4 + 0.1)
    assert report["fallback_requests"] == 1 and report["requests"] == 2


async def test_handovers_and_refunded_retries_apply_to_submitted_requests_only(store: Store) -> None:
    now = time.time()
    await ingest(store, "d.jsonl", 2, deadline=now + 100, fallback_at=now + 10)
    await ingest(store, "n.jsonl", 2)
    batch = await submitted_batch(store, now=now)
    a, b, c, d = await store.submitted_items(batch.id)
    assert (c.attempts, d.attempts) == (1, 1)
    summary = await store.record_outcomes(
        batch.id, [final(a)], [Retry(c.id, now, "cancelled", refund=True), retry(d, now)], handovers=[a.id, b.id]
    )
    assert summary == ApplySummary(final=1, requeued=2, ignored=1, handed_over=1)  # `a` is final: not handed
    assert [(i.id, i.state) for i in await store.submitted_items(batch.id)] == [(b.id, ItemState.REALTIME)]
    again = await claim(store, now=now + 1)
    await store.mark_submitted(again.id, "batch_again", "validating", now)
    attempts = {i.id: i.attempts for i in await store.submitted_items(again.id)}
    assert attempts == {c.id: 1, d.id: 2}  # the bystander's attempt was given back
    assert await store.record_outcomes(batch.id, [], [], handovers=[b.id]) == ApplySummary(ignored=1)


async def test_report_counts_missed_deadlines(store: Store) -> None:
    now = time.time()
    await ingest(store, "d.jsonl", 2, deadline=now - 5, fallback_at=now - 10)
    batch = await submitted_batch(store, now=now - 20)
    items = await store.submitted_items(batch.id)
    await store.record_outcomes(batch.id, [final(i, tokens=1, cost=0.01) for i in items], [])
    [report] = await store.report(now - 60, "day")
    assert (report["deadlines_met"], report["deadlines_missed"]) == (0, 2)
    assert report["cost_paid"] == pytest.approx(0.02) and report["fallback_requests"] == 0


async def test_pruning_keeps_the_fallback_deadline_and_duplicate_figures(store: Store) -> None:
    now = time.time()
    row = await ingest(store, "d.jsonl", 2, deadline=now + 100, fallback_at=now + 10)
    batch = await submitted_batch(store, now=now)
    assert await store.hand_over(batch.id) == 2
    a, b = await store.submitted_items(batch.id)
    await store.record_realtime([realtime(a), realtime(b)])
    await store.record_outcomes(batch.id, [final(a, tokens=3, cost=0.1)], [])
    await newest_work(store)
    before = {by: await store.report(now - 60, by) for by in ("model", "file", "day", "provider")}
    assert sum(r["duplicate_requests"] for r in before["model"]) == 1
    await store.outbox_delivered("outbox:n1", 10, {row.id: (2, 100)})
    await store.complete_file(row.id)
    pruned = await store.prune_finished(time.time() + 1)
    assert pruned.files == 1 and pruned.results == 2
    for by, rows in before.items():
        after = await store.report(now - 3600, by)
        keys = ("requests", "fallback_requests", "deadlines_met", "deadlines_missed", "duplicate_requests")
        assert [[r[k] for k in keys] for r in after] == [[r[k] for k in keys] for r in rows], by
        for key in ("cost_paid", "fallback_cost", "duplicate_cost"):
            assert [r[key] for r in after] == pytest.approx([r[key] for r in rows]), (by, key)


async def test_a_cancelled_file_ends_its_requests_waiting_for_the_fallback_and_a_late_answer_is_a_duplicate(
    store: Store,
) -> None:
    # `batchd cancel --file` while the fallback holds some of the file's requests: they end canceled
    # like the queued ones (not sent at twice the price after the operator said stop); an answer
    # already on its way is paid for, so it is a duplicate cost, never a second result line.
    now = time.time()
    row = await ingest(store, "c.jsonl", 3, deadline=now + 100, fallback_at=now + 10)
    await store.fallback_due(now + 10)
    [first, *_] = await store.realtime_items(10)
    waiting = await store.queued_items(row.id)
    assert [item.line for item in waiting] == [1, 2, 3]
    recorded, batches = await store.cancel_file(row.id, canceled_results(waiting), now + 11)
    assert (recorded, batches) == (3, [])
    assert await states(store, row.id) == [ItemState.CANCELED] * 3
    assert await store.realtime_items(10) == []
    late = SubmittedItem(first.id, first.file_id, first.line, first.custom_id, 0)
    assert await store.record_realtime([realtime(late)]) == ApplySummary(duplicates=1)
    assert [r["status"] for r in await store.query_results("c.jsonl", None, None, 10)] == ["canceled"] * 3
