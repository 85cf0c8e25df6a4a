"""The durable queue: the only module that speaks SQL.

One aiosqlite connection in WAL mode with synchronous=FULL, so that every commit is durable
before the caller takes an irreversible step (moving a spool file, calling a provider). Every
statement runs under one asyncio lock, so a transaction never interleaves with another
coroutine's statements on the shared connection. Schema changes are numbered migrations in
`batchd/sql/NNN_*.sql`, tracked with `PRAGMA user_version`.
"""

from __future__ import annotations

import asyncio
import errno
import os
import sqlite3
import time
import urllib.parse
import uuid
from collections.abc import AsyncIterator, Callable, Iterable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any, ClassVar

import aiosqlite
import orjson

from ..exits import EX_DATAERR, EX_IOERR, EX_NOPERM, OperatorError, creating_status
from ..formats import Outcome, Status, invalid_result, item_id_from_custom_id, provider_custom_id, result_line
from ..pricing import UNPRICED, Cost

FINAL_ITEM_STATES = ("succeeded", "errored", "expired", "canceled")
ERRORS_KEPT = 200


@dataclass(slots=True)
class NewItem:
    """A valid line about to be queued."""

    line: int
    custom_id: str
    profile: str
    endpoint: str
    model: str
    body: bytes
    size: int


@dataclass(frozen=True, slots=True)
class NewResult:
    """A result decided without a provider (an invalid line)."""

    line: int
    status: Status
    payload: bytes


@dataclass(frozen=True, slots=True)
class Group:
    """Queued items that may share a provider batch."""

    profile: str
    endpoint: str
    model: str
    count: int
    bytes: int
    oldest: float


@dataclass(slots=True)
class BatchRow:
    """A provider batch as recorded here."""

    id: int
    profile: str
    kind: str
    endpoint: str
    model: str
    state: str
    remote_id: str | None
    remote_status: str | None
    input_file_id: str | None
    output_file_id: str | None
    error_file_id: str | None
    requests: int
    bytes: int
    counts: dict[str, int] | None
    created_at: float
    submitted_at: float | None
    submit_attempts: int
    not_before: float
    last_error: str | None
    remote_created_at: float | None = None
    cancel_requested_at: float | None = None
    ended_at: float | None = None
    fate: str | None = None


class BatchState:
    """Local batch states (batches.state); the provider's own word is kept apart in remote_status."""

    PENDING = "pending"  # an intent with no remote batch known
    UNVERIFIED = "unverified"  # adopted by reconciliation, not yet proven ours (Anthropic)
    SUBMITTED = "submitted"  # a remote batch that is ours
    DONE = "done"  # collected, or ended in a defined way (`fate`)
    LIVE = (PENDING, UNVERIFIED, SUBMITTED)
    POLLED = (UNVERIFIED, SUBMITTED)


RetryAt = float | Callable[[int], float]


@dataclass(frozen=True, slots=True)
class PendingResult:
    """A result line waiting for a sink."""

    id: int
    file_id: int
    out_name: str
    payload: bytes
    created_at: float = 0.0


@dataclass(frozen=True, slots=True)
class FileRow:
    id: int
    name: str
    out_name: str
    lines: int
    delivered: int
    out_bytes: int
    state: str


@dataclass(frozen=True, slots=True)
class ApplySummary:
    """What one chunk of provider outcomes did to the queue."""

    final: int = 0
    requeued: int = 0
    ignored: int = 0

    def __add__(self, other: ApplySummary) -> ApplySummary:
        return ApplySummary(self.final + other.final, self.requeued + other.requeued, self.ignored + other.ignored)


def _batch_from_row(row: sqlite3.Row) -> BatchRow:
    counts = orjson.loads(row["counts"]) if row["counts"] else None
    return BatchRow(
        id=row["id"],
        profile=row["profile"],
        kind=row["kind"],
        endpoint=row["endpoint"],
        model=row["model"],
        state=row["state"],
        remote_id=row["remote_id"],
        remote_status=row["remote_status"],
        input_file_id=row["input_file_id"],
        output_file_id=row["output_file_id"],
        error_file_id=row["error_file_id"],
        requests=row["requests"],
        bytes=row["bytes"],
        counts=counts,
        created_at=row["created_at"],
        submitted_at=row["submitted_at"],
        submit_attempts=row["submit_attempts"],
        not_before=row["not_before"],
        last_error=row["last_error"],
        remote_created_at=row["remote_created_at"],
        cancel_requested_at=row["cancel_requested_at"],
        ended_at=row["ended_at"],
        fate=row["fate"],
    )


def _migrations() -> list[tuple[int, str]]:
    found = []
    for entry in resources.files("batchd.store").joinpath("sqlite_migrations").iterdir():
        name = entry.name
        if name.endswith(".sql") and name[:3].isdigit():
            found.append((int(name[:3]), entry.read_text()))
    return sorted(found)


SCHEMA_VERSION = _migrations()[-1][0]


def _newer_schema(path: Path, version: int) -> str:
    return (
        f"the database {path} has schema version {version}, newer than this batchd understands"
        f" ({SCHEMA_VERSION}): run the batchd that migrated it"
    )


class _NotCreatedYet(Exception):
    """The database file exists but holds no schema yet."""


