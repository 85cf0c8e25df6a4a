"""When a route flushes (issue 11): submission windows, deadlines that do not wait for them, forced
flushes and route-name pauses, against a subprocess daemon (`python -m batchd run`) and the emulator.

Each window is a daily range to the second in UTC (schedule.DailyRange accepts HH:MM:SS), opened a
few seconds from now, so a test never waits for a wall-clock minute.
"""

from __future__ import annotations

import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from batchd.emulator import RunningEmulator

from .conftest import wait_until
from .emulator_helpers import admin
from .harness import DaemonProcess, read_results, wait_for_file, write_config
from .test_acceptance import chat_line, claude_line
from .test_control import batchd, drop, ok_json, ready

# Long enough for the daemon to start, ingest and be asked before the window opens on a loaded machine.
OPENS_IN = 15.0


def window_from(opens: float, hours: float = 1.0) -> str:
    """A daily range (UTC, to the second) that opens at `opens` and stays open `hours`."""
    start = datetime.fromtimestamp(opens, UTC)
    end = datetime.fromtimestamp(opens + hours * 3600, UTC)
    return f"{start:%H:%M:%S}-{end:%H:%M:%S}"


def with_routes(config: Path, *routes: dict[str, Any]) -> Path:
    """Append [[routes]] tables to a config written by write_config (which writes plain tables only)."""
    text = config.read_text()
    for route in routes:
        text += "\n[[routes]]\n" + "".join(f'{key} = "{value}"\n' for key, value in route.items())
    config.write_text(text)
    return config


def flushed(daemon: DaemonProcess) -> list[dict[str, Any]]:
    return [e for e in daemon.log_events() if e.get("event") == "batch.flushed"]


async def openai_batches(emulator: RunningEmulator) -> int:
    _, stats = await admin(emulator, "GET", "/_emulator/stats")
    return int(stats["openai"]["batches_created"])


async def test_a_window_that_opens_later_holds_everything_until_it_opens(
    tmp_path: Path, emulator: RunningEmulator
) -> None:
    opens = float(int(time.time() + OPENS_IN) + 1)  # a whole second: the range has no fractions
    config = write_config(
        tmp_path, emulator, **{"providers.openai": {"window": [window_from(opens)], "timezone": "UTC"}}
    )
    daemon = DaemonProcess(config, tmp_path / "daemon.log").start()
    try:
        await ready(daemon)
        out = drop(tmp_path, "night.jsonl", [chat_line(n) for n in range(12)])

        async def queued() -> Any:
            status = await ok_json("status", "--config", str(config))
            return status["next_flush"] if sum(f["queued"] for f in status["next_flush"]) == 12 else None

        [flush] = await wait_until(queued, 30)
        assert time.time() < opens, "the machine was too slow: the window opened before the check"
        # max_wait (1 s) is long past: only the window holds it, and status says until when.
        assert (flush["reason"], flush["next_flush"]) == ("schedule", opens)
        assert await openai_batches(emulator) == 0
        await wait_for_file(out, timeout=OPENS_IN + 60, daemon=daemon)
    finally:
        assert await daemon.stop() in (0, -15)
    assert len(read_results(out)) == 12
    events = flushed(daemon)
    assert events and all(e["reason"] == "age" for e in events)
    # Every batch was created once the window was open, none before.
    _, listed = await admin(emulator, "GET", "/_emulator/stats")
    assert listed["openai"]["batches_created"] == len(events)
    assert min(datetime.fromisoformat(e["timestamp"]).timestamp() for e in events) >= opens


async def test_work_with_a_deadline_does_not_wait_for_its_window_or_a_full_batch(
    tmp_path: Path, emulator: RunningEmulator
) -> None:
    later = window_from(time.time() + 6 * 3600)  # opens in six hours
    config = write_config(
        tmp_path,
        emulator,
        batching={"max_wait": 3600},
        **{
            "providers.openai": {"window": [later], "expected_turnaround": "2h"},
            "providers.anthropic": {"window": [later]},
        },
    )
    # Due in 2 h, less a 10-minute lead and a 2-hour turnaround: it must go now.
    with_routes(config, {"model": "gpt-4o-mini", "provider": "openai", "name": "reports", "deadline": "2h",
                         "deadline_lead": "10m"})  # fmt: skip
    daemon = DaemonProcess(config, tmp_path / "daemon.log").start()
    try:
        await ready(daemon)
        urgent = drop(tmp_path, "urgent.jsonl", [chat_line(n) for n in range(3)])
        relaxed = drop(tmp_path, "relaxed.jsonl", [claude_line(n) for n in range(3)])
        await wait_for_file(urgent, timeout=60, daemon=daemon)
        status = await ok_json("status", "--config", str(config))
    finally:
        assert await daemon.stop() in (0, -15)
    assert [r["status"] for r in read_results(urgent)] == ["succeeded"] * 3
    [event] = flushed(daemon)
    assert (event["reason"], event["requests"], event["route"]) == ("deadline", 3, "reports")
    # The route without a deadline still waits for its window.
    [waiting] = status["next_flush"]
    assert (waiting["provider"], waiting["queued"], waiting["reason"]) == ("anthropic", 3, "schedule")
    assert not relaxed.exists()


