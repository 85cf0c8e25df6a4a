"""Provider faults, secrets, the watchdog and bad configs: the daemon against a misbehaving emulator.

Real parts over real sockets: the official SDKs inside batchd talk HTTP to the emulator on
loopback. Faults are switched on at start (`Faults(...)`) or at run time (PUT /_emulator/faults).
The daemon runs in-process (`Daemon(...).run()` as a task) where a knob such as `hold_base` is
needed or speed matters, and as `python -m batchd run` where logs, exit codes or the CLI matter.
"""

from __future__ import annotations

import ast
import asyncio
import os
import sqlite3
import subprocess
import sys
import time
from collections import Counter
from collections.abc import AsyncIterator, Iterable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import aiohttp
import anthropic
import openai
import orjson
import pytest

from batchd.daemon import Daemon
from batchd.emulator import EmulatorConfig, Faults, RunningEmulator, start_emulator
from batchd.emulator.responses import digest
from batchd.settings import Settings
from batchd.spool import submit
from batchd.status import snapshot

from .conftest import make_settings, wait_until
from .harness import (
    ANTHROPIC_KEY,
    OPENAI_KEY,
    DaemonProcess,
    NotifySocket,
    read_results,
    wait_for_file,
    write_config,
)

# -- request lines ------------------------------------------------------------------------------


def chat_line(n: int, model: str = "gpt-4o-mini", **body: Any) -> dict[str, Any]:
    return {
        "custom_id": f"chat-{n}",
        "method": "POST",
        "url": "/v1/chat/completions",
        "body": {"model": model, "messages": [{"role": "user", "content": f"Classify ticket {n}"}], **body},
    }


def embedding_line(n: int) -> dict[str, Any]:
    return {
        "custom_id": f"embed-{n}",
        "method": "POST",
        "url": "/v1/embeddings",
        "body": {"model": "text-embedding-3-small", "input": f"ticket {n}"},
    }


def claude_line(n: int, **params: Any) -> dict[str, Any]:
    line: dict[str, Any] = {
        "custom_id": f"claude-{n}",
        "params": {
            "model": "claude-haiku-4-5",
            "max_tokens": 8,
            "messages": [{"role": "user", "content": f"Summarise ticket {n}"}],
        },
    }
    line["params"].update(params)
    return line


def drop(settings_or_spool: Settings | Path, name: str, lines: Iterable[Any]) -> Path:
    """Queue `lines` as spool/new/NAME.jsonl the way producers do (tmp, fsync, rename)."""
    spool = settings_or_spool.daemon.spool_dir if isinstance(settings_or_spool, Settings) else settings_or_spool
    return submit(list(lines), name=name, spool_dir=spool)


def out_path(spool: Path, name: str) -> Path:
    return spool / "out" / f"{name}.results.jsonl"


# -- the emulator -------------------------------------------------------------------------------


@asynccontextmanager
async def emulator_with(
    faults: Faults | None = None, processing_seconds: float = 0.2, **config: Any
) -> AsyncIterator[RunningEmulator]:
    running = await start_emulator(
        EmulatorConfig(processing_seconds=processing_seconds, faults=faults or Faults(), **config)
    )
    try:
        yield running
    finally:
        await running.close()


async def admin(emu: RunningEmulator, method: str, path: str, body: Any = None) -> Any:
    """Call an /_emulator/ endpoint over HTTP; fails the test on a non-200 answer."""
    async with (
        aiohttp.ClientSession() as session,
        session.request(method, emu.url + path, data=None if body is None else orjson.dumps(body)) as response,
    ):
        data = orjson.loads(await response.read())
        assert response.status == 200, data
        return data


async def emulator_stats(emu: RunningEmulator) -> dict[str, Any]:
    data: dict[str, Any] = await admin(emu, "GET", "/_emulator/stats")
    return data


def all_custom_ids(stats: dict[str, Any]) -> dict[str, list[str]]:
    """Provider custom_id → the remote batches it was sent in, both vendors."""
    return {**stats["openai"]["custom_ids"], **stats["anthropic"]["custom_ids"]}


