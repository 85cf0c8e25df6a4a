"""The status page in a real browser: headless Debian Chromium, driven by playwright, against a running
daemon (subprocess) with the emulator behind it. It checks what a person would see (a queued route
with its next flush, a live batch's progress bar moving, the savings so far) and writes a screenshot
to tests/artifacts/status-page.png (gitignored)."""

from __future__ import annotations

import re
import signal
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import orjson
import pytest

from batchd.emulator import EmulatorConfig, RunningEmulator, start_emulator

from .conftest import require_browser, wait_until
from .emulator_helpers import admin
from .harness import DaemonProcess, http_url, wait_for_file, write_config

ARTIFACTS = Path(__file__).parent / "artifacts"


@pytest.fixture
async def emulator() -> AsyncIterator[RunningEmulator]:
    running = await start_emulator(EmulatorConfig(processing_seconds=0.3))
    try:
        yield running
    finally:
        await running.close()


def drop(spool: Path, name: str, count: int, model: str) -> None:
    lines: list[Any] = [
        {
            "custom_id": f"{name}-{n}",
            "method": "POST",
            "url": "/v1/chat/completions",
            "body": {"model": model, "messages": [{"role": "user", "content": f"ticket {n}"}], "max_tokens": 8},
        }
        for n in range(count)
    ]
    tmp = spool / "tmp" / f"{name}.jsonl"
    tmp.write_bytes(b"".join(orjson.dumps(line) + b"\n" for line in lines))
    tmp.rename(spool / "new" / f"{name}.jsonl")


async def test_the_status_page_shows_queue_progress_and_savings_in_a_browser(
    tmp_path: Path, emulator: RunningEmulator
) -> None:
    chromium = require_browser()
    from playwright.async_api import async_playwright, expect

    config = write_config(
        tmp_path,
        emulator,
        http={"listen": "127.0.0.1:0", "page_refresh": 1},
        # One live OpenAI batch at a time: a second model's requests wait in the queue, visibly.
        **{"providers.openai": {"max_in_flight": 1}},
    )
    daemon = DaemonProcess(config, tmp_path / "daemon.log").start()
    try:
        base = await http_url(daemon)
        spool = tmp_path / "spool"
        await wait_until(lambda: (spool / "tmp").is_dir())
        # Something finished (savings), then a slow batch (progress), then a route left queued.
        drop(spool, "done", 3, "gpt-4o-mini")
        await wait_for_file(spool / "out" / "done.results.jsonl", 60, daemon)
        await admin(emulator, "PUT", "/_emulator/config", {"processing_seconds": 90})
        drop(spool, "slow", 300, "gpt-4o-mini")
        # The slow batch is out (the second submitted) before the other route's file arrives; were the
        # two dropped together, they could be taken in one group commit and either flushed first.
        await wait_until(lambda: sum(e.get("event") == "batch.submitted" for e in daemon.log_events()) >= 2, timeout=60)
        drop(spool, "waiting", 2, "gpt-4o")

        async with async_playwright() as playwright:
            browser = await playwright.chromium.launch(executable_path=chromium, args=["--no-sandbox"])
            try:
                page = await browser.new_page(viewport={"width": 1280, "height": 900})
                await page.goto(base + "/")
                await expect(page.locator("h1")).to_have_text("batchd")
                # The queued route, with its count and when it flushes next (the page refreshes itself).
                route = page.locator("#queue tbody tr").filter(
                    has=page.locator("span.model", has_text=re.compile(r"^gpt-4o$"))
                )
                await expect(route.locator(".queued")).to_have_text("2", timeout=30_000)
                # Due, but every batch slot is taken (max_in_flight 1): the batcher's own plan says why.
                await expect(route.locator(".flush")).to_have_text("capacity")
                await expect(route).to_contain_text("when a batch ends")
                # The live batch's progress bar, moving as the provider works through it.
                bar = page.locator("#batches progress.bar").first
                await expect(bar).to_be_visible(timeout=30_000)
                await page.wait_for_function(
                    "() => { const b = document.querySelector('#batches progress.bar'); return b && b.value > 0; }",
                    timeout=60_000,
                )
                assert int(await bar.get_attribute("max") or 0) == 300
                await expect(page.locator("#batches .done").first).to_have_text(re.compile(r"^[1-9]\d*/300$"))
                # Savings so far: what real-time calls would have cost minus what the batch cost.
                saved = page.locator("#savings .saved")
                await expect(saved).to_have_text(re.compile(r"^\$0\.\d*[1-9]\d* saved$"))
                ARTIFACTS.mkdir(exist_ok=True)
                shot = ARTIFACTS / "status-page.png"
                await page.screenshot(path=str(shot), full_page=True)
                assert shot.stat().st_size > 10_000
            finally:
                await browser.close()
    finally:
        assert await daemon.stop() == -signal.SIGTERM
