"""The daemon's HTTP listener over real sockets: /metrics against what the emulator did, /readyz with
a bad and a corrected key, /healthz on a unix socket, the status page's HTML, and the metrics lease."""

from __future__ import annotations

import asyncio
import signal
import socket
import stat
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import anthropic
import openai
import orjson
import pytest

from batchd.emulator import EmulatorConfig, RunningEmulator, start_emulator
from batchd.metrics import Metrics
from batchd.page import flush_text, render
from batchd.store import open_store

from .conftest import wait_until
from .harness import (
    ANTHROPIC_KEY,
    OPENAI_KEY,
    DaemonProcess,
    http_url,
    metric,
    metric_samples,
    read_results,
    wait_for_file,
    write_config,
)

# Our own prices (USD per million tokens), so the expected spend does not depend on the shipped table.
PRICES = {"gpt-4o-mini": (1.0, 2.0), "claude-haiku-4-5": (3.0, 4.0)}


@pytest.fixture
async def emulator() -> AsyncIterator[RunningEmulator]:
    running = await start_emulator(EmulatorConfig(processing_seconds=0.3))
    try:
        yield running
    finally:
        await running.close()


async def get(url: str, connector: aiohttp.BaseConnector | None = None) -> tuple[int, str]:
    async with aiohttp.ClientSession(connector=connector) as session, session.get(url) as response:
        return response.status, await response.text()


def drop(spool: Path, name: str, lines: list[Any]) -> None:
    tmp = spool / "tmp" / name
    tmp.write_bytes(b"".join((x if isinstance(x, bytes) else orjson.dumps(x)) + b"\n" for x in lines))
    tmp.rename(spool / "new" / name)


def chat(n: int, max_tokens: int = 8) -> dict[str, Any]:
    body = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": f"ticket {n}"}], "max_tokens": max_tokens}
    return {"custom_id": f"chat-{n}", "method": "POST", "url": "/v1/chat/completions", "body": body}


def claude(n: int) -> dict[str, Any]:
    params = {"model": "claude-haiku-4-5", "max_tokens": 8, "messages": [{"role": "user", "content": f"sum {n}"}]}
    return {"custom_id": f"claude-{n}", "params": params}


async def what_the_emulator_did(emulator: RunningEmulator) -> dict[str, Any]:
    """Counts by outcome and tokens per model, read back from the emulator with the official SDKs."""
    did: dict[str, Any] = {"succeeded": 0, "errored": 0, "tokens": {}}
    oai = openai.AsyncOpenAI(base_url=emulator.openai_base_url, api_key="sk-test", max_retries=0)
    ant = anthropic.AsyncAnthropic(base_url=emulator.anthropic_base_url, api_key="sk-ant-test", max_retries=0)
    try:
        for batch in (await oai.batches.list(limit=100)).data:
            for file_id in (batch.output_file_id, batch.error_file_id):
                if file_id is None:
                    continue
                for raw in (await oai.files.content(file_id)).content.splitlines():
                    line = orjson.loads(raw)
                    response = line["response"]
                    if response and response["status_code"] == 200:
                        did["succeeded"] += 1
                        usage = response["body"]["usage"]
                        tokens = did["tokens"].setdefault("gpt-4o-mini", [0, 0])
                        tokens[0] += usage["prompt_tokens"]
                        tokens[1] += usage["completion_tokens"]
                    else:
                        did["errored"] += 1
        async for message_batch in ant.messages.batches.list(limit=100):
            async for entry in await ant.messages.batches.results(message_batch.id):
                assert entry.result.type == "succeeded"
                did["succeeded"] += 1
                tokens = did["tokens"].setdefault("claude-haiku-4-5", [0, 0])
                tokens[0] += entry.result.message.usage.input_tokens
                tokens[1] += entry.result.message.usage.output_tokens
    finally:
        await oai.close()
        await ant.close()
    return did


