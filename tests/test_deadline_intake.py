"""Deadlines in (issue 11): the NAME.meta.json sidecar, `batchd submit --deadline`, `batchd.submit(deadline=)`,
a route's default deadline, `batchd retry --deadline`, and sidecars from hostile producers.

The intake's tier (a Spool on a real SQLite store in tmp_path) proves what each file's requests are
queued with; the acceptance tier runs `python -m batchd run` against the emulator; the root tier
runs the daemon and the producers under their own uids (tests/test_hostile.py's setup).
"""

from __future__ import annotations

import asyncio
import os
import signal
import sqlite3
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import orjson
import pytest

import batchd
from batchd import sidecar
from batchd import spool as spool_module
from batchd.deadlines import DeadlineError
from batchd.emulator import RunningEmulator
from batchd.settings import Route, load_settings
from batchd.spool import Spool, SpoolPaths
from batchd.store import Store, open_store
from batchd.store.contract import FileItem, FileRow

from . import test_hostile
from .conftest import make_settings, wait_until
from .harness import DaemonProcess, MovedInto, open_position, read_results, wait_for_file, write_config
from .store.factories import final, submitted_batch
from .test_acceptance import chat_line
from .test_hostile import OTHER_PRODUCER_UID, Setup, chat, no_messages
from .test_spool import _CrashAfter, _Interrupted

hostile = test_hostile.hostile  # the root tier's daemon and producers, one setup for both files

LEAD = 600.0  # [batching] deadline_lead
ROUTE_LEAD = 900.0  # the gpt-4o-mini route's
ROUTED, UNROUTED = "gpt-4o-mini", "gpt-4o"  # a route with a default deadline ("8h"), and none
# Far ahead: a deadline already past would send the requests to the real-time fallback at once.
ABSOLUTE = "2099-12-01T07:00+01:00"
AT = datetime(2099, 12, 1, 6, 0, tzinfo=UTC).timestamp()


@pytest.fixture
async def intake(tmp_path: Path) -> AsyncIterator[tuple[Spool, Store]]:
    settings = make_settings(tmp_path, None)
    settings.batching.deadline_lead = LEAD
    settings.routes = [Route(model=ROUTED, provider="openai", deadline="8h", deadline_lead=ROUTE_LEAD)]
    store = open_store(settings.store_url, "test-node")
    await store.open()
    spool = Spool(settings, store, on_ingest=lambda: None)
    spool.paths.create()
    try:
        yield spool, store
    finally:
        await store.close()


def requests(count: int, model: str = UNROUTED, prefix: str = "r") -> bytes:
    lines = []
    for n in range(1, count + 1):
        line = chat_line(n, model)
        line["custom_id"] = f"{prefix}-{n}"
        lines.append(orjson.dumps(line) + b"\n")
    return b"".join(lines)


def put(paths: SpoolPaths, name: str, data: bytes, options: Any = None, arrived: float | None = None) -> None:
    """A producer's drop: the sidecar (JSON of `options`, or raw bytes) first, then the input, both
    renamed in from tmp/; `arrived` sets the input's mtime (its arrival)."""
    stem = name.removesuffix(".jsonl")
    if options is not None:
        raw = options if isinstance(options, bytes) else orjson.dumps(options)
        (paths.tmp / f"{stem}.meta.json").write_bytes(raw)
        (paths.tmp / f"{stem}.meta.json").rename(paths.new / f"{stem}.meta.json")
    (paths.tmp / name).write_bytes(data)
    if arrived is not None:
        os.utime(paths.tmp / name, (arrived, arrived))
    (paths.tmp / name).rename(paths.new / name)


async def file_row(store: Store, name: str) -> FileRow:
    [row] = await store.files_named(name)
    return row


async def items_of(store: Store, name: str) -> list[FileItem]:
    return await store.file_items((await file_row(store, name)).id)


def listing(directory: Path) -> list[str]:
    return sorted(os.listdir(directory))


# -- the sidecar's format --------------------------------------------------------------------------