async def test_a_forced_flush_sends_a_route_at_once_but_never_past_a_pause(
    tmp_path: Path, emulator: RunningEmulator
) -> None:
    config = write_config(tmp_path, emulator, batching={"max_wait": 3600})
    with_routes(config, {"model": "gpt-4o-mini", "provider": "openai", "name": "nightly"})
    cfg = str(config)
    daemon = DaemonProcess(config, tmp_path / "daemon.log").start()
    try:
        await ready(daemon)
        unknown = await batchd("flush", "nope", "--config", cfg)
        assert unknown.returncode == 64
        assert "no route 'nope'" in unknown.stderr and "(known: anthropic, nightly, openai)" in unknown.stderr

        paused = await batchd("pause", "nightly", "--config", cfg)
        assert paused.returncode == 0 and "paused nightly" in paused.stdout, paused.stderr
        out = drop(tmp_path, "small.jsonl", [chat_line(n) for n in range(3)])
        other = drop(tmp_path, "other.jsonl", [claude_line(n) for n in range(2)])

        async def both_queued() -> Any:
            flushes = (await ok_json("status", "--config", cfg))["next_flush"]
            return {f["route"]: f["reason"] for f in flushes} if len(flushes) == 2 else None

        assert await wait_until(both_queued, 30) == {"nightly": "paused", "anthropic": "age"}
        held = await batchd("flush", "nightly", "--config", cfg)
        assert held.returncode == 0 and "held or paused, so not flushed: openai/gpt-4o-mini" in held.stdout
        # The pause wins: the batcher's next pass drops the request and sends nothing.
        await wait_until(_no_flush_requests(cfg), 30)
        assert await openai_batches(emulator) == 0

        resumed = await batchd("resume", "nightly", "--config", cfg)
        assert resumed.returncode == 0 and "resumed nightly" in resumed.stdout
        flushes = {f["route"]: f["reason"] for f in (await ok_json("status", "--config", cfg))["next_flush"]}
        assert flushes == {"nightly": "age", "anthropic": "age"}  # not full, not due for an hour

        forced = await batchd("flush", "nightly", "--config", cfg)
        assert forced.returncode == 0 and "flush requested for route nightly" in forced.stdout
        await wait_for_file(out, timeout=60, daemon=daemon)
        remaining = (await ok_json("status", "--config", cfg))["next_flush"]
    finally:
        assert await daemon.stop() in (0, -15)
    assert len(read_results(out)) == 3 and not other.exists()
    [event] = flushed(daemon)
    assert (event["reason"], event["route"], event["requests"]) == ("forced", "nightly", 3)
    assert [(f["route"], f["queued"], f["reason"]) for f in remaining] == [("anthropic", 2, "age")]


def _no_flush_requests(config: str) -> Any:
    async def check() -> bool:
        return (await ok_json("status", "--config", config))["flush_requests"] == []

    return check


async def test_a_full_batch_leaves_while_the_rest_of_its_file_is_still_being_ingested(
    tmp_path: Path, emulator: RunningEmulator
) -> None:
    # max_wait an hour and the batcher's own nap long (tick 5 s: up to 150 s): only the spool's word
    # that chunks were committed can start a flush before the file's end.
    config = write_config(
        tmp_path,
        emulator,
        batching={"max_wait": 3600, "tick": 5},
        **{"providers.openai": {"max_requests": 5_000}},
    )
    daemon = DaemonProcess(config, tmp_path / "daemon.log").start()
    try:
        await ready(daemon)
        drop(tmp_path, "big.jsonl", [chat_line(n) for n in range(60_000)])

        def ingested() -> bool | None:
            return any(e.get("event") == "spool.ingested" for e in daemon.log_events()) or None

        await wait_until(ingested, 120)
    finally:
        assert await daemon.stop() in (0, -15)
    order = [e["event"] for e in daemon.log_events() if e.get("event") in ("batch.flushed", "spool.ingested")]
    assert "batch.flushed" in order[: order.index("spool.ingested")], order
    assert all(e["reason"] == "full" and e["requests"] == 5_000 for e in flushed(daemon))