@asynccontextmanager
async def sdk_clients(emu: RunningEmulator) -> AsyncIterator[tuple[openai.AsyncOpenAI, anthropic.AsyncAnthropic]]:
    """The official SDKs pointed at the emulator, for looking at what the daemon left there."""
    oai = openai.AsyncOpenAI(base_url=emu.openai_base_url, api_key="sk-test", max_retries=5)
    ant = anthropic.AsyncAnthropic(base_url=emu.anthropic_base_url, api_key="sk-ant-test", max_retries=5)
    try:
        yield oai, ant
    finally:
        await oai.close()
        await ant.close()


async def unsucceeded_by_batch(emu: RunningEmulator) -> dict[str, set[str]]:
    """Remote batch id → the custom_ids it did not answer with a success, read through the SDKs.

    Switches the emulator's faults off first: the test is over, the inspection must not be faulted.
    """
    await admin(emu, "POST", "/_emulator/reset")
    members: dict[str, set[str]] = {}
    for custom_id, batches in all_custom_ids(await emulator_stats(emu)).items():
        for batch_id in batches:
            members.setdefault(batch_id, set()).add(custom_id)
    failed: dict[str, set[str]] = {}
    async with sdk_clients(emu) as (oai, ant):
        async for batch in oai.batches.list(limit=100):
            if batch.status in ("failed", "cancelled"):
                failed[batch.id] = set(members.get(batch.id, ()))
                continue
            bad: set[str] = set()
            if batch.error_file_id:
                content = await oai.files.content(batch.error_file_id)
                bad = {orjson.loads(raw)["custom_id"] for raw in content.content.splitlines()}
            failed[batch.id] = bad
        async for message_batch in ant.messages.batches.list(limit=100):
            failed[message_batch.id] = {
                entry.custom_id
                async for entry in await ant.messages.batches.results(message_batch.id)
                if entry.result.type != "succeeded"
            }
    assert set(members) <= set(failed)
    return failed


async def assert_resent_only_after_failure(emu: RunningEmulator) -> int:
    """Every custom_id sent in more than one batch failed in each earlier one; returns how many were re-sent."""
    failed = await unsucceeded_by_batch(emu)
    resent = 0
    for custom_id, batches in all_custom_ids(await emulator_stats(emu)).items():
        assert len(set(batches)) == len(batches), f"{custom_id} listed twice in one batch: {batches}"
        for earlier in batches[:-1]:
            assert custom_id in failed[earlier], f"{custom_id} re-sent after succeeding in {earlier}"
        resent += len(batches) > 1
    return resent


# -- the daemon ---------------------------------------------------------------------------------


@asynccontextmanager
async def daemon_in_process(settings: Settings, **options: Any) -> AsyncIterator[tuple[Daemon, asyncio.Task[int]]]:
    daemon = Daemon(settings, **options)
    task = asyncio.create_task(daemon.run(), name="daemon-under-test")
    try:
        yield daemon, task
    finally:
        daemon.request_stop("test over")
        status = await asyncio.wait_for(task, 30)
        assert status == 0


async def wait_results(path: Path, task: asyncio.Task[int], timeout: float = 60) -> list[dict[str, Any]]:
    """The complete results file, once it appears; fails early if the in-process daemon died."""

    def ready() -> bool:
        if task.done():
            raise AssertionError(f"daemon stopped early: {task.result() if not task.exception() else task.exception()}")
        return path.exists()

    await wait_until(ready, timeout=timeout)
    return read_results(path)


def assert_one_result_per_line(results: list[dict[str, Any]], lines: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Exactly one result per input line, matched by line number and custom_id; returns them by custom_id."""
    assert len(results) == len(lines)
    assert sorted(r["line"] for r in results) == list(range(1, len(lines) + 1))
    by_line = {r["line"]: r for r in results}
    for number, line in enumerate(lines, 1):
        assert by_line[number]["custom_id"] == line["custom_id"]
    return {r["custom_id"]: r for r in results}


def expected_response_id(line: dict[str, Any]) -> str:
    """The emulator's deterministic id for the answer to this request (a pure function of the body)."""
    if "params" in line:
        return f"msg_{digest(line['params']).hex()[:24]}"
    return f"chatcmpl-{digest(line['body']).hex()[:24]}"


async def run_cli(*args: str, env: dict[str, str] | None = None, timeout: float = 60) -> tuple[int, bytes, bytes]:
    """`python -m batchd ARGS`: (exit status, stdout, stderr)."""
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "batchd",
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env=env,
    )
    stdout, stderr = await asyncio.wait_for(process.communicate(), timeout)
    assert process.returncode is not None
    return process.returncode, stdout, stderr


