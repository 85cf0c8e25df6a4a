"""When each route's queue flushes next and how much room the provider has for it: the one
computation the batcher acts on and `batchd status` and the status page show.

It reads what it needs from the store (queued groups, each group's earliest deadline, holds and
pauses, `batchd flush` requests, live usage over every node, learned limits) and decides with the
pure functions of deadlines.py (plan_flush) and capacity.py (usable, next_creation_slot).

Capacity is per (profile, model), against the limits the profile declares (see settings):
- enqueued tokens per model (OpenAI): the estimated tokens of the model's live batches, under
  min(declared less capacity_margin, the limit learned from token_limit_exceeded); a learned limit
  applies even where none is declared;
- queued requests (Anthropic): requests in the profile's live batches, under the declared number
  less capacity_margin;
- batches per hour: creations in the last hour (capacity.next_creation_slot);
- max_in_flight: live batches of the profile.
Live batches include intents not yet created (they are about to be), so two passes never both
spend the same room.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from .capacity import next_creation_slot, usable
from .deadlines import FlushPlan, FlushReason, FlushRules, QueueView, plan_flush
from .ops import ANY, held_until
from .settings import ProviderProfile, Settings
from .store.contract import Budget, Group, Queue

# A route blocked until one of its batches ends has no known time: plan_flush gets this.
UNTIL_A_BATCH_ENDS = math.inf
HOUR = 3600.0


@dataclass(frozen=True, slots=True)
class Capacity:
    """What one (profile, model) has in flight at the provider now, against its limits."""

    profile: str
    model: str
    in_flight_batches: int
    max_in_flight: int
    tokens: int  # estimated enqueued tokens in the model's live batches
    token_limit: int | None  # declared (enqueued_tokens)
    learned_limit: int | None  # learned from token_limit_exceeded
    token_room: int | None  # what may still be enqueued (None: no limit)
    requests: int  # requests in the profile's live batches
    request_limit: int | None  # declared (queued_requests)
    request_room: int | None
    created_last_hour: int
    batches_per_hour: int | None
    next_slot: float  # when the next batch may be created (now when there is room)
    usable_tokens: int | None = None  # the token limit the gate holds to (margin and learned limit applied)

    def blocked_until(self, now: float) -> float | None:
        """None while a batch may be created now; else when it may (UNTIL_A_BATCH_ENDS: unknown)."""
        if (
            self.in_flight_batches >= self.max_in_flight
            or (self.token_room is not None and self.token_room <= 0)
            or (self.request_room is not None and self.request_room <= 0)
        ):
            return UNTIL_A_BATCH_ENDS
        if self.next_slot > now:
            return self.next_slot
        return None

    def blocked_by(self, now: float) -> str | None:
        """Which limit blocks the route now, in the words status shows (None: none)."""
        if self.in_flight_batches >= self.max_in_flight:
            return "max_in_flight"
        if self.token_room is not None and self.token_room <= 0:
            return "enqueued_tokens"
        if self.request_room is not None and self.request_room <= 0:
            return "queued_requests"
        if self.next_slot > now:
            return "batches_per_hour"
        return None

    def budget(self, embedding_inputs: int | None) -> Budget:
        """What the next claim may take: the token room, and alone an oversized request only when
        nothing of the model is in flight (then the room is the whole limit: capacity.split)."""
        return Budget(tokens=self.token_room, inputs=embedding_inputs, lone_oversize=self.tokens == 0)

    def spent(self, tokens: int, requests: int, now: float) -> Capacity:
        """The capacity left after a batch of `tokens` and `requests` was claimed at `now`."""
        batches = self.created_last_hour + 1
        full_hour = self.batches_per_hour is not None and batches >= self.batches_per_hour
        return Capacity(
            profile=self.profile,
            model=self.model,
            in_flight_batches=self.in_flight_batches + 1,
            max_in_flight=self.max_in_flight,
            tokens=self.tokens + tokens,
            token_limit=self.token_limit,
            learned_limit=self.learned_limit,
            token_room=None if self.token_room is None else self.token_room - tokens,
            requests=self.requests + requests,
            request_limit=self.request_limit,
            request_room=None if self.request_room is None else self.request_room - requests,
            created_last_hour=batches,
            batches_per_hour=self.batches_per_hour,
            # Conservative within one pass: the exact slot comes from the store at the next one.
            next_slot=now + HOUR if full_hour else self.next_slot,
            usable_tokens=self.usable_tokens,
        )

    def as_json(self, now: float) -> dict[str, Any]:
        """`batchd status --json`'s `capacity` entry: used and free for every declared limit."""

        def limit(used: int, declared: int | None, room: int | None, **extra: Any) -> dict[str, Any] | None:
            if declared is None and room is None:
                return None
            return {"used": used, "limit": declared, "free": None if room is None else max(0, room), **extra}

        return {
            "provider": self.profile,
            "model": self.model,
            "in_flight_batches": {
                "used": self.in_flight_batches,
                "limit": self.max_in_flight,
                "free": max(0, self.max_in_flight - self.in_flight_batches),
            },
            "enqueued_tokens": limit(
                self.tokens, self.token_limit, self.token_room, learned=self.learned_limit, usable=self.usable_tokens
            ),
            "queued_requests": limit(self.requests, self.request_limit, self.request_room),
            "batches_per_hour": None
            if self.batches_per_hour is None
            else {
                "used": self.created_last_hour,
                "limit": self.batches_per_hour,
                "free": max(0, self.batches_per_hour - self.created_last_hour),
                "next_slot": max(self.next_slot, now),
            },
            "blocked_by": self.blocked_by(now),
        }


