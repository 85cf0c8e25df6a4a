"""The outbox under real faults: a full filesystem, a locked database, a planted symlink, a taken name.

Exactly-once means: whatever fails between writing result lines and committing their durable
length, the retry first cuts the `.part` back to the committed length, so the finished results
file holds one whole line per input line, none torn, none twice. Every write into out/ goes
through a descriptor of out/ opened with O_NOFOLLOW, and the final rename never replaces a file.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
import sqlite3
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest
import structlog

from batchd.daemon import Daemon
from batchd.emulator import EmulatorConfig, RunningEmulator, start_emulator
from batchd.spool import SpoolPaths

from .conftest import make_settings, require_root, wait_until
from .harness import DaemonProcess, wait_for_file, write_config
from .test_faults import assert_one_result_per_line, chat_line, drop, out_path

FILLER_CHUNK = 64 * 1024


@contextlib.contextmanager
def small_tmpfs(directory: Path, size: str = "1m") -> Iterator[Path]:
    """Mount a small tmpfs over `directory` (keeping its mode and owner) and unmount it afterwards."""
    info = directory.stat()
    options = f"size={size},mode={info.st_mode & 0o7777:o},uid={info.st_uid},gid={info.st_gid}"
    subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(directory)], check=True)
    try:
        yield directory
    finally:
        subprocess.run(["umount", "-l", str(directory)], check=False)


def fill(directory: Path, leave: int) -> Path:
    """A filler file that leaves about `leave` bytes free on the filesystem of `directory`."""
    filler = directory / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        while True:
            stats = os.statvfs(directory)
            free = stats.f_bavail * stats.f_frsize
            if free <= leave:
                break
            try:
                os.write(fd, b"\0" * min(FILLER_CHUNK, free - leave))
            except OSError as exc:
                if exc.errno != errno.ENOSPC:
                    raise
                break
        os.fsync(fd)
    finally:
        os.close(fd)
    return filler


def assert_whole_lines_once(path: Path, lines: list[dict[str, Any]]) -> None:
    data = path.read_bytes()
    assert data.endswith(b"\n"), "the results file ends in a torn line"
    results = [orjson.loads(raw) for raw in data.splitlines()]  # a torn line would not parse
    assert_one_result_per_line(results, lines)


def database_rows(database: Path, sql: str, params: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    connection = sqlite3.connect(f"file:{database}?mode=ro", uri=True, timeout=5)
    try:
        return connection.execute(sql, params).fetchall()
    finally:
        connection.close()


def out_names(database: Path) -> list[str]:
    """The results names recorded so far; none while the database is still being created."""
    try:
        return [name for (name,) in database_rows(database, "SELECT out_name FROM files")]
    except sqlite3.OperationalError:
        return []


def logged(events: list[dict[str, Any]], name: str, text: str = "") -> bool:
    return any(e.get("event") == name and text in str(e.get("error", "")) for e in events)


# -- a real full filesystem -----------------------------------------------------------------------


async def test_a_full_disk_midway_through_a_chunk_gives_each_line_exactly_once(
    tmp_path: Path, emulator: RunningEmulator
) -> None:
    require_root()
    spool = tmp_path / "spool"
    SpoolPaths(spool).create()
    lines = [chat_line(n) for n in range(80)]
    with small_tmpfs(spool / "out"):
        # Room for a few result lines, not for the chunk: the write stops with ENOSPC midway.
        filler = fill(spool / "out", leave=8 * 1024)
        config = write_config(tmp_path, emulator)
        daemon = DaemonProcess(config, tmp_path / "daemon.log").start()
        part = spool / "out" / "full.results.jsonl.part"
        try:
            drop(spool, "full", lines)
            await wait_until(lambda: logged(daemon.log_events(), "sink.delivery_failed", "No space left"), timeout=60)
            assert daemon.running()
            assert part.stat().st_size > 0, "the write never got midway, so the test proves nothing"
            filler.unlink()
            await wait_for_file(out_path(spool, "full"), timeout=60, daemon=daemon)
            assert_whole_lines_once(out_path(spool, "full"), lines)
            assert not part.exists()
            # The torn tail of the failed attempt was cut off before the retry, not at a restart.
            assert any(e.get("event") == "outbox.truncated" for e in daemon.log_events())
            assert sum(e.get("event") == "daemon.ready" for e in daemon.log_events()) == 1, "it restarted"
        finally:
            await daemon.stop()
    database = tmp_path / "state" / "batchd.sqlite3"
    assert database_rows(database, "SELECT state, delivered, lines FROM files") == [("complete", 80, 80)]
    errors = database_rows(database, "SELECT event, message FROM errors WHERE event = 'sink.delivery_failed'")
    assert errors and all("outbox" in message for _, message in errors)


# -- a failure between the write and the commit ---------------------------------------------------


async def test_a_locked_database_after_the_write_gives_each_line_exactly_once(
    tmp_path: Path, emulator: RunningEmulator
) -> None:
    require_root()
    settings = make_settings(tmp_path, emulator)
    spool = settings.daemon.spool_dir
    database = settings.daemon.database_path
    SpoolPaths(spool).create()
    lines = [chat_line(n) for n in range(30)]
    part = spool / "out" / "locked.results.jsonl.part"
    with small_tmpfs(spool / "out"), structlog.testing.capture_logs() as events:
        # A full out/ holds delivery back until every result is in SQLite; then the database is locked.
        filler = fill(spool / "out", leave=0)
        daemon = Daemon(settings)
        daemon.store.busy_timeout = 0.5
        task = asyncio.create_task(daemon.run())
        try:
            drop(spool, "locked", lines)
            await wait_until(lambda: logged(events, "sink.delivery_failed", "No space left"), timeout=60)
            await wait_until(
                lambda: (
                    database_rows(database, "SELECT COUNT(*) FROM results") == [(len(lines),)]
                    and database_rows(database, "SELECT COUNT(*) FROM batches WHERE state != 'done'") == [(0,)]
                ),
                timeout=60,
            )
            expected = sum(len(p) + 1 for (p,) in database_rows(database, "SELECT payload FROM results"))
            # The daemon runs on this event loop and its transactions span several of its turns: taking
            # the lock on the loop's own thread would block the loop, and a transaction the daemon had
            # begun would hold the lock until the 5 s timeout ran out (CI saw it). Take it from a thread.
            locker = sqlite3.connect(database, timeout=5, isolation_level=None, check_same_thread=False)
            try:
                await asyncio.to_thread(locker.execute, "BEGIN IMMEDIATE")
                failures = sum(logged([e], "sink.delivery_failed") for e in events)
                filler.unlink()
                # Every line is written and fsynced, and the commit of its length cannot happen.
                await wait_until(lambda: part.exists() and part.stat().st_size == expected, timeout=60)
                await wait_until(
                    lambda: any(
                        logged([e], "sink.delivery_failed", "locked")
                        for e in events[failures:]
                        if e.get("event") == "sink.delivery_failed"
                    ),
                    timeout=60,
                )
                assert locker.execute("SELECT out_bytes, delivered FROM files").fetchall() == [(0, 0)]
            finally:
                if locker.in_transaction:
                    locker.execute("ROLLBACK")
                locker.close()
            await wait_until(lambda: out_path(spool, "locked").exists() or task.done(), timeout=60)
            assert not task.done(), "the daemon stopped"
            assert_whole_lines_once(out_path(spool, "locked"), lines)
            assert any(e.get("event") == "outbox.truncated" and e.get("cut") == expected for e in events)
        finally:
            daemon.request_stop("test over")
            assert await asyncio.wait_for(task, 30) == 0
    assert database_rows(database, "SELECT state, delivered, out_bytes FROM files") == [
        ("complete", len(lines), expected)
    ]


# -- writes into out/ are never redirected ----------------------------------------------------------


def invalid_lines(count: int) -> list[dict[str, Any]]:
    """Lines that get their (invalid) result at ingest, with no provider involved."""
    return [{"custom_id": f"bad-{n}", "prompt": "no shape"} for n in range(count)]


async def test_a_symlink_planted_as_the_part_file_is_refused_not_followed(tmp_path: Path) -> None:
    # The spool never picks a results name whose .part exists, so the symlink is planted after the
    # name was chosen (the file is ingested) and before any result arrives (a slow emulator).
    emulator = await start_emulator(EmulatorConfig(processing_seconds=3))
    settings = make_settings(tmp_path, emulator)
    spool = settings.daemon.spool_dir
    database = settings.daemon.database_path
    SpoolPaths(spool).create()
    victim = tmp_path / "victim.sqlite3"
    victim.write_bytes(b"the daemon must never write here\n")
    lines = [chat_line(n) for n in range(5)]
    with structlog.testing.capture_logs() as events:
        daemon = Daemon(settings)
        task = asyncio.create_task(daemon.run())
        try:
            drop(spool, "planted", lines)
            (out_name,) = await wait_until(lambda: database.exists() and out_names(database), timeout=30)
            part = spool / "out" / f"{out_name}.part"
            part.symlink_to(victim)
            await wait_until(lambda: logged(events, "sink.delivery_failed") or task.done(), timeout=60)
            assert not task.done()
            assert victim.read_bytes() == b"the daemon must never write here\n"
            assert part.is_symlink()
            part.unlink()
            await wait_until(lambda: (spool / "out" / out_name).exists() or task.done(), timeout=60)
            assert_whole_lines_once(spool / "out" / out_name, lines)
        finally:
            daemon.request_stop("test over")
            assert await asyncio.wait_for(task, 30) == 0
            await emulator.close()
    assert victim.read_bytes() == b"the daemon must never write here\n"


async def test_out_swapped_for_a_symlink_is_refused_and_nothing_lands_where_it_points(tmp_path: Path) -> None:
    # Swapped after the file is ingested and before its results arrive: the outbox's own defence.
    emulator = await start_emulator(EmulatorConfig(processing_seconds=3))
    settings = make_settings(tmp_path, emulator)
    spool = settings.daemon.spool_dir
    database = settings.daemon.database_path
    SpoolPaths(spool).create()
    elsewhere = tmp_path / "state-of-another-program"
    elsewhere.mkdir()
    lines = [chat_line(n) for n in range(4)]
    with structlog.testing.capture_logs() as events:
        daemon = Daemon(settings)
        task = asyncio.create_task(daemon.run())
        try:
            drop(spool, "swapped", lines)
            (out_name,) = await wait_until(lambda: database.exists() and out_names(database), timeout=30)
            await wait_until(lambda: not list((spool / "new").iterdir()), timeout=30)
            (spool / "out").rename(spool / "out.real")
            (spool / "out").symlink_to(elsewhere)
            await wait_until(lambda: logged(events, "sink.delivery_failed") or task.done(), timeout=60)
            assert not task.done()
            assert list(elsewhere.iterdir()) == []
            (spool / "out").unlink()
            (spool / "out.real").rename(spool / "out")
            await wait_until(lambda: (spool / "out" / out_name).exists() or task.done(), timeout=60)
        finally:
            daemon.request_stop("test over")
            assert await asyncio.wait_for(task, 30) == 0
            await emulator.close()
    assert list(elsewhere.iterdir()) == []
    assert_whole_lines_once(spool / "out" / out_name, lines)


async def test_the_final_rename_never_replaces_a_file_already_at_the_results_name(tmp_path: Path) -> None:
    # A slow emulator keeps the file open long enough to put something at its results name first.
    emulator = await start_emulator(EmulatorConfig(processing_seconds=3))
    settings = make_settings(tmp_path, emulator)
    spool = settings.daemon.spool_dir
    database = settings.daemon.database_path
    SpoolPaths(spool).create()
    lines: list[dict[str, Any]] = [chat_line(0), *invalid_lines(3)]
    other = b'{"custom_id":"someone-else","status":"succeeded"}\n'
    with structlog.testing.capture_logs() as events:
        daemon = Daemon(settings)
        task = asyncio.create_task(daemon.run())
        try:
            drop(spool, "taken", lines)
            (out_name,) = await wait_until(
                lambda: database.exists() and out_names(database),
                timeout=30,
            )
            final = spool / "out" / out_name
            final.write_bytes(other)
            await wait_until(lambda: any(e.get("event") == "outbox.name_taken" for e in events) or task.done(), 60)
            assert not task.done()
            assert final.read_bytes() == other
            part = spool / "out" / f"{out_name}.part"
            assert len(part.read_bytes().splitlines()) == len(lines)
            assert database_rows(database, "SELECT state FROM files") == [("open",)]
            # Logged first, then recorded: on a loaded machine the row may come a moment after the event.
            await wait_until(
                lambda: any(
                    event == "outbox.name_taken" for (event,) in database_rows(database, "SELECT event FROM errors")
                ),
                timeout=10,
            )
            # Once the other file is gone, the results file completes on a later round.
            final.unlink()
            await wait_until(lambda: final.exists() or task.done(), timeout=30)
            assert_whole_lines_once(final, lines)
            assert not part.exists()
        finally:
            daemon.request_stop("test over")
            assert await asyncio.wait_for(task, 30) == 0
            await emulator.close()
    assert database_rows(database, "SELECT state FROM files") == [("complete",)]
    assert sum(e.get("event") == "outbox.name_taken" for e in events) == 1


# -- whatever state a crash or a failure after the commit left, completion happens exactly once ----------


def _reopen(database: Path) -> None:
    connection = sqlite3.connect(database, timeout=5)
    try:
        with connection:
            connection.execute("UPDATE files SET state = 'open', completed_at = NULL")
    finally:
        connection.close()


def _renamed_not_recorded(final: Path, part: Path) -> None:
    """The rename happened; the process died (or the commit failed) before it was recorded."""


def _link_then_unlink_interrupted(final: Path, part: Path) -> None:
    """Where renameat2 is missing the rename is link then unlink; it died in between."""
    os.link(final, part)


def _part_lost(final: Path, part: Path) -> None:
    """Every line committed, then the .part vanished before the rename."""
    final.unlink()


def _part_cut_short(final: Path, part: Path) -> None:
    final.rename(part)
    with part.open("r+b") as handle:
        handle.truncate(part.stat().st_size // 2)


def _uncommitted_torn_tail(final: Path, part: Path) -> None:
    final.rename(part)
    with part.open("ab") as handle:
        handle.write(b'{"custom_id":"bad-0","sta')


async def _run_until_complete(settings: Any, final: Path) -> None:
    daemon = Daemon(settings)
    task = asyncio.create_task(daemon.run())
    try:
        database = settings.daemon.database_path

        def complete() -> bool:
            if task.done():
                raise AssertionError("the daemon stopped")
            try:
                return database_rows(database, "SELECT state FROM files") == [("complete",)] and final.exists()
            except sqlite3.OperationalError:
                return False  # not created yet

        await wait_until(complete, timeout=30)
    finally:
        daemon.request_stop("test over")
        assert await asyncio.wait_for(task, 30) == 0


@pytest.mark.parametrize(
    "damage",
    [_renamed_not_recorded, _link_then_unlink_interrupted, _part_lost, _part_cut_short, _uncommitted_torn_tail],
    ids=lambda f: f.__name__.strip("_"),
)
async def test_completion_after_the_commit_happens_exactly_once(tmp_path: Path, damage: Any) -> None:
    settings = make_settings(tmp_path, None)
    spool = settings.daemon.spool_dir
    SpoolPaths(spool).create()
    lines = invalid_lines(7)
    drop(spool, "done", lines)
    final = out_path(spool, "done")
    part = spool / "out" / "done.results.jsonl.part"
    await _run_until_complete(settings, final)
    expected = final.read_bytes()
    _reopen(settings.daemon.database_path)
    damage(final, part)
    await _run_until_complete(settings, final)
    assert final.read_bytes() == expected
    assert len(expected.splitlines()) == len(lines)
    assert not part.exists()
    assert sorted(p.name for p in (spool / "out").iterdir()) == ["done.results.jsonl"]
