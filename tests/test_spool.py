"""Spool intake edge cases: files still being written, huge lines, and a forced second-signal exit."""

from __future__ import annotations

import asyncio
import os
import signal
import sqlite3
import stat
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import orjson
import pytest

from batchd import spool as spool_module
from batchd.crashpoints import CrashPoints
from batchd.emulator import RunningEmulator
from batchd.formats import invalid_result
from batchd.settings import Settings
from batchd.sinks import SinkRunner
from batchd.sinks.outbox import OutboxSink
from batchd.spool import DIR_MODES, SUBDIRS, Spool, SpoolPaths, submit
from batchd.store import Store, open_store
from batchd.store.contract import Chunk, FileKey, NewResult

from .conftest import make_settings, require_root, wait_until
from .harness import DaemonProcess, NotifySocket, open_position, write_config
from .test_acceptance import chat_line


@pytest.fixture
async def intake(tmp_path: Path) -> AsyncIterator[tuple[Spool, Store, Settings]]:
    settings = make_settings(tmp_path, None)
    settings.daemon.settle_time = 30
    store = open_store(settings.store_url, "test-node")
    await store.open()
    spool = Spool(settings, store, on_ingest=lambda: None)
    spool.paths.create()
    try:
        yield spool, store, settings
    finally:
        await store.close()


async def test_a_file_still_being_written_waits_for_its_last_newline(
    intake: tuple[Spool, Store, Settings],
) -> None:
    spool, store, _ = intake
    path = spool.paths.new / "growing.jsonl"
    first, second = orjson.dumps(chat_line(1)), orjson.dumps(chat_line(2))
    path.write_bytes(first + b"\n" + second[:20])  # a writer that has not finished its line
    assert await spool.rescan() == 0
    assert path.exists()
    with path.open("ab") as handle:
        handle.write(second[20:] + b"\n")
    assert await spool.rescan() == 1
    assert not path.exists() and (spool.paths.done / "growing.jsonl").exists()
    [group] = await store.queued_groups(time.time())
    assert group.count == 2


async def test_a_settled_file_without_final_newline_is_taken_whole(intake: tuple[Spool, Store, Settings]) -> None:
    spool, store, settings = intake
    path = spool.paths.new / "old.jsonl"
    path.write_bytes(orjson.dumps(chat_line(1)) + b"\n" + orjson.dumps(chat_line(2)))
    settled = time.time() - settings.daemon.settle_time - 1
    os.utime(path, (settled, settled))
    assert await spool.rescan() == 1
    [group] = await store.queued_groups(time.time())
    assert group.count == 2


async def test_a_huge_line_becomes_invalid_without_being_held_and_the_rest_goes_on(
    intake: tuple[Spool, Store, Settings],
) -> None:
    spool, store, settings = intake
    for profile in settings.providers.values():
        profile.max_bytes = 8192  # the reader's cap is the largest batch any profile accepts
    huge = chat_line(2)
    huge["body"]["messages"][0]["content"] = "x" * 5_000_000
    lines = [orjson.dumps(chat_line(1)), orjson.dumps(huge), orjson.dumps(chat_line(3))]
    (spool.paths.new / "huge.jsonl").write_bytes(b"\n".join(lines) + b"\n")
    assert await spool.rescan() == 1
    results = [orjson.loads(r.payload) for r in await store.results_after(0, 10)]
    assert [(r["line"], r["status"]) for r in results] == [(2, "invalid")]
    assert "over the largest batch any provider accepts" in results[0]["error"]["message"]
    [group] = await store.queued_groups(time.time())
    assert group.count == 2


async def test_a_line_whose_url_is_not_a_string_becomes_invalid_and_the_rest_goes_on(
    intake: tuple[Spool, Store, Settings],
) -> None:
    spool, store, _ = intake
    odd = {**chat_line(2), "url": ["/v1/chat/completions"]}  # unhashable: no lookup may raise
    lines = [orjson.dumps(chat_line(1)), orjson.dumps(odd), orjson.dumps(chat_line(3))]
    (spool.paths.new / "odd.jsonl").write_bytes(b"\n".join(lines) + b"\n")
    assert await spool.rescan() == 1
    results = [orjson.loads(r.payload) for r in await store.results_after(0, 10)]
    assert [(r["line"], r["status"]) for r in results] == [(2, "invalid")]
    assert "is not a batch endpoint" in results[0]["error"]["message"]
    [group] = await store.queued_groups(time.time())
    assert group.count == 2