# -- 1. provider faults -------------------------------------------------------------------------


async def test_http_errors_on_every_path_still_give_one_success_per_line_and_no_double_billing(
    tmp_path: Path,
) -> None:
    faults = Faults(seed=7, http_error_rate=0.3, http_error_statuses=(429, 500, 529))
    lines = [chat_line(n) for n in range(150)] + [embedding_line(n) for n in range(50)]
    lines += [claude_line(n) for n in range(100)]
    async with emulator_with(faults) as emu:
        config = write_config(tmp_path, emu, batching={"max_wait": 0.5})
        daemon = DaemonProcess(config, tmp_path / "daemon.log").start()
        try:
            drop(tmp_path / "spool", "flaky.jsonl", lines)
            results_path = out_path(tmp_path / "spool", "flaky")
            await wait_for_file(results_path, timeout=90, daemon=daemon)
            # The last result can land before its batch's collection is logged (the input file is
            # deleted in between, through the same faults).
            await wait_until(lambda: sum(e.get("event") == "batch.collected" for e in daemon.log_events()) == 3)
        finally:
            await daemon.stop()
        stats = await emulator_stats(emu)
    by_id = assert_one_result_per_line(read_results(results_path), lines)
    assert Counter(r["status"] for r in by_id.values()) == {"succeeded": len(lines)}
    # How many calls the daemon makes depends on timing (polls, retries), so the number of injected
    # errors is a binomial draw: CI once saw 9 of about 40. The check is that faults did fire, often.
    injected = stats["faults_injected"]["http_errors"]
    assert injected >= 3 and injected >= 0.1 * stats["http_calls"], (injected, stats["http_calls"])
    ids = all_custom_ids(stats)
    assert len(ids) == len(lines)
    assert all(len(batches) == 1 for batches in ids.values()), "a request was sent in two batches"
    # One chat batch, one embeddings batch, one Anthropic batch: errors never created a second one.
    assert stats["openai"]["batches_created"] == 2
    assert stats["anthropic"]["batches_created"] == 1
    events = Counter(e.get("event") for e in daemon.log_events())
    assert events["batch.submitted"] == 3 and events["batch.collected"] == 3


async def test_request_errors_inside_a_batch_are_retried_and_only_failed_requests_are_resent(tmp_path: Path) -> None:
    lines = [chat_line(n) for n in range(60)] + [claude_line(n) for n in range(60)]
    async with emulator_with(Faults(seed=11, request_error_rate=0.3)) as emu:
        # 0.3 ** 10 per request: a request failing every attempt is out of the question.
        settings = make_settings(tmp_path, emu, max_attempts=10)
        async with daemon_in_process(settings) as (_daemon, task):
            drop(settings, "retry.jsonl", lines)
            results = await wait_results(out_path(settings.daemon.spool_dir, "retry"), task)
        by_id = assert_one_result_per_line(results, lines)
        assert Counter(r["status"] for r in by_id.values()) == {"succeeded": len(lines)}
        stats = await emulator_stats(emu)
        assert stats["faults_injected"]["request_errors"] > 0
        resent = await assert_resent_only_after_failure(emu)
        # Every failed request was re-sent exactly once more, and nothing else was.
        assert resent > 0
        extra_sends = sum(len(b) - 1 for b in all_custom_ids(stats).values())
        assert extra_sends == sum(len(failed) for failed in (await unsucceeded_by_batch(emu)).values())
        assert extra_sends == stats["faults_injected"]["request_errors"]
        # The answer kept is the one from the last batch the request went to.
        remote_of = all_custom_ids(stats)
        last_batches = {batches[-1] for batches in remote_of.values()}
        assert {r["batch_id"] for r in by_id.values()} <= last_batches


