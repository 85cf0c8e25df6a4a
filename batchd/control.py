"""Operators' commands beside a running daemon: `batchd batches`, `pause`, `resume`, `flush`, `cancel`,
and what `batchd status` adds about the daemon itself (is one running, its pid, pauses, next flushes
and why, capacity per provider and model).

They act through the store only, so they work with the daemon running (or not): a pause is a row
the batcher sees through its hold query on its next flush, and survives restarts. A cancel is an
intent on the batch (and the file) that the node holding the batch's lease carries out at its next
lease renewal: the daemon alone holds the API keys.
"""

from __future__ import annotations

import sys
import time
from datetime import UTC, datetime
from typing import Any

import orjson

from .exits import EX_NOINPUT, EX_USAGE, OperatorError
from .ops import ANY, daemon_pid, held_until, parse_route, route_name, route_pause_key, shown_flush
from .planner import capacity, plan_groups, route_covers
from .settings import Settings
from .status import existing_store, no_store, terminal
from .store.contract import LIVE_BATCH_STATES, BatchRow, BatchState, CancelReason, FileState, Store


def _when(timestamp: float | None) -> str:
    if not timestamp:
        return "-"
    return datetime.fromtimestamp(timestamp, UTC).strftime("%Y-%m-%d %H:%M:%S")


def batch_view(batch: BatchRow) -> dict[str, Any]:
    """One batch as `batchd batches --json` shows it."""
    counts = batch.counts or {}
    return {
        "id": batch.id,
        "provider": batch.profile,
        "model": batch.model,
        "remote_id": batch.remote_id,
        "state": batch.state.value,
        "remote_status": batch.remote_status,
        "fate": batch.fate.value if batch.fate else None,
        "requests": batch.requests,
        "counts": counts,
        "created_at": batch.created_at,
        "ended_at": batch.ended_at,
        "node": batch.owner,
        "last_error": batch.last_error,
        # Why it was (or is to be) cancelled: operator, file or deadline; None if it never was.
        "cancel_reason": batch.cancel_reason.value if batch.cancel_reason else None,
    }


def _counts_text(batch: dict[str, Any]) -> str:
    counts = batch["counts"] or {}
    if not counts:
        return str(batch["requests"])
    return " ".join(f"{key}={value}" for key, value in sorted(counts.items()))


async def list_batches(settings: Settings, live: bool, limit: int, as_json: bool) -> int:
    async with existing_store(settings) as store:
        if store is None:
            raise no_store(settings)
        if live:
            rows = list(reversed(await store.batches_in_state(*LIVE_BATCH_STATES)))[:limit]
        else:
            rows = await store.recent_batches(limit)
    batches = [batch_view(row) for row in rows]
    if as_json:
        sys.stdout.write(orjson.dumps(batches, option=orjson.OPT_INDENT_2).decode() + "\n")
        return 0
    # rich and policy are imported where used: `batchd status` (daemon_section) needs neither.
    from rich.table import Table

    table = Table(title="Live batches" if live else "Batches, newest first", title_justify="left")
    for column in ("id", "provider", "model", "remote id", "state", "counts", "created", "node"):
        table.add_column(column)
    for batch in batches:
        state = batch["state"]
        if batch["fate"]:
            state += f" ({batch['fate']})"
        elif batch["remote_status"]:
            state += f" ({batch['remote_status']})"
        table.add_row(
            str(batch["id"]),
            batch["provider"],
            batch["model"],
            batch["remote_id"] or "-",
            state,
            _counts_text(batch),
            _when(batch["created_at"]),
            batch["node"] or "-",
        )
    terminal().print(table)
    return 0


def _route(settings: Settings, text: str | None) -> tuple[str, str]:
    """(profile, model) of a pause: PROFILE, PROFILE/MODEL, '*', or a [[routes]] name (route_pause_key)."""
    try:
        profile, model = parse_route(text)
    except ValueError as exc:
        raise OperatorError(str(exc), EX_USAGE) from None
    if profile != ANY and profile not in settings.providers:
        if model == ANY and profile in settings.route_names():
            return route_pause_key(profile)
        known = ", ".join(settings.route_names())
        raise OperatorError(f"no provider profile or route {profile!r} in the configuration (known: {known})", EX_USAGE)
    return profile, model


async def _writable(settings: Settings, work: Any) -> Any:
    # Writes beside the daemon, so read-write; but it never creates or migrates a database.
    async with existing_store(settings, writable=True) as store:
        if store is None:
            raise no_store(settings)
        return await work(store)


