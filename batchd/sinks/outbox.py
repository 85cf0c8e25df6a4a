"""The outbox sink: spool/out/NAME.results.jsonl, one line per input line.

`NAME.results.jsonl.part` grows as results arrive and is renamed to `NAME.results.jsonl` once every
line of NAME has its result. Exactly-once: lines are appended and fsynced first, then the new
durable length is committed with the delivery cursor. Before every append the .part is cut back
to the length committed in the store, so lines that a failed attempt wrote (whole or torn: a full
disk, a locked database, a crash) are written again exactly once, on any retry, not only after a
restart.

Every write goes through a descriptor of out/ opened with O_NOFOLLOW: the .part is opened with
O_NOFOLLOW (a symlink planted there is refused), truncation works on that descriptor, and the
final rename never replaces a file already at the results name.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
import stat
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

from .. import safefs
from ..crashpoints import CrashPoints
from ..logs import get_logger
from ..store.contract import FileRow, FileState, PendingResult, Store
from .base import Sink

log = get_logger("batchd.outbox")

PART_MODE = 0o640
T = TypeVar("T")
REBUILD_CHUNK = 2000


class NameTaken(Exception):
    """Something other than this file's results already has its results name."""


class OutboxSink(Sink):
    """Writes results files beside the spool."""

    # As many as a collection commits at once (poller.APPLY_CHUNK): one fsync and one commit each.
    chunk = 5000

    def __init__(self, store: Store, out_dir: Path, crashpoints: CrashPoints | None = None) -> None:
        super().__init__(store)
        self.out_dir = out_dir
        self._crashpoints = crashpoints or CrashPoints("")
        # Files whose every line is committed but whose rename (or its record) has not happened yet.
        self._to_complete: set[int] = set()
        # The last problem reported per file, so a file retried every round is logged once, not every second.
        self._reported: dict[int, str] = {}
        # A file finished ingesting: its results may all be delivered already (e.g. every line invalid,
        # delivered chunk by chunk while it was still being ingested), so no delivery would complete it.
        self._look_at_files = False

    @contextlib.contextmanager
    def _out(self) -> Iterator[int]:
        """A descriptor of out/, reached from the spool root without following a symlink at either step."""
        with safefs.directory(self.out_dir.parent) as root:
            with contextlib.suppress(FileExistsError):
                os.mkdir(self.out_dir.name, 0o750, dir_fd=root)
            with safefs.directory(self.out_dir.name, dir_fd=root) as out:
                yield out

    @property
    def name(self) -> str:  # type: ignore[override]
        # Per node: each daemon writes the results of the files it ingested to its own out/.
        return "outbox:" + self.store.node

    @property
    def node(self) -> str | None:
        return self.store.node

    async def cursor(self) -> int:
        return await self.store.sink_cursor(self.name)

    async def recover(self) -> None:
        rows = await self.store.open_files()
        with self._out() as out:
            for row in rows:
                if not safefs.exists(out, _part(row)):
                    continue
                try:
                    fd = safefs.open_append(out, _part(row), PART_MODE)
                except OSError as exc:
                    # Not fatal at start: delivery to this file retries (and reports) with backoff.
                    log.error("outbox.part_unusable", file=row.name, results=row.out_name, error=str(exc))
                    continue
                try:
                    await self._cut_back(fd, row)
                finally:
                    os.close(fd)
        for row in rows:
            if _all_delivered(row):
                self._to_complete.add(row.id)
        await self._complete_pending()

    def ingested(self) -> None:
        self._look_at_files = True

    async def before_delivery(self) -> None:
        if self._look_at_files:
            self._look_at_files = False
            self._to_complete.update(row.id for row in await self.store.open_files() if _all_delivered(row))
        # A failure after the commit (the rename, or recording it) is retried here, exactly once.
        await self._complete_pending()

    async def deliver(self, results: list[PendingResult]) -> None:
        if not results:
            return
        by_file: dict[int, list[PendingResult]] = {}
        for result in results:
            by_file.setdefault(result.file_id, []).append(result)
        committed = await self.store.files_by_id(by_file)
        progress: dict[int, tuple[int, int]] = {}
        with self._out() as out:
            for file_id, lines in by_file.items():
                row = committed[file_id]
                fd = safefs.open_append(out, _part(row), PART_MODE)
                try:
                    await self._cut_back(fd, row)
                    # Off the event loop: a chunk is megabytes, and an fsync on a busy disk can take a second.
                    length = await _in_thread(_append_durably, fd, b"".join(line.payload + b"\n" for line in lines))
                    progress[file_id] = (len(lines), length)
                finally:
                    os.close(fd)
        self._crashpoints.reach("after-outbox-write")
        await self.store.outbox_delivered(self.name, results[-1].id, progress)
        for row in (await self.store.files_by_id(progress)).values():
            if _all_delivered(row):
                self._to_complete.add(row.id)
        await self._complete_pending()

    async def _cut_back(self, fd: int, row: FileRow) -> None:
        """Make the open .part exactly its committed length: cut what was never committed, rebuild what is missing."""
        size = os.fstat(fd).st_size
        if size == row.out_bytes:
            return
        if size > row.out_bytes:
            os.ftruncate(fd, row.out_bytes)
            os.fsync(fd)
            log.info(
                "outbox.truncated", file=row.name, results=row.out_name, length=row.out_bytes, cut=size - row.out_bytes
            )
            return
        # Shorter than committed: someone cut or replaced it. Write the delivered lines again from the store.
        os.ftruncate(fd, 0)
        after = 0
        while chunk := await self.store.delivered_payloads(row.id, after, REBUILD_CHUNK):
            _write_all(fd, b"".join(payload + b"\n" for _, payload in chunk))
            after = chunk[-1][0]
        os.fsync(fd)
        rebuilt = os.fstat(fd).st_size
        log.warning("outbox.rebuilt", file=row.name, results=row.out_name, found=size, length=rebuilt)
        if rebuilt != row.out_bytes:
            raise OSError(errno.EIO, f"{row.out_name}: rebuilt {rebuilt} bytes, committed {row.out_bytes}")

    async def _complete_pending(self) -> None:
        if not self._to_complete:
            return
        rows = await self.store.files_by_id(self._to_complete)
        for file_id in sorted(self._to_complete):
            row = rows.get(file_id)
            if row is None or row.state != FileState.OPEN:
                self._to_complete.discard(file_id)
                continue
            try:
                await self._complete(row)
            except NameTaken:
                # The other file is never touched; this one waits (and is retried each round) until it is gone.
                await self._report_once(
                    row,
                    "outbox.name_taken",
                    f"{row.out_name}: another file has this name; results kept in {_part(row)}",
                )
                continue
            except OSError as exc:
                # One file that cannot be finished must not hold up the others; it is retried each round.
                await self._report_once(row, "outbox.complete_failed", f"{row.out_name}: {exc}")
                continue
            self._to_complete.discard(file_id)
            self._reported.pop(file_id, None)

    async def _report_once(self, row: FileRow, event: str, message: str) -> None:
        if self._reported.get(row.id) == event:
            return
        self._reported[row.id] = event
        log.error(event, file=row.name, results=row.out_name, error=message)
        await self.store.add_error(event, message)

    async def _complete(self, row: FileRow) -> None:
        """Rename the finished .part to the results name, never over another file, and record it."""
        part, final = _part(row), row.out_name
        with self._out() as out:
            part_info = _lstat(out, part)
            final_info = _lstat(out, final)
            if part_info is not None and final_info is not None and _same(part_info, final_info):
                # A link-then-unlink rename interrupted between its two steps: finish it.
                os.unlink(part, dir_fd=out)
                part_info = None
            if part_info is None:
                if final_info is None:
                    # The .part is gone (or was never made: a file of no lines). Make it from the store.
                    fd = safefs.open_append(out, part, PART_MODE)
                    try:
                        await self._cut_back(fd, row)
                    finally:
                        os.close(fd)
                elif stat.S_ISREG(final_info.st_mode) and final_info.st_size == row.out_bytes:
                    # Renamed before a crash or a failed commit; only the record is missing.
                    await self._record_complete(row, out)
                    return
                else:
                    raise NameTaken(final)
            else:
                fd = safefs.open_append(out, part, PART_MODE)
                try:
                    await self._cut_back(fd, row)
                finally:
                    os.close(fd)
            try:
                safefs.rename_noreplace(out, part, out, final)
            except FileExistsError:
                raise NameTaken(final) from None
            await self._record_complete(row, out)

    async def _record_complete(self, row: FileRow, out: int) -> None:
        safefs.fsync_dir(out)
        await self.store.complete_file(row.id)
        log.info("results.completed", file=row.name, results=str(self.out_dir / row.out_name), lines=row.lines)


