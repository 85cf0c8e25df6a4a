"""kill -9 at the worst moments: named crash points, and SIGKILL at random moments under provider faults.

`BATCHD_CRASH_AT=name` makes `python -m batchd run` SIGKILL itself at that point; the test then
restarts it without the crash point and checks that every line got exactly one result, that no
request went to the provider twice, and that no second remote batch was created for the same work.
"""

from __future__ import annotations

import asyncio
import os
import random
import signal
import sqlite3
import subprocess
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import openai
import pytest

from batchd.emulator import Faults, RunningEmulator

from .conftest import require_root, wait_until
from .harness import DaemonProcess, NotifySocket, read_results, wait_for_file, write_config
from .test_faults import (
    all_custom_ids,
    assert_one_result_per_line,
    assert_resent_only_after_failure,
    chat_line,
    claude_line,
    drop,
    embedding_line,
    emulator_stats,
    emulator_with,
    expected_response_id,
    out_path,
)

KILLED = -signal.SIGKILL


def query(database: Path, sql: str, params: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    """Read the daemon's database (WAL: a reader sees every committed transaction)."""
    connection = sqlite3.connect(f"file:{database}?mode=ro", uri=True)
    try:
        return connection.execute(sql, params).fetchall()
    finally:
        connection.close()


async def batch_files_left(emu: RunningEmulator) -> list[str]:
    """Input files (purpose "batch") still stored at the emulator, listed through the openai SDK."""
    client = openai.AsyncOpenAI(base_url=emu.openai_base_url, api_key="sk-test", max_retries=0)
    try:
        page = await client.files.list(purpose="batch")
        return [f.id for f in page.data]
    finally:
        await client.close()


MIXED = "mixed"
OPENAI_ONLY = "openai"
ANTHROPIC_ONLY = "anthropic"


def lines_for(kinds: str) -> list[dict[str, Any]]:
    lines: list[dict[str, Any]] = []
    if kinds in (MIXED, OPENAI_ONLY):
        lines += [chat_line(n) for n in range(40)]
    if kinds in (MIXED, ANTHROPIC_ONLY):
        lines += [claude_line(n) for n in range(30)]
    return lines


@pytest.mark.parametrize(
    ("point", "kinds"),
    [
        ("after-upload", MIXED),
        ("after-create", OPENAI_ONLY),
        ("after-create", ANTHROPIC_ONLY),
        ("after-results-commit", MIXED),
        ("after-outbox-write", MIXED),
    ],
    ids=["after-upload", "after-create-openai", "after-create-anthropic", "after-results-commit", "after-outbox-write"],
)
async def test_a_crash_at_a_named_point_then_restart_gives_one_result_per_line_and_no_second_batch(
    tmp_path: Path, point: str, kinds: str
) -> None:
    lines = lines_for(kinds)
    spool = tmp_path / "spool"
    database = tmp_path / "state" / "batchd.sqlite3"
    results_path = out_path(spool, "work")
    async with emulator_with() as emu:
        config = write_config(tmp_path, emu, batching={"max_wait": 0.3})
        drop(spool, "work.jsonl", lines)
        daemon = DaemonProcess(config, tmp_path / "daemon.log").start(BATCHD_CRASH_AT=point)
        try:
            assert await daemon.wait(60) == KILLED
            assert not results_path.exists()
            at_crash = await emulator_stats(emu)
            if point == "after-upload":
                assert at_crash["openai"]["files_uploaded"] == 1 and at_crash["openai"]["batches_created"] == 0
                [(orphan,)] = query(database, "SELECT input_file_id FROM batches WHERE kind = 'openai'")
                assert orphan in await batch_files_left(emu)
            elif point == "after-create":
                assert at_crash[kinds]["batches_created"] == 1
                assert query(database, "SELECT state, remote_id FROM batches") == [("pending", None)]
            elif point == "after-results-commit":
                assert query(database, "SELECT COUNT(*) FROM results")[0][0] > 0
                assert query(database, "SELECT COUNT(*) FROM sink_cursors")[0][0] == 0
                assert not list((spool / "out").iterdir())
            else:
                written = len((spool / "out" / "work.results.jsonl.part").read_bytes().splitlines())
                assert written > 0
                assert query(database, "SELECT delivered, out_bytes FROM files") == [(0, 0)]

            daemon.start()
            await wait_for_file(results_path, timeout=60, daemon=daemon)
            # The last results can be out before their batch is marked done and its input file deleted.
            await wait_until(lambda: query(database, "SELECT COUNT(*) FROM batches WHERE state != 'done'") == [(0,)])
        finally:
            await daemon.stop()
        stats = await emulator_stats(emu)
        left = await batch_files_left(emu)
    by_id = assert_one_result_per_line(read_results(results_path), lines)
    assert Counter(r["status"] for r in by_id.values()) == {"succeeded": len(lines)}
    for line in lines:
        assert by_id[line["custom_id"]]["response"]["id"] == expected_response_id(line)
    # One remote batch per provider: the restart adopted or collected, it never created again.
    expected_batches = {"openai": int(kinds != ANTHROPIC_ONLY), "anthropic": int(kinds != OPENAI_ONLY)}
    assert query(database, "SELECT COUNT(*) FROM batches") == [(sum(expected_batches.values()),)]
    assert {vendor: stats[vendor]["batches_created"] for vendor in expected_batches} == expected_batches
    ids = all_custom_ids(stats)
    assert len(ids) == len(lines) and all(len(batches) == 1 for batches in ids.values())
    events = Counter(e.get("event") for e in daemon.log_events())
    if point == "after-upload":
        # The orphan upload was deleted before the second upload, the used one after collection.
        assert stats["openai"]["files_uploaded"] == 2
        assert left == []
    if point == "after-create":
        assert events["batch.adopted"] == 1
    if point == "after-outbox-write":
        assert events["outbox.truncated"] == 1
    assert not (spool / "out" / "work.results.jsonl.part").exists()


async def test_a_crash_in_the_middle_of_an_ingest_transaction_leaves_the_file_to_be_ingested_again(
    tmp_path: Path,
) -> None:
    lines = [chat_line(n) for n in range(3000)] + [claude_line(n) for n in range(1000)]  # two chunks and more
    spool = tmp_path / "spool"
    database = tmp_path / "state" / "batchd.sqlite3"
    results_path = out_path(spool, "big")
    async with emulator_with() as emu:
        config = write_config(tmp_path, emu, batching={"max_wait": 0.3})
        drop(spool, "big.jsonl", lines)
        daemon = DaemonProcess(config, tmp_path / "daemon.log").start(BATCHD_CRASH_AT="mid-ingest")
        try:
            await wait_until(lambda: not daemon.running() or (spool / "done" / "big.jsonl").exists(), timeout=30)
            assert not daemon.running(), "the daemon ingested the whole file: the crash point was never reached"
            assert await daemon.wait(10) == KILLED
            # Ingest commits in chunks: the first chunk is in, the file did not finish, it is still in
            # new/; the restart resumes after the committed line (no line lost or duplicated, below).
            assert query(database, "SELECT state, lines_committed FROM files") == [("ingesting", 2000)]
            assert (spool / "new" / "big.jsonl").exists()
            daemon.start()
            await wait_for_file(results_path, timeout=60, daemon=daemon)
        finally:
            await daemon.stop()
    assert_one_result_per_line(read_results(results_path), lines)
    assert query(database, "SELECT COUNT(*) FROM items") == [(len(lines),)]


async def test_after_a_crash_anthropic_batches_of_one_flush_each_adopt_their_own_remote_batch(tmp_path: Path) -> None:
    """Anthropic batches carry no metadata: after a crash they are matched to remote batches by request count.

    100 requests with max_requests=50 would make two batches of equal size claimed in one flush;
    the crash comes right after the first create, while the second may be in flight.
    """
    lines = [claude_line(n) for n in range(100)]
    spool = tmp_path / "spool"
    results_path = out_path(spool, "twins")
    async with emulator_with() as emu:
        # Two batches of 50, claimed in one flush; one attempt, so a request never sent cannot hide.
        config = write_config(
            tmp_path,
            emu,
            batching={"max_wait": 0.3, "max_attempts": 1},
            **{"providers.anthropic": {"max_requests": 50}},
        )
        drop(spool, "twins.jsonl", lines)
        daemon = DaemonProcess(config, tmp_path / "daemon.log").start(BATCHD_CRASH_AT="after-create")
        try:
            assert await daemon.wait(60) == KILLED
            daemon.start()
            await wait_for_file(results_path, timeout=60, daemon=daemon)
        finally:
            await daemon.stop()
        stats = await emulator_stats(emu)
    adopted = [e["remote_id"] for e in daemon.log_events() if e.get("event") == "batch.adopted"]
    assert adopted and len(adopted) == len(set(adopted)), f"one remote batch adopted twice: {adopted}"
    by_id = assert_one_result_per_line(read_results(results_path), lines)
    assert Counter(r["status"] for r in by_id.values()) == {"succeeded": len(lines)}
    local = query(tmp_path / "state" / "batchd.sqlite3", "SELECT remote_id, requests FROM batches")
    # One remote batch per local batch, each holding exactly that batch's requests.
    assert stats["anthropic"]["batches_created"] == len(local) == len({remote for remote, _ in local})
    ids = all_custom_ids(stats)
    assert len(ids) == len(lines) and all(len(batches) == 1 for batches in ids.values())
    sizes = Counter(batches[0] for batches in ids.values())
    assert sorted(sizes.items()) == sorted(local)


FILES = 10
KILLS = 20
# ENOSPC on the outbox: spool/out is a small tmpfs, nearly filled by a filler file until the
# outbox has failed on it at least once.
OTHER_FILES = 2


@contextmanager
def full_disk(directory: Path, size: str = "48m", free_bytes: int = 64 * 1024) -> Iterator[Path]:
    """A real filesystem at `directory` with only `free_bytes` left; yields the filler to delete."""
    directory.mkdir(parents=True, exist_ok=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size},mode=0750", "tmpfs", str(directory)], check=True)
    try:
        filler = directory / ".filler"
        usage = os.statvfs(directory)
        with filler.open("wb") as handle:
            handle.truncate(0)
            remaining = usage.f_bavail * usage.f_frsize - free_bytes
            block = b"\0" * (1 << 20)
            while remaining > 0:
                remaining -= handle.write(block[: min(len(block), remaining)])
        yield filler
    finally:
        subprocess.run(["umount", "-l", str(directory)], check=False)


def outbox_failed(daemon: DaemonProcess) -> bool:
    if not daemon.log_path.exists():
        return False
    return any(
        event.get("event") == "sink.delivery_failed" and "No space left" in str(event.get("error"))
        for event in daemon.log_events()
    )


def chaos_files(rng: random.Random, count: int, base: int) -> dict[str, list[dict[str, Any]]]:
    files: dict[str, list[dict[str, Any]]] = {}
    for k in range(count):
        # Equal shares per file, so Anthropic batches of equal size are likely (in both daemons).
        n0 = base + k * 10_000
        lines: list[dict[str, Any]] = [chat_line(n0 + n) for n in range(800)]
        lines += [embedding_line(n0 + n) for n in range(200)]
        lines += [claude_line(n0 + n) for n in range(1000)]
        rng.shuffle(lines)
        files[f"part-{k}"] = lines
    return files


def assert_answers_are_their_own(spool: Path, files: dict[str, list[dict[str, Any]]]) -> int:
    """One success per line, each the answer to this very request (not another daemon's)."""
    total = 0
    for name, lines in files.items():
        by_id = assert_one_result_per_line(read_results(out_path(spool, name)), lines)
        assert Counter(r["status"] for r in by_id.values()) == {"succeeded": len(lines)}
        for line in lines:
            if "embed" not in line["custom_id"]:
                assert by_id[line["custom_id"]]["response"]["id"] == expected_response_id(line)
        total += len(lines)
    return total


@pytest.mark.slow
async def test_sigkill_at_random_moments_under_http_errors_loses_and_duplicates_nothing(tmp_path: Path) -> None:
    # Seeded: CHAOS_SEED replays a failure. 20,000 lines over both providers, 20 SIGKILLs, with
    # HTTP errors on every call, retryable errors inside batches, a full disk under the outbox for
    # the first rounds, and a second daemon (its own database) on the same provider account.
    require_root()
    seed = int(os.environ.get("CHAOS_SEED", "1234"))
    rng = random.Random(seed)
    files = chaos_files(rng, FILES, 0)
    other_files = chaos_files(rng, OTHER_FILES, 500_000)
    spool = tmp_path / "spool"
    other_root = tmp_path / "other"
    other_root.mkdir()
    database = tmp_path / "state" / "batchd.sqlite3"
    faults = Faults(seed=seed, http_error_rate=0.1, request_error_rate=0.02)
    limits = {"providers.openai": {"max_requests": 1500}, "providers.anthropic": {"max_requests": 1800}}
    batching = {"max_wait": 0.5, "retry_backoff_max": 4, "max_attempts": 10}
    async with emulator_with(faults, processing_seconds=1.0) as emu:
        config = write_config(tmp_path, emu, batching=batching, **limits)
        notify = NotifySocket(tmp_path / "notify.sock")
        daemon = DaemonProcess(config, tmp_path / "daemon.log", env={"NOTIFY_SOCKET": str(notify.path)})
        other = DaemonProcess(write_config(other_root, emu, batching=batching, **limits), other_root / "daemon.log")
        kills = []
        with full_disk(spool / "out") as filler:
            try:
                other.start()
                for name, lines in other_files.items():
                    drop(other_root / "spool", f"{name}.jsonl", lines)
                for round_number in range(KILLS):
                    if filler.exists() and outbox_failed(daemon):
                        filler.unlink()
                    daemon.start()
                    await wait_until(lambda: notify.seen("READY=1"), timeout=30)
                    notify.messages.clear()
                    if round_number < FILES:  # a new file while the daemon runs: the kill may land mid-ingest
                        name = f"part-{round_number}"
                        drop(spool, f"{name}.jsonl", files[name])
                    # The chaos itself: a seeded random moment, not a wait for a condition.
                    await asyncio.sleep(rng.uniform(0.2, 1.5))
                    await daemon.kill()
                    kills.append(daemon.proc.returncode if daemon.proc else None)
                assert other.running(), "the second daemon died"
                daemon.start()
                if filler.exists():
                    await wait_until(lambda: outbox_failed(daemon), timeout=120)
                    filler.unlink()
                for name in files:
                    await wait_for_file(out_path(spool, name), timeout=300, daemon=daemon)
                for name in other_files:
                    await wait_for_file(out_path(other_root / "spool", name), timeout=300, daemon=other)
                await wait_until(
                    lambda: query(database, "SELECT COUNT(*) FROM batches WHERE state != 'done'") == [(0,)]
                )
                total = assert_answers_are_their_own(spool, files)
                other_total = assert_answers_are_their_own(other_root / "spool", other_files)
                assert not list((spool / "out").glob("*.part"))
            finally:
                for process in (daemon, other):
                    if process.proc is not None:
                        await process.stop()
                notify.close()
        stats = await emulator_stats(emu)
        resent = await assert_resent_only_after_failure(emu)
    assert kills == [KILLED] * KILLS
    assert total == 20_000
    assert other_total == 2 * OTHER_FILES * 1000
    # Every request of both daemons reached the provider under an id of its own.
    assert len(all_custom_ids(stats)) == total + other_total
    # A request went out again only after it had failed (checked per request above), never because
    # of a crash: at most as many re-sends as injected request errors.
    assert 0 < resent <= stats["faults_injected"]["request_errors"]
    assert stats["faults_injected"]["http_errors"] > 0
    # The full disk really was met by the outbox, and survived.
    assert outbox_failed(daemon)
    assert not list((spool / "new").iterdir())
    connection = sqlite3.connect(database)
    try:
        assert connection.execute("PRAGMA integrity_check").fetchall() == [("ok",)]
        states = dict(connection.execute("SELECT state, COUNT(*) FROM items GROUP BY state").fetchall())
        assert states == {"succeeded": total}
        assert connection.execute("SELECT COUNT(*) FROM batches WHERE state != 'done'").fetchone() == (0,)
    finally:
        connection.close()