@pytest.mark.slow
async def test_a_second_signal_forces_exit_and_a_restart_finishes_the_work(
    tmp_path: Path, emulator: RunningEmulator
) -> None:
    config = write_config(tmp_path, emulator, daemon={"graceful_timeout": 60})
    spool = tmp_path / "spool"
    (spool / "new").mkdir(parents=True)
    big = tmp_path / "big.jsonl"
    line = orjson.dumps(chat_line(0)).replace(b'"chat-0"', b'"c-%d"')
    big.write_bytes(b"".join((line % n) + b"\n" for n in range(300_000)))
    notify = NotifySocket(tmp_path / "notify.sock")
    daemon = DaemonProcess(config, tmp_path / "daemon.log", env={"NOTIFY_SOCKET": str(notify.path)})
    try:
        daemon.start()
        await wait_until(lambda: notify.seen("READY=1"), timeout=30)
        os.rename(big, spool / "new" / "big.jsonl")
        await wait_until(lambda: any(e.get("event") == "spool.ingesting" for e in daemon.log_events()), timeout=30)
        # The first signal begins a graceful stop, which lets the ingest finish; the second cuts it short.
        daemon.signal(signal.SIGTERM)
        await wait_until(lambda: notify.seen("STOPPING=1"), timeout=10)
        daemon.signal(signal.SIGTERM)
        assert await daemon.wait(30) == 128 + signal.SIGTERM
        events = [e.get("event") for e in daemon.log_events()]
        assert "daemon.forced_exit" in events and "spool.ingested" not in events
        assert (spool / "new" / "big.jsonl").exists()  # its transaction never committed
        daemon.start()
        await wait_until(lambda: (spool / "done" / "big.jsonl").exists(), timeout=120)
        await wait_until(lambda: (spool / "out" / "big.results.jsonl").exists(), timeout=180)
    finally:
        await daemon.stop()
        notify.close()
    assert (spool / "out" / "big.results.jsonl").read_bytes().count(b"\n") == 300_000


# -- file identity, races and hostile names ------------------------------------------------------


def db_rows(store: Store, sql: str, params: tuple[object, ...] = ()) -> list[tuple[object, ...]]:
    """Read the daemon's database beside it, the way an operator would."""
    with sqlite3.connect(store.path) as db:
        return list(db.execute(sql, params))


def named_line(prefix: str, n: int) -> bytes:
    line = chat_line(n)
    line["custom_id"] = f"{prefix}-{n}"
    return orjson.dumps(line) + b"\n"


@pytest.mark.parametrize("swapped_in", ["file", "fifo"])
async def test_a_file_renamed_over_new_name_during_ingest_is_not_moved_unread(
    intake: tuple[Spool, Store, Settings], tmp_path: Path, swapped_in: str
) -> None:
    spool, store, _ = intake
    big = spool.paths.new / "big.jsonl"
    big.write_bytes(b"".join(named_line("big", n) for n in range(60_000)))
    info = big.stat()
    other = tmp_path / "other.jsonl"
    if swapped_in == "fifo":
        os.mkfifo(other)
    else:
        other.write_bytes(b"".join(named_line("other", n) for n in range(3)))
    scan = asyncio.create_task(spool.rescan())
    # The attack: while the daemon is reading big.jsonl, the producer renames another file over its name.
    await wait_until(lambda: (open_position(os.getpid(), info) or 0) > 0, timeout=30, interval=0.002)
    os.rename(other, big)
    assert open_position(os.getpid(), info) is not None, "the rename came after the ingest: the test proves nothing"
    await scan
    assert db_rows(store, "SELECT COUNT(*) FROM items WHERE custom_id LIKE 'big-%'") == [(60_000,)]
    # The file now named big.jsonl was never read: it must still be in new/, not in done/.
    assert big.exists() and os.lstat(big).st_ino != info.st_ino
    assert [p.name for p in spool.paths.done.iterdir()] == []
    await spool.rescan()
    if swapped_in == "fifo":
        assert (spool.paths.rejected / "big.jsonl").exists() and not big.exists()
    else:
        assert db_rows(store, "SELECT COUNT(*) FROM items WHERE custom_id LIKE 'other-%'") == [(3,)]
        assert not big.exists()
    out_names = db_rows(store, "SELECT out_name FROM files ORDER BY id")
    assert len(out_names) == len(set(out_names))


