"""The PostgreSQL engine: several daemons (nodes) sharing one queue through one database.

asyncpg (measured about twice as fast as psycopg 3 on the array-insert paths add_chunk and
record_outcomes use). One small pool per store; every write is one transaction that runs whole as
its own task (`shield.settle`), so a cancelled caller never leaves a connection inside a
transaction, and reads go through `settle` too, so a cancelled read never returns a connection
mid-query to the pool. READ COMMITTED everywhere: guarded UPDATEs re-check their WHERE after a row
lock wait, claims and takeovers skip rows another node holds (FOR UPDATE SKIP LOCKED).

Result ids are taken from an identity at INSERT time, which is not commit order; every transaction
that inserts results therefore takes one advisory transaction lock (`results_lock`) just before
the insert, so a result id can never become visible after a higher one (delivery cursors
"id > last" never skip a row).

`?schema=NAME` in the URL selects a schema (created by `open()`), set as the connections'
search_path; the tests isolate themselves that way. The password never leaves this module: `url`
is the redacted form.
"""

from __future__ import annotations

import dataclasses
import os
import re
import socket
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Collection, Iterable, Sequence
from decimal import Decimal
from importlib import resources
from typing import TYPE_CHECKING, Any, TypeVar
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import asyncpg
import orjson
import structlog

from ..exits import EX_CONFIG, EX_DATAERR, EX_IOERR, EX_NOINPUT, EX_NOPERM, OperatorError
from .contract import (
    LIVE_BATCH_STATES,
    METRICS_READS,
    PAUSE_UNTIL,
    TURNAROUND_BUCKETS,
    ApplySummary,
    BatchRow,
    BatchState,
    Budget,
    CancelReason,
    Chunk,
    Deadline,
    DuplicateCustomId,
    FallbackDue,
    Fate,
    FileItem,
    FileKey,
    FileRow,
    FileState,
    FinalResult,
    Group,
    InputSize,
    ItemState,
    NewItem,
    NewResult,
    NotCreated,
    Pause,
    PendingResult,
    PruneSummary,
    RealtimeItem,
    Retry,
    SubmittedItem,
    Usage,
    WholeFile,
)
from .queries import load
from .shield import settle
from .url import parse_store_url

if TYPE_CHECKING:
    from asyncpg.pool import PoolConnectionProxy

    from . import contract

    Connection = PoolConnectionProxy[asyncpg.Record]

log = structlog.get_logger("batchd.store.postgres")

Q = load("postgres_queries.sql")
T = TypeVar("T")

ERRORS_KEPT = 200
_UNBOUNDED = 1 << 62  # "no bound" for a claim's budget, as a number the comparison takes
POOL_MAX = 8
CONNECT_TIMEOUT = 10.0
# A transaction that meets a deadlock or a serialization failure is retried whole this many times.
TX_ATTEMPTS = 3
REPORT_KEYS = ("model", "provider", "day", "file")
_SCHEMA_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,62}$")
_RETRYABLE = (asyncpg.exceptions.DeadlockDetectedError, asyncpg.exceptions.SerializationError)


def _migrations() -> list[tuple[int, str, str]]:
    found = []
    for entry in resources.files("batchd.store").joinpath("postgres_migrations").iterdir():
        name = entry.name
        if name.endswith(".sql") and name[:3].isdigit():
            found.append((int(name[:3]), name, entry.read_text()))
    return sorted(found)


SCHEMA_VERSION = _migrations()[-1][0]


def split_url(url: str) -> tuple[str, str | None]:
    """(asyncpg DSN without our own `schema` parameter, schema name or None)."""
    parts = urlsplit(url)
    schema: str | None = None
    kept: list[tuple[str, str]] = []
    for key, value in parse_qsl(parts.query, keep_blank_values=True):
        if key == "schema":
            schema = value
        else:
            kept.append((key, value))
    if schema is not None and not _SCHEMA_NAME.match(schema):
        raise OperatorError(f"store URL: schema={schema!r} is not a plain SQL name ([A-Za-z_][A-Za-z0-9_]*)", EX_CONFIG)
    return urlunsplit(parts._replace(query=urlencode(kept))), schema


def redact(url: str) -> str:
    """The URL without its password (in the user part or as a `password` query parameter)."""
    redacted = parse_store_url(url).redacted()
    parts = urlsplit(redacted)
    if not parts.query:
        return redacted
    query = [(k, "***" if k == "password" else v) for k, v in parse_qsl(parts.query, keep_blank_values=True)]
    return urlunsplit(parts._replace(query=urlencode(query, safe="*")))


def _submitted(r: asyncpg.Record) -> SubmittedItem:
    return SubmittedItem(
        r["id"], r["file_id"], r["line"], r["custom_id"], r["attempts"], ItemState(r["state"]), r["deadline"]
    )


def _final_arrays(finals: Sequence[FinalResult]) -> list[list[Any]]:
    """The array columns of record_finals ($2-$12) and record_realtime ($1-$11), in their order."""
    return [
        [f.item_id for f in finals],
        [str(f.status) for f in finals],
        [f.payload for f in finals],
        [f.input_tokens for f in finals],
        [f.output_tokens for f in finals],
        [f.cached_input_tokens for f in finals],
        [f.cache_creation_input_tokens for f in finals],
        [f.cost_batch for f in finals],
        [f.cost_realtime for f in finals],
        [f.via for f in finals],
        [f.cost_paid for f in finals],
    ]


async def _record_duplicates(conn: Connection, batch_id: int | None, finals: Sequence[FinalResult], now: float) -> int:
    """Billed answers for items already answered the other way, as duplicate costs (after the finals)."""
    billed = [f for f in finals if f.input_tokens is not None]
    if not billed:
        return 0
    return _count(
        await conn.execute(
            Q.record_duplicates,
            batch_id,
            [f.item_id for f in billed],
            [f.via for f in billed],
            [f.input_tokens for f in billed],
            [f.output_tokens for f in billed],
            [f.cost_paid for f in billed],
            now,
        )
    )


def _count(status: str) -> int:
    """Rows touched, from a command tag such as 'UPDATE 3' or 'INSERT 0 2'."""
    return int(status.rsplit(" ", 1)[-1]) if status and status[-1].isdigit() else 0


