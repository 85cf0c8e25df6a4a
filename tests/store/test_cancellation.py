"""A stop may cancel a store call at any await: the store stays usable and each write is all-or-nothing.

For every write method of the contract: start the call as a task, let the loop run k ticks
(k = 0, 1, 2, …, until the call finishes before the cancel arrives), cancel it, and then check
- the task ended (its result or CancelledError) without leaving anything behind;
- the state the call touches is exactly the state before it or exactly the state an uncancelled
  call produces (computed on a twin target), never something in between;
- the store is usable: a following write on this node and on a second node succeeds promptly
  (a connection left inside a transaction would hold the write lock: SQLite's other connection
  times out, PostgreSQL's row locks block);
- the drain works: the outbox sequence (results_after -> outbox_delivered) advances the cursor;
- an idempotent method called again reaches the after-state exactly.
A second pass cancels after 10 seeded random sub-millisecond delays, since the engines' threads
and sockets answer on their own time, not in loop ticks.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import random
import time
from collections.abc import Awaitable, Callable, Hashable
from dataclasses import dataclass
from typing import Any

import pytest

from batchd.policy import canceled_results
from batchd.store.contract import BatchRow, BatchState, CancelReason, Fate, Store

from ..conftest import loop_ticks
from .factories import (
    chunk,
    claim,
    file_key,
    final,
    ingest,
    never_taken,
    retry,
    submitted_batch,
)

# Every tick up to DENSE_TICKS, then steps growing by a quarter: over a socket most ticks are spent
# waiting for an answer (nothing new to cancel), and the random pass covers the spaces in between.
DENSE_TICKS = 64
MAX_SECONDS = 120.0
RANDOM_TRIES = 10
WRITE_TIMEOUT = 15.0

_unique = itertools.count()


@dataclass
class Env:
    store: Store
    other: Store  # another node on the same database


Target = dict[str, Any]
Setup = Callable[[Env], Awaitable[Target]]
Call = Callable[[Env, Target], Awaitable[Any]]
Probe = Callable[[Env, Target], Awaitable[Hashable]]


@dataclass(frozen=True)
class Case:
    name: str
    setup: Setup  # a fresh target: its own file, batch, sink, … so attempts do not see each other
    call: Call
    probe: Probe  # what the call changes, relative to the target (comparable across twins)
    idempotent: bool = False


def model() -> str:
    return f"m{next(_unique)}"


async def queued(env: Env, name: str) -> int:
    return sum(g.count for g in await env.store.queued_groups(time.time() + 3600) if g.model == name)


async def batch_row(env: Env, target: Target) -> BatchRow:
    row = await env.store.batch(target["batch"])
    assert row is not None
    return row


async def file_results(env: Env, file_id: int) -> int:
    return sum(r.file_id == file_id for r in await env.store.results_after(0, 100_000))


# -- setups ----------------------------------------------------------------------------------------


async def new_file(env: Env) -> Target:
    key = file_key(f"f{next(_unique)}.jsonl")
    row = await env.store.begin_file(key, never_taken)
    return {"key": key, "file": row.id, "model": model()}


async def open_file(env: Env) -> Target:
    name = model()
    row = await ingest(env.store, f"{name}.jsonl", 2, invalid_lines=[1, 2], model=name)
    return {"file": row.id, "model": name}


async def pending_batch(env: Env) -> Target:
    name = model()
    row = await ingest(env.store, f"{name}.jsonl", 3, model=name)
    batch = await claim(env.store, model=name)
    return {"file": row.id, "batch": batch.id, "model": name}


async def unverified_batch(env: Env) -> Target:
    target = await pending_batch(env)
    await env.store.mark_unverified(target["batch"], f"remote-{target['batch']}", "in_progress", time.time(), None)
    return target


async def live_batch(env: Env) -> Target:
    name = model()
    row = await ingest(env.store, f"{name}.jsonl", 3, model=name)
    batch = await submitted_batch(env.store, model=name)
    return {"file": row.id, "batch": batch.id, "model": name}


async def queued_items(env: Env) -> Target:
    name = model()
    await ingest(env.store, f"{name}.jsonl", 3, model=name)
    return {"model": name}


async def other_nodes_expired_batch(env: Env) -> Target:
    name = model()
    await ingest(env.other, f"{name}.jsonl", 2, model=name)
    started = time.time()
    groups = [g for g in await env.other.queued_groups(started) if g.model == name]
    batch = await env.other.claim_batch(groups[0], "openai", 10, 10**9, started, lease_seconds=1)
    assert batch is not None
    return {"batch": batch.id, "now": started + 100, "model": name}


async def my_leased_batch(env: Env) -> Target:
    name = model()
    await ingest(env.store, f"{name}.jsonl", 2, model=name)
    started = time.time()
    groups = [g for g in await env.store.queued_groups(started) if g.model == name]
    batch = await env.store.claim_batch(groups[0], "openai", 10, 10**9, started, lease_seconds=1000)
    assert batch is not None
    return {"batch": batch.id, "now": started, "model": name}


async def parked_results(env: Env) -> Target:
    target = await open_file(env)
    ids = [r.id for r in await env.store.results_after(0, 100_000) if r.file_id == target["file"]]
    sink = f"hook{next(_unique)}"
    await env.store.park(sink, ids, "HTTP 500", advance_to=ids[-1])
    return {**target, "sink": sink, "ids": ids}


async def flagged_results(env: Env) -> Target:
    target = await parked_results(env)
    assert await env.store.request_redelivery(target["sink"]) == 2
    return target


async def with_results(env: Env) -> Target:
    target = await open_file(env)
    target["ids"] = [r.id for r in await env.store.results_after(0, 100_000) if r.file_id == target["file"]]
    target["sink"] = f"sink{next(_unique)}"
    return target


# -- probes ---------------------------------------------------------------------------------------


async def file_state(env: Env, target: Target) -> Hashable:
    """Without the outbox's progress, which the drain between attempts moves on."""
    row = await env.store.file(target["file"])
    assert row is not None
    return (row.state, row.lines, row.lines_committed, row.offset_committed, row.moved)


