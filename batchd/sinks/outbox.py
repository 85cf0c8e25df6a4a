"""The outbox sink: spool/out/NAME.results.jsonl, one line per input line.

`NAME.results.jsonl.part` grows as results arrive and is renamed to `NAME.results.jsonl` once every
line of NAME has its result. Exactly-once: lines are appended and fsynced first, then the new
durable length is committed with the delivery cursor; on start-up each .part file is cut back to
its committed length, so lines written but not committed are written again exactly once.
"""

from __future__ import annotations

import os
from pathlib import Path

from ..crashpoints import CrashPoints
from ..logs import get_logger
from ..store import FileRow, PendingResult, Store
from .base import Sink

log = get_logger("batchd.outbox")


class OutboxSink(Sink):
    """Writes results files beside the spool."""

    name = "outbox"

    def __init__(self, store: Store, out_dir: Path, crashpoints: CrashPoints | None = None) -> None:
        super().__init__(store)
        self.out_dir = out_dir
        self._crashpoints = crashpoints or CrashPoints("")

    def _part(self, out_name: str) -> Path:
        return self.out_dir / f"{out_name}.part"

    async def cursor(self) -> int:
        return await self.store.sink_cursor(self.name)

    async def recover(self) -> None:
        self.out_dir.mkdir(parents=True, exist_ok=True)
        for row in await self.store.open_files():
            part = self._part(row.out_name)
            if part.exists() and part.stat().st_size != row.out_bytes:
                with part.open("r+b") as handle:
                    handle.truncate(row.out_bytes)
                    os.fsync(handle.fileno())
                log.info("outbox.truncated", file=row.name, length=row.out_bytes)
            await self._complete_if_done(row)

    async def deliver(self, results: list[PendingResult]) -> None:
        if not results:
            return
        by_file: dict[int, list[PendingResult]] = {}
        for result in results:
            by_file.setdefault(result.file_id, []).append(result)
        progress: dict[int, tuple[int, int]] = {}
        for file_id, lines in by_file.items():
            part = self._part(lines[0].out_name)
            fd = os.open(part, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o640)
            with os.fdopen(fd, "ab") as handle:
                handle.write(b"".join(line.payload + b"\n" for line in lines))
                handle.flush()
                os.fsync(handle.fileno())
                progress[file_id] = (len(lines), handle.tell())
        self._crashpoints.reach("after-outbox-write")
        await self.store.outbox_delivered(results[-1].id, progress)
        for file_id in progress:
            row = await self.store.file(file_id)
            if row is not None:
                await self._complete_if_done(row)

    async def _complete_if_done(self, row: FileRow) -> None:
        if row.state != "open" or row.delivered < row.lines:
            return
        part = self._part(row.out_name)
        final = self.out_dir / row.out_name
        if part.exists():
            os.rename(part, final)
        elif not final.exists():
            # Every line was delivered, so the .part existed; nothing to rename means it is done already.
            final.touch(mode=0o640)
        fd = os.open(self.out_dir, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        await self.store.complete_file(row.id)
        log.info("results.completed", file=row.name, results=str(final), lines=row.lines)