async def test_same_name_and_content_dropped_again_after_done_is_new_work(
    intake: tuple[Spool, Store, Settings],
) -> None:
    spool, store, _ = intake
    content = b"".join(named_line("x", n) for n in range(2))
    (spool.paths.new / "again.jsonl").write_bytes(content)
    assert await spool.rescan() == 1
    assert (spool.paths.done / "again.jsonl").exists()
    (spool.paths.new / "again.jsonl").write_bytes(content)
    assert await spool.rescan() == 1
    rows = db_rows(store, "SELECT name, out_name, lines FROM files ORDER BY id")
    assert rows == [("again.jsonl", "again.results.jsonl", 2), ("again.jsonl", "again.1.results.jsonl", 2)]
    assert db_rows(store, "SELECT COUNT(*) FROM items") == [(4,)]
    assert not (spool.paths.new / "again.jsonl").exists()


async def test_a_fallback_results_name_never_equals_another_files_name(intake: tuple[Spool, Store, Settings]) -> None:
    spool, store, _ = intake
    # a.jsonl, then a.3.jsonl (results a.3.results.jsonl), then a second a.jsonl: the old fallback
    # STEM.ID.results.jsonl gave it a.3.results.jsonl too, so two inputs shared one results file.
    for name, prefix in (("a.jsonl", "first"), ("a.3.jsonl", "three"), ("a.jsonl", "second")):
        (spool.paths.new / name).write_bytes(b"".join(named_line(prefix, n) for n in range(2)))
        assert await spool.rescan() == 1
    out_names = [row[0] for row in db_rows(store, "SELECT out_name FROM files ORDER BY id")]
    assert out_names == ["a.results.jsonl", "a.3.results.jsonl", "a.1.results.jsonl"]


async def test_a_results_name_present_in_out_is_not_reused(intake: tuple[Spool, Store, Settings]) -> None:
    spool, store, _ = intake
    (spool.paths.out / "b.results.jsonl").write_bytes(b"somebody else's results\n")
    (spool.paths.out / "b.1.results.jsonl.part").write_bytes(b"")
    (spool.paths.new / "b.jsonl").write_bytes(named_line("b", 1))
    assert await spool.rescan() == 1
    assert db_rows(store, "SELECT out_name FROM files") == [("b.2.results.jsonl",)]
    assert (spool.paths.out / "b.results.jsonl").read_bytes() == b"somebody else's results\n"


async def test_a_name_that_is_not_utf8_is_rejected_with_an_escaped_name(
    intake: tuple[Spool, Store, Settings],
) -> None:
    spool, store, _ = intake
    Path(os.fsdecode(os.fsencode(spool.paths.new) + b"/bad\xff.jsonl")).write_bytes(named_line("bad", 1))
    (spool.paths.new / "good.jsonl").write_bytes(named_line("good", 1))
    assert await spool.rescan() == 2
    rejected = sorted(os.listdir(os.fsencode(spool.paths.rejected)))
    assert rejected == [b"bad\\xff.jsonl", b"bad\\xff.jsonl.error.json"]
    report = orjson.loads((spool.paths.rejected / "bad\\xff.jsonl.error.json").read_bytes())
    assert report["file"] == "bad\\xff.jsonl" and "UTF-8" in report["error"]
    assert db_rows(store, "SELECT name FROM files") == [("good.jsonl",)]