async def chunk_state(env: Env, target: Target) -> Hashable:
    return (await file_state(env, target), await queued(env, target["model"]), await file_results(env, target["file"]))


async def found(env: Env, target: Target) -> Hashable:
    row = await env.store.find_file(target["key"])
    if row is None:
        return None
    return (row.out_name == target["key"].name.removesuffix(".jsonl") + ".results.jsonl", row.state)


async def claim_state(env: Env, target: Target) -> Hashable:
    live = [b for b in await env.store.batches_in_state(BatchState.PENDING) if b.model == target["model"]]
    return (await queued(env, target["model"]), [(b.requests, b.bytes) for b in live])


def norm(text: str | None, batch_id: int) -> str | None:
    """Remote ids (and messages naming them) carry the batch id; twins have different ids."""
    if text is None:
        return None
    return text.replace(f"remote-{batch_id}", "remote-ID").replace(f"batch_{batch_id}", "batch_ID")


async def batch_state(env: Env, target: Target) -> Hashable:
    row = await batch_row(env, target)
    items = await env.store.submitted_items(row.id)
    return (
        row.state,
        norm(row.remote_id, row.id),
        row.remote_status,
        row.input_file_id,
        row.submit_attempts,
        norm(row.last_error, row.id),
        row.cancel_requested_at is not None,
        row.ended_at is not None,
        row.fate,
        tuple(sorted((row.counts or {}).items())),
        tuple(i.attempts for i in items),
        await queued(env, target["model"]),
        await file_results(env, target["file"]) if "file" in target else 0,
        frozenset(norm(r, row.id) for r in await env.store.rejected_remotes(row.id)),
    )


async def owner(env: Env, target: Target) -> Hashable:
    row = await batch_row(env, target)
    return (row.owner, round(row.lease_until - target["now"]))


async def released(env: Env, target: Target) -> Hashable:
    row = await batch_row(env, target)
    return row.owner is None or row.lease_until <= time.time()


async def hold_state(env: Env, target: Target) -> Hashable:
    holds = await env.store.active_holds(time.time())
    return (await env.store.hold_failures("openai", target["model"]), ("openai", target["model"]) in holds)