def test_a_sidecar_says_a_deadline_absolute_relative_to_arrival_or_as_a_unix_time() -> None:
    assert sidecar.parse_options(b'{"deadline": "2099-12-01T07:00+01:00"}', 0.0).deadline == AT
    relative = sidecar.parse_options(b'{"deadline": "8h"}\n', 1000.0)
    assert (relative.deadline, relative.text) == (1000.0 + 8 * 3600, '{"deadline":"8h"}')
    assert sidecar.parse_options(b'{"deadline": %d}' % AT, 0.0).deadline == AT
    assert sidecar.parse_options(b"{}", 0.0) == sidecar.FileOptions("{}", None)
    assert (sidecar.sidecar_name("job.jsonl"), sidecar.input_name("job.meta.json")) == ("job.meta.json", "job.jsonl")


def test_deadlines_given_to_submit_are_checked_and_written_as_the_sidecar_says_them() -> None:
    paris = timezone(timedelta(hours=1))
    assert sidecar.deadline_text(datetime(2026, 12, 1, 7, 0, tzinfo=paris)) == "2026-12-01T07:00:00+01:00"
    assert sidecar.deadline_text(AT) == "2099-12-01T06:00:00+00:00"
    assert sidecar.deadline_text(" 90m ") == "90m"
    for wrong in ("tomorrow", "2026-12-01T07:00", datetime(2026, 12, 1, 7), float("nan"), -1.0, True):
        with pytest.raises(DeadlineError):
            sidecar.deadline_text(wrong)  # type: ignore[arg-type]


# -- the intake ------------------------------------------------------------------------------------


async def test_a_sidecars_deadline_goes_to_every_request_and_the_sidecar_to_done_beside_its_file(
    intake: tuple[Spool, Store],
) -> None:
    spool, store = intake
    chunked = spool_module.CHUNK_LINES + 5  # over one chunk: committed chunk by chunk, not in a group
    put(spool.paths, "small.jsonl", requests(3), {"deadline": ABSOLUTE})
    put(spool.paths, "large.jsonl", requests(chunked), {"deadline": ABSOLUTE})
    put(spool.paths, "routed.jsonl", requests(2, ROUTED), {"deadline": ABSOLUTE})  # the file's wins
    assert await spool.rescan() == 3
    expected = [("small.jsonl", 3, LEAD), ("large.jsonl", chunked, LEAD), ("routed.jsonl", 2, ROUTE_LEAD)]
    for name, count, lead in expected:
        row = await file_row(store, name)
        assert (row.deadline, orjson.loads(row.options or "null")) == (AT, {"deadline": ABSOLUTE})
        items = await items_of(store, name)
        assert len(items) == count
        assert {(i.deadline, i.fallback_at) for i in items} == {(AT, AT - lead)}
    assert listing(spool.paths.new) == []
    assert listing(spool.paths.done) == [
        "large.jsonl", "large.meta.json", "routed.jsonl", "routed.meta.json", "small.jsonl", "small.meta.json",
    ]  # fmt: skip
    assert orjson.loads((spool.paths.done / "small.meta.json").read_bytes()) == {"deadline": ABSOLUTE}


async def test_a_routes_default_deadline_counts_from_arrival_and_a_sidecar_wins_over_it(
    intake: tuple[Spool, Store],
) -> None:
    spool, store = intake
    arrived = float(int(time.time()) - 120)
    put(spool.paths, "plain.jsonl", requests(2, ROUTED), arrived=arrived)
    put(spool.paths, "given.jsonl", requests(2, ROUTED), {"deadline": "2h"}, arrived=arrived)
    put(spool.paths, "mixed.jsonl", requests(1, ROUTED, "a") + requests(1, UNROUTED, "b"), arrived=arrived)
    assert await spool.rescan() == 3
    default = arrived + 8 * 3600
    assert [(i.deadline, i.fallback_at) for i in await items_of(store, "plain.jsonl")] == [
        (default, default - ROUTE_LEAD)
    ] * 2
    assert (await file_row(store, "plain.jsonl")).deadline is None  # the file gave none: its route's applies
    given = arrived + 2 * 3600
    assert [(i.deadline, i.fallback_at) for i in await items_of(store, "given.jsonl")] == [
        (given, given - ROUTE_LEAD)
    ] * 2
    assert (await file_row(store, "given.jsonl")).deadline == given
    assert [(i.model, i.deadline) for i in await items_of(store, "mixed.jsonl")] == [
        (ROUTED, default),
        (UNROUTED, None),
    ]