async def test_a_byte_order_mark_does_not_make_the_first_line_invalid(intake: tuple[Spool, Store, Settings]) -> None:
    spool, store, _ = intake
    (spool.paths.new / "windows.jsonl").write_bytes(b"\xef\xbb\xbf" + named_line("w", 1) + named_line("w", 2))
    assert await spool.rescan() == 1
    assert await store.results_after(0, 10) == []
    assert db_rows(store, "SELECT custom_id FROM items ORDER BY line") == [("w-1",), ("w-2",)]


async def test_done_cleanup_does_not_follow_a_swapped_done_directory(
    intake: tuple[Spool, Store, Settings], tmp_path: Path
) -> None:
    spool, _, settings = intake
    settings.daemon.done_retention = 1
    victim = tmp_path / "victim"
    victim.mkdir()
    (victim / "precious.db").write_bytes(b"data")
    os.utime(victim / "precious.db", (1, 1))
    spool.paths.done.rmdir()
    spool.paths.done.symlink_to(victim)
    spool._clean_done()
    assert (victim / "precious.db").read_bytes() == b"data"


async def test_a_report_is_not_written_through_a_swapped_rejected_directory(
    intake: tuple[Spool, Store, Settings], tmp_path: Path
) -> None:
    spool, _, _ = intake
    victim = tmp_path / "victim"
    victim.mkdir()
    spool.paths.rejected.rmdir()
    spool.paths.rejected.symlink_to(victim)
    (spool.paths.new / "empty.jsonl").write_bytes(b"")
    await spool.rescan()
    assert list(victim.iterdir()) == []


async def test_done_cleanup_removes_old_regular_files_only(intake: tuple[Spool, Store, Settings]) -> None:
    spool, _, settings = intake
    settings.daemon.done_retention = 60
    old, fresh = spool.paths.done / "old.jsonl", spool.paths.done / "fresh.jsonl"
    old.write_bytes(b"x\n")
    fresh.write_bytes(b"y\n")
    os.utime(old, (1, 1))
    (spool.paths.done / "sub").mkdir()
    os.utime(spool.paths.done / "sub", (1, 1))
    spool._clean_done()
    assert sorted(p.name for p in spool.paths.done.iterdir()) == ["fresh.jsonl", "sub"]


MEMORY_SCRIPT = """
import asyncio, sys
from pathlib import Path
import orjson
from batchd.spool import Spool
from batchd.store import Store, open_store
from tests.conftest import make_settings

def peak_kb():
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1])

def wide(n):
    line = {"custom_id": f"w-{n}", "method": "POST", "url": "/v1/chat/completions",
            "body": {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "x" * 64_000}]}}
    return orjson.dumps(line) + b"\\n"

async def main(root):
    settings = make_settings(root, None)
    store = open_store(settings.store_url, "test-node")
    await store.open()
    spool = Spool(settings, store, on_ingest=lambda: None)
    spool.paths.create()
    peaks = {}
    for name, count, blank in (("warm", 60, 2_000), ("wide", 1_500, 0), ("blank", 0, 200_000)):
        with (spool.paths.new / f"{name}.jsonl").open("wb") as out:
            for n in range(count):
                out.write(wide(n))
            out.write(b"\\n" * blank)
        assert await spool.rescan() == 1
        peaks[name] = peak_kb()
    print(orjson.dumps(peaks).decode())
    await store.close()

asyncio.run(main(Path(sys.argv[1])))
"""


async def test_memory_stays_bounded_by_the_chunk_not_the_file(tmp_path: Path) -> None:
    # A file of wide lines (96 MB) and a file of 200,000 blank lines: the intake's peak memory must
    # not grow with either (the old chunk of 2,000 lines held 2,000 wide lines: +150 MB).
    done = await asyncio.to_thread(
        subprocess.run,
        [sys.executable, "-c", MEMORY_SCRIPT, str(tmp_path)],
        capture_output=True,
        check=True,
        cwd=Path(__file__).parent.parent,
        env={**os.environ, "BATCHD_LOG_LEVEL": "warning"},
    )
    peaks = orjson.loads(done.stdout.splitlines()[-1])
    assert peaks["wide"] - peaks["warm"] < 48_000, peaks
    assert peaks["blank"] - peaks["wide"] < 16_000, peaks


