"""The store contract, one set of tests for every engine (the huey way): batchd/store/contract.py's guarantees.

Each test runs on SQLite and on PostgreSQL (tests/store/conftest.py). Tests with two nodes open
a second store on the same database; time-dependent guarantees (leases, backoffs) are driven by
the `now` the contract takes, never by sleeping.
"""

from __future__ import annotations

import asyncio
import time

import pytest

from batchd.store.contract import (
    METRICS_READS,
    ApplySummary,
    BatchState,
    Chunk,
    DuplicateCustomId,
    Fate,
    FileState,
    InputSize,
    Store,
    WholeFile,
)

from ..conftest import loop_ticks
from .conftest import StoreFactory
from .factories import (
    BODY,
    claim,
    file_key,
    final,
    ingest,
    never_taken,
    new_item,
    retry,
    submitted_batch,
    succeed_all,
    whole_file,
)
from .factories import chunk as make_chunk

# -- intake ---------------------------------------------------------------------------------------


async def test_begin_file_starts_ingesting_with_nothing_committed(store: Store) -> None:
    row = await store.begin_file(file_key("daily.jsonl"), never_taken)
    assert (row.node, row.name, row.out_name, row.state) == ("n1", "daily.jsonl", "daily.results.jsonl", "ingesting")
    assert (row.lines_committed, row.offset_committed, row.lines, row.delivered, row.out_bytes) == (0, 0, 0, 0, 0)
    assert not row.moved
    assert await store.file(row.id) == row


async def test_find_file_resumes_exactly_this_file_until_it_has_moved(store: Store) -> None:
    key = file_key("a.jsonl", ino=77)
    assert await store.find_file(key) is None
    row = await store.begin_file(key, never_taken)
    assert await store.add_chunk(row.id, make_chunk(1, 3))
    found = await store.find_file(key)
    assert found is not None and found.id == row.id and found.lines_committed == 3
    # Another inode or other content under the same name is another file.
    assert await store.find_file(file_key("a.jsonl", ino=78)) is None
    assert await store.find_file(file_key("a.jsonl", sha256="other", ino=77)) is None
    await store.file_moved(row.id)
    await store.file_moved(row.id)  # idempotent
    assert await store.find_file(key) is None
    moved = await store.file(row.id)
    assert moved is not None and moved.moved


async def test_add_chunk_is_compare_and_set_on_lines_committed(store: Store) -> None:
    row = await store.begin_file(file_key(), never_taken)
    first = make_chunk(1, 3)
    assert await store.add_chunk(row.id, first) is True
    # A repeat (a crash or a cancellation after the commit) changes nothing.
    assert await store.add_chunk(row.id, first) is False
    # A chunk that does not start right after the committed lines is refused too.
    assert await store.add_chunk(row.id, make_chunk(5, 6)) is False
    assert await store.add_chunk(row.id, make_chunk(4, 6, invalid_lines=[5])) is True
    committed = await store.file(row.id)
    assert committed is not None
    assert (committed.lines_committed, committed.offset_committed, committed.state) == (6, 6 * 50, "ingesting")
    [group] = await store.queued_groups(time.time())
    assert group.count == 5
    results = await store.results_after(0, 10)
    assert [(r.file_id, r.out_name) for r in results] == [(row.id, "f.results.jsonl")]


async def test_seen_custom_ids_spans_committed_chunks_of_this_file_only(store: Store) -> None:
    row = await store.begin_file(file_key("one.jsonl"), never_taken)
    assert await store.add_chunk(row.id, make_chunk(1, 3, custom_ids={1: "a", 2: "b", 3: "c"}))
    assert await store.add_chunk(row.id, make_chunk(4, 5, custom_ids={4: "d", 5: "e"}))
    assert await store.seen_custom_ids(row.id, ["a", "e", "z"]) == {"a", "e"}
    assert await store.seen_custom_ids(row.id, []) == set()
    other = await store.begin_file(file_key("two.jsonl"), never_taken)
    assert await store.seen_custom_ids(other.id, ["a", "e"]) == set()


async def test_a_chunk_repeating_a_committed_custom_id_changes_nothing(store: Store) -> None:
    row = await store.begin_file(file_key(), never_taken)
    assert await store.add_chunk(row.id, make_chunk(1, 2, custom_ids={1: "a", 2: "b"}))
    with pytest.raises(DuplicateCustomId):
        await store.add_chunk(row.id, make_chunk(3, 4, custom_ids={3: "c", 4: "a"}))
    unchanged = await store.file(row.id)
    assert unchanged is not None and unchanged.lines_committed == 2
    # Without the repeat (the spool makes it an invalid result) the same lines go in.
    assert await store.add_chunk(row.id, make_chunk(3, 4, custom_ids={3: "c"}, invalid_lines=[4]))
    [group] = await store.queued_groups(time.time())
    assert group.count == 3


async def test_finish_file_opens_it_with_its_line_count_idempotently(store: Store) -> None:
    row = await store.begin_file(file_key(), never_taken)
    assert await store.add_chunk(row.id, make_chunk(1, 4, invalid_lines=[2]))
    await store.finish_file(row.id, 4)
    await store.finish_file(row.id, 4)
    opened = await store.file(row.id)
    assert opened is not None and (opened.state, opened.lines, opened.lines_committed) == ("open", 4, 4)


