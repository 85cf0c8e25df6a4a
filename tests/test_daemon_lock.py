"""One daemon per state directory: a second `batchd run` exits at once with 75, naming the holder.

Before the lock, both daemons started, polled and collected the same batches, and the second died
on a UNIQUE constraint. The lock is an flock, so a daemon killed with SIGKILL never blocks the next.
"""

from __future__ import annotations

import asyncio
import signal
import subprocess
import sys
from pathlib import Path

import orjson
import pytest

from batchd.daemon import Daemon
from batchd.emulator import RunningEmulator
from batchd.exits import EX_TEMPFAIL, OperatorError

from .conftest import make_settings, wait_until
from .harness import DaemonProcess, read_results, wait_for_file, write_config
from .test_acceptance import chat_line, claude_line


def drop(spool: Path, name: str, lines: list[dict[str, object]]) -> Path:
    (spool / "tmp").mkdir(parents=True, exist_ok=True)
    staged = spool / "tmp" / name
    staged.write_bytes(b"".join(orjson.dumps(line) + b"\n" for line in lines))
    staged.rename(spool / "new" / name)
    return spool / "out" / name.replace(".jsonl", ".results.jsonl")


def ready(daemon: DaemonProcess) -> bool:
    if not daemon.running():
        raise AssertionError(f"daemon exited with {daemon.proc.returncode if daemon.proc else None}")
    return any(event.get("event") == "daemon.ready" for event in daemon.log_events())


def second_run(config: Path) -> subprocess.CompletedProcess[str]:
    try:
        return subprocess.run(
            [sys.executable, "-m", "batchd", "run", "--config", str(config)],
            capture_output=True,
            text=True,
            timeout=30,
        )
    except subprocess.TimeoutExpired as exc:
        raise AssertionError(f"the second daemon did not exit: it runs beside the first ({exc.stdout!r})") from None


async def test_a_second_daemon_on_the_same_state_dir_exits_75_naming_the_holder(
    tmp_path: Path, emulator: RunningEmulator
) -> None:
    config = write_config(tmp_path, emulator)
    first = DaemonProcess(config, tmp_path / "first.log").start()
    try:
        await wait_until(lambda: ready(first), timeout=60)
        lines = [chat_line(n) for n in range(30)] + [claude_line(n) for n in range(20)]
        results_path = drop(tmp_path / "spool", "both.jsonl", lines)

        second = await asyncio.to_thread(second_run, config)
        assert second.returncode == EX_TEMPFAIL, (second.returncode, second.stderr)
        assert "Traceback" not in second.stderr
        [line] = second.stderr.splitlines()
        assert f"pid {first.pid}" in line and str(tmp_path / "state") in line
        assert "daemon.ready" not in second.stdout

        await wait_for_file(results_path, timeout=60, daemon=first)
        assert first.running()
    finally:
        status = await first.stop()
    assert status == -signal.SIGTERM
    results = read_results(results_path)
    assert sorted(r["custom_id"] for r in results) == sorted(str(line["custom_id"]) for line in lines)
    assert {r["status"] for r in results} == {"succeeded"}
    errors = [e for e in first.log_events() if e.get("level") in ("error", "critical")]
    assert errors == []
    lock = tmp_path / "state" / "batchd.lock"
    assert lock.read_text().strip() == str(first.pid)


async def test_a_killed_daemon_leaves_no_lock_behind(tmp_path: Path, emulator: RunningEmulator) -> None:
    config = write_config(tmp_path, emulator)
    first = DaemonProcess(config, tmp_path / "first.log").start()
    await wait_until(lambda: ready(first), timeout=60)
    await first.kill()
    lock = tmp_path / "state" / "batchd.lock"
    assert lock.read_text().strip() == str(first.pid)  # the stale file is still there

    following = DaemonProcess(config, tmp_path / "following.log").start()
    try:
        await wait_until(lambda: ready(following), timeout=60)
        results_path = drop(tmp_path / "spool", "after.jsonl", [chat_line(n) for n in range(5)])
        await wait_for_file(results_path, timeout=60, daemon=following)
        assert lock.read_text().strip() == str(following.pid)
    finally:
        await following.stop()
    assert len(read_results(results_path)) == 5


async def test_in_one_process_the_second_daemon_is_refused_before_touching_anything(
    tmp_path: Path, emulator: RunningEmulator
) -> None:
    settings = make_settings(tmp_path, emulator)
    first = Daemon(settings)
    task = asyncio.create_task(first.run())
    try:
        await wait_until(lambda: first.store._db is not None, timeout=30)
        workdir = settings.daemon.state_dir / "work"
        marker = workdir / "in-use"
        marker.write_text("the first daemon's upload in progress\n")
        with pytest.raises(OperatorError) as refused:
            await asyncio.wait_for(Daemon(settings).run(), timeout=30)
        assert refused.value.status == EX_TEMPFAIL
        assert marker.exists()  # the refused daemon did not clear the first one's work directory
    finally:
        first.request_stop("test")
        assert await asyncio.wait_for(task, timeout=30) == 0
    # Released with the daemon: the next one in this process starts.
    again = Daemon(settings)
    task = asyncio.create_task(again.run())
    await wait_until(lambda: again.store._db is not None, timeout=30)
    again.request_stop("test")
    assert await asyncio.wait_for(task, timeout=30) == 0