async def test_with_one_attempt_every_request_error_is_final_and_carries_the_providers_error(tmp_path: Path) -> None:
    lines = [chat_line(n) for n in range(10)] + [claude_line(n) for n in range(10)]
    async with emulator_with(Faults(request_error_rate=1.0)) as emu:
        settings = make_settings(tmp_path, emu, max_attempts=1)
        async with daemon_in_process(settings) as (_daemon, task):
            drop(settings, "doomed.jsonl", lines)
            results = await wait_results(out_path(settings.daemon.spool_dir, "doomed"), task)
        stats = await emulator_stats(emu)
    by_id = assert_one_result_per_line(results, lines)
    assert Counter(r["status"] for r in by_id.values()) == {"errored": len(lines)}
    for n in range(10):
        chat = by_id[f"chat-{n}"]
        assert chat["response"] is None and chat["provider"] == "openai"
        assert chat["error"]["status_code"] == 500
        assert chat["error"]["type"] == "server_error"
        assert chat["error"]["message"].startswith("The server had an error while processing your request")
        claude = by_id[f"claude-{n}"]
        assert claude["response"] is None and claude["provider"] == "anthropic"
        assert claude["error"]["type"] == "error"
        assert claude["error"]["error"] == {"type": "api_error", "message": "Internal server error"}
        assert claude["error"]["request_id"].startswith("req_")
    assert all(len(b) == 1 for b in all_custom_ids(stats).values()), "max_attempts=1 sent a request twice"


async def test_dropped_downloads_are_fetched_again_without_duplicate_results(tmp_path: Path) -> None:
    lines = [chat_line(n) for n in range(100)] + [claude_line(n) for n in range(100)]
    async with emulator_with(Faults(seed=3, drop_download_rate=0.5)) as emu:
        settings = make_settings(tmp_path, emu, max_attempts=1)
        async with daemon_in_process(settings) as (_daemon, task):
            drop(settings, "dropped.jsonl", lines)
            results = await wait_results(out_path(settings.daemon.spool_dir, "dropped"), task)
        stats = await emulator_stats(emu)
    by_id = assert_one_result_per_line(results, lines)
    assert Counter(r["status"] for r in by_id.values()) == {"succeeded": len(lines)}
    assert stats["faults_injected"]["dropped_downloads"] > 0
    assert all(len(b) == 1 for b in all_custom_ids(stats).values())
    for line in lines:
        assert by_id[line["custom_id"]]["response"]["id"] == expected_response_id(line)


async def test_shuffled_result_files_still_map_each_answer_to_its_own_request(tmp_path: Path) -> None:
    lines: list[dict[str, Any]] = [chat_line(n) for n in range(80)] + [claude_line(n) for n in range(80)]
    # Some per-request errors too, so the error file and the errored Anthropic lines are shuffled as well.
    lines += [chat_line(1000 + n, max_tokens=0) for n in range(5)]
    lines += [{"custom_id": f"no-max-{n}", "params": {"model": "claude-haiku-4-5", "messages": []}} for n in range(5)]
    async with emulator_with(Faults(seed=5, shuffle_results=True)) as emu:
        settings = make_settings(tmp_path, emu)
        async with daemon_in_process(settings) as (_daemon, task):
            drop(settings, "shuffled.jsonl", lines)
            results = await wait_results(out_path(settings.daemon.spool_dir, "shuffled"), task)
    by_id = assert_one_result_per_line(results, lines)
    for line in lines[:160]:
        result = by_id[line["custom_id"]]
        assert result["status"] == "succeeded"
        assert result["response"]["id"] == expected_response_id(line)
    for n in range(5):
        assert by_id[f"chat-{1000 + n}"]["status"] == "errored"
        assert by_id[f"chat-{1000 + n}"]["error"]["param"] == "max_tokens"
        assert by_id[f"no-max-{n}"]["status"] == "errored"
        assert by_id[f"no-max-{n}"]["error"]["error"]["message"] == "max_tokens: Field required"


async def test_a_late_output_file_is_polled_again_instead_of_losing_the_batch(tmp_path: Path) -> None:
    lines = [chat_line(n) for n in range(30)] + [chat_line(100, max_tokens=0)]
    async with emulator_with(Faults(late_output_file=True)) as emu:
        # One attempt: a batch taken for empty would leave every request errored.
        settings = make_settings(tmp_path, emu, max_attempts=1)
        async with daemon_in_process(settings) as (_daemon, task):
            drop(settings, "late.jsonl", lines)
            results = await wait_results(out_path(settings.daemon.spool_dir, "late"), task)
        stats = await emulator_stats(emu)
    by_id = assert_one_result_per_line(results, lines)
    assert stats["faults_injected"]["late_output_files"] == 1
    assert stats["openai"]["batches_created"] == 1
    for line in lines[:30]:
        assert by_id[line["custom_id"]]["status"] == "succeeded"
        assert by_id[line["custom_id"]]["response"]["id"] == expected_response_id(line)
    bad = by_id["chat-100"]
    assert bad["status"] == "errored" and bad["error"]["status_code"] == 400


