"""No batch stuck forever, per-request retry backoff, and the API key kept on the profile's host.

Pure policy functions first, then the store, then the daemon in-process against the emulator
with the fault that produces each case: an output file deleted at the provider, a batch deleted
at the provider, a batch kept running past its window, an unknown status, an expired batch whose
files are named late, and a results_url on another host.
"""

from __future__ import annotations

import random
import time
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web

from batchd.emulator import Faults, RunningEmulator
from batchd.formats import (
    Outcome,
    item_id_from_custom_id,
    owned_by,
    parse_custom_id,
    provider_custom_id,
)
from batchd.policy import decide, index_outcomes, overdue, retry_delay, same_host
from batchd.providers.base import WindowScan
from batchd.status import snapshot
from batchd.store import open_store
from batchd.store.contract import Chunk, FileKey, NewItem

from .conftest import make_settings, wait_until
from .test_faults import (
    admin,
    all_custom_ids,
    assert_one_result_per_line,
    chat_line,
    claude_line,
    daemon_in_process,
    drop,
    emulator_stats,
    emulator_with,
    expected_response_id,
    out_path,
    wait_results,
)

INSTANCE = "0123456789abcdef0123456789abcdef"

# -- pure policy --------------------------------------------------------------------------------


def test_retry_delay_doubles_per_attempt_with_jitter_and_a_ceiling() -> None:
    rng = random.Random(1)
    for attempt in range(1, 12):
        delays = [retry_delay(attempt, 2.0, 100.0, rng) for _ in range(200)]
        nominal = min(100.0, 2.0 * 2 ** (attempt - 1))
        assert all(nominal * 0.5 <= d <= nominal for d in delays)
        assert len(set(delays)) > 100, "no jitter"
    assert retry_delay(10_000, 1.0, 60.0) <= 60.0  # no overflow for a huge attempt count
    assert retry_delay(0, 4.0, 60.0) <= 4.0


def test_overdue_only_after_window_plus_grace() -> None:
    assert not overdue(1000.0, 1000.0 + 86400 + 3600, 86400, 3600)
    assert overdue(1000.0, 1000.0 + 86400 + 3601, 86400, 3600)


@pytest.mark.parametrize(
    ("base", "url", "same"),
    [
        ("http://127.0.0.1:8089", "http://127.0.0.1:9999/v1/messages/batches/x/results", True),
        ("https://api.anthropic.com", "https://API.anthropic.com/v1/x", True),
        (None, "https://api.anthropic.com/v1/x", True),
        ("http://127.0.0.1:8089", "http://127.0.0.2:8089/x", False),
        ("http://127.0.0.1:8089", "http://localhost:8089/x", False),
        ("https://api.anthropic.com", "https://api.anthropic.com.evil.example/x", False),
        ("https://api.anthropic.com", "https://evil.example/?https://api.anthropic.com", False),
        ("https://api.anthropic.com", "/relative/path", False),
    ],
)
def test_same_host_compares_host_names_not_ports(base: str | None, url: str, same: bool) -> None:
    assert same_host(base, url, "https://api.anthropic.com") is same


def test_custom_ids_carry_the_instance_and_old_ids_still_parse() -> None:
    for item_id in (1, 255, 10**12):
        custom_id = provider_custom_id(item_id, INSTANCE)
        assert custom_id == f"b{INSTANCE[:16]}_{item_id:x}"
        assert len(custom_id) <= 64 and custom_id.replace("_", "").isalnum()
        assert item_id_from_custom_id(custom_id, INSTANCE) == item_id
        assert item_id_from_custom_id(custom_id, "f" * 32) is None, "another database's id was accepted"
        assert item_id_from_custom_id(provider_custom_id(item_id), INSTANCE) == item_id  # legacy form
    assert parse_custom_id("user-id") is None and parse_custom_id("bnothex_1") is None


def test_ownership_needs_every_id_from_this_instance_and_this_batch() -> None:
    ours = [provider_custom_id(i, INSTANCE) for i in (1, 2, 3)]
    assert owned_by(ours, INSTANCE, {1, 2, 3})
    assert not owned_by([], INSTANCE, {1})
    assert not owned_by(ours, "f" * 32, {1, 2, 3})
    assert not owned_by(ours, INSTANCE, {1, 2}), "an item of another batch"
    assert not owned_by([*ours[:2], provider_custom_id(3)], INSTANCE, {1, 2, 3}), "a legacy id proves nothing"