async def test_results_names_are_chosen_once_and_never_shared(store: Store) -> None:
    first = await store.begin_file(file_key("f.jsonl"), never_taken)
    assert first.out_name == "f.results.jsonl"
    # The same name dropped again while the first is unfinished: the next free number.
    second = await store.begin_file(file_key("f.jsonl"), never_taken)
    assert second.out_name == "f.1.results.jsonl"
    # Something in out/ holds a name (a producer has not consumed it yet): skipped too.
    third = await store.begin_file(file_key("f.jsonl"), lambda name: name == "f.2.results.jsonl")
    assert third.out_name == "f.3.results.jsonl"
    taken = await store.begin_file(file_key("g.jsonl"), lambda name: name == "g.results.jsonl")
    assert taken.out_name == "g.1.results.jsonl"


async def test_a_complete_file_whose_results_are_gone_gives_its_name_up(store: Store) -> None:
    done = await ingest(store, "n.jsonl", 2, invalid_lines=[1, 2])
    results = await store.results_after(0, 10)
    await store.outbox_delivered("outbox:n1", results[-1].id, {done.id: (2, 100)})
    await store.complete_file(done.id)
    again = await store.begin_file(file_key("n.jsonl"), never_taken)
    assert again.out_name == "n.results.jsonl"
    old = await store.file(done.id)
    assert old is not None and old.out_name == f"n.results.jsonl~{done.id}" and old.state == "complete"


async def test_add_files_commits_small_files_whole_with_distinct_results_names(store: Store) -> None:
    a = whole_file("a.jsonl", 3, invalid_lines=[2])
    b = whole_file("b.jsonl", 2)
    # b's results name is held in out/, and the fallback a.1 would collide with a file named a.1.jsonl.
    a1 = whole_file("a.1.jsonl", 1)
    rows = await store.add_files([a, b, a1], lambda name: name == "b.results.jsonl")
    assert [(r.name, r.out_name, r.state, r.lines, r.lines_committed, r.offset_committed) for r in rows] == [
        ("a.jsonl", "a.results.jsonl", "open", 3, 3, a.key.size),
        ("b.jsonl", "b.1.results.jsonl", "open", 2, 2, b.key.size),
        ("a.1.jsonl", "a.1.results.jsonl", "open", 1, 1, a1.key.size),
    ]
    assert [await store.file(r.id) for r in rows] == rows
    [group] = await store.queued_groups(time.time())
    assert group.count == 2 + 2 + 1
    results = await store.results_after(0, 10)
    assert [(r.file_id, r.out_name) for r in results] == [(rows[0].id, "a.results.jsonl")]
    batch = await claim(store)
    assert batch.requests == 5
    bodies = [body for part in [c async for c in store.batch_bodies(batch.id)] for _, _, body in part]
    assert bodies == [BODY] * 5


async def test_add_files_leaves_a_file_it_already_has_as_it_is(store: Store) -> None:
    # Committed before a crash, still in new/ (not moved): returned as it is, nothing added twice.
    first = whole_file("x.jsonl", 2)
    [committed] = await store.add_files([first], never_taken)
    # Chunks of another file were committed by the chunked path: left INGESTING for it to resume.
    key = file_key("big.jsonl")
    started = await store.begin_file(key, never_taken)
    assert await store.add_chunk(started.id, make_chunk(1, 2))
    fresh = whole_file("y.jsonl", 1)
    rows = await store.add_files([first, WholeFile(key, 3, [], []), fresh], never_taken)
    assert rows[0] == committed
    assert (rows[1].id, rows[1].state, rows[1].lines_committed) == (started.id, "ingesting", 2)
    assert (rows[2].name, rows[2].state) == ("y.jsonl", "open")
    [group] = await store.queued_groups(time.time())
    assert group.count == 2 + 2 + 1


async def test_add_files_records_the_moves_of_the_group_before(store: Store) -> None:
    [before] = await store.add_files([whole_file("m.jsonl", 1)], never_taken)
    [after] = await store.add_files([whole_file("n.jsonl", 1)], never_taken, moved=[before.id])
    assert [(await store.file(r.id)).moved for r in (before, after)] == [True, False]  # type: ignore[union-attr]
    assert await store.add_files([], never_taken, moved=[after.id]) == []
    await store.files_moved([after.id])  # idempotent
    assert (await store.file(after.id)).moved  # type: ignore[union-attr]
    assert await store.find_file(file_key("n.jsonl", ino=0)) is None


async def test_file_names_and_results_names_are_per_node(store: Store, second_node: Store) -> None:
    key = file_key("nightly.jsonl", ino=5)
    mine = await ingest(store, key=key, count=1)
    # The same name (even the same inode number: another host) in another node's spool.
    theirs = await ingest(second_node, key=file_key("nightly.jsonl", ino=5), count=1)
    assert (mine.out_name, theirs.out_name) == ("nightly.results.jsonl", "nightly.results.jsonl")
    assert (mine.node, theirs.node) == ("n1", "n2") and mine.id != theirs.id
    found = await second_node.find_file(key)
    assert found is not None and found.id == theirs.id
    assert [f.id for f in await store.open_files()] == [mine.id]
    assert [f.id for f in await second_node.open_files()] == [theirs.id]


# -- queue ----------------------------------------------------------------------------------------


async def test_queued_groups_group_by_route_and_count_bytes(store: Store) -> None:
    await ingest(store, "a.jsonl", 3, size=100)
    await ingest(store, "b.jsonl", 2, size=50, model="gpt-4o")
    await ingest(store, "c.jsonl", 4, size=10, profile="anthropic", endpoint="/v1/messages", model="claude")
    groups = await store.queued_groups(time.time())
    got = {(g.profile, g.endpoint, g.model): (g.count, g.bytes) for g in groups}
    assert got == {
        ("openai", "/v1/chat/completions", "gpt-4o-mini"): (3, 300),
        ("openai", "/v1/chat/completions", "gpt-4o"): (2, 100),
        ("anthropic", "/v1/messages", "claude"): (4, 40),
    }
    assert all(g.oldest <= time.time() for g in groups)