class Store:
    """The queue, batches, results and delivery state of one daemon."""

    def __init__(self, path: Path, busy_timeout: float = 10.0) -> None:
        self.path = path
        # How long a statement waits for another connection's write lock before "database is locked".
        self.busy_timeout = busy_timeout
        self._db: aiosqlite.Connection | None = None
        self._lock = asyncio.Lock()
        self._instance = ""

    # -- lifecycle -------------------------------------------------------------------------

    @classmethod
    @asynccontextmanager
    async def existing(cls, path: Path, writable: bool = False) -> AsyncIterator[Store | None]:
        """For commands beside the daemon: the store if a daemon has created it, else None.

        Never creates, migrates or checkpoints the database: read-only unless `writable` (for
        `batchd redeliver`). A schema other than this code's is an `OperatorError`, as is a
        database the caller may not read.
        """
        try:
            os.stat(path)
        except (FileNotFoundError, NotADirectoryError):
            yield None
            return
        except PermissionError:
            raise OperatorError(f"cannot reach the database {path}: permission denied", EX_NOPERM) from None
        store = cls(path)
        try:
            await store.open_existing(writable)
        except _NotCreatedYet:
            yield None
            return
        try:
            yield store
        finally:
            await store.close()

    async def open_existing(self, writable: bool = False) -> None:
        """Open a database the daemon made, without creating or migrating it (see `existing`)."""
        try:
            os.close(os.open(self.path, (os.O_RDWR if writable else os.O_RDONLY) | os.O_CLOEXEC))
        except OSError as exc:
            status = EX_NOPERM if exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS) else EX_IOERR
            access = "write" if writable else "read"
            raise OperatorError(f"cannot {access} the database {self.path}: {exc.strerror or exc}", status) from None
        uri = f"file:{urllib.parse.quote(str(self.path.absolute()))}?mode={'rw' if writable else 'ro'}"
        if not writable and not self.path.with_name(self.path.name + "-wal").exists():
            # No -wal file: no connection has the database open and every committed page is in
            # the main file. Reading it as immutable creates no -wal or -shm beside it (which a
            # reader may not be allowed to do, and should not do to another user's database).
            uri += "&immutable=1"
        try:
            db = await self._connect_existing(uri)
        except sqlite3.Error as exc:
            raise self._open_error(exc) from None
        self._db = db
        version = await self._schema_version()
        latest = SCHEMA_VERSION
        if version == 0:
            # An empty file: a daemon is creating the database right now (its first migration is
            # one transaction), so there is nothing to show yet, as when there is no file at all.
            await self.close()
            raise _NotCreatedYet
        if version < latest:
            await self.close()
            raise OperatorError(
                f"the database {self.path} has schema version {version}, this batchd uses {latest}:"
                " start the daemon (batchd run) once to migrate it",
                EX_DATAERR,
            )
        if version > latest:
            await self.close()
            raise OperatorError(_newer_schema(self.path, version), EX_DATAERR)

    async def _connect_existing(self, uri: str) -> aiosqlite.Connection:
        db = await aiosqlite.connect(uri, uri=True, isolation_level=None)
        try:
            db.row_factory = sqlite3.Row
            await db.execute("PRAGMA busy_timeout=10000")
            await db.execute("PRAGMA foreign_keys=ON")
            # The first read of the schema is where SQLite finds a non-database or a missing -shm.
            await (await db.execute("PRAGMA user_version")).fetchone()
        except BaseException:
            await db.close()
            raise
        return db

    def _open_error(self, exc: sqlite3.Error) -> OperatorError:
        name = getattr(exc, "sqlite_errorname", "")
        if name == "SQLITE_NOTADB":
            return OperatorError(f"{self.path} is not a batchd database: {exc}", EX_DATAERR)
        if name.startswith(("SQLITE_READONLY", "SQLITE_PERM", "SQLITE_AUTH")) or name == "SQLITE_CANTOPEN":
            return OperatorError(f"cannot open the database {self.path}: {exc}", EX_NOPERM)
        return OperatorError(f"cannot read the database {self.path}: {exc}", EX_IOERR)

    async def _schema_version(self) -> int:
        row = await self._fetchone("PRAGMA user_version")
        return int(row[0]) if row else 0

    async def open(self) -> None:
        """Open (creating with mode 0600) and migrate the database."""
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            # O_RDWR also proves, before SQLite's vaguer "unable to open", that we may write it.
            os.close(os.open(self.path, os.O_CREAT | os.O_RDWR | os.O_CLOEXEC, 0o600))
        except OSError as exc:
            raise OperatorError(
                f"cannot open the database {self.path}: {exc.strerror or exc}", creating_status(exc)
            ) from None
        db = await aiosqlite.connect(self.path, isolation_level=None)
        try:
            db.row_factory = sqlite3.Row
            await db.execute("PRAGMA journal_mode=WAL")
            await db.execute("PRAGMA synchronous=FULL")
            await db.execute("PRAGMA foreign_keys=ON")
            await db.execute(f"PRAGMA busy_timeout={int(self.busy_timeout * 1000)}")
        except sqlite3.Error as exc:
            await db.close()
            raise self._open_error(exc) from None
        self._db = db
        version = await self._schema_version()
        if version > SCHEMA_VERSION:
            # An older batchd must not run on a database a newer one has migrated.
            await self.close()
            raise OperatorError(_newer_schema(self.path, version), EX_DATAERR)
        await self._migrate()

    async def close(self) -> None:
        if self._db is not None:
            async with self._lock:
                await self._db.close()
            self._db = None

    async def _migrate(self) -> None:
        db = self._conn
        async with self._lock:
            # A migration that rebuilds a referenced table (DROP + RENAME) must run with foreign keys
            # off (the pragma is a no-op inside a transaction); they are checked before each commit.
            await db.execute("PRAGMA foreign_keys=OFF")
            try:
                # Every pending migration in one write transaction: a reader (`batchd status` beside a
                # starting daemon) sees the old schema or the new one, never a version in between. The
                # version is read inside it, so two processes opening a new database never migrate twice.
                await db.execute("BEGIN IMMEDIATE")
                try:
                    (version,) = await (await db.execute("PRAGMA user_version")).fetchone() or (0,)
                    for number, script in _migrations():
                        if number <= version:
                            continue
                        for statement in script.split(";\n"):
                            if statement.strip():
                                await db.execute(statement)
                        broken = await db.execute_fetchall("PRAGMA foreign_key_check")
                        if list(broken):
                            raise sqlite3.IntegrityError(f"migration {number:03d} broke a foreign key")
                        await db.execute(f"PRAGMA user_version={number}")
                    await db.execute("COMMIT")
                except BaseException:
                    await db.execute("ROLLBACK")
                    raise
            finally:
                await db.execute("PRAGMA foreign_keys=ON")
            await db.execute("INSERT OR IGNORE INTO meta (key, value) VALUES ('instance', ?)", (uuid.uuid4().hex,))
            rows = list(await db.execute_fetchall("SELECT value FROM meta WHERE key = 'instance'"))
            self._instance = str(rows[0][0])

    @property
    def _conn(self) -> aiosqlite.Connection:
        if self._db is None:
            raise RuntimeError("store is not open")
        return self._db

    @asynccontextmanager
    async def _tx(self) -> AsyncIterator[aiosqlite.Connection]:
        async with self._lock:
            db = self._conn
            await db.execute("BEGIN IMMEDIATE")
            try:
                yield db
            except BaseException:
                await db.execute("ROLLBACK")
                raise
            await db.execute("COMMIT")

    async def _fetchall(self, sql: str, params: Sequence[Any] = ()) -> list[sqlite3.Row]:
        async with self._lock:
            rows = await self._conn.execute_fetchall(sql, params)
        return list(rows)

    async def _fetchone(self, sql: str, params: Sequence[Any] = ()) -> sqlite3.Row | None:
        rows = await self._fetchall(sql, params)
        return rows[0] if rows else None

    async def instance_id(self) -> str:
        row = await self._fetchone("SELECT value FROM meta WHERE key = 'instance'")
        assert row is not None
        return str(row["value"])

    async def integrity_check(self) -> str:
        row = await self._fetchone("PRAGMA integrity_check")
        return str(row[0]) if row else "no answer"

    # -- intake ----------------------------------------------------------------------------

    async def file_known(self, name: str, sha256: str, dev: int, ino: int) -> tuple[int, str] | None:
        """(id, results name) of this very file if it was ingested but never moved out of new/ (a crash between).

        Identity is (name, content, inode, still in new/): the same name and content dropped again
        after the first copy left new/ is another file. The device number is recorded but not
        compared: it is not stable across reboots for every filesystem, and a crash is often one.
        """
        row = await self._fetchone(
            "SELECT id, out_name FROM files WHERE name = ? AND sha256 = ? AND ino = ? AND moved_at IS NULL"
            " ORDER BY id DESC LIMIT 1",
            (name, sha256, ino),
        )
        return (int(row["id"]), str(row["out_name"])) if row else None

    async def file_moved(self, file_id: int) -> None:
        """Record that the file left new/ (after the rename is durable)."""
        async with self._tx() as db:
            await db.execute("UPDATE files SET moved_at = ? WHERE id = ?", (time.time(), file_id))

    @asynccontextmanager
    async def ingest(
        self,
        name: str,
        sha256: str,
        size: int,
        dev: int | None = None,
        ino: int | None = None,
        out_taken: Callable[[str], bool] | None = None,
    ) -> AsyncIterator[Ingest]:
        """One transaction for one spool file: all its items and invalid results, or nothing.

        The results name is chosen here, once: NAME.results.jsonl unless `out_taken(name)` (something
        is in out/ under that name or its .part) or an open file holds it, else NAME.N.results.jsonl
        with the first free N. A finished file whose results are gone from out/ gives its name up
        (its row keeps it as NAME.results.jsonl~ID), so a producer that consumed yesterday's results
        finds today's under the same name.
        """
        stem = name[: -len(".jsonl")] if name.endswith(".jsonl") else name
        async with self._tx() as db:
            number = 0
            out_name = f"{stem}.results.jsonl"
            while True:
                if out_taken is None or not out_taken(out_name):
                    rows = list(
                        await db.execute_fetchall("SELECT id, state FROM files WHERE out_name = ?", (out_name,))
                    )
                    if not rows:
                        break
                    if rows[0]["state"] == "complete":
                        await db.execute(
                            "UPDATE files SET out_name = out_name || '~' || id WHERE id = ?", (rows[0]["id"],)
                        )
                        break
                number += 1
                out_name = f"{stem}.{number}.results.jsonl"
            cursor = await db.execute(
                "INSERT INTO files (name, sha256, size, out_name, ingested_at, dev, ino) VALUES (?, ?, ?, ?, ?, ?, ?)",
                (name, sha256, size, out_name, time.time(), dev, ino),
            )
            file_id = cursor.lastrowid
            assert file_id is not None
            ingest = Ingest(db, file_id, out_name)
            yield ingest
            await ingest.finish()

    # -- batching --------------------------------------------------------------------------

    async def queued_groups(self, now: float) -> list[Group]:
        rows = await self._fetchall(
            "SELECT profile, endpoint, model, COUNT(*) AS n, SUM(size) AS bytes, MIN(queued_at) AS oldest"
            " FROM items WHERE state = 'queued' AND not_before <= ?"
            " GROUP BY profile, endpoint, model",
            (now,),
        )
        return [Group(r["profile"], r["endpoint"], r["model"], r["n"], r["bytes"], r["oldest"]) for r in rows]

    async def next_not_before(self, now: float) -> float | None:
        row = await self._fetchone(
            "SELECT MIN(not_before) AS t FROM items WHERE state = 'queued' AND not_before > ?", (now,)
        )
        return float(row["t"]) if row and row["t"] is not None else None

    async def claim_batch(
        self,
        group: Group,
        kind: str,
        max_requests: int,
        max_bytes: int,
        now: float,
        avoid_counts: frozenset[int] = frozenset(),
    ) -> BatchRow | None:
        """Record a batch intent and move up to the limits of the group's oldest items into it.

        A batch never gets a request count in `avoid_counts`: one item is left queued instead.
        """
        async with self._tx() as db:
            cursor = await db.execute(
                "INSERT INTO batches (profile, kind, endpoint, model, created_at) VALUES (?, ?, ?, ?, ?)",
                (group.profile, kind, group.endpoint, group.model, now),
            )
            batch_id = cursor.lastrowid
            await db.execute(
                "UPDATE items SET state = 'batched', batch_id = :batch WHERE id IN ("
                " SELECT id FROM ("
                "  SELECT id, SUM(size) OVER (ORDER BY id) AS running FROM items"
                "  WHERE state = 'queued' AND profile = :profile AND endpoint = :endpoint AND model = :model"
                "   AND not_before <= :now ORDER BY id LIMIT :max_requests"
                " ) WHERE running <= :max_bytes)",
                {
                    "batch": batch_id,
                    "profile": group.profile,
                    "endpoint": group.endpoint,
                    "model": group.model,
                    "now": now,
                    "max_requests": max_requests,
                    "max_bytes": max_bytes,
                },
            )
            rows = await db.execute_fetchall(
                "SELECT COUNT(*), COALESCE(SUM(size), 0) FROM items WHERE batch_id = ?", (batch_id,)
            )
            count, size = next(iter(rows))
            while count in avoid_counts and count > 0:
                await db.execute(
                    "UPDATE items SET state = 'queued', batch_id = NULL"
                    " WHERE id = (SELECT MAX(id) FROM items WHERE batch_id = ?)",
                    (batch_id,),
                )
                rows = await db.execute_fetchall(
                    "SELECT COUNT(*), COALESCE(SUM(size), 0) FROM items WHERE batch_id = ?", (batch_id,)
                )
                count, size = next(iter(rows))
            if count == 0:
                await db.execute("DELETE FROM batches WHERE id = ?", (batch_id,))
                return None
            await db.execute("UPDATE batches SET requests = ?, bytes = ? WHERE id = ?", (count, size, batch_id))
            rows = await db.execute_fetchall("SELECT * FROM batches WHERE id = ?", (batch_id,))
            return _batch_from_row(next(iter(rows)))

    async def batch_bodies(self, batch_id: int, chunk: int = 2000) -> AsyncIterator[list[tuple[int, str, bytes]]]:
        """The batch's requests as (item id, endpoint, body), in chunks, in id order."""
        last = 0
        while True:
            rows = await self._fetchall(
                "SELECT i.id, i.endpoint, b.body FROM items i JOIN item_bodies b ON b.item_id = i.id"
                " WHERE i.batch_id = ? AND i.id > ? ORDER BY i.id LIMIT ?",
                (batch_id, last, chunk),
            )
            if not rows:
                return
            yield [(r["id"], r["endpoint"], bytes(r["body"])) for r in rows]
            last = rows[-1]["id"]

    async def batch_item_ids(self, batch_id: int) -> list[int]:
        """The batch's items in the order of its input file."""
        rows = await self._fetchall("SELECT id FROM items WHERE batch_id = ? ORDER BY id", (batch_id,))
        return [row["id"] for row in rows]

    async def batches_in_state(self, *states: str) -> list[BatchRow]:
        marks = ",".join("?" for _ in states)
        rows = await self._fetchall(f"SELECT * FROM batches WHERE state IN ({marks}) ORDER BY id", states)
        return [_batch_from_row(r) for r in rows]

    async def batch(self, batch_id: int) -> BatchRow | None:
        row = await self._fetchone("SELECT * FROM batches WHERE id = ?", (batch_id,))
        return _batch_from_row(row) if row else None

    async def remote_ids(self, profile: str) -> set[str]:
        rows = await self._fetchall(
            "SELECT remote_id FROM batches WHERE profile = ? AND remote_id IS NOT NULL", (profile,)
        )
        return {r["remote_id"] for r in rows}

    async def set_input_file(self, batch_id: int, input_file_id: str | None) -> None:
        async with self._tx() as db:
            await db.execute("UPDATE batches SET input_file_id = ? WHERE id = ?", (input_file_id, batch_id))

    async def note_submit_failure(self, batch_id: int, error: str, retry_at: float) -> None:
        async with self._tx() as db:
            await db.execute(
                "UPDATE batches SET submit_attempts = submit_attempts + 1, last_error = ?, not_before = ? WHERE id = ?",
                (error, retry_at, batch_id),
            )
            await self._add_error(db, "batch.submit_failed", f"batch {batch_id}: {error}")

    async def remote_owner(self, remote_id: str) -> int | None:
        row = await self._fetchone("SELECT id FROM batches WHERE remote_id = ?", (remote_id,))
        return int(row["id"]) if row else None

    async def mark_submitted(
        self, batch_id: int, remote_id: str, remote_status: str, now: float, remote_created_at: float | None = None
    ) -> None:
        """The provider holds the batch now: record its id and count an attempt for each item."""
        async with self._tx() as db:
            await db.execute(
                "UPDATE batches SET state = 'submitted', remote_id = ?, remote_status = ?, submitted_at = ?,"
                " remote_created_at = ?, last_error = NULL WHERE id = ?",
                (remote_id, remote_status, now, remote_created_at or now, batch_id),
            )
            await db.execute(
                "UPDATE items SET state = 'submitted', attempts = attempts + 1"
                " WHERE batch_id = ? AND state = 'batched'",
                (batch_id,),
            )

    async def mark_unverified(
        self, batch_id: int, remote_id: str, remote_status: str, now: float, remote_created_at: float | None
    ) -> None:
        """A remote batch that may be this intent's (found by count and time): held, not yet ours.

        Its items stay `batched` and no attempt is counted until the batch is proven ours, so a
        stranger's batch can be let go without a trace on the items.
        """
        async with self._tx() as db:
            await db.execute(
                "UPDATE batches SET state = 'unverified', remote_id = ?, remote_status = ?, submitted_at = ?,"
                " remote_created_at = ?, last_error = ? WHERE id = ? AND state = 'pending'",
                (
                    remote_id,
                    remote_status,
                    now,
                    remote_created_at or now,
                    f"adopted {remote_id} provisionally: ownership is proven from its results once it has ended",
                    batch_id,
                ),
            )

    async def confirm_ownership(self, batch_id: int) -> None:
        """The unverified batch's results prove it ours: it becomes submitted, each item counts an attempt."""
        async with self._tx() as db:
            await db.execute(
                "UPDATE batches SET state = 'submitted', last_error = NULL WHERE id = ? AND state = 'unverified'",
                (batch_id,),
            )
            await db.execute(
                "UPDATE items SET state = 'submitted', attempts = attempts + 1"
                " WHERE batch_id = ? AND state = 'batched'",
                (batch_id,),
            )

    async def unadopt(self, batch_id: int, remote_id: str, reason: str) -> None:
        """The unverified batch is not ours: let it go, never offer it to this intent again, reconcile anew."""
        async with self._tx() as db:
            await db.execute(
                "INSERT OR IGNORE INTO batch_rejects (batch_id, remote_id, rejected_at, reason) VALUES (?, ?, ?, ?)",
                (batch_id, remote_id, time.time(), reason),
            )
            # submit_attempts > 0 makes the batcher reconcile again before it ever creates.
            await db.execute(
                "UPDATE batches SET state = 'pending', remote_id = NULL, remote_status = NULL, counts = NULL,"
                " submitted_at = NULL, remote_created_at = NULL, ended_at = NULL, output_file_id = NULL,"
                " error_file_id = NULL, submit_attempts = submit_attempts + 1, not_before = 0, last_error = ?"
                " WHERE id = ? AND state = 'unverified' AND remote_id = ?",
                (f"{remote_id} was not ours: {reason}", batch_id, remote_id),
            )
            await self._add_error(db, "batch.not_ours", f"batch {batch_id}: {remote_id}: {reason}")

    async def rejected_remotes(self, batch_id: int) -> set[str]:
        rows = await self._fetchall("SELECT remote_id FROM batch_rejects WHERE batch_id = ?", (batch_id,))
        return {r["remote_id"] for r in rows}

    async def note_cancel_requested(self, batch_id: int, error: str) -> None:
        async with self._tx() as db:
            await db.execute(
                "UPDATE batches SET cancel_requested_at = COALESCE(cancel_requested_at, ?), last_error = ?"
                " WHERE id = ?",
                (time.time(), error, batch_id),
            )
            await self._add_error(db, "batch.overdue_cancelled", f"batch {batch_id}: {error}")

    async def record_poll(
        self,
        batch_id: int,
        remote_status: str,
        counts: dict[str, int] | None,
        output_file_id: str | None,
        error_file_id: str | None,
        ended: bool = False,
    ) -> None:
        """The provider's latest answer; `ended` stamps when the batch was first seen ended."""
        now = time.time()
        async with self._tx() as db:
            await db.execute(
                "UPDATE batches SET remote_status = ?, counts = ?, output_file_id = ?, error_file_id = ?,"
                " last_polled_at = ?, ended_at = CASE WHEN ? THEN COALESCE(ended_at, ?) ELSE ended_at END"
                " WHERE id = ?",
                (
                    remote_status,
                    orjson.dumps(counts) if counts else None,
                    output_file_id,
                    error_file_id,
                    now,
                    ended,
                    now,
                    batch_id,
                ),
            )

    async def note_batch_error(self, batch_id: int, event: str, error: str) -> None:
        async with self._tx() as db:
            await db.execute("UPDATE batches SET last_error = ? WHERE id = ?", (error, batch_id))
            await self._add_error(db, event, f"batch {batch_id}: {error}")

    async def apply_outcomes(
        self,
        batch: BatchRow,
        outcomes: Iterable[Outcome],
        max_attempts: int,
        retry_at: RetryAt,
        cost_of: Callable[[dict[str, int] | None], Cost | None] | None = None,
    ) -> ApplySummary:
        """Record provider outcomes for items of `batch`: final ones become results, retryable ones requeue.

        `retry_at` is when a requeued item may go out again: a time, or a function of the attempts
        the item has made (its own backoff). A requeued item's age counts from the requeue (from
        when its backoff ends), so retries of one route are batched together like fresh work.

        `cost_of` prices a result's usage; a result with usage but no price is marked unpriced.

        An id sent by another database (another instance in the custom_id) is ignored and counted.
        Idempotent: an item already decided, or no longer in this batch, is left alone, so the same
        result file can be applied again after a crash.
        """
        by_item: dict[int, Outcome] = {}
        ignored = 0
        for outcome in outcomes:
            item_id = item_id_from_custom_id(outcome.provider_custom_id, self._instance)
            if item_id is None:
                ignored += 1
            else:
                by_item[item_id] = outcome
        if not by_item:
            return ApplySummary(ignored=ignored)
        final = requeued = 0
        now = time.time()
        async with self._tx() as db:
            ids = list(by_item)
            rows: list[sqlite3.Row] = []
            for start in range(0, len(ids), 500):
                part = ids[start : start + 500]
                marks = ",".join("?" for _ in part)
                rows.extend(
                    await db.execute_fetchall(
                        f"SELECT id, file_id, line, custom_id, attempts FROM items WHERE id IN ({marks})"
                        " AND batch_id = ? AND state = 'submitted'",
                        (*part, batch.id),
                    )
                )
            results: list[tuple[Any, ...]] = []
            finals: list[tuple[str, int]] = []
            retries: list[tuple[float, float, str | None, int]] = []
            for row in rows:
                outcome = by_item[row["id"]]
                if outcome.retryable and row["attempts"] < max_attempts:
                    error = orjson.dumps(outcome.error).decode() if outcome.error else outcome.status
                    not_before = retry_at(row["attempts"]) if callable(retry_at) else retry_at
                    # Its age for max_wait starts when it may go again, not at its first ingest:
                    # retries becoming due within one max_wait leave together, not one by one.
                    retries.append((not_before, max(now, not_before), error, row["id"]))
                    continue
                usage = outcome.usage or {}
                cost = cost_of(outcome.usage) if cost_of is not None and outcome.usage else None
                cost_json = cost.as_json() if cost else (UNPRICED if outcome.usage else None)
                payload = result_line(
                    custom_id=row["custom_id"],
                    status=outcome.status,
                    line=row["line"],
                    response=outcome.response,
                    error=outcome.error,
                    provider=batch.profile,
                    model=batch.model,
                    batch_id=batch.remote_id,
                    usage=outcome.usage,
                    cost=cost_json,
                )
                results.append(
                    (
                        row["file_id"],
                        row["line"],
                        row["id"],
                        outcome.status,
                        batch.profile,
                        batch.model,
                        batch.id,
                        usage.get("input_tokens"),
                        usage.get("output_tokens"),
                        usage.get("cached_input_tokens"),
                        usage.get("cache_creation_input_tokens"),
                        cost.batch if cost else None,
                        cost.realtime if cost else None,
                        payload,
                        now,
                    )
                )
                finals.append((outcome.status, row["id"]))
            await db.executemany(
                "INSERT OR IGNORE INTO results (file_id, line, item_id, status, profile, model, batch_id,"
                " input_tokens, output_tokens, cached_input_tokens, cache_creation_input_tokens, cost_batch,"
                " cost_realtime, payload, created_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                results,
            )
            # The request body is no longer needed once an item has its final result.
            await db.executemany("UPDATE items SET state = ? WHERE id = ?", finals)
            await db.executemany("DELETE FROM item_bodies WHERE item_id = ?", [(item,) for _, item in finals])
            await db.executemany(
                "UPDATE items SET state = 'queued', batch_id = NULL, not_before = ?, queued_at = ?, last_error = ?"
                " WHERE id = ?",
                retries,
            )
            final, requeued = len(finals), len(retries)
        return ApplySummary(final=final, requeued=requeued, ignored=ignored + len(by_item) - len(rows))

    async def requeue_unanswered(
        self,
        batch: BatchRow,
        status: Status,
        error: Any,
        max_attempts: int,
        retry_at: RetryAt,
        refund: bool,
        retryable: bool = True,
    ) -> ApplySummary:
        """Items of an ended batch that no result line mentioned: retry them, or finish them as `status`.

        With `refund`, the provider never ran them: the attempt is given back and every one goes
        back to the queue, in one statement so that a crash cannot refund an attempt twice.
        Without `retryable`, every one ends as `status` at once (output the provider has lost).
        """
        if refund:
            not_before = retry_at(0) if callable(retry_at) else retry_at
            async with self._tx() as db:
                cursor = await db.execute(
                    "UPDATE items SET state = 'queued', batch_id = NULL, attempts = MAX(attempts - 1, 0),"
                    " not_before = ?, queued_at = ?, last_error = ? WHERE batch_id = ? AND state = 'submitted'",
                    (not_before, time.time(), orjson.dumps(error).decode() if error else status, batch.id),
                )
                return ApplySummary(requeued=cursor.rowcount)
        rows = await self._fetchall("SELECT id FROM items WHERE batch_id = ? AND state = 'submitted'", (batch.id,))
        outcomes = [
            Outcome(provider_custom_id(row["id"], self._instance), status, None, error, None, retryable=retryable)
            for row in rows
        ]
        return await self.apply_outcomes(batch, outcomes, max_attempts, retry_at)

    async def finish_batch(
        self, batch_id: int, fate: str | None = None, error: str | None = None, record: bool = True
    ) -> None:
        """The batch is over; `fate` (and `error`, shown by status) say how when it did not end normally."""
        now = time.time()
        async with self._tx() as db:
            await db.execute(
                "UPDATE batches SET state = 'done', collected_at = ?, ended_at = COALESCE(ended_at, ?),"
                " fate = COALESCE(?, fate), last_error = COALESCE(?, last_error) WHERE id = ?",
                (now, now, fate, error, batch_id),
            )
            if fate is not None and record:
                await self._add_error(db, f"batch.{fate}", f"batch {batch_id}: {error or fate}")

    async def hold(self, profile: str, model: str, base: float, ceiling: float, reason: str) -> float:
        """Hold back submissions for (profile, model), doubling the pause on each consecutive failure."""
        async with self._tx() as db:
            rows = list(
                await db.execute_fetchall(
                    "SELECT failures FROM holds WHERE profile = ? AND model = ?", (profile, model)
                )
            )
            failures = rows[0][0] + 1 if rows else 1
            pause = min(base * 2 ** (failures - 1), ceiling)
            until = time.time() + pause
            await db.execute(
                "INSERT INTO holds (profile, model, until, failures, reason) VALUES (?, ?, ?, ?, ?)"
                " ON CONFLICT (profile, model) DO UPDATE SET until = excluded.until,"
                " failures = excluded.failures, reason = excluded.reason",
                (profile, model, until, failures, reason),
            )
            await self._add_error(db, "batch.held", f"{profile}/{model}: {reason}")
            return float(pause)

    async def release_hold(self, profile: str, model: str) -> None:
        async with self._tx() as db:
            await db.execute("DELETE FROM holds WHERE profile = ? AND model = ?", (profile, model))

    async def active_holds(self, now: float) -> dict[tuple[str, str], float]:
        rows = await self._fetchall("SELECT profile, model, until FROM holds WHERE until > ?", (now,))
        return {(r["profile"], r["model"]): r["until"] for r in rows}

    # -- sinks -----------------------------------------------------------------------------

    async def sink_cursor(self, sink: str) -> int:
        row = await self._fetchone("SELECT last_result_id FROM sink_cursors WHERE sink = ?", (sink,))
        return int(row["last_result_id"]) if row else 0

    async def results_after(self, last_id: int, limit: int) -> list[PendingResult]:
        return await self._pending_results("r.id > ?", (last_id,), limit)

    async def _pending_results(self, where: str, params: Sequence[Any], limit: int) -> list[PendingResult]:
        rows = await self._fetchall(
            "SELECT r.id, r.file_id, f.out_name, r.payload, r.created_at FROM results r"
            f" JOIN files f ON f.id = r.file_id WHERE {where} ORDER BY r.id LIMIT ?",
            (*params, limit),
        )
        return [PendingResult(r["id"], r["file_id"], r["out_name"], bytes(r["payload"]), r["created_at"]) for r in rows]

    async def advance_cursor(self, sink: str, last_id: int) -> None:
        async with self._tx() as db:
            await db.execute(
                "INSERT INTO sink_cursors (sink, last_result_id) VALUES (?, ?)"
                " ON CONFLICT (sink) DO UPDATE SET last_result_id = MAX(last_result_id, excluded.last_result_id)",
                (sink, last_id),
            )

    async def park(self, sink: str, result_ids: Sequence[int], error: str, advance_to: int | None) -> None:
        """Give up on results for now: record them as parked and (for new ones) move the cursor past them."""
        async with self._tx() as db:
            await db.executemany(
                "INSERT INTO parked (sink, result_id, parked_at, error) VALUES (?, ?, ?, ?)"
                " ON CONFLICT (sink, result_id) DO UPDATE SET redeliver = 0, error = excluded.error",
                [(sink, result_id, time.time(), error) for result_id in result_ids],
            )
            if advance_to is not None:
                await db.execute(
                    "INSERT INTO sink_cursors (sink, last_result_id) VALUES (?, ?) ON CONFLICT (sink)"
                    " DO UPDATE SET last_result_id = MAX(last_result_id, excluded.last_result_id)",
                    (sink, advance_to),
                )
            await self._add_error(db, "sink.parked", f"{sink}: {len(result_ids)} results parked: {error}")

    async def to_redeliver(self, sink: str, limit: int) -> list[PendingResult]:
        return await self._pending_results(
            "r.id IN (SELECT result_id FROM parked WHERE sink = ? AND redeliver = 1)", (sink,), limit
        )

    async def unpark(self, sink: str, result_ids: Sequence[int]) -> None:
        async with self._tx() as db:
            await db.executemany("DELETE FROM parked WHERE sink = ? AND result_id = ?", [(sink, i) for i in result_ids])

    async def request_redelivery(self, sink: str | None) -> int:
        """Flag parked results (of one sink, or all) to be sent again; returns how many."""
        async with self._tx() as db:
            cursor = await db.execute(
                "UPDATE parked SET redeliver = 1 WHERE redeliver = 0 AND (? IS NULL OR sink = ?)", (sink, sink)
            )
            return cursor.rowcount

    async def outbox_delivered(self, last_id: int, files: dict[int, tuple[int, int]]) -> None:
        """Advance the outbox cursor; `files` maps file id to (lines added, new durable .part length)."""
        async with self._tx() as db:
            await db.execute(
                "INSERT INTO sink_cursors (sink, last_result_id) VALUES ('outbox', ?)"
                " ON CONFLICT (sink) DO UPDATE SET last_result_id = excluded.last_result_id",
                (last_id,),
            )
            await db.executemany(
                "UPDATE files SET delivered = delivered + ?, out_bytes = ? WHERE id = ?",
                [(added, length, file_id) for file_id, (added, length) in files.items()],
            )

    async def open_files(self) -> list[FileRow]:
        rows = await self._fetchall("SELECT * FROM files WHERE state = 'open' ORDER BY id")
        return [
            FileRow(r["id"], r["name"], r["out_name"], r["lines"], r["delivered"], r["out_bytes"], r["state"])
            for r in rows
        ]

    async def file(self, file_id: int) -> FileRow | None:
        row = await self._fetchone("SELECT * FROM files WHERE id = ?", (file_id,))
        if row is None:
            return None
        return FileRow(
            row["id"], row["name"], row["out_name"], row["lines"], row["delivered"], row["out_bytes"], row["state"]
        )

    async def files_by_id(self, file_ids: Iterable[int]) -> dict[int, FileRow]:
        """The rows of these files, as committed now (the outbox's source of committed .part lengths)."""
        ids = sorted(set(file_ids))
        if not ids:
            return {}
        rows = await self._fetchall(f"SELECT * FROM files WHERE id IN ({','.join('?' * len(ids))})", ids)
        return {
            r["id"]: FileRow(r["id"], r["name"], r["out_name"], r["lines"], r["delivered"], r["out_bytes"], r["state"])
            for r in rows
        }

    async def delivered_payloads(self, file_id: int, after_id: int, limit: int) -> list[tuple[int, bytes]]:
        """(id, payload) of this file's results the outbox has delivered, after `after_id`, in order.

        Used to rebuild a .part that is shorter than its committed length (lost or cut by someone).
        """
        rows = await self._fetchall(
            "SELECT r.id, r.payload FROM results r WHERE r.file_id = ? AND r.id > ?"
            " AND r.id <= COALESCE((SELECT last_result_id FROM sink_cursors WHERE sink = 'outbox'), 0)"
            " ORDER BY r.id LIMIT ?",
            (file_id, after_id, limit),
        )
        return [(int(r["id"]), bytes(r["payload"])) for r in rows]

    async def complete_file(self, file_id: int) -> None:
        async with self._tx() as db:
            await db.execute(
                "UPDATE files SET state = 'complete', completed_at = ? WHERE id = ?", (time.time(), file_id)
            )

    # -- reports ---------------------------------------------------------------------------

    REPORT_KEYS: ClassVar[dict[str, str]] = {
        "model": "COALESCE(r.model, '(invalid)')",
        "provider": "COALESCE(r.profile, '(invalid)')",
        "day": "date(r.created_at, 'unixepoch')",
        "file": "f.name",
    }

    async def report(self, since: float, by: str) -> list[dict[str, Any]]:
        """Requests, tokens and cost per `by` (model, provider, day or file) for results since `since`."""
        key = self.REPORT_KEYS[by]
        rows = await self._fetchall(
            f"SELECT {key} AS key, COUNT(*) AS requests,"
            " SUM(r.status = 'succeeded') AS succeeded,"
            " COALESCE(SUM(r.input_tokens), 0) AS input_tokens,"
            " COALESCE(SUM(r.cached_input_tokens), 0) AS cached_input_tokens,"
            " COALESCE(SUM(r.output_tokens), 0) AS output_tokens,"
            " SUM(r.cost_batch) AS cost_batch, SUM(r.cost_realtime) AS cost_realtime,"
            " SUM(r.cost_batch IS NULL AND r.input_tokens IS NOT NULL) AS unpriced"
            " FROM results r JOIN files f ON f.id = r.file_id WHERE r.created_at >= ?"
            " GROUP BY key ORDER BY key",
            (since,),
        )
        return [dict(row) for row in rows]

    async def query_results(
        self, file: str | None, custom_id: str | None, status: str | None, limit: int
    ) -> list[dict[str, Any]]:
        """Stored result lines matching every given filter, oldest first."""
        where, params = [], []
        for column, value in (
            ("f.name", file),
            ("json_extract(CAST(r.payload AS TEXT), '$.custom_id')", custom_id),
            ("r.status", status),
        ):
            if value is not None:
                where.append(f"{column} = ?")
                params.append(value)
        clause = f"WHERE {' AND '.join(where)}" if where else ""
        rows = await self._fetchall(
            f"SELECT f.name AS file, r.line, r.status, r.payload FROM results r JOIN files f ON f.id = r.file_id"
            f" {clause} ORDER BY r.id LIMIT ?",
            (*params, limit),
        )
        return [dict(row) for row in rows]

    # -- status ----------------------------------------------------------------------------

    async def _add_error(self, db: aiosqlite.Connection, event: str, message: str) -> None:
        await db.execute("INSERT INTO errors (at, event, message) VALUES (?, ?, ?)", (time.time(), event, message))
        await db.execute("DELETE FROM errors WHERE id <= (SELECT MAX(id) FROM errors) - ?", (ERRORS_KEPT,))

    async def add_error(self, event: str, message: str) -> None:
        async with self._tx() as db:
            await self._add_error(db, event, message)

    async def status(self, errors: int = 10) -> dict[str, Any]:
        """A snapshot for `batchd status`: queue per route, live batches, files, recent errors."""
        queue = await self._fetchall(
            "SELECT profile, endpoint, model, state, COUNT(*) AS n FROM items"
            " WHERE state IN ('queued', 'batched', 'submitted') GROUP BY profile, endpoint, model, state"
        )
        routes: dict[tuple[str, str, str], dict[str, int]] = {}
        for row in queue:
            key = (row["profile"], row["endpoint"], row["model"])
            routes.setdefault(key, {"queued": 0, "batched": 0, "submitted": 0})[row["state"]] = row["n"]
        live = await self.batches_in_state(*BatchState.LIVE)
        ended_badly = await self._fetchall(
            "SELECT id, profile, model, remote_id, remote_status, fate, last_error, collected_at FROM batches"
            " WHERE state = 'done' AND fate IS NOT NULL ORDER BY id DESC LIMIT 10"
        )
        totals = await self._fetchall("SELECT status, COUNT(*) AS n FROM results GROUP BY status")
        files = await self._fetchall(
            "SELECT name, out_name, lines, delivered, state FROM files ORDER BY id DESC LIMIT 20"
        )
        recent = await self._fetchall("SELECT at, event, message FROM errors ORDER BY id DESC LIMIT ?", (errors,))
        holds = await self._fetchall("SELECT profile, model, until, reason FROM holds WHERE until > ?", (time.time(),))
        sinks = await self._fetchall(
            "SELECT c.sink, (SELECT COUNT(*) FROM results WHERE id > c.last_result_id) AS pending,"
            " (SELECT COUNT(*) FROM parked p WHERE p.sink = c.sink) AS parked FROM sink_cursors c ORDER BY c.sink"
        )
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
                    "state": b.state,
                    "remote_id": b.remote_id,
                    "remote_status": b.remote_status,
                    "requests": b.requests,
                    "counts": b.counts,
                    "created_at": b.created_at,
                    "last_error": b.last_error,
                    "cancel_requested_at": b.cancel_requested_at,
                }
                for b in live
            ],
            # Batches that ended in a defined but abnormal way (vanished, output lost, overdue ...).
            "ended_batches": [dict(row) for row in ended_badly],
            "results": {row["status"]: row["n"] for row in totals},
            "files": [dict(row) for row in files],
            "holds": [dict(row) for row in holds],
            "sinks": [dict(row) for row in sinks],
            "errors": [dict(row) for row in recent],
        }


