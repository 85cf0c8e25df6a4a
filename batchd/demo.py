"""`batchd demo`: the whole path of a request on a fresh machine, with no API keys.

Starts the emulator in-process on a free port, a daemon on a temporary spool pointed at it, drops
a sample file of OpenAI and Anthropic requests (and two bad lines), waits for the results file,
and prints what happened.
"""

from __future__ import annotations

import asyncio
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

import orjson
from pydantic import SecretStr

from .daemon import Daemon
from .emulator import EmulatorConfig, start_emulator
from .logs import configure_logging
from .report import build_report, render_report
from .settings import BatchingSettings, DaemonSettings, ProviderProfile, Settings
from .spool import SpoolPaths, submit
from .status import terminal

DEMO_TIMEOUT = 180.0
TOPICS = ("billing", "login", "shipping", "refund", "bug report", "feature request", "praise", "cancellation")


def sample_requests(count: int) -> list[Any]:
    """A mixed night's work: ticket classification (OpenAI and Anthropic) and embeddings, plus bad lines."""
    lines: list[Any] = []
    for n in range(count):
        topic = TOPICS[n % len(TOPICS)]
        ticket = f"Ticket {n}: customer writes about {topic} (order #{1000 + n})."
        if n % 10 < 5:
            lines.append(
                {
                    "custom_id": f"ticket-{n}",
                    "method": "POST",
                    "url": "/v1/chat/completions",
                    "body": {
                        "model": "gpt-4o-mini",
                        "messages": [
                            {"role": "system", "content": "Classify the support ticket into one word."},
                            {"role": "user", "content": ticket},
                        ],
                        "max_tokens": 16,
                    },
                }
            )
        elif n % 10 < 6:
            lines.append(
                {
                    "custom_id": f"embed-{n}",
                    "method": "POST",
                    "url": "/v1/embeddings",
                    "body": {"model": "text-embedding-3-small", "input": ticket},
                }
            )
        else:
            lines.append(
                {
                    "custom_id": f"claude-{n}",
                    "params": {
                        "model": "claude-haiku-4-5",
                        "max_tokens": 64,
                        "messages": [{"role": "user", "content": f"Summarise in five words: {ticket}"}],
                    },
                }
            )
    lines.append(b"this line is not JSON")
    lines.append({"custom_id": "no-model", "method": "POST", "url": "/v1/chat/completions", "body": {"messages": []}})
    return lines


def demo_settings(root: Path, openai_url: str, anthropic_url: str) -> Settings:
    return Settings(
        daemon=DaemonSettings(
            spool_dir=root / "spool",
            state_dir=root / "state",
            graceful_timeout=10,
            rescan_interval=2,
            log_level="warning",
        ),
        batching=BatchingSettings(max_wait=1, poll_interval_min=0.2, poll_interval_max=1, tick=0.2),
        providers={
            "openai": ProviderProfile(kind="openai", base_url=openai_url, api_key=SecretStr("sk-demo")),
            "anthropic": ProviderProfile(kind="anthropic", base_url=anthropic_url, api_key=SecretStr("sk-ant-demo")),
        },
    )


async def _wait_for(path: Path, deadline: float) -> bool:
    while time.monotonic() < deadline:
        if path.exists():
            return True
        await asyncio.sleep(0.2)
    return False


async def run_demo(requests: int = 400, keep: bool = True) -> int:
    configure_logging("auto", "warning", stream=sys.stderr)
    root = Path(tempfile.mkdtemp(prefix="batchd-demo-"))
    emulator = await start_emulator(EmulatorConfig(processing_seconds=1.0))
    settings = demo_settings(root, emulator.openai_base_url, emulator.anthropic_base_url)
    daemon = Daemon(settings)
    started = time.monotonic()
    runner = asyncio.create_task(daemon.run(), name="daemon")
    try:
        SpoolPaths(settings.daemon.spool_dir).create()
        lines = sample_requests(requests)
        dropped = submit(lines, name="demo", spool_dir=settings.daemon.spool_dir)
        print(f"batchd demo: emulator at {emulator.url}; dropped {len(lines)} lines into {dropped}")
        results_path = settings.daemon.spool_dir / "out" / "demo.results.jsonl"
        if not await _wait_for(results_path, time.monotonic() + DEMO_TIMEOUT):
            print("batchd demo: no results file after 180 s; see the log above", file=sys.stderr)
            return 1
        results = [orjson.loads(line) for line in results_path.read_bytes().splitlines()]
    finally:
        daemon.request_stop("demo finished")
        await runner
        await emulator.close()
    statuses = Counter(r["status"] for r in results)
    batches = {(r["provider"], r["model"], r["batch_id"]) for r in results if r["batch_id"]}
    tokens_in = sum((r["usage"] or {}).get("input_tokens", 0) for r in results)
    tokens_out = sum((r["usage"] or {}).get("output_tokens", 0) for r in results)
    print(
        f"batchd demo: {len(results)} result lines for {len(lines)} input lines in {time.monotonic() - started:.1f} s"
    )
    print("  by status:   " + ", ".join(f"{k}={v}" for k, v in sorted(statuses.items())))
    print(f"  batches:     {len(batches)}")
    for provider, model, batch_id in sorted(batches):
        print(f"               {provider:<10} {model:<24} {batch_id}")
    print(f"  tokens:      {tokens_in} input, {tokens_out} output")
    invalid = next((r for r in results if r["status"] == "invalid"), None)
    if invalid:
        print(f"  an invalid line: line {invalid['line']}: {invalid['error']['message']}")
    print(f"  results:     {results_path}")
    report = await build_report(settings, 86400, "model")
    if report is not None:
        render_report(report, terminal())
    ok = len(results) == len(lines) and statuses.get("succeeded", 0) == requests
    return 0 if ok else 1