async def test_token_limit_holds_the_model_without_burning_attempts_until_the_limit_is_lifted(
    tmp_path: Path,
) -> None:
    limited = [chat_line(n) for n in range(20)]
    free = [chat_line(100 + n, model="gpt-4o") for n in range(20)]
    async with emulator_with(Faults(token_limits={"gpt-4o-mini": 10})) as emu:
        settings = make_settings(tmp_path, emu, max_attempts=1)
        async with daemon_in_process(settings, hold_base=1.0) as (_daemon, task):
            drop(settings, "limited.jsonl", limited)
            drop(settings, "free.jsonl", free)
            spool = settings.daemon.spool_dir

            async def held() -> list[dict[str, Any]]:
                # What `batchd status` shows, read through its own connection.
                snap = await snapshot(settings)
                return snap["holds"] if snap else []

            holds = await wait_until(held, timeout=30, interval=0.02)
            assert [(h["profile"], h["model"], h["reason"]) for h in holds] == [
                ("openai", "gpt-4o-mini", "token_limit_exceeded")
            ]
            # Another model of the same provider is not held back.
            free_results = await wait_results(out_path(spool, "free"), task)
            assert {r["status"] for r in free_results} == {"succeeded"}
            assert not out_path(spool, "limited").exists()

            await admin(emu, "PUT", "/_emulator/faults", {"token_limits": {}})
            results = await wait_results(out_path(spool, "limited"), task)
            status = await snapshot(settings)
            assert status is not None
        resent = await assert_resent_only_after_failure(emu)
        async with sdk_clients(emu) as (oai, _ant):
            failed = [b async for b in oai.batches.list(limit=100) if b.status == "failed"]
    by_id = assert_one_result_per_line(results, limited)
    assert Counter(r["status"] for r in by_id.values()) == {"succeeded": len(limited)}
    assert failed and all(b.errors and b.errors.data[0].code == "token_limit_exceeded" for b in failed)
    assert {r["batch_id"] for r in by_id.values()}.isdisjoint({b.id for b in failed})
    assert status["holds"] == [] and "batch.held" in {e["event"] for e in status["errors"]}
    # Only the requests of the refused batches were sent again.
    assert resent == len(limited)


async def test_forced_expiry_keeps_the_finished_half_and_resends_only_the_expired_half(tmp_path: Path) -> None:
    chats = [chat_line(n) for n in range(40)]
    claudes = [claude_line(n) for n in range(40)]
    async with emulator_with(processing_seconds=30) as emu:
        settings = make_settings(tmp_path, emu)
        async with daemon_in_process(settings) as (_daemon, task):
            drop(settings, "chats.jsonl", chats)
            drop(settings, "claudes.jsonl", claudes)

            async def both_running() -> bool:
                stats = await emulator_stats(emu)
                return bool(stats["openai"]["batches_created"] == 1 and stats["anthropic"]["batches_created"] == 1)

            await wait_until(both_running, timeout=30)
            running = await emulator_stats(emu)
            (first_openai,) = {b for batches in running["openai"]["custom_ids"].values() for b in batches}
            (first_anthropic,) = {b for batches in running["anthropic"]["custom_ids"].values() for b in batches}
            for remote_id in (first_openai, first_anthropic):
                await admin(emu, "POST", f"/_emulator/batches/{remote_id}/expire", {"completed_fraction": 0.5})
            await admin(emu, "PUT", "/_emulator/config", {"processing_seconds": 0.2})
            spool = settings.daemon.spool_dir
            chat_results = await wait_results(out_path(spool, "chats"), task)
            claude_results = await wait_results(out_path(spool, "claudes"), task)
        stats = await emulator_stats(emu)
        await assert_resent_only_after_failure(emu)
        async with sdk_clients(emu) as (oai, ant):
            expired_openai = await oai.batches.retrieve(first_openai)
            expired_anthropic = await ant.messages.batches.retrieve(first_anthropic)
    assert expired_openai.status == "expired"
    assert expired_openai.request_counts is not None and expired_openai.request_counts.failed == 20
    assert expired_anthropic.request_counts.expired == 20 and expired_anthropic.request_counts.succeeded == 20
    assert stats["openai"]["batches_created"] == 2 and stats["anthropic"]["batches_created"] == 2
    sent_in = Counter(len(b) for b in all_custom_ids(stats).values())
    assert sent_in == {1: 40, 2: 40}
    for lines, results, first in ((chats, chat_results, first_openai), (claudes, claude_results, first_anthropic)):
        by_id = assert_one_result_per_line(results, lines)
        assert {r["status"] for r in results} == {"succeeded"}
        finished = [by_id[line["custom_id"]]["batch_id"] for line in lines[:20]]
        resent = [by_id[line["custom_id"]]["batch_id"] for line in lines[20:]]
        assert set(finished) == {first}
        assert len(set(resent)) == 1 and resent[0] != first