BIG = b'{"deadline": "8h"' + b" " * (sidecar.MAX_BYTES + 10) + b"}"


@pytest.mark.parametrize(
    ("sidecar_is", "reason"),
    [
        (b"deadline: 8h", "not UTF-8 JSON"),
        (b"\xff\xfe{}", "not UTF-8 JSON"),
        (b'["8h"]', "not a JSON object"),
        (b'{"deadline": "8h", "priority": 1}', "unknown key 'priority' (known: deadline)"),
        (b'{"deadline": "tomorrow"}', "expected ISO 8601"),
        (b'{"deadline": "2026-12-01T07:00"}', "has no UTC offset"),
        (b'{"deadline": true}', "deadline must be a string"),
        (BIG, f"over the limit of {sidecar.MAX_BYTES}"),
        ("fifo", "not a regular file"),
        ("symlink", "not a regular file (a symlink, refused)"),
        ("directory", "not a regular file (a directory)"),
    ],
)
async def test_a_bad_sidecar_rejects_its_file_with_the_reason_and_nothing_else(
    intake: tuple[Spool, Store], tmp_path: Path, sidecar_is: bytes | str, reason: str
) -> None:
    spool, store = intake
    side = spool.paths.new / "bad.meta.json"
    outside = tmp_path / "outside.json"
    outside.write_bytes(b'{"deadline": "1h"}')
    if sidecar_is == "fifo":
        os.mkfifo(side)
    elif sidecar_is == "symlink":
        side.symlink_to(outside)
    elif sidecar_is == "directory":
        side.mkdir()
    put(spool.paths, "bad.jsonl", requests(2), sidecar_is if isinstance(sidecar_is, bytes) else None)
    put(spool.paths, "fine.jsonl", requests(2), {"deadline": "1h"})
    assert await spool.rescan() == 2
    report = orjson.loads((spool.paths.rejected / "bad.jsonl.error.json").read_bytes())
    assert report["error"].startswith("its sidecar bad.meta.json: ") and reason in report["error"], report
    assert report["sidecar"] == "bad.meta.json"
    assert listing(spool.paths.rejected) == ["bad.jsonl", "bad.jsonl.error.json", "bad.meta.json"]
    assert (spool.paths.rejected / "bad.jsonl").read_bytes() == requests(2)
    assert await store.files_named("bad.jsonl") == []  # nothing of it queued without its deadline
    assert len(await items_of(store, "fine.jsonl")) == 2
    assert listing(spool.paths.new) == []
    assert outside.read_bytes() == b'{"deadline": "1h"}'  # a symlink is moved, never followed
    if sidecar_is == "symlink":
        assert os.readlink(spool.paths.rejected / "bad.meta.json") == str(outside)


async def test_a_sidecar_alone_waits_for_its_file_and_one_left_alone_too_long_goes_to_rejected(
    intake: tuple[Spool, Store],
) -> None:
    spool, store = intake
    (spool.paths.new / "later.meta.json").write_bytes(b'{"deadline": "2099-12-01T07:00+01:00"}')
    assert await spool.rescan() == 0
    assert listing(spool.paths.new) == ["later.meta.json"]  # not an input, not an orphan yet
    put(spool.paths, "later.jsonl", requests(1))
    assert await spool.rescan() == 1
    assert [i.deadline for i in await items_of(store, "later.jsonl")] == [AT]
    assert listing(spool.paths.done) == ["later.jsonl", "later.meta.json"]

    (spool.paths.new / "never.meta.json").write_bytes(b'{"deadline": "8h"}')
    assert await spool.rescan() == 0
    assert listing(spool.paths.new) == ["never.meta.json"]
    spool.orphan_sidecar_age = 0.0  # instead of waiting ORPHAN_SIDECAR_SECONDS
    assert await spool.rescan() == 0
    assert listing(spool.paths.new) == []
    assert listing(spool.paths.rejected) == ["never.meta.json", "never.meta.json.error.json"]
    report = orjson.loads((spool.paths.rejected / "never.meta.json.error.json").read_bytes())
    assert report["error"] == "a sidecar without its input file never.jsonl for over 0 s"