async def test_claim_never_exceeds_the_request_or_byte_limit(store: Store) -> None:
    await ingest(store, count=25, size=100)
    now = time.time()
    [group] = await store.queued_groups(now)
    first = await store.claim_batch(group, "openai", max_requests=10, max_bytes=10_000, now=now)
    assert first is not None and (first.requests, first.state, first.owner) == (10, "pending", "n1")
    [group] = await store.queued_groups(now)
    second = await store.claim_batch(group, "openai", max_requests=100, max_bytes=750, now=now)
    assert second is not None and (second.requests, second.bytes) == (7, 700)
    [group] = await store.queued_groups(now)
    assert group.count == 8
    assert await store.claim_batch(group, "openai", max_requests=100, max_bytes=99, now=now) is None
    bodies = [row for part in [c async for c in store.batch_bodies(first.id, chunk=3)] for row in part]
    ids = [item_id for item_id, _, _ in bodies]
    assert ids == sorted(ids) == await store.batch_item_ids(first.id) and len(ids) == 10
    assert {(endpoint, body) for _, endpoint, body in bodies} == {("/v1/chat/completions", new_item(1).body)}


async def test_batch_input_size_adds_up_what_batch_bodies_reads(store: Store) -> None:
    # What a streamed upload declares as its length before it reads a body: bodies of many lengths
    # (multi-byte UTF-8 among them) and ids of one and two hex digits, of a batch that took 15 of 20.
    await ingest(store, "before.jsonl", 12)
    row = await store.begin_file(file_key("sizes.jsonl"), never_taken)
    bodies = [b'{"model":"m","n":%d,"x":"%s"}' % (n, "\u00e9€".encode() * n) for n in range(1, 21)]
    items = [new_item(n, body=body) for n, body in enumerate(bodies, 1)]
    assert await store.add_chunk(row.id, Chunk(1, 20, 2000, items, []))
    await store.finish_file(row.id, 20)
    await claim(store, max_requests=12)
    batch = await claim(store, max_requests=15)
    rows = [r for part in [c async for c in store.batch_bodies(batch.id, chunk=4)] for r in part]
    assert len(rows) == 15 and {len(f"{item_id:x}") for item_id, _, _ in rows} == {1, 2}
    assert await store.batch_input_size(batch.id) == InputSize(
        15, sum(len(body) for _, _, body in rows), sum(len(f"{item_id:x}") for item_id, _, _ in rows)
    )


async def test_claim_takes_the_oldest_items_first(store: Store) -> None:
    old = await ingest(store, "old.jsonl", 3)
    await ingest(store, "new.jsonl", 3)
    batch = await claim(store, max_requests=3)
    await store.mark_submitted(batch.id, "r", "validating", time.time())
    assert {i.file_id for i in await store.submitted_items(batch.id)} == {old.id}


async def test_claim_by_request_limit_leaves_held_items_among_the_claimed_ids(store: Store) -> None:
    # Requeued items keep their ids: a claim's id range may hold items still backed off, which stay queued.
    await ingest(store, count=6, size=100)
    now = time.time()
    batch = await submitted_batch(store, now=now)
    items = await store.submitted_items(batch.id)
    held = [items[1].id, items[3].id]
    retries = [retry(i, now + 100) for i in items if i.id in held]
    await store.record_outcomes(batch.id, [final(i) for i in items if i.id not in held], retries)
    await ingest(store, "more.jsonl", count=4, size=100)
    [group] = await store.queued_groups(now)
    assert group.count == 4
    first = await store.claim_batch(group, "openai", max_requests=3, max_bytes=10**9, now=now)
    assert first is not None and (first.requests, first.bytes) == (3, 300)
    ids = await store.batch_item_ids(first.id)
    assert len(ids) == 3 and not set(ids) & set(held)
    [group] = await store.queued_groups(now + 101)
    assert group.count == 3
    rest = await store.claim_batch(group, "openai", max_requests=10, max_bytes=10**9, now=now + 101)
    assert rest is not None and (rest.requests, rest.bytes) == (3, 300)
    assert set(held) < set(await store.batch_item_ids(rest.id))


async def test_claim_avoids_request_counts_of_other_pending_batches(store: Store) -> None:
    await ingest(store, count=25)
    now = time.time()
    [group] = await store.queued_groups(now)
    batch = await store.claim_batch(group, "anthropic", 10, 10**9, now, avoid_counts=frozenset({10, 9}))
    assert batch is not None and batch.requests == 8
    [group] = await store.queued_groups(now)
    assert group.count == 17
    assert await store.claim_batch(group, "anthropic", 1, 10**9, now, avoid_counts=frozenset({1})) is None


async def test_items_held_back_by_a_backoff_wait_for_not_before(store: Store) -> None:
    await ingest(store, count=2)
    now = time.time()
    assert await store.next_not_before(now) is None
    batch = await submitted_batch(store, now=now)
    first, second = await store.submitted_items(batch.id)
    summary = await store.record_outcomes(batch.id, [final(first)], [retry(second, now + 100)])
    assert summary == ApplySummary(final=1, requeued=1, ignored=0)
    assert await store.queued_groups(now) == []
    due = await store.next_not_before(now)
    assert due is not None and due == pytest.approx(now + 100, abs=1)
    [group] = await store.queued_groups(now + 101)
    assert group.count == 1