async def test_metrics_match_what_the_emulator_did(tmp_path: Path, emulator: RunningEmulator) -> None:
    prices = {f'prices."{model}"': {"input": i, "output": o} for model, (i, o) in PRICES.items()}
    config = write_config(tmp_path, emulator, http={"listen": "127.0.0.1:0"}, **prices)
    daemon = DaemonProcess(config, tmp_path / "daemon.log").start()
    try:
        base = await http_url(daemon)
        spool = tmp_path / "spool"
        # Four chat requests the emulator answers, two it rejects (max_tokens 0), three Claude ones, one bad line.
        lines: list[Any] = [chat(n) for n in range(4)] + [chat(n, max_tokens=0) for n in (4, 5)]
        lines += [claude(n) for n in range(3)] + [b"not json"]
        drop(spool, "mixed.jsonl", lines)
        results_path = spool / "out" / "mixed.results.jsonl"
        await wait_for_file(results_path, 60, daemon)
        statuses = [r["status"] for r in read_results(results_path)]
        assert sorted(statuses) == ["errored"] * 2 + ["invalid"] + ["succeeded"] * 7

        did = await what_the_emulator_did(emulator)
        assert (did["succeeded"], did["errored"]) == (7, 2)
        status, text = await get(base + "/metrics")
        assert status == 200
        samples = metric_samples(text)
        assert all(name.startswith("batchd_") for name, _ in samples)
        assert metric(samples, "batchd_requests_total", status="succeeded") == did["succeeded"]
        assert metric(samples, "batchd_requests_total", status="errored") == did["errored"]
        assert metric(samples, "batchd_requests_total", status="invalid") == 1
        for model, (tokens_in, tokens_out) in did["tokens"].items():
            price_in, price_out = PRICES[model]
            realtime = (tokens_in * price_in + tokens_out * price_out) / 1e6
            assert metric(samples, "batchd_tokens_total", model=model, kind="input") == tokens_in
            assert metric(samples, "batchd_tokens_total", model=model, kind="output") == tokens_out
            assert metric(samples, "batchd_spend_usd_total", model=model, price="realtime") == pytest.approx(realtime)
            assert metric(samples, "batchd_spend_usd_total", model=model, price="batch") == pytest.approx(realtime / 2)
        assert metric(samples, "batchd_ingested_lines_total") == len(lines)
        assert metric(samples, "batchd_collected_results_total") == 9
        assert metric(samples, "batchd_batches_finished_total", status="completed") == 1  # OpenAI
        assert metric(samples, "batchd_batches_finished_total", status="ended") == 1  # Anthropic
        assert metric(samples, "batchd_batch_turnaround_seconds_count") == 2
        assert metric(samples, "batchd_queue_depth") == 0
        assert metric(samples, "batchd_metrics_exporter") == 1
        # Labels come from bounded sets only: never a file name, a custom_id or a batch id.
        values = {value for _, labels in samples for _, value in labels}
        custom_ids = {f"chat-{n}" for n in range(6)} | {f"claude-{n}" for n in range(3)}
        assert not values & custom_ids
        assert not [v for v in values if "mixed" in v or v.startswith(("batch_", "msgbatch_", "file-"))]
        assert {"gpt-4o-mini", "claude-haiku-4-5", "succeeded", "errored", "invalid"} <= values
    finally:
        assert await daemon.stop() == -signal.SIGTERM


async def test_failed_webhook_deliveries_are_counted_per_sink(tmp_path: Path, emulator: RunningEmulator) -> None:
    # A receiver that is not there (port 9, discard: nothing listens): every attempt fails.
    config = write_config(tmp_path, emulator, http={"listen": "127.0.0.1:0"})
    with config.open("a") as handle:
        handle.write('\n[[sinks]]\nname = "crm"\nurl = "http://127.0.0.1:9/hook"\nsecret = "s3cret-hook-key"\n')
    daemon = DaemonProcess(config, tmp_path / "daemon.log").start()
    try:
        base = await http_url(daemon)
        drop(tmp_path / "spool", "hooked.jsonl", [chat(n) for n in range(2)])
        await wait_for_file(tmp_path / "spool" / "out" / "hooked.results.jsonl", 60, daemon)

        async def failures() -> float | None:
            samples = metric_samples((await get(base + "/metrics"))[1])
            counted = metric(samples, "batchd_sink_delivery_failures_total", sink="crm")
            return counted if counted >= 2 else None

        await wait_until(failures, 60)
        logged = [e for e in daemon.log_events() if e.get("event") == "sink.delivery_failed"]
        samples = metric_samples((await get(base + "/metrics"))[1])
        assert metric(samples, "batchd_sink_delivery_failures_total", sink="crm") >= len(logged) >= 2
        assert not [name for name, _ in samples if name.endswith("_created")]
    finally:
        assert await daemon.stop() == -signal.SIGTERM


