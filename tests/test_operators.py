"""What operators see: cost report against the emulator's own usage, the webhook sink, parking."""

from __future__ import annotations

import asyncio
import io
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson
import pytest
import structlog
from aiohttp import web

from batchd.daemon import Daemon
from batchd.emulator import RunningEmulator
from batchd.logs import configure_logging, get_logger
from batchd.pricing import ModelPrice
from batchd.report import build_report, estimate_file
from batchd.settings import Settings, WebhookSink
from batchd.sinks.webhook import SIGNATURE_HEADER, TIMESTAMP_HEADER, sign, verify
from batchd.spool import SpoolPaths, submit
from batchd.status import existing_store

from .conftest import make_settings, wait_until
from .harness import DaemonProcess, write_config
from .test_acceptance import chat_line, claude_line

SECRET = "whsec-test-0123456789abcdef"


class RunningDaemon:
    """A Daemon in this process, as a task."""

    def __init__(self, settings: Settings) -> None:
        self.daemon = Daemon(settings)
        self.task = asyncio.create_task(self.daemon.run())

    async def stop(self) -> int:
        self.daemon.request_stop("test")
        return await asyncio.wait_for(self.task, timeout=30)


def drop(settings: Settings, name: str, lines: list[Any]) -> Path:
    SpoolPaths(settings.daemon.spool_dir).create()
    submit(lines, name=name, spool_dir=settings.daemon.spool_dir)
    return settings.daemon.spool_dir / "out" / f"{name}.results.jsonl"


async def test_report_is_emulator_tokens_times_configured_prices(tmp_path: Path, emulator: RunningEmulator) -> None:
    settings = make_settings(tmp_path, emulator)
    settings.prices = {
        "gpt-4o-mini": ModelPrice(input=1.5, cached_input=0.5, output=7.0),
        "claude-haiku-4-5": ModelPrice(input=3.0, output=11.0),
    }
    settings.providers["anthropic"].batch_discount = 0.4
    lines = [chat_line(n) for n in range(30)] + [claude_line(n) for n in range(20)]
    lines += [chat_line(100 + n, model="my-own-finetune") for n in range(5)]
    results_path = drop(settings, "priced", lines)
    running = RunningDaemon(settings)
    try:
        await wait_until(results_path.exists, timeout=60)
    finally:
        await running.stop()
    results = [orjson.loads(line) for line in results_path.read_bytes().splitlines()]
    assert len(results) == len(lines)

    # Expected, from the provider bodies themselves and the configured prices.
    expected: dict[str, list[float]] = {"gpt-4o-mini": [0.0, 0.0], "claude-haiku-4-5": [0.0, 0.0]}
    for result in results:
        usage = result["response"]["usage"]
        if result["model"] == "gpt-4o-mini":
            cached = (usage.get("prompt_tokens_details") or {}).get("cached_tokens") or 0
            realtime = ((usage["prompt_tokens"] - cached) * 1.5 + cached * 0.5 + usage["completion_tokens"] * 7.0) / 1e6
            discount = 0.5
        elif result["model"] == "claude-haiku-4-5":
            all_input = (
                usage["input_tokens"]
                + (usage.get("cache_read_input_tokens") or 0)
                + (usage.get("cache_creation_input_tokens") or 0)
            )
            realtime = (all_input * 3.0 + usage["output_tokens"] * 11.0) / 1e6
            discount = 0.4
        else:
            assert result["cost"]["unpriced"] is True and result["cost"]["batch"] is None
            continue
        expected[result["model"]][0] += realtime * discount
        expected[result["model"]][1] += realtime
        assert result["cost"]["realtime"] == pytest.approx(realtime, abs=1e-12)
    report = await build_report(settings, 3600, "model")
    assert report is not None
    rows = {row["key"]: row for row in report["rows"]}
    for model, (batch, realtime) in expected.items():
        assert rows[model]["cost_batch"] == pytest.approx(batch, abs=1e-9)
        assert rows[model]["cost_realtime"] == pytest.approx(realtime, abs=1e-9)
        assert rows[model]["saving"] == pytest.approx(realtime - batch, abs=1e-9)
        assert batch > 0
    assert rows["my-own-finetune"]["cost_batch"] is None and rows["my-own-finetune"]["unpriced"] == 5
    tokens = sum(r["response"]["usage"].get("completion_tokens", 0) for r in results if r["model"] == "gpt-4o-mini")
    assert rows["gpt-4o-mini"]["output_tokens"] == tokens
    by_file = await build_report(settings, 3600, "file")
    assert by_file is not None and [row["key"] for row in by_file["rows"]] == ["priced.jsonl"]


