"""Deadlines and when a route's queue flushes (issue 11), as pure functions the batcher and `status` share.

A request may carry a deadline (unix time): its result must exist by then. Work with a deadline
does not wait for a full batch or for a submission window: it flushes once waiting longer would
leave less than `lead` plus the expected batch turnaround before the deadline. When the deadline
minus `lead` comes and a request still has no result, its batch is cancelled and the rest goes
through the real-time API (see realtime.py); `cancel_wait` bounds how long the fallback waits for
the cancelled batch to end, so what it finished is collected rather than paid for twice.
"""

from __future__ import annotations

import enum
import re
from dataclasses import dataclass
from datetime import datetime

from .schedule import Window, as_datetime

_RELATIVE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(s|m|h|d)\s*$")
_UNITS = {"s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}


class DeadlineError(ValueError):
    """A deadline that cannot be understood."""


def parse_deadline(text: str, arrival: float) -> float:
    """Unix time of a deadline: ISO 8601 with a UTC offset ('2026-12-01T07:00+01:00'), or relative
    to `arrival` ('8h', '90m', '2d'). A time without an offset is refused: it would be read in
    whatever zone the daemon runs in, not the producer's."""
    match = _RELATIVE.match(text)
    if match:
        return arrival + float(match.group(1)) * _UNITS[match.group(2)]
    try:
        moment = datetime.fromisoformat(text.strip())
    except ValueError:
        raise DeadlineError(f"deadline {text!r}: expected ISO 8601 such as 2026-12-01T07:00+01:00, or 8h") from None
    if moment.tzinfo is None:
        raise DeadlineError(f"deadline {text!r} has no UTC offset (add +01:00, Z, ...)")
    return moment.timestamp()


def fallback_due(deadline: float | None, lead: float, now: float) -> bool:
    """True once a request without a result must leave its batch for the real-time API."""
    return deadline is not None and now >= deadline - lead


def cancel_wait(lead: float, fraction: float = 0.25) -> float:
    """How long the fallback waits for a cancelled batch to end before sending the rest anyway."""
    return max(0.0, lead * fraction)


class FlushReason(enum.StrEnum):
    """Why a queue flushes when it does (shown by `batchd status`, logged on batch.flushed)."""

    FULL = "full"
    AGE = "age"
    DEADLINE = "deadline"
    SCHEDULE = "schedule"
    HELD = "held"
    CAPACITY = "capacity"
    FORCED = "forced"


@dataclass(frozen=True)
class QueueView:
    """What the planner needs to know about one route's queue."""

    count: int
    bytes: int
    oldest: float
    earliest_deadline: float | None = None


@dataclass(frozen=True)
class FlushRules:
    """A route's flush settings."""

    request_limit: int
    byte_limit: int
    max_wait: float
    deadline_lead: float = 3600.0
    turnaround: float = 3600.0  # how long a batch is expected to take, for deadline flushes
    window: Window | None = None


@dataclass(frozen=True)
class FlushPlan:
    """When the queue flushes next, and why; `at <= now` means now."""

    at: float
    reason: FlushReason


def plan_flush(
    queue: QueueView,
    rules: FlushRules,
    now: float,
    held_until: float | None = None,
    capacity_at: float | None = None,
    forced: bool = False,
) -> FlushPlan | None:
    """The next flush of one route's queue (None when nothing is queued).

    Order of precedence: a hold (operator pause or provider back-off) stops everything until it
    lifts; a forced flush (`batchd flush`) goes now, whatever max_wait, size or window say;
    otherwise the queue goes when full, when its oldest request has waited max_wait, or when a
    deadline demands it, whichever is first, but not outside the submission window unless a
    deadline demands it. Either way, not before capacity frees up (`capacity_at`; math.inf: when
    a batch ends): a forced flush never overrides a limit.
    """
    if queue.count <= 0:
        return None
    if held_until is not None and held_until > now:
        return FlushPlan(held_until, FlushReason.HELD)
    plan = FlushPlan(now, FlushReason.FORCED) if forced else _unforced(queue, rules, now)
    if capacity_at is not None and capacity_at > max(plan.at, now):
        plan = FlushPlan(capacity_at, FlushReason.CAPACITY)
    return plan


def _unforced(queue: QueueView, rules: FlushRules, now: float) -> FlushPlan:
    full = queue.count >= rules.request_limit or queue.bytes >= rules.byte_limit
    candidates = [
        FlushPlan(now if full else float("inf"), FlushReason.FULL),
        FlushPlan(queue.oldest + rules.max_wait, FlushReason.AGE),
    ]
    deadline_at = None
    if queue.earliest_deadline is not None:
        deadline_at = queue.earliest_deadline - rules.deadline_lead - rules.turnaround
        candidates.append(FlushPlan(deadline_at, FlushReason.DEADLINE))
    # Due now for several reasons: the first listed (full, age, deadline) names it.
    plan = min(candidates, key=lambda p: max(p.at, now))
    if rules.window is not None and plan.reason is not FlushReason.DEADLINE:
        opening = rules.window.next_open(as_datetime(max(plan.at, now)))
        opens_at = opening.timestamp() if opening is not None else float("inf")
        if opens_at > max(plan.at, now):
            plan = FlushPlan(opens_at, FlushReason.SCHEDULE)
            if deadline_at is not None and deadline_at < opens_at:
                plan = FlushPlan(deadline_at, FlushReason.DEADLINE)  # never wait past a deadline
    return plan