def test_window_scan_stops_early_only_on_a_newest_first_list() -> None:
    newest_first = WindowScan(start=100.0)
    assert [newest_first.past_window(t) for t in (150.0, 120.0, 90.0)] == [False, False, True]
    oldest_first = WindowScan(start=100.0)
    assert not any(oldest_first.past_window(t) for t in (10.0, 20.0, 30.0, 150.0))
    # One item says nothing about the order.
    assert not WindowScan(start=100.0).past_window(10.0)


# -- store --------------------------------------------------------------------------------------


async def test_retryable_failures_get_their_own_backoff_and_their_age_restarts_at_the_requeue(
    tmp_path: Path,
) -> None:
    store = open_store(f"sqlite:///{tmp_path / 'db.sqlite3'}", "test-node")
    await store.open()
    try:
        instance = await store.instance_id()
        row = await store.begin_file(FileKey("f.jsonl", "sha", 10, 0, 1), out_taken=lambda name: False)
        items = [NewItem(n, f"c{n}", "anthropic", "/v1/messages", "m", b"{}", 10) for n in range(1, 21)]
        assert await store.add_chunk(row.id, Chunk(1, 20, 200, items, []))
        await store.finish_file(row.id, 20)
        long_ago = time.time() - 3600
        [group] = await store.queued_groups(time.time())
        batch = await store.claim_batch(group, "anthropic", 100, 10**9, long_ago)
        assert batch is not None
        await store.mark_submitted(batch.id, "msgbatch_x", "in_progress", long_ago)
        batch = await store.batch(batch.id)
        assert batch is not None
        ids = await store.batch_item_ids(batch.id)
        requeued_at = time.time()
        outcomes = [Outcome(provider_custom_id(i, instance), "errored", None, None, None, True) for i in ids]
        # Another database's answers (same item ids, another instance) are ignored and counted.
        outcomes += [Outcome(provider_custom_id(i, "f" * 32), "succeeded", {}, None, None, False) for i in ids]
        attempts_seen: list[int] = []

        def retry_at(attempts: int) -> float:
            attempts_seen.append(attempts)
            return requeued_at + retry_delay(attempts, 10.0, 1000.0)

        # Policy decides (batchd/policy.py), the store records: as the poller does.
        by_item, foreign = index_outcomes(outcomes, instance)
        waiting = await store.submitted_items(batch.id, list(by_item))
        finals, retries, ignored = decide(batch, waiting, by_item, max_attempts=3, retry_at=retry_at)
        summary = await store.record_outcomes(batch.id, finals, retries)
        assert (summary.requeued, summary.final, foreign + ignored + summary.ignored) == (20, 0, 20)
        assert attempts_seen == [1] * 20
        # Nothing is due at once: each request waits its own jittered backoff.
        assert await store.queued_groups(time.time()) == []
        due = await store.next_not_before(time.time())
        assert due is not None and requeued_at + 5.0 <= due <= requeued_at + 10.0
        [group] = await store.queued_groups(requeued_at + 10.0)
        assert group.count == 20
        # Their age counts from the requeue, so they wait for max_wait together like fresh work.
        assert group.oldest >= requeued_at - 0.001
    finally:
        await store.close()


# -- daemon against the emulator ------------------------------------------------------------------


async def wait_log(emu: RunningEmulator, predicate: Any, timeout: float = 30) -> Any:
    async def check() -> Any:
        return predicate(await emulator_stats(emu))

    return await wait_until(check, timeout=timeout)


def remote_batches(stats: dict[str, Any], vendor: str) -> list[str]:
    """The remote batches of `vendor`, in creation order."""
    seen: dict[str, None] = {}
    for batches in stats[vendor]["custom_ids"].values():
        for batch in batches:
            seen.setdefault(batch)
    return list(seen)


async def ended_batches(settings: Any) -> list[dict[str, Any]]:
    snap = await snapshot(settings)
    assert snap is not None
    return list(snap["ended_batches"])


async def test_a_deleted_output_file_ends_in_output_unavailable_without_paying_twice(tmp_path: Path) -> None:
    lines = [chat_line(n) for n in range(20)] + [chat_line(100 + n, max_tokens=0) for n in range(3)]
    async with emulator_with(Faults(lose_output=True)) as emu:
        settings = make_settings(tmp_path, emu)
        async with daemon_in_process(settings) as (_daemon, task):
            drop(settings, "lost.jsonl", lines)
            results = await wait_results(out_path(settings.daemon.spool_dir, "lost"), task, timeout=30)
            ended = await ended_batches(settings)
        stats = await emulator_stats(emu)
    by_id = assert_one_result_per_line(results, lines)
    for line in lines[:20]:
        result = by_id[line["custom_id"]]
        assert result["status"] == "errored" and result["error"]["code"] == "output_unavailable"
    for line in lines[20:]:  # the error file was still there: those keep the provider's own error
        assert by_id[line["custom_id"]]["error"]["status_code"] == 400
    assert stats["openai"]["batches_created"] == 1, "finished requests were paid for again"
    assert [b["fate"] for b in ended] == ["output_unavailable"]