async def test_readyz_says_why_with_a_bad_key_and_is_ready_after_the_fix_and_a_restart(tmp_path: Path) -> None:
    good = {OPENAI_KEY, ANTHROPIC_KEY}
    async with await start_emulator(EmulatorConfig(processing_seconds=0.3, api_keys=frozenset(good))) as emulator:
        config = write_config(tmp_path, emulator, http={"listen": "127.0.0.1:0"})
        bad_key = "sk-test-wrong-key-9876543210"
        daemon = DaemonProcess(config, tmp_path / "daemon.log", env={"TEST_OPENAI_KEY": bad_key}).start()
        try:
            base = await http_url(daemon)
            status, text = await get(base + "/readyz")
            assert status == 503, text
            body = orjson.loads(text)
            assert body["ready"] is False
            assert "401" in body["checks"]["provider openai"]
            assert (body["checks"]["store"], body["checks"]["spool"], body["checks"]["provider anthropic"]) == (
                "ok",
                "ok",
                "ok",
            )
            assert "provider openai" in body["reason"]
            assert bad_key not in text and bad_key[-8:] not in text
            assert (await get(base + "/healthz"))[0] == 200  # alive, only not ready
        finally:
            assert await daemon.stop() == -signal.SIGTERM
        daemon = DaemonProcess(config, tmp_path / "daemon2.log").start()  # the harness's good keys
        try:
            status, text = await get(await http_url(daemon) + "/readyz")
            assert status == 200, text
            assert orjson.loads(text)["checks"] == {
                "store": "ok",
                "spool": "ok",
                "provider anthropic": "ok",
                "provider openai": "ok",
            }
        finally:
            assert await daemon.stop() == -signal.SIGTERM


async def test_a_unix_socket_listener_serves_health_and_the_page(tmp_path: Path, emulator: RunningEmulator) -> None:
    sock = tmp_path / "run" / "http.sock"
    sock.parent.mkdir()
    config = write_config(tmp_path, emulator, http={"listen": f"unix:{sock}"})
    daemon = DaemonProcess(config, tmp_path / "daemon.log").start()
    try:
        await wait_until(sock.exists, timeout=60)
        assert stat.S_IMODE(sock.stat().st_mode) == 0o660
        assert (await get("http://batchd/healthz", aiohttp.UnixConnector(path=str(sock))))[0] == 200
        status, html = await get("http://batchd/", aiohttp.UnixConnector(path=str(sock)))
        assert status == 200 and "<h2>Queue</h2>" in html and "nothing queued" in html
    finally:
        assert await daemon.stop() == -signal.SIGTERM


async def test_a_port_that_cannot_be_bound_refuses_the_start(tmp_path: Path, emulator: RunningEmulator) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        config = write_config(tmp_path, emulator, http={"listen": f"127.0.0.1:{port}"})
        daemon = DaemonProcess(config, tmp_path / "daemon.log").start()
        status = await daemon.wait(60)
    assert status != 0
    refused = [e for e in daemon.log_events() if e.get("event") == "daemon.start_refused"]
    assert refused and f"127.0.0.1:{port}" in refused[0]["reason"]


# -- in process: the metrics lease, the page's own rules ---------------------------------------------


async def test_one_daemon_of_several_exports_the_database_wide_families(tmp_path: Path) -> None:
    url = "sqlite:///" + str(tmp_path / "shared.sqlite3")
    stores = [open_store(url, node) for node in ("n1", "n2")]
    for store in stores:
        await store.open()
    stopping = asyncio.Event()
    metrics = [Metrics(store, lease=0.6, live_pollers=lambda: 0) for store in stores]
    tasks = [asyncio.create_task(m.hold_lease(stopping)) for m in metrics]
    try:
        await wait_until(lambda: sum(m.leader for m in metrics) == 1)
        texts = [(await m.render()).decode() for m in metrics]
        leader = 0 if metrics[0].leader else 1
        assert "batchd_ingested_lines_total" in texts[leader]
        assert "batchd_ingested_lines_total" not in texts[1 - leader]
        assert "batchd_metrics_exporter 1.0" in texts[leader] and "batchd_metrics_exporter 0.0" in texts[1 - leader]
        # The exporter stops (a graceful stop gives its leases up): the other one takes over.
        tasks[leader].cancel()
        await stores[leader].release_leases()
        await wait_until(lambda: metrics[1 - leader].leader, timeout=10)
    finally:
        stopping.set()
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for store in stores:
            await store.close()


