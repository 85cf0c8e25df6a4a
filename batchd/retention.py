"""Retention: finished files and rows are removed once they are older than their configured age.

- spool/done/ (daemon.done_retention), spool/rejected/ (daemon.rejected_retention) and the
  delivered results files in spool/out/ (daemon.out_retention; never a `.part` still growing) are
  pruned by the spool's periodic pass, through its directory descriptors (`prune_directory`);
- the database's finished rows (daemon.rows_retention) by the daemon's `Retention` task, through
  `Store.prune_finished`, which folds the results into the report's totals in the same
  transaction, so `batchd report` reads the same before and after.

An age of 0 keeps things forever.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import stat
import time
from collections.abc import Callable

from .aio import wait_any
from .logs import get_logger
from .settings import Settings
from .store.contract import Operations, PruneSummary

log = get_logger("batchd.retention")

PART_SUFFIX = ".part"
# Rows are pruned in transactions of at most this many files (and batches), so a large backlog
# never holds the writer for long.
PRUNE_CHUNK = 100
MAX_ROWS_INTERVAL = 3600.0


def cutoff(max_age: float, now: float) -> float | None:
    """Things last changed before this time are past `max_age`; None when kept forever (0)."""
    return None if max_age <= 0 else now - max_age


def rows_interval(max_age: float) -> float:
    """How often the database is pruned: a quarter of the retention, between 1 s and an hour."""
    return min(MAX_ROWS_INTERVAL, max(1.0, max_age / 4))


def still_growing(name: str) -> bool:
    """A results file the outbox is still appending to (out/NAME.results.jsonl.part): never pruned."""
    return name.endswith(PART_SUFFIX)


def prune_directory(dir_fd: int, before: float, keep: Callable[[str], bool] | None = None) -> list[str]:
    """Unlink the regular files (and symlinks: rejected/ keeps the ones producers dropped) of the
    directory `dir_fd` last modified before `before`; their names.

    Works through the descriptor only and never follows a symlink (unlinking one removes the link);
    a file that vanishes or cannot be removed meanwhile is left for the next pass. Subdirectories
    are left alone.
    """
    removed: list[str] = []
    try:
        names = os.listdir(dir_fd)
    except OSError:
        return removed
    for name in names:
        if keep is not None and keep(name):
            continue
        with contextlib.suppress(OSError):
            info = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
            if (stat.S_ISREG(info.st_mode) or stat.S_ISLNK(info.st_mode)) and info.st_mtime < before:
                os.unlink(name, dir_fd=dir_fd)
                removed.append(name)
    return removed


class Retention:
    """The daemon's task that prunes the database's finished rows every `rows_interval`."""

    def __init__(self, settings: Settings, store: Operations) -> None:
        self.settings = settings
        self.store = store

    async def prune_once(self, now: float) -> PruneSummary:
        """Prune everything past rows_retention, a chunk per transaction; what was removed."""
        before = cutoff(self.settings.daemon.rows_retention, now)
        total = PruneSummary()
        if before is None:
            return total
        while True:
            # A webhook sink behind (down, or parked) keeps the results it has still to send.
            sinks = [sink.name for sink in self.settings.sinks]
            pruned = await self.store.prune_finished(before, PRUNE_CHUNK, sinks)
            total += pruned
            if not pruned:
                return total

    async def run(self, stopping: asyncio.Event) -> None:
        max_age = self.settings.daemon.rows_retention
        if max_age <= 0:
            # Kept forever; the task still lives until the stop, since the daemon counts a task
            # that ends early as one that died.
            await stopping.wait()
            return
        while not stopping.is_set():
            try:
                pruned = await self.prune_once(time.time())
            except Exception as exc:  # the database's own trouble shows elsewhere; never stop the daemon for this
                log.warning("store.prune_failed", error=str(exc))
            else:
                if pruned:
                    log.info("store.pruned", files=pruned.files, results=pruned.results, batches=pruned.batches)
            await wait_any(rows_interval(max_age), stopping)