def usable_tokens(profile: ProviderProfile, model: str, learned: int | None) -> int | None:
    """The enqueued-token limit the gate holds to: the declared one less the margin, or the learned one
    if lower (it was measured in our own estimate, so it keeps no second margin)."""
    declared = profile.token_limit(model)
    limits = [usable(declared, profile.capacity_margin)] if declared is not None else []
    if learned is not None:
        limits.append(learned)
    return min(limits) if limits else None


async def capacity(
    settings: Settings, store: Queue, profile_name: str, model: str, now: float, learned: dict[tuple[str, str], int]
) -> Capacity:
    """The capacity of (profile, model) now, counted over every node sharing the store."""
    profile = settings.providers[profile_name]
    by_model = await store.usage(profile_name, model, now)
    by_profile = await store.usage(profile_name, None, now)
    learned_limit = learned.get((profile_name, model))
    tokens_usable = usable_tokens(profile, model, learned_limit)
    requests_usable = (
        usable(profile.queued_requests, profile.capacity_margin) if profile.queued_requests is not None else None
    )
    created: list[float] = []
    slot = now
    if profile.batches_per_hour is not None:
        created = await store.creations(profile_name, now - HOUR)
        slot = next_creation_slot(created, profile.batches_per_hour, now)
    return Capacity(
        profile=profile_name,
        model=model,
        in_flight_batches=by_profile.in_flight_batches,
        max_in_flight=profile.max_in_flight,
        tokens=by_model.enqueued_tokens,
        token_limit=profile.token_limit(model),
        learned_limit=learned_limit,
        token_room=None if tokens_usable is None else tokens_usable - by_model.enqueued_tokens,
        requests=by_profile.enqueued_requests,
        request_limit=profile.queued_requests,
        request_room=None if requests_usable is None else requests_usable - by_profile.enqueued_requests,
        created_last_hour=len(created) if profile.batches_per_hour is not None else by_profile.created_last_hour,
        batches_per_hour=profile.batches_per_hour,
        next_slot=slot,
        usable_tokens=tokens_usable,
    )


def route_covers(settings: Settings, name: str, profile: str, model: str) -> bool:
    """Whether a `batchd flush|pause NAME` covers (profile, model): '*', its route's name, or its profile's."""
    return name in (ANY, profile) or settings.route_matches(name, profile, model)


@dataclass(frozen=True, slots=True)
class GroupPlan:
    """One queued group: its route, when it flushes and why, and its capacity."""

    group: Group
    route: str
    plan: FlushPlan
    capacity: Capacity
    rules: FlushRules
    forced_by: dict[str, float]  # the `batchd flush` requests (route -> requested_at) it answers
    held_until: float | None

    def due(self, now: float) -> bool:
        """Whether the batcher claims from it now."""
        return self.plan.at <= now and self.plan.reason not in (FlushReason.HELD, FlushReason.CAPACITY)


async def plan_groups(settings: Settings, store: Queue, now: float) -> list[GroupPlan]:
    """Every queued group's plan now (groups of profiles no longer configured are left out)."""
    groups = await store.queued_groups(now)
    if not groups:
        return []
    holds = await store.active_holds(now)
    flushes = await store.flush_requests()
    learned = await store.learned_limits()
    capacities: dict[tuple[str, str], Capacity] = {}
    plans = []
    for group in groups:
        profile = settings.providers.get(group.profile)
        if profile is None:
            continue
        route = settings.route_plan(group.profile, group.model)
        key = (group.profile, group.model)
        if key not in capacities:
            capacities[key] = await capacity(settings, store, group.profile, group.model, now, learned)
        room = capacities[key]
        deadline = await store.earliest_deadline(group, now)
        rules = FlushRules(
            request_limit=profile.request_limit,
            byte_limit=profile.byte_limit,
            max_wait=settings.batching.max_wait,
            deadline_lead=route.deadline_lead,
            turnaround=route.expected_turnaround,
            window=route.window,
        )
        forced_by = {
            name: at for name, at in flushes.items() if route_covers(settings, name, group.profile, group.model)
        }
        hold = held_until(holds, group.profile, group.model, route.name)
        plan = plan_flush(
            QueueView(group.count, group.bytes, group.oldest, deadline.deadline if deadline else None),
            rules,
            now,
            held_until=hold,
            capacity_at=room.blocked_until(now),
            forced=bool(forced_by),
        )
        if plan is not None:
            plans.append(GroupPlan(group, route.name, plan, room, rules, forced_by, hold))
    return plans