def _part(row: FileRow) -> str:
    return f"{row.out_name}.part"


def _all_delivered(row: FileRow) -> bool:
    # A file still being ingested has no final line count yet: it is never complete.
    return row.state == FileState.OPEN and row.delivered >= row.lines


def _lstat(dir_fd: int, name: str) -> os.stat_result | None:
    try:
        return os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
    except FileNotFoundError:
        return None


def _same(a: os.stat_result, b: os.stat_result) -> bool:
    return (a.st_dev, a.st_ino) == (b.st_dev, b.st_ino)


def _append_durably(fd: int, data: bytes) -> int:
    """Append `data`, fsync, and return the file's new length."""
    _write_all(fd, data)
    os.fsync(fd)
    return os.fstat(fd).st_size


async def _in_thread(function: Callable[..., T], *args: Any) -> T:
    """`function(*args)` in a worker thread. A cancellation still waits for it to end: it works on a
    descriptor the caller closes afterwards (closing it under the thread could hit a reused number)."""
    running = asyncio.ensure_future(asyncio.to_thread(function, *args))
    try:
        return await asyncio.shield(running)
    except asyncio.CancelledError:
        while not running.done():
            with contextlib.suppress(asyncio.CancelledError):
                await asyncio.wait([running])
        raise


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]