def test_the_flush_column_shows_the_batchers_plan() -> None:
    flush: dict[str, Any] = {"next_flush": 700.0, "reason": "age", "blocked_by": None}
    assert flush_text(flush, 200.0) == '<span class="flush">age</span> 1970-01-01 00:11:40 UTC (in 8 min)'
    assert flush_text({**flush, "next_flush": 200.0, "reason": "deadline"}, 200.0).endswith("deadline</span> now")
    assert flush_text({**flush, "next_flush": None, "reason": "paused"}, 200.0).endswith(": when resumed")
    waiting = {"next_flush": None, "reason": "capacity", "blocked_by": "enqueued_tokens"}
    assert flush_text(waiting, 200.0).endswith("</span> (enqueued_tokens): when a batch ends")
    assert flush_text(None, 200.0) == "-"


def test_the_page_escapes_what_producers_and_providers_wrote() -> None:
    status: dict[str, Any] = {
        "queue": [
            {"provider": "openai", "endpoint": "/v1/chat/completions", "model": "<script>x</script>", "queued": 3,
             "batched": 0, "submitted": 0}
        ],
        "batches": [],
        "results": {},
        "holds": [],
        "sinks": [],
        "errors": [{"at": 1.0, "event": "batch.poll_failed", "message": "<img src=x onerror=alert(1)>"}],
    }  # fmt: skip
    metrics: dict[str, list[dict[str, Any]]] = {
        "queue": [
            {"profile": "openai", "endpoint": "/v1/chat/completions", "model": "<script>x</script>", "oldest": 0}
        ],
        "results": [],
    }
    routes = {
        "next_flush": [
            {"provider": "openai", "endpoint": "/v1/chat/completions", "model": "<script>x</script>",
             "next_flush": 600.0, "reason": "age", "blocked_by": None}
        ],
        "capacity": [
            {"provider": "openai", "model": "<script>x</script>", "blocked_by": None,
             "in_flight_batches": {"used": 0, "limit": 20, "free": 20}}
        ],
    }  # fmt: skip
    html = render(status, metrics, routes, 5.0, 100.0)
    assert "<script>x</script>" not in html and "&lt;script&gt;x&lt;/script&gt;" in html
    assert "<img src=x" not in html
    assert "(in 8 min)" in html  # the batcher's plan: at 600 s, seen at 100 s


def test_the_turnaround_histogram_is_cumulative() -> None:
    from batchd.metrics import histogram

    buckets, total = histogram([0.5, 10.0, 11.0, 5000.0], (1.0, 10.0, 60.0))
    assert buckets == [("1.0", 1.0), ("10.0", 2.0), ("60.0", 3.0), ("+Inf", 4.0)]
    assert total == 5021.5
    assert histogram([], (1.0,)) == ([("1.0", 0.0), ("+Inf", 0.0)], 0.0)


class _CountingStore:
    """Only what Metrics reads of a store: metrics(), counted, each read a new value."""

    def __init__(self) -> None:
        self.reads = 0

    async def metrics(self) -> dict[str, list[dict[str, Any]]]:
        self.reads += 1
        return {"read": [{"n": self.reads}]}


async def test_a_slow_metrics_read_is_served_from_memory_while_a_fresh_one_runs(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import batchd.metrics as metrics_module

    store = _CountingStore()
    metrics = Metrics(store, 30.0, lambda: 0)  # type: ignore[arg-type]
    # A fast read (a small database) is made for every scrape.
    assert [(await metrics.store_read())["read"] for _ in range(2)] == [[{"n": 1}], [{"n": 2}]]

    monkeypatch.setattr(metrics_module, "SLOW_READ", 0.0)  # every read counts as slow now
    monkeypatch.setattr(metrics_module, "STALE_READS", 1e9)  # and stays fresh
    assert [(await metrics.store_read())["read"] for _ in range(2)] == [[{"n": 2}], [{"n": 2}]]  # from memory
    assert store.reads == 2

    monkeypatch.setattr(metrics_module, "STALE_READS", 0.0)  # stale at once: refreshed behind the answer
    assert (await metrics.store_read())["read"] == [{"n": 2}]
    assert metrics._refreshing is not None
    await metrics._refreshing
    assert store.reads == 3
    monkeypatch.setattr(metrics_module, "STALE_READS", 1e9)
    assert (await metrics.store_read())["read"] == [{"n": 3}]
