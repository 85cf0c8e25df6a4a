"""Shared fixtures: an emulator on loopback, settings on a temporary spool, a running daemon."""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
from pydantic import SecretStr

from batchd.emulator import EmulatorConfig, RunningEmulator, start_emulator
from batchd.settings import BatchingSettings, DaemonSettings, ProviderProfile, Settings


async def loop_ticks(count: int = 1) -> None:
    """Let the event loop run `count` iterations: a cancellation point, never a wait for a condition.

    The cancellation tests cancel a write after exactly N iterations, to land inside each await of
    it in turn; everything else waits with wait_until.
    """
    for _ in range(count):
        await asyncio.sleep(0)


async def wait_until(
    condition: Callable[[], Any] | Callable[[], Awaitable[Any]], timeout: float = 60.0, interval: float = 0.05
) -> Any:
    """Poll `condition` until it returns something truthy; fail the test at the deadline."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if asyncio.iscoroutine(value):
            value = await value
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout} s")
        await asyncio.sleep(interval)


@pytest.fixture
async def emulator() -> AsyncIterator[RunningEmulator]:
    running = await start_emulator(EmulatorConfig(processing_seconds=0.2))
    try:
        yield running
    finally:
        await running.close()


def make_settings(root: Path, emulator: RunningEmulator | None, **batching: Any) -> Settings:
    """Settings for a daemon on `root`, pointed at `emulator`, with fast timings."""
    openai_url = emulator.openai_base_url if emulator else "http://127.0.0.1:9/v1"
    anthropic_url = emulator.anthropic_base_url if emulator else "http://127.0.0.1:9"
    timings: dict[str, Any] = {"max_wait": 0.5, "poll_interval_min": 0.1, "poll_interval_max": 0.5, "tick": 0.1}
    timings.update(batching)
    return Settings(
        daemon=DaemonSettings(
            spool_dir=root / "spool", state_dir=root / "state", graceful_timeout=5, rescan_interval=1, settle_time=1
        ),
        batching=BatchingSettings(**timings),
        providers={
            "openai": ProviderProfile(kind="openai", base_url=openai_url, api_key=SecretStr("sk-test-key-1234567")),
            "anthropic": ProviderProfile(
                kind="anthropic", base_url=anthropic_url, api_key=SecretStr("sk-ant-test-key-1234567")
            ),
        },
    )


@pytest.fixture
def settings(tmp_path: Path, emulator: RunningEmulator) -> Settings:
    return make_settings(tmp_path, emulator)


def require_root() -> None:
    """Skip a test that needs root (other uids, mounts), or fail it where the root tier is required.

    CI sets BATCHD_REQUIRE_ROOT_TIER=1, so a machine without root fails loudly instead of
    silently skipping the hostile-producer and full-disk tests.
    """
    if os.geteuid() == 0:
        return
    if os.environ.get("BATCHD_REQUIRE_ROOT_TIER") == "1":
        pytest.fail("this test needs root and BATCHD_REQUIRE_ROOT_TIER=1 forbids skipping it")
    pytest.skip("needs root (other uids, mounts); CI runs it as root")


CHROMIUM = "/usr/bin/chromium"


def require_browser() -> str:
    """Debian's Chromium for the browser tests; skip loudly without it, or fail where it is required.

    .ci/run installs it and sets BATCHD_REQUIRE_BROWSER=1, so a CI machine without it fails instead
    of silently skipping the status page's browser test.
    """
    missing = []
    if not os.access(CHROMIUM, os.X_OK):
        missing.append(f"{CHROMIUM} (apt-get install -y chromium)")
    try:
        import playwright.async_api  # noqa: F401
    except ImportError:
        missing.append("the playwright package (pip install -e '.[dev]')")
    if not missing:
        return CHROMIUM
    reason = "browser test needs " + " and ".join(missing)
    if os.environ.get("BATCHD_REQUIRE_BROWSER") == "1":
        pytest.fail(f"{reason}, and BATCHD_REQUIRE_BROWSER=1 forbids skipping it")
    pytest.skip(f"SKIPPED LOUDLY: {reason}")