def relative(result_id: int, target: Target) -> int:
    """A result id relative to the target's first result (0: none), comparable across twins."""
    return result_id - target["ids"][0] + 1 if result_id else 0


async def cursor(env: Env, target: Target) -> Hashable:
    return relative(await env.store.sink_cursor(target["sink"]), target)


async def delivery(env: Env, target: Target) -> Hashable:
    """The cursor and the file's progress together (probed before the drain touches the file)."""
    row = await env.store.file(target["file"])
    assert row is not None
    return (await cursor(env, target), row.delivered, row.out_bytes)


async def redeliverable(env: Env, target: Target) -> Hashable:
    ids = [r.id for r in await env.store.to_redeliver(target["sink"], 100)]
    return (await cursor(env, target), tuple(relative(i, target) for i in ids))


async def latest_error(env: Env, target: Target) -> Hashable:
    errors = (await env.store.status(errors=1))["errors"]
    return bool(errors) and errors[0]["message"] == target["message"]


async def nothing(env: Env, target: Target) -> Hashable:
    return None


async def a_message(env: Env) -> Target:
    return {"message": f"error {next(_unique)}"}


async def a_sink(env: Env) -> Target:
    return {"sink": f"lease{next(_unique)}", "now": time.time()}


async def a_hold(env: Env) -> Target:
    target = {"model": model()}
    await env.store.hold("openai", target["model"], time.time() + 600, 1, "limit")
    return target


# -- the write methods ------------------------------------------------------------------------------


async def _record_outcomes(env: Env, target: Target) -> Any:
    first, second, *_ = await env.store.submitted_items(target["batch"])
    return await env.store.record_outcomes(target["batch"], [final(first)], [retry(second, time.time())])


async def half_batched_file(env: Env) -> Target:
    """A file of 4 lines: 2 in a live batch, 2 still queued (what `batchd cancel --file` finds)."""
    name = model()
    row = await ingest(env.store, f"{name}.jsonl", 4, model=name)
    batch = await submitted_batch(env.store, model=name, max_requests=2)
    return {"file": row.id, "batch": batch.id, "model": name}


async def cancel_state(env: Env, target: Target) -> Hashable:
    row = await batch_row(env, target)
    return (await batch_state(env, target), row.cancel_reason, row.cancel_wanted_at is not None)


async def canceled_file_state(env: Env, target: Target) -> Hashable:
    row = await env.store.file(target["file"])
    assert row is not None
    return (
        row.canceled_at is not None,
        await queued(env, target["model"]),
        await file_results(env, target["file"]),
        await cancel_state(env, target),
    )


async def _cancel_file(env: Env, target: Target) -> Any:
    items = await env.store.queued_items(target["file"])
    return await env.store.cancel_file(target["file"], canceled_results(items), time.time())