def test_estimate_counts_batches_and_prices(tmp_path: Path) -> None:
    settings = make_settings(tmp_path, None)
    settings.providers["openai"].max_requests = 40
    path = tmp_path / "in.jsonl"
    path.write_bytes(b"".join(orjson.dumps(chat_line(n)) + b"\n" for n in range(100)) + b"garbage\n")
    estimate = estimate_file(settings, path)
    [row] = estimate["rows"]
    assert (row["requests"], row["batches"], row["output_tokens"]) == (100, 3, 800)
    assert row["cost_batch"] == pytest.approx(row["cost_realtime"] / 2)
    assert estimate["invalid_lines"] == 1


@dataclass
class Receiver:
    """A webhook receiver that checks signatures and can be down."""

    up: bool = False
    keys: list[str] = field(default_factory=list)
    custom_ids: list[str] = field(default_factory=list)
    bad_signatures: int = 0
    refused: int = 0

    async def handle(self, request: web.Request) -> web.Response:
        body = await request.read()
        if not verify(SECRET, request.headers[TIMESTAMP_HEADER], body, request.headers[SIGNATURE_HEADER]):
            self.bad_signatures += 1
            return web.Response(status=401)
        if not self.up:
            self.refused += 1
            return web.Response(status=503)
        for item in orjson.loads(body)["results"]:
            self.keys.append(item["idempotency_key"])
            self.custom_ids.append(item["result"]["custom_id"])
        return web.Response(status=204)


@pytest.fixture
async def receiver() -> AsyncIterator[tuple[Receiver, str]]:
    state = Receiver()
    app = web.Application()
    app.router.add_post("/hook", state.handle)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    try:
        yield state, f"http://127.0.0.1:{port}/hook"
    finally:
        await runner.cleanup()


async def test_webhook_survives_a_down_receiver_and_a_restart(
    tmp_path: Path, emulator: RunningEmulator, receiver: tuple[Receiver, str]
) -> None:
    state, url = receiver
    settings = make_settings(tmp_path, emulator)
    settings.sinks = [WebhookSink(name="crm", url=url, secret_env="TEST_WEBHOOK_SECRET", batch_size=7)]
    lines = [chat_line(n) for n in range(40)] + [claude_line(n) for n in range(25)]
    results_path = drop(settings, "hooked", lines)
    with pytest.MonkeyPatch.context() as env:
        env.setenv("TEST_WEBHOOK_SECRET", SECRET)
        running = RunningDaemon(settings)
        await wait_until(results_path.exists, timeout=60)
        await wait_until(lambda: state.refused >= 2, timeout=30)
        await running.stop()
        assert state.keys == []

        state.up = True
        running = RunningDaemon(settings)
        try:
            await wait_until(lambda: len(set(state.keys)) == len(lines), timeout=60)
        finally:
            await running.stop()
    assert len(state.keys) == len(set(state.keys)) == len(lines)
    assert sorted(state.custom_ids) == sorted(line["custom_id"] for line in lines)
    assert state.bad_signatures == 0