@pytest.mark.parametrize("committed", ["group", "chunks"])
@pytest.mark.parametrize("then", ["moved", "replaced", "broken"])
async def test_after_a_crash_the_rows_deadline_stands_whatever_sidecar_is_found(
    intake: tuple[Spool, Store], monkeypatch: pytest.MonkeyPatch, committed: str, then: str
) -> None:
    """A crash after the file's first commit, then its sidecar: already moved to done/ (the crash came
    between the two renames), replaced by one with another deadline, or broken. The row decides."""
    spool, store = intake
    if committed == "chunks":
        monkeypatch.setattr(spool_module, "CHUNK_LINES", 5)  # 12 lines: three chunks, cut after the first
    put(spool.paths, "job.jsonl", requests(12), {"deadline": ABSOLUTE})
    cut = Spool(spool.settings, store, on_ingest=lambda: None, crashpoints=_CrashAfter(chunks=1))
    with pytest.raises(_Interrupted):
        await cut.rescan()
    assert (await file_row(store, "job.jsonl")).deadline == AT
    side = spool.paths.new / "job.meta.json"
    if then == "moved":
        side.rename(spool.paths.done / "job.meta.json")
    else:
        side.unlink()
        side.write_bytes(b'{"deadline": "1h"}' if then == "replaced" else b"{broken")
    assert await spool.rescan() == 1
    items = await items_of(store, "job.jsonl")
    assert [i.line for i in items] == list(range(1, 13))
    assert {(i.deadline, i.fallback_at) for i in items} == {(AT, AT - LEAD)}
    assert listing(spool.paths.new) == []
    if then == "moved":
        assert listing(spool.paths.done) == ["job.jsonl", "job.meta.json"]
    else:
        assert listing(spool.paths.done) == ["job.jsonl"]
        assert listing(spool.paths.rejected) == ["job.meta.json", "job.meta.json.error.json"]
        report = orjson.loads((spool.paths.rejected / "job.meta.json.error.json").read_bytes())
        assert "committed before" in report["error"]


async def test_a_sidecar_swapped_for_a_symlink_after_it_was_read_is_neither_followed_nor_moved(
    intake: tuple[Spool, Store], tmp_path: Path
) -> None:
    spool, store = intake
    target = tmp_path / "target.json"
    target.write_bytes(b"the daemon's own file\n")
    put(spool.paths, "swap.jsonl", requests(2), {"deadline": ABSOLUTE})
    read = spool._read_sidecar

    def read_then_swap(new: int, name: str, info: os.stat_result) -> Any:
        found = read(new, name, info)
        (spool.paths.new / "swap.meta.json").unlink()  # the producer's next move, right after the read
        (spool.paths.new / "swap.meta.json").symlink_to(target)
        return found

    spool._read_sidecar = read_then_swap  # type: ignore[method-assign]
    assert await spool.rescan() == 1
    assert [i.deadline for i in await items_of(store, "swap.jsonl")] == [AT, AT]  # what was read
    assert listing(spool.paths.done) == ["swap.jsonl"]  # not the symlink: it waits alone in new/
    assert (spool.paths.new / "swap.meta.json").is_symlink()
    spool._read_sidecar = read  # type: ignore[method-assign]
    spool.orphan_sidecar_age = 0.0
    await spool.rescan()
    assert listing(spool.paths.rejected) == ["swap.meta.json", "swap.meta.json.error.json"]
    assert os.readlink(spool.paths.rejected / "swap.meta.json") == str(target)
    assert target.read_bytes() == b"the daemon's own file\n"


# -- producers: batchd.submit() and `batchd submit` ----------------------------------------------


