"""The SQLite engine of the store contract (store/contract.py): embedded, the default.

Two aiosqlite connections to one database in WAL mode with synchronous=FULL, so every commit is
durable before the caller takes an irreversible step (moving a spool file, calling a provider).
The one exception is an ingest chunk (add_chunk): it commits at synchronous=NORMAL, and the
file's finish_file, a FULL commit, makes it durable before the file leaves new/ (WAL commits
reach the disk in order; see `_tx`).

- the writer: every write method runs its whole transaction (BEGIN IMMEDIATE .. COMMIT) under one
  asyncio lock, as one unit shielded from the caller's cancellation (shield.settle), so the
  connection is never left inside an open transaction;
- the reader (read-only): polls, sinks, status and the batcher's reads never queue behind an ingest
  chunk or a claim holding the writer; WAL gives each statement a committed snapshot.

SQL lives in sqlite_queries.sql (named queries, `Q.name`) and sqlite_migrations/NNN_*.sql (tracked
with PRAGMA user_version). Several nodes may share one database file (tests do; in production
SQLite is one host's); every per-node method uses `self.node`.

Node identity: `SQLiteStore(path, node)`; with node None (the old constructor) the node is the
database's own, kept in meta 'node' (made on first open). Rows from before migration 007 have
node '' and are claimed by the first node that opens the database for writing (with the old
outbox cursor 'outbox' renamed 'outbox:NODE').
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
import socket
import sqlite3
import time
import urllib.parse
import uuid
from collections import deque
from collections.abc import AsyncIterator, Callable, Collection, Iterable, Sequence
from contextlib import asynccontextmanager
from importlib import resources
from pathlib import Path
from typing import Any

import aiosqlite
import orjson

from ..exits import EX_DATAERR, EX_IOERR, EX_NOPERM, OperatorError, creating_status
from ..formats import Status
from . import queries
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
from .shield import shielded

Q = queries.load("sqlite_queries.sql")

# A bound no claim reaches: SQLite compares with NULL as unknown, so "no bound" is a number.
_UNBOUNDED = 1 << 62
FINAL_ITEM_STATES = (ItemState.SUCCEEDED, ItemState.ERRORED, ItemState.EXPIRED, ItemState.CANCELED)
ERRORS_KEPT = 200
RESULTS_SUFFIX = ".results.jsonl"
REPORT_KEYS = ("model", "provider", "day", "file")


def _json(values: Iterable[Any]) -> str:
    """A list parameter for `json_each(?)`."""
    return orjson.dumps(list(values)).decode()


def _batch_from_row(row: sqlite3.Row) -> BatchRow:
    counts = orjson.loads(row["counts"]) if row["counts"] else None
    fate = row["fate"]
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
        counts=counts,
        created_at=row["created_at"],
        submitted_at=row["submitted_at"],
        submit_attempts=row["submit_attempts"],
        not_before=row["not_before"],
        last_error=row["last_error"],
        remote_created_at=row["remote_created_at"],
        cancel_requested_at=row["cancel_requested_at"],
        ended_at=row["ended_at"],
        fate=Fate(fate) if fate in Fate.__members__.values() else None,
        owner=row["owner"],
        lease_until=row["lease_until"],
        poll_requested_at=row["poll_requested_at"],
        cancel_reason=CancelReason(row["cancel_reason"]) if row["cancel_reason"] else None,
        cancel_wanted_at=row["cancel_wanted_at"],
        tokens=row["tokens"],
        inputs=row["inputs"],
    )


def _file_from_row(row: sqlite3.Row) -> FileRow:
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


def _pending_from_row(row: sqlite3.Row) -> PendingResult:
    # By position (the columns of results_after and to_redeliver): one is made per result line.
    return PendingResult(row[0], row[1], row[2], bytes(row[3]), row[4])


class _RecentResults:
    """The results this store has just committed (from record_outcomes), for results_after.

    A collection commits thousands of results and wakes the sinks, which read them straight back:
    the payloads went through SQLite twice (30 MB for 50,000 lines) in the reader thread, beside
    the writer's next commit. Here they are served from memory instead, only where that is exactly
    what the database would answer: a run of consecutive ids starting right after the cursor (SQLite
    gives the rows of one insert consecutive ids after the largest, and has one writer; any id not
    held here, another process's or another path's, ends the run and the rest is read from the
    database). Files' nodes and results names are read fresh: a name may change (out_name_give_up).
    Bounded (MAX_RESULTS, MAX_BYTES, oldest dropped); a result read past is dropped.
    """

    MAX_RESULTS = 10_000
    MAX_BYTES = 64 << 20

    def __init__(self) -> None:
        # Per commit, in commit (so id) order: (first id, its finals, created_at, payload bytes).
        self._blocks: deque[tuple[int, Sequence[FinalResult], float, int]] = deque()
        self._held = self._bytes = 0

    def add(self, first_id: int, finals: Sequence[FinalResult], created_at: float) -> None:
        size = sum(len(f.payload) for f in finals)
        self._blocks.append((first_id, finals, created_at, size))
        self._held += len(finals)
        self._bytes += size
        while self._blocks and (self._held > self.MAX_RESULTS or self._bytes > self.MAX_BYTES):
            self._drop()

    def _drop(self) -> None:
        _first, finals, _created, size = self._blocks.popleft()
        self._held -= len(finals)
        self._bytes -= size

    def run_after(self, last_id: int, limit: int) -> list[tuple[int, int, bytes, float]]:
        """The consecutive held results after `last_id` (id, file id, payload, created_at), up to `limit`.

        Commits wholly before `last_id` are dropped: their results have been read past.
        """
        blocks = self._blocks
        while blocks and blocks[0][0] + len(blocks[0][1]) <= last_id + 1:
            self._drop()
        run: list[tuple[int, int, bytes, float]] = []
        wanted = last_id + 1
        for first, finals, created_at, _size in blocks:
            if wanted < first or len(run) >= limit:
                break  # a gap: an id this store did not insert (or not yet known to be committed)
            taken = finals[wanted - first : wanted - first + limit - len(run)]
            run += [(wanted + n, f.file_id, f.payload, created_at) for n, f in enumerate(taken)]
            wanted += len(taken)
        return run


class _Checkpointer:
    """Copies committed WAL frames into the database from a connection (and thread) of its own.

    SQLite's own checkpoint runs inside the commit that crosses wal_autocheckpoint, so the writer,
    and every write queued behind it, waited for it: a third of a second now and then during a large
    ingest. A PASSIVE checkpoint on another connection runs beside the writer and the readers and
    waits for neither; the writer's autocheckpoint stays as a backstop (it also restarts the WAL
    from its start once every frame is copied), and finds little left to copy. Once writing has
    stopped for `quiet` seconds, the WAL file is cut back to nothing.
    """

    def __init__(self, db: aiosqlite.Connection, interval: float, quiet: float) -> None:
        self._db = db
        self.interval = interval
        self.quiet = quiet
        self._wrote = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="sqlite-checkpointer")

    def wrote(self) -> None:
        """A commit added frames to the WAL: the next round copies them."""
        self._wrote.set()

    async def _run(self) -> None:
        while True:
            await self._wrote.wait()
            self._wrote.clear()
            # Another connection checkpointing, say: the next round (or the backstop) copies it.
            with contextlib.suppress(sqlite3.Error):
                await self._db.execute(Q.wal_checkpoint_passive)
            await asyncio.sleep(self.interval)
            # Writes meanwhile end this wait at once. asyncio.timeout, not wait_for: Python 3.11's
            # wait_for swallows a cancellation that comes just as the wait ends (a last write, then
            # close()), and the task would run for ever.
            try:
                async with asyncio.timeout(self.quiet):
                    await self._wrote.wait()
            except TimeoutError:
                with contextlib.suppress(sqlite3.Error):  # busy: a reader on the log; next quiet spell
                    await self._db.execute(Q.wal_checkpoint_truncate)

    async def close(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
        # After the task: a statement it left running in the connection's thread finishes first.
        await self._db.close()


def _migrations() -> list[tuple[int, str]]:
    found = []
    for entry in resources.files("batchd.store").joinpath("sqlite_migrations").iterdir():
        name = entry.name
        if name.endswith(".sql") and name[:3].isdigit():
            found.append((int(name[:3]), entry.read_text()))
    return sorted(found)


def _latest_migration() -> int:
    # From the names alone: every command imports this module, and only migrate() needs the scripts.
    entries = resources.files("batchd.store").joinpath("sqlite_migrations").iterdir()
    return max(int(e.name[:3]) for e in entries if e.name.endswith(".sql") and e.name[:3].isdigit())


SCHEMA_VERSION = _latest_migration()


def _newer_schema(path: Path, version: int) -> str:
    return (
        f"the database {path} has schema version {version}, newer than this batchd understands"
        f" ({SCHEMA_VERSION}): run the batchd that migrated it"
    )


class SQLiteStore:
    """The queue, batches, results and delivery state in one SQLite file (contract: store.contract.Store)."""

    def __init__(
        self,
        path: Path,
        node: str | None = None,
        *,
        url: str | None = None,
        readonly: bool = False,
        busy_timeout: float = 10.0,
        checkpoint_interval: float = 0.25,
        checkpoint_quiet: float = 5.0,
    ) -> None:
        self.path = path
        self.url = url or f"sqlite:///{path}"
        # "" until open() when the database keeps the node (the old constructor, node=None).
        self.node = node or ""
        self._node_given = node is not None
        self.readonly = readonly
        # How long a statement waits for another connection's write lock before "database is locked".
        self.busy_timeout = busy_timeout
        self._db: aiosqlite.Connection | None = None  # the writer
        self._reader: aiosqlite.Connection | None = None
        self._checkpointer: _Checkpointer | None = None
        # At most one WAL checkpoint per this many seconds of writing (0: only the writer's own).
        self.checkpoint_interval = checkpoint_interval
        # Seconds without a write after which the WAL file is cut back to nothing.
        self.checkpoint_quiet = checkpoint_quiet
        self._lock = asyncio.Lock()
        # The writer's PRAGMA synchronous: FULL, or NORMAL after a deferred-sync transaction (see _tx).
        self._synchronous_full = True
        self._instance = ""
        self._recent = _RecentResults()

    # -- lifecycle -------------------------------------------------------------------------

    @classmethod
    @asynccontextmanager
    async def existing(cls, path: Path, writable: bool = False) -> AsyncIterator[SQLiteStore | None]:
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
        except NotCreated:
            yield None  # a daemon is creating it right now: nothing to show yet
            return
        try:
            yield store
        finally:
            await store.close()

    async def open(self) -> None:
        """Open (creating with mode 0600), migrate, and register this node.

        A store made with `readonly` (commands) opens as `open_existing()` instead.
        """
        if self.readonly:
            await self.open_existing()
            return
        await self._connect_writer()
        try:
            await self.migrate()
            await self._register_node()
            self._reader = await self._connect_reader(self._uri("ro"))
            if self.checkpoint_interval > 0:
                checkpointing = await self._connect_reader(self._uri("rw"))
                await checkpointing.execute(Q.pragma_checkpointer_busy_timeout)
                self._checkpointer = _Checkpointer(checkpointing, self.checkpoint_interval, self.checkpoint_quiet)
                self._checkpointer.start()
        except BaseException:
            await self.close()
            raise

    async def _connect_writer(self) -> None:
        """The writing connection (creating the file with mode 0600), WAL and FULL sync."""
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
            await db.execute(Q.pragma_wal)
            await db.execute(Q.pragma_synchronous_full)
            await db.execute(Q.pragma_wal_autocheckpoint)
            await db.execute(Q.pragma_foreign_keys_on)
            await db.execute(f"PRAGMA busy_timeout={int(self.busy_timeout * 1000)}")
        except sqlite3.Error as exc:
            await db.close()
            raise self._open_error(exc) from None
        self._db = db

    async def open_existing(self, writable: bool = False) -> None:
        """Open a database the daemon made, without creating or migrating it (see `existing`)."""
        try:
            os.close(os.open(self.path, (os.O_RDWR if writable else os.O_RDONLY) | os.O_CLOEXEC))
        except OSError as exc:
            status = EX_NOPERM if exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS) else EX_IOERR
            access = "write" if writable else "read"
            raise OperatorError(f"cannot {access} the database {self.path}: {exc.strerror or exc}", status) from None
        uri = self._uri("rw" if writable else "ro")
        if not writable and not self.path.with_name(self.path.name + "-wal").exists():
            # No -wal file: no connection has the database open and every committed page is in
            # the main file. Reading it as immutable creates no -wal or -shm beside it (which a
            # reader may not be allowed to do, and should not do to another user's database).
            uri += "&immutable=1"
        try:
            db = await self._connect_reader(uri)
        except sqlite3.Error as exc:
            raise self._open_error(exc) from None
        self._db = db
        # A command's reads and (redeliver's) writes share its one connection.
        self._reader = db
        version = await self._schema_version()
        latest = SCHEMA_VERSION
        if version == 0:
            await self.close()
            raise NotCreated(str(self.path))
        if version < latest:
            await self.close()
            raise OperatorError(
                f"the database {self.path} has schema version {version}, this batchd uses {latest}:"
                " start the daemon (batchd run) or run batchd migrate once to migrate it",
                EX_DATAERR,
            )
        if version > latest:
            await self.close()
            raise OperatorError(_newer_schema(self.path, version), EX_DATAERR)
        self._instance = await self._meta("instance") or ""
        if not self.node:
            self.node = await self._meta("node") or ""

    def _uri(self, mode: str) -> str:
        return f"file:{urllib.parse.quote(str(self.path.absolute()))}?mode={mode}"

    async def _connect_reader(self, uri: str) -> aiosqlite.Connection:
        db = await aiosqlite.connect(uri, uri=True, isolation_level=None)
        try:
            db.row_factory = sqlite3.Row
            await db.execute(f"PRAGMA busy_timeout={int(self.busy_timeout * 1000)}")
            await db.execute(Q.pragma_foreign_keys_on)
            # The first read of the schema is where SQLite finds a non-database or a missing -shm.
            await (await db.execute(Q.pragma_user_version)).fetchone()
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
        rows = list(await self._conn.execute_fetchall(Q.pragma_user_version))
        return int(rows[0][0]) if rows else 0

    async def close(self) -> None:
        checkpointer, self._checkpointer = self._checkpointer, None
        if checkpointer is not None:
            await checkpointer.close()
        reader, self._reader = self._reader, None
        if reader is not None and reader is not self._db:
            await reader.close()
        if self._db is not None:
            async with self._lock:
                await self._db.close()
            self._db = None

    @shielded
    async def migrate(self) -> tuple[int, int]:
        """Apply pending migrations in one BEGIN IMMEDIATE transaction; (version before, version after).

        Refuses (OperatorError, EX_DATAERR) a database newer than this code. On a store not
        opened (`batchd migrate`) it connects first, as PostgresStore does; close() afterwards.
        """
        if self._db is None:
            await self._connect_writer()
        db = self._conn
        async with self._lock:
            before = await self._schema_version()
            if before > SCHEMA_VERSION:
                # An older batchd must not run on a database a newer one has migrated.
                raise OperatorError(_newer_schema(self.path, before), EX_DATAERR)
            # A migration that rebuilds a referenced table (DROP + RENAME) must run with foreign keys
            # off (the pragma is a no-op inside a transaction); they are checked before each commit.
            await db.execute(Q.pragma_foreign_keys_off)
            try:
                # All pending migrations in one write transaction: a reader (`batchd status`) sees the
                # database as before (version 0: not created yet) or as after, never half-migrated. The
                # version is read inside it, so two processes opening a new database at once never run
                # a migration twice.
                await db.execute(Q.begin_immediate)
                try:
                    (version,) = await (await db.execute(Q.pragma_user_version)).fetchone() or (0,)
                    if version > SCHEMA_VERSION:
                        raise OperatorError(_newer_schema(self.path, version), EX_DATAERR)
                    for number, script in _migrations():
                        if number <= version:
                            continue
                        for statement in script.split(";\n"):
                            if statement.strip():
                                await db.execute(statement)
                        broken = await db.execute_fetchall(Q.pragma_foreign_key_check)
                        if list(broken):
                            raise sqlite3.IntegrityError(f"migration {number:03d} broke a foreign key")
                        # PRAGMA takes no parameters; number is an int from a file name.
                        await db.execute(f"PRAGMA user_version={number}")
                    await db.execute(Q.meta_set_once, ("instance", uuid.uuid4().hex))
                    await db.execute(Q.commit)
                except BaseException:
                    if db.in_transaction:
                        await db.execute(Q.rollback)
                    raise
            finally:
                await db.execute(Q.pragma_foreign_keys_on)
            self._instance = await self._meta("instance", db) or ""
            return before, await self._schema_version()

    async def _register_node(self) -> None:
        """Fix this store's node and register it; the first node ever takes the rows from before nodes.

        meta 'node' is the first node that opened the database (007 leaves older rows with node '');
        with the old constructor (node None) it is also this store's node.
        """
        async with self._tx() as db:
            first = await self._meta("node", db)
            if not self._node_given:
                self.node = first or uuid.uuid4().hex[:12]
            if first is None:
                await db.execute(Q.meta_set_once, ("node", self.node))
                await db.execute(Q.adopt_files, (self.node,))
                await db.execute(Q.adopt_outbox_cursor, {"node": self.node})
            params = {"node": self.node, "now": time.time(), "pid": os.getpid(), "host": socket.gethostname()}
            await db.execute(Q.node_register, params)

    @property
    def _conn(self) -> aiosqlite.Connection:
        if self._db is None:
            raise RuntimeError("store is not open")
        return self._db

    @property
    def _read(self) -> aiosqlite.Connection:
        if self._reader is None:
            raise RuntimeError("store is not open")
        return self._reader

    @asynccontextmanager
    async def _tx(self, deferred_sync: bool = False) -> AsyncIterator[aiosqlite.Connection]:
        """One write transaction on the writer. Callers run it whole (@shielded) so it is never torn.

        `deferred_sync` commits without an fsync of its own (synchronous=NORMAL), for progress nobody
        acts on until a later FULL commit: in WAL mode commits reach the disk in order, so the next
        FULL commit (any writer's: every other transaction is FULL) makes it durable too, and a power
        cut before that loses a suffix of such commits, never leaves a hole. A process crash loses
        nothing (the frames are in the OS's cache). The setting is switched together with the BEGIN,
        only when it changes, so consecutive chunks pay nothing for it.
        """
        async with self._lock:
            db = self._conn
            if deferred_sync == self._synchronous_full:
                try:
                    await db.executescript(Q.begin_deferred_sync if deferred_sync else Q.begin_full_sync)
                except BaseException:
                    # Whatever failed, the connection goes back to FULL before anyone else writes.
                    if db.in_transaction:
                        await db.execute(Q.rollback)
                    await db.execute(Q.pragma_synchronous_full)
                    self._synchronous_full = True
                    raise
                self._synchronous_full = not deferred_sync
            else:
                await db.execute(Q.begin_immediate)
            try:
                yield db
                await db.execute(Q.commit)
            except BaseException:
                if db.in_transaction:
                    await db.execute(Q.rollback)
                raise
            if self._checkpointer is not None:
                self._checkpointer.wrote()

    async def _rows(self, sql: str, params: Sequence[Any] | dict[str, Any] = ()) -> list[sqlite3.Row]:
        """A read on the reader connection: it never waits for the writer's lock."""
        return list(await self._read.execute_fetchall(sql, params))

    async def _row(self, sql: str, params: Sequence[Any] | dict[str, Any] = ()) -> sqlite3.Row | None:
        rows = await self._rows(sql, params)
        return rows[0] if rows else None

    async def _fetchone(self, sql: str, params: Sequence[Any] = ()) -> sqlite3.Row | None:
        """For tests: a statement on the writer connection (its pragmas are per connection)."""
        async with self._lock:
            rows = list(await self._conn.execute_fetchall(sql, params))
        return rows[0] if rows else None

    async def _meta(self, key: str, db: aiosqlite.Connection | None = None) -> str | None:
        rows = list(await (db or self._conn).execute_fetchall(Q.meta_get, (key,)))
        return str(rows[0][0]) if rows else None

    async def instance_id(self) -> str:
        if not self._instance:
            self._instance = await self._meta("instance") or ""
        return self._instance

    async def integrity_check(self) -> str:
        row = await self._row(Q.pragma_integrity_check)
        return str(row[0]) if row else "no answer"

    # -- intake ----------------------------------------------------------------------------

    async def find_file(self, key: FileKey) -> FileRow | None:
        """This node's row for exactly this file (name, sha256, ino) not yet moved out of new/, if any.

        The device number is recorded but not compared: it is not stable across reboots for every
        filesystem, and a crash is often one.
        """
        row = await self._row(Q.find_file, {"node": self.node, "name": key.name, "sha256": key.sha256, "ino": key.ino})
        return _file_from_row(row) if row else None

    @shielded
    async def begin_file(
        self, key: FileKey, out_taken: Callable[[str], bool], options: str | None = None, deadline: float | None = None
    ) -> FileRow:
        """The file's row (INGESTING), its results name chosen once (see contract.Intake.begin_file)."""
        async with self._tx() as db:
            out_name = await self._choose_out_name(db, key.name, out_taken)
            rows = list(
                await db.execute_fetchall(
                    Q.insert_file,
                    {
                        "node": self.node,
                        "name": key.name,
                        "sha256": key.sha256,
                        "size": key.size,
                        "out_name": out_name,
                        "now": time.time(),
                        "dev": key.dev,
                        "ino": key.ino,
                        "state": FileState.INGESTING.value,
                        "options": options,
                        "deadline": deadline,
                    },
                )
            )
            return _file_from_row(rows[0])

    async def _choose_out_name(
        self, db: aiosqlite.Connection, name: str, out_taken: Callable[[str], bool] | None
    ) -> str:
        """NAME.results.jsonl unless taken (in out/, or by an unfinished file of this node), else NAME.N.results.jsonl.

        A finished file whose results are gone from out/ gives its name up (its row keeps it as
        NAME.results.jsonl~ID), so a producer that consumed yesterday's results finds today's
        under the same name.
        """
        stem = name[: -len(".jsonl")] if name.endswith(".jsonl") else name
        number = 0
        out_name = f"{stem}.results.jsonl"
        while True:
            if out_taken is None or not out_taken(out_name):
                rows = list(await db.execute_fetchall(Q.out_name_holder, (self.node, out_name)))
                if not rows:
                    return out_name
                if rows[0]["state"] == FileState.COMPLETE:
                    await db.execute(Q.out_name_give_up, (rows[0]["id"],))
                    return out_name
            number += 1
            out_name = f"{stem}.{number}.results.jsonl"

    async def seen_custom_ids(self, file_id: int, custom_ids: Collection[str]) -> set[str]:
        """Which of these custom_ids committed chunks of this file already hold."""
        if not custom_ids:
            return set()
        rows = await self._rows(Q.seen_custom_ids, (file_id, _json(custom_ids)))
        return {str(r["custom_id"]) for r in rows}

    @shielded
    async def add_chunk(self, file_id: int, chunk: Chunk) -> bool:
        """Queue the chunk's items, record its invalid results and advance the file, in one transaction.

        Compare-and-set on lines_committed == first_line - 1: a chunk already committed returns False.
        """
        now = time.time()
        payload = self._items_payload([(file_id, item) for item in chunk.items], now)
        invalid = [(file_id, r.line, r.status, r.payload, now) for r in chunk.invalid]
        # A chunk's commit is durable by the file's finish_file (FULL) before the file leaves new/;
        # until then a power cut loses only chunks that a resume re-reads from the file.
        async with self._tx(deferred_sync=True) as db:
            advanced = await db.execute(
                Q.advance_file,
                {
                    "id": file_id,
                    "last_line": chunk.last_line,
                    "end_offset": chunk.end_offset,
                    "expected": chunk.first_line - 1,
                },
            )
            if advanced.rowcount != 1:
                return False  # committed before (or not ingesting): nothing was written
            try:
                await self._insert_items(db, payload)
            except sqlite3.IntegrityError as exc:
                if "items.custom_id" in str(exc):  # the unique (file_id, custom_id) index
                    raise DuplicateCustomId(str(exc)) from None
                raise
            if invalid:
                await db.executemany(Q.insert_line_result, invalid)
            return True

    @staticmethod
    def _items_payload(items: Sequence[tuple[int, NewItem]], now: float) -> dict[str, Any] | None:
        """insert_items' parameters for items of one or more files (file id, item), but for `first`.

        Built before the transaction: the writer's lock is held only while SQLite works.
        """
        if not items:
            return None
        rows = [
            (
                f,
                i.line,
                i.custom_id,
                i.profile,
                i.endpoint,
                i.model,
                i.size,
                i.tokens,
                i.deadline,
                i.fallback_at,
                i.inputs,
            )
            for f, i in items
        ]
        return {
            "now": now,
            "rows": orjson.dumps(rows).decode(),
            # Bodies are JSON text (UTF-8): each travels as a JSON string and is stored as its bytes.
            "bodies": orjson.dumps([i.body.decode() for _, i in items]).decode(),
        }

    @staticmethod
    async def _insert_items(db: aiosqlite.Connection, payload: dict[str, Any] | None) -> None:
        """The items of `_items_payload`, their bodies too, in two statements, with the next free ids."""
        if payload is None:
            return
        [(first,)] = await db.execute_fetchall(Q.next_item_id)
        params = {**payload, "first": first}
        await db.execute(Q.insert_items, params)
        await db.execute(Q.insert_item_bodies, params)
        # Into the queue counts in the same transaction, one statement per chunk (not a trigger per row).
        await db.execute(Q.fold_queued_counts)
        await db.execute(Q.advance_queued_counts_mark)

    @shielded
    async def add_files(
        self, files: Sequence[WholeFile], out_taken: Callable[[str], bool], moved: Collection[int] = ()
    ) -> list[FileRow]:
        """Group commit of small files, each whole (see contract.Intake.add_files): one transaction."""
        if not files:
            await self.files_moved(moved)
            return []
        now = time.time()
        async with self._tx() as db:
            if moved:
                await db.execute(Q.files_moved, {"now": now, "ids": _json(moved)})
            keys = orjson.dumps([(f.key.name, f.key.sha256, f.key.ino) for f in files]).decode()
            existing = {
                (row["name"], row["sha256"], row["ino"]): _file_from_row(row)
                for row in await db.execute_fetchall(Q.find_files, {"node": self.node, "keys": keys})
            }
            fresh = [f for f in files if (f.key.name, f.key.sha256, f.key.ino) not in existing]
            out_names = await self._choose_out_names(db, [f.key.name for f in fresh], out_taken)
            [(next_id,)] = await db.execute_fetchall(Q.next_file_id)
            ids = range(next_id, next_id + len(fresh))
            inserted: dict[int, FileRow] = {}
            if fresh:
                values = [
                    (
                        file_id,
                        f.key.name,
                        f.key.sha256,
                        f.key.size,
                        out_name,
                        f.key.dev,
                        f.key.ino,
                        f.lines,
                        f.options,
                        f.deadline,
                    )
                    for file_id, f, out_name in zip(ids, fresh, out_names, strict=True)
                ]
                params = {"node": self.node, "now": now, "files": orjson.dumps(values).decode()}
                for row in await db.execute_fetchall(Q.insert_whole_files, params):
                    inserted[row["id"]] = _file_from_row(row)
                items = [(file_id, item) for file_id, f in zip(ids, fresh, strict=True) for item in f.items]
                await self._insert_items(db, self._items_payload(items, now))
                invalid = [(file_id, r) for file_id, f in zip(ids, fresh, strict=True) for r in f.invalid]
                if invalid:
                    await db.executemany(
                        Q.insert_line_result, [(file_id, r.line, r.status, r.payload, now) for file_id, r in invalid]
                    )
        by_key = dict(existing)
        by_key.update({(f.key.name, f.key.sha256, f.key.ino): inserted[i] for i, f in zip(ids, fresh, strict=True)})
        return [by_key[(f.key.name, f.key.sha256, f.key.ino)] for f in files]

    async def _choose_out_names(
        self, db: aiosqlite.Connection, names: Sequence[str], out_taken: Callable[[str], bool]
    ) -> list[str]:
        """_choose_out_name for each of `names` in turn, none taking one an earlier one took; one query
        when every NAME.results.jsonl is free (the usual case)."""
        wanted = [(name[: -len(".jsonl")] if name.endswith(".jsonl") else name) + RESULTS_SUFFIX for name in names]
        held = {
            row["out_name"]
            for row in await db.execute_fetchall(
                Q.out_names_held, {"node": self.node, "names": orjson.dumps(wanted).decode()}
            )
        }
        chosen: list[str] = []
        taken: set[str] = set()
        for name, out_name in zip(names, wanted, strict=True):
            if out_name in held or out_name in taken or out_taken(out_name):
                out_name = await self._choose_out_name(db, name, lambda o: o in taken or out_taken(o))
            taken.add(out_name)
            chosen.append(out_name)
        return chosen

    @shielded
    async def finish_file(self, file_id: int, lines: int) -> None:
        """INGESTING -> OPEN with its final line count. Idempotent."""
        async with self._tx() as db:
            await db.execute(Q.finish_file, (lines, lines, file_id))

    @shielded
    async def file_moved(self, file_id: int) -> None:
        """Record that the file left new/ (after the rename is durable). Idempotent."""
        async with self._tx() as db:
            await db.execute(Q.file_moved, (time.time(), file_id))

    @shielded
    async def files_moved(self, file_ids: Collection[int]) -> None:
        """file_moved for several files, in one transaction."""
        if not file_ids:
            return
        async with self._tx() as db:
            await db.execute(Q.files_moved, {"now": time.time(), "ids": _json(file_ids)})

    # -- queue -----------------------------------------------------------------------------

    async def queued_groups(self, now: float) -> list[Group]:
        rows = await self._rows(Q.queued_groups, {"now": now})
        return [Group(r["profile"], r["endpoint"], r["model"], r["n"], r["bytes"], r["oldest"]) for r in rows]

    async def earliest_deadline(self, group: Group, now: float) -> Deadline | None:
        params = {"profile": group.profile, "endpoint": group.endpoint, "model": group.model, "now": now}
        row = await self._row(Q.earliest_deadline, params)
        return Deadline(row["deadline"], row["fallback_at"]) if row else None

    async def next_not_before(self, now: float) -> float | None:
        row = await self._row(Q.next_not_before, (now,))
        return float(row["t"]) if row and row["t"] is not None else None

    @shielded
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
        """Record a PENDING batch intent leased to this node and move up to the limits of the group's oldest items in.

        A batch never gets a request count in `avoid_counts`: one item is left queued instead.
        SQLite has one writer, so concurrent claims never take the same item.
        """
        budget = budget or Budget()
        async with self._tx() as db:
            cursor = await db.execute(
                Q.insert_batch,
                (group.profile, kind, group.endpoint, group.model, now, self.node, now + lease_seconds),
            )
            batch_id = cursor.lastrowid
            route = {"profile": group.profile, "endpoint": group.endpoint, "model": group.model}
            max_tokens = _UNBOUNDED if budget.tokens is None else budget.tokens
            max_inputs = _UNBOUNDED if budget.inputs is None else budget.inputs
            prefix = {**route, "now": now, "max_requests": max_requests}
            ((count, size, tokens, inputs, last),) = await db.execute_fetchall(Q.claim_prefix, prefix)
            if count and size <= max_bytes and tokens <= max_tokens and inputs <= max_inputs:
                # The whole prefix fits (the usual case): claimed by id range, its totals known already.
                await db.execute(Q.claim_prefix_items, {**prefix, "batch": batch_id, "last": last})
            else:
                await db.execute(
                    Q.claim_items,
                    {
                        **prefix,
                        "batch": batch_id,
                        "max_bytes": max_bytes,
                        "max_tokens": max_tokens,
                        "max_inputs": max_inputs,
                        "lone": budget.lone_oversize,
                    },
                )
                count, size, tokens, inputs = next(iter(await db.execute_fetchall(Q.batch_totals, (batch_id,))))
            if count:
                # Once per claim, not per claimed row (migration 014); an unclaim below is moved by the trigger.
                await db.execute(Q.claimed_from_queue, {**route, "n": count, "bytes": size})
            while count in avoid_counts and count > 0:
                await db.execute(Q.unclaim_last_item, (batch_id,))
                count, size, tokens, inputs = next(iter(await db.execute_fetchall(Q.batch_totals, (batch_id,))))
            if count == 0:
                await db.execute(Q.delete_batch, (batch_id,))
                return None
            await db.execute(Q.set_batch_totals, (count, size, tokens, inputs, batch_id))
            return _batch_from_row(next(iter(await db.execute_fetchall(Q.batch, (batch_id,)))))

    async def batch_bodies(self, batch_id: int, chunk: int = 2000) -> AsyncIterator[list[tuple[int, str, bytes]]]:
        """The batch's requests as (item id, endpoint, body), in chunks, in id order."""
        last = 0
        while True:
            rows = await self._rows(Q.batch_bodies, (batch_id, last, chunk))
            if not rows:
                return
            # By position: one tuple per request of a batch of up to 100,000.
            yield [(r[0], r[1], r[2]) for r in rows]
            last = rows[-1][0]

    async def batch_input_size(self, batch_id: int) -> InputSize:
        row = await self._row(Q.batch_input_size, (batch_id,))
        assert row is not None
        return InputSize(int(row["n"]), int(row["body_bytes"]), int(row["id_hex_digits"]))

    async def usage(self, profile: str, model: str | None = None, now: float | None = None) -> Usage:
        """Live batches (intents included) of the profile (and model), over every node."""
        now = time.time() if now is None else now
        live = await self._row(Q.usage, {"profile": profile, "model": model})
        created = await self._row(Q.created_since, {"profile": profile, "model": model, "since": now - 3600})
        assert live is not None and created is not None
        return Usage(
            in_flight_batches=int(live["batches"]),
            enqueued_tokens=int(live["tokens"]),
            enqueued_requests=int(live["requests"]),
            created_last_hour=int(created["n"]),
        )

    async def creations(self, profile: str, since: float) -> list[float]:
        return [float(r["t"]) for r in await self._rows(Q.creations, {"profile": profile, "since": since})]

    async def learned_limits(self) -> dict[tuple[str, str], int]:
        return {(r["profile"], r["model"]): int(r["tokens"]) for r in await self._rows(Q.learned_limits)}

    @shielded
    async def lower_learned_limit(self, profile: str, model: str, tokens: int, now: float) -> int:
        async with self._tx() as db:
            params = {"profile": profile, "model": model, "tokens": tokens, "now": now}
            await db.execute(Q.lower_learned_limit, params)
            (row,) = await db.execute_fetchall(Q.learned_limit, (profile, model))
            return int(row["tokens"])

    async def flush_requests(self) -> dict[str, float]:
        return {r["route"]: float(r["requested_at"]) for r in await self._rows(Q.flush_requests)}

    @shielded
    async def clear_flush_request(self, route: str, requested_at: float) -> bool:
        async with self._tx() as db:
            cursor = await db.execute(Q.clear_flush_request, (route, requested_at))
            return cursor.rowcount > 0

    async def active_holds(self, now: float) -> dict[tuple[str, str], float]:
        rows = await self._rows(Q.active_holds, (now,))
        holds: dict[tuple[str, str], float] = {(r["profile"], r["model"]): r["until"] for r in rows}
        # An operator's pause (`batchd pause`) outlasts any hold; '*' in its key matches any profile or model.
        for row in await self._rows(Q.pauses):
            holds[(row["profile"], row["model"])] = PAUSE_UNTIL
        return holds

    @shielded
    async def hold(self, profile: str, model: str, until: float, failures: int, reason: str) -> None:
        """Hold back submissions for (profile, model) until `until` (the caller computed the pause)."""
        async with self._tx() as db:
            await db.execute(Q.hold, (profile, model, until, failures, reason))
            await self._add_error(db, "batch.held", f"{profile}/{model}: {reason}")

    async def hold_failures(self, profile: str, model: str) -> int:
        row = await self._row(Q.hold_failures, (profile, model))
        return int(row["failures"]) if row else 0

    @shielded
    async def release_hold(self, profile: str, model: str) -> None:
        async with self._tx() as db:
            await db.execute(Q.release_hold, (profile, model))

    # -- batches ---------------------------------------------------------------------------

    async def batch(self, batch_id: int) -> BatchRow | None:
        row = await self._row(Q.batch, (batch_id,))
        return _batch_from_row(row) if row else None

    async def batches_in_state(self, *states: str) -> list[BatchRow]:
        """Every batch in these states, whoever owns it, by id."""
        rows = await self._rows(Q.batches_in_state, (_json(states),))
        return [_batch_from_row(r) for r in rows]

    async def owned_batches(self, *states: BatchState) -> list[BatchRow]:
        """Batches in these states whose lease this node holds (owner = this node)."""
        rows = await self._rows(Q.owned_batches, (self.node, _json(states)))
        return [_batch_from_row(r) for r in rows]

    @shielded
    async def take_over(self, lease_seconds: float, now: float) -> list[BatchRow]:
        """Take the lease of every live batch whose lease expired (or that has no owner)."""
        async with self._tx() as db:
            rows = await db.execute_fetchall(Q.take_over, {"node": self.node, "until": now + lease_seconds, "now": now})
            return sorted((_batch_from_row(r) for r in rows), key=lambda b: b.id)

    @shielded
    async def renew_leases(self, lease_seconds: float, now: float) -> int:
        """Extend this node's leases on its live batches and its heartbeat; how many batches."""
        async with self._tx() as db:
            cursor = await db.execute(Q.renew_leases, {"node": self.node, "until": now + lease_seconds})
            await db.execute(
                Q.node_register, {"node": self.node, "now": now, "pid": os.getpid(), "host": socket.gethostname()}
            )
            return cursor.rowcount

    @shielded
    async def release_leases(self) -> None:
        """Give up this node's batch and sink leases (graceful stop): another node may take over at once."""
        async with self._tx() as db:
            await db.execute(Q.release_leases, (self.node,))
            await db.execute(Q.release_sink_leases, (self.node,))

    async def remote_ids(self, profile: str) -> set[str]:
        rows = await self._rows(Q.remote_ids, (profile,))
        return {r["remote_id"] for r in rows}

    async def remote_owner(self, remote_id: str) -> int | None:
        row = await self._row(Q.remote_owner, (remote_id,))
        return int(row["id"]) if row else None

    @shielded
    async def set_input_file(self, batch_id: int, input_file_id: str | None) -> None:
        async with self._tx() as db:
            await db.execute(Q.set_input_file, (input_file_id, batch_id))

    @shielded
    async def note_submit_failure(self, batch_id: int, error: str, retry_at: float) -> None:
        async with self._tx() as db:
            await db.execute(Q.note_submit_failure, (error, retry_at, batch_id))
            await self._add_error(db, "batch.submit_failed", f"batch {batch_id}: {error}")

    @shielded
    async def mark_submitted(
        self, batch_id: int, remote_id: str, remote_status: str, now: float, remote_created_at: float | None = None
    ) -> None:
        """The provider holds the batch now: record its id and count an attempt for each item."""
        async with self._tx() as db:
            await db.execute(Q.mark_submitted, (remote_id, remote_status, now, remote_created_at or now, batch_id))
            await db.execute(Q.items_submitted, (batch_id,))

    @shielded
    async def mark_unverified(
        self, batch_id: int, remote_id: str, remote_status: str, now: float, remote_created_at: float | None
    ) -> None:
        """A remote batch that may be this intent's (found by count and time): held, not yet ours.

        Its items stay `batched` and no attempt is counted until the batch is proven ours, so a
        stranger's batch can be let go without a trace on the items.
        """
        note = f"adopted {remote_id} provisionally: ownership is proven from its results once it has ended"
        async with self._tx() as db:
            await db.execute(
                Q.mark_unverified, (remote_id, remote_status, now, remote_created_at or now, note, batch_id)
            )

    @shielded
    async def confirm_ownership(self, batch_id: int) -> None:
        """The unverified batch's results prove it ours: it becomes submitted, each item counts an attempt."""
        async with self._tx() as db:
            await db.execute(Q.confirm_ownership, (batch_id,))
            await db.execute(Q.items_submitted, (batch_id,))

    @shielded
    async def unadopt(self, batch_id: int, remote_id: str, reason: str) -> None:
        """The unverified batch is not ours: let it go, never offer it to this intent again, reconcile anew."""
        async with self._tx() as db:
            await db.execute(Q.reject_remote, (batch_id, remote_id, time.time(), reason))
            await db.execute(Q.unadopt, (f"{remote_id} was not ours: {reason}", batch_id, remote_id))
            await self._add_error(db, "batch.not_ours", f"batch {batch_id}: {remote_id}: {reason}")

    async def rejected_remotes(self, batch_id: int) -> set[str]:
        rows = await self._rows(Q.rejected_remotes, (batch_id,))
        return {r["remote_id"] for r in rows}

    @shielded
    async def request_poll(self, batch_id: int, now: float) -> None:
        async with self._tx() as db:
            await db.execute(Q.request_poll, {"id": batch_id, "now": now})

    @shielded
    async def note_cancel_requested(
        self, batch_id: int, error: str, reason: CancelReason = CancelReason.EXPIRY
    ) -> None:
        async with self._tx() as db:
            await db.execute(Q.note_cancel_requested, (time.time(), error, batch_id))
            await db.execute(Q.note_cancel_reason, (reason.value, batch_id))
            await self._add_error(db, _CANCEL_EVENTS[reason], f"batch {batch_id}: {error}")

    async def canceled_files(self, batch_id: int) -> set[int]:
        return {int(r[0]) for r in await self._rows(Q.canceled_files, (batch_id,))}

    async def batched_items(self, batch_id: int) -> list[SubmittedItem]:
        return [_submitted(r) for r in await self._rows(Q.batched_items, (batch_id,))]

    @shielded
    async def drop_pending(
        self, batch_id: int, finals: Sequence[FinalResult], fate: Fate, error: str, now: float
    ) -> tuple[int, int]:
        async with self._tx() as db:
            if not list(await db.execute_fetchall(Q.batch_still_pending, (batch_id,))):
                return 0, 0
            rows = await db.execute_fetchall(Q.pending_batch_routes, (batch_id,))
            route = {int(r[0]): (r[1], r[2]) for r in rows}
            applied = list({f.item_id: f for f in finals if f.item_id in route}.values())
            await db.executemany(
                Q.insert_canceled_result,
                [(f.file_id, f.line, f.item_id, f.status, *route[f.item_id], f.payload, now) for f in applied],
            )
            by_state: dict[str, list[int]] = {}
            for f in applied:
                by_state.setdefault(_final_state(f.status), []).append(f.item_id)
            for state, ids in by_state.items():
                await db.execute(Q.items_final, (state, _json(ids)))
            await db.execute(Q.delete_item_bodies, (_json(f.item_id for f in applied),))
            requeued = (await db.execute(Q.unclaim_batched, (batch_id,))).rowcount
            await db.execute(Q.finish_batch, {"now": now, "fate": fate.value, "error": error, "id": batch_id})
            await self._add_error(db, f"batch.{fate.value}", f"batch {batch_id}: {error}")
            return len(applied), requeued

    async def canceled_with_queued(self) -> list[int]:
        return [int(r[0]) for r in await self._rows(Q.canceled_with_queued, ())]

    @shielded
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
        async with self._tx() as db:
            await db.execute(
                Q.record_poll,
                {
                    "remote_status": remote_status,
                    "counts": orjson.dumps(counts) if counts else None,
                    "output_file_id": output_file_id,
                    "error_file_id": error_file_id,
                    "now": time.time(),
                    "ended": ended,
                    "id": batch_id,
                },
            )

    @shielded
    async def note_batch_error(self, batch_id: int, event: str, error: str) -> None:
        async with self._tx() as db:
            await db.execute(Q.note_batch_error, (error, batch_id))
            await self._add_error(db, event, f"batch {batch_id}: {error}")

    @shielded
    async def finish_batch(
        self, batch_id: int, fate: str | None = None, error: str | None = None, record: bool = True
    ) -> None:
        """The batch is over; `fate` (and `error`, shown by status) say how when it did not end normally."""
        fate_value = Fate(fate).value if fate is not None else None
        async with self._tx() as db:
            await db.execute(Q.finish_batch, {"now": time.time(), "fate": fate_value, "error": error, "id": batch_id})
            if fate_value is not None and record:
                await self._add_error(db, f"batch.{fate_value}", f"batch {batch_id}: {error or fate_value}")

    # -- outcomes --------------------------------------------------------------------------

    async def submitted_items(self, batch_id: int, item_ids: Collection[int] | None = None) -> list[SubmittedItem]:
        """The batch's items still waiting for an outcome (all of them, or those among `item_ids`), by id."""
        if item_ids is None:
            rows = await self._rows(Q.submitted_items, (batch_id,))
        elif not item_ids:
            return []
        else:
            rows = await self._rows(Q.submitted_items_among, (batch_id, _json(item_ids)))
        return [_submitted(r) for r in rows]

    async def fallback_answered(self, batch_id: int) -> list[SubmittedItem]:
        return [_submitted(r) for r in await self._rows(Q.fallback_answered, (batch_id,))]

    @shielded
    async def record_outcomes(
        self,
        batch_id: int,
        finals: Sequence[FinalResult],
        retries: Sequence[Retry],
        handovers: Collection[int] = (),
    ) -> ApplySummary:
        """Finals become results (bodies dropped), retries go back to the queue, handovers to the
        fallback, in one transaction (see the contract: first final wins, duplicates)."""
        if not finals and not retries and not handovers:
            return ApplySummary()
        now = time.time()
        recent: int | None = None  # the id of the first result inserted, when every final was
        async with self._tx() as db:
            wanted = [f.item_id for f in finals] + [r.item_id for r in retries] + list(handovers)
            rows = await db.execute_fetchall(Q.waiting_among, (batch_id, _json(wanted)))
            waiting = {int(r[0]) for r in rows}
            submitted = {int(r[0]) for r in rows if r[1] == ItemState.SUBMITTED.value}
            route = list(await db.execute_fetchall(Q.batch_route, (batch_id,)))
            profile, model = (route[0]["profile"], route[0]["model"]) if route else (None, None)
            applied_finals = [f for f in finals if f.item_id in waiting]
            late = [f for f in finals if f.item_id not in waiting and f.input_tokens is not None]
            submitted -= {f.item_id for f in applied_finals}
            applied_retries = [r for r in retries if r.item_id in submitted]
            submitted -= {r.item_id for r in applied_retries}
            applied_handovers = [item_id for item_id in dict.fromkeys(handovers) if item_id in submitted]
            (last_before,) = next(iter(await db.execute_fetchall(Q.max_result_id)))
            inserting = await db.executemany(
                Q.insert_final_result,
                [
                    (
                        f.file_id,
                        f.line,
                        f.item_id,
                        f.status,
                        profile,
                        model,
                        batch_id,
                        f.input_tokens,
                        f.output_tokens,
                        f.cached_input_tokens,
                        f.cache_creation_input_tokens,
                        f.cost_batch,
                        f.cost_realtime,
                        f.payload,
                        now,
                        f.via,
                        f.cost_paid,
                        f.item_id,
                    )
                    for f in applied_finals
                ],
            )
            if applied_finals and inserting.rowcount == len(applied_finals):
                recent = int(last_before) + 1  # none skipped (ON CONFLICT): their ids are the next ones, in order
            # The request body is no longer needed once an item has its final result.
            # Set-based, one statement per final state: a statement per row would take the GIL back
            # once per row, and the thread deciding the next chunk holds it (each wait up to 5 ms).
            by_state: dict[str, list[int]] = {}
            for f in applied_finals:
                by_state.setdefault(_final_state(f.status), []).append(f.item_id)
            for state, ids in by_state.items():
                await db.execute(Q.items_final, (state, _json(ids)))
            await db.execute(Q.delete_item_bodies, (_json([f.item_id for f in applied_finals]),))
            # A retry's age counts from when it becomes due.
            await db.executemany(
                Q.item_retry,
                [(r.not_before, max(now, r.not_before), r.error, r.item_id) for r in applied_retries if not r.refund],
            )
            await db.executemany(
                Q.item_retry_refund,
                [(r.not_before, max(now, r.not_before), r.error, r.item_id) for r in applied_retries if r.refund],
            )
            if applied_handovers:
                await db.execute(Q.item_handover, (batch_id, _json(applied_handovers)))
            duplicates = await self._duplicates(db, late, batch_id, now)
        if recent is not None:  # committed: the sinks woken next may read them from memory
            self._recent.add(recent, applied_finals, now)
        applied = len(applied_finals) + len(applied_retries) + len(applied_handovers)
        return ApplySummary(
            final=len(applied_finals),
            requeued=len(applied_retries),
            ignored=len(finals) + len(retries) + len(handovers) - applied - duplicates,
            handed_over=len(applied_handovers),
            duplicates=duplicates,
        )

    @staticmethod
    async def _duplicates(
        db: aiosqlite.Connection, late: Sequence[FinalResult], batch_id: int | None, now: float
    ) -> int:
        """Record billed answers for items already answered the other way as duplicate costs."""
        recorded = 0
        for f in late:
            cursor = await db.execute(
                Q.insert_duplicate,
                {
                    "batch_id": batch_id,
                    "via": f.via,
                    "input_tokens": f.input_tokens,
                    "output_tokens": f.output_tokens,
                    "cost": f.cost_paid,
                    "now": now,
                    "item_id": f.item_id,
                },
            )
            recorded += cursor.rowcount
        return recorded

    @shielded
    async def refund_batch(self, batch_id: int, not_before: float, error: str) -> int:
        """Every SUBMITTED item of the batch back to the queue, its attempt given back; how many."""
        async with self._tx() as db:
            cursor = await db.execute(Q.refund_batch, (not_before, max(time.time(), not_before), error, batch_id))
            return cursor.rowcount

    async def batch_item_ids(self, batch_id: int) -> list[int]:
        """The batch's items in the order of its input file."""
        rows = await self._rows(Q.batch_item_ids, (batch_id,))
        return [row["id"] for row in rows]

    # -- the real-time fallback ------------------------------------------------------------

    @shielded
    async def fallback_due(self, now: float) -> FallbackDue:
        async with self._tx() as db:
            taken = (await db.execute(Q.fallback_take_queued, {"now": now, "node": self.node})).rowcount
            rows = await db.execute_fetchall(Q.fallback_cancel_batches, {"now": now})
        return FallbackDue(realtime=taken, batches=tuple(sorted(int(r[0]) for r in rows)))

    async def next_fallback_at(self, now: float) -> float | None:
        row = await self._row(Q.next_fallback_at, (now,))
        return None if row is None or row["at"] is None else float(row["at"])

    @shielded
    async def hand_over(self, batch_id: int) -> int:
        async with self._tx() as db:
            return (await db.execute(Q.hand_over, (batch_id,))).rowcount

    async def realtime_items(self, limit: int, exclude: Collection[int] = ()) -> list[RealtimeItem]:
        rows = await self._rows(Q.realtime_items, {"node": self.node, "exclude": _json(exclude), "limit": limit})
        return [
            RealtimeItem(
                r["id"], r["file_id"], r["line"], r["custom_id"], r["profile"], r["endpoint"], r["model"],
                bytes(r["body"]), r["tokens"], r["deadline"], r["batch_id"],
            )
            for r in rows
        ]  # fmt: skip

    @shielded
    async def record_realtime(self, finals: Sequence[FinalResult]) -> ApplySummary:
        if not finals:
            return ApplySummary()
        now = time.time()
        async with self._tx() as db:
            rows = await db.execute_fetchall(Q.realtime_among, (_json(f.item_id for f in finals),))
            waiting = {int(r[0]) for r in rows}
            applied = [f for f in finals if f.item_id in waiting]
            late = [f for f in finals if f.item_id not in waiting and f.input_tokens is not None]
            await db.executemany(
                Q.insert_realtime_result,
                [
                    {
                        "status": f.status,
                        "input_tokens": f.input_tokens,
                        "output_tokens": f.output_tokens,
                        "cached_input_tokens": f.cached_input_tokens,
                        "cache_creation_input_tokens": f.cache_creation_input_tokens,
                        "cost_batch": f.cost_batch,
                        "cost_realtime": f.cost_realtime,
                        "payload": f.payload,
                        "now": now,
                        "via": f.via,
                        "cost_paid": f.cost_paid,
                        "item_id": f.item_id,
                    }
                    for f in applied
                ],
            )
            by_state: dict[str, list[int]] = {}
            for f in applied:
                by_state.setdefault(_final_state(f.status), []).append(f.item_id)
            for state, ids in by_state.items():
                await db.execute(Q.items_final, (state, _json(ids)))
            await db.execute(Q.delete_item_bodies, (_json([f.item_id for f in applied]),))
            duplicates = await self._duplicates(db, late, None, now)
        return ApplySummary(final=len(applied), ignored=len(finals) - len(applied) - duplicates, duplicates=duplicates)

    # -- delivery --------------------------------------------------------------------------

    async def sink_cursor(self, sink: str) -> int:
        row = await self._row(Q.sink_cursor, (sink,))
        return int(row["last_result_id"]) if row else 0

    async def results_after(self, last_id: int, limit: int, node: str | None = None) -> list[PendingResult]:
        """Results with id > last_id in id order (SQLite's single writer makes ids commit-ordered).

        Those this store has just committed come from memory (_RecentResults), the rest from the database.
        """
        results: list[PendingResult] = []
        while len(results) < limit and (run := self._recent.run_after(last_id, limit - len(results))):
            files = {
                int(r[0]): (r[1], r[2])
                for r in await self._rows(Q.files_node_out_name, (_json({file_id for _, file_id, _, _ in run}),))
            }
            results += [
                PendingResult(result_id, file_id, files[file_id][1], payload, created_at)
                for result_id, file_id, payload, created_at in run
                if file_id in files and (node is None or files[file_id][0] == node)
            ]
            last_id = run[-1][0]
        if len(results) < limit:  # past what memory holds (usually nothing more yet)
            rows = await self._rows(Q.results_after, {"last": last_id, "node": node, "limit": limit - len(results)})
            results += [_pending_from_row(r) for r in rows]
        return results

    @shielded
    async def advance_cursor(self, sink: str, last_id: int) -> None:
        async with self._tx() as db:
            await db.execute(Q.advance_cursor, (sink, last_id))

    @shielded
    async def park(self, sink: str, result_ids: Sequence[int], error: str, advance_to: int | None) -> None:
        """Give up on results for now: record them as parked and (for new ones) move the cursor past them."""
        now = time.time()
        async with self._tx() as db:
            await db.executemany(Q.park, [(sink, result_id, now, error) for result_id in result_ids])
            if advance_to is not None:
                await db.execute(Q.advance_cursor, (sink, advance_to))
            await self._add_error(db, "sink.parked", f"{sink}: {len(result_ids)} results parked: {error}")

    async def to_redeliver(self, sink: str, limit: int) -> list[PendingResult]:
        rows = await self._rows(Q.to_redeliver, (sink, limit))
        return [_pending_from_row(r) for r in rows]

    @shielded
    async def unpark(self, sink: str, result_ids: Sequence[int]) -> None:
        async with self._tx() as db:
            await db.executemany(Q.unpark, [(sink, i) for i in result_ids])

    @shielded
    async def request_redelivery(self, sink: str | None) -> int:
        """Flag parked results (of one sink, or all) to be sent again; returns how many."""
        async with self._tx() as db:
            cursor = await db.execute(Q.request_redelivery, {"sink": sink})
            return cursor.rowcount

    @shielded
    async def take_sink_lease(self, sink: str, lease_seconds: float, now: float) -> bool:
        """Whether this node holds (took or renewed) the lease to deliver `sink`."""
        async with self._tx() as db:
            await db.execute(
                Q.take_sink_lease, {"sink": sink, "node": self.node, "until": now + lease_seconds, "now": now}
            )
            rows = list(await db.execute_fetchall(Q.sink_lease_holder, (sink,)))
            return bool(rows) and rows[0]["node"] == self.node

    @shielded
    async def outbox_delivered(self, sink: str, last_id: int, files: dict[int, tuple[int, int]]) -> None:
        """Set the outbox cursor `sink`; `files` maps file id to (lines added, new durable .part length)."""
        async with self._tx() as db:
            await db.execute(Q.set_cursor, (sink, last_id))
            await db.executemany(
                Q.file_delivered, [(added, length, file_id) for file_id, (added, length) in files.items()]
            )

    async def open_files(self) -> list[FileRow]:
        """This node's files whose results are not complete (INGESTING ones included: check `state`)."""
        rows = await self._rows(Q.open_files, (self.node,))
        return [_file_from_row(r) for r in rows]

    async def file(self, file_id: int) -> FileRow | None:
        row = await self._row(Q.file, (file_id,))
        return _file_from_row(row) if row else None

    async def files_by_id(self, file_ids: Iterable[int]) -> dict[int, FileRow]:
        """The rows of these files, as committed now (the outbox's source of committed .part lengths)."""
        ids = sorted(set(file_ids))
        if not ids:
            return {}
        rows = await self._rows(Q.files_by_id, (_json(ids),))
        return {r["id"]: _file_from_row(r) for r in rows}

    async def delivered_payloads(self, file_id: int, after_id: int, limit: int) -> list[tuple[int, bytes]]:
        """(id, payload) of this file's results its node's outbox has delivered, after `after_id`, in order.

        Used to rebuild a .part that is shorter than its committed length (lost or cut by someone).
        """
        rows = await self._rows(Q.delivered_payloads, {"file": file_id, "after": after_id, "limit": limit})
        return [(int(r["id"]), bytes(r["payload"])) for r in rows]

    @shielded
    async def complete_file(self, file_id: int) -> None:
        """OPEN -> COMPLETE (never an INGESTING file). Idempotent."""
        async with self._tx() as db:
            await db.execute(Q.complete_file, (time.time(), file_id))

    # -- reporting -------------------------------------------------------------------------

    REPORT_KEYS = REPORT_KEYS

    async def report(self, since: float, by: str) -> list[dict[str, Any]]:
        """Requests, tokens, costs, the fallback's share, deadlines and duplicates per `by` (model,
        provider, day or file) for results since `since`."""
        if by not in REPORT_KEYS:
            raise KeyError(by)
        rows = await self._rows(Q.report, {"since": since, "by": by})
        return [dict(row) for row in rows]

    async def query_results(
        self, file: str | None, custom_id: str | None, status: str | None, limit: int
    ) -> list[dict[str, Any]]:
        """Stored result lines matching every given filter, oldest first."""
        rows = await self._rows(
            Q.query_results, {"file": file, "custom_id": custom_id, "status": status, "limit": limit}
        )
        return [dict(row) for row in rows]

    # -- operations (issue 12) ---------------------------------------------------------------

    @shielded
    async def pause(self, profile: str, model: str, reason: str | None = None) -> bool:
        async with self._tx() as db:
            before = list(await db.execute_fetchall(Q.pauses))
            await db.execute(Q.pause, (profile, model, time.time(), reason))
            return not any(r["profile"] == profile and r["model"] == model for r in before)

    @shielded
    async def resume(self, profile: str | None = None, model: str | None = None) -> int:
        async with self._tx() as db:
            if profile is None:
                cursor = await db.execute(Q.resume_all)
            else:
                cursor = await db.execute(Q.resume_route, (profile, model or "*"))
            return cursor.rowcount

    async def pauses(self) -> list[Pause]:
        rows = await self._rows(Q.pauses)
        return [Pause(r["profile"], r["model"], r["paused_at"], r["reason"]) for r in rows]

    @shielded
    async def request_flush(self, route: str, now: float) -> None:
        async with self._tx() as db:
            await db.execute(Q.request_flush, (route, now))

    async def recent_batches(self, limit: int) -> list[BatchRow]:
        return [_batch_from_row(r) for r in await self._rows(Q.recent_batches, (limit,))]

    @shielded
    async def request_cancel(self, batch_id: int, reason: CancelReason, now: float) -> bool:
        async with self._tx() as db:
            cursor = await db.execute(Q.request_cancel, {"id": batch_id, "reason": reason.value, "now": now})
            return cursor.rowcount > 0

    async def files_named(self, name: str) -> list[FileRow]:
        return [_file_from_row(r) for r in await self._rows(Q.files_named, (name,))]

    async def queued_items(self, file_id: int) -> list[SubmittedItem]:
        rows = await self._rows(Q.queued_items, (file_id,))
        return [SubmittedItem(r[0], r[1], r[2], r[3], r[4]) for r in rows]

    async def file_items(self, file_id: int) -> list[FileItem]:
        rows = await self._rows(Q.file_items, (file_id,))
        return [FileItem(r[0], r[1], r[2], ItemState(r[3]), r[4], r[5], r[6], r[7], r[8], r[9], r[10]) for r in rows]

    @shielded
    async def cancel_file(self, file_id: int, finals: Sequence[FinalResult], now: float) -> tuple[int, list[int]]:
        async with self._tx() as db:
            await db.execute(Q.mark_file_canceled, (now, file_id))
            by_item = {f.item_id: f for f in finals if f.file_id == file_id}
            rows = await db.execute_fetchall(Q.queued_among, (file_id, _json(by_item)))
            route = {int(r[0]): (r[1], r[2]) for r in rows}
            applied = [f for item_id, f in by_item.items() if item_id in route]
            await db.executemany(
                Q.insert_canceled_result,
                [(f.file_id, f.line, f.item_id, f.status, *route[f.item_id], f.payload, now) for f in applied],
            )
            ids = _json(f.item_id for f in applied)
            await db.execute(Q.items_final, (ItemState.CANCELED.value, ids))
            await db.execute(Q.delete_item_bodies, (ids,))
            batches = [int(r[0]) for r in await db.execute_fetchall(Q.file_live_batches, (file_id,))]
            for batch_id in batches:
                await db.execute(Q.request_cancel, {"id": batch_id, "reason": CancelReason.FILE.value, "now": now})
            return len(applied), batches

    @shielded
    async def prune_finished(self, before: float, limit: int = 100, sinks: Collection[str] = ()) -> PruneSummary:
        # Cursors only move forward: read before the transaction, they can only be conservative.
        delivered = min([await self.sink_cursor(sink) for sink in sinks], default=None)
        async with self._tx() as db:
            files = [
                r["id"]
                for r in await db.execute_fetchall(
                    Q.prunable_files, {"before": before, "limit": limit, "delivered": delivered}
                )
            ]
            results = 0
            if files:
                ids = _json(files)
                # The report's totals first, in this transaction: pruned rows are never uncounted.
                await db.execute(Q.fold_totals, (ids,))
                await db.execute(Q.fold_duplicates, (ids,))
                await db.execute(Q.fold_metric_files, {"ids": ids})
                await db.execute(Q.prune_duplicates, (ids,))
                results = (await db.execute(Q.prune_results, (ids,))).rowcount
                await db.execute(Q.prune_item_bodies, (ids,))
                await db.execute(Q.prune_items, (ids,))
                await db.execute(Q.prune_files, (ids,))
            rows = await db.execute_fetchall(Q.prunable_batches, {"before": before, "limit": limit})
            batches = [r["id"] for r in rows]
            if batches:
                folded = {"ids": _json(batches), "buckets": _json(list(TURNAROUND_BUCKETS))}
                await db.execute(Q.fold_metric_batches, folded)
                await db.execute(Q.prune_batch_rejects, (_json(batches),))
                await db.execute(Q.prune_batches, (_json(batches),))
        return PruneSummary(files=len(files), results=results, batches=len(batches))

    @staticmethod
    async def _add_error(db: aiosqlite.Connection, event: str, message: str) -> None:
        await db.execute(Q.add_error, (time.time(), event, message))
        await db.execute(Q.trim_errors, (ERRORS_KEPT,))

    @shielded
    async def add_error(self, event: str, message: str) -> None:
        async with self._tx() as db:
            await self._add_error(db, event, message)

    async def status(self, errors: int = 10) -> dict[str, Any]:
        """A snapshot for `batchd status`: queue per route, live batches, files, recent errors."""
        routes: dict[tuple[str, str, str], dict[str, int]] = {}
        for row in await self._rows(Q.status_queue):
            key = (row["profile"], row["endpoint"], row["model"])
            routes.setdefault(key, {"queued": 0, "batched": 0, "submitted": 0})[row["state"]] = row["n"]
        live = await self.batches_in_state(*LIVE_BATCH_STATES)
        ended_badly = await self._rows(Q.status_ended_batches)
        totals = await self._rows(Q.status_results)
        files = await self._rows(Q.status_files)
        recent = await self._rows(Q.status_errors, (errors,))
        holds = await self._rows(Q.status_holds, (time.time(),))
        sinks = await self._rows(Q.status_sinks)
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

    async def metrics(self) -> dict[str, list[dict[str, Any]]]:
        """Database-wide aggregates for /metrics (see the contract), on the reader connection."""
        reads = {name: await self._rows(getattr(Q, f"metrics_{name}")) for name in METRICS_READS}
        reads["sinks"] = await self._rows(Q.status_sinks)
        return {name: [dict(row) for row in rows] for name, rows in reads.items()}


# The error event a cancel request at the provider leaves, by why it was made.
_CANCEL_EVENTS = {
    CancelReason.EXPIRY: "batch.overdue_cancelled",
    CancelReason.OPERATOR: "batch.operator_cancelled",
    CancelReason.FILE: "batch.operator_cancelled",
    CancelReason.DEADLINE: "batch.deadline_cancelled",
}


_ITEM_STATES = {state.value: state for state in ItemState}


def _submitted(r: sqlite3.Row) -> SubmittedItem:
    # By position (the columns of submitted_items, submitted_items_among, fallback_answered): one per
    # request of a batch being collected.
    return SubmittedItem(r[0], r[1], r[2], r[3], r[4], _ITEM_STATES[r[5]], r[6])


def _final_state(status: Status) -> str:
    """The item state a final result leaves (an item's own invalid line ends it as errored)."""
    return status if status in FINAL_ITEM_STATES else ItemState.ERRORED.value