def _batch(row: asyncpg.Record) -> BatchRow:
    return BatchRow(
        id=row["id"],
        profile=row["profile"],
        kind=row["kind"],
        endpoint=row["endpoint"],
        model=row["model"],
        state=BatchState(row["state"]),
        remote_id=row["remote_id"],
        remote_status=row["remote_status"],
        input_file_id=row["input_file_id"],
        output_file_id=row["output_file_id"],
        error_file_id=row["error_file_id"],
        requests=row["requests"],
        bytes=row["bytes"],
        counts=orjson.loads(row["counts"]) if row["counts"] else None,
        created_at=row["created_at"],
        submitted_at=row["submitted_at"],
        submit_attempts=row["submit_attempts"],
        not_before=row["not_before"],
        last_error=row["last_error"],
        remote_created_at=row["remote_created_at"],
        cancel_requested_at=row["cancel_requested_at"],
        ended_at=row["ended_at"],
        fate=Fate(row["fate"]) if row["fate"] else None,
        owner=row["owner"],
        lease_until=row["lease_until"],
        poll_requested_at=row["poll_requested_at"],
        cancel_reason=CancelReason(row["cancel_reason"]) if row["cancel_reason"] else None,
        cancel_wanted_at=row["cancel_wanted_at"],
        tokens=row["tokens"],
        inputs=row["inputs"],
    )


def _file(row: asyncpg.Record) -> FileRow:
    return FileRow(
        id=row["id"],
        node=row["node"],
        name=row["name"],
        out_name=row["out_name"],
        state=FileState(row["state"]),
        lines_committed=row["lines_committed"],
        offset_committed=row["offset_committed"],
        lines=row["lines"],
        delivered=row["delivered"],
        out_bytes=row["out_bytes"],
        moved=row["moved_at"] is not None,
        canceled_at=row["canceled_at"],
        options=row["options"],
        deadline=row["deadline"],
    )


def _pending(row: asyncpg.Record) -> PendingResult:
    return PendingResult(row["id"], row["file_id"], row["out_name"], bytes(row["payload"]), row["created_at"])


