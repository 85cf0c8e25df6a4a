"""Submission windows and capacity arithmetic: pure functions, checked against hand-worked cases."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import orjson
import pytest

from batchd import capacity
from batchd.emulator.responses import estimate_input_tokens
from batchd.schedule import ScheduleError, Window

BERLIN_NOON = datetime(2026, 12, 1, 11, 0, tzinfo=UTC)  # 12:00 in Berlin (CET, UTC+1)


def utc(*args: int) -> datetime:
    return datetime(*args, tzinfo=UTC)


def test_overnight_range_opens_in_the_evening_and_closes_in_the_morning() -> None:
    window = Window.daily(["22:00-06:00"], "Europe/Berlin")
    assert not window.is_open(BERLIN_NOON)
    assert window.next_open(BERLIN_NOON) == utc(2026, 12, 1, 21, 0)
    assert window.is_open(utc(2026, 12, 2, 4, 59))
    assert not window.is_open(utc(2026, 12, 2, 5, 0))  # 06:00 Berlin: end is exclusive
    assert window.closes_at(utc(2026, 12, 1, 23, 0)) == utc(2026, 12, 2, 5, 0)


def test_open_now_means_next_open_is_now() -> None:
    window = Window.daily(["09:00-17:00"], "UTC")
    at = utc(2026, 12, 1, 10, 30)
    assert window.next_open(at) == at


def test_touching_ranges_make_one_opening() -> None:
    window = Window.daily(["22:00-24:00", "00:00-06:00"], "UTC")
    assert window.closes_at(utc(2026, 12, 1, 23, 0)) == utc(2026, 12, 2, 6, 0)
    assert Window.daily(["00:00-24:00"]).is_open(utc(2026, 12, 1, 0, 0))


def test_daylight_saving_keeps_wall_clock_times() -> None:
    window = Window.daily(["01:00-05:00"], "Europe/Berlin")
    # The night of 2027-03-28 loses an hour at 02:00: the window is 01:00 CET to 05:00 CEST.
    opening = window.next_open(utc(2027, 3, 27, 12, 0))
    assert opening == utc(2027, 3, 28, 0, 0)
    assert window.closes_at(opening) == utc(2027, 3, 28, 3, 0)


def test_cron_window_fires_on_weekdays_for_its_duration() -> None:
    window = Window.from_cron("0 22 * * 1-5", timedelta(hours=8), "Europe/Berlin")
    saturday_night = utc(2026, 12, 5, 22, 0)
    assert not window.is_open(saturday_night)
    assert window.next_open(saturday_night) == utc(2026, 12, 7, 21, 0)  # Monday 22:00 Berlin
    friday_fire = utc(2026, 12, 4, 21, 0)
    assert window.is_open(friday_fire + timedelta(hours=7, minutes=59))
    assert not window.is_open(friday_fire + timedelta(hours=8))


@pytest.mark.parametrize(
    ("make", "words"),
    [
        (lambda: Window.daily(["25:00-06:00"]), "not a time of day"),
        (lambda: Window.daily(["10:00"]), "HH:MM-HH:MM"),
        (lambda: Window.daily(["06:00-06:00"]), "empty"),
        (lambda: Window.daily(["22:00-06:00"], "Mars/Olympus"), "unknown time zone"),
        (lambda: Window.from_cron("61 * * * *", timedelta(hours=1)), "cron"),
        (lambda: Window.from_cron("0 22 * * *", timedelta(0)), "positive duration"),
        (lambda: Window.from_cron("0 0 30 2 *", timedelta(hours=1)), "day-of-month"),
        (lambda: Window.from_cron("0 0 29 2 *", timedelta(hours=1)), "does not fire"),
    ],
)
def test_bad_windows_are_refused_with_the_reason(make: object, words: str) -> None:
    with pytest.raises(ScheduleError, match=words):
        make()  # type: ignore[operator]


def chat(text: str) -> tuple[dict[str, object], int]:
    body = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": text}]}
    return body, len(orjson.dumps(body))


@pytest.mark.parametrize("text", ["hello", "word " * 500, "日本語のテキスト" * 100, ""])
def test_estimate_over_counts_the_emulators_own_count(text: str) -> None:
    """batchd's estimate differs from the emulator's (bytes/3 vs characters/4) and stays above it."""
    body, size = chat(text)
    ours = capacity.estimate_tokens("/v1/chat/completions", body, size)
    theirs = estimate_input_tokens("/v1/chat/completions", body)
    assert ours > theirs


def test_token_arrays_are_counted_per_id_not_per_byte() -> None:
    ids = list(range(100_000, 100_500))
    body = {"model": "text-embedding-3-small", "input": ids}
    size = len(orjson.dumps(body))
    assert capacity.estimate_tokens("/v1/embeddings", body, size) == 500 + capacity.REQUEST_OVERHEAD
    assert capacity.estimate_tokens("/v1/embeddings", {"input": [ids, ids]}, size) == 1000 + capacity.REQUEST_OVERHEAD


def test_embedding_inputs() -> None:
    assert capacity.embedding_inputs({"input": "one"}) == 1
    assert capacity.embedding_inputs({"input": [1, 2, 3]}) == 1  # one input given as token ids
    assert capacity.embedding_inputs({"input": ["a", "b", "c"]}) == 3


def test_room_keeps_the_margin() -> None:
    assert capacity.room(None, 0.1, 10**9) is None
    assert capacity.room(1000, 0.1, 0) == 900
    assert capacity.room(1000, 0.1, 850) == 50
    assert capacity.room(1000, 0.1, 950) == 0


def test_split_fits_each_batch_and_isolates_an_oversized_request() -> None:
    assert capacity.split([3, 3, 3, 3], 7) == [2, 2]
    assert capacity.split([3, 10, 3], 7) == [1, 1, 1]
    assert capacity.split([], 7) == []
    sizes = [5] * 1000
    lengths = capacity.split(sizes, 1234)
    assert sum(lengths) == 1000 and all(n * 5 <= 1234 for n in lengths)


def test_learned_limit_only_lowers() -> None:
    assert capacity.lowered_limit(1000, 800) == 720
    assert capacity.lowered_limit(500, 800) == 500
    assert capacity.lowered_limit(1000, 0) == 1


def test_batches_per_hour_slot() -> None:
    now = 10_000.0
    created = [now - 3700, now - 3000, now - 10]
    assert capacity.batches_this_hour(created, now) == 2
    assert capacity.next_creation_slot(created, 3, now) == now
    assert capacity.next_creation_slot(created, 2, now) == now - 3000 + 3600


# Deadlines and the flush plan.

from batchd.deadlines import (  # noqa: E402
    DeadlineError,
    FlushReason,
    FlushRules,
    QueueView,
    cancel_wait,
    fallback_due,
    parse_deadline,
    plan_flush,
)

RULES = FlushRules(request_limit=100, byte_limit=10_000, max_wait=60.0, deadline_lead=600.0, turnaround=1800.0)


def test_deadlines_parse_absolute_with_offset_or_relative() -> None:
    assert parse_deadline("2026-12-01T07:00+01:00", 0) == utc(2026, 12, 1, 6, 0).timestamp()
    assert parse_deadline("2026-12-01T06:00Z", 0) == utc(2026, 12, 1, 6, 0).timestamp()
    assert parse_deadline("8h", 1000.0) == 1000.0 + 8 * 3600
    assert parse_deadline("90m", 0.0) == 5400.0
    with pytest.raises(DeadlineError, match="no UTC offset"):
        parse_deadline("2026-12-01T07:00", 0)
    with pytest.raises(DeadlineError, match="ISO 8601"):
        parse_deadline("tomorrow", 0)


def test_fallback_is_due_at_deadline_minus_lead() -> None:
    assert not fallback_due(None, 600, 10**10)
    assert not fallback_due(10_000, 600, 9_399)
    assert fallback_due(10_000, 600, 9_400)
    assert cancel_wait(600) == 150


def test_plan_full_age_and_empty() -> None:
    assert plan_flush(QueueView(0, 0, 0.0), RULES, 100.0) is None
    full = plan_flush(QueueView(100, 10, 90.0), RULES, 100.0)
    assert full is not None and (full.at, full.reason) == (100.0, FlushReason.FULL)
    aging = plan_flush(QueueView(5, 10, 90.0), RULES, 100.0)
    assert aging is not None and (aging.at, aging.reason) == (150.0, FlushReason.AGE)


def test_an_early_deadline_does_not_wait_for_a_full_batch_or_max_age() -> None:
    rules = FlushRules(request_limit=100, byte_limit=10**6, max_wait=86_400.0, deadline_lead=600.0, turnaround=1800.0)
    plan = plan_flush(QueueView(5, 10, 0.0, earliest_deadline=5000.0), rules, 100.0)
    assert plan is not None and (plan.at, plan.reason) == (2600.0, FlushReason.DEADLINE)


def test_window_defers_but_never_past_a_deadline() -> None:
    night = Window.daily(["22:00-06:00"], "UTC")
    rules = FlushRules(100, 10**6, 60.0, deadline_lead=600.0, turnaround=1800.0, window=night)
    noon = utc(2026, 12, 1, 12, 0).timestamp()
    plan = plan_flush(QueueView(100, 10, noon - 10), rules, noon)
    assert plan is not None and plan.reason is FlushReason.SCHEDULE
    assert plan.at == utc(2026, 12, 1, 22, 0).timestamp()
    urgent = plan_flush(QueueView(1, 10, noon, earliest_deadline=noon + 7200), rules, noon)
    assert urgent is not None and urgent.reason is FlushReason.DEADLINE and urgent.at == noon + 7200 - 2400
    inside = plan_flush(QueueView(100, 10, noon), rules, utc(2026, 12, 1, 23, 0).timestamp())
    assert inside is not None and inside.reason is FlushReason.FULL


def test_holds_and_capacity_come_first_and_force_goes_now() -> None:
    held = plan_flush(QueueView(100, 10, 0.0), RULES, 100.0, held_until=500.0)
    assert held is not None and (held.at, held.reason) == (500.0, FlushReason.HELD)
    gated = plan_flush(QueueView(100, 10, 0.0), RULES, 100.0, capacity_at=300.0)
    assert gated is not None and (gated.at, gated.reason) == (300.0, FlushReason.CAPACITY)
    forced = plan_flush(QueueView(1, 10, 99.0), RULES, 100.0, forced=True)
    assert forced is not None and (forced.at, forced.reason) == (100.0, FlushReason.FORCED)