async def test_the_same_inode_after_a_crash_before_the_move_is_not_ingested_twice(
    intake: tuple[Spool, Store, Settings],
) -> None:
    spool, store, _ = intake
    (spool.paths.new / "crash.jsonl").write_bytes(b"".join(named_line("c", n) for n in range(3)))
    assert await spool.rescan() == 1
    # The state a crash between the commit and the move leaves: the row, not moved, the inode in new/.
    os.rename(spool.paths.done / "crash.jsonl", spool.paths.new / "crash.jsonl")
    with sqlite3.connect(store.path) as db:
        db.execute("UPDATE files SET moved_at = NULL")
    assert await spool.rescan() == 1
    assert db_rows(store, "SELECT COUNT(*) FROM items") == [(3,)]
    assert db_rows(store, "SELECT out_name, moved_at IS NOT NULL FROM files") == [("crash.results.jsonl", 1)]
    assert [p.name for p in spool.paths.done.iterdir()] == ["crash.jsonl"]


async def test_a_finished_file_whose_results_were_consumed_gives_its_results_name_up(
    intake: tuple[Spool, Store, Settings],
) -> None:
    spool, store, _ = intake
    (spool.paths.new / "daily.jsonl").write_bytes(named_line("d", 1))
    assert await spool.rescan() == 1
    with sqlite3.connect(store.path) as db:  # delivered and completed; the producer took the results away
        db.execute("UPDATE files SET state = 'complete'")
    (spool.paths.new / "daily.jsonl").write_bytes(named_line("d", 2))
    assert await spool.rescan() == 1
    assert db_rows(store, "SELECT out_name FROM files ORDER BY id") == [
        ("daily.results.jsonl~1",),
        ("daily.results.jsonl",),
    ]


def test_submit_picks_a_name_free_in_new_done_and_out_and_says_where_results_go(tmp_path: Path) -> None:
    paths = SpoolPaths(tmp_path / "spool")
    paths.create()
    first = submit([chat_line(1)], name="job", spool_dir=paths.root)
    assert (first.path, first.results) == (paths.new / "job.jsonl", paths.out / "job.results.jsonl")
    assert os.fspath(first) == str(paths.new / "job.jsonl")
    (paths.done / "job-1.jsonl").write_bytes(b"")
    (paths.out / "job-2.results.jsonl.part").write_bytes(b"")
    second = submit([chat_line(2)], name="job", spool_dir=paths.root)
    assert (second.path, second.results) == (paths.new / "job-3.jsonl", paths.out / "job-3.results.jsonl")
    assert (paths.new / "job.jsonl").read_bytes() == orjson.dumps(chat_line(1)) + b"\n"
    assert sorted(p.name for p in paths.tmp.iterdir()) == []


def test_the_submit_command_prints_the_spool_path_and_the_results_path(tmp_path: Path) -> None:
    source = tmp_path / "tickets.jsonl"
    source.write_bytes(orjson.dumps(chat_line(1)) + b"\n")
    spool = tmp_path / "spool"
    SpoolPaths(spool).create()
    (spool / "out" / "tickets.results.jsonl").write_bytes(b"an older run\n")
    done = subprocess.run(
        [sys.executable, "-m", "batchd", "submit", "--spool-dir", str(spool), str(source)],
        capture_output=True,
        text=True,
        check=True,
    )
    assert done.stdout.splitlines() == [
        str(spool / "new" / "tickets-1.jsonl"),
        f"results: {spool}/out/tickets-1.results.jsonl",
    ]


def test_create_makes_the_documented_modes_and_check_modes_accepts_them(tmp_path: Path) -> None:
    paths = SpoolPaths(tmp_path / "spool")
    paths.create()
    modes = {sub: stat.S_IMODE(os.stat(paths.root / sub).st_mode) for sub in ("", *SUBDIRS)}
    assert modes == {"": 0o2755, "tmp": 0o3770, "new": 0o3770, "done": 0o2750, "rejected": 0o2750, "out": 0o2750}
    assert paths.check_modes() is None
    tmpfiles = (Path(__file__).parent.parent / "systemd" / "batchd.tmpfiles").read_text().split()
    for sub, mode in DIR_MODES:
        path = "/var/spool/batchd" + (f"/{sub}" if sub else "")
        assert tmpfiles[tmpfiles.index(path) + 1] == f"{mode:04o}", path