async def test_concurrent_claims_from_two_nodes_never_share_an_item(store: Store, second_node: Store) -> None:
    total = 300
    await ingest(store, count=total, chunk_lines=100)
    now = time.time()

    async def claimer(node: Store) -> list[int]:
        batches = []
        while True:
            groups = await node.queued_groups(now)
            if not groups:
                return batches
            batch = await node.claim_batch(groups[0], "openai", 7, 10**9, now)
            if batch is not None:
                batches.append(batch.id)

    claimed = await asyncio.gather(*(claimer(node) for node in (store, second_node, store, second_node)))
    item_ids: list[int] = []
    for batch_id in {b for batches in claimed for b in batches}:
        members = await store.batch_item_ids(batch_id)
        assert 0 < len(members) <= 7
        item_ids += members
    assert len(item_ids) == len(set(item_ids)) == total, "an item went into two batches"


async def test_usage_counts_live_batches_of_every_node(store: Store, second_node: Store) -> None:
    await ingest(store, "a.jsonl", 3, tokens=10)
    await ingest(second_node, "b.jsonl", 2, tokens=7)
    now = time.time()
    ours = await claim(store, max_requests=3, now=now)
    await store.mark_submitted(ours.id, "remote-a", "validating", now)
    theirs = await claim(second_node, now=now)
    await second_node.mark_submitted(theirs.id, "remote-b", "validating", now)
    for node in (store, second_node):
        usage = await node.usage("openai", "gpt-4o-mini", now)
        assert (usage.in_flight_batches, usage.enqueued_requests, usage.enqueued_tokens) == (2, 5, 44)
        assert usage.created_last_hour == 2
    assert (await store.usage("anthropic", None, now)).in_flight_batches == 0
    await store.finish_batch(ours.id)
    assert (await second_node.usage("openai", "gpt-4o-mini", now)).in_flight_batches == 1


async def test_holds_are_recorded_counted_and_released(store: Store, second_node: Store) -> None:
    now = time.time()
    assert await store.hold_failures("openai", "m") == 0
    await store.hold("openai", "m", now + 60, 1, "token_limit_exceeded")
    await store.hold("openai", "m", now + 120, 2, "token_limit_exceeded")
    assert await second_node.hold_failures("openai", "m") == 2
    holds = await second_node.active_holds(now)
    assert holds == {("openai", "m"): pytest.approx(now + 120)}
    assert await store.active_holds(now + 121) == {}
    await store.release_hold("openai", "m")
    assert await store.active_holds(now) == {}
    assert await store.hold_failures("openai", "m") == 0


# -- batches --------------------------------------------------------------------------------------


async def test_mark_submitted_counts_each_items_attempt_once(store: Store) -> None:
    await ingest(store, count=3)
    now = time.time()
    batch = await claim(store, now=now)
    await store.set_input_file(batch.id, "file-abc")
    await store.mark_submitted(batch.id, "remote-1", "validating", now, remote_created_at=now - 1)
    await store.mark_submitted(batch.id, "remote-1", "validating", now)  # a repeat after a crash
    row = await store.batch(batch.id)
    assert row is not None
    assert (row.state, row.remote_id, row.remote_status, row.input_file_id) == (
        "submitted",
        "remote-1",
        "validating",
        "file-abc",
    )
    assert row.submitted_at == pytest.approx(now)
    items = await store.submitted_items(batch.id)
    assert [i.attempts for i in items] == [1, 1, 1]
    assert await store.remote_ids("openai") == {"remote-1"}
    assert await store.remote_owner("remote-1") == batch.id
    assert await store.remote_owner("remote-unknown") is None


async def test_a_submit_failure_is_noted_and_delays_the_next_try(store: Store) -> None:
    await ingest(store, count=1)
    batch = await claim(store)
    retry_at = time.time() + 30
    await store.note_submit_failure(batch.id, "HTTP 500", retry_at)
    row = await store.batch(batch.id)
    assert row is not None and row.state == "pending" and row.last_error == "HTTP 500"
    assert row.not_before == pytest.approx(retry_at)
    assert row.submit_attempts == 1


async def test_unverified_batches_are_confirmed_or_unadopted(store: Store) -> None:
    await ingest(store, count=4)
    now = time.time()
    one = await claim(store, max_requests=2, now=now)
    two = await claim(store, max_requests=2, now=now)
    for batch, remote in ((one, "msgbatch_1"), (two, "msgbatch_2")):
        await store.mark_unverified(batch.id, remote, "in_progress", now, now - 5)
        row = await store.batch(batch.id)
        assert row is not None and (row.state, row.remote_id) == ("unverified", remote)
    assert [b.id for b in await store.batches_in_state(BatchState.UNVERIFIED)] == [one.id, two.id]
    await store.confirm_ownership(one.id)
    confirmed = await store.batch(one.id)
    assert confirmed is not None and confirmed.state == "submitted"
    await store.unadopt(two.id, "msgbatch_2", "request count matched, custom_ids did not")
    undone = await store.batch(two.id)
    assert undone is not None and (undone.state, undone.remote_id) == ("pending", None)
    assert await store.rejected_remotes(two.id) == {"msgbatch_2"}
    assert await store.rejected_remotes(one.id) == set()


