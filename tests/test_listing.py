"""Polling by listing: one list call per 100 batches, a retrieve only for what changed.

The daemon runs in-process against the emulator (official SDKs over HTTP). Our batch is pushed
off the first list page by strangers' batches, so the sweep has to page to find it; the emulator
counts calls by route, which shows whether a poll was a listing or a retrieve.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from batchd import poller
from batchd.providers.base import RemoteBatch

from .conftest import make_settings, wait_until
from .emulator_helpers import stranger_batches
from .test_faults import (
    admin,
    assert_one_result_per_line,
    chat_line,
    claude_line,
    daemon_in_process,
    drop,
    emulator_stats,
    emulator_with,
    out_path,
    wait_results,
)

ROUTES = {
    "openai": ("GET /v1/batches", "GET /v1/batches/{batch_id}"),
    "anthropic": ("GET /v1/messages/batches", "GET /v1/messages/batches/{batch_id}"),
}


async def calls(emu: Any, vendor: str) -> tuple[int, int]:
    """(list calls, retrieve calls) the emulator has answered for `vendor`."""
    by_route = (await emulator_stats(emu))["calls_by_route"]
    listing, retrieve = ROUTES[vendor]
    return by_route.get(listing, 0), by_route.get(retrieve, 0)


async def our_batch(emu: Any, vendor: str) -> str:
    async def created() -> str | None:
        stats = await emulator_stats(emu)
        ids = {b for batches in stats[vendor]["custom_ids"].values() for b in batches}
        return ids.pop() if len(ids) == 1 else None

    found: str = await wait_until(created, timeout=30)
    return found


def lines_for(vendor: str, count: int) -> list[dict[str, Any]]:
    return [chat_line(n) for n in range(count)] if vendor == "openai" else [claude_line(n) for n in range(count)]


def test_only_an_unchanged_live_batch_is_taken_from_the_list() -> None:
    watch = poller.Watch("openai", "batch_1", 0.0, ("in_progress", {"total": 2, "completed": 0, "failed": 0}))
    same = RemoteBatch("batch_1", "in_progress", False, 0.0, {"total": 2, "completed": 0, "failed": 0})
    assert watch.unchanged(same) is same and not watch.changed(same)
    progressed = RemoteBatch("batch_1", "in_progress", False, 0.0, {"total": 2, "completed": 1, "failed": 0})
    assert watch.unchanged(progressed) is None and watch.changed(progressed)
    # An ended batch is collected from the provider's own answer, even when the list says nothing new.
    watch.seen = ("completed", {"total": 2, "completed": 2, "failed": 0})
    ended = RemoteBatch("batch_1", "completed", True, 0.0, {"total": 2, "completed": 2, "failed": 0})
    assert watch.unchanged(ended) is None and not watch.changed(ended)
    assert watch.unchanged(None) is None  # not in the pages read: retrieved
    assert poller.Watch("openai", "batch_2", 0.0, None).changed(same)  # never polled: anything is news


@pytest.mark.parametrize("vendor", ["openai", "anthropic"])
async def test_a_batch_past_the_first_list_page_is_polled_by_listing_and_collected_when_it_ends(
    tmp_path: Path, vendor: str
) -> None:
    lines = lines_for(vendor, 5)
    async with emulator_with(processing_seconds=600) as emu:
        settings = make_settings(tmp_path, emu, poll_interval_min=0.1, poll_interval_max=0.2)
        async with daemon_in_process(settings) as (_daemon, task):
            drop(settings, "listed.jsonl", lines)
            ours = await our_batch(emu, vendor)
            # 120 newer batches: ours is now on the second page of a newest-first list.
            await stranger_batches(emu, vendor, 120)
            listed_before, retrieved_before = await calls(emu, vendor)
            # Several sweeps, each reading two pages to find ours; not one retrieve, since nothing changed.
            await wait_until(lambda: calls_after(emu, vendor, listed_before + 8), timeout=30)
            _, retrieved = await calls(emu, vendor)
            assert retrieved == retrieved_before, "an unchanged batch found on page 2 was retrieved"
            # It ends (everything finished): the change shows in the list, and it is retrieved and collected.
            await admin(emu, "POST", f"/_emulator/batches/{ours}/expire", {"completed_fraction": 1.0})
            results = await wait_results(out_path(settings.daemon.spool_dir, "listed"), task, timeout=30)
        _, retrieved = await calls(emu, vendor)
    by_id = assert_one_result_per_line(results, lines)
    assert {r["status"] for r in by_id.values()} == {"succeeded"}
    assert retrieved > retrieved_before


async def calls_after(emu: Any, vendor: str, listed: int) -> bool:
    return (await calls(emu, vendor))[0] >= listed


@pytest.mark.parametrize("vendor", ["openai", "anthropic"])
async def test_a_batch_missing_from_the_pages_read_is_retrieved_and_collected(
    tmp_path: Path, vendor: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The sweep reads one page only: ours, on the second, is missing from what it reads.
    monkeypatch.setattr(poller, "SWEEP_PAGES", 1)
    lines = lines_for(vendor, 5)
    async with emulator_with(processing_seconds=600) as emu:
        settings = make_settings(tmp_path, emu, poll_interval_min=0.1, poll_interval_max=0.2)
        async with daemon_in_process(settings) as (_daemon, task):
            drop(settings, "missing.jsonl", lines)
            ours = await our_batch(emu, vendor)
            await stranger_batches(emu, vendor, 110)
            _, retrieved_before = await calls(emu, vendor)

            async def retrieved_again() -> bool:
                return (await calls(emu, vendor))[1] >= retrieved_before + 3

            await wait_until(retrieved_again, timeout=30)
            await admin(emu, "POST", f"/_emulator/batches/{ours}/expire", {"completed_fraction": 1.0})
            results = await wait_results(out_path(settings.daemon.spool_dir, "missing"), task, timeout=30)
    by_id = assert_one_result_per_line(results, lines)
    assert {r["status"] for r in by_id.values()} == {"succeeded"}
