"""Capacity gating before the provider says no (issue 11), against the emulator's own bookkeeping.

Not circular: batchd estimates enqueued tokens its way (capacity.estimate_tokens: bytes / 3 of the
whole body), the emulator counts its own way (responses.estimate_input_tokens: characters / 4 of
the text, plus per-message overhead) and enforces the limit on its count; peak_enqueued is the
emulator's record of the most it ever held, so a gate that let too much through shows there. Where
batchd's estimate under-counts relative to what the emulator enforces, the first
token_limit_exceeded lowers the learned limit and the rest drains without another.

The daemon runs in-process (for `hold_base` and its store); the pure parts of the planner are
unit-tested at the end.
"""

from __future__ import annotations

import math
from collections import Counter
from pathlib import Path
from typing import Any

import orjson
import pytest

from batchd.capacity import usable
from batchd.daemon import Daemon
from batchd.deadlines import FlushReason, FlushRules, QueueView, plan_flush
from batchd.emulator import EmulatorConfig, Faults
from batchd.emulator.responses import estimate_input_tokens
from batchd.planner import UNTIL_A_BATCH_ENDS, Capacity, usable_tokens
from batchd.settings import ProviderProfile, Settings
from batchd.spool import request_capacity
from batchd.status import snapshot
from batchd.store.contract import BatchRow, Budget

from .conftest import make_settings, wait_until
from .test_faults import (
    claude_line,
    daemon_in_process,
    drop,
    emulator_stats,
    emulator_with,
    out_path,
    sdk_clients,
    wait_results,
)

CHAT = "/v1/chat/completions"