async def test_lost_anthropic_results_end_in_output_unavailable(tmp_path: Path) -> None:
    lines = [claude_line(n) for n in range(10)]
    async with emulator_with(Faults(lose_output=True)) as emu:
        settings = make_settings(tmp_path, emu)
        async with daemon_in_process(settings) as (_daemon, task):
            drop(settings, "gone.jsonl", lines)
            results = await wait_results(out_path(settings.daemon.spool_dir, "gone"), task, timeout=30)
        stats = await emulator_stats(emu)
    by_id = assert_one_result_per_line(results, lines)
    assert {(r["status"], r["error"]["code"]) for r in by_id.values()} == {("errored", "output_unavailable")}
    assert stats["anthropic"]["batches_created"] == 1


@pytest.mark.parametrize("vendor", ["openai", "anthropic"])
async def test_a_batch_deleted_at_the_provider_requeues_its_requests_once(tmp_path: Path, vendor: str) -> None:
    lines = [chat_line(n) for n in range(10)] if vendor == "openai" else [claude_line(n) for n in range(10)]
    async with emulator_with(processing_seconds=60) as emu:
        settings = make_settings(tmp_path, emu)
        async with daemon_in_process(settings) as (_daemon, task):
            drop(settings, "vanish.jsonl", lines)
            stats = await wait_log(emu, lambda s: s if s[vendor]["batches_created"] == 1 else None)
            [first] = remote_batches(stats, vendor)
            await admin(emu, "DELETE", f"/_emulator/batches/{first}")
            await admin(emu, "PUT", "/_emulator/config", {"processing_seconds": 0.2})
            results = await wait_results(out_path(settings.daemon.spool_dir, "vanish"), task, timeout=30)
            ended = await ended_batches(settings)
        stats = await emulator_stats(emu)
    by_id = assert_one_result_per_line(results, lines)
    for line in lines:
        assert by_id[line["custom_id"]]["status"] == "succeeded"
        assert by_id[line["custom_id"]]["response"]["id"] == expected_response_id(line)
    assert stats[vendor]["batches_created"] == 2
    assert Counter(len(b) for b in all_custom_ids(stats).values()) == {2: 10}
    assert [b["fate"] for b in ended] == ["vanished"]


async def test_a_batch_running_past_its_window_is_cancelled_and_only_its_unfinished_requests_return(
    tmp_path: Path,
) -> None:
    lines = [chat_line(n) for n in range(20)]
    async with emulator_with(processing_seconds=8) as emu:
        settings = make_settings(tmp_path, emu, completion_window=1.5, expiry_grace=1.0, max_attempts=3)
        async with daemon_in_process(settings) as (_daemon, task):
            drop(settings, "slow.jsonl", lines)
            stats = await wait_log(emu, lambda s: s if s["openai"]["batches_created"] == 1 else None)
            [first] = remote_batches(stats, "openai")
            # Kept in_progress past its window, whatever happens to its work.
            await admin(emu, "PATCH", f"/_emulator/batches/{first}", {"hold": True})

            async def cancelled() -> bool:
                data = await admin(emu, "PATCH", f"/_emulator/batches/{first}", {})
                return bool(data["status"] in ("cancelling", "cancelled"))

            await wait_until(cancelled, timeout=30)
            await admin(emu, "PUT", "/_emulator/config", {"processing_seconds": 0.2})
            results = await wait_results(out_path(settings.daemon.spool_dir, "slow"), task, timeout=30)
            ended = await ended_batches(settings)
        stats = await emulator_stats(emu)
        first_batch = await admin(emu, "PATCH", f"/_emulator/batches/{first}", {})
    by_id = assert_one_result_per_line(results, lines)
    assert {r["status"] for r in by_id.values()} == {"succeeded"}
    finished_first = first_batch["request_counts"]["completed"]
    assert first_batch["status"] == "cancelled" and 0 < finished_first < len(lines)
    kept = [r for r in by_id.values() if r["batch_id"] == first]
    assert len(kept) == finished_first, "what the cancelled batch finished was not kept"
    # Only the unfinished ones went out again, once.
    assert Counter(len(b) for b in all_custom_ids(stats).values()) == {1: finished_first, 2: 20 - finished_first}
    assert [b["fate"] for b in ended] == ["overdue_cancelled"]