async def test_record_poll_keeps_the_latest_answer_and_the_first_end(store: Store) -> None:
    await ingest(store, count=2)
    batch = await submitted_batch(store)
    await store.record_poll(batch.id, "in_progress", {"total": 2, "completed": 1}, None, None)
    row = await store.batch(batch.id)
    assert row is not None and (row.remote_status, row.counts, row.ended_at) == (
        "in_progress",
        {"total": 2, "completed": 1},
        None,
    )
    await store.record_poll(batch.id, "completed", {"total": 2, "completed": 2}, "out-1", "err-1", ended=True)
    ended = await store.batch(batch.id)
    assert ended is not None and ended.ended_at is not None
    assert (ended.remote_status, ended.output_file_id, ended.error_file_id) == ("completed", "out-1", "err-1")
    await store.record_poll(batch.id, "completed", {"total": 2, "completed": 2}, "out-1", "err-1", ended=True)
    again = await store.batch(batch.id)
    assert again is not None and again.ended_at == ended.ended_at
    await store.note_cancel_requested(batch.id, "overdue")
    await store.note_batch_error(batch.id, "batch.poll_failed", "HTTP 502")
    noted = await store.batch(batch.id)
    assert noted is not None and noted.cancel_requested_at is not None and noted.last_error == "HTTP 502"


async def test_finish_batch_records_its_fate_once(store: Store) -> None:
    await ingest(store, count=2)
    batch = await submitted_batch(store)
    await store.finish_batch(batch.id, Fate.VANISHED, "not found at the provider")
    await store.finish_batch(batch.id, Fate.VANISHED, "not found at the provider")
    row = await store.batch(batch.id)
    assert row is not None and (row.state, row.fate) == ("done", "vanished")
    assert [b.id for b in await store.batches_in_state(BatchState.DONE)] == [batch.id]
    assert await store.batches_in_state(BatchState.SUBMITTED, BatchState.PENDING) == []
    assert await store.owned_batches(BatchState.SUBMITTED) == []


async def test_a_live_batch_is_leased_to_one_node_and_taken_over_only_after_expiry(
    store: Store, second_node: Store
) -> None:
    await ingest(store, count=4)
    now = time.time()
    [group] = await store.queued_groups(now)
    batch = await store.claim_batch(group, "openai", 2, 10**9, now, lease_seconds=10)
    assert batch is not None and batch.owner == "n1" and batch.lease_until == pytest.approx(now + 10, abs=1)
    await store.mark_submitted(batch.id, "remote-x", "validating", now)
    assert [b.id for b in await store.owned_batches(BatchState.SUBMITTED)] == [batch.id]
    assert await second_node.owned_batches(BatchState.SUBMITTED) == []
    # Before the lease runs out nobody else may take it.
    assert await second_node.take_over(10, now + 5) == []
    # The owner renews; the lease now runs from the renewal.
    assert await store.renew_leases(10, now + 8) == 1
    assert await second_node.take_over(10, now + 15) == []
    # The owner stops renewing (it died): after expiry the other node takes the batch, once.
    taken = await second_node.take_over(10, now + 19)
    assert [(b.id, b.owner) for b in taken] == [(batch.id, "n2")]
    assert await second_node.take_over(10, now + 19) == []
    assert [b.id for b in await second_node.owned_batches(BatchState.SUBMITTED)] == [batch.id]
    assert await store.owned_batches(BatchState.SUBMITTED) == []
    row = await store.batch(batch.id)
    assert row is not None and row.owner == "n2" and row.lease_until == pytest.approx(now + 29, abs=1)
    # The old owner's renewal no longer covers it.
    assert await store.renew_leases(10, now + 20) == 0


async def test_released_leases_may_be_taken_at_once(store: Store, second_node: Store) -> None:
    await ingest(store, count=2)
    now = time.time()
    batch = await submitted_batch(store, max_requests=1, now=now)
    other = await claim(store, now=now)  # a PENDING intent is leased too
    await store.release_leases()
    taken = await second_node.take_over(30, now)
    assert sorted(b.id for b in taken) == sorted([batch.id, other.id])
    assert {b.owner for b in taken} == {"n2"}


async def test_done_batches_are_never_taken_over(store: Store, second_node: Store) -> None:
    await ingest(store, count=1)
    now = time.time()
    batch = await submitted_batch(store, now=now)
    await succeed_all(store, batch)
    await store.finish_batch(batch.id)
    assert await second_node.take_over(1, now + 3600) == []


# -- outcomes -------------------------------------------------------------------------------------


async def test_outcomes_record_finals_and_retries_and_a_repeat_is_ignored(store: Store) -> None:
    row = await ingest(store, count=3)
    now = time.time()
    batch = await submitted_batch(store, now=now)
    items = await store.submitted_items(batch.id)
    assert [(i.file_id, i.line, i.custom_id, i.attempts) for i in items] == [
        (row.id, 1, "c1", 1),
        (row.id, 2, "c2", 1),
        (row.id, 3, "c3", 1),
    ]
    finals, retries = [final(items[0], tokens=3, cost=0.5)], [retry(items[1], now)]
    assert await store.record_outcomes(batch.id, finals, retries) == ApplySummary(1, 1, 0)
    assert await store.record_outcomes(batch.id, finals, retries) == ApplySummary(0, 0, 2)
    assert [i.id for i in await store.submitted_items(batch.id)] == [items[2].id]
    assert [i.id for i in await store.submitted_items(batch.id, [items[0].id, items[2].id])] == [items[2].id]
    results = await store.results_after(0, 10)
    assert [r.payload for r in results] == [finals[0].payload]
    # The retried item goes out again and its attempts keep counting.
    again = await submitted_batch(store, now=now)
    [retried] = await store.submitted_items(again.id)
    assert (retried.id, retried.attempts) == (items[1].id, 2)
    # An outcome for an item of another batch is not this batch's to record.
    assert await store.record_outcomes(batch.id, [final(retried)], []) == ApplySummary(0, 0, 1)