class PostgresStore:
    """The contract (store/contract.py) on PostgreSQL, for one node of possibly several."""

    def __init__(self, url: str, node: str, *, readonly: bool = False, pool_size: int = POOL_MAX) -> None:
        parsed = parse_store_url(url)
        if parsed.engine != "postgresql":
            raise ValueError(f"not a PostgreSQL URL: {parsed.redacted()}")
        self.url = redact(parsed.url)  # never the password: this is what logs and status may show
        self.node = node
        self._dsn, self.schema = split_url(parsed.url)
        self._pool_size = max(1, pool_size)
        self._pool: asyncpg.Pool[asyncpg.Record] | None = None
        self._instance = ""
        # A command's store (status, results, report): open() never creates or migrates anything.
        self.readonly = readonly

    def __repr__(self) -> str:
        return f"PostgresStore({self.url!r}, node={self.node!r})"

    # -- lifecycle -------------------------------------------------------------------------

    def _server_settings(self, readonly: bool) -> dict[str, str]:
        settings = {
            "application_name": f"batchd:{self.node}"[:63],
            # A process that hangs inside a transaction must not hold row locks (claims, leases) forever.
            "idle_in_transaction_session_timeout": "120s",
        }
        if self.schema is not None:
            # Quoted: the name keeps its case and nothing else can follow it into the path.
            settings["search_path"] = f'"{self.schema}"'
        if readonly:
            settings["default_transaction_read_only"] = "on"
        return settings

    async def _connect(self, readonly: bool = False) -> asyncpg.Connection[asyncpg.Record]:
        try:
            return await asyncpg.connect(
                self._dsn, timeout=CONNECT_TIMEOUT, server_settings=self._server_settings(readonly)
            )
        except Exception as exc:
            raise self._connect_error(exc) from None

    async def _create_pool(self, readonly: bool) -> asyncpg.Pool[asyncpg.Record]:
        try:
            return await asyncpg.create_pool(
                self._dsn,
                min_size=1,
                max_size=self._pool_size,
                timeout=CONNECT_TIMEOUT,
                server_settings=self._server_settings(readonly),
            )
        except Exception as exc:
            raise self._connect_error(exc) from None

    def _connect_error(self, exc: Exception) -> OperatorError:
        # asyncpg's messages name the user and host, never the password; the URL is redacted.
        if isinstance(
            exc, asyncpg.exceptions.InvalidPasswordError | asyncpg.exceptions.InvalidAuthorizationSpecificationError
        ):
            status = EX_NOPERM
        elif isinstance(exc, asyncpg.exceptions.InvalidCatalogNameError):
            status = EX_NOINPUT
        else:
            status = EX_IOERR
        detail = str(exc) or type(exc).__name__
        return OperatorError(f"cannot connect to the store {self.url}: {detail}", status)

    def _newer(self, version: int) -> OperatorError:
        return OperatorError(
            f"the store {self.url} has schema version {version}, newer than this batchd understands"
            f" ({SCHEMA_VERSION}): run the batchd that migrated it",
            EX_DATAERR,
        )

    async def open(self) -> None:
        """Connect, create the schema if named and missing, migrate under the advisory lock
        (refusing a newer schema), create the instance id once and register this node."""
        if self.readonly:
            await self.open_existing()
            return
        await self.migrate()
        pool = await self._create_pool(readonly=False)
        try:
            async with pool.acquire() as conn, conn.transaction():
                await conn.execute(Q.instance_init, uuid.uuid4().hex)
                self._instance = str(await conn.fetchval(Q.instance))
                await conn.execute(Q.node_register, self.node, socket.gethostname(), os.getpid(), time.time())
        except BaseException:
            await pool.close()
            raise
        self._pool = pool
        log.info("store.opened", engine="postgresql", url=self.url, node=self.node, schema=SCHEMA_VERSION)

    async def migrate(self) -> tuple[int, int]:
        """Apply pending migrations, each in its own transaction, under a per-schema advisory lock."""
        conn = await self._connect()
        try:
            if self.schema is not None:
                # Serialised by the lock below too, but CREATE SCHEMA IF NOT EXISTS can still race
                # with itself (a unique violation in pg_namespace): take the lock first.
                await conn.execute(Q.migrate_lock, self.schema)
                await conn.execute(await conn.fetchval(Q.create_schema_statement, self.schema))
            else:
                await conn.execute(Q.migrate_lock, None)
            try:
                before = await self._schema_version(conn)
                if before > SCHEMA_VERSION:
                    raise self._newer(before)
                version = before
                for number, name, script in _migrations():
                    if number <= version:
                        continue
                    async with conn.transaction():
                        await conn.execute(script)
                        await conn.execute(Q.schema_version_insert, number, time.time(), self.node)
                    version = number
                    log.info("store.migrated", engine="postgresql", url=self.url, migration=name)
                return before, version
            finally:
                await conn.execute(Q.migrate_unlock, self.schema)
        finally:
            await conn.close()

    @staticmethod
    async def _schema_version(conn: Connection | asyncpg.Connection[asyncpg.Record]) -> int:
        if not await conn.fetchval(Q.has_schema_version):
            return 0
        return int(await conn.fetchval(Q.schema_version_max))

    async def open_existing(self, writable: bool = False) -> None:
        """Connect for a command: never create, never migrate; an older or newer schema is refused."""
        pool = await self._create_pool(readonly=not writable)
        try:
            async with pool.acquire() as conn:
                version = await self._schema_version(conn)
            if version == 0:
                raise NotCreated(self.url)
            if version > SCHEMA_VERSION:
                raise self._newer(version)
            if version < SCHEMA_VERSION:
                raise OperatorError(
                    f"the store {self.url} has schema version {version}, this batchd uses {SCHEMA_VERSION}:"
                    " run `batchd migrate` (or start the daemon once) to migrate it",
                    EX_DATAERR,
                )
            self._instance = str(await pool.fetchval(Q.instance) or "")
        except BaseException:
            await pool.close()
            raise
        self._pool = pool

    async def close(self) -> None:
        pool, self._pool = self._pool, None
        if pool is not None:
            await pool.close()

    @property
    def _db(self) -> asyncpg.Pool[asyncpg.Record]:
        if self._pool is None:
            raise RuntimeError("store is not open")
        return self._pool

    # -- running statements ----------------------------------------------------------------

    async def _tx(self, work: Callable[[Connection], Awaitable[T]]) -> T:
        """Run `work` in one transaction, whole (see shield.settle); retried on deadlock."""
        return await settle(self._run_tx(work))

    async def _run_tx(self, work: Callable[[Connection], Awaitable[T]]) -> T:
        pool = self._db
        attempt = 1
        while True:
            try:
                async with pool.acquire() as conn, conn.transaction():
                    return await work(conn)
            except _RETRYABLE as exc:
                if attempt >= TX_ATTEMPTS:
                    raise
                log.warning("store.tx_retry", engine="postgresql", attempt=attempt, error=str(exc))
                attempt += 1

    async def _execute(self, query: str, *args: Any) -> str:
        """One write statement as its own transaction."""

        async def work(conn: Connection) -> str:
            return await conn.execute(query, *args)

        return await self._tx(work)

    async def _fetch(self, query: str, *args: Any) -> list[asyncpg.Record]:
        return await settle(self._db.fetch(query, *args))

    async def _fetchrow(self, query: str, *args: Any) -> asyncpg.Record | None:
        return await settle(self._db.fetchrow(query, *args))

    async def _fetchval(self, query: str, *args: Any) -> Any:
        return await settle(self._db.fetchval(query, *args))

    async def _add_error(self, conn: Connection, event: str, message: str) -> None:
        await conn.execute(Q.add_error, time.time(), self.node, event, message)
        await conn.execute(Q.trim_errors, ERRORS_KEPT)

    # -- intake ----------------------------------------------------------------------------

    async def find_file(self, key: FileKey) -> FileRow | None:
        row = await self._fetchrow(Q.find_file, self.node, key.name, key.sha256, key.ino)
        return _file(row) if row else None

    async def begin_file(
        self, key: FileKey, out_taken: Callable[[str], bool], options: str | None = None, deadline: float | None = None
    ) -> FileRow:
        async def work(conn: Connection) -> FileRow:
            out_name = await self._choose_out_name(conn, key.name, out_taken)
            row = await conn.fetchrow(
                Q.file_insert,
                self.node,
                key.name,
                key.sha256,
                key.size,
                key.dev,
                key.ino,
                out_name,
                time.time(),
                options,
                deadline,
            )
            assert row is not None
            return _file(row)

        return await self._tx(work)

    async def _choose_out_name(self, conn: Connection, name: str, out_taken: Callable[[str], bool]) -> str:
        stem = name[: -len(".jsonl")] if name.endswith(".jsonl") else name
        number = 0
        out_name = f"{stem}.results.jsonl"
        while True:
            if not out_taken(out_name):
                holder = await conn.fetchrow(Q.out_name_holder, self.node, out_name)
                if holder is None:
                    return out_name
                if holder["state"] == FileState.COMPLETE:
                    # Its results are gone from out/: the name is free again, its row keeps NAME~ID.
                    await conn.execute(Q.out_name_give_up, holder["id"])
                    return out_name
            number += 1
            out_name = f"{stem}.{number}.results.jsonl"

    async def add_files(
        self, files: Sequence[WholeFile], out_taken: Callable[[str], bool], moved: Collection[int] = ()
    ) -> list[FileRow]:
        """Group commit of small files, each whole (see contract.Intake.add_files): one transaction."""
        if not files:
            await self.files_moved(moved)
            return []
        now = time.time()

        async def work(conn: Connection) -> list[FileRow]:
            if moved:
                await conn.execute(Q.files_moved, sorted(moved), now)
            rows: list[FileRow] = []
            taken: set[str] = set()
            locked = False
            for f in files:
                key = f.key
                found = await conn.fetchrow(Q.find_file, self.node, key.name, key.sha256, key.ino)
                if found is not None:
                    rows.append(_file(found))
                    continue
                out_name = await self._choose_out_name(conn, key.name, lambda o: o in taken or out_taken(o))
                taken.add(out_name)
                row = await conn.fetchrow(
                    Q.file_insert,
                    self.node,
                    key.name,
                    key.sha256,
                    key.size,
                    key.dev,
                    key.ino,
                    out_name,
                    now,
                    f.options,
                    f.deadline,
                )
                assert row is not None
                if f.invalid and not locked:
                    await conn.execute(Q.results_lock)
                    locked = True
                await self._insert_lines(conn, row["id"], f.items, f.invalid, now)
                await conn.fetchval(Q.chunk_advance, row["id"], 0, f.lines, key.size)
                await conn.execute(Q.finish_file, row["id"], f.lines, now)
                rows.append(
                    dataclasses.replace(
                        _file(row),
                        state=FileState.OPEN,
                        lines=f.lines,
                        lines_committed=f.lines,
                        offset_committed=key.size,
                    )
                )
            return rows

        return await self._tx(work)

    @staticmethod
    async def _insert_lines(
        conn: Connection, file_id: int, items: Sequence[NewItem], invalid: Sequence[NewResult], now: float
    ) -> None:
        """A file's items (bodies included) and invalid results; the caller holds results_lock if any."""
        items = sorted(items, key=lambda item: item.line)
        invalid = sorted(invalid, key=lambda result: result.line)
        if items:
            await conn.execute(
                Q.items_insert,
                file_id,
                [i.line for i in items],
                [i.custom_id for i in items],
                [i.profile for i in items],
                [i.endpoint for i in items],
                [i.model for i in items],
                [i.size for i in items],
                [i.tokens for i in items],
                [i.body for i in items],
                now,
                [i.deadline for i in items],
                [i.fallback_at for i in items],
                [i.inputs for i in items],
            )
        if invalid:
            await conn.execute(
                Q.results_insert_new,
                file_id,
                [r.line for r in invalid],
                [str(r.status) for r in invalid],
                [r.payload for r in invalid],
                now,
            )

    async def seen_custom_ids(self, file_id: int, custom_ids: Collection[str]) -> set[str]:
        if not custom_ids:
            return set()
        rows = await self._fetch(Q.seen_custom_ids, file_id, list(custom_ids))
        return {row["custom_id"] for row in rows}

    async def add_chunk(self, file_id: int, chunk: Chunk) -> bool:
        now = time.time()

        async def work(conn: Connection) -> bool:
            advanced = await conn.fetchval(
                Q.chunk_advance, file_id, chunk.first_line - 1, chunk.last_line, chunk.end_offset
            )
            if advanced is None:
                return False  # committed before (a repeat after a crash or a cancellation)
            if chunk.invalid:
                await conn.execute(Q.results_lock)
            try:
                await self._insert_lines(conn, file_id, chunk.items, chunk.invalid, now)
            except asyncpg.UniqueViolationError as exc:
                if exc.constraint_name == "items_file_id_custom_id_key":
                    raise DuplicateCustomId(str(exc)) from None
                raise
            return True

        return await self._tx(work)

    async def finish_file(self, file_id: int, lines: int) -> None:
        await self._execute(Q.finish_file, file_id, lines, time.time())

    async def file_moved(self, file_id: int) -> None:
        await self._execute(Q.file_moved, file_id, time.time())

    async def files_moved(self, file_ids: Collection[int]) -> None:
        if file_ids:
            await self._execute(Q.files_moved, sorted(file_ids), time.time())

    # -- queue -----------------------------------------------------------------------------

    async def queued_groups(self, now: float) -> list[Group]:
        if not self.readonly:
            # The batcher's per-pass read keeps the delta log short (migration 007_scale); a
            # read-only store (a command) sums whatever deltas there are.
            await self._execute(Q.fold_queue_deltas)
        rows = await self._fetch(Q.queued_groups, now)
        return [Group(r["profile"], r["endpoint"], r["model"], r["n"], r["bytes"], r["oldest"]) for r in rows]

    async def earliest_deadline(self, group: Group, now: float) -> Deadline | None:
        row = await self._fetchrow(Q.earliest_deadline, group.profile, group.endpoint, group.model, now)
        return Deadline(row["deadline"], row["fallback_at"]) if row else None

    async def next_not_before(self, now: float) -> float | None:
        value = await self._fetchval(Q.next_not_before, now)
        return float(value) if value is not None else None

    async def claim_batch(
        self,
        group: Group,
        kind: str,
        max_requests: int,
        max_bytes: int,
        now: float,
        avoid_counts: frozenset[int] = frozenset(),
        lease_seconds: float = 60.0,
        budget: Budget | None = None,
    ) -> BatchRow | None:
        bound = budget or Budget()

        async def work(conn: Connection) -> BatchRow | None:
            if max_requests <= 0:
                return None
            rows = await conn.fetch(
                Q.claim_candidates,
                group.profile,
                group.endpoint,
                group.model,
                now,
                max_requests,
                max_bytes,
                _UNBOUNDED if bound.tokens is None else bound.tokens,
                _UNBOUNDED if bound.inputs is None else bound.inputs,
                bound.lone_oversize,
            )
            count = len(rows)
            while count in avoid_counts and count > 0:
                count -= 1  # leave the newest item queued: the count must differ from avoid_counts
            if count == 0:
                return None
            taken = rows[:count]
            batch = await conn.fetchrow(
                Q.batch_insert,
                group.profile,
                kind,
                group.endpoint,
                group.model,
                now,
                self.node,
                now + lease_seconds,
                count,
                sum(r["size"] for r in taken),
                sum(r["tokens"] for r in taken),
                sum(r["inputs"] for r in taken),
            )
            assert batch is not None
            await conn.execute(Q.claim_items, batch["id"], [r["id"] for r in taken])
            return _batch(batch)

        return await self._tx(work)

    async def batch_bodies(self, batch_id: int, chunk: int = 2000) -> AsyncIterator[list[tuple[int, str, bytes]]]:
        last = 0
        while True:
            rows = await self._fetch(Q.batch_bodies, batch_id, last, chunk)
            if not rows:
                return
            yield [(r["id"], r["endpoint"], bytes(r["body"])) for r in rows]
            last = rows[-1]["id"]

    async def batch_input_size(self, batch_id: int) -> InputSize:
        row = await self._fetchrow(Q.batch_input_size, batch_id)
        assert row is not None
        return InputSize(int(row["n"]), int(row["body_bytes"]), int(row["id_hex_digits"]))

    async def usage(self, profile: str, model: str | None = None, now: float | None = None) -> Usage:
        row = await self._fetchrow(Q.usage, profile, model, time.time() if now is None else now)
        assert row is not None
        return Usage(
            in_flight_batches=int(row["in_flight"]),
            enqueued_tokens=int(row["tokens"]),
            enqueued_requests=int(row["requests"]),
            created_last_hour=int(row["created"]),
        )

    async def creations(self, profile: str, since: float) -> list[float]:
        return [float(r["t"]) for r in await self._fetch(Q.creations, profile, since)]

    async def learned_limits(self) -> dict[tuple[str, str], int]:
        return {(r["profile"], r["model"]): int(r["tokens"]) for r in await self._fetch(Q.learned_limits)}

    async def lower_learned_limit(self, profile: str, model: str, tokens: int, now: float) -> int:
        async def work(conn: Connection) -> int:
            await conn.execute(Q.lower_learned_limit, profile, model, tokens, now)
            return int(await conn.fetchval(Q.learned_limit, profile, model))

        return await self._tx(work)

    async def flush_requests(self) -> dict[str, float]:
        return {r["route"]: float(r["requested_at"]) for r in await self._fetch(Q.flush_requests)}

    async def clear_flush_request(self, route: str, requested_at: float) -> bool:
        return _count(await self._execute(Q.clear_flush_request, route, requested_at)) > 0

    async def active_holds(self, now: float) -> dict[tuple[str, str], float]:
        rows = await self._fetch(Q.active_holds, now)
        holds: dict[tuple[str, str], float] = {(r["profile"], r["model"]): r["until"] for r in rows}
        # An operator's pause (`batchd pause`) outlasts any hold; '*' in its key matches any profile or model.
        for row in await self._fetch(Q.pauses):
            holds[(row["profile"], row["model"])] = PAUSE_UNTIL
        return holds

    async def hold(self, profile: str, model: str, until: float, failures: int, reason: str) -> None:
        async def work(conn: Connection) -> None:
            await conn.execute(Q.hold, profile, model, until, failures, reason)
            await self._add_error(conn, "batch.held", f"{profile}/{model}: {reason}")

        await self._tx(work)

    async def hold_failures(self, profile: str, model: str) -> int:
        value = await self._fetchval(Q.hold_failures, profile, model)
        return int(value) if value is not None else 0

    async def release_hold(self, profile: str, model: str) -> None:
        await self._execute(Q.release_hold, profile, model)

    # -- batches ---------------------------------------------------------------------------

    async def batch(self, batch_id: int) -> BatchRow | None:
        row = await self._fetchrow(Q.batch, batch_id)
        return _batch(row) if row else None

    async def batches_in_state(self, *states: BatchState) -> list[BatchRow]:
        rows = await self._fetch(Q.batches_in_state, [str(s) for s in states])
        return [_batch(r) for r in rows]

    async def owned_batches(self, *states: BatchState) -> list[BatchRow]:
        rows = await self._fetch(Q.owned_batches, self.node, [str(s) for s in states])
        return [_batch(r) for r in rows]

    async def take_over(self, lease_seconds: float, now: float) -> list[BatchRow]:
        async def work(conn: Connection) -> list[BatchRow]:
            return [_batch(r) for r in await conn.fetch(Q.take_over, self.node, now, now + lease_seconds)]

        taken = sorted(await self._tx(work), key=lambda b: b.id)
        if taken:
            log.info("store.batches_taken_over", node=self.node, batches=[b.id for b in taken])
        return taken

    async def renew_leases(self, lease_seconds: float, now: float) -> int:
        async def work(conn: Connection) -> int:
            await conn.execute(Q.node_heartbeat, self.node, now + lease_seconds)
            return _count(await conn.execute(Q.renew_leases, self.node, now + lease_seconds))

        return await self._tx(work)

    async def release_leases(self) -> None:
        async def work(conn: Connection) -> None:
            await conn.execute(Q.release_leases, self.node)
            await conn.execute(Q.release_sink_leases, self.node)
            await conn.execute(Q.node_stopped, self.node, time.time())

        await self._tx(work)

    async def remote_ids(self, profile: str) -> set[str]:
        return {r["remote_id"] for r in await self._fetch(Q.remote_ids, profile)}

    async def remote_owner(self, remote_id: str) -> int | None:
        value = await self._fetchval(Q.remote_owner, remote_id)
        return int(value) if value is not None else None

    async def set_input_file(self, batch_id: int, input_file_id: str | None) -> None:
        await self._execute(Q.set_input_file, batch_id, input_file_id)

    async def note_submit_failure(self, batch_id: int, error: str, retry_at: float) -> None:
        async def work(conn: Connection) -> None:
            await conn.execute(Q.note_submit_failure, batch_id, error, retry_at)
            await self._add_error(conn, "batch.submit_failed", f"batch {batch_id}: {error}")

        await self._tx(work)

    async def mark_submitted(
        self, batch_id: int, remote_id: str, remote_status: str, now: float, remote_created_at: float | None = None
    ) -> None:
        async def work(conn: Connection) -> None:
            await conn.execute(Q.mark_submitted, batch_id, remote_id, remote_status, now, remote_created_at or now)
            await conn.execute(Q.items_submitted, batch_id)

        await self._tx(work)

    async def mark_unverified(
        self, batch_id: int, remote_id: str, remote_status: str, now: float, remote_created_at: float | None
    ) -> None:
        # Its items stay batched and count no attempt until the batch is proven ours.
        await self._execute(
            Q.mark_unverified,
            batch_id,
            remote_id,
            remote_status,
            now,
            remote_created_at or now,
            f"adopted {remote_id} provisionally: ownership is proven from its results once it has ended",
        )

    async def confirm_ownership(self, batch_id: int) -> None:
        async def work(conn: Connection) -> None:
            await conn.execute(Q.confirm_ownership, batch_id)
            await conn.execute(Q.items_submitted, batch_id)

        await self._tx(work)

    async def unadopt(self, batch_id: int, remote_id: str, reason: str) -> None:
        async def work(conn: Connection) -> None:
            await conn.execute(Q.reject_remote, batch_id, remote_id, time.time(), reason)
            await conn.execute(Q.unadopt, batch_id, remote_id, f"{remote_id} was not ours: {reason}")
            await self._add_error(conn, "batch.not_ours", f"batch {batch_id}: {remote_id}: {reason}")

        await self._tx(work)

    async def rejected_remotes(self, batch_id: int) -> set[str]:
        return {r["remote_id"] for r in await self._fetch(Q.rejected_remotes, batch_id)}

    async def request_poll(self, batch_id: int, now: float) -> None:
        await self._execute(Q.request_poll, batch_id, now)

    async def note_cancel_requested(
        self, batch_id: int, error: str, reason: CancelReason = CancelReason.EXPIRY
    ) -> None:
        async def work(conn: Connection) -> None:
            await conn.execute(Q.note_cancel_requested, batch_id, time.time(), error)
            await conn.execute(Q.note_cancel_reason, batch_id, reason.value)
            event = _CANCEL_EVENTS.get(reason, "batch.operator_cancelled")
            await self._add_error(conn, event, f"batch {batch_id}: {error}")

        await self._tx(work)

    async def canceled_files(self, batch_id: int) -> set[int]:
        return {int(r["file_id"]) for r in await self._fetch(Q.canceled_files, batch_id)}

    async def batched_items(self, batch_id: int) -> list[SubmittedItem]:
        return [_submitted(r) for r in await self._fetch(Q.batched_items, batch_id)]

    async def drop_pending(
        self, batch_id: int, finals: Sequence[FinalResult], fate: Fate, error: str, now: float
    ) -> tuple[int, int]:
        mine = list({f.item_id: f for f in finals}.values())

        async def work(conn: Connection) -> tuple[int, int]:
            if await conn.fetchval(Q.lock_pending_batch, batch_id) is None:
                return 0, 0
            applied = 0
            if mine:
                await conn.execute(Q.results_lock)
                applied = int(
                    await conn.fetchval(
                        Q.finish_unsent,
                        [ItemState.BATCHED.value],
                        [f.item_id for f in mine],
                        [str(f.status) for f in mine],
                        [f.payload for f in mine],
                        now,
                        batch_id,
                        None,
                    )
                )
            requeued = _count(await conn.execute(Q.unclaim_batched, batch_id))
            await conn.execute(Q.finish_batch, batch_id, now, fate.value, error)
            await self._add_error(conn, f"batch.{fate.value}", f"batch {batch_id}: {error}")
            return applied, requeued

        return await self._tx(work)

    async def canceled_with_queued(self) -> list[int]:
        return [int(r["id"]) for r in await self._fetch(Q.canceled_with_queued)]

    async def record_poll(
        self,
        batch_id: int,
        remote_status: str,
        counts: dict[str, int] | None,
        output_file_id: str | None,
        error_file_id: str | None,
        ended: bool = False,
    ) -> None:
        await self._execute(
            Q.record_poll,
            batch_id,
            remote_status,
            orjson.dumps(counts).decode() if counts else None,
            output_file_id,
            error_file_id,
            time.time(),
            ended,
        )

    async def note_batch_error(self, batch_id: int, event: str, error: str) -> None:
        async def work(conn: Connection) -> None:
            await conn.execute(Q.note_batch_error, batch_id, error)
            await self._add_error(conn, event, f"batch {batch_id}: {error}")

        await self._tx(work)

    async def finish_batch(
        self, batch_id: int, fate: Fate | None = None, error: str | None = None, record: bool = True
    ) -> None:
        async def work(conn: Connection) -> None:
            await conn.execute(Q.finish_batch, batch_id, time.time(), str(fate) if fate else None, error)
            if fate is not None and record:
                await self._add_error(conn, f"batch.{fate}", f"batch {batch_id}: {error or fate}")

        await self._tx(work)

    # -- outcomes --------------------------------------------------------------------------

    async def submitted_items(self, batch_id: int, item_ids: Collection[int] | None = None) -> list[SubmittedItem]:
        ids = None if item_ids is None else list(item_ids)
        rows = await self._fetch(Q.submitted_items, batch_id, ids)
        return [_submitted(r) for r in rows]

    async def fallback_answered(self, batch_id: int) -> list[SubmittedItem]:
        return [_submitted(r) for r in await self._fetch(Q.fallback_answered, batch_id)]

    async def record_outcomes(
        self,
        batch_id: int,
        finals: Sequence[FinalResult],
        retries: Sequence[Retry],
        handovers: Collection[int] = (),
    ) -> ApplySummary:
        # One decision per item (the last one given wins), so no statement touches a row twice.
        final_by_item = {f.item_id: f for f in finals}
        retry_by_item = {r.item_id: r for r in retries if r.item_id not in final_by_item}
        decided = list(final_by_item.values())
        requeue = list(retry_by_item.values())
        handed = [i for i in dict.fromkeys(handovers) if i not in final_by_item and i not in retry_by_item]
        now = time.time()

        async def work(conn: Connection) -> tuple[int, int, int, int]:
            applied = 0
            # asyncpg prepares statements; after five runs PostgreSQL may use a generic plan, which
            # for these array statements was 3-8x slower (for add_chunk and claims it is faster).
            await conn.execute(Q.custom_plans)
            duplicates = 0
            if decided:
                await conn.execute(Q.results_lock)
                applied = int(await conn.fetchval(Q.record_finals, batch_id, *_final_arrays(decided), now))
                duplicates = await _record_duplicates(conn, batch_id, decided, now)
            requeued = 0
            if requeue:
                requeued = _count(
                    await conn.execute(
                        Q.record_retries,
                        batch_id,
                        now,
                        [r.item_id for r in requeue],
                        [r.not_before for r in requeue],
                        [r.error for r in requeue],
                        [r.refund for r in requeue],
                    )
                )
            handed_over = 0
            if handed:
                handed_over = _count(await conn.execute(Q.record_handovers, batch_id, handed))
            return applied, requeued, handed_over, duplicates

        if not finals and not retries and not handovers:
            return ApplySummary()
        final, requeued, handed_over, duplicates = await self._tx(work)
        return ApplySummary(
            final=final,
            requeued=requeued,
            ignored=len(finals) + len(retries) + len(handovers) - final - requeued - handed_over - duplicates,
            handed_over=handed_over,
            duplicates=duplicates,
        )

    # -- the real-time fallback ------------------------------------------------------------

    async def fallback_due(self, now: float) -> FallbackDue:
        async def work(conn: Connection) -> FallbackDue:
            taken = _count(await conn.execute(Q.fallback_take_queued, now, self.node))
            rows = await conn.fetch(Q.fallback_cancel_batches, now)
            return FallbackDue(realtime=taken, batches=tuple(sorted(int(r["id"]) for r in rows)))

        return await self._tx(work)

    async def next_fallback_at(self, now: float) -> float | None:
        value = await self._fetchval(Q.next_fallback_at, now)
        return None if value is None else float(value)

    async def hand_over(self, batch_id: int) -> int:
        return _count(await self._execute(Q.hand_over, batch_id))

    async def realtime_items(self, limit: int, exclude: Collection[int] = ()) -> list[RealtimeItem]:
        rows = await self._fetch(Q.realtime_items, self.node, list(exclude), limit)
        return [
            RealtimeItem(
                r["id"], r["file_id"], r["line"], r["custom_id"], r["profile"], r["endpoint"], r["model"],
                bytes(r["body"]), r["tokens"], r["deadline"], r["batch_id"],
            )
            for r in rows
        ]  # fmt: skip

    async def record_realtime(self, finals: Sequence[FinalResult]) -> ApplySummary:
        decided = list({f.item_id: f for f in finals}.values())
        if not decided:
            return ApplySummary()
        now = time.time()

        async def work(conn: Connection) -> tuple[int, int]:
            await conn.execute(Q.custom_plans)
            await conn.execute(Q.results_lock)
            applied = int(await conn.fetchval(Q.record_realtime, *_final_arrays(decided), now))
            return applied, await _record_duplicates(conn, None, decided, now)

        final, duplicates = await self._tx(work)
        return ApplySummary(final=final, ignored=len(finals) - final - duplicates, duplicates=duplicates)

    async def refund_batch(self, batch_id: int, not_before: float, error: str) -> int:
        return _count(await self._execute(Q.refund_batch, batch_id, not_before, time.time(), error))

    async def batch_item_ids(self, batch_id: int) -> list[int]:
        return [r["id"] for r in await self._fetch(Q.batch_item_ids, batch_id)]

    # -- delivery --------------------------------------------------------------------------

    async def sink_cursor(self, sink: str) -> int:
        value = await self._fetchval(Q.sink_cursor, sink)
        return int(value) if value is not None else 0

    async def results_after(self, last_id: int, limit: int, node: str | None = None) -> list[PendingResult]:
        return [_pending(r) for r in await self._fetch(Q.results_after, last_id, limit, node)]

    async def advance_cursor(self, sink: str, last_id: int) -> None:
        await self._execute(Q.advance_cursor, sink, last_id)

    async def park(self, sink: str, result_ids: Sequence[int], error: str, advance_to: int | None) -> None:
        ids = list(dict.fromkeys(result_ids))

        async def work(conn: Connection) -> None:
            if ids:
                await conn.execute(Q.park, sink, ids, time.time(), error)
            if advance_to is not None:
                await conn.execute(Q.advance_cursor, sink, advance_to)
            await self._add_error(conn, "sink.parked", f"{sink}: {len(result_ids)} results parked: {error}")

        await self._tx(work)

    async def to_redeliver(self, sink: str, limit: int) -> list[PendingResult]:
        return [_pending(r) for r in await self._fetch(Q.to_redeliver, sink, limit)]

    async def unpark(self, sink: str, result_ids: Sequence[int]) -> None:
        if result_ids:
            await self._execute(Q.unpark, sink, list(result_ids))

    async def request_redelivery(self, sink: str | None) -> int:
        return _count(await self._execute(Q.request_redelivery, sink))

    async def take_sink_lease(self, sink: str, lease_seconds: float, now: float) -> bool:
        async def work(conn: Connection) -> bool:
            return await conn.fetchval(Q.take_sink_lease, sink, self.node, now, now + lease_seconds) is not None

        return await self._tx(work)

    async def outbox_delivered(self, sink: str, last_id: int, files: dict[int, tuple[int, int]]) -> None:
        ids = list(files)

        async def work(conn: Connection) -> None:
            await conn.execute(Q.set_cursor, sink, last_id)
            if ids:
                await conn.execute(Q.files_delivered, ids, [files[i][0] for i in ids], [files[i][1] for i in ids])

        await self._tx(work)

    async def open_files(self) -> list[FileRow]:
        return [_file(r) for r in await self._fetch(Q.open_files, self.node)]

    async def file(self, file_id: int) -> FileRow | None:
        row = await self._fetchrow(Q.file, file_id)
        return _file(row) if row else None

    async def files_by_id(self, file_ids: Iterable[int]) -> dict[int, FileRow]:
        ids = sorted(set(file_ids))
        if not ids:
            return {}
        return {r["id"]: _file(r) for r in await self._fetch(Q.files_by_id, ids)}

    async def delivered_payloads(self, file_id: int, after_id: int, limit: int) -> list[tuple[int, bytes]]:
        rows = await self._fetch(Q.delivered_payloads, file_id, after_id, limit)
        return [(int(r["id"]), bytes(r["payload"])) for r in rows]

    async def complete_file(self, file_id: int) -> None:
        await self._execute(Q.complete_file, file_id, time.time())

    # -- reporting -------------------------------------------------------------------------

    async def instance_id(self) -> str:
        if not self._instance:
            self._instance = str(await self._fetchval(Q.instance))
        return self._instance

    async def add_error(self, event: str, message: str) -> None:
        async def work(conn: Connection) -> None:
            await self._add_error(conn, event, message)

        await self._tx(work)

    async def report(self, since: float, by: str) -> list[dict[str, Any]]:
        if by not in REPORT_KEYS:
            raise KeyError(by)
        rows = await self._fetch(Q.report, since, by)
        return [
            {
                "key": r["key"],
                "requests": int(r["requests"]),
                "succeeded": int(r["succeeded"]),
                "input_tokens": int(r["input_tokens"]),
                "cached_input_tokens": int(r["cached_input_tokens"]),
                "output_tokens": int(r["output_tokens"]),
                "cost_batch": r["cost_batch"],
                "cost_realtime": r["cost_realtime"],
                "unpriced": int(r["unpriced"]),
                "cost_paid": r["cost_paid"],
                "fallback_requests": int(r["fallback_requests"]),
                "fallback_cost": r["fallback_cost"],
                "deadlines_met": int(r["deadlines_met"]),
                "deadlines_missed": int(r["deadlines_missed"]),
                "duplicate_requests": int(r["duplicate_requests"]),
                "duplicate_cost": r["duplicate_cost"],
            }
            for r in rows
        ]

    async def query_results(
        self, file: str | None, custom_id: str | None, status: str | None, limit: int
    ) -> list[dict[str, Any]]:
        rows = await self._fetch(Q.query_results, file, custom_id, status, limit)
        return [
            {"file": r["file"], "line": r["line"], "status": r["status"], "payload": bytes(r["payload"])} for r in rows
        ]

    # -- operations (issue 12) ---------------------------------------------------------------

    async def pause(self, profile: str, model: str, reason: str | None = None) -> bool:
        async def work(conn: Connection) -> bool:
            before = await conn.fetch(Q.pauses)
            await conn.execute(Q.pause, profile, model, time.time(), reason)
            return not any(r["profile"] == profile and r["model"] == model for r in before)

        return await self._tx(work)

    async def resume(self, profile: str | None = None, model: str | None = None) -> int:
        if profile is None:
            return _count(await self._execute(Q.resume_all))
        return _count(await self._execute(Q.resume_route, profile, model or "*"))

    async def pauses(self) -> list[Pause]:
        rows = await self._fetch(Q.pauses)
        return [Pause(r["profile"], r["model"], r["paused_at"], r["reason"]) for r in rows]

    async def request_flush(self, route: str, now: float) -> None:
        await self._execute(Q.request_flush, route, now)

    async def recent_batches(self, limit: int) -> list[BatchRow]:
        return [_batch(r) for r in await self._fetch(Q.recent_batches, limit)]

    async def request_cancel(self, batch_id: int, reason: CancelReason, now: float) -> bool:
        return _count(await self._execute(Q.request_cancel, batch_id, reason.value, now)) > 0

    async def files_named(self, name: str) -> list[FileRow]:
        return [_file(r) for r in await self._fetch(Q.files_named, name)]

    async def queued_items(self, file_id: int) -> list[SubmittedItem]:
        rows = await self._fetch(Q.queued_items, file_id)
        return [SubmittedItem(r["id"], r["file_id"], r["line"], r["custom_id"], r["attempts"]) for r in rows]

    async def file_items(self, file_id: int) -> list[FileItem]:
        rows = await self._fetch(Q.file_items, file_id)
        return [
            FileItem(
                r["id"],
                r["line"],
                r["custom_id"],
                ItemState(r["state"]),
                r["profile"],
                r["endpoint"],
                r["model"],
                r["deadline"],
                r["fallback_at"],
                r["tokens"],
                r["inputs"],
            )
            for r in rows
        ]

    async def cancel_file(self, file_id: int, finals: Sequence[FinalResult], now: float) -> tuple[int, list[int]]:
        mine = list({f.item_id: f for f in finals if f.file_id == file_id}.values())

        async def work(conn: Connection) -> tuple[int, list[int]]:
            await conn.execute(Q.mark_file_canceled, file_id, now)
            applied = 0
            if mine:
                await conn.execute(Q.results_lock)
                applied = await conn.fetchval(
                    Q.finish_unsent,
                    [ItemState.QUEUED.value, ItemState.REALTIME.value],
                    [f.item_id for f in mine],
                    [str(f.status) for f in mine],
                    [f.payload for f in mine],
                    now,
                    None,
                    file_id,
                )
            batches = [int(r["batch_id"]) for r in await conn.fetch(Q.file_live_batches, file_id)]
            for batch_id in batches:
                await conn.execute(Q.request_cancel, batch_id, CancelReason.FILE.value, now)
            return int(applied), batches

        return await self._tx(work)

    async def prune_finished(self, before: float, limit: int = 100, sinks: Collection[str] = ()) -> PruneSummary:
        # Cursors only move forward: read before the transaction, they can only be conservative.
        delivered = min([await self.sink_cursor(sink) for sink in sinks], default=None)

        async def work(conn: Connection) -> PruneSummary:
            files = [r["id"] for r in await conn.fetch(Q.prunable_files, before, limit, delivered)]
            results = 0
            if files:
                # The report's totals first, in this transaction: pruned rows are never uncounted.
                await conn.execute(Q.fold_totals, files)
                await conn.execute(Q.fold_duplicates, files)
                await conn.execute(Q.fold_metric_files, files)
                await conn.execute(Q.prune_duplicates, files)
                results = _count(await conn.execute(Q.prune_results, files))
                await conn.execute(Q.prune_items, files)  # their bodies go by ON DELETE CASCADE
                await conn.execute(Q.prune_files, files)
            batches = [r["id"] for r in await conn.fetch(Q.prunable_batches, before, limit)]
            if batches:
                await conn.execute(Q.fold_metric_batches, batches, list(TURNAROUND_BUCKETS))
                await conn.execute(Q.prune_batch_rejects, batches)
                await conn.execute(Q.prune_batches, batches)
            return PruneSummary(files=len(files), results=results, batches=len(batches))

        return await self._tx(work)

    async def status(self, errors: int = 10) -> dict[str, Any]:
        """A snapshot for `batchd status`, read in one repeatable-read transaction (consistent)."""
        return await settle(self._status(errors))

    async def _status(self, errors: int) -> dict[str, Any]:
        now = time.time()
        async with self._db.acquire() as conn, conn.transaction(isolation="repeatable_read", readonly=True):
            queue = await conn.fetch(Q.status_queue)
            live = [_batch(r) for r in await conn.fetch(Q.batches_in_state, [str(s) for s in LIVE_BATCH_STATES])]
            ended_badly = await conn.fetch(Q.status_ended_batches)
            totals = await conn.fetch(Q.status_results)
            files = await conn.fetch(Q.status_files)
            recent = await conn.fetch(Q.status_errors, errors)
            holds = await conn.fetch(Q.status_holds, now)
            sinks = await conn.fetch(Q.status_sinks)
            nodes = await conn.fetch(Q.status_nodes)
        routes: dict[tuple[str, str, str], dict[str, int]] = {}
        for row in queue:
            key = (row["profile"], row["endpoint"], row["model"])
            routes.setdefault(key, {"queued": 0, "batched": 0, "submitted": 0})[row["state"]] = int(row["n"])
        return {
            "queue": [
                {"provider": p, "endpoint": e, "model": m, **counts} for (p, e, m), counts in sorted(routes.items())
            ],
            "batches": [
                {
                    "id": b.id,
                    "provider": b.profile,
                    "endpoint": b.endpoint,
                    "model": b.model,
                    "state": b.state.value,
                    "remote_id": b.remote_id,
                    "remote_status": b.remote_status,
                    "requests": b.requests,
                    "counts": b.counts,
                    "created_at": b.created_at,
                    "last_error": b.last_error,
                    "cancel_requested_at": b.cancel_requested_at,
                    "owner": b.owner,
                    "lease_until": b.lease_until,
                }
                for b in live
            ],
            "ended_batches": [dict(row) for row in ended_badly],
            "results": {row["status"]: int(row["n"]) for row in totals},
            "files": [dict(row) for row in files],
            "holds": [dict(row) for row in holds],
            "sinks": [
                {"sink": row["sink"], "pending": int(row["pending"]), "parked": int(row["parked"])} for row in sinks
            ],
            "errors": [dict(row) for row in recent],
            "nodes": [dict(row) for row in nodes],
        }

    async def metrics(self) -> dict[str, list[dict[str, Any]]]:
        """Database-wide aggregates for /metrics (see the contract), in one consistent read."""
        return await settle(self._metrics())

    async def _metrics(self) -> dict[str, list[dict[str, Any]]]:
        async with self._db.acquire() as conn, conn.transaction(isolation="repeatable_read", readonly=True):
            reads = {name: await conn.fetch(getattr(Q, f"metrics_{name}")) for name in METRICS_READS}
            reads["sinks"] = await conn.fetch(Q.status_sinks)
        # SUM over bigint is numeric (Decimal) in PostgreSQL: plain numbers, as the SQLite engine gives.
        return {name: [{k: _plain(v) for k, v in row.items()} for row in rows] for name, rows in reads.items()}


def _plain(value: Any) -> Any:
    if isinstance(value, Decimal):
        return int(value) if value == value.to_integral_value() else float(value)
    return value


if TYPE_CHECKING:

    def _is_a_store(store: PostgresStore) -> contract.Store:
        """mypy proves here that PostgresStore satisfies the whole contract."""
        return store


# The error event a cancel request at the provider leaves, by why it was made.
_CANCEL_EVENTS = {
    CancelReason.EXPIRY: "batch.overdue_cancelled",
    CancelReason.DEADLINE: "batch.deadline_cancelled",
}
