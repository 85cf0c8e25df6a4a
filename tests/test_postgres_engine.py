"""PostgreSQL engine: what only several nodes on one real server can show.

Each test gets a schema of its own on BATCHD_TEST_POSTGRES_URL (dropped afterwards). Without a
server the tier skips loudly, unless BATCHD_REQUIRE_POSTGRES_TIER=1 (CI), which makes it fail.
The contract suite (tests/store/) checks that this engine behaves like the SQLite one; these tests
check what SQLite cannot have: concurrent nodes, leases, commit-ordered result ids, migrations
racing each other.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import secrets
import time
from collections.abc import AsyncIterator, Awaitable, Callable

import asyncpg
import pytest

from batchd.exits import EX_DATAERR, EX_IOERR, OperatorError
from batchd.store.contract import (
    BatchState,
    Chunk,
    FileKey,
    FileRow,
    FileState,
    FinalResult,
    Group,
    NewItem,
    NewResult,
    Retry,
)
from batchd.store.postgres import SCHEMA_VERSION, PostgresStore, redact

PG_URL = os.environ.get("BATCHD_TEST_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/test")
REQUIRED = os.environ.get("BATCHD_REQUIRE_POSTGRES_TIER") == "1"
ENDPOINT = "/v1/chat/completions"

MakeStore = Callable[[str], Awaitable[PostgresStore]]


def schema_url(schema: str) -> str:
    return f"{PG_URL}{'&' if '?' in PG_URL else '?'}schema={schema}"


async def _unavailable() -> str | None:
    try:
        conn = await asyncpg.connect(PG_URL, timeout=5)
    except Exception as exc:
        return f"{type(exc).__name__}: {exc}"
    await conn.close()
    return None


@pytest.fixture
async def schema() -> AsyncIterator[str]:
    reason = await _unavailable()
    if reason is not None:
        message = f"PostgreSQL tier NOT RUN: no server at {redact(PG_URL)} ({reason}); set BATCHD_TEST_POSTGRES_URL"
        if REQUIRED:
            pytest.fail(message + " (BATCHD_REQUIRE_POSTGRES_TIER=1 forbids skipping it)")
        pytest.skip(message)
    name = f"batchd_test_{secrets.token_hex(6)}"
    yield name
    conn = await asyncpg.connect(PG_URL)
    try:
        await conn.execute(f'DROP SCHEMA IF EXISTS "{name}" CASCADE')
    finally:
        await conn.close()


@pytest.fixture
async def make_store(schema: str) -> AsyncIterator[MakeStore]:
    opened: list[PostgresStore] = []

    async def make(node: str) -> PostgresStore:
        store = PostgresStore(schema_url(schema), node)
        await store.open()
        opened.append(store)
        return store

    yield make
    for store in opened:
        await store.close()


async def ingest(store: PostgresStore, name: str, lines: int, model: str = "m", chunk: int = 500) -> FileRow:
    """A file of `lines` valid requests, committed in chunks, finished."""
    key = FileKey(name, hashlib.sha256(name.encode()).hexdigest(), lines * 20, dev=1, ino=secrets.randbelow(2**40))
    row = await store.begin_file(key, lambda _name: False)
    for first in range(1, lines + 1, chunk):
        last = min(first + chunk - 1, lines)
        items = [
            NewItem(n, f"c{n}", "p", ENDPOINT, model, f'{{"n":{n}}}'.encode(), size=10, tokens=3)
            for n in range(first, last + 1)
        ]
        assert await store.add_chunk(row.id, Chunk(first, last, last * 20, items, []))
    await store.finish_file(row.id, lines)
    return row


async def group_of(store: PostgresStore, model: str = "m") -> Group | None:
    groups = [g for g in await store.queued_groups(time.time() + 1) if g.model == model]
    return groups[0] if groups else None


def final(item_id: int, file_id: int, line: int) -> FinalResult:
    payload = f'{{"custom_id":"c{line}","line":{line}}}'.encode()
    return FinalResult(item_id, file_id, line, "succeeded", payload, input_tokens=1, output_tokens=1)


async def test_one_item_round_trip(make_store: MakeStore) -> None:
    store = await make_store("a")
    key = FileKey("f.jsonl", "00" * 32, 40, dev=1, ino=7)
    row = await store.begin_file(key, lambda _name: False)
    assert (row.state, row.out_name, row.node) == (FileState.INGESTING, "f.results.jsonl", "a")
    invalid = NewResult(2, "invalid", b'{"custom_id":null,"line":2}')
    chunk = Chunk(1, 2, 40, [NewItem(1, "c1", "p", ENDPOINT, "m", b"{}", 2, tokens=9)], [invalid])
    assert await store.add_chunk(row.id, chunk)
    assert not await store.add_chunk(row.id, chunk)  # a repeat changes nothing
    assert await store.seen_custom_ids(row.id, ["c1", "c9"]) == {"c1"}
    await store.finish_file(row.id, 2)
    assert await store.find_file(key) is not None
    group = await group_of(store)
    assert group is not None and group.count == 1
    batch = await store.claim_batch(group, "openai", 10, 1000, time.time(), lease_seconds=30)
    assert batch is not None and (batch.owner, batch.requests, batch.state) == ("a", 1, BatchState.PENDING)
    assert (await store.usage("p")).enqueued_tokens == 9
    bodies = [part async for part in store.batch_bodies(batch.id)]
    assert [[(endpoint, body) for _, endpoint, body in part] for part in bodies] == [[(ENDPOINT, b"{}")]]
    await store.mark_submitted(batch.id, "remote-1", "in_progress", time.time())
    (item,) = await store.submitted_items(batch.id)
    assert item.attempts == 1
    summary = await store.record_outcomes(batch.id, [final(item.id, row.id, 1)], [])
    assert (summary.final, summary.ignored) == (1, 0)
    again = await store.record_outcomes(batch.id, [final(item.id, row.id, 1)], [])
    assert (again.final, again.ignored) == (0, 1)
    results = await store.results_after(0, 10, node="a")
    assert [r.payload for r in results] == [invalid.payload, final(item.id, row.id, 1).payload]
    assert await store.results_after(0, 10, node="b") == []
    await store.outbox_delivered("outbox:a", results[-1].id, {row.id: (2, 123)})
    assert [p for _, p in await store.delivered_payloads(row.id, 0, 10)] == [r.payload for r in results]
    await store.complete_file(row.id)
    done = await store.file(row.id)
    assert done is not None and (done.state, done.delivered, done.out_bytes) == (FileState.COMPLETE, 2, 123)
    status = await store.status()
    assert status["results"] == {"invalid": 1, "succeeded": 1}


async def test_concurrent_claims_from_two_nodes_never_share_an_item(make_store: MakeStore) -> None:
    a, b = await make_store("a"), await make_store("b")
    await ingest(a, "one.jsonl", 1500)
    await ingest(b, "two.jsonl", 1500)
    claimed: dict[int, str] = {}

    async def claimer(store: PostgresStore) -> None:
        while True:
            group = await group_of(store)
            if group is None:
                return
            batch = await store.claim_batch(group, "openai", 37, 10 * 30, time.time() + 1, frozenset({29}), 30)
            if batch is not None:
                assert batch.requests <= 30 and batch.requests != 29 and batch.bytes <= 300
                claimed[batch.id] = store.node

    await asyncio.gather(*(claimer(store) for store in (a, b) for _ in range(4)))
    seen: dict[int, int] = {}
    for batch_id, owner in claimed.items():
        batch = await a.batch(batch_id)
        assert batch is not None and batch.owner == owner
        ids = await a.batch_item_ids(batch_id)
        assert len(ids) == batch.requests
        for item_id in ids:
            assert item_id not in seen, f"item {item_id} in batches {seen[item_id]} and {batch_id}"
            seen[item_id] = batch_id
    assert len(seen) == 3000
    assert set(claimed.values()) == {"a", "b"}  # both nodes really claimed


async def test_an_expired_lease_is_taken_over_by_another_node(make_store: MakeStore) -> None:
    a, b = await make_store("a"), await make_store("b")
    await ingest(a, "one.jsonl", 10)
    group = await group_of(a)
    assert group is not None
    now = time.time()
    batch = await a.claim_batch(group, "openai", 100, 10_000, now, lease_seconds=30)
    assert batch is not None and batch.lease_until == pytest.approx(now + 30)
    assert await b.take_over(30, now + 29) == []  # still a's
    assert await a.renew_leases(30, now + 20) == 1  # a is alive: until now + 50
    assert await b.take_over(30, now + 49) == []
    taken = await b.take_over(30, now + 51)  # a died after its last renewal
    assert [(t.id, t.owner) for t in taken] == [(batch.id, "b")]
    assert [x.id for x in await b.owned_batches(BatchState.PENDING)] == [batch.id]
    assert await a.owned_batches(BatchState.PENDING) == []
    assert await a.renew_leases(30, now + 52) == 0  # a's late renewal does not take it back
    await b.release_leases()  # a graceful stop: anyone may take it at once
    assert [t.owner for t in await a.take_over(30, now + 53)] == ["a"]


async def test_two_nodes_taking_over_at_once_split_the_batches(make_store: MakeStore) -> None:
    a, b, c = await make_store("a"), await make_store("b"), await make_store("c")
    await ingest(a, "one.jsonl", 200)
    now = time.time()
    ids = []
    while (group := await group_of(a)) is not None:
        batch = await a.claim_batch(group, "openai", 10, 10_000, now, lease_seconds=1)
        assert batch is not None
        ids.append(batch.id)
    taken_b, taken_c = await asyncio.gather(b.take_over(30, now + 5), c.take_over(30, now + 5))
    assert sorted(t.id for t in taken_b + taken_c) == sorted(ids)
    assert not {t.id for t in taken_b} & {t.id for t in taken_c}


async def test_a_result_cursor_never_skips_under_concurrent_inserts_from_two_nodes(make_store: MakeStore) -> None:
    """Identity values are taken at INSERT, not at COMMIT: without the results lock a reader sees
    id N+1 committed while N is still in flight, moves its cursor past N and never delivers it."""
    a, b = await make_store("a"), await make_store("b")
    lines = 1000
    work: list[tuple[PostgresStore, int, list[tuple[int, int, int]]]] = []
    for store in (a, b):
        await ingest(store, f"{store.node}.jsonl", lines, model=store.node)
        group = await group_of(store, model=store.node)
        assert group is not None
        batch = await store.claim_batch(group, "openai", lines, 10**9, time.time() + 1)
        assert batch is not None and batch.requests == lines
        await store.mark_submitted(batch.id, f"remote-{store.node}", "in_progress", time.time())
        items = [(i.id, i.file_id, i.line) for i in await store.submitted_items(batch.id)]
        work.append((store, batch.id, items))
    expected = 0
    slices: list[tuple[PostgresStore, int, list[FinalResult], list[Retry]]] = []
    for store, batch_id, items in work:
        for start in range(0, len(items), 4):
            part = items[start : start + 4]
            # Three finals and one retry per call: the retry's UPDATE runs after the insert, which
            # widens the window between taking ids and committing them.
            finals = [final(*item) for item in part[:3]]
            retries = [Retry(item_id, time.time() + 3600, "later") for item_id, _, _ in part[3:]]
            slices.append((store, batch_id, finals, retries))
            expected += len(finals)
    writing = True

    async def writer(queue: list[tuple[PostgresStore, int, list[FinalResult], list[Retry]]]) -> None:
        while queue:
            store, batch_id, finals, retries = queue.pop()
            summary = await store.record_outcomes(batch_id, finals, retries)
            assert summary.final == len(finals)

    seen: list[int] = []

    async def reader() -> None:
        last = 0
        while True:
            done = not writing  # read once more after the writers finished
            rows = await a.results_after(last, 7)
            for row in rows:
                seen.append(row.id)
                last = row.id
            if done and not rows:
                return

    async def writers() -> None:
        nonlocal writing
        try:
            await asyncio.gather(*(writer(slices) for _ in range(16)))
        finally:
            writing = False

    await asyncio.gather(writers(), reader())
    all_ids = [r.id for r in await a.results_after(0, 10 * expected)]
    assert len(all_ids) == expected
    missed = sorted(set(all_ids) - set(seen))
    assert not missed, f"the cursor skipped {len(missed)} results: {missed[:10]}"
    assert seen == all_ids  # each exactly once, in id order


async def test_concurrent_opens_migrate_once_under_the_advisory_lock(schema: str) -> None:
    stores = [PostgresStore(schema_url(schema), f"n{i}") for i in range(4)]
    try:
        await asyncio.gather(*(store.open() for store in stores))  # the schema does not exist yet
        assert len({await store.instance_id() for store in stores}) == 1
        conn = await asyncpg.connect(PG_URL, server_settings={"search_path": schema})
        try:
            versions = await conn.fetch("SELECT version FROM schema_version ORDER BY version")
            assert [r["version"] for r in versions] == list(range(1, SCHEMA_VERSION + 1))
            assert await conn.fetchval("SELECT COUNT(*) FROM nodes") == 4
        finally:
            await conn.close()
        assert await stores[0].migrate() == (SCHEMA_VERSION, SCHEMA_VERSION)
    finally:
        for store in stores:
            await store.close()


async def test_a_newer_schema_is_refused(make_store: MakeStore, schema: str) -> None:
    store = await make_store("a")
    await store.close()
    conn = await asyncpg.connect(PG_URL, server_settings={"search_path": schema})
    try:
        await conn.execute(
            "INSERT INTO schema_version (version, applied_at, node) VALUES ($1, 0, 'future')", SCHEMA_VERSION + 1
        )
    finally:
        await conn.close()
    for opening in (PostgresStore(schema_url(schema), "a").open, PostgresStore(schema_url(schema), "a").open_existing):
        with pytest.raises(OperatorError, match="newer than this batchd") as raised:
            await opening()
        assert raised.value.status == EX_DATAERR


async def test_open_existing_never_creates_and_reads_only(make_store: MakeStore, schema: str) -> None:
    empty = PostgresStore(schema_url(schema), "a")
    with pytest.raises(OperatorError, match="batchd migrate") as raised:
        await empty.open_existing()  # nothing there: not created (commands show nothing yet)
    assert raised.value.status == EX_DATAERR
    store = await make_store("a")
    await store.add_error("test.event", "hello")
    reader = PostgresStore(schema_url(schema), "a")
    await reader.open_existing(writable=False)
    try:
        assert (await reader.status())["errors"][0]["message"] == "hello"
        assert await reader.instance_id() == await store.instance_id()
        with pytest.raises(asyncpg.exceptions.ReadOnlySQLTransactionError):
            await reader.add_error("test.event", "not allowed")
    finally:
        await reader.close()


async def test_errors_are_bounded(make_store: MakeStore) -> None:
    store = await make_store("a")
    for n in range(205):
        await store.add_error("test.event", f"e{n}")
    errors = (await store.status(errors=500))["errors"]
    assert len(errors) == 200 and errors[0]["message"] == "e204"


async def test_the_password_never_shows() -> None:
    store = PostgresStore("postgresql://batchd:s3cret-pw@127.0.0.1:1/db?schema=x", "a")
    assert "s3cret" not in store.url and "s3cret" not in repr(store)
    assert store.url == "postgresql://batchd:***@127.0.0.1:1/db?schema=x"
    with pytest.raises(OperatorError) as raised:
        await store.open()
    assert raised.value.status == EX_IOERR
    assert "s3cret" not in str(raised.value) and "***" in str(raised.value)
    query = PostgresStore("postgresql://batchd@127.0.0.1:1/db?password=s3cret-pw", "a")
    assert "s3cret" not in query.url