CASES = [
    Case(
        "begin_file",
        lambda env: asyncio.sleep(0, {"key": file_key(f"b{next(_unique)}.jsonl")}),
        lambda env, t: env.store.begin_file(t["key"], never_taken),
        found,
    ),
    Case(
        "add_chunk",
        new_file,
        lambda env, t: env.store.add_chunk(t["file"], chunk(1, 4, invalid_lines=[2], model=t["model"])),
        chunk_state,
        idempotent=True,
    ),
    Case("finish_file", open_file, lambda env, t: env.store.finish_file(t["file"], 2), file_state, idempotent=True),
    Case("file_moved", open_file, lambda env, t: env.store.file_moved(t["file"]), file_state, idempotent=True),
    Case(
        "claim_batch",
        queued_items,
        lambda env, t: claim(env.store, model=t["model"]),
        claim_state,
    ),
    Case(
        "hold",
        lambda env: asyncio.sleep(0, {"model": model()}),
        lambda env, t: env.store.hold("openai", t["model"], time.time() + 600, 3, "token_limit_exceeded"),
        hold_state,
    ),
    Case(
        "release_hold", a_hold, lambda env, t: env.store.release_hold("openai", t["model"]), hold_state, idempotent=True
    ),
    Case(
        "set_input_file",
        pending_batch,
        lambda env, t: env.store.set_input_file(t["batch"], "file-x"),
        batch_state,
        idempotent=True,
    ),
    Case(
        "note_submit_failure",
        pending_batch,
        lambda env, t: env.store.note_submit_failure(t["batch"], "HTTP 500", time.time() + 5),
        batch_state,
    ),
    Case(
        "mark_submitted",
        pending_batch,
        lambda env, t: env.store.mark_submitted(t["batch"], f"remote-{t['batch']}", "validating", time.time()),
        batch_state,
        idempotent=True,
    ),
    Case(
        "mark_unverified",
        pending_batch,
        lambda env, t: env.store.mark_unverified(t["batch"], f"remote-{t['batch']}", "in_progress", time.time(), None),
        batch_state,
    ),
    Case(
        "confirm_ownership",
        unverified_batch,
        lambda env, t: env.store.confirm_ownership(t["batch"]),
        batch_state,
    ),
    Case(
        "unadopt",
        unverified_batch,
        lambda env, t: env.store.unadopt(t["batch"], f"remote-{t['batch']}", "not ours"),
        batch_state,
    ),
    Case(
        "note_cancel_requested",
        live_batch,
        lambda env, t: env.store.note_cancel_requested(t["batch"], "overdue"),
        batch_state,
    ),
    Case(
        "note_cancel_requested by an operator",
        live_batch,
        lambda env, t: env.store.note_cancel_requested(t["batch"], "batchd cancel", CancelReason.OPERATOR),
        cancel_state,
    ),
    Case(
        "request_cancel",
        live_batch,
        lambda env, t: env.store.request_cancel(t["batch"], CancelReason.OPERATOR, time.time()),
        cancel_state,
        idempotent=True,
    ),
    Case("cancel_file", half_batched_file, _cancel_file, canceled_file_state, idempotent=True),
    Case(
        "record_poll",
        live_batch,
        lambda env, t: env.store.record_poll(t["batch"], "completed", {"total": 3}, "out", "err", ended=True),
        batch_state,
        idempotent=True,
    ),
    Case(
        "note_batch_error",
        live_batch,
        lambda env, t: env.store.note_batch_error(t["batch"], "batch.poll_failed", "HTTP 502"),
        batch_state,
    ),
    Case(
        "finish_batch",
        live_batch,
        lambda env, t: env.store.finish_batch(t["batch"], Fate.OUTPUT_UNAVAILABLE, "gone"),
        batch_state,
        idempotent=True,
    ),
    Case("record_outcomes", live_batch, _record_outcomes, batch_state),
    Case(
        "refund_batch",
        live_batch,
        lambda env, t: env.store.refund_batch(t["batch"], time.time(), "lost"),
        batch_state,
        idempotent=True,
    ),
    Case("take_over", other_nodes_expired_batch, lambda env, t: env.store.take_over(30, t["now"]), owner),
    Case("renew_leases", my_leased_batch, lambda env, t: env.store.renew_leases(1000, t["now"] + 50), owner),
    Case("release_leases", my_leased_batch, lambda env, t: env.store.release_leases(), released, idempotent=True),
    Case(
        "advance_cursor",
        with_results,
        lambda env, t: env.store.advance_cursor(t["sink"], t["ids"][-1]),
        cursor,
        idempotent=True,
    ),
    Case(
        "park",
        with_results,
        lambda env, t: env.store.park(t["sink"], t["ids"], "HTTP 500", advance_to=t["ids"][-1]),
        redeliverable,
    ),
    Case(
        "request_redelivery",
        parked_results,
        lambda env, t: env.store.request_redelivery(t["sink"]),
        redeliverable,
        idempotent=True,
    ),
    Case(
        "unpark",
        flagged_results,
        lambda env, t: env.store.unpark(t["sink"], t["ids"]),
        redeliverable,
        idempotent=True,
    ),
    Case("take_sink_lease", a_sink, lambda env, t: env.store.take_sink_lease(t["sink"], 30, t["now"]), nothing),
    Case(
        "outbox_delivered",
        with_results,
        lambda env, t: env.store.outbox_delivered(t["sink"], t["ids"][-1], {t["file"]: (2, 77)}),
        delivery,
    ),
    Case("complete_file", open_file, lambda env, t: env.store.complete_file(t["file"]), file_state, idempotent=True),
    Case("add_error", a_message, lambda env, t: env.store.add_error("test.cancelled", t["message"]), latest_error),
]