def test_submit_puts_the_sidecar_into_new_before_its_file_and_never_joins_one_already_there(tmp_path: Path) -> None:
    paths = SpoolPaths(tmp_path / "spool")
    paths.create()
    (paths.new / "job.meta.json").write_bytes(b'{"deadline": "1h"}')  # someone's, waiting for its own job.jsonl
    with MovedInto(paths.new) as moved:
        first = batchd.submit([chat_line(1)], name="job", spool_dir=paths.root, deadline="8h")
        assert moved.names() == ["job-1.meta.json", "job-1.jsonl"]
        second = batchd.submit([chat_line(2)], name="plain", spool_dir=paths.root)
        assert moved.names() == ["plain.jsonl"]
        batchd.submit([chat_line(3)], name="dated", spool_dir=paths.root, deadline=AT)
        assert moved.names() == ["dated.meta.json", "dated.jsonl"]
    assert first.path == paths.new / "job-1.jsonl" and second.path == paths.new / "plain.jsonl"
    assert orjson.loads((paths.new / "job-1.meta.json").read_bytes()) == {"deadline": "8h"}
    assert orjson.loads((paths.new / "dated.meta.json").read_bytes()) == {"deadline": "2099-12-01T06:00:00+00:00"}
    assert listing(paths.tmp) == []
    for wrong in ("soon", datetime(2026, 12, 1, 7)):
        with pytest.raises(ValueError, match="deadline"):
            batchd.submit([chat_line(4)], name="never", spool_dir=paths.root, deadline=wrong)
    assert listing(paths.tmp) == [] and not (paths.new / "never.jsonl").exists()


def run_batchd(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "batchd", *args], capture_output=True, text=True, timeout=60)


def test_an_unreadable_deadline_is_a_usage_error_before_anything_is_written(tmp_path: Path) -> None:
    source = tmp_path / "tickets.jsonl"
    source.write_bytes(requests(2))
    paths = SpoolPaths(tmp_path / "spool")
    paths.create()
    for wrong in ("tomorrow", "2026-12-01T07:00"):
        done = run_batchd("submit", "--spool-dir", str(paths.root), "--deadline", wrong, str(source))
        assert done.returncode == 64, done.stderr
        assert done.stderr.startswith("batchd submit: --deadline: deadline ") and "Traceback" not in done.stderr
        assert listing(paths.tmp) == [] and listing(paths.new) == []
    done = run_batchd("retry", "--file", "tickets.jsonl", "--deadline", "whenever", "--config", "/nonexistent.toml")
    assert done.returncode == 64 and "--deadline" in done.stderr, done.stderr


async def test_retry_gives_retried_requests_no_deadline_unless_deadline_says_one(
    tmp_path: Path, emulator: RunningEmulator
) -> None:
    config = write_config(tmp_path, emulator)
    with config.open("a") as handle:
        handle.write(f'[[routes]]\nmodel = "{ROUTED}"\nprovider = "openai"\ndeadline = "8h"\ndeadline_lead = 900\n')
    settings = load_settings(str(config))
    store = open_store(settings.store_url, "n1")
    await store.open()
    try:
        spool = Spool(settings, store, on_ingest=lambda: None)
        spool.paths.create()
        for name in ("plain.jsonl", "dated.jsonl"):  # both had a deadline, and both failed
            put(spool.paths, name, requests(3, ROUTED, name), {"deadline": ABSOLUTE})
        assert await spool.rescan() == 2
        batch = await submitted_batch(store)
        failed = [final(i, "errored") for i in await store.submitted_items(batch.id)]
        assert len(failed) == 6
        await store.record_outcomes(batch.id, failed, [])
    finally:
        await store.close()

    plain = await asyncio.to_thread(run_batchd, "retry", "--file", "plain.jsonl", "--config", str(config))
    assert plain.returncode == 0, plain.stderr
    assert "queued again as plain.retry1.jsonl; results:" in plain.stdout
    before = time.time()
    dated = await asyncio.to_thread(
        run_batchd, "retry", "--file", "dated.jsonl", "--deadline", "2h", "--config", str(config)
    )
    after = time.time()
    assert dated.returncode == 0, dated.stderr
    store = open_store(settings.store_url, "reader")
    await store.open()
    try:
        # Neither the original's deadline nor the route's default: a retry has no arrival to count from.
        assert [(i.deadline, i.fallback_at) for i in await items_of(store, "plain.retry1.jsonl")] == [(None, None)] * 3
        assert (await file_row(store, "plain.retry1.jsonl")).deadline is None
        row = await file_row(store, "dated.retry1.jsonl")
        assert row.deadline is not None and before + 7200 <= row.deadline <= after + 7200
        assert orjson.loads(row.options or "null") == {"deadline": "2h"}
        items = await items_of(store, "dated.retry1.jsonl")
        assert [(i.deadline, i.fallback_at) for i in items] == [(row.deadline, row.deadline - 900)] * 3
        assert f"deadline {datetime.fromtimestamp(row.deadline, UTC).isoformat()}; results:" in dated.stdout
    finally:
        await store.close()