async def test_requests_the_provider_rejects_are_errored_on_the_first_attempt_and_not_retried(tmp_path: Path) -> None:
    lines: list[dict[str, Any]] = [chat_line(n) for n in range(5)]
    lines += [chat_line(10 + n, max_tokens=0) for n in range(5)]
    lines += [claude_line(n) for n in range(5)]
    lines += [
        {
            "custom_id": f"claude-{10 + n}",
            "params": {"model": "claude-haiku-4-5", "messages": [{"role": "user", "content": f"no max_tokens {n}"}]},
        }
        for n in range(5)
    ]
    async with emulator_with() as emu:
        settings = make_settings(tmp_path, emu, max_attempts=3)
        async with daemon_in_process(settings) as (_daemon, task):
            drop(settings, "rejects.jsonl", lines)
            results = await wait_results(out_path(settings.daemon.spool_dir, "rejects"), task)
        stats = await emulator_stats(emu)
    by_id = assert_one_result_per_line(results, lines)
    for n in range(5):
        assert by_id[f"chat-{n}"]["status"] == "succeeded"
        assert by_id[f"claude-{n}"]["status"] == "succeeded"
        chat = by_id[f"chat-{10 + n}"]
        assert chat["status"] == "errored" and chat["response"] is None
        assert chat["error"] == {
            "status_code": 400,
            "message": "Invalid 'max_tokens': integer below minimum value. Expected a value >= 1, but got 0 instead.",
            "type": "invalid_request_error",
            "param": "max_tokens",
            "code": "integer_below_min_value",
        }
        claude = by_id[f"claude-{10 + n}"]
        assert claude["status"] == "errored" and claude["response"] is None
        assert claude["error"]["error"] == {"type": "invalid_request_error", "message": "max_tokens: Field required"}
    assert stats["openai"]["batches_created"] == 1 and stats["anthropic"]["batches_created"] == 1
    assert all(len(b) == 1 for b in all_custom_ids(stats).values()), "a rejected request was retried"


# -- 4. watchdog --------------------------------------------------------------------------------


@pytest.mark.slow
async def test_watchdog_keeps_beating_while_a_large_file_is_ingested(tmp_path: Path) -> None:
    count = 300_000
    source = tmp_path / "huge.jsonl"
    with source.open("wb") as out:
        for n in range(count):
            out.write(b'{"custom_id":"e%d","method":"POST","url":"/v1/embeddings",' % n)
            out.write(b'"body":{"model":"text-embedding-3-small","input":"t%d"}}\n' % n)
    async with emulator_with() as emu:
        # Nothing should be flushed while we watch: the batches are not the point here.
        config = write_config(tmp_path, emu, batching={"max_wait": 3600})
        notify = NotifySocket(tmp_path / "notify.sock")
        daemon = DaemonProcess(
            config,
            tmp_path / "daemon.log",
            env={"NOTIFY_SOCKET": str(notify.path), "WATCHDOG_USEC": "200000"},
        )
        daemon.env.pop("WATCHDOG_PID", None)
        try:
            daemon.start()
            await wait_until(lambda: notify.seen("READY=1"), timeout=30)
            await wait_until(lambda: notify.seen("WATCHDOG=1"), timeout=10)
            spool = tmp_path / "spool"
            notify.messages.clear()
            notify.drain()
            os.rename(source, spool / "new" / "huge.jsonl")
            started = time.monotonic()
            beats: list[float] = []

            def ingested() -> bool:
                for message in notify.drain():
                    if "WATCHDOG=1" in message:
                        beats.append(time.monotonic())
                notify.messages.clear()
                return (spool / "done" / "huge.jsonl").exists()

            await wait_until(ingested, timeout=120, interval=0.02)
            window = time.monotonic() - started
        finally:
            await daemon.stop()
            notify.close()
    events = [e for e in daemon.log_events() if e.get("event") == "spool.ingested"]
    assert events and events[0]["lines"] == count and events[0]["queued"] == count
    # WatchdogSec=0.2 s asks for a beat every 0.1 s; allow a loaded CI machine a wide margin.
    assert window > 1.0, f"ingest took only {window:.2f} s: make the file bigger"
    assert len(beats) >= max(5, int(window / 0.1 / 4)), (len(beats), window)
    gaps = [b - a for a, b in zip([started, *beats], beats, strict=False)]
    assert max(gaps) < 1.0, f"the event loop went {max(gaps):.2f} s without a WATCHDOG=1"


