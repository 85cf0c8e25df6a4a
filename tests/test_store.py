"""Store tier: real SQLite in tmp_path; claiming, limits, idempotent outcomes, delivery bookkeeping."""

from __future__ import annotations

import asyncio
import contextlib
import os
import sqlite3
import stat
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest

from batchd.exits import OperatorError
from batchd.formats import Outcome, Status, provider_custom_id
from batchd.policy import RetryAt, decide, hold_pause, index_outcomes, refund_error, unanswered
from batchd.spool import Spool
from batchd.store import (
    LIVE_BATCH_STATES,
    SCHEMA_VERSION,
    ApplySummary,
    BatchRow,
    BatchState,
    Chunk,
    FileKey,
    FileState,
    FinalResult,
    Group,
    NewItem,
    NewResult,
    Retry,
    SQLiteStore,
    Store,
    open_store,
)
from batchd.store.contract import DuplicateCustomId

from .conftest import loop_ticks, make_settings, wait_until
from .test_acceptance import chat_line


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[SQLiteStore]:
    # The path make_settings(tmp_path) derives `[store] url` from, so a Spool on tmp_path shares it.
    opened = open_store(f"sqlite:///{tmp_path / 'state' / 'batchd.sqlite3'}", "test-node")
    assert isinstance(opened, SQLiteStore)
    await opened.open()
    try:
        yield opened
    finally:
        await opened.close()


async def queue(store: Store, count: int, size: int = 100, name: str = "f.jsonl") -> int:
    """A whole file of `count` queued lines through the intake (one chunk); returns its file id."""
    row = await store.begin_file(FileKey(name, f"sha-{name}", count * size, 1, 1), lambda out_name: False)
    items = [
        NewItem(n, f"c{n}", "openai", "/v1/chat/completions", "gpt-4o-mini", b'{"model":"gpt-4o-mini"}', size)
        for n in range(1, count + 1)
    ]
    assert await store.add_chunk(row.id, Chunk(1, count, count * size, items, []))
    await store.finish_file(row.id, count)
    return row.id


# What the poller does with outcomes (batchd/poller.py _apply, _record, _end_unanswered): policy
# decides (batchd/policy.py), the store only records.


async def apply_outcomes(
    store: Store, batch: BatchRow, outcomes: list[Outcome], max_attempts: int, retry_at: RetryAt
) -> ApplySummary:
    by_item, foreign = index_outcomes(outcomes, await store.instance_id())
    waiting = await store.submitted_items(batch.id, list(by_item))
    finals, retries, ignored = decide(batch, waiting, by_item, max_attempts=max_attempts, retry_at=retry_at)
    summary = await store.record_outcomes(batch.id, finals, retries)
    return summary + ApplySummary(ignored=foreign + ignored)


async def end_unanswered(
    store: Store, batch: BatchRow, status: Status, error: Any, max_attempts: int, retry_at: RetryAt
) -> ApplySummary:
    waiting = await store.submitted_items(batch.id)
    by_item = unanswered(waiting, status, error)
    finals, retries, ignored = decide(batch, waiting, by_item, max_attempts=max_attempts, retry_at=retry_at)
    return await store.record_outcomes(batch.id, finals, retries) + ApplySummary(ignored=ignored)


async def test_database_is_private_and_migrated(store: SQLiteStore) -> None:
    mode = stat.S_IMODE(os.stat(store.path).st_mode)
    assert mode == 0o600
    assert await store.integrity_check() == "ok"
    assert len(await store.instance_id()) == 32


async def test_commits_reach_the_database_file_through_the_checkpointer_not_the_writer(
    store: SQLiteStore, tmp_path: Path
) -> None:
    # The writer's own autocheckpoint is a backstop far above these few pages, so the items can
    # only reach the main file (a copy of it alone, without its WAL) by the checkpointer's connection.
    await queue(store, 50)

    def items_in_the_main_file() -> int:
        copy = tmp_path / "main-file-only.sqlite3"
        copy.write_bytes(store.path.read_bytes())
        try:
            with contextlib.closing(sqlite3.connect(copy)) as db:
                return int(db.execute("SELECT COUNT(*) FROM items").fetchone()[0])
        except sqlite3.Error:
            return 0  # the main file does not hold the schema yet either
        finally:
            for leftover in tmp_path.glob("main-file-only.sqlite3*"):
                leftover.unlink()

    assert await wait_until(lambda: items_in_the_main_file() == 50, timeout=10)