# -- end to end: the daemon as a subprocess ----------------------------------------------------------


def database_rows(database: Path, sql: str) -> list[tuple[Any, ...]]:
    with sqlite3.connect(f"file:{database}?mode=ro", uri=True) as db:
        return list(db.execute(sql))


async def test_submit_with_a_deadline_reaches_the_daemon_and_each_request_keeps_it_to_its_result(
    tmp_path: Path, emulator: RunningEmulator
) -> None:
    config = write_config(tmp_path, emulator)
    settings = load_settings(str(config))
    paths = SpoolPaths(settings.daemon.spool_dir)
    daemon = DaemonProcess(config, tmp_path / "daemon.log").start()
    try:
        await wait_until(lambda: any(e.get("event") == "daemon.ready" for e in daemon.log_events()), 60)
        source = tmp_path / "tickets.jsonl"
        source.write_bytes(requests(3))
        with MovedInto(paths.new) as moved:
            before = time.time()
            command = ("submit", "--config", str(config), "--deadline", "8h", str(source))
            done = await asyncio.to_thread(run_batchd, *command)
            after = time.time()
            assert done.returncode == 0, done.stderr
            assert moved.names() == ["tickets.meta.json", "tickets.jsonl"]  # the sidecar first
            due = datetime.now(UTC) + timedelta(hours=3)
            api = batchd.submit([chat_line(n) for n in range(2)], name="api", spool_dir=paths.root, deadline=due)
            assert moved.names() == ["api.meta.json", "api.jsonl"]
        assert done.stdout.splitlines() == [
            str(paths.new / "tickets.jsonl"),
            f"results: {paths.out}/tickets.results.jsonl",
        ]
        for results, count in ((paths.out / "tickets.results.jsonl", 3), (api.results, 2)):
            await wait_for_file(results, 60, daemon)
            assert [r["status"] for r in read_results(results)] == ["succeeded"] * count
        rows = database_rows(
            settings.daemon.database_path,
            "SELECT f.name, f.deadline, f.options, i.deadline, i.fallback_at"
            " FROM items i JOIN files f ON f.id = i.file_id ORDER BY f.name, i.line",
        )
        by_file = {name: {row[1:] for row in rows if row[0] == name} for name in ("api.jsonl", "tickets.jsonl")}
        [(deadline, options, item_deadline, fallback)] = by_file["tickets.jsonl"]
        assert before + 8 * 3600 - 5 <= deadline <= after + 8 * 3600  # from the file's arrival (its mtime)
        assert (options, item_deadline, fallback) == ('{"deadline":"8h"}', deadline, deadline - 3600)
        at = due.timestamp()
        assert by_file["api.jsonl"] == {(at, orjson.dumps({"deadline": due.isoformat()}).decode(), at, at - 3600)}
        assert [r[0] for r in rows].count("tickets.jsonl") == 3
        assert listing(paths.done) == ["api.jsonl", "api.meta.json", "tickets.jsonl", "tickets.meta.json"]
        ingested = [e for e in daemon.log_events() if e.get("event") == "spool.ingested"]
        assert {e["file"]: e["deadline"] for e in ingested} == {
            "tickets.jsonl": datetime.fromtimestamp(deadline, UTC).isoformat(),
            "api.jsonl": due.astimezone(UTC).isoformat(),
        }
    finally:
        await daemon.stop()


# -- hostile producers (root tier) -------------------------------------------------------------------