async def test_an_unknown_status_is_logged_once_and_runs_into_the_deadline(tmp_path: Path) -> None:
    lines = [claude_line(n) for n in range(10)]
    async with emulator_with(processing_seconds=60) as emu:
        settings = make_settings(tmp_path, emu, completion_window=1.0, expiry_grace=1.0, max_attempts=3)
        async with daemon_in_process(settings) as (_daemon, task):
            drop(settings, "odd.jsonl", lines)
            stats = await wait_log(emu, lambda s: s if s["anthropic"]["batches_created"] == 1 else None)
            [first] = remote_batches(stats, "anthropic")
            await admin(emu, "PATCH", f"/_emulator/batches/{first}", {"status": "quarantined", "hold": True})

            async def status_error() -> bool:
                snap = await snapshot(settings)
                return bool(snap and any("quarantined" in str(b["last_error"]) for b in snap["batches"]))

            async def cancelled() -> bool:
                snap = await snapshot(settings)
                return bool(snap and any(e["event"] == "batch.overdue_cancelled" for e in snap["errors"]))

            await wait_until(status_error, timeout=30)
            await wait_until(cancelled, timeout=30)
            await admin(emu, "PUT", "/_emulator/config", {"processing_seconds": 0.2})
            results = await wait_results(out_path(settings.daemon.spool_dir, "odd"), task, timeout=30)
            snap = await snapshot(settings)
        stats = await emulator_stats(emu)
    by_id = assert_one_result_per_line(results, lines)
    assert {r["status"] for r in by_id.values()} == {"succeeded"}
    assert stats["anthropic"]["batches_created"] == 2
    assert snap is not None
    events = Counter(e["event"] for e in snap["errors"])
    assert events["batch.unknown_status"] == 1 and events["batch.overdue_cancelled"] == 1


async def test_an_expired_batch_whose_files_are_named_late_is_polled_again_before_anything_is_requeued(
    tmp_path: Path,
) -> None:
    lines = [chat_line(n) for n in range(40)]
    async with emulator_with(Faults(late_output_file=True), processing_seconds=30) as emu:
        settings = make_settings(tmp_path, emu)
        async with daemon_in_process(settings) as (_daemon, task):
            drop(settings, "late.jsonl", lines)
            stats = await wait_log(emu, lambda s: s if s["openai"]["batches_created"] == 1 else None)
            [first] = remote_batches(stats, "openai")
            await admin(emu, "POST", f"/_emulator/batches/{first}/expire", {"completed_fraction": 0.5})
            await admin(emu, "PUT", "/_emulator/config", {"processing_seconds": 0.2})
            results = await wait_results(out_path(settings.daemon.spool_dir, "late"), task, timeout=30)
        stats = await emulator_stats(emu)
    by_id = assert_one_result_per_line(results, lines)
    assert {r["status"] for r in by_id.values()} == {"succeeded"}
    assert stats["faults_injected"]["late_output_files"] >= 1  # the expired batch's files came late
    # The finished half was taken from the expired batch, not paid for again.
    assert Counter(len(b) for b in all_custom_ids(stats).values()) == {1: 20, 2: 20}
    assert sum(r["batch_id"] == first for r in by_id.values()) == 20


async def test_a_results_url_on_another_host_is_refused_and_that_host_never_sees_the_key(tmp_path: Path) -> None:
    seen: list[dict[str, str]] = []

    async def record(request: web.Request) -> web.Response:
        seen.append(dict(request.headers))
        return web.Response(status=404)

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", record)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.2", 0)
    await site.start()
    port = runner.addresses[0][1]
    try:
        lines = [claude_line(n) for n in range(5)]
        async with emulator_with(Faults(results_url_base=f"http://127.0.0.2:{port}")) as emu:
            settings = make_settings(tmp_path, emu)
            async with daemon_in_process(settings) as (_daemon, task):
                drop(settings, "foreign.jsonl", lines)
                results_path = out_path(settings.daemon.spool_dir, "foreign")
                await wait_until(lambda: seen or results_path.exists() or task.done(), timeout=30)
                assert not seen, f"a request went to the foreign host: {seen[0]}"
                results = await wait_results(results_path, task, timeout=30)
                snap = await snapshot(settings)
            stats = await emulator_stats(emu)
    finally:
        await runner.cleanup()
    assert not seen
    by_id = assert_one_result_per_line(results, lines)
    assert {(r["status"], r["error"]["code"]) for r in by_id.values()} == {("errored", "output_unavailable")}
    assert stats["anthropic"]["batches_created"] == 1
    assert snap is not None and [b["fate"] for b in snap["ended_batches"]] == ["output_unavailable"]
    assert "refused" in str(snap["ended_batches"][0]["last_error"])