def ticket(n: int) -> dict[str, Any]:
    """A chat line of a fixed size (the number is padded), so every request estimates the same."""
    text = f"Ticket {n:06d}: " + "the parcel did not arrive and nobody answers the phone. " * 4
    return {
        "custom_id": f"t-{n}",
        "method": "POST",
        "url": CHAT,
        "body": {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": text}], "max_tokens": 8},
    }


def both_counts(line: dict[str, Any]) -> tuple[int, int]:
    """(batchd's estimate, the emulator's own count) of one line's enqueued tokens."""
    ours, _inputs = request_capacity(line["url"], orjson.dumps(line["body"]))
    return ours, estimate_input_tokens(line["url"], line["body"])


def with_profile(settings: Settings, name: str, **fields: Any) -> Settings:
    """The settings with profile `name` changed (validated again, as a config file would be)."""
    current = settings.providers[name].model_dump(exclude={"max_requests", "max_bytes"}, exclude_unset=True)
    settings.providers[name] = ProviderProfile(**{**current, **fields})
    return settings


async def all_batches(daemon: Daemon) -> list[BatchRow]:
    return await daemon.store.recent_batches(1000)


# -- enqueued tokens (OpenAI) ---------------------------------------------------------------------


async def test_enqueued_token_limit_is_never_exceeded_while_five_times_the_limit_drains(tmp_path: Path) -> None:
    ours, theirs = both_counts(ticket(0))
    assert ours > theirs, "batchd's estimate over-counts the emulator's own count here"
    limit = math.ceil(40 * ours / 0.9)  # the gate's usable share (margin 0.1) holds 40 requests
    lines = [ticket(n) for n in range(math.ceil(5 * limit / theirs))]  # 5x the limit, counted the emulator's way
    async with emulator_with(Faults(token_limits={"gpt-4o-mini": limit})) as emu:
        settings = with_profile(make_settings(tmp_path, emu), "openai", enqueued_tokens=limit, capacity_margin=0.1)
        async with daemon_in_process(settings) as (daemon, task):
            drop(settings, "big.jsonl", lines)
            results = await wait_results(out_path(settings.daemon.spool_dir, "big"), task, timeout=120)
            batches = await all_batches(daemon)
        stats = await emulator_stats(emu)
    assert Counter(r["status"] for r in results) == {"succeeded": len(lines)}
    assert stats["failed_batches"] == {}  # not one token_limit_exceeded
    assert stats["peak_enqueued"]["gpt-4o-mini"] <= limit
    # One group of 5x the limit, split into batches that each fit the usable limit.
    assert len(batches) >= 5 and sum(b.requests for b in batches) == len(lines)
    assert all(b.tokens <= usable(limit, 0.1) for b in batches)
    assert {b.tokens for b in batches} >= {40 * ours}  # full batches, estimated exactly as ingested


async def test_a_limit_lower_than_declared_is_learned_from_the_first_refusal(tmp_path: Path) -> None:
    ours, theirs = both_counts(ticket(0))
    declared = math.ceil(100 * ours / 0.9)  # usable: 100 requests
    # The emulator holds 95 requests' worth its way: the first batch (100) is refused; the learned
    # limit (90% of what was refused: 90 requests) fits.
    enforced = 95 * theirs
    lines = [ticket(n) for n in range(5 * 95)]
    async with emulator_with(Faults(token_limits={"gpt-4o-mini": enforced})) as emu:
        settings = with_profile(make_settings(tmp_path, emu), "openai", enqueued_tokens=declared)
        async with daemon_in_process(settings, hold_base=0.2) as (daemon, task):
            drop(settings, "tight.jsonl", lines)
            results = await wait_results(out_path(settings.daemon.spool_dir, "tight"), task, timeout=120)
            learned = await daemon.store.learned_limits()
            status = await snapshot(settings)
        stats = await emulator_stats(emu)
    assert Counter(r["status"] for r in results) == {"succeeded": len(lines)}
    assert stats["failed_batches"] == {"token_limit_exceeded": 1}
    assert stats["peak_enqueued"]["gpt-4o-mini"] <= enforced
    assert learned == {("openai", "gpt-4o-mini"): math.floor(100 * ours * 0.9)}
    assert status is not None
    [shown] = [c for c in status["capacity"] if c["model"] == "gpt-4o-mini"]
    tokens = shown["enqueued_tokens"]
    assert (tokens["limit"], tokens["learned"], tokens["usable"]) == (declared, 90 * ours, 90 * ours)


# -- queued requests (Anthropic), batches per hour, embedding inputs -----------------------------------


async def test_anthropic_queued_requests_stay_under_the_queue_limit(tmp_path: Path) -> None:
    lines = [claude_line(n) for n in range(60)]
    async with emulator_with(Faults(anthropic_queue_limit=20)) as emu:
        settings = with_profile(make_settings(tmp_path, emu), "anthropic", queued_requests=20)
        async with daemon_in_process(settings) as (daemon, task):
            drop(settings, "claude.jsonl", lines)
            results = await wait_results(out_path(settings.daemon.spool_dir, "claude"), task, timeout=120)
            batches = await all_batches(daemon)
        stats = await emulator_stats(emu)
    assert Counter(r["status"] for r in results) == {"succeeded": 60}
    assert stats["queue_limited"] == 0  # the emulator never had to answer 429
    assert stats["peak_enqueued"]["anthropic"] <= 20
    assert max(b.requests for b in batches) == usable(20, 0.1)  # 18: the margin kept free


async def test_batches_per_hour_waits_for_the_next_slot_and_status_says_so(tmp_path: Path) -> None:
    async with emulator_with() as emu:
        settings = with_profile(make_settings(tmp_path, emu), "openai", batches_per_hour=2, max_requests=4)
        async with daemon_in_process(settings) as (daemon, _task):
            drop(settings, "hourly.jsonl", [ticket(n) for n in range(10)])

            async def two_collected() -> dict[str, Any] | None:
                snap = await snapshot(settings)
                return snap if snap and snap["results"].get("succeeded") == 8 else None

            status = await wait_until(two_collected, 60)
            stats = await emulator_stats(emu)
            created = sorted(b.submitted_at or 0 for b in await all_batches(daemon))
    assert stats["openai"]["batches_created"] == 2
    [flush] = status["next_flush"]
    assert (flush["queued"], flush["reason"], flush["blocked_by"]) == (2, "capacity", "batches_per_hour")
    assert flush["next_flush"] == pytest.approx(created[0] + 3600, abs=1.0)
    [room] = status["capacity"]
    assert room["batches_per_hour"]["used"] == 2 and room["batches_per_hour"]["free"] == 0


async def test_embedding_batches_count_inputs_not_requests(tmp_path: Path) -> None:
    lines = [
        {
            "custom_id": f"e-{n}",
            "method": "POST",
            "url": "/v1/embeddings",
            "body": {"model": "text-embedding-3-small", "input": [f"ticket {n} part {i}" for i in range(30)]},
        }
        for n in range(10)
    ]
    async with emulator_with() as emu:
        emu.state.limits.openai_max_embedding_inputs = 100  # the real cap is 50,000: same rule, smaller
        settings = with_profile(make_settings(tmp_path, emu), "openai", max_embedding_inputs=100)
        async with daemon_in_process(settings) as (daemon, task):
            drop(settings, "emb.jsonl", lines)
            results = await wait_results(out_path(settings.daemon.spool_dir, "emb"), task, timeout=60)
            batches = await all_batches(daemon)
        stats = await emulator_stats(emu)
    assert Counter(r["status"] for r in results) == {"succeeded": 10}
    assert stats["failed_batches"] == {}  # no too_many_embedding_inputs
    assert sorted(b.inputs for b in batches) == [30, 90, 90, 90]


# -- completion_window per profile ----------------------------------------------------------------------


async def test_a_profile_window_is_sent_on_create_where_the_host_offers_it(tmp_path: Path) -> None:
    async with emulator_with(completion_windows=("24h", "1h")) as emu:
        settings = with_profile(make_settings(tmp_path, emu), "openai", completion_window="1h")
        async with daemon_in_process(settings) as (_daemon, task):
            drop(settings, "hour.jsonl", [ticket(n) for n in range(3)])
            results = await wait_results(out_path(settings.daemon.spool_dir, "hour"), task)
        async with sdk_clients(emu) as (oai, _ant):
            windows = {b.completion_window async for b in oai.batches.list(limit=10)}
    assert {r["status"] for r in results} == {"succeeded"}
    assert windows == {"1h"}


async def test_a_window_the_host_does_not_offer_is_refused_by_default(tmp_path: Path) -> None:
    async with emulator_with() as emu:  # like OpenAI itself: "24h" only
        settings = with_profile(make_settings(tmp_path, emu), "openai", completion_window="1h")
        async with daemon_in_process(settings):
            drop(settings, "hour.jsonl", [ticket(n) for n in range(3)])

            async def refused() -> str | None:
                snap = await snapshot(settings)  # what `batchd status` shows
                errors = [b["last_error"] for b in (snap or {}).get("batches", []) if b["last_error"]]
                return errors[0] if errors else None

            error = await wait_until(refused, 30)
        stats = await emulator_stats(emu)
    assert "completion_window" in error and "'24h'" in error
    assert stats["openai"]["batches_created"] == 0


def test_emulator_config_defaults_to_openai_s_only_window() -> None:
    assert EmulatorConfig().completion_windows == ("24h",)


# -- the planner's pure parts --------------------------------------------------------------------------


def room(**fields: Any) -> Capacity:
    base: dict[str, Any] = {
        "profile": "openai",
        "model": "m",
        "in_flight_batches": 0,
        "max_in_flight": 5,
        "tokens": 0,
        "token_limit": None,
        "learned_limit": None,
        "token_room": None,
        "requests": 0,
        "request_limit": None,
        "request_room": None,
        "created_last_hour": 0,
        "batches_per_hour": None,
        "next_slot": 100.0,
    }
    return Capacity(**{**base, **fields})


def test_capacity_blocks_on_each_limit_and_says_which() -> None:
    now = 100.0
    assert room().blocked_until(now) is None and room().blocked_by(now) is None
    assert room(in_flight_batches=5).blocked_until(now) == UNTIL_A_BATCH_ENDS
    assert room(token_room=0).blocked_by(now) == "enqueued_tokens"
    assert room(request_room=-3).blocked_by(now) == "queued_requests"
    assert room(next_slot=900.0).blocked_until(now) == 900.0
    assert room(next_slot=900.0).blocked_by(now) == "batches_per_hour"


def test_a_claim_may_take_an_oversized_request_alone_only_with_nothing_in_flight() -> None:
    assert room(token_room=500).budget(None) == Budget(tokens=500, inputs=None, lone_oversize=True)
    assert room(token_room=200, tokens=300).budget(7) == Budget(tokens=200, inputs=7, lone_oversize=False)


def test_spending_capacity_counts_the_batch_until_the_next_pass() -> None:
    after = room(token_room=500, request_room=10, batches_per_hour=2, created_last_hour=1).spent(300, 4, 100.0)
    assert (after.token_room, after.tokens, after.request_room, after.in_flight_batches) == (200, 300, 6, 1)
    assert after.blocked_until(100.0) == 3700.0  # the hour's second batch: no slot before an hour has passed


def test_the_usable_token_limit_is_the_declared_less_the_margin_or_the_learned_if_lower() -> None:
    profile = ProviderProfile(kind="openai", enqueued_tokens={"gpt-4o*": 1000, "*": 50}, capacity_margin=0.1)
    assert usable_tokens(profile, "gpt-4o-mini", None) == 900
    assert usable_tokens(profile, "gpt-4o-mini", 800) == 800
    assert usable_tokens(profile, "gpt-4o-mini", 950) == 900
    assert usable_tokens(profile, "other", None) == 45
    assert usable_tokens(ProviderProfile(kind="openai"), "m", None) is None
    assert usable_tokens(ProviderProfile(kind="openai"), "m", 700) == 700  # learned with nothing declared


def test_a_forced_flush_ignores_age_size_and_window_but_not_capacity() -> None:
    rules = FlushRules(request_limit=100, byte_limit=10**6, max_wait=3600.0)
    forced = plan_flush(QueueView(1, 10, 99.0), rules, 100.0, forced=True)
    assert forced is not None and (forced.at, forced.reason) == (100.0, FlushReason.FORCED)
    gated = plan_flush(QueueView(1, 10, 99.0), rules, 100.0, forced=True, capacity_at=UNTIL_A_BATCH_ENDS)
    assert gated is not None and (gated.at, gated.reason) == (UNTIL_A_BATCH_ENDS, FlushReason.CAPACITY)
    held = plan_flush(QueueView(1, 10, 99.0), rules, 100.0, held_until=500.0, forced=True)
    assert held is not None and held.reason is FlushReason.HELD