@pytest.mark.parametrize(
    ("sub", "change", "reason"),
    [
        ("", lambda p: p.chmod(0o2775), "producers could rename or replace it"),
        ("rejected", lambda p: p.chmod(0o2770), "producers could rename or replace it"),
        ("out", lambda p: p.chmod(0o2777), "producers could rename or replace it"),
        ("new", lambda p: p.chmod(0o2770), "without the sticky bit"),
        ("done", lambda p: (p.rmdir(), p.symlink_to(p.parent / "tmp")), "is a symlink"),
        ("out", lambda p: os.chown(p, 4242, -1), "owned by uid 4242"),
    ],
)
def test_check_modes_refuses_a_spool_producers_could_rearrange(
    tmp_path: Path, sub: str, change: Callable[[Path], object], reason: str
) -> None:
    if sub == "out" and "uid" in reason:
        require_root()
    paths = SpoolPaths(tmp_path / "spool")
    paths.create()
    change(paths.root / sub if sub else paths.root)
    found = paths.check_modes()
    assert found is not None and reason in found and "\n" not in found


async def test_migration_005_keeps_old_rows_and_references_and_splits_shared_results_names(tmp_path: Path) -> None:
    path = tmp_path / "old.sqlite3"
    sql = Path(__file__).parent.parent / "batchd" / "store" / "sqlite_migrations"
    with sqlite3.connect(path) as db:
        for script in sorted(sql.glob("00[1-4]_*.sql")):
            db.executescript(script.read_text())
        db.execute("PRAGMA user_version = 4")
        # The old fallback gave a second a.jsonl the name a.3.results.jsonl, which a.3.jsonl also had.
        db.executemany(
            "INSERT INTO files (id, name, sha256, size, out_name, ingested_at) VALUES (?, ?, ?, 1, ?, 0)",
            [
                (1, "a.jsonl", "h1", "a.results.jsonl"),
                (2, "a.3.jsonl", "h2", "a.3.results.jsonl"),
                (3, "a.jsonl", "h3", "a.3.results.jsonl"),
            ],
        )
        db.execute(
            "INSERT INTO items (file_id, line, custom_id, profile, endpoint, model, size, queued_at)"
            " VALUES (3, 1, 'x', 'openai', '/v1/chat/completions', 'm', 1, 0)"
        )
        db.execute(
            "INSERT INTO results (file_id, line, status, payload, created_at) VALUES (2, 1, 'invalid', x'00', 0)"
        )
    store = open_store(f"sqlite:///{path}", "test-node")
    await store.open()
    try:
        assert db_rows(store, "SELECT id, out_name, moved_at IS NOT NULL, ino FROM files ORDER BY id") == [
            (1, "a.results.jsonl", 1, None),
            (2, "a.3.results.jsonl", 1, None),
            (3, "a.3.migrated-3.results.jsonl", 1, None),
        ]
        assert db_rows(store, "PRAGMA foreign_key_check") == []
        assert db_rows(store, "SELECT file_id FROM items") == [(3,)]
        assert db_rows(store, "PRAGMA foreign_keys") == [(0,)]  # a new connection: the default
        assert (await store._fetchone("PRAGMA foreign_keys"))[0] == 1  # the store's own: back on
        # Old rows count as moved: the same name and content again is new work.
        assert await store.find_file(FileKey("a.jsonl", "h1", 1, 0, 0)) is None
    finally:
        await store.close()


# -- chunked ingest (issue 10) ---------------------------------------------------------------------


class _Interrupted(Exception):
    """Stands for a crash in the middle of an ingest."""


