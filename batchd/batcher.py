"""The batcher: groups queued requests into provider batches and submits them.

A group is (provider profile, endpoint, model). When it flushes is planner.plan_groups (full,
age, deadline, the route's window, `batchd flush`, holds and pauses, capacity); a batch never
exceeds the profile's `max_requests` or `max_bytes`, nor the capacity left under the profile's
declared limits. Each batch is committed as an intent row before the first provider call; a batch
whose create may have happened (a crash, a lost answer) is reconciled with the provider's list
before it is ever created again.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncGenerator, AsyncIterator, Callable
from functools import partial
from pathlib import Path

from .aio import wait_any
from .crashpoints import CrashPoints
from .deadlines import FlushReason
from .formats import Kind, request_lines_size, request_pieces
from .logs import get_logger
from .planner import UNTIL_A_BATCH_ENDS, Capacity, GroupPlan, plan_groups
from .policy import canceled_results
from .providers import ProviderError, ProviderPool
from .providers.base import RequestStream, backoff
from .settings import Settings
from .store.contract import BatchRow, BatchState, CancelReason, Fate, Store

log = get_logger("batchd.batcher")

# Requests read from the store per step while an input file is written (a few MB each).
INPUT_CHUNK = 2000
EMBEDDINGS = "/v1/embeddings"


class Batcher:
    """Flushes groups into batch intents and submits pending batches, concurrently."""

    def __init__(
        self,
        settings: Settings,
        store: Store,
        providers: ProviderPool,
        workdir: Path,
        on_submitted: Callable[[int], None],
        crashpoints: CrashPoints,
        intake_busy: Callable[[], bool] = lambda: False,
        on_results: Callable[[], None] = lambda: None,
    ) -> None:
        self.settings = settings
        self.store = store
        self.providers = providers
        self.workdir = workdir
        self._on_submitted = on_submitted
        self._crashpoints = crashpoints
        # True while the spool is committing a file chunk by chunk: its later chunks may join a group.
        self._intake_busy = intake_busy
        self._on_results = on_results
        self._wake = asyncio.Event()
        self._submitting: dict[int, asyncio.Task[None]] = {}
        # Pending batches found at start-up may have been created before the crash.
        self._unsure: set[int] = set()
        self._instance = ""
        self._reconciling: dict[str, asyncio.Lock] = {}
        self.failure: BaseException | None = None
        # Groups (profile, endpoint, model) waiting for capacity: batch.capacity_wait is logged once per wait.
        self._waiting_for_capacity: set[tuple[str, str, str]] = set()
        self._anthropic = {name for name, profile in settings.providers.items() if profile.kind == "anthropic"}

    def wake(self) -> None:
        self._wake.set()

    async def recover(self) -> None:
        self._instance = await self.store.instance_id()
        self._unsure = {batch.id for batch in await self.store.owned_batches(BatchState.PENDING)}

    def taken_over(self, batch: BatchRow) -> None:
        """A pending batch whose lease this node took from a dead one: its create may have happened there."""
        if batch.state == BatchState.PENDING:
            self._unsure.add(batch.id)
            self._wake.set()

    def keep_only(self, owned: set[int]) -> None:
        """Stop submitting batches whose lease this node no longer holds (another node took them)."""
        for batch_id, task in list(self._submitting.items()):
            if batch_id not in owned:
                log.warning("batch.lease_lost", batch=batch_id)
                task.cancel()

    async def run(self, stopping: asyncio.Event) -> None:
        try:
            while not stopping.is_set():
                if self.failure is not None:
                    raise RuntimeError(f"a submission died: {self.failure!r}") from self.failure
                self._wake.clear()
                next_due = await self.flush(time.time())
                await self._start_pending()
                delay = max(min(next_due - time.time(), self.settings.batching.tick * 30), 0.05)
                await wait_any(delay, self._wake, stopping)
        finally:
            await self._stop_submissions()

    async def flush(self, now: float) -> float:
        """Claim every group whose plan says now; returns when the next group falls due.

        The plan is planner.plan_groups, the computation `batchd status` shows: full, age,
        deadline, schedule (window), forced (`batchd flush`), held, capacity. Each claim stays
        within the capacity left (tokens, queued requests, batches per hour, in-flight batches),
        counted over every node, so a group larger than the room goes out in batches that fit as
        room frees up.
        """
        next_due = float("inf")  # nothing queued: sleep until woken (or the loop's longest nap)
        plans = await plan_groups(self.settings, self.store, now)
        # Anthropic batches carry no metadata, so after a crash a pending batch is matched to the
        # provider's batches by request count: no two pending batches of a profile share one (an
        # unverified one may go back to pending).
        pending_counts: dict[str, set[int]] = {}
        if any(plan.group.profile in self._anthropic for plan in plans):
            for row in await self.store.batches_in_state(BatchState.PENDING, BatchState.UNVERIFIED):
                if row.kind == "anthropic":
                    pending_counts.setdefault(row.profile, set()).add(row.requests)
        # A file is committed in chunks: while one is being ingested, a group that is due but not full
        # waits for the rest of it (one file, as few batches as its size allows); full groups still go.
        holding = self._intake_busy()
        rooms = {(plan.group.profile, plan.group.model): plan.capacity for plan in plans}
        waiting: set[tuple[str, str, str]] = set()
        answered: dict[str, float] = {}
        unanswered: set[str] = set()
        for plan in plans:
            group = plan.group
            key = (group.profile, group.endpoint, group.model)
            if not plan.due(now):
                next_due = min(next_due, plan.plan.at)
                if plan.plan.reason is FlushReason.CAPACITY:
                    waiting.add(key)
                    self._capacity_wait(plan, now)
                if plan.forced_by and plan.plan.reason is not FlushReason.HELD:
                    unanswered.update(plan.forced_by)  # still owed once capacity frees up
                else:
                    answered.update(plan.forced_by)  # a pause or hold wins over a forced flush
                continue
            if plan.plan.reason in (FlushReason.AGE, FlushReason.SCHEDULE) and holding:
                next_due = min(next_due, now + self.settings.batching.tick)  # the end of the ingest wakes us
                continue
            profile = self.settings.providers[group.profile]
            inputs = profile.max_embedding_inputs if profile.kind == "openai" and group.endpoint == EMBEDDINGS else None
            left, left_bytes = group.count, group.bytes
            while left > 0:
                # Full batches only: the rest waits for its own reason (age, deadline, ...).
                rest_full = left >= profile.request_limit or left_bytes >= profile.byte_limit
                if plan.plan.reason is FlushReason.FULL and left < group.count and not rest_full:
                    break
                room = rooms[(group.profile, group.model)]
                if room.blocked_until(now) is not None:
                    waiting.add(key)
                    self._capacity_wait(plan, now, room)
                    break
                avoid = frozenset(pending_counts.get(group.profile, ())) if profile.kind == "anthropic" else frozenset()
                max_requests = profile.request_limit
                if room.request_room is not None:
                    max_requests = min(max_requests, room.request_room)
                batch = await self.store.claim_batch(
                    group,
                    profile.kind,
                    max_requests,
                    profile.byte_limit,
                    now,
                    avoid,
                    lease_seconds=self.settings.store.lease,
                    budget=room.budget(inputs),
                )
                if batch is None:
                    if room.token_room is not None and not room.budget(inputs).lone_oversize:
                        # The oldest request does not fit in what is left: wait for a batch to end.
                        waiting.add(key)
                        self._capacity_wait(plan, now, room)
                    break
                if batch.kind == "anthropic":
                    pending_counts.setdefault(batch.profile, set()).add(batch.requests)
                for other in rooms:
                    if other[0] == group.profile:
                        tokens = batch.tokens if other[1] == group.model else 0
                        rooms[other] = rooms[other].spent(tokens, batch.requests, now)
                self._spawn(batch)  # upload this one while the next is being claimed
                log.info(
                    "batch.flushed",
                    batch=batch.id,
                    provider=batch.profile,
                    model=batch.model,
                    endpoint=batch.endpoint,
                    route=plan.route,
                    requests=batch.requests,
                    bytes=batch.bytes,
                    tokens=batch.tokens,
                    reason=plan.plan.reason.value,
                )
                left -= batch.requests
                left_bytes -= batch.bytes
            if left > 0 and plan.forced_by:
                unanswered.update(plan.forced_by)
            else:
                answered.update(plan.forced_by)
        self._waiting_for_capacity = waiting
        for route, requested_at in answered.items():
            if route not in unanswered:
                await self.store.clear_flush_request(route, requested_at)
        if unanswered:
            next_due = min(next_due, now + self.settings.batching.tick * 10)
        later = await self.store.next_not_before(now)
        return min(next_due, later) if later else next_due

    def _capacity_wait(self, plan: GroupPlan, now: float, room: Capacity | None = None) -> None:
        """Log batch.capacity_wait once per wait, not per pass (a wait ends when a batch of the group goes)."""
        key = (plan.group.profile, plan.group.endpoint, plan.group.model)
        if key in self._waiting_for_capacity:
            return
        room = room or plan.capacity
        log.info(
            "batch.capacity_wait",
            provider=plan.group.profile,
            model=plan.group.model,
            endpoint=plan.group.endpoint,
            route=plan.route,
            queued=plan.group.count,
            limit=room.blocked_by(now) or "enqueued_tokens",
            in_flight_batches=room.in_flight_batches,
            enqueued_tokens=room.tokens,
            token_room=room.token_room,
            until=None if room.blocked_until(now) in (None, UNTIL_A_BATCH_ENDS) else room.blocked_until(now),
        )

    def capacity_freed(self) -> None:
        """A batch ended (the pollers call this): wake the batcher if a route waits for capacity."""
        if self._waiting_for_capacity:
            self._wake.set()

    async def _start_pending(self) -> None:
        now = time.time()
        # Only the intents whose lease this node holds; another daemon submits its own.
        for batch in await self.store.owned_batches(BatchState.PENDING):
            if batch.not_before <= now:
                self._spawn(batch)

    def _spawn(self, batch: BatchRow) -> None:
        if batch.id in self._submitting:
            return
        task = asyncio.create_task(self._submit(batch), name=f"submit-{batch.id}")
        self._submitting[batch.id] = task
        task.add_done_callback(partial(self._forget_submission, batch.id))

    def _forget_submission(self, batch_id: int, task: asyncio.Task[None]) -> None:
        self._submitting.pop(batch_id, None)
        if not task.cancelled() and task.exception() is not None and self.failure is None:
            self.failure = task.exception()
            self._wake.set()

    async def _stop_submissions(self) -> None:
        tasks = list(self._submitting.values())
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task

    async def _request_chunks(self, batch: BatchRow) -> AsyncGenerator[bytes, None]:
        """The batch's request lines, a chunk of whole lines at a time, in id order; the store reads
        the next chunk (in its reader thread) while the caller writes or sends this one."""
        # Every custom_id carries this database's instance: the proof that a batch is ours.
        instance = self._instance
        kind: Kind = "openai" if batch.kind == "openai" else "anthropic"
        rows = self.store.batch_bodies(batch.id, INPUT_CHUNK)
        reading: asyncio.Future[list[tuple[int, str, bytes]] | None] = asyncio.ensure_future(anext(rows, None))
        try:
            while (chunk := await reading) is not None:
                reading = asyncio.ensure_future(anext(rows, None))
                data = b"".join(request_pieces(kind, chunk, instance))  # the bodies copied once, into it
                del chunk
                yield data
                del data
        finally:
            if not reading.done():
                reading.cancel()
            await asyncio.wait([reading])
            if not reading.cancelled():
                reading.exception()  # retrieved: the error that matters is the one raised
            close = getattr(rows, "aclose", None)  # an async generator, in both engines
            if close is not None:
                await close()

    async def _write_input(self, batch: BatchRow, path: Path) -> None:
        """The request lines into `path`: read, join and write overlap (the write in a worker thread)."""
        writing: asyncio.Future[int] | None = None
        with path.open("wb") as out:
            try:
                async with contextlib.aclosing(self._request_chunks(batch)) as chunks:
                    async for data in chunks:
                        if writing is not None:
                            await writing
                        writing = asyncio.ensure_future(asyncio.to_thread(out.write, data))
                        del data
                if writing is not None:
                    await writing
            finally:
                if writing is not None:
                    # A thread cannot be cancelled: its write ends before the file is closed.
                    await asyncio.wait([writing])
                    if not writing.cancelled():
                        writing.exception()  # retrieved: the error that matters is the one raised

    async def _request_stream(self, batch: BatchRow) -> RequestStream:
        """The batch's request lines straight from the store, sent while they are read: nothing is
        written to disk."""
        kind: Kind = "openai" if batch.kind == "openai" else "anthropic"
        size = await self.store.batch_input_size(batch.id)
        total = request_lines_size(
            kind, size.requests, size.body_bytes, size.id_hex_digits, batch.endpoint, self._instance
        )

        async def chunks() -> AsyncIterator[bytes]:
            try:
                async with contextlib.aclosing(self._request_chunks(batch)) as read:
                    async for data in read:
                        yield data
            except Exception as exc:
                stream.failure = exc  # the store's, not the provider's
                raise

        stream = RequestStream(total, chunks())
        return stream

    async def _submit(self, listed: BatchRow) -> None:
        started = time.monotonic()
        # The row as it is now: the caller's copy may predate a failure that just rescheduled it.
        batch = await self.store.batch(listed.id)
        if (
            batch is None
            or batch.state != BatchState.PENDING
            or batch.owner != self.store.node
            or batch.not_before > time.time()
        ):
            return
        metadata = {"batchd_batch": str(batch.id), "batchd_instance": self._instance}
        path = self.workdir / f"batch-{batch.id}.jsonl"
        try:
            provider = self.providers.get(batch.profile)
            if batch.id in self._unsure or batch.submit_attempts > 0:
                # One reconciliation at a time per profile, so two batches never adopt the same remote one.
                async with self._reconciling.setdefault(batch.profile, asyncio.Lock()):
                    # Remote batches held by a local batch, or already proven not this intent's.
                    taken = await self.store.remote_ids(batch.profile) | await self.store.rejected_remotes(batch.id)
                    found = await provider.find_created(batch.id, metadata, batch.created_at, batch.requests, taken)
                    owner = await self.store.remote_owner(found.id) if found is not None else None
                    if found is not None and owner is not None:
                        # Never two local batches on one remote batch: refuse, and say so loudly.
                        log.error("batch.adopt_conflict", batch=batch.id, remote_id=found.id, owner=owner)
                        await self.store.add_error("batch.adopt_conflict", f"batch {batch.id}: {found.id} is {owner}'s")
                        found = None
                    # OpenAI metadata names our instance and this intent: proof enough. An Anthropic
                    # match by count and time is held unverified until its results prove it ours.
                    verified = found is not None and provider.kind == "openai"
                    if found is not None and verified:
                        await self.store.mark_submitted(batch.id, found.id, found.status, time.time(), found.created_at)
                    elif found is not None:
                        await self.store.mark_unverified(
                            batch.id, found.id, found.status, time.time(), found.created_at
                        )
                self._unsure.discard(batch.id)
                if found is not None:
                    log.info(
                        "batch.adopted", batch=batch.id, remote_id=found.id, provider=batch.profile, verified=verified
                    )
                    self._on_submitted(batch.id)
                    return
            if batch.cancel_wanted_at is not None and batch.cancel_reason is not None:
                # Cancelled before it was ever created (proven above when it might have been): it is
                # not sent at all, rather than created only to be cancelled.
                await self._drop_unsent(batch)
                return
            if batch.input_file_id:
                # An upload from an interrupted attempt that no batch uses.
                with contextlib.suppress(ProviderError):
                    await provider.delete_file(batch.input_file_id)
                await self.store.set_input_file(batch.id, None)
            lines: Path | RequestStream
            if provider.streams_input:
                lines = await self._request_stream(batch)
            else:
                await self._write_input(batch, path)
                lines = path

            async def remember_input(file_id: str | None) -> None:
                await self.store.set_input_file(batch.id, file_id)
                self._crashpoints.reach("after-upload")

            try:
                remote = await provider.submit(
                    batch.id, batch.endpoint, lines, batch.requests, metadata, remember_input
                )
            except ProviderError as exc:
                if isinstance(lines, RequestStream) and lines.failure is not None:
                    raise lines.failure from exc  # the store failed mid-send: not the provider's error
                if isinstance(lines, RequestStream) and lines.mismatch is not None:
                    # A bug of ours (batch_input_size against batch_bodies), said as one. Not
                    # ambiguous: a body cut off before its declared length, or before its closing
                    # `]}`, can create nothing, so there is nothing to reconcile.
                    log.error("batch.input_size_mismatch", batch=batch.id, error=lines.mismatch)
                    raise ProviderError(
                        f"{lines.mismatch}: the request was cut off and nothing was created",
                        retryable=True,
                    ) from exc
                raise
            self._crashpoints.reach("after-create")
            await self.store.mark_submitted(batch.id, remote.id, remote.status, time.time(), remote.created_at or None)
            log.info(
                "batch.submitted",
                batch=batch.id,
                remote_id=remote.id,
                provider=batch.profile,
                model=batch.model,
                endpoint=batch.endpoint,
                requests=batch.requests,
                bytes=batch.bytes,
                seconds=round(time.monotonic() - started, 3),
            )
            self._on_submitted(batch.id)
        except ProviderError as exc:
            delay = backoff(batch.submit_attempts, base=2.0, ceiling=self.settings.batching.retry_backoff_max)
            if exc.ambiguous:
                self._unsure.add(batch.id)
            await self.store.note_submit_failure(batch.id, str(exc), time.time() + delay)
            log.warning(
                "batch.submit_failed",
                batch=batch.id,
                provider=batch.profile,
                error=str(exc),
                ambiguous=exc.ambiguous,
                retry_in=round(delay, 1),
            )
            self._wake_later(delay)
        finally:
            path.unlink(missing_ok=True)

    async def _drop_unsent(self, batch: BatchRow) -> None:
        """End a cancelled intent without a provider call: an operator's cancel ends its requests (or
        a cancelled file's) canceled, the rest go back to the queue; a deadline's cancel sends them
        all back, where the real-time fallback takes those whose deadline has come."""
        reason = batch.cancel_reason
        items = await self.store.batched_items(batch.id)
        if reason == CancelReason.OPERATOR:
            ended = items
        elif reason == CancelReason.FILE:
            files = await self.store.canceled_files(batch.id)
            ended = [item for item in items if item.file_id in files]
        else:
            ended = []
        operator = reason in (CancelReason.OPERATOR, CancelReason.FILE)
        fate = Fate.CANCELLED if operator else Fate.DEADLINE_CANCELLED
        error = f"cancelled ({reason}) before it was created at the provider: never sent"
        recorded, requeued = await self.store.drop_pending(batch.id, canceled_results(ended), fate, error, time.time())
        log.warning(
            "batch.dropped_unsent", batch=batch.id, provider=batch.profile, reason=reason, canceled=recorded,
            requeued=requeued,
        )  # fmt: skip
        self._on_results()
        self._wake.set()

    def _wake_later(self, delay: float) -> None:
        asyncio.get_running_loop().call_later(delay, self._wake.set)