async def test_hostile_sidecars_are_refused_without_blocking_and_never_given_to_another_users_file(
    hostile: Setup,
) -> None:
    producer, other, paths = hostile.producer, hostile.other, hostile.paths
    # Another user's sidecar, there first, for the name the producer is about to use.
    await other.drop("victim.meta.json", b'{"deadline": "1h"}')
    # The producer's own: a FIFO, a symlink to the daemon's database, one far over the size limit.
    assert await producer("mkfifo", "spool/new/pipe.meta.json") == "ok"
    assert await producer("symlink", str(hostile.database), "spool/new/link.meta.json") == "ok"
    await producer.drop("huge.meta.json", b'{"deadline": "8h"' + b" " * (1 << 20) + b"}")
    for name in ("victim", "pipe", "link", "huge", "after"):
        await producer.drop(f"{name}.jsonl", chat(f"{name}-1"))
    for name in ("victim", "after"):
        await wait_for_file(paths.out / f"{name}.results.jsonl", 60, hostile.daemon)
    await wait_until(lambda: len(os.listdir(paths.rejected)) == 11, 30)
    assert listing(paths.rejected) == [
        "huge.jsonl", "huge.jsonl.error.json", "huge.meta.json",
        "link.jsonl", "link.jsonl.error.json", "link.meta.json",
        "pipe.jsonl", "pipe.jsonl.error.json", "pipe.meta.json",
        "victim.meta.json", "victim.meta.json.error.json",
    ]  # fmt: skip
    errors = {
        name: orjson.loads((paths.rejected / f"{name}.error.json").read_bytes())["error"]
        for name in ("huge.jsonl", "link.jsonl", "pipe.jsonl", "victim.meta.json")
    }
    assert "over the limit" in errors["huge.jsonl"]
    assert "symlink" in errors["link.jsonl"] and "not a regular file" in errors["pipe.jsonl"]
    assert errors["victim.meta.json"].startswith(f"a sidecar of uid {OTHER_PRODUCER_UID} for victim.jsonl")
    assert os.readlink(paths.rejected / "link.meta.json") == str(hostile.database)  # moved, never followed
    # The victim's file went on, without the other user's deadline.
    assert database_rows(hostile.database, "SELECT f.name, i.deadline FROM items i JOIN files f ON f.id = i.file_id"
                         " WHERE f.name IN ('victim.jsonl', 'after.jsonl') ORDER BY 1") == [
        ("after.jsonl", None), ("victim.jsonl", None)
    ]  # fmt: skip
    assert not hostile.event("daemon.task_died")
    hostile.database_ok()
    assert await hostile.daemon.stop(timeout=30) == -signal.SIGTERM  # nothing blocked the event loop


async def test_a_sidecar_replaced_while_its_file_is_ingested_changes_nothing_of_it(hostile: Setup) -> None:
    producer, other, paths = hostile.producer, hostile.other, hostile.paths
    big = b"".join(no_messages(f"big-{n}") for n in range(150_000)) + chat("big-valid")
    await producer.drop("big.meta.json", b'{"deadline": "8h"}')
    await producer("stage", "big.jsonl", big.hex())
    staged = os.stat(paths.tmp / ".big.jsonl")
    dropped = time.time()
    assert await producer("rename", "spool/tmp/.big.jsonl", "spool/new/big.jsonl") == "ok"
    await wait_until(lambda: (open_position(hostile.daemon.pid, staged) or 0) > 0, timeout=30, interval=0.002)
    # Mid-ingest: another user can neither replace nor remove the sidecar (sticky new/) ...
    assert await other("stage", "big.meta.json", b'{"deadline": "1m"}'.hex()) == "ok"
    await other.refused("rename", "spool/tmp/.big.meta.json", "spool/new/big.meta.json")
    await other.refused("unlink", "spool/new/big.meta.json")
    # ... and its owner's replacement comes too late: the file's row has the deadline it began with.
    assert await producer("stage", "later.meta.json", b'{"deadline": "1h"}'.hex()) == "ok"
    assert await producer("rename", "spool/tmp/.later.meta.json", "spool/new/big.meta.json") == "ok"
    await wait_for_file(paths.out / "big.results.jsonl", 120, hostile.daemon)
    [(options, deadline)] = database_rows(
        hostile.database, "SELECT options, deadline FROM files WHERE name = 'big.jsonl'"
    )
    assert options == '{"deadline":"8h"}' and staged.st_mtime + 8 * 3600 == deadline and deadline > dropped + 7 * 3600
    assert database_rows(
        hostile.database, "SELECT COUNT(*), i.deadline FROM items i JOIN files f ON f.id = i.file_id GROUP BY 2"
    ) == [(1, deadline)]  # the one valid line (the others are invalid results)
    assert listing(paths.done) == ["big.jsonl"]
    # The replacement never went with the file: it waits in new/ for the orphan sweep.
    assert (paths.new / "big.meta.json").read_bytes() == b'{"deadline": "1h"}'
    hostile.database_ok()