async def flush(settings: Settings, route: str | None) -> int:
    """`batchd flush [ROUTE]`: an intent in the store; the batcher flushes the route's queue at its next
    pass, whatever max_wait, batch size or window say, but never past a pause, hold or capacity limit."""
    name = ANY if route is None or route.strip() in ("", ANY) else route.strip()
    if name != ANY and name not in settings.route_names():
        known = ", ".join(settings.route_names())
        raise OperatorError(f"no route {name!r} in the configuration (known: {known})", EX_USAGE)

    async def work(store: Store) -> list[str]:
        await store.request_flush(name, time.time())
        holds = await store.active_holds(time.time())
        paused = []
        for group in await store.queued_groups(time.time()):
            if group.profile not in settings.providers or not route_covers(settings, name, group.profile, group.model):
                continue
            plan = settings.route_plan(group.profile, group.model)
            if held_until(holds, group.profile, group.model, plan.name) is not None:
                paused.append(f"{group.profile}/{group.model}")
        return paused

    held = await _writable(settings, work)
    what = "every route" if name == ANY else f"route {name}"
    print(f"flush requested for {what}: the daemon submits its queued requests at its next pass")
    if held:
        print(f"held or paused, so not flushed: {', '.join(sorted(set(held)))} (batchd resume)")
    return 0


async def pause(settings: Settings, route: str | None, reason: str | None) -> int:
    profile, model = _route(settings, route)

    async def work(store: Store) -> bool:
        return await store.pause(profile, model, reason)

    new = await _writable(settings, work)
    name = route_name(profile, model)
    what = "every route" if name == ANY else name
    if new:
        print(f"paused {what}: no new batches are submitted for it until `batchd resume`")
    else:
        print(f"{what} was already paused")
    return 0


async def resume(settings: Settings, route: str | None) -> int:
    everything = route is None or route.strip() in ("", ANY)
    profile, model = _route(settings, route)

    async def work(store: Store) -> tuple[int, list[str]]:
        lifted = await store.resume(None if everything else profile, model)
        return lifted, [route_name(p.profile, p.model) for p in await store.pauses()]

    lifted, remaining = await _writable(settings, work)
    what = "every pause" if everything else route_name(profile, model)
    if lifted:
        print(f"resumed {what}: the daemon submits its queued work on its next flush")
    else:
        print(f"{what}: nothing was paused")
    if remaining:
        print(f"still paused: {', '.join(remaining)}")
    return 0 if lifted or not remaining else 1


def _batch_name(batch: BatchRow) -> str:
    remote = batch.remote_id or "not yet submitted"
    return f"batch {batch.id} ({batch.profile}/{batch.model}, {remote})"


async def _find_batch(store: Store, ref: str) -> BatchRow | None:
    """A batch by our id or the provider's remote id."""
    remote = await store.remote_owner(ref)
    if remote is not None:
        return await store.batch(remote)
    return await store.batch(int(ref)) if ref.isdigit() else None


# A queued request the poller requeued meanwhile is caught by another pass; a few are plenty.
CANCEL_PASSES = 3


async def cancel(settings: Settings, ref: str | None, file: str | None) -> int:
    """`batchd cancel BATCH` or `batchd cancel --file NAME`: intents in the store; the daemon calls the provider."""
    if (ref is None) == (file is None):
        raise OperatorError("name a BATCH or give --file NAME (one of them)", EX_USAGE)

    async def by_batch(store: Store) -> int:
        assert ref is not None
        batch = await _find_batch(store, ref)
        if batch is None:
            raise OperatorError(f"no batch {ref!r} (our id or the provider's batch id; see batchd batches)", EX_NOINPUT)
        if batch.state == BatchState.DONE or not await store.request_cancel(
            batch.id, CancelReason.OPERATOR, time.time()
        ):
            how = batch.fate.value if batch.fate else (batch.remote_status or "done")
            print(f"{_batch_name(batch)} has already ended ({how}): nothing to cancel")
            return 1
        print(
            f"cancel requested for {_batch_name(batch)}, {batch.requests} requests: the daemon cancels it at the"
            " provider; its unfinished requests end canceled"
        )
        return 0

    async def by_file(store: Store) -> int:
        assert file is not None
        rows = await store.files_named(file)
        if not rows:
            raise OperatorError(f"no input file {file!r} in the store (see batchd status)", EX_NOINPUT)
        open_rows = [row for row in rows if row.state != FileState.COMPLETE]
        if not open_rows:
            print(f"{file}: every result is delivered already: nothing to cancel")
            return 1
        from .policy import canceled_results

        canceled, batches = 0, set()
        for row in open_rows:
            for _ in range(CANCEL_PASSES):
                queued = await store.queued_items(row.id)
                recorded, holding = await store.cancel_file(row.id, canceled_results(queued), time.time())
                canceled += recorded
                batches.update(holding)
                if not queued:
                    break
        print(f"{file}: {canceled} queued requests canceled")
        for batch_id in sorted(batches):
            batch = await store.batch(batch_id)
            if batch is not None:
                print(
                    f"cancel requested for {_batch_name(batch)}: the daemon cancels it at the provider; this file's"
                    " requests in it end canceled, other files' requests are requeued"
                )
        return 0

    result: int = await _writable(settings, by_batch if ref is not None else by_file)
    return result