async def test_results_failing_past_max_age_are_parked_then_redelivered(
    tmp_path: Path, emulator: RunningEmulator, receiver: tuple[Receiver, str]
) -> None:
    state, url = receiver
    settings = make_settings(tmp_path, emulator)
    settings.sinks = [WebhookSink(name="crm", url=url, secret=SECRET, max_age=0)]
    results_path = drop(settings, "parked", [chat_line(n) for n in range(10)])
    running = RunningDaemon(settings)
    try:
        await wait_until(results_path.exists, timeout=60)
        store = running.daemon.store

        async def parked() -> bool:
            snapshot = await store.status()
            return any(s["sink"] == "crm" and s["parked"] == 10 for s in snapshot["sinks"])

        await wait_until(parked, timeout=30)
        assert state.keys == []
        state.up = True
        async with existing_store(settings, writable=True) as other:  # as `batchd redeliver` does
            assert other is not None
            assert await other.request_redelivery("crm") == 10
        await wait_until(lambda: len(state.keys) == 10, timeout=30)

        async def unparked() -> bool:
            snapshot = await store.status()
            return any(s["sink"] == "crm" and s["parked"] == 0 for s in snapshot["sinks"])

        await wait_until(unparked, timeout=30)
    finally:
        await running.stop()
    assert len(set(state.keys)) == 10


def test_signature_detects_tampering() -> None:
    body = b'{"sink":"crm","results":[]}'
    timestamp = str(int(time.time()))
    signature = sign(SECRET, timestamp, body)
    assert verify(SECRET, timestamp, body, signature)
    assert not verify(SECRET, timestamp, body.replace(b"crm", b"evil"), signature)
    assert not verify("another-secret", timestamp, body, signature)
    assert not verify(SECRET, str(int(time.time()) - 3600), body, sign(SECRET, str(int(time.time()) - 3600), body))
    assert not verify(SECRET, timestamp, body, "sha256=" + "0" * 64)


# -- secrets in tracebacks ---------------------------------------------------------------------

CONFIGURED = "plain-config-secret-0123456789"  # shaped like no known key: only configuration names it


def _raise_with(message: str) -> BaseException:
    try:
        raise RuntimeError(message)
    except RuntimeError as exc:
        return exc


@pytest.mark.parametrize("log_format", ["json", "console"])
def test_a_secret_inside_a_traceback_is_redacted(log_format: str) -> None:
    out = io.StringIO()
    configure_logging(log_format, "info", stream=out, secrets=[CONFIGURED])
    try:
        error = _raise_with(f"GET http://127.0.0.1:{CONFIGURED}/v1 failed; key sk-live-abcdefghijklmnop")
        get_logger("batchd.test").error("test.failed", error="see traceback", exc_info=error)
        nested = _raise_with(f"outer, caused by {CONFIGURED}")
        nested.__cause__ = _raise_with(f"inner {CONFIGURED}")
        get_logger("batchd.test").error("test.nested", exc_info=nested)
    finally:
        structlog.reset_defaults()
    text = out.getvalue()
    assert "Traceback" in text and "RuntimeError" in text  # the traceback itself is kept
    assert CONFIGURED not in text and "sk-live-abcdefghijklmnop" not in text
    assert "[redacted]" in text


async def test_a_key_inside_a_daemon_exception_never_reaches_the_log(tmp_path: Path, emulator: RunningEmulator) -> None:
    """A key pasted into base_url's port: the SDK's URL error carries it into a logged traceback."""
    key = "embedded-key-0123456789abcdef"
    config = write_config(
        tmp_path,
        emulator,
        providers__openai={"kind": "openai", "base_url": f"http://127.0.0.1:{key}/v1", "api_key_env": "LEAKY_KEY"},
    )
    (tmp_path / "spool" / "new").mkdir(parents=True)
    (tmp_path / "spool" / "new" / "one.jsonl").write_bytes(orjson.dumps(chat_line(1)) + b"\n")
    daemon = DaemonProcess(config, tmp_path / "daemon.log", env={"LEAKY_KEY": key})
    daemon.start()
    try:
        assert await daemon.wait(60) != 0
    finally:
        await daemon.kill()
    log = (tmp_path / "daemon.log").read_text()
    died = [event for event in daemon.log_events() if event.get("event") == "daemon.task_died"]
    assert died and "Traceback" in died[0]["exception"], log[-2000:]
    assert key not in log
    assert "[redacted]" in died[0]["exception"]