async def test_refund_gives_the_attempt_back_once(store: Store) -> None:
    await ingest(store, count=3)
    now = time.time()
    batch = await submitted_batch(store, now=now)
    assert await store.refund_batch(batch.id, now, "output file lost") == 3
    assert await store.refund_batch(batch.id, now, "output file lost") == 0
    assert await store.submitted_items(batch.id) == []
    again = await submitted_batch(store, now=now)
    assert [i.attempts for i in await store.submitted_items(again.id)] == [1, 1, 1]


async def test_batch_item_ids_are_in_input_order(store: Store) -> None:
    await ingest(store, count=5)
    batch = await claim(store)
    ids = await store.batch_item_ids(batch.id)
    assert ids == sorted(ids) and len(ids) == 5


# -- delivery -------------------------------------------------------------------------------------


async def test_results_after_is_in_id_order_and_filters_by_node(store: Store, second_node: Store) -> None:
    mine = await ingest(store, "m.jsonl", 2, invalid_lines=[1, 2])
    theirs = await ingest(second_node, "t.jsonl", 2, invalid_lines=[1, 2])
    more = await ingest(store, "m2.jsonl", 1, invalid_lines=[1])
    everything = await store.results_after(0, 100)
    assert [r.id for r in everything] == sorted(r.id for r in everything) and len(everything) == 5
    assert [r.file_id for r in everything] == [mine.id, mine.id, theirs.id, theirs.id, more.id]
    assert [r.out_name for r in everything][:2] == ["m.results.jsonl"] * 2
    own = await store.results_after(0, 100, node="n1")
    assert [r.file_id for r in own] == [mine.id, mine.id, more.id]
    assert [r.file_id for r in await second_node.results_after(0, 100, node="n2")] == [theirs.id] * 2
    assert await store.results_after(everything[1].id, 2) == everything[2:4]
    assert await store.results_after(everything[-1].id, 10) == []


async def test_results_after_reads_what_was_just_recorded_as_the_database_holds_it(
    store: Store, second_node: Store, store_factory: StoreFactory
) -> None:
    """A store may serve its own fresh commits from memory (SQLite): never other than a reader that has
    none would read them from the database, whatever the cursor, limit, node, or results between."""
    reader = await store_factory("n3")  # records nothing: reads the database only
    for round_, (node, limit) in enumerate((n, k) for n in (None, "n1", "n2") for k in (1, 2, 5, 100)):
        start = [r.id for r in await reader.results_after(0, 10_000)][-1:] or [0]
        await ingest(store, f"a{round_}.jsonl", 6, model=f"a{round_}")
        await ingest(second_node, f"b{round_}.jsonl", 4, model=f"b{round_}")
        mine = await submitted_batch(store, model=f"a{round_}")
        theirs = await submitted_batch(second_node, model=f"b{round_}")
        items = await store.submitted_items(mine.id)
        other = await second_node.submitted_items(theirs.id)
        await store.record_outcomes(mine.id, [final(i) for i in items[:3]], [])
        await ingest(store, f"c{round_}.jsonl", 2, invalid_lines=[1, 2])  # results by another path, between
        await second_node.record_outcomes(theirs.id, [final(i) for i in other[:2]], [])  # another connection's
        await store.record_outcomes(mine.id, [final(i) for i in items[3:5]], [])
        await second_node.record_outcomes(theirs.id, [final(i) for i in other[2:]], [])
        await store.record_outcomes(mine.id, [final(i) for i in items[5:]], [])
        # Each node follows its own cursor through the new results, as a sink does.
        for follower in (store, second_node):
            last, seen = start[0], 0
            while expected := await reader.results_after(last, limit, node=node):
                assert await follower.results_after(last, limit, node=node) == expected, (node, limit, last)
                last, seen = expected[-1].id, seen + len(expected)
            assert await follower.results_after(last, limit, node=node) == []
            assert seen == {None: 12, "n1": 8, "n2": 4}[node]


async def test_sink_cursors_park_and_redeliver(store: Store) -> None:
    await ingest(store, count=4, invalid_lines=[1, 2, 3, 4])
    results = await store.results_after(0, 10)
    ids = [r.id for r in results]
    assert await store.sink_cursor("hook") == 0
    await store.advance_cursor("hook", ids[0])
    assert await store.sink_cursor("hook") == ids[0]
    await store.park("hook", ids[1:3], "HTTP 500", advance_to=ids[2])
    assert await store.sink_cursor("hook") == ids[2]
    assert await store.to_redeliver("hook", 10) == []  # parked, not yet asked for
    assert await store.request_redelivery("other-sink") == 0
    assert await store.request_redelivery("hook") == 2
    assert [r.id for r in await store.to_redeliver("hook", 10)] == ids[1:3]
    await store.unpark("hook", [ids[1]])
    assert [r.id for r in await store.to_redeliver("hook", 10)] == [ids[2]]
    assert await store.sink_cursor("never-used") == 0