class _CrashAfter(CrashPoints):
    def __init__(self, chunks: int) -> None:
        super().__init__("")
        self._left = chunks

    def reach(self, name: str) -> None:
        if name == "mid-ingest":
            self._left -= 1
            if self._left == 0:
                raise _Interrupted


def lines_of_file(store_path: Path) -> list[int]:
    """Every line number the store holds for its files, as queued items or as results (never both)."""
    with sqlite3.connect(store_path) as db:
        items = [row[0] for row in db.execute("SELECT line FROM items")]
        results = [row[0] for row in db.execute("SELECT line FROM results")]
    return sorted(items + results)


async def test_an_ingest_cut_short_resumes_after_its_last_chunk_and_catches_duplicates_across_chunks(
    intake: tuple[Spool, Store, Settings], monkeypatch: pytest.MonkeyPatch
) -> None:
    spool, store, settings = intake
    monkeypatch.setattr(spool_module, "CHUNK_LINES", 5)
    lines = [named_line("c", n) for n in range(1, 24)]
    lines[3] = named_line("c", 2)  # line 4 repeats line 2 (same chunk)
    lines[11] = named_line("c", 3)  # line 12 repeats line 3 (a committed chunk)
    lines[6] = b"{not json\n"  # line 7
    (spool.paths.new / "resume.jsonl").write_bytes(b"".join(lines))
    cut = Spool(settings, store, on_ingest=lambda: None, crashpoints=_CrashAfter(chunks=2))
    with pytest.raises(_Interrupted):
        await cut.rescan()
    database = settings.daemon.database_path
    assert db_rows(store, "SELECT state, lines_committed FROM files") == [("ingesting", 10)]
    assert (spool.paths.new / "resume.jsonl").exists()
    assert await spool.rescan() == 1
    assert db_rows(store, "SELECT state, lines, lines_committed FROM files") == [("open", 23, 23)]
    assert lines_of_file(database) == list(range(1, 24))  # every line once: none lost, none twice
    invalid = {row[0]: orjson.loads(row[1]) for row in db_rows(store, "SELECT line, payload FROM results")}
    assert sorted(invalid) == [4, 7, 12]
    assert invalid[4]["error"]["message"] == "duplicate custom_id 'c-2' in this file"
    assert invalid[12]["error"]["message"] == "duplicate custom_id 'c-3' in this file"
    assert [p.name for p in spool.paths.done.iterdir()] == ["resume.jsonl"]


async def test_a_file_whose_results_were_all_delivered_while_it_was_ingested_is_completed_once_finished(
    intake: tuple[Spool, Store, Settings],
) -> None:
    # Every line invalid: its results reach the outbox chunk by chunk while the file is still being
    # ingested. The delivery that brings the last one sees an unfinished file and must not complete
    # it; once the ingest has finished, the outbox completes it without any further result.
    spool, store, _ = intake
    outbox = OutboxSink(store, spool.paths.out)
    runner = SinkRunner(store, [outbox])
    row = await store.begin_file(FileKey("bad.jsonl", "sha", 30, 0, 1), out_taken=lambda name: False)
    for first in (1, 4):
        invalid = [NewResult(n, "invalid", invalid_result(f"line-{n}", n, "broken")) for n in range(first, first + 3)]
        assert await store.add_chunk(row.id, Chunk(first, first + 2, first * 5, [], invalid))
        await runner._deliver_pending(outbox)
    part, final = spool.paths.out / "bad.results.jsonl.part", spool.paths.out / "bad.results.jsonl"
    assert part.read_bytes().count(b"\n") == 6 and not final.exists()
    await store.finish_file(row.id, 6)
    runner.ingested()  # what the spool's on_ingest does once the file is wholly in the store
    await runner._deliver_pending(outbox)
    assert final.read_bytes().count(b"\n") == 6 and not part.exists()


# -- group commit and chunk pipelining (issue 13) --------------------------------------------------