async def test_the_wal_file_is_cut_back_to_nothing_once_writing_stops(tmp_path: Path) -> None:
    quiet = SQLiteStore(tmp_path / "quiet.sqlite3", "n1", checkpoint_quiet=0.2)
    await quiet.open()
    try:
        await queue(quiet, 200)
        wal = quiet.path.with_name(quiet.path.name + "-wal")
        assert wal.stat().st_size > 0
        assert await wait_until(lambda: wal.stat().st_size == 0, timeout=10)
        # And it is used again from its start by the next write, which reads back as usual.
        await queue(quiet, 5, name="g.jsonl")
        [group] = await quiet.queued_groups(time.time())
        assert group.count == 205
    finally:
        await quiet.close()


@pytest.mark.parametrize("ticks", range(6))
async def test_a_store_closes_when_a_write_lands_as_its_checkpointer_waits_out_the_quiet(
    tmp_path: Path, ticks: int
) -> None:
    # The daemon's stop: its last write (release_leases) wakes the checkpointer's quiet wait, and
    # close() cancels it a few loop turns later. asyncio.wait_for in Python 3.11 swallowed that
    # cancellation when the wait had just ended, and close() waited for the task for ever.
    quiet = SQLiteStore(tmp_path / "quiet.sqlite3", "n1", checkpoint_interval=0.01, checkpoint_quiet=60)
    await quiet.open()
    await queue(quiet, 3)
    checkpointer = quiet._checkpointer
    assert checkpointer is not None
    # Copied, then waiting out the quiet: the only wait on the event until 60 s pass.
    await wait_until(lambda: bool(checkpointer._wrote._waiters), timeout=10, interval=0.01)  # type: ignore[attr-defined]
    checkpointer.wrote()  # what the last commit does
    await loop_ticks(ticks)
    await asyncio.wait_for(quiet.close(), 10)


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
    instance = await store.instance_id()
    outcomes = [
        Outcome(provider_custom_id(item_ids[0], instance), "succeeded", {"ok": 1}, None, {"input_tokens": 3}, False),
        Outcome(provider_custom_id(item_ids[1], instance), "errored", None, {"message": "overloaded"}, None, True),
        Outcome("someone-elses-id", "succeeded", None, None, None, False),
    ]
    summary = await apply_outcomes(store, batch, outcomes, max_attempts=2, retry_at=now)
    assert (summary.final, summary.requeued, summary.ignored) == (1, 1, 1)
    again = await apply_outcomes(store, batch, outcomes, max_attempts=2, retry_at=now)
    assert (again.final, again.requeued, again.ignored) == (0, 0, 3)
    leftover = await end_unanswered(store, batch, "errored", {"message": "no line"}, 2, now)
    assert (leftover.final, leftover.requeued) == (0, 1)
    results = await store.results_after(0, 10)
    assert [r.file_id for r in results] == [file_id]

    # Second attempt: the two requeued items fail again and, at max_attempts, become final.
    [group] = await store.queued_groups(now)
    retry = await store.claim_batch(group, "openai", 100, 10**9, now)
    assert retry is not None and retry.requests == 2
    await store.mark_submitted(retry.id, "batch_retry", "validating", now)
    retry = await store.batch(retry.id)
    assert retry is not None
    final = await end_unanswered(store, retry, "expired", None, 2, now)
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
        # What the poller does for a batch the provider never ran (refund_error + refund_batch).
        assert await store.refund_batch(batch.id, now, refund_error("errored", None)) == 2
    # Three submissions refunded: the fourth is still each item's first attempt, so with
    # max_attempts=2 a retryable failure goes back to the queue instead of ending the item.
    [group] = await store.queued_groups(now)
    batch = await store.claim_batch(group, "openai", 100, 10**9, now)
    assert batch is not None
    await store.mark_submitted(batch.id, f"batch_{batch.id}", "validating", now)
    batch = await store.batch(batch.id)
    assert batch is not None
    assert [i.attempts for i in await store.submitted_items(batch.id)] == [1, 1]
    summary = await end_unanswered(store, batch, "errored", None, max_attempts=2, retry_at=now)
    assert (summary.final, summary.requeued) == (0, 2)


