"""Spool intake edge cases: files still being written, huge lines, and a forced second-signal exit."""

from __future__ import annotations

import os
import signal
import time
from collections.abc import AsyncIterator
from pathlib import Path

import orjson
import pytest

from batchd.emulator import RunningEmulator
from batchd.settings import Settings
from batchd.spool import Spool
from batchd.store import Store

from .conftest import make_settings, wait_until
from .harness import DaemonProcess, NotifySocket, write_config
from .test_acceptance import chat_line


@pytest.fixture
async def intake(tmp_path: Path) -> AsyncIterator[tuple[Spool, Store, Settings]]:
    settings = make_settings(tmp_path, None)
    settings.daemon.settle_time = 30
    store = Store(settings.daemon.database_path)
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
