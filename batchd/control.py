"""Operators' commands beside a running daemon: `batchd batches`, `pause`, `resume`, `cancel`, and
what `batchd status` adds about the daemon itself (is one running, its pid, pauses, next flushes).

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
from rich.table import Table

from .deadlines import FlushRules, QueueView, plan_flush
from .exits import EX_NOINPUT, EX_USAGE, OperatorError
from .ops import ANY, daemon_pid, held_until, parse_route, route_name, shown_flush
from .policy import canceled_results
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
    try:
        profile, model = parse_route(text)
    except ValueError as exc:
        raise OperatorError(str(exc), EX_USAGE) from None
    if profile != ANY and profile not in settings.providers:
        known = ", ".join(sorted(settings.providers))
        raise OperatorError(f"no provider profile {profile!r} in the configuration (known: {known})", EX_USAGE)
    return profile, model


async def _writable(settings: Settings, work: Any) -> Any:
    # Writes beside the daemon, so read-write; but it never creates or migrates a database.
    async with existing_store(settings, writable=True) as store:
        if store is None:
            raise no_store(settings)
        return await work(store)


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
    """What `batchd status` adds: this host's daemon (running, pid), pauses, and each route's next flush."""
    pid = daemon_pid(settings.daemon.state_dir)
    pauses = await store.pauses()
    holds = await store.active_holds(now)
    in_flight: dict[str, int] = {}
    for batch in await store.batches_in_state(*LIVE_BATCH_STATES):
        in_flight[batch.profile] = in_flight.get(batch.profile, 0) + 1
    flushes = []
    for group in await store.queued_groups(now):
        profile = settings.providers.get(group.profile)
        if profile is None:  # a profile since removed from the configuration
            continue
        plan = plan_flush(
            QueueView(group.count, group.bytes, group.oldest),
            FlushRules(profile.request_limit, profile.byte_limit, settings.batching.max_wait),
            now,
            held_until=held_until(holds, group.profile, group.model),
        )
        if plan is None:
            continue
        flush = shown_flush(plan, now, in_flight.get(group.profile, 0) >= profile.max_in_flight)
        flushes.append(
            {
                "provider": group.profile,
                "endpoint": group.endpoint,
                "model": group.model,
                "queued": group.count,
                "next_flush": flush.at,
                "reason": flush.reason,
            }
        )
    return {
        "daemon": {"running": pid is not None, "pid": pid, "state_dir": str(settings.daemon.state_dir)},
        "paused": [
            {"route": route_name(p.profile, p.model), "since": p.paused_at, "reason": p.reason} for p in pauses
        ],
        "next_flush": flushes,
    }


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
    for flush in data.get("next_flush", []):
        if flush["next_flush"] is None and flush["reason"] == "in_flight":
            when = f"when a batch of {flush['provider']} ends (max_in_flight reached)"
        elif flush["next_flush"] is None:
            when = "when resumed"
        elif flush["next_flush"] <= now:
            when = f"now ({flush['reason']})"
        else:
            when = f"in {flush['next_flush'] - now:.0f}s, {_when(flush['next_flush'])} ({flush['reason']})"
        lines.append(f"Next flush {flush['provider']}/{flush['model']}: {flush['queued']} queued, {when}")
    return lines