async def test_hold_doubles_and_releases(store: Store) -> None:
    async def hold_backoff() -> float:
        # What the poller does on a token-limit failure: policy picks the pause, the store records the hold.
        failures = await store.hold_failures("openai", "gpt-4o-mini") + 1
        pause = hold_pause(failures, base=10, ceiling=1000)
        await store.hold("openai", "gpt-4o-mini", time.time() + pause, failures, "token_limit_exceeded")
        return pause

    first = await hold_backoff()
    second = await hold_backoff()
    assert (first, second) == (10, 20)
    assert await store.hold_failures("openai", "gpt-4o-mini") == 2
    assert ("openai", "gpt-4o-mini") in await store.active_holds(time.time())
    await store.release_hold("openai", "gpt-4o-mini")
    assert await store.active_holds(time.time()) == {}
    assert await hold_backoff() == 10  # a release ends the run of consecutive failures


async def test_duplicate_custom_ids_become_invalid_at_ingest(store: Store, tmp_path: Path) -> None:
    # Duplicates are caught by the spool's chunk path (Spool._dedupe over store.seen_custom_ids), the
    # first line winning. Across chunks (and after a resumed ingest): tests/test_spool.py
    # test_an_ingest_cut_short_resumes_after_its_last_chunk_and_catches_duplicates_across_chunks.
    spool = Spool(make_settings(tmp_path, None), store, on_ingest=lambda: None)
    spool.paths.create()
    lines = []
    for n in (1, 2, 3, 4):
        line = chat_line(n)
        line["custom_id"] = "same" if n != 2 else "other"
        lines.append(orjson.dumps(line) + b"\n")
    (spool.paths.new / "dup.jsonl").write_bytes(b"".join(lines))
    ingest = await spool.ingest("dup.jsonl")
    assert ingest is not None
    assert (ingest.lines, ingest.queued, ingest.invalid) == (4, 2, 2)
    results = await store.results_after(0, 10)
    assert sorted(r.payload.count(b"duplicate custom_id") for r in results) == [1, 1]
    assert sorted(orjson.loads(r.payload)["line"] for r in results) == [3, 4]  # the first "same" (line 1) won
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


async def test_a_reader_beside_a_migrating_daemon_sees_the_old_schema_or_the_new_never_one_between(
    tmp_path: Path,
) -> None:
    # Found by the suite: `batchd status` read a database the starting daemon had migrated half way
    # (version 3 of 6) and told the operator to start the daemon. Migrations now commit as one.
    import sqlite3
    import threading
    from importlib import resources

    from batchd.store import SCHEMA_VERSION

    path = tmp_path / "old.sqlite3"
    old = sqlite3.connect(path, isolation_level=None)
    old.execute("PRAGMA journal_mode=WAL")
    for entry in sorted(resources.files("batchd.store").joinpath("sqlite_migrations").iterdir(), key=lambda e: e.name):
        if entry.name.endswith(".sql") and int(entry.name[:3]) <= 3:
            old.executescript(entry.read_text())
    old.execute("PRAGMA user_version=3")
    old.executemany(
        "INSERT INTO files (name, sha256, size, out_name, ingested_at, state) VALUES (?, ?, 1, ?, 0, 'complete')",
        [(f"f{n}.jsonl", f"{n:064x}", f"f{n}.results.jsonl") for n in range(20_000)],
    )
    old.close()
    seen: set[int] = set()
    done = threading.Event()

    def watch() -> None:
        reader = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
        while not done.is_set():
            seen.add(reader.execute("PRAGMA user_version").fetchone()[0])
        reader.close()

    watcher = threading.Thread(target=watch)
    watcher.start()
    store = SQLiteStore(path, "test-node")
    try:
        await store.open()
    finally:
        done.set()
        watcher.join()
        await store.close()
    assert seen <= {3, SCHEMA_VERSION}, seen