async def daemon_section(settings: Settings, store: Store, now: float) -> dict[str, Any]:
    """What `batchd status` adds: this host's daemon (running, pid), pauses, and route_section()."""
    pid = daemon_pid(settings.daemon.state_dir)
    pauses = await store.pauses()
    return {
        "daemon": {"running": pid is not None, "pid": pid, "state_dir": str(settings.daemon.state_dir)},
        "paused": [{"route": route_name(p.profile, p.model), "since": p.paused_at, "reason": p.reason} for p in pauses],
        **await route_section(settings, store, now),
    }


async def route_section(settings: Settings, store: Store, now: float) -> dict[str, Any]:
    """Each queued route's next flush and why (planner.plan_groups: what the batcher itself acts on),
    pending `batchd flush` requests, and capacity per (profile, model): `batchd status` and the page."""
    flushes = []
    shown: dict[tuple[str, str], dict[str, Any]] = {}
    for planned in await plan_groups(settings, store, now):
        group = planned.group
        flush = shown_flush(planned.plan, now)
        flushes.append(
            {
                "route": planned.route,
                "provider": group.profile,
                "endpoint": group.endpoint,
                "model": group.model,
                "queued": group.count,
                "next_flush": flush.at,
                "reason": flush.reason,
                "blocked_by": planned.capacity.blocked_by(now),
            }
        )
        shown.setdefault((group.profile, group.model), planned.capacity.as_json(now))
    # Every (profile, model) with something in flight or a limit learned, queued or not.
    learned = await store.learned_limits()
    keys = {(b.profile, b.model) for b in await store.batches_in_state(*LIVE_BATCH_STATES)} | set(learned)
    for profile, model in sorted(keys - set(shown)):
        if profile in settings.providers:
            shown[(profile, model)] = (await capacity(settings, store, profile, model, now, learned)).as_json(now)
    return {
        "flush_requests": [{"route": r, "requested_at": t} for r, t in sorted((await store.flush_requests()).items())],
        "next_flush": flushes,
        "capacity": [shown[key] for key in sorted(shown)],
    }


def _capacity_line(row: dict[str, Any]) -> str:
    parts = []
    slots = row["in_flight_batches"]
    parts.append(f"batches {slots['used']}/{slots['limit']}")
    tokens = row.get("enqueued_tokens")
    if tokens:
        limit = tokens["usable"] if tokens.get("usable") is not None else tokens["limit"]
        learned = f", learned {tokens['learned']:,}" if tokens.get("learned") is not None else ""
        parts.append(f"enqueued tokens {tokens['used']:,}/{limit:,} (free {tokens['free']:,}{learned})")
    requests = row.get("queued_requests")
    if requests:
        parts.append(f"queued requests {requests['used']:,}/{requests['limit']:,} (free {requests['free']:,})")
    hourly = row.get("batches_per_hour")
    if hourly:
        parts.append(f"created this hour {hourly['used']}/{hourly['limit']}")
    blocked = f"; waiting: {row['blocked_by']}" if row.get("blocked_by") else ""
    return f"Capacity {row['provider']}/{row['model']}: " + ", ".join(parts) + blocked


def daemon_lines(data: dict[str, Any], now: float | None = None) -> list[str]:
    """The status view's lines for daemon_section()."""
    now = time.time() if now is None else now
    lines = []
    daemon = data.get("daemon")
    if daemon:
        running = f"running (pid {daemon['pid']})" if daemon["running"] else "not running"
        lines.append(f"Daemon: {running} on {daemon['state_dir']}")
    for pause in data.get("paused", []):
        why = f": {pause['reason']}" if pause.get("reason") else ""
        lines.append(f"Paused: {pause['route']} since {_when(pause['since'])}{why} (batchd resume)")
    for request in data.get("flush_requests", []):
        lines.append(f"Flush requested: {request['route']} at {_when(request['requested_at'])} (batchd flush)")
    for flush in data.get("next_flush", []):
        if flush["next_flush"] is None and flush["reason"] in ("in_flight", "capacity"):
            limit = flush.get("blocked_by") or "max_in_flight"
            when = f"when a batch of {flush['provider']}/{flush['model']} ends (capacity: {limit})"
        elif flush["next_flush"] is None:
            when = "when resumed"
        elif flush["next_flush"] <= now:
            when = f"now ({flush['reason']})"
        else:
            when = f"in {flush['next_flush'] - now:.0f}s, {_when(flush['next_flush'])} ({flush['reason']})"
        route = flush.get("route") or flush["provider"]
        lines.append(f"Next flush {route} {flush['provider']}/{flush['model']}: {flush['queued']} queued, {when}")
    lines += [_capacity_line(row) for row in data.get("capacity", [])]
    return lines