async def test_a_sink_lease_is_held_by_one_node_until_it_expires(store: Store, second_node: Store) -> None:
    now = time.time()
    assert await store.take_sink_lease("hook", 10, now) is True
    assert await second_node.take_sink_lease("hook", 10, now + 1) is False
    assert await store.take_sink_lease("hook", 10, now + 5) is True  # renewed until now + 15
    assert await second_node.take_sink_lease("hook", 10, now + 12) is False
    assert await second_node.take_sink_lease("hook", 10, now + 16) is True
    assert await store.take_sink_lease("hook", 10, now + 17) is False
    # Leases are per sink.
    assert await store.take_sink_lease("other", 10, now + 17) is True


async def test_outbox_progress_and_completion_are_per_node(store: Store, second_node: Store) -> None:
    mine = await ingest(store, "m.jsonl", 3, invalid_lines=[1, 2, 3])
    theirs = await ingest(second_node, "t.jsonl", 1, invalid_lines=[1])
    mine_results = await store.results_after(0, 10, node="n1")
    await store.outbox_delivered("outbox:n1", mine_results[1].id, {mine.id: (2, 120)})
    assert await store.sink_cursor("outbox:n1") == mine_results[1].id
    assert await store.sink_cursor("outbox:n2") == 0
    progress = await store.file(mine.id)
    assert progress is not None and (progress.delivered, progress.out_bytes) == (2, 120)
    delivered = await store.delivered_payloads(mine.id, 0, 10)
    assert delivered == [(r.id, r.payload) for r in mine_results[:2]]
    assert await store.delivered_payloads(mine.id, mine_results[0].id, 10) == delivered[1:]
    await store.outbox_delivered("outbox:n1", mine_results[2].id, {mine.id: (1, 180)})
    assert [f.id for f in await store.open_files()] == [mine.id]
    await store.complete_file(mine.id)
    assert await store.open_files() == []
    assert [f.id for f in await second_node.open_files()] == [theirs.id]
    rows = await store.files_by_id([mine.id, theirs.id, 10**9])
    assert set(rows) == {mine.id, theirs.id}
    assert (rows[mine.id].state, rows[mine.id].delivered, rows[mine.id].out_bytes) == ("complete", 3, 180)
    assert rows[theirs.id].state == FileState.OPEN
    assert await store.files_by_id([]) == {}


# -- reporting ------------------------------------------------------------------------------------


async def _reported(store: Store) -> float:
    """Two files, one succeeded request with tokens and cost, one invalid line; returns a time before them."""
    since = time.time() - 1
    await ingest(store, "r.jsonl", 2, invalid_lines=[2])
    batch = await submitted_batch(store)
    [item] = await store.submitted_items(batch.id)
    await store.record_outcomes(batch.id, [final(item, tokens=10, cost=0.25)], [])
    return since


@pytest.mark.parametrize("by", ["model", "provider", "day", "file"])
async def test_report_counts_requests_tokens_and_cost_by_each_key(store: Store, by: str) -> None:
    since = await _reported(store)
    rows = await store.report(since, by)
    assert sum(int(r["requests"]) for r in rows) == 2
    assert sum(int(r["succeeded"]) for r in rows) == 1
    assert sum(int(r["input_tokens"]) for r in rows) == 10
    assert sum(int(r["output_tokens"]) for r in rows) == 10
    assert sum(float(r["cost_batch"] or 0) for r in rows) == pytest.approx(0.25)
    keys = [r["key"] for r in rows]
    if by == "file":
        assert keys == ["r.jsonl"]
    if by == "model":
        assert "gpt-4o-mini" in keys
    assert await store.report(time.time() + 60, by) == []


async def test_query_results_filters_by_file_custom_id_and_status(store: Store) -> None:
    await _reported(store)
    everything = await store.query_results(None, None, None, 10)
    assert [(r["file"], r["line"]) for r in everything] == [("r.jsonl", 2), ("r.jsonl", 1)]
    assert [r["line"] for r in await store.query_results(None, None, "succeeded", 10)] == [1]
    assert [r["line"] for r in await store.query_results(None, "c1", None, 10)] == [1]
    assert await store.query_results("other.jsonl", None, None, 10) == []
    assert len(await store.query_results(None, None, None, 1)) == 1


async def test_status_shows_queue_batches_files_and_errors(store: Store) -> None:
    await ingest(store, count=3)
    await submitted_batch(store, max_requests=1)
    await store.add_error("batch.submit_failed", "HTTP 500")
    status = await store.status()
    assert {"queue", "batches", "results", "files", "holds", "sinks", "errors"} <= set(status)
    assert [(q["queued"], q["submitted"]) for q in status["queue"]] == [(2, 1)]
    assert len(status["batches"]) == 1
    assert status["errors"][0]["event"] == "batch.submit_failed"


async def test_recent_errors_are_bounded(store: Store) -> None:
    for n in range(230):
        await store.add_error("test.error", f"error {n}")
    errors = (await store.status(errors=1000))["errors"]
    assert 10 <= len(errors) <= 200
    assert errors[0]["message"] == "error 229"


async def test_the_instance_id_is_one_per_database(store: Store, second_node: Store) -> None:
    instance = await store.instance_id()
    assert instance and instance == await second_node.instance_id()