class Ingest:
    """Adds one file's rows inside the transaction opened by `Store.ingest`."""

    def __init__(self, db: aiosqlite.Connection, file_id: int, out_name: str = "") -> None:
        self._db = db
        self.file_id = file_id
        self.out_name = out_name
        self.lines = 0
        self.queued = 0
        self.invalid = 0
        self._now = time.time()
        self._next_id: int | None = None

    async def add(self, items: Sequence[NewItem], invalid: Sequence[NewResult], lines: int) -> None:
        self.lines += lines
        if items:
            if self._next_id is None:
                # Ids are assigned here so bodies can go to their own table in the same pass; the
                # transaction holds SQLite's write lock, so nobody else takes these ids.
                rows = await self._db.execute_fetchall("SELECT COALESCE(MAX(id), 0) + 1 FROM items")
                self._next_id = int(next(iter(rows))[0])
            first = self._next_id
            self._next_id += len(items)
            await self._db.executemany(
                "INSERT INTO items (id, file_id, line, custom_id, profile, endpoint, model, size, queued_at)"
                " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                [
                    (first + n, self.file_id, i.line, i.custom_id, i.profile, i.endpoint, i.model, i.size, self._now)
                    for n, i in enumerate(items)
                ],
            )
            await self._db.executemany(
                "INSERT INTO item_bodies (item_id, body) VALUES (?, ?)",
                [(first + n, i.body) for n, i in enumerate(items)],
            )
            self.queued += len(items)
        if invalid:
            await self._insert_results(invalid)

    async def _insert_results(self, results: Sequence[NewResult]) -> None:
        await self._db.executemany(
            "INSERT INTO results (file_id, line, status, payload, created_at) VALUES (?, ?, ?, ?, ?)",
            [(self.file_id, r.line, r.status, r.payload, self._now) for r in results],
        )
        self.invalid += len(results)

    async def finish(self) -> None:
        """Turn later duplicates of a custom_id into invalid results, then record the line count."""
        any_duplicate = await self._db.execute_fetchall(
            "SELECT 1 FROM items WHERE file_id = ? GROUP BY custom_id HAVING COUNT(*) > 1 LIMIT 1", (self.file_id,)
        )
        if not list(any_duplicate):
            await self._db.execute("UPDATE files SET lines = ? WHERE id = ?", (self.lines, self.file_id))
            return
        rows = await self._db.execute_fetchall(
            "SELECT id, line, custom_id FROM items WHERE file_id = :file AND id NOT IN"
            " (SELECT MIN(id) FROM items WHERE file_id = :file GROUP BY custom_id)",
            {"file": self.file_id},
        )
        duplicates = list(rows)
        if duplicates:
            await self._db.executemany("DELETE FROM items WHERE id = ?", [(row[0],) for row in duplicates])
            await self._db.executemany("DELETE FROM item_bodies WHERE item_id = ?", [(row[0],) for row in duplicates])
            self.queued -= len(duplicates)
            await self._insert_results(
                [
                    NewResult(
                        row[1],
                        "invalid",
                        invalid_result(row[2], row[1], f"duplicate custom_id {row[2]!r} in this file"),
                    )
                    for row in duplicates
                ]
            )
        await self._db.execute("UPDATE files SET lines = ? WHERE id = ?", (self.lines, self.file_id))
