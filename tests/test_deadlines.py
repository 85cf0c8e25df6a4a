"""Deadlines met through the real-time fallback, end to end (issue 11): `python -m batchd run` as a
subprocess against the emulator over HTTP, with the official SDKs on both sides.

Costs are checked against the emulator's own bookkeeping, never batchd's: a batch's usage from the
provider's batch object, real-time usage from the emulator's ledger of what it answered, each times
the list price (gpt-4o-mini: $0.15 / $0.60 per million input / output tokens; batch and flex at half).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from batchd.emulator import Faults, RunningEmulator
from batchd.emulator.responses import digest

from .conftest import wait_until
from .emulator_helpers import admin, running
from .harness import DaemonProcess, read_results, wait_for_file, write_config
from .test_acceptance import chat_line
from .test_control import batchd, drop, ok_json, ready

LINES = 20
INPUT, OUTPUT = 0.15 / 1e6, 0.60 / 1e6  # USD per token at the real-time price


def price(input_tokens: int, output_tokens: int, share: float = 1.0) -> float:
    return (input_tokens * INPUT + output_tokens * OUTPUT) * share


def deadline_config(root: Path, emu: RunningEmulator, deadline: str, lead: float, **profile: Any) -> Path:
    """A daemon whose gpt-4o-mini route gives every file `deadline` (after arrival) and `lead`."""
    config = write_config(
        root,
        emu,
        batching={"max_wait": 1, "poll_interval_min": 0.2, "poll_interval_max": 0.5, "tick": 0.1},
        **{"providers.openai": profile} if profile else {},
    )
    route = f'[[routes]]\nmodel = "gpt-4o-mini"\nprovider = "openai"\ndeadline = "{deadline}"\n'
    route += f"deadline_lead = {lead}\n"
    config.write_text(config.read_text() + "\n" + route)
    return config


async def ledger(emu: RunningEmulator) -> list[dict[str, Any]]:
    return list((await admin(emu, "GET", "/_emulator/realtime"))[1]["served"])


def body_digests(numbers: list[int]) -> list[str]:
    return sorted(digest(chat_line(n)["body"]).hex() for n in numbers)


def line_number(result: dict[str, Any]) -> int:
    return int(str(result["custom_id"]).removeprefix("chat-"))


async def collected(daemon: DaemonProcess) -> None:
    await wait_until(lambda: any(e.get("event") == "batch.collected" for e in daemon.log_events()), 60)


async def test_a_slow_batch_cancelled_for_the_deadline_and_the_rest_sent_in_real_time(tmp_path: Path) -> None:
    # Lines finish one by one from ~5 s after the batch is created until ~17 s; the deadline is 16 s
    # after arrival, the fallback starts at 8 s: the batch has finished some lines by then, not all.
    async with running(processing_seconds=20) as (emu, oai, _ant):
        config = deadline_config(tmp_path, emu, "16s", 8)
        daemon = DaemonProcess(config, tmp_path / "daemon.log").start()
        try:
            await ready(daemon)
            results_path = drop(tmp_path, "due.jsonl", [chat_line(n) for n in range(1, LINES + 1)])
            await wait_for_file(results_path, 60, daemon)
            await collected(daemon)
            report = (await ok_json("report", "--config", str(config)))["total"]
        finally:
            assert await daemon.stop() in (0, -15)
        results = read_results(results_path)
        events = daemon.log_events()
        served = await ledger(emu)
        [remote] = [b async for b in oai.batches.list()]
    # Every line exactly once, all answered, each saying how it was served.
    assert sorted(r["line"] for r in results) == list(range(1, LINES + 1))
    assert {r["status"] for r in results} == {"succeeded"}
    by_batch = [line_number(r) for r in results if r["via"] == "batch"]
    by_realtime = [line_number(r) for r in results if r["via"] == "realtime"]
    assert by_batch and by_realtime, "the batch should have finished some lines before the deadline, not all"
    assert all(r["batch_id"] == remote.id for r in results if r["via"] == "batch")
    assert all(r["batch_id"] is None for r in results if r["via"] == "realtime")
    # The finished ones were not sent again: the real-time endpoint saw exactly the unfinished bodies.
    assert remote.status == "cancelled" and remote.request_counts is not None
    assert remote.request_counts.completed == len(by_batch)
    assert sorted(entry["digest"] for entry in served) == body_digests(by_realtime)
    assert {entry["tier"] for entry in served} == {"default"}
    # The report's costs are the emulator's usage times prices: batch usage at the batch price, real time at its own.
    assert remote.usage is not None
    batch_cost = price(remote.usage.input_tokens, remote.usage.output_tokens, 0.5)
    realtime_cost = sum(price(e["input_tokens"], e["output_tokens"]) for e in served)
    assert report["fallback_requests"] == len(by_realtime)
    assert report["fallback_cost"] == pytest.approx(realtime_cost, rel=1e-9)
    assert report["paid"] == pytest.approx(batch_cost + realtime_cost, rel=1e-9)
    assert report["cost_paid"] == pytest.approx(batch_cost + realtime_cost, rel=1e-9)
    assert sum(r["cost"]["paid"] for r in results) == pytest.approx(batch_cost + realtime_cost, rel=1e-9)
    assert (report["deadlines_met"], report["deadlines_missed"]) == (LINES, 0)
    assert (report["duplicate_requests"], report["duplicate_cost"]) == (0, 0.0)
    names = [e["event"] for e in events]
    assert "batch.deadline_cancelled" in names and "realtime.sent" in names
    handed = [e for e in events if e["event"] == "fallback.handed_over"]
    assert sum(e["requests"] for e in handed) == len(by_realtime)


async def test_late_answers_of_a_slow_cancel_are_duplicate_costs_not_result_lines(tmp_path: Path) -> None:
    # The cancel takes 4 s to stop the batch; the fallback waits only cancel_wait (8 s x 0.25 = 2 s),
    # then sends every unanswered request; the batch's answers finished meanwhile arrive after them.
    async with running(processing_seconds=20, faults=Faults(cancel_delay=4.0)) as (emu, oai, _ant):
        config = deadline_config(tmp_path, emu, "16s", 8)
        daemon = DaemonProcess(config, tmp_path / "daemon.log").start()
        try:
            await ready(daemon)
            results_path = drop(tmp_path, "dup.jsonl", [chat_line(n) for n in range(1, LINES + 1)])
            await wait_for_file(results_path, 60, daemon)
            await collected(daemon)
            report = (await ok_json("report", "--config", str(config)))["total"]
            table = await batchd("report", "--config", str(config))
        finally:
            assert await daemon.stop() in (0, -15)
        results = read_results(results_path)
        served = await ledger(emu)
        [remote] = [b async for b in oai.batches.list()]
    assert sorted(r["line"] for r in results) == list(range(1, LINES + 1))  # no second line for anyone
    assert len({r["custom_id"] for r in results}) == LINES
    assert {r["via"] for r in results} == {"realtime"}
    assert remote.request_counts is not None and remote.usage is not None
    late = remote.request_counts.completed
    assert late > 0, "the slow cancel should have let the batch finish some lines"
    assert report["duplicate_requests"] == late
    assert report["duplicate_cost"] == pytest.approx(price(remote.usage.input_tokens, remote.usage.output_tokens, 0.5))
    realtime_cost = sum(price(e["input_tokens"], e["output_tokens"]) for e in served)
    assert len(served) == LINES
    assert report["paid"] == pytest.approx(realtime_cost + report["duplicate_cost"], rel=1e-9)
    assert table.returncode == 0 and "duplicates" in table.stdout and f"{late} / $" in table.stdout


async def test_queued_requests_past_their_fallback_go_real_time_without_a_batch(tmp_path: Path) -> None:
    async with running() as (emu, _oai, _ant):
        config = deadline_config(tmp_path, emu, "6s", 4)
        daemon = DaemonProcess(config, tmp_path / "daemon.log").start()
        try:
            await ready(daemon)
            paused = await batchd("pause", "openai", "--config", str(config))  # nothing is submitted
            assert paused.returncode == 0, paused.stderr
            results_path = drop(tmp_path, "queued.jsonl", [chat_line(n) for n in range(1, 6)])
            await wait_for_file(results_path, 60, daemon)
            shown = await batchd("results", "--file", "queued.jsonl", "--config", str(config))
        finally:
            assert await daemon.stop() in (0, -15)
        stats = (await admin(emu, "GET", "/_emulator/stats"))[1]
        served = await ledger(emu)
    results = read_results(results_path)
    assert stats["openai"]["batches_created"] == 0
    assert [(r["via"], r["status"]) for r in results] == [("realtime", "succeeded")] * 5
    assert sorted(e["digest"] for e in served) == body_digests([1, 2, 3, 4, 5])
    assert shown.returncode == 0 and shown.stdout.count("realtime") == 5


@pytest.mark.parametrize(("busy", "tier", "share"), [(0.0, "flex", 0.5), (1.0, "default", 1.0)])
async def test_flex_answers_are_priced_at_the_flex_price_and_busy_flex_falls_back_to_standard(
    tmp_path: Path, busy: float, tier: str, share: float
) -> None:
    async with running(faults=Faults(flex_busy_rate=busy)) as (emu, _oai, _ant):
        config = deadline_config(tmp_path, emu, "6s", 4, flex=True)
        daemon = DaemonProcess(config, tmp_path / "daemon.log").start()
        try:
            await ready(daemon)
            assert (await batchd("pause", "openai", "--config", str(config))).returncode == 0
            results_path = drop(tmp_path, "flex.jsonl", [chat_line(n) for n in range(1, 5)])
            await wait_for_file(results_path, 60, daemon)
            report = (await ok_json("report", "--config", str(config)))["total"]
        finally:
            assert await daemon.stop() in (0, -15)
        served = await ledger(emu)
        flex_busy = (await admin(emu, "GET", "/_emulator/realtime"))[1]["flex_busy"]
    results = read_results(results_path)
    assert {e["tier"] for e in served} == {tier} and len(served) == 4
    assert flex_busy == (4 if busy else 0)
    paid = sum(price(e["input_tokens"], e["output_tokens"], share) for e in served)
    assert report["fallback_cost"] == pytest.approx(paid, rel=1e-9)
    for result in results:
        cost = result["cost"]
        assert cost["paid"] == pytest.approx(cost["batch"] if tier == "flex" else cost["realtime"])
