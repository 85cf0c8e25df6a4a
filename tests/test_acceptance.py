"""Acceptance tier: `python -m batchd run` as a subprocess against the emulator on loopback."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import orjson
import pytest

from batchd.emulator import EmulatorConfig, RunningEmulator, start_emulator

from .conftest import wait_until
from .harness import DaemonProcess, NotifySocket, read_results, wait_for_file, write_config


def chat_line(n: int, model: str = "gpt-4o-mini") -> dict[str, Any]:
    return {
        "custom_id": f"chat-{n}",
        "method": "POST",
        "url": "/v1/chat/completions",
        "body": {"model": model, "messages": [{"role": "user", "content": f"Classify ticket {n}"}], "max_tokens": 8},
    }


def embedding_line(n: int) -> dict[str, Any]:
    return {
        "custom_id": f"embed-{n}",
        "method": "POST",
        "url": "/v1/embeddings",
        "body": {"model": "text-embedding-3-small", "input": f"ticket {n}"},
    }


def claude_line(n: int) -> dict[str, Any]:
    return {
        "custom_id": f"claude-{n}",
        "params": {
            "model": "claude-haiku-4-5",
            "max_tokens": 8,
            "messages": [{"role": "user", "content": f"Summarise ticket {n}"}],
        },
    }


def write_jsonl(path: Path, lines: list[Any]) -> Path:
    with path.open("wb") as out:
        for line in lines:
            out.write((line if isinstance(line, bytes) else orjson.dumps(line)) + b"\n")
    return path


@pytest.fixture
async def slow_emulator() -> AsyncIterator[RunningEmulator]:
    """Batches take long enough that several are provably in flight at once."""
    running = await start_emulator(EmulatorConfig(processing_seconds=3.0))
    try:
        yield running
    finally:
        await running.close()


async def emulator_stats(emulator: RunningEmulator) -> dict[str, Any]:
    import aiohttp

    async with aiohttp.ClientSession() as session, session.get(f"{emulator.url}/_emulator/stats") as response:
        data: dict[str, Any] = await response.json()
        return data


async def batchd_cli(*args: str) -> subprocess.CompletedProcess[str]:
    """Run a `batchd` command in a thread, so the in-process emulator keeps serving."""
    return await asyncio.to_thread(
        subprocess.run, [sys.executable, "-m", "batchd", *args], check=True, capture_output=True, text=True
    )


async def submit_cli(source: Path, config: Path) -> Path:
    done = await batchd_cli("submit", "--config", str(config), str(source))
    return Path(done.stdout.splitlines()[0])


@pytest.mark.slow
async def test_120k_mixed_file_becomes_concurrent_batches_and_one_result_per_line(
    tmp_path: Path, slow_emulator: RunningEmulator
) -> None:
    lines = (
        [chat_line(n) for n in range(70_000)]
        + [embedding_line(n) for n in range(10_000)]
        + [claude_line(n) for n in range(40_000)]
    )
    source = write_jsonl(tmp_path / "nightly.jsonl", lines)
    config = write_config(tmp_path, slow_emulator)
    daemon = DaemonProcess(config, tmp_path / "daemon.log").start()
    try:
        dropped = await submit_cli(source, config)
        assert dropped == tmp_path / "spool" / "new" / "nightly.jsonl"
        results_path = tmp_path / "spool" / "out" / "nightly.results.jsonl"
        await wait_for_file(results_path, timeout=240, daemon=daemon)
    finally:
        assert await daemon.stop() == -signal.SIGTERM

    results = read_results(results_path)
    assert len(results) == len(lines)
    assert sorted(r["line"] for r in results) == list(range(1, len(lines) + 1))
    assert {r["custom_id"] for r in results} == {line["custom_id"] for line in lines}
    assert Counter(r["status"] for r in results) == {"succeeded": len(lines)}

    stats = await emulator_stats(slow_emulator)
    openai_ids = stats["openai"]["custom_ids"]
    anthropic_ids = stats["anthropic"]["custom_ids"]
    assert len(openai_ids) == 80_000 and len(anthropic_ids) == 40_000
    assert all(len(batches) == 1 for batches in [*openai_ids.values(), *anthropic_ids.values()])
    by_batch = Counter(batches[0] for batches in openai_ids.values())
    chat_batches = {r["batch_id"] for r in results if r["custom_id"].startswith("chat-")}
    embedding_batches = {r["batch_id"] for r in results if r["custom_id"].startswith("embed-")}
    claude_batches = {r["batch_id"] for r in results if r["custom_id"].startswith("claude-")}
    assert len(chat_batches) >= 2 and all(by_batch[b] <= 50_000 for b in chat_batches)
    assert len(embedding_batches) == 1 and len(claude_batches) == 1
    assert stats["openai"]["batches_created"] == len(chat_batches) + 1
    assert stats["anthropic"]["batches_created"] == 1

    # Concurrency: every batch was submitted before the first one was collected.
    events = daemon.log_events()
    submitted = [e["timestamp"] for e in events if e.get("event") == "batch.submitted"]
    collected = [e["timestamp"] for e in events if e.get("event") == "batch.collected"]
    assert len(submitted) == len(chat_batches) + 2
    assert max(submitted) < min(collected)


async def test_bad_lines_come_back_invalid_and_the_rest_goes_on(tmp_path: Path, emulator: RunningEmulator) -> None:
    big = chat_line(10_000)
    big["body"]["messages"][0]["content"] = "x" * 5000
    lines: list[Any] = [
        chat_line(1),
        b"\xff\xfe not utf-8",
        b"{not json",
        b"[1, 2, 3]",
        {"custom_id": "odd", "prompt": "no known shape"},
        {"custom_id": "no-model", "method": "POST", "url": "/v1/chat/completions", "body": {"messages": []}},
        {"custom_id": "no-messages", "params": {"model": "claude-haiku-4-5", "max_tokens": 5}},
        chat_line(1),  # duplicate custom_id chat-1
        b"",
        big,
        claude_line(2),
        {"method": "POST", "url": "/v1/embeddings", "body": {"model": "text-embedding-3-small", "input": "hi"}},
    ]
    source = write_jsonl(tmp_path / "mixed.jsonl", lines)
    config = write_config(tmp_path, emulator, **{"providers.openai": {"max_bytes": 4096}})
    daemon = DaemonProcess(config, tmp_path / "daemon.log").start()
    try:
        await submit_cli(source, config)
        results_path = tmp_path / "spool" / "out" / "mixed.results.jsonl"
        await wait_for_file(results_path, timeout=60, daemon=daemon)
    finally:
        await daemon.stop()
    results = {r["line"]: r for r in read_results(results_path)}
    assert sorted(results) == list(range(1, len(lines) + 1))
    reasons = {line: r["error"]["message"] for line, r in results.items() if r["status"] == "invalid"}
    assert "not valid UTF-8" in reasons[2]
    assert "not valid JSON" in reasons[3]
    assert "JSON list, expected an object" in reasons[4]
    assert "unknown request shape" in reasons[5] and results[5]["custom_id"] == "odd"
    assert "body.model is missing" in reasons[6] and results[6]["custom_id"] == "no-model"
    assert "params.messages is missing" in reasons[7]
    assert "duplicate custom_id 'chat-1'" in reasons[8]
    assert reasons[9] == "empty line"
    assert "over provider 'openai'" in reasons[10]
    assert set(reasons) == {2, 3, 4, 5, 6, 7, 8, 9, 10}
    for line in (1, 11, 12):
        assert results[line]["status"] == "succeeded"
    assert results[12]["custom_id"] == "line-12"
    assert results[1]["response"]["object"] == "chat.completion"
    assert results[11]["response"]["type"] == "message"

    status = await batchd_cli("status", "--json", "--config", str(config))
    snapshot = orjson.loads(status.stdout)
    assert snapshot["results"] == {"invalid": 9, "succeeded": 3}
    assert snapshot["batches"] == [] and snapshot["queue"] == []
    assert snapshot["files"][0]["name"] == "mixed.jsonl" and snapshot["files"][0]["state"] == "complete"
    human = await batchd_cli("status", "--config", str(config))
    assert "Live batches" in human.stdout and "invalid=9" in human.stdout


async def test_unreadable_files_are_rejected_with_a_reason(tmp_path: Path, emulator: RunningEmulator) -> None:
    config = write_config(tmp_path, emulator)
    spool = tmp_path / "spool"
    for name in ("new", "tmp"):
        (spool / name).mkdir(parents=True)
    (spool / "new" / "empty.jsonl").write_bytes(b"")
    (spool / "new" / "folder.jsonl").mkdir()
    outside = write_jsonl(tmp_path / "outside.jsonl", [chat_line(1)])
    os.symlink(outside, spool / "new" / "link.jsonl")
    (spool / "new" / "notes.txt").write_text("ignored: not a .jsonl file")
    (spool / "new" / ".hidden.jsonl").write_text("ignored: a dotfile")
    odd = "weird name ünïcode [1] 'quote'.jsonl"
    write_jsonl(spool / "new" / odd, [chat_line(1)])
    daemon = DaemonProcess(config, tmp_path / "daemon.log").start()
    try:
        await wait_for_file(spool / "out" / "weird name ünïcode [1] 'quote'.results.jsonl", timeout=60, daemon=daemon)
        rejected = spool / "rejected"
        await wait_until(lambda: len(list(rejected.glob("*.error.json"))) == 3, timeout=30)
    finally:
        await daemon.stop()
    reasons = {p.name: orjson.loads(p.read_bytes())["error"] for p in rejected.glob("*.error.json")}
    assert "empty file" in reasons["empty.jsonl.error.json"]
    assert "directory" in reasons["folder.jsonl.error.json"]
    assert "symlinks are refused" in reasons["link.jsonl.error.json"]
    assert outside.exists()
    assert (spool / "new" / "notes.txt").exists() and (spool / "new" / ".hidden.jsonl").exists()


async def test_sigterm_stops_gracefully_and_restart_polls_instead_of_resubmitting(
    tmp_path: Path, slow_emulator: RunningEmulator
) -> None:
    lines = [chat_line(n) for n in range(300)] + [claude_line(n) for n in range(200)]
    source = write_jsonl(tmp_path / "work.jsonl", lines)
    config = write_config(tmp_path, slow_emulator, daemon={"graceful_timeout": 5})
    notify = NotifySocket(tmp_path / "notify.sock")
    daemon = DaemonProcess(config, tmp_path / "daemon.log", env={"NOTIFY_SOCKET": str(notify.path)})
    try:
        daemon.start()
        await wait_until(lambda: notify.seen("READY=1"), timeout=30)
        await submit_cli(source, config)

        async def both_submitted() -> bool:
            stats = await emulator_stats(slow_emulator)
            return bool(stats["openai"]["batches_created"] == 1 and stats["anthropic"]["batches_created"] == 1)

        await wait_until(both_submitted, timeout=30)
        await wait_until(lambda: sum(e.get("event") == "batch.submitted" for e in daemon.log_events()) == 2)
        live = await batchd_cli("status", "--watch", "--count", "1", "--config", str(config))
        assert "msgbatch_" in live.stdout and "batch_" in live.stdout and "/300" in live.stdout
        stopped_at = time.monotonic()
        status = await daemon.stop(timeout=30)
        assert status == -signal.SIGTERM
        assert time.monotonic() - stopped_at < 5 + 2
        assert notify.seen("STOPPING=1")
        results_path = tmp_path / "spool" / "out" / "work.results.jsonl"
        assert not results_path.exists()

        daemon.start()
        await wait_for_file(results_path, timeout=60, daemon=daemon)
    finally:
        await daemon.stop()
        notify.close()
    results = read_results(results_path)
    assert len(results) == len(lines) and {r["status"] for r in results} == {"succeeded"}
    stats = await emulator_stats(slow_emulator)
    assert stats["openai"]["batches_created"] == 1 and stats["anthropic"]["batches_created"] == 1
    assert all(len(b) == 1 for b in stats["openai"]["custom_ids"].values())
    assert all(len(b) == 1 for b in stats["anthropic"]["custom_ids"].values())