async def test_a_database_file_without_a_schema_yet_reads_as_no_database(tmp_path: Path) -> None:
    path = tmp_path / "new.sqlite3"
    path.touch()
    async with SQLiteStore.existing(path) as store:
        assert store is None


# -- the SQLite engine of the contract (issue 10) ---------------------------------------------------


def key(name: str = "f.jsonl", ino: int = 7) -> FileKey:
    return FileKey(name=name, sha256=f"sha-{name}", size=1000, dev=1, ino=ino)


def chunk(first: int, last: int, prefix: str = "c") -> Chunk:
    """Lines first..last, every third one invalid."""
    items = [
        NewItem(n, f"{prefix}{n}", "openai", "/v1/chat/completions", "gpt-4o-mini", b'{"n":%d}' % n, 10, tokens=5)
        for n in range(first, last + 1)
        if n % 3
    ]
    invalid = [NewResult(n, "invalid", b'{"line":%d}' % n) for n in range(first, last + 1) if not n % 3]
    return Chunk(first, last, last * 10, items, invalid)


def rows(path: Path, sql: str, params: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    with contextlib.closing(sqlite3.connect(path, timeout=10)) as db:
        return db.execute(sql, params).fetchall()


@pytest.fixture
async def node_a(tmp_path: Path) -> AsyncIterator[SQLiteStore]:
    opened = open_store(f"sqlite:///{tmp_path / 'shared.sqlite3'}", "node-a")
    assert isinstance(opened, SQLiteStore)
    await opened.open()
    try:
        yield opened
    finally:
        await opened.close()


async def test_open_store_picks_the_sqlite_engine_and_a_reader_never_creates(tmp_path: Path) -> None:
    path = tmp_path / "state" / "batchd.sqlite3"
    reader = open_store(f"sqlite:///{path}", "n1", readonly=True)
    with pytest.raises(OperatorError):
        await reader.open()  # readonly: open_existing, which never creates
    assert not path.exists()
    writer = open_store(f"sqlite:///{path}", "n1")
    await writer.open()
    try:
        assert writer.node == "n1" and isinstance(writer, SQLiteStore)
        reader = open_store(f"sqlite:///{path}", "n1", readonly=True)
        await reader.open()
        try:
            assert await reader.instance_id() == await writer.instance_id()
        finally:
            await reader.close()
        assert await writer.migrate() == (SCHEMA_VERSION, SCHEMA_VERSION)
    finally:
        await writer.close()


async def test_chunked_ingest_resumes_after_a_crash_and_never_commits_a_chunk_twice(tmp_path: Path) -> None:
    path = tmp_path / "shared.sqlite3"
    first = SQLiteStore(path, "node-a")
    await first.open()
    row = await first.begin_file(key(), lambda name: False)
    assert (row.state, row.lines_committed, row.out_name) == (FileState.INGESTING, 0, "f.results.jsonl")
    assert await first.add_chunk(row.id, chunk(1, 10))
    assert await first.seen_custom_ids(row.id, ["c1", "c2", "c3", "zzz"]) == {"c1", "c2"}  # c3 was invalid
    # "Crash": the process is gone without closing; a new store object opens the same file.
    again = SQLiteStore(path, "node-a")
    await again.open()
    try:
        found = await again.find_file(key())
        assert found is not None and found.id == row.id
        assert (found.state, found.lines_committed, found.offset_committed) == (FileState.INGESTING, 10, 100)
        assert not await again.add_chunk(row.id, chunk(1, 10))  # already committed: nothing changes
        assert not await again.add_chunk(row.id, chunk(12, 20))  # a gap is refused too
        assert await again.add_chunk(row.id, chunk(11, 20))
        assert not await again.add_chunk(row.id, chunk(11, 20))
        # The outbox never completes a file whose ingest is unfinished.
        await again.complete_file(row.id)
        assert (await again.file(row.id)).state == FileState.INGESTING  # type: ignore[union-attr]
        await again.finish_file(row.id, 20)
        await again.finish_file(row.id, 20)  # idempotent
        done = await again.file(row.id)
        assert done is not None and (done.state, done.lines, done.lines_committed) == (FileState.OPEN, 20, 20)
        assert not await again.add_chunk(row.id, chunk(21, 22))  # an OPEN file takes no more chunks
        lines = rows(path, "SELECT line FROM items WHERE file_id = ? UNION ALL SELECT line FROM results", (row.id,))
        assert sorted(line for (line,) in lines) == list(range(1, 21))  # no line lost or duplicated
        assert rows(path, "SELECT COUNT(*) FROM item_bodies")[0][0] == 14
        # UNIQUE(file_id, custom_id) is the backstop behind seen_custom_ids.
        other = await again.begin_file(key("g.jsonl", 8), lambda name: False)
        assert await again.add_chunk(other.id, chunk(1, 2))
        duplicate = NewItem(3, "c1", "openai", "/v1/chat/completions", "gpt-4o-mini", b"{}", 2)
        with pytest.raises(DuplicateCustomId):
            await again.add_chunk(other.id, Chunk(3, 3, 30, [duplicate], []))
        assert (await again.file(other.id)).lines_committed == 2  # type: ignore[union-attr]
    finally:
        await again.close()
        await first.close()


async def test_a_read_does_not_wait_for_a_held_write_transaction(node_a: SQLiteStore) -> None:
    row = await node_a.begin_file(key(), lambda name: False)
    assert await node_a.add_chunk(row.id, chunk(1, 6))
    holding, release = asyncio.Event(), asyncio.Event()

    async def long_write() -> None:
        async with node_a._tx() as db:  # what a long ingest chunk or claim looks like to others
            await db.execute("UPDATE files SET delivered = delivered WHERE id = ?", (row.id,))
            holding.set()
            await release.wait()

    writer = asyncio.create_task(long_write())
    try:
        await asyncio.wait_for(holding.wait(), 10)
        # Every read a poller, a sink or `status` makes answers while the writer is held.
        reads = asyncio.gather(
            node_a.queued_groups(time.time()),
            node_a.results_after(0, 100, node="node-a"),
            node_a.open_files(),
            node_a.batches_in_state(*LIVE_BATCH_STATES),
            node_a.status(),
            node_a.usage("openai"),
        )
        groups, results, files, _, status, usage = await asyncio.wait_for(reads, 5)
        assert groups[0].count == 4 and len(results) == 2 and files[0].id == row.id
        assert status["results"] == {"invalid": 2} and usage.in_flight_batches == 0
        assert not writer.done()
    finally:
        release.set()
        await writer


def _tick_counts(deadline: float = 120.0) -> Iterator[int]:
    """Loop-turn counts to cancel a write after: every count up to 200, then growing by a fifth.

    A write's awaits wait on the store's thread, which may take any number of loop turns on a
    slow disk (a CI machine's fsync took longer than 400 turns), so the counts grow until the
    write finishes; the deadline is the only bound in time.
    """
    ends = time.monotonic() + deadline
    ticks = 0
    while time.monotonic() < ends:
        yield ticks
        ticks = ticks + 1 if ticks < 200 else ticks * 6 // 5


async def _cancelled_after(work: Any, ticks: int) -> bool:
    """Run `work`, cancel it after `ticks` loop iterations; whether it had already finished."""
    task = asyncio.ensure_future(work)
    await loop_ticks(ticks)
    finished = task.done()
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
    return finished


async def _slow_disk(store: SQLiteStore) -> None:
    """Make every statement of the store's writer take milliseconds, as on a slow CI disk."""
    await store._conn.set_progress_handler(lambda: time.sleep(0.001), 200)  # type: ignore[func-returns-value]


@pytest.mark.parametrize("slow", [False, True], ids=["fast", "slow_disk"])
async def test_cancellation_at_every_await_of_a_write_leaves_it_whole_and_the_store_usable(
    node_a: SQLiteStore, tmp_path: Path, slow: bool
) -> None:
    path = tmp_path / "shared.sqlite3"
    if slow:
        await _slow_disk(node_a)
    seen_applied = seen_not_applied = False
    for ticks in _tick_counts():
        row = await node_a.begin_file(key(f"f{ticks}.jsonl", ticks), lambda name: False)
        finished = await _cancelled_after(node_a.add_chunk(row.id, chunk(1, 30)), ticks)
        assert node_a._conn.in_transaction is False
        (committed,) = rows(path, "SELECT lines_committed FROM files WHERE id = ?", (row.id,))[0]
        (items,) = rows(path, "SELECT COUNT(*) FROM items WHERE file_id = ?", (row.id,))[0]
        (results,) = rows(path, "SELECT COUNT(*) FROM results WHERE file_id = ?", (row.id,))[0]
        assert (committed, items, results) in ((0, 0, 0), (30, 20, 10)), ticks
        seen_applied |= committed == 30
        seen_not_applied |= committed == 0
        # The store is usable at once: the next write goes through, and the chunk can be repeated.
        assert await node_a.add_chunk(row.id, chunk(1, 30)) == (committed == 0)
        await node_a.add_error("test.after_cancel", str(ticks))
        if finished:
            break
    else:
        raise AssertionError("the write never finished before the deadline")
    # A cancellation is delivered only after the transaction ends, so a cancelled call still applied.
    assert seen_applied and seen_not_applied


@pytest.mark.parametrize("slow", [False, True], ids=["fast", "slow_disk"])
async def test_cancelled_claims_and_outcomes_are_whole(node_a: SQLiteStore, tmp_path: Path, slow: bool) -> None:
    path = tmp_path / "shared.sqlite3"
    if slow:
        await _slow_disk(node_a)
    row = await node_a.begin_file(key(), lambda name: False)
    assert await node_a.add_chunk(row.id, chunk(1, 30))
    for ticks in _tick_counts():
        now = time.time()
        groups = await node_a.queued_groups(now)
        if not groups:
            break
        await _cancelled_after(node_a.claim_batch(groups[0], "openai", 3, 10**9, now), ticks)
        # A claim is whole: its batch row and its items agree (or neither exists).
        for batch_id, requests in rows(path, "SELECT id, requests FROM batches"):
            (claimed,) = rows(path, "SELECT COUNT(*) FROM items WHERE batch_id = ?", (batch_id,))[0]
            assert claimed == requests and requests in (2, 3)
    else:
        raise AssertionError("the claims never took the whole queue before the deadline")
    assert rows(path, "SELECT COUNT(*) FROM items WHERE batch_id IS NULL") == [(0,)]
    assert node_a._conn.in_transaction is False
    await node_a.add_error("test.after_cancel", "ok")


async def test_migration_005_to_007_keeps_old_rows_and_the_first_node_takes_them(tmp_path: Path) -> None:
    path = tmp_path / "old.sqlite3"
    migrations = Path(__file__).parent.parent / "batchd" / "store" / "sqlite_migrations"
    with contextlib.closing(sqlite3.connect(path)) as db:
        for script in sorted(migrations.glob("00[1-5]_*.sql")):
            db.executescript(script.read_text())
        db.execute("PRAGMA user_version = 5")
        db.executescript(
            """
            INSERT INTO meta (key, value) VALUES ('instance', 'abc');
            INSERT INTO files (id, name, sha256, size, out_name, lines, delivered, out_bytes, state, ingested_at,
                dev, ino) VALUES (1, 'a.jsonl', 'h1', 300, 'a.results.jsonl', 3, 1, 40, 'open', 1, 5, 6),
                (2, 'b.jsonl', 'h2', 100, 'b.results.jsonl', 1, 1, 20, 'complete', 1, 5, 7);
            INSERT INTO batches (id, profile, kind, endpoint, model, state, remote_id, requests, created_at)
                VALUES (1, 'openai', 'openai', '/v1/chat/completions', 'm', 'submitted', 'batch_1', 2, 1);
            INSERT INTO items (id, file_id, line, custom_id, profile, endpoint, model, size, state, batch_id,
                queued_at, attempts) VALUES (1, 1, 2, 'x2', 'openai', '/v1/chat/completions', 'm', 10, 'submitted', 1,
                1, 1), (2, 1, 3, 'x3', 'openai', '/v1/chat/completions', 'm', 10, 'submitted', 1, 1, 1);
            INSERT INTO item_bodies (item_id, body) VALUES (1, CAST('b1' AS BLOB)), (2, CAST('b2' AS BLOB));
            INSERT INTO results (id, file_id, line, status, payload, created_at) VALUES
                (1, 1, 1, 'invalid', CAST('r1' AS BLOB), 1), (2, 2, 1, 'invalid', CAST('r2' AS BLOB), 1);
            INSERT INTO sink_cursors (sink, last_result_id) VALUES ('outbox', 2), ('crm', 1);
            """
        )
        db.commit()
    store = SQLiteStore(path, "node-a")
    await store.open()
    other = SQLiteStore(path, "node-b")
    await other.open()
    try:
        assert rows(path, "PRAGMA user_version")[0][0] == SCHEMA_VERSION
        assert await store.instance_id() == "abc"
        [open_file] = await store.open_files()
        assert (open_file.id, open_file.node, open_file.state, open_file.lines, open_file.lines_committed) == (
            1,
            "node-a",
            FileState.OPEN,
            3,
            3,
        )
        assert (open_file.offset_committed, open_file.delivered, open_file.out_bytes, open_file.moved) == (
            300,
            1,
            40,
            False,
        )
        assert await other.open_files() == []  # the second node takes nothing
        assert await store.sink_cursor("outbox:node-a") == 2 and await store.sink_cursor("outbox") == 0
        assert await store.sink_cursor("crm") == 1
        assert [p for p, _ in await store.delivered_payloads(1, 0, 10)] == [1]
        assert [r.id for r in await store.results_after(0, 10, node="node-a")] == [1, 2]
        assert await store.results_after(0, 10, node="node-b") == []
        found = await store.find_file(FileKey("a.jsonl", "h1", 300, 5, 6))
        assert found is not None and found.id == 1
        # The live batch had no owner: the first node to look takes it over, and then owns it.
        [batch] = await store.batches_in_state(BatchState.SUBMITTED)
        assert batch.owner is None
        assert [b.id for b in await store.take_over(30, time.time())] == [1]
        assert [b.id for b in await store.owned_batches(*LIVE_BATCH_STATES)] == [1]
        assert await other.take_over(30, time.time()) == []
        items = await store.submitted_items(1)
        assert [(i.id, i.custom_id, i.attempts) for i in items] == [(1, "x2", 1), (2, "x3", 1)]
        assert [b for chunk_ in [c async for c in store.batch_bodies(1)] for _, _, b in chunk_] == [b"b1", b"b2"]
    finally:
        await other.close()
        await store.close()


async def test_nodes_own_their_files_names_batches_and_sink_leases(node_a: SQLiteStore, tmp_path: Path) -> None:
    node_b = SQLiteStore(tmp_path / "shared.sqlite3", "node-b")
    await node_b.open()
    try:
        mine = await node_a.begin_file(key("nightly.jsonl"), lambda name: False)
        theirs = await node_b.begin_file(key("nightly.jsonl"), lambda name: False)
        assert mine.out_name == theirs.out_name == "nightly.results.jsonl"  # names are per node
        assert (await node_a.find_file(key("nightly.jsonl"))).id == mine.id  # type: ignore[union-attr]
        assert (await node_b.find_file(key("nightly.jsonl"))).id == theirs.id  # type: ignore[union-attr]
        assert await node_a.add_chunk(mine.id, chunk(1, 3))
        assert await node_b.add_chunk(theirs.id, chunk(1, 3, prefix="d"))
        assert [r.file_id for r in await node_a.results_after(0, 10, node="node-a")] == [mine.id]
        assert [f.id for f in await node_b.open_files()] == [theirs.id]

        now = time.time()
        [group] = await node_a.queued_groups(now)
        batch = await node_a.claim_batch(group, "openai", 2, 10**9, now, lease_seconds=30)
        assert batch is not None and (batch.owner, batch.lease_until) == ("node-a", now + 30)
        assert (await node_a.usage("openai", "gpt-4o-mini", now)).enqueued_tokens == 10
        assert await node_b.take_over(30, now + 10) == []  # the lease holds
        assert await node_a.renew_leases(30, now + 20) == 1
        assert await node_b.take_over(30, now + 40) == []
        [taken] = await node_b.take_over(30, now + 51)  # node-a stopped renewing: node-b takes over
        assert taken.id == batch.id and taken.owner == "node-b"
        assert await node_a.owned_batches(*LIVE_BATCH_STATES) == []
        await node_b.release_leases()
        assert [b.id for b in await node_a.take_over(30, now + 52)] == [batch.id]  # released: at once

        assert await node_a.take_sink_lease("crm", 30, now)
        assert not await node_b.take_sink_lease("crm", 30, now + 10)
        assert await node_a.take_sink_lease("crm", 30, now + 20)  # renewed
        assert await node_b.take_sink_lease("crm", 30, now + 51)
        assert not await node_a.take_sink_lease("crm", 30, now + 52)
    finally:
        await node_b.close()


async def test_record_outcomes_records_only_and_is_idempotent(node_a: SQLiteStore) -> None:
    row = await node_a.begin_file(key(), lambda name: False)
    assert await node_a.add_chunk(row.id, chunk(1, 5))
    now = time.time()
    [group] = await node_a.queued_groups(now)
    batch = await node_a.claim_batch(group, "openai", 10, 10**9, now)
    assert batch is not None
    await node_a.mark_submitted(batch.id, "batch_x", "in_progress", now)
    waiting = await node_a.submitted_items(batch.id)
    assert [(i.line, i.attempts) for i in waiting] == [(1, 1), (2, 1), (4, 1), (5, 1)]
    first, second, third, _ = waiting
    later = now + 3600
    finals = [FinalResult(first.id, row.id, first.line, "succeeded", b'{"ok":1}', 3, 4, cost_batch=0.5)]
    retries = [Retry(second.id, later, "overloaded"), Retry(999_999, later, "not in this batch")]
    summary = await node_a.record_outcomes(batch.id, finals, retries)
    assert (summary.final, summary.requeued, summary.ignored) == (1, 1, 1)
    again = await node_a.record_outcomes(batch.id, finals, retries)
    assert (again.final, again.requeued, again.ignored) == (0, 0, 3)
    assert [i.id for i in await node_a.submitted_items(batch.id, [first.id, third.id])] == [third.id]
    assert await node_a.next_not_before(now) == later
    assert await node_a.refund_batch(batch.id, now, "never ran") == 2
    assert await node_a.refund_batch(batch.id, now, "never ran") == 0
    [result] = [r for r in await node_a.results_after(0, 10) if r.payload == b'{"ok":1}']
    assert result.file_id == row.id
    assert await node_a.report(0, "model") and (await node_a.report(0, "model"))[-1]["cost_batch"] == 0.5
    assert [r["line"] for r in await node_a.query_results("f.jsonl", None, "succeeded", 10)] == [1]


async def test_a_reader_during_creation_sees_no_database_not_an_old_schema(tmp_path: Path) -> None:
    """`batchd status` racing the daemon's first start: the file exists, no migration has committed."""
    path = tmp_path / "batchd.sqlite3"
    path.touch(mode=0o600)
    async with SQLiteStore.existing(path) as store:
        assert store is None
    # Migrations commit as one transaction, so a reader never sees a half-migrated version either.
    writer = SQLiteStore(path)
    await writer.open()
    await writer.close()
    assert rows(path, "PRAGMA user_version") == [(SCHEMA_VERSION,)]
    async with SQLiteStore.existing(path) as store:
        assert store is not None and store.node  # the database keeps its node (meta "node")