def test_the_sdks_are_imported_at_start_up_not_on_the_event_loop_at_first_use() -> None:
    # Made on first use, the first batch's adapter imported its SDK on the event loop: 0.9 s without
    # a WATCHDOG=1 in the test above, in the middle of an ingest. The daemon now prepares them before
    # READY; a profile without a key is left for when it is used (MissingAPIKey says so then).
    script = (
        "import sys; from pydantic import SecretStr; from batchd.settings import ProviderProfile;"
        " from batchd.providers import ProviderPool;"
        " pool = ProviderPool({'o': ProviderProfile(kind='openai', api_key=SecretStr('sk-x')),"
        " 'a': ProviderProfile(kind='anthropic', api_key_env='BATCHD_TEST_NO_SUCH_KEY')});"
        " before = {m for m in ('openai', 'anthropic') if m in sys.modules}; pool.prepare();"
        " after = sorted(m for m in ('openai', 'anthropic') if m in sys.modules);"
        " print(repr((sorted(before), after, sorted(pool._made))))"
    )
    env = {k: v for k, v in os.environ.items() if k != "BATCHD_TEST_NO_SUCH_KEY"}
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=60)
    assert done.returncode == 0, done.stderr
    assert ast.literal_eval(done.stdout) == ([], ["openai"], ["o"])


# -- 5. secrets ---------------------------------------------------------------------------------

WRONG_KEY = "sk-wrong-secret-key-9876543210"
WEBHOOK_SECRET = "whsec-test-secret-5555555555"