async def test_a_cursor_following_results_after_never_skips_a_row(store: Store, second_node: Store) -> None:
    """Results committed concurrently by two nodes reach a reader that only keeps "last id seen"."""
    files = 8
    for n in range(files):
        await ingest(store if n % 2 else second_node, f"w{n}.jsonl", 20, model=f"w{n}")
    batches = [
        (node, await submitted_batch(node, model=f"w{n}")) for n, node in enumerate([second_node, store] * (files // 2))
    ]
    writers_done = asyncio.Event()
    seen: list[int] = []

    async def reader() -> None:
        last = 0
        while True:
            finished = writers_done.is_set()  # read once more after the last commit
            rows = await store.results_after(last, 7)
            seen.extend(r.id for r in rows)
            if rows:
                last = rows[-1].id
            elif finished:
                return
            else:
                await loop_ticks()  # a writer commits between reads; no condition to wait on

    async def writer(node: Store, batch_id: int) -> None:
        items = await node.submitted_items(batch_id)
        for start in range(0, len(items), 3):  # several small transactions per batch, interleaved
            await node.record_outcomes(batch_id, [final(i) for i in items[start : start + 3]], [])

    reading = asyncio.create_task(reader())
    await asyncio.gather(*(writer(node, batch.id) for node, batch in batches))
    writers_done.set()
    await reading
    everything = [r.id for r in await store.results_after(0, 10_000)]
    assert len(everything) == files * 20
    assert seen == everything, "the cursor skipped or repeated a row"


async def test_metrics_aggregates_queue_batches_results_and_capacity(store: Store) -> None:
    """The /metrics read model: the same plain numbers from both engines."""
    empty = await store.metrics()
    assert set(empty) == {*METRICS_READS, "sinks"}
    assert empty["ingested"] == [{"files": 0, "lines": 0}]
    await ingest(store, "m.jsonl", 4, invalid_lines=[4], tokens=7)
    batch = await submitted_batch(store, max_requests=2)
    items = await store.submitted_items(batch.id)
    # One request succeeds with a cost, one goes back to the queue for a retry.
    await store.record_outcomes(batch.id, [final(items[0], tokens=10, cost=0.25)], [retry(items[1], 0.0)])
    await store.finish_batch(batch.id)
    metrics = await store.metrics()
    assert [(r["profile"], r["model"], r["queued"]) for r in metrics["queue"]] == [("openai", "gpt-4o-mini", 2)]
    assert isinstance(metrics["queue"][0]["oldest"], float)
    results = {r["status"]: r for r in metrics["results"]}
    assert set(results) == {"succeeded", "invalid"}
    assert (results["succeeded"]["n"], results["succeeded"]["collected"]) == (1, 1)
    assert results["succeeded"]["cost_batch"] == pytest.approx(0.25)
    assert results["succeeded"]["cost_realtime"] == pytest.approx(0.5)
    assert (results["succeeded"]["input_tokens"], results["succeeded"]["output_tokens"]) == (10, 10)
    assert (results["invalid"]["n"], results["invalid"]["collected"]) == (1, 0)
    assert [(r["state"], r["status"], r["n"]) for r in metrics["batches"]] == [("done", "validating", 1)]
    assert len(metrics["turnaround"]) == 1 and metrics["turnaround"][0]["seconds"] >= 0
    assert metrics["ingested"] == [{"files": 1, "lines": 4}]
    assert metrics["capacity"] == []
    await submitted_batch(store)  # the retried request goes out a second time, with the third
    metrics = await store.metrics()
    assert metrics["queue"] == []
    assert [(r["batches"], r["requests"], r["tokens"]) for r in metrics["capacity"]] == [(1, 2, 14)]
    assert sum(int(r["retries"]) for r in metrics["retries"]) == 1


async def test_request_poll_marks_a_polled_batch_for_its_lease_holder(store: Store, second_node: Store) -> None:
    await ingest(store, count=2)
    batch = await submitted_batch(store)
    await second_node.request_poll(batch.id, 1234.5)  # a webhook reached the node without the lease
    [owned] = await store.owned_batches(BatchState.SUBMITTED)
    assert owned.poll_requested_at == 1234.5
    await second_node.request_poll(batch.id, 1300.0)
    assert (await store.batch(batch.id)).poll_requested_at == 1300.0  # type: ignore[union-attr]
    await succeed_all(store, batch)
    await store.finish_batch(batch.id)
    await second_node.request_poll(batch.id, 1400.0)  # done: nothing to poll any more
    assert (await store.batch(batch.id)).poll_requested_at == 1300.0  # type: ignore[union-attr]


async def test_status_counts_every_state_change_on_a_large_queue(store: Store) -> None:
    """The queue counts stay exact through ingest, claim, submit, finals, retries, refunds and unclaims.

    SQLite keeps them in a counter table (migration 008) instead of counting the queue; this
    checks the counter against what every step did, on both engines.
    """
    for model, count in (("m-a", 3000), ("m-b", 2000), ("m-c", 500)):
        await ingest(store, f"{model}.jsonl", count=count, chunk_lines=700, model=model)
    now = time.time()
    first = await submitted_batch(store, max_requests=1200, now=now, model="m-a")
    second = await submitted_batch(store, max_requests=800, now=now, model="m-b")
    pending = await claim(store, max_requests=100, now=now, model="m-c")
    items = await store.submitted_items(first.id)
    # 1000 finish, 200 go back to the queue with a backoff; the second batch is refunded whole.
    await store.record_outcomes(
        first.id, [final(i) for i in items[:1000]], [retry(i, now + 3600) for i in items[1000:]]
    )
    await store.refund_batch(second.id, now + 3600, "token_limit_exceeded")
    status = await store.status()
    queue = {q["model"]: (q["queued"], q["batched"], q["submitted"]) for q in status["queue"]}
    assert queue == {"m-a": (1800 + 200, 0, 0), "m-b": (2000, 0, 0), "m-c": (400, pending.requests, 0)}
    assert pending.requests == 100
    assert status["results"] == {"succeeded": 1000}