async def test_small_files_are_committed_together_each_before_it_leaves_new_and_a_crash_between_is_exactly_once(
    intake: tuple[Spool, Store, Settings],
) -> None:
    spool, store, settings = intake
    names = [f"small-{n}.jsonl" for n in range(5)]
    for name in names:
        (spool.paths.new / name).write_bytes(b"".join(named_line(name, n) for n in range(1, 4)))
    cut = Spool(settings, store, on_ingest=lambda: None, crashpoints=_CrashAfter(chunks=1))
    with pytest.raises(_Interrupted):
        await cut.rescan()
    # The crash came right after the first commit: it carried all five files, none has moved yet.
    assert db_rows(store, "SELECT name, state, lines, moved_at IS NULL FROM files ORDER BY name") == [
        (name, "open", 3, 1) for name in names
    ]
    assert sorted(p.name for p in spool.paths.new.iterdir()) == names
    assert not list(spool.paths.done.iterdir())
    # The next pass moves them and queues nothing twice.
    assert await spool.rescan() == 5
    assert sorted(p.name for p in spool.paths.done.iterdir()) == names
    assert db_rows(store, "SELECT COUNT(*), COUNT(DISTINCT file_id) FROM items") == [(15, 5)]
    assert db_rows(store, "SELECT COUNT(*) FROM files WHERE moved_at IS NOT NULL") == [(5,)]


async def test_groups_follow_each_other_and_every_move_is_recorded(
    intake: tuple[Spool, Store, Settings], monkeypatch: pytest.MonkeyPatch
) -> None:
    spool, store, _ = intake
    monkeypatch.setattr(spool_module, "GROUP_FILES", 3)  # 8 files: groups of 3, 3 and 2
    names = [f"g-{n}.jsonl" for n in range(8)]
    for name in names:
        (spool.paths.new / name).write_bytes(named_line(name, 1) + b"{bad\n" + named_line(name, 1))
    (spool.paths.new / "big.jsonl").write_bytes(b"".join(named_line("big", n) for n in range(1, 2500)))
    assert await spool.rescan() == 9
    assert sorted(p.name for p in spool.paths.done.iterdir()) == sorted([*names, "big.jsonl"])
    assert db_rows(store, "SELECT COUNT(*) FROM files WHERE moved_at IS NOT NULL AND state = 'open'") == [(9,)]
    # Each small file: its line 1 queued, line 2 not JSON, line 3 a duplicate custom_id (first one wins).
    invalid = db_rows(store, "SELECT f.name, r.line FROM results r JOIN files f ON f.id = r.file_id ORDER BY 1, 2")
    assert invalid == [(name, line) for name in sorted(names) for line in (2, 3)]
    assert db_rows(store, "SELECT COUNT(*) FROM items") == [(8 + 2499,)]


async def test_a_line_of_exactly_the_limit_plus_one_byte_does_not_swallow_the_next_line(
    intake: tuple[Spool, Store, Settings],
) -> None:
    spool, store, settings = intake
    for profile in settings.providers.values():
        profile.max_bytes = 8192
    limit = settings.max_line_bytes
    long_line = b'{"custom_id": "long", "pad": "' + b"x" * (limit + 1 - 32) + b'"}'
    assert len(long_line) == limit + 1
    (spool.paths.new / "edge.jsonl").write_bytes(long_line + b"\n" + named_line("e", 2) + named_line("e", 3))
    assert await spool.rescan() == 1
    results = [orjson.loads(r.payload) for r in await store.results_after(0, 10)]
    assert [(r["line"], r["status"]) for r in results] == [(1, "invalid")]
    [group] = await store.queued_groups(time.time())
    assert group.count == 2


async def test_chunks_commit_without_their_own_fsync_and_the_writer_stays_at_full_sync(
    intake: tuple[Spool, Store, Settings], monkeypatch: pytest.MonkeyPatch
) -> None:
    spool, store, _ = intake
    monkeypatch.setattr(spool_module, "CHUNK_LINES", 5)
    (spool.paths.new / "chunked.jsonl").write_bytes(b"".join(named_line("k", n) for n in range(1, 24)))
    assert await spool.rescan() == 1
    assert db_rows(store, "SELECT state, lines FROM files") == [("open", 23)]
    assert (await store._fetchone("PRAGMA synchronous"))[0] == 2  # FULL, for every other writer