async def test_api_keys_never_reach_logs_database_status_or_results(tmp_path: Path) -> None:
    faults = Faults(seed=13, http_error_rate=0.2, request_error_rate=0.3)
    lines: list[Any] = [chat_line(n) for n in range(40)] + [claude_line(n) for n in range(40)]
    lines += [chat_line(100, max_tokens=0), {"custom_id": "broken", "prompt": "no shape"}]
    async with emulator_with(faults, api_keys=frozenset({OPENAI_KEY, ANTHROPIC_KEY})) as emu:
        config = write_config(
            tmp_path,
            emu,
            daemon={"log_level": "debug"},
            batching={"max_wait": 0.5, "max_attempts": 2},
            **{"providers.wrongkey": {"kind": "openai", "base_url": emu.openai_base_url, "api_key": WRONG_KEY}},
        )
        with config.open("a") as handle:
            handle.write('\n[[routes]]\nmodel = "gpt-wrong-*"\nprovider = "wrongkey"\n')
            # A webhook whose receiver is down: its errors are logged and shown, its secret never.
            handle.write(f'\n[[sinks]]\nname = "hook"\nurl = "http://127.0.0.1:9/hook"\nsecret = "{WEBHOOK_SECRET}"\n')
        spool = tmp_path / "spool"
        daemon = DaemonProcess(config, tmp_path / "daemon.log").start()
        try:
            drop(spool, "work.jsonl", lines)
            drop(spool, "refused.jsonl", [chat_line(n, model="gpt-wrong-1") for n in range(3)])
            (spool / "new" / "empty.jsonl").write_bytes(b"")
            await wait_for_file(out_path(spool, "work"), timeout=90, daemon=daemon)

            def refused_by_provider() -> bool:
                return any(
                    e.get("event") == "batch.submit_failed" and "401" in str(e.get("error"))
                    for e in daemon.log_events()
                )

            await wait_until(refused_by_provider, timeout=30)
            await wait_until(lambda: any(e.get("event") == "sink.delivery_failed" for e in daemon.log_events()))
        finally:
            await daemon.stop()
        status_json = await run_cli("status", "--json", "--config", str(config), env=daemon.env)
        status_text = await run_cli("status", "--config", str(config), env={**daemon.env, "COLUMNS": "400"})
    results = read_results(out_path(spool, "work"))
    statuses = Counter(r["status"] for r in results)
    assert statuses["errored"] >= 1 and statuses["invalid"] == 1 and sum(statuses.values()) == len(lines)
    assert status_json[0] == 0 and status_text[0] == 0
    status = orjson.loads(status_json[1])
    assert status["errors"], "the errors were not shown"
    connection = sqlite3.connect(tmp_path / "state" / "batchd.sqlite3")
    try:
        errors = connection.execute("SELECT event, message FROM errors").fetchall()
    finally:
        connection.close()
    assert any(event == "batch.submit_failed" and "401" in message for event, message in errors)
    assert any(event == "sink.delivery_failed" for event, _ in errors)
    places: dict[str, bytes] = {
        "daemon log": (tmp_path / "daemon.log").read_bytes(),
        "status --json": status_json[1] + status_json[2],
        "status": status_text[1] + status_text[2],
    }
    for path in (tmp_path / "state").glob("batchd.sqlite3*"):
        places[str(path)] = path.read_bytes()
    for path in [*(spool / "out").iterdir(), *(spool / "rejected").iterdir()]:
        places[str(path)] = path.read_bytes()
    assert any(name.endswith("empty.jsonl.error.json") for name in places)
    assert len(places["daemon log"]) > 1000
    secrets = (OPENAI_KEY, ANTHROPIC_KEY, WRONG_KEY, WEBHOOK_SECRET, "secret-openai", "ant-test-secret", "wrong-secret")
    for secret in (*secrets, "test-secret-5555"):
        leaks = [name for name, data in places.items() if secret.encode() in data]
        assert not leaks, f"{secret!r} found in {leaks}"


# -- 6. configuration errors --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("body", "key"),
    [
        ('[batching]\nmax_attempts = "lots"\n', "batching.max_attempts"),
        ('[daemon]\nspool_dirr = "/tmp/nowhere"\n', "daemon.spool_dirr"),
        ('[providers.openai]\nkind = "openai"\nmax_in_flight = [1]\n', "providers.openai.max_in_flight"),
    ],
    ids=["wrong-type", "unknown-key", "wrong-type-in-profile"],
)
async def test_a_bad_config_exits_78_naming_the_file_and_the_key(tmp_path: Path, body: str, key: str) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text(body)
    returncode, stdout, stderr = await run_cli("run", "--config", str(bad))
    assert returncode == 78, (stdout, stderr)
    message = stderr.decode()
    assert str(bad) in message and key in message, message
    if "unknown" in body or "dirr" in body:
        assert f"unknown key {key}" in message
    assert not (tmp_path / "state").exists()


# -- the emulator's own bookkeeping -------------------------------------------------------------


async def test_emulator_counts_every_injected_request_error() -> None:
    """The fault tests read faults_injected; concurrent batches must not lose counts (a lost update once did)."""
    body = b"".join(orjson.dumps(chat_line(n)) + b"\n" for n in range(6000))
    async with emulator_with(Faults(request_error_rate=1.0), processing_seconds=0.5) as emu:
        client = openai.AsyncOpenAI(base_url=emu.openai_base_url, api_key="sk-test", max_retries=0)
        try:
            created = []
            for _ in range(4):
                upload = await client.files.create(file=("in.jsonl", body, "application/jsonl"), purpose="batch")
                batch = await client.batches.create(
                    input_file_id=upload.id, endpoint="/v1/chat/completions", completion_window="24h"
                )
                created.append(batch.id)

            async def all_completed() -> list[Any]:
                batches = [await client.batches.retrieve(b) for b in created]
                return batches if all(b.status == "completed" for b in batches) else []

            completed = await wait_until(all_completed, timeout=30)
        finally:
            await client.close()
        failed = sum(b.request_counts.failed for b in completed if b.request_counts)
        stats = await emulator_stats(emu)
    assert failed == 4 * 6000
    assert stats["faults_injected"]["request_errors"] == failed