# -- the checks -----------------------------------------------------------------------------------


async def still_usable(env: Env, label: str) -> None:
    """A write on this node and on the other one, promptly: nothing holds a transaction open."""
    await asyncio.wait_for(env.store.add_error("test.after_cancel", label), WRITE_TIMEOUT)
    await asyncio.wait_for(env.other.add_error("test.after_cancel", label), WRITE_TIMEOUT)
    await asyncio.wait_for(env.store.hold("openai", "usable", time.time() + 1, 1, label), WRITE_TIMEOUT)


async def drain(env: Env) -> None:
    """What a graceful stop does after cancelling: deliver this node's pending results to the outbox."""
    sink = "outbox:" + env.store.node
    last = await env.store.sink_cursor(sink)
    pending = await env.store.results_after(last, 100_000, node=env.store.node)
    if not pending:
        return
    rows = await env.store.files_by_id({r.file_id for r in pending})
    files: dict[int, tuple[int, int]] = {}
    for result in pending:
        added, length = files.get(result.file_id, (0, rows[result.file_id].out_bytes))
        files[result.file_id] = (added + 1, length + len(result.payload) + 1)
    await asyncio.wait_for(env.store.outbox_delivered(sink, pending[-1].id, files), WRITE_TIMEOUT)
    assert await env.store.sink_cursor(sink) == pending[-1].id
    for file_id, (added, length) in files.items():
        row = await env.store.file(file_id)
        assert row is not None and (row.delivered, row.out_bytes) == (rows[file_id].delivered + added, length)


async def attempt(env: Env, case: Case, wait: Callable[[], Awaitable[None]], after: Hashable, label: str) -> bool:
    """One cancelled call; True when the call had already finished before the cancel (no more to try)."""
    target = await case.setup(env)
    before = await case.probe(env, target)
    task = asyncio.ensure_future(case.call(env, target))
    await wait()
    if task.done():
        task.result()
        assert await case.probe(env, target) == after, label
        return True
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await asyncio.wait_for(asyncio.shield(task), WRITE_TIMEOUT)
    # The cancellation is delivered (after the transaction), never swallowed: a stop must stop.
    assert task.cancelled(), f"{label}: the call swallowed its cancellation"
    state = await case.probe(env, target)
    assert state in (before, after), f"{label}: torn state {state!r}; before {before!r}, after {after!r}"
    await still_usable(env, label)
    await drain(env)
    if case.idempotent:
        await asyncio.wait_for(case.call(env, target), WRITE_TIMEOUT)
        assert await case.probe(env, target) == after, f"{label}: a repeat did not reach the after-state"
    return False


def ticks(k: int) -> Callable[[], Awaitable[None]]:
    async def wait() -> None:
        await loop_ticks(k)

    return wait


def delay(seconds: float) -> Callable[[], Awaitable[None]]:
    async def wait() -> None:
        await asyncio.sleep(seconds)

    return wait


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
async def test_a_cancelled_write_is_all_or_nothing_and_the_store_stays_usable(
    store: Store, second_node: Store, case: Case
) -> None:
    env = Env(store, second_node)
    # The after-state, from an uncancelled call on a twin target.
    twin = await case.setup(env)
    await case.call(env, twin)
    after = await case.probe(env, twin)
    deadline = time.monotonic() + MAX_SECONDS
    k = 0
    while not await attempt(env, case, ticks(k), after, f"{case.name} cancelled after {k} ticks"):
        if time.monotonic() > deadline:
            pytest.fail(f"{case.name} still unfinished after {k} loop ticks; tried for {MAX_SECONDS:.0f} s")
        k = k + 1 if k < DENSE_TICKS else k + k // 4
    rng = random.Random(f"{case.name}")
    for _n in range(RANDOM_TRIES):
        seconds = rng.uniform(0, 0.002)
        await attempt(env, case, delay(seconds), after, f"{case.name} cancelled after {seconds * 1000:.2f} ms")
    await drain(env)
