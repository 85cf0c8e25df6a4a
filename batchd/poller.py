"""Pollers: one task per live batch, and the collection of its results.

Each poller looks at its batch at an adaptive interval (from poll_interval_min, growing to
poll_interval_max while nothing changes, back to the minimum on any progress). It does not ask
the provider itself: one sweep task per provider profile lists the provider's batches (100 a
call, newest first) for every poller whose turn has come, so that a thousand live batches cost
ten calls, not a thousand. A poller whose batch the list shows unchanged takes the listed state;
one whose batch changed, or is missing from the pages read (vanished, or further back than the
sweep reads), retrieves it, so nothing is missed. A provider that cannot list is polled by one
retrieve per batch. A poll error is logged and retried; it never fails a batch. When the batch
has ended, its result files are downloaded to disk and applied to SQLite in chunks; requests with
a retryable outcome go back to the queue, and requests that no result line mentions are retried too.

Deadlines (issue 11): a batch holding a request whose deadline (less its lead) has come is cancelled
for the real-time fallback (CancelReason.DEADLINE, wished by fallback.py, sent here by the lease
holder). Its poller waits at most cancel_wait for it to end; past that, its still-waiting requests
with a deadline are handed to the fallback anyway and the batch is still polled and collected when
it ends. At collection what it finished stands (via "batch"), what it did not goes to the fallback
(with a deadline) or back to the queue (without one, its attempt given back); a batch answer for a
request the fallback answered first is a duplicate cost, never a second result.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .aio import wait_any
from .capacity import lowered_limit
from .crashpoints import CrashPoints
from .deadlines import cancel_wait
from .formats import Outcome, Status, owned_by
from .gcpolicy import burst
from .logs import get_logger
from .planner import usable_tokens
from .policy import (
    Cancelled,
    CostOf,
    RetryAt,
    cancel_outcomes,
    canceled_results,
    deadline_outcomes,
    decide,
    hold_pause,
    index_outcomes,
    overdue,
    refund_error,
    retry_delay,
    unanswered,
)
from .providers import ProviderError, ProviderPool
from .providers.base import RemoteBatch, ResultsReport, WindowScan, backoff
from .settings import Settings
from .store.contract import (
    POLLED_BATCH_STATES,
    ApplySummary,
    BatchRow,
    BatchState,
    CancelReason,
    Fate,
    FinalResult,
    ItemState,
    Retry,
    Store,
    SubmittedItem,
)
from .webhooks_in import poll_ceiling

log = get_logger("batchd.poller")

TOKEN_LIMIT = "token_limit_exceeded"
HOLD_BASE = 60.0
# Consecutive 404s on retrieve before a batch counts as gone.
VANISHED_AFTER = 2
# Items decided per store transaction when a whole batch is requeued or ended (short transactions).
DECIDE_CHUNK = 2000
# Pages a sweep reads at most (100 batches each); a live batch further back is retrieved instead.
SWEEP_PAGES = 50
# A sweep also takes every poller due within this share of its own interval, so pollers fall into
# step and share one listing instead of each starting its own.
SWEEP_SLACK = 0.5
# The provider's clock may differ from ours: the list is read this far past the oldest batch wanted.
CLOCK_SKEW = 600.0
# HTTP answers that say the provider (an OpenAI-compatible server, say) has no list endpoint.
NO_LISTING = frozenset({404, 405, 501})

Seen = tuple[str, dict[str, int]]


@dataclass(eq=False, slots=True)
class Watch:
    """One poller's place in its profile's sweeps."""

    profile: str
    remote_id: str
    created_at: float  # ours or the provider's: where a newest-first list has passed the batch
    seen: Seen | None  # the provider's last answer that the poller handled
    due: float = 0.0
    slack: float = 0.0
    # Set while the poller waits for its turn: the listed state, or None (not listed: retrieve).
    answer: asyncio.Future[RemoteBatch | None] | None = None
    # Retrieve at once, without waiting for a sweep (a webhook said the batch changed).
    urgent: bool = False
    # An operator asked to cancel the batch (`batchd cancel`), seen at a lease renewal.
    cancel: CancelReason | None = None

    def waiting(self) -> bool:
        return self.answer is not None and not self.answer.done()

    def reply(self, listed: RemoteBatch | None) -> None:
        if self.answer is not None and not self.answer.done():
            self.answer.set_result(listed)

    def changed(self, listed: RemoteBatch) -> bool:
        return (listed.status, listed.counts) != self.seen

    def unchanged(self, listed: RemoteBatch | None) -> RemoteBatch | None:
        """The listed state when it tells nothing new (no retrieve needed), else None.

        An ended batch is always retrieved: it is collected from the provider's own answer.
        """
        if listed is None or listed.ended or self.changed(listed):
            return None
        return listed


# Result lines per store transaction while collecting: each commit is an fsync, so not too few
# lines; each transaction holds the single writer, so not too many (well under a second).
APPLY_CHUNK = 5000


def output_lost(kind: str, remote: RemoteBatch, unavailable: set[str]) -> bool:
    """Whether requests the provider finished (and billed) are among those left without a result.

    OpenAI writes finished requests to the output file, failed and expired ones to the error
    file: only a lost output file loses finished work. Anthropic has one results stream; its
    counts say whether anything in it had finished.
    """
    if kind == "openai":
        return "output" in unavailable and (remote.finished is None or remote.finished > 0)
    return "results" in unavailable and (remote.finished is None or remote.finished > 0)


async def end_canceled_leftovers(store: Store, now: float) -> int:
    """End canceled the requests a collection requeued although their file was cancelled meanwhile.

    `batchd cancel --file` may commit after a collection read the batch's cancel reason and before
    it recorded its outcomes: the file's unfinished requests then went back to the queue like any
    other. Run after every collection that requeued something, before the batcher can send them
    again; cancel_file is idempotent and skips what moved on. Returns how many were ended.
    """
    ended = 0
    for file_id in await store.canceled_with_queued():
        leftovers = await store.queued_items(file_id)
        recorded, _ = await store.cancel_file(file_id, canceled_results(leftovers), now)
        if recorded:
            log.warning("file.canceled_leftovers", file_id=file_id, requests=recorded)
            ended += recorded
    return ended


class Pollers:
    """Starts and supervises one poller per submitted batch."""

    def __init__(
        self,
        settings: Settings,
        store: Store,
        providers: ProviderPool,
        workdir: Path,
        on_results: Callable[[], None],
        on_requeued: Callable[[], None],
        crashpoints: CrashPoints,
        hold_base: float = HOLD_BASE,
        on_realtime: Callable[[], None] = lambda: None,
    ) -> None:
        self.settings = settings
        self.store = store
        self.providers = providers
        self.workdir = workdir
        self._on_results = on_results
        self._on_requeued = on_requeued
        self._on_realtime = on_realtime  # requests were handed to the real-time fallback
        self._crashpoints = crashpoints
        self._hold_base = hold_base
        self._tasks: dict[int, asyncio.Task[None]] = {}
        self._watches: dict[int, Watch] = {}
        self._sweeps: dict[str, asyncio.Task[None]] = {}
        self._sweep_wake: dict[str, asyncio.Event] = {}
        # When each sweep next wakes by itself (-inf while it lists: it looks again when done).
        self._sweep_at: dict[str, float] = {}
        self._unlisted: set[str] = set()  # profiles whose provider cannot list: one retrieve per batch
        self._instance = ""
        self._stopping = asyncio.Event()
        self._failed = asyncio.Event()
        self.failure: BaseException | None = None
        # Webhooks in (batchd/http.py): when the last verified event arrived.
        self.webhook_seen_at: Callable[[], float | None] = lambda: None

    def start(self, batch_id: int) -> None:
        if batch_id in self._tasks or self._stopping.is_set():
            return
        task = asyncio.create_task(self._poll(batch_id), name=f"poll-{batch_id}")
        self._tasks[batch_id] = task
        task.add_done_callback(self._done)

    def _done(self, task: asyncio.Task[None]) -> None:
        self._tasks = {batch_id: t for batch_id, t in self._tasks.items() if t is not task}
        self._sweeps = {profile: t for profile, t in self._sweeps.items() if t is not task}
        if not task.cancelled() and task.exception() is not None and self.failure is None:
            # A poller that dies of a bug must not leave its batch silently unwatched.
            self.failure = task.exception()
            self._failed.set()

    def keep_only(self, owned: set[int]) -> None:
        """Stop polling batches whose lease this node no longer holds (another node took them over)."""
        for batch_id, task in list(self._tasks.items()):
            if batch_id not in owned:
                log.warning("batch.lease_lost", batch=batch_id)
                task.cancel()

    @property
    def live(self) -> int:
        return len(self._tasks)

    async def run(self, stopping: asyncio.Event) -> None:
        self._stopping = stopping
        self._instance = await self.store.instance_id()
        # Only the batches whose lease this node holds; others are another daemon's (or taken over later).
        for batch in await self.store.owned_batches(*POLLED_BATCH_STATES):
            self.start(batch.id)
        for wake in self._sweep_wake.values():
            wake.set()  # a sweep started before run() waits on the old stopping event
        try:
            await wait_any(float("inf"), stopping, self._failed)
        finally:
            # Also when run() itself is cancelled: a poller outliving it would write after the
            # daemon released its leases to other nodes.
            tasks = [*self._tasks.values(), *self._sweeps.values()]
            for task in tasks:
                task.cancel()
            if tasks:
                # asyncio.wait, not await: their errors are _done's to keep, and a cancellation of
                # run() while it waits here is not swallowed.
                await asyncio.wait(tasks)
        if self.failure is not None:
            raise RuntimeError(f"a poller died: {self.failure!r}") from self.failure

    def _retry_at(self, attempts: int) -> float:
        """When an item that failed retryably on its `attempts`-th try may go out again (its own backoff)."""
        batching = self.settings.batching
        return time.time() + retry_delay(attempts, batching.retry_backoff_base, batching.retry_backoff_max)

    async def _poll(self, batch_id: int) -> None:
        # Read once: only this poller changes the batch until it is collected.
        batch = await self.store.batch(batch_id)
        if batch is None or batch.state not in POLLED_BATCH_STATES or batch.remote_id is None:
            return
        # What the database already holds is not news: no write until the provider's answer changes.
        seen: tuple[str, dict[str, int]] | None = (
            (batch.remote_status, batch.counts) if batch.remote_status and batch.counts else None
        )
        created = batch.remote_created_at or batch.submitted_at or batch.created_at
        watch = Watch(batch.profile, batch.remote_id, created, seen)
        self._watches[batch_id] = watch
        try:
            await self._watched(batch, watch)
        finally:
            if self._watches.get(batch_id) is watch:
                del self._watches[batch_id]

    async def _watched(self, batch: BatchRow, watch: Watch) -> None:
        """The poll loop of one batch, until it is collected (or the daemon stops)."""
        batching = self.settings.batching
        batch_id = batch.id
        assert batch.remote_id is not None
        interval = batching.poll_interval_min
        failures = missing = 0
        seen = watch.seen
        cancel_sent = batch.cancel_requested_at is not None
        handed_over = False  # a deadline-cancelled batch's requests went to the fallback past cancel_wait
        ended_seen_at = batch.ended_at
        delay = 0.0  # the first look at once: the sweep that takes it takes every poller due then
        while not self._stopping.is_set():
            listed = await self._turn(batch.profile, watch, delay)
            if self._stopping.is_set():
                return
            try:
                provider = self.providers.get(batch.profile)
                remote = watch.unchanged(listed) or await provider.retrieve(batch.remote_id)
                failures = missing = 0
            except ProviderError as exc:
                if exc.status == 404:
                    # Twice in a row, so that one confused answer does not end a batch.
                    missing += 1
                    if missing >= VANISHED_AFTER:
                        await self._vanished(batch, str(exc))
                        return
                failures += 1
                log.warning("batch.poll_failed", batch=batch_id, remote_id=batch.remote_id, error=str(exc))
                await self.store.note_batch_error(batch_id, "batch.poll_failed", str(exc))
                delay = max(interval, backoff(failures, base=1.0, ceiling=batching.poll_interval_max))
                continue
            state = (remote.status, remote.counts)
            if state != seen:
                if seen is None or remote.status != seen[0]:
                    log.info(
                        "batch.status", batch=batch_id, remote_id=remote.id, status=remote.status, counts=remote.counts
                    )
                    if not remote.known_status:
                        # Logged once per change: treated as not ended, and the deadline still runs.
                        log.warning("batch.unknown_status", batch=batch_id, remote_id=remote.id, status=remote.status)
                        await self.store.note_batch_error(
                            batch_id,
                            "batch.unknown_status",
                            f"unknown status {remote.status!r}: taken as still running until its window + grace",
                        )
                await self.store.record_poll(
                    batch_id, remote.status, remote.counts, remote.output_file_id, remote.error_file_id, remote.ended
                )
                interval = batching.poll_interval_min
                seen = watch.seen = state
            else:
                interval = min(interval * 1.5, self._ceiling(batch))
            if not remote.ended:
                cancel_sent = await self._cancel_if_wanted(batch, remote, watch, cancel_sent)
                cancel_sent = await self._cancel_if_overdue(batch, remote, cancel_sent)
                handed_over = handed_over or await self._hand_over_if_waited(batch)
            else:
                now = time.time()
                ended_seen_at = ended_seen_at or now
                unavailable: set[str] = set()
                if remote.results_pending and now > ended_seen_at + batching.expiry_grace:
                    # Output promised but never named: past the grace it counts as unavailable.
                    unavailable = self._never_named(batch, remote)
                if not remote.results_pending or unavailable:
                    try:
                        await self._collect(batch, remote, unavailable)
                        return
                    except ProviderError as exc:
                        log.warning("batch.collect_failed", batch=batch_id, remote_id=remote.id, error=str(exc))
                        await self.store.note_batch_error(batch_id, "batch.collect_failed", str(exc))
            delay = interval
            if not handed_over and (due := self._handover_at(batch)) is not None:
                delay = min(delay, max(due - time.time(), 0.0))  # look again when cancel_wait runs out

    def _wake(self, batch_id: int) -> bool:
        """Poll this batch now: its poller retrieves it at once, without waiting for a sweep.

        The single entry point for "this batch changed" (a webhook); False if no poller watches it.
        """
        watch = self._watches.get(batch_id)
        task = self._tasks.get(batch_id)
        if watch is None or task is None:
            return False
        watch.urgent = True
        watch.reply(None)  # a poller waiting for its turn retrieves now; a busy one at its next turn
        return True

    async def _turn(self, profile: str, watch: Watch, delay: float) -> RemoteBatch | None:
        """Wait `delay`, then for the sweep that takes this poller: its batch as listed, or None (retrieve it)."""
        if watch.urgent:
            watch.urgent = False
            return None
        answer: asyncio.Future[RemoteBatch | None] = asyncio.get_running_loop().create_future()
        watch.answer = answer
        listing = profile not in self._unlisted
        if listing:
            watch.due = time.time() + delay
            watch.slack = delay * SWEEP_SLACK
            self._sweep_for(profile, watch.due)
        stopping = asyncio.ensure_future(self._stopping.wait())
        waits: list[asyncio.Future[Any]] = [answer, stopping]
        try:
            # Without a listing the poller waits out its delay alone (_wake may answer sooner).
            await asyncio.wait(waits, timeout=None if listing else delay, return_when=asyncio.FIRST_COMPLETED)
        finally:
            stopping.cancel()
            watch.answer = None
        watch.urgent = False
        return answer.result() if answer.done() else None

    def _sweep_for(self, profile: str, due: float) -> None:
        """Make sure this profile's sweep (started on first use) wakes by `due`."""
        if profile not in self._sweeps:
            self._sweep_wake[profile] = asyncio.Event()
            self._sweep_at[profile] = math.inf
            task = asyncio.create_task(self._sweep(profile, self._sweep_wake[profile]), name=f"sweep-{profile}")
            self._sweeps[profile] = task
            task.add_done_callback(self._done)
        if due < self._sweep_at[profile]:
            self._sweep_wake[profile].set()

    def _waiting(self, profile: str) -> list[Watch]:
        return [watch for watch in self._watches.values() if watch.profile == profile and watch.waiting()]

    async def _sweep(self, profile: str, wake: asyncio.Event) -> None:
        """List the profile's batches for every poller whose turn has come, and answer each one."""
        while not self._stopping.is_set():
            waiting = self._waiting(profile)
            now = time.time()
            due = min((watch.due for watch in waiting), default=math.inf)
            if due > now:
                wake.clear()
                self._sweep_at[profile] = due
                await wait_any(due - now, self._stopping, wake)
                continue
            self._sweep_at[profile] = -math.inf
            turn = [watch for watch in waiting if watch.due <= now + watch.slack]
            listed = await self._list(profile, turn)
            for watch in turn:
                watch.reply(listed.get(watch.remote_id))
            # A poller not yet due whose batch the list shows changed need not wait for its turn.
            for watch in self._waiting(profile):
                seen = listed.get(watch.remote_id)
                if seen is not None and watch.changed(seen):
                    watch.reply(seen)
        for watch in self._waiting(profile):
            watch.reply(None)

    async def _list(self, profile: str, turn: list[Watch]) -> dict[str, RemoteBatch]:
        """The profile's batches as listed, read until every batch in `turn` is found (or cannot be)."""
        wanted = {watch.remote_id for watch in turn}
        found: dict[str, RemoteBatch] = {}
        if not wanted or profile in self._unlisted:
            return found
        try:
            pages = self.providers.get(profile).list_batches()
            if pages is None:
                self._unlisted.add(profile)
                return found
            watched = {watch.remote_id for watch in self._watches.values() if watch.profile == profile}
            scan = WindowScan(min(watch.created_at for watch in turn) - CLOCK_SKEW)
            async with contextlib.aclosing(pages):
                read = 0
                async for page in pages:
                    read += 1
                    for remote in page:
                        if remote.id in watched:
                            found[remote.id] = remote
                        if scan.past_window(remote.created_at):
                            return found  # newest first, and past the oldest batch wanted
                    if wanted.issubset(found) or read >= SWEEP_PAGES:
                        break
        except ProviderError as exc:
            # The pollers not found retrieve their batches: a failed listing misses nothing.
            log.warning("batch.list_failed", provider=profile, error=str(exc))
            if exc.status in NO_LISTING:
                log.warning("batch.list_unsupported", provider=profile, status=exc.status)
                self._unlisted.add(profile)
        return found

    @staticmethod
    def _never_named(batch: BatchRow, remote: RemoteBatch) -> set[str]:
        if batch.kind != "openai":
            return {"results"}
        missing = set()
        if remote.output_file_id is None:
            missing.add("output")
        if remote.error_file_id is None:
            missing.add("error")
        return missing

    def cancel_wanted(self, batch_id: int, reason: CancelReason) -> bool:
        """An operator asked to cancel this batch (store.request_cancel): its poller cancels it now.
        False when no poller watches it (a pending batch's poller reads the wish when it starts)."""
        watch = self._watches.get(batch_id)
        if watch is None:
            return False
        watch.cancel = reason
        return self._wake(batch_id)

    async def _cancel_if_wanted(self, batch: BatchRow, remote: RemoteBatch, watch: Watch, cancel_sent: bool) -> bool:
        """Cancel at the provider a batch an operator cancelled (`batchd cancel`); what its requests
        become is decided when it is collected (_collect reads the reason again)."""
        reason = watch.cancel or (batch.cancel_reason if batch.cancel_wanted_at is not None else None)
        if cancel_sent or reason is None or reason == CancelReason.EXPIRY:
            return cancel_sent
        if not await self._send_cancel(batch, remote):
            return False
        if reason == CancelReason.DEADLINE:
            wait = self._cancel_wait(batch)
            message = (
                f"a request's deadline came: cancel requested while {remote.status!r}; what it has not finished"
                f" within {wait:g} s goes to the real-time API"
            )
            log.warning("batch.deadline_cancelled", batch=batch.id, remote_id=remote.id, cancel_wait=wait)
        else:
            what = "the batch" if reason == CancelReason.OPERATOR else "a file of the batch (batchd cancel --file)"
            message = f"an operator cancelled {what}: cancel requested while {remote.status!r}"
            log.warning("batch.operator_cancelled", batch=batch.id, remote_id=remote.id, reason=reason.value)
        await self.store.note_cancel_requested(batch.id, message, reason)
        batch.cancel_requested_at = time.time()
        batch.cancel_reason = batch.cancel_reason or reason
        return True

    def _cancel_wait(self, batch: BatchRow) -> float:
        """How long a deadline-cancelled batch may take to end before its requests go anyway."""
        lead = self.settings.route_plan(batch.profile, batch.model).deadline_lead
        return cancel_wait(lead, self.settings.batching.cancel_wait_fraction)

    def _handover_at(self, batch: BatchRow) -> float | None:
        """When a deadline-cancelled batch's waiting requests go to the fallback anyway (None: not one)."""
        if batch.cancel_reason != CancelReason.DEADLINE or batch.cancel_requested_at is None:
            return None
        return batch.cancel_requested_at + self._cancel_wait(batch)

    async def _hand_over_if_waited(self, batch: BatchRow) -> bool:
        """Past cancel_wait, a deadline-cancelled batch that has not ended gives its still-waiting
        requests with a deadline to the fallback; it is still polled and collected when it ends
        (a late answer of one of them is the first final, or a duplicate cost)."""
        due = self._handover_at(batch)
        if due is None or time.time() < due:
            return False
        handed = await self.store.hand_over(batch.id)
        log.warning("fallback.handed_over", batch=batch.id, requests=handed, when="cancel_wait")
        if handed:
            self._on_realtime()
        return True

    async def _send_cancel(self, batch: BatchRow, remote: RemoteBatch) -> bool:
        """Ask the provider to cancel; False (logged, noted on the batch) when it could not be asked."""
        if batch.state == BatchState.UNVERIFIED:
            return False  # maybe a stranger's batch: never cancel what is not proven ours
        try:
            await self.providers.get(batch.profile).cancel(remote.id)
        except ProviderError as exc:
            log.warning("batch.cancel_failed", batch=batch.id, remote_id=remote.id, error=str(exc))
            await self.store.note_batch_error(batch.id, "batch.cancel_failed", str(exc))
            return False
        return True

    async def _cancel_if_overdue(self, batch: BatchRow, remote: RemoteBatch, cancel_sent: bool) -> bool:
        """Cancel a batch still running past its window plus grace; its requests come back once it has ended.

        The window is the profile's completion_window where it sets one (the window its batches are
        created with), else [batching] completion_window.
        """
        batching = self.settings.batching
        profile = self.settings.providers.get(batch.profile)
        window = batching.completion_window
        if profile is not None and "completion_window" in profile.model_fields_set:
            window = profile.completion_seconds
        created = batch.remote_created_at or remote.created_at or batch.submitted_at or batch.created_at
        if cancel_sent or not overdue(created, time.time(), window, batching.expiry_grace):
            return cancel_sent
        if not await self._send_cancel(batch, remote):
            return False
        message = (
            f"still {remote.status!r} {round(time.time() - created)} s after creation (window"
            f" {window:g} s + grace {batching.expiry_grace:g} s): cancel requested;"
            " unfinished requests go back to the queue once it has ended"
        )
        log.warning("batch.overdue_cancelled", batch=batch.id, remote_id=remote.id, status=remote.status)
        await self.store.note_cancel_requested(batch.id, message)
        batch.cancel_requested_at = time.time()
        return True

    async def _vanished(self, batch: BatchRow, error: str) -> None:
        """The provider no longer knows the batch: its requests go back to the queue, once."""
        assert batch.remote_id is not None
        if batch.state == BatchState.UNVERIFIED:
            await self._not_ours(batch, "vanished before its ownership could be proven")
            return
        summary = await self._end_unanswered(
            batch, "errored", {"code": "batch_vanished", "message": f"batch {batch.remote_id} is gone at the provider"}
        )
        message = f"{batch.remote_id} is gone at the provider ({error}); {summary.requeued} requests requeued"
        log.warning(
            "batch.vanished",
            batch=batch.id,
            remote_id=batch.remote_id,
            requeued=summary.requeued,
            final=summary.final,
        )
        await self.store.finish_batch(batch.id, Fate.VANISHED, message)
        if summary.requeued:
            await self._end_canceled_leftovers()
        self._on_results()
        if summary.requeued:
            self._on_requeued()

    async def _end_canceled_leftovers(self) -> None:
        if await end_canceled_leftovers(self.store, time.time()):
            self._on_results()

    async def _not_ours(self, batch: BatchRow, reason: str) -> None:
        assert batch.remote_id is not None
        log.warning("batch.not_ours", batch=batch.id, remote_id=batch.remote_id, reason=reason)
        await self.store.unadopt(batch.id, batch.remote_id, reason)
        self._on_requeued()  # the batcher reconciles the intent again

    async def _owned(self, batch: BatchRow, remote: RemoteBatch) -> str | None:
        """Why an unverified batch is not provably ours (None when its results prove it is)."""
        provider = self.providers.get(batch.profile)
        report = ResultsReport()
        custom_ids: list[str] = []
        async for chunk in provider.results(remote, self.workdir, report):
            custom_ids.extend(outcome.provider_custom_id for outcome in chunk)
        if report.unavailable:
            return "its results are unavailable, so its ownership cannot be proven"
        items = set(await self.store.batch_item_ids(batch.id))
        if not owned_by(custom_ids, self._instance, items) or len(set(custom_ids)) != len(items):
            return "its results are not answers to this batch's requests from this database"
        return None

    async def _collect(self, batch: BatchRow, remote: RemoteBatch, unavailable: set[str]) -> None:
        started = time.monotonic()
        provider = self.providers.get(batch.profile)
        total = ApplySummary()
        fate: Fate | None = None
        fate_error: str | None = None
        if not self._instance:  # results are matched to this database's own custom_ids
            self._instance = await self.store.instance_id()
        if batch.state == BatchState.UNVERIFIED:
            reason = "its results are unavailable" if unavailable else await self._owned(batch, remote)
            if reason is not None:
                await self._not_ours(batch, reason)
                return
            await self.store.confirm_ownership(batch.id)
            log.info("batch.verified", batch=batch.id, remote_id=remote.id, provider=batch.profile)
            confirmed = await self.store.batch(batch.id)
            assert confirmed is not None
            batch = confirmed
        # Read again: an operator may have cancelled the batch, or a file of it, since the poll began.
        fresh = await self.store.batch(batch.id)
        reason = fresh.cancel_reason if fresh is not None else batch.cancel_reason
        cancel_sent = (fresh.cancel_requested_at if fresh is not None else None) or batch.cancel_requested_at
        batch.cancel_reason = reason  # what _apply_all and _record decide by (a deadline cancel's rule)
        cancelled: Cancelled | None = None
        if reason == CancelReason.OPERATOR:
            cancelled = Cancelled(whole=True)
        elif reason == CancelReason.FILE:
            cancelled = Cancelled(files=frozenset(await self.store.canceled_files(batch.id)))
        if remote.failed:
            total = await self._collect_failed(batch, remote, cancelled)
        else:
            # One price lookup per batch, not one per result.
            discount = self.settings.providers[batch.profile].batch_discount
            cost_of = self.settings.price_table().cost_of(batch.model, discount)
            report = ResultsReport(unavailable=set(unavailable))
            if not unavailable:
                chunks = provider.results(remote, self.workdir, report, APPLY_CHUNK)
                with burst():
                    total += await self._apply_all(batch, chunks, cost_of, cancelled)
            if report.unavailable and output_lost(batch.kind, remote, report.unavailable):
                # What the provider finished is paid for: not sent again automatically (an operator may).
                fate = Fate.OUTPUT_UNAVAILABLE
                what = "refused (results_url on another host)" if report.refused else "gone at the provider"
                fate_error = f"output of {remote.id} ({', '.join(sorted(report.unavailable))}) {what}"
                leftover = await self._end_unanswered(
                    batch, "errored", {"code": "output_unavailable", "message": fate_error}, retryable=False
                )
                log.warning(
                    "batch.output_unavailable",
                    batch=batch.id,
                    remote_id=remote.id,
                    unavailable=sorted(report.unavailable),
                    refused=report.refused,
                    errored=leftover.final,
                )
            else:
                leftover = await self._end_unanswered(
                    batch,
                    remote.unanswered_status,
                    {"message": f"no result for this request in batch {remote.id} ({remote.status})"},
                    cancelled=cancelled,
                )
            total += leftover
            await self.store.release_hold(batch.profile, batch.model)
        recorded = fate is None and cancel_sent is not None  # logged when the cancel went out
        if fate is None and cancelled is not None:
            by = "batchd cancel" if cancelled.whole else "batchd cancel --file"
            fate, fate_error = Fate.CANCELLED, f"cancelled by an operator ({by}); {total.requeued} requests requeued"
        elif recorded and reason == CancelReason.DEADLINE:
            fate, fate_error = (
                Fate.DEADLINE_CANCELLED,
                f"cancelled for the real-time fallback; {total.handed_over} requests handed over,"
                f" {total.requeued} requeued",
            )
        elif recorded:
            fate, fate_error = Fate.OVERDUE_CANCELLED, f"cancelled past its window; {total.requeued} requests requeued"
        await self.store.finish_batch(batch.id, fate, fate_error, record=not recorded)
        if total.requeued:
            await self._end_canceled_leftovers()
        if batch.kind == "openai" and batch.input_file_id:
            with contextlib.suppress(ProviderError):
                await provider.delete_file(batch.input_file_id)
        self._on_results()
        if total.requeued:
            self._on_requeued()
        if total.handed_over:
            log.warning("fallback.handed_over", batch=batch.id, requests=total.handed_over, when="collected")
            self._on_realtime()
        if total.duplicates:
            log.warning("result.duplicate", batch=batch.id, requests=total.duplicates, via="batch")
        log.info(
            "batch.collected",
            batch=batch.id,
            remote_id=remote.id,
            provider=batch.profile,
            model=batch.model,
            status=remote.status,
            requests=batch.requests,
            final=total.final,
            requeued=total.requeued,
            handed_over=total.handed_over,
            duplicates=total.duplicates,
            seconds=round(time.monotonic() - started, 3),
        )

    async def _collect_failed(
        self, batch: BatchRow, remote: RemoteBatch, cancelled: Cancelled | None = None
    ) -> ApplySummary:
        """A batch the provider refused as a whole (validation, enqueued-token limit)."""
        batching = self.settings.batching
        now = time.time()
        codes = {str(error.get("code")) for error in remote.errors}
        log.warning("batch.failed", batch=batch.id, remote_id=remote.id, codes=sorted(codes), errors=remote.errors[:5])
        if TOKEN_LIMIT in codes:
            # Policy decides the pause (doubling per consecutive failure); the store only records the hold.
            failures = await self.store.hold_failures(batch.profile, batch.model) + 1
            pause = hold_pause(failures, self._hold_base, batching.retry_backoff_max)
            await self.store.hold(batch.profile, batch.model, time.time() + pause, failures, TOKEN_LIMIT)
            log.warning("batch.held", provider=batch.profile, model=batch.model, seconds=round(pause, 1))
            # The provider counted more than it allows: our estimate of what it refused (this batch and
            # every other live batch of the model, this one included in usage) bounds its real limit.
            refused = (await self.store.usage(batch.profile, batch.model, now)).enqueued_tokens
            profile = self.settings.providers.get(batch.profile)
            learned_before = (await self.store.learned_limits()).get((batch.profile, batch.model))
            current = usable_tokens(profile, batch.model, learned_before) if profile is not None else learned_before
            learned = await self.store.lower_learned_limit(
                batch.profile, batch.model, lowered_limit(current if current is not None else refused, refused), now
            )
            log.warning(
                "batch.limit_learned",
                provider=batch.profile,
                model=batch.model,
                refused_tokens=refused,
                batch_tokens=batch.tokens,
                enqueued_tokens=learned,
            )
            # The provider never ran them: every one goes back with its attempt given back.
            requeued = await self.store.refund_batch(batch.id, now, refund_error("errored", remote.errors[0]))
            return ApplySummary(requeued=requeued)
        # Errors that name a line are about that request itself; the rest of the batch goes back.
        by_line = {int(e["line"]): e for e in remote.errors if isinstance(e.get("line"), int)}
        summary = ApplySummary()
        if by_line:
            ids = await self.store.batch_item_ids(batch.id)
            bad = {
                ids[line - 1]: Outcome("", "invalid", None, error, None, retryable=False)
                for line, error in by_line.items()
                if 0 < line <= len(ids)
            }
            summary = await self._record(batch, bad, now, None)
        rest = await self._end_unanswered(
            batch, "errored", {"message": f"batch {remote.id} failed", "errors": remote.errors[:5]}, cancelled=cancelled
        )
        return summary + rest

    async def _apply_all(
        self,
        batch: BatchRow,
        chunks: AsyncIterator[list[Outcome]],
        cost_of: CostOf | None,
        cancelled: Cancelled | None = None,
    ) -> ApplySummary:
        """Record every chunk of provider outcomes, in order, one store transaction each.

        Each chunk is parsed and decided while the one before it commits (the store works in its
        own thread), and the batch's waiting items are read once, while the results download,
        instead of once per chunk. Commits still happen one after the other, in chunk order.
        """
        loading = asyncio.ensure_future(self._waiting_items(batch))
        committing: asyncio.Future[ApplySummary] | None = None
        total = ApplySummary()
        try:
            waiting: dict[int, SubmittedItem] | None = None
            async for outcomes in chunks:
                if waiting is None:
                    waiting = {item.id: item for item in await loading}
                by_item, foreign = index_outcomes(outcomes, self._instance)
                # An item decided by an earlier chunk is not waiting any more: a repeat of it is ignored,
                # as the store would ignore it (and still does, should the item have changed meanwhile).
                items = [waiting.pop(item_id) for item_id in sorted(by_item) if item_id in waiting]
                finals, retries, handovers, ignored = self._decide(
                    batch, items, by_item, self._retry_at, cost_of, cancelled
                )
                total += ApplySummary(ignored=foreign + ignored)
                if committing is not None:
                    total += await self._committed(committing)
                committing = asyncio.ensure_future(self.store.record_outcomes(batch.id, finals, retries, handovers))
            if committing is not None:
                total += await self._committed(committing)
                committing = None
        finally:
            if not loading.cancel() and not loading.cancelled():
                loading.exception()  # a failed read is not left unretrieved (the error that matters is raised)
            if committing is not None:
                # Leaving early (a failed download, a cancellation): the transaction in flight still
                # ends whole before we go, and its own failure, if any, is not left unretrieved.
                await asyncio.wait([committing])
                if not committing.cancelled():
                    committing.exception()
        return total

    async def _committed(self, committing: asyncio.Future[ApplySummary]) -> ApplySummary:
        summary = await committing
        self._crashpoints.reach("after-results-commit")
        self._on_results()
        return summary

    async def _record(
        self,
        batch: BatchRow,
        by_item: dict[int, Outcome],
        retry_at: RetryAt,
        cost_of: CostOf | None,
        cancelled: Cancelled | None = None,
    ) -> ApplySummary:
        items = await self.store.submitted_items(batch.id, list(by_item))
        finals, retries, handovers, ignored = self._decide(batch, items, by_item, retry_at, cost_of, cancelled)
        summary = await self.store.record_outcomes(batch.id, finals, retries, handovers)
        return summary + ApplySummary(ignored=ignored)

    def _decide(
        self,
        batch: BatchRow,
        items: list[SubmittedItem],
        by_item: dict[int, Outcome],
        retry_at: RetryAt,
        cost_of: CostOf | None,
        cancelled: Cancelled | None,
    ) -> tuple[list[FinalResult], list[Retry], list[int], int]:
        """(finals, retries, handovers to the fallback, ignored) for outcomes of the batch's `items`."""
        outcomes, bystanders = cancel_outcomes(by_item, items, cancelled)
        handovers: list[int] = []
        refunds: list[Retry] = []
        if batch.cancel_reason == CancelReason.DEADLINE:
            split = deadline_outcomes(outcomes, items, time.time())
            outcomes, handovers, refunds = split.outcomes, split.realtime, split.requeue
        finals, retries, ignored = decide(
            batch,
            items,
            outcomes,
            max_attempts=self.settings.batching.max_attempts,
            retry_at=retry_at,
            cost_of=cost_of,
            instance=self._instance,
            always_retry=bystanders,
        )
        return finals, retries + refunds, handovers, ignored

    async def _waiting_items(self, batch: BatchRow) -> list[SubmittedItem]:
        """The batch's items waiting for an outcome, and, for a cancelled batch, those the real-time
        fallback answered first (a billed answer of theirs is a duplicate cost)."""
        items = await self.store.submitted_items(batch.id)
        if batch.cancel_reason is not None:
            items += await self.store.fallback_answered(batch.id)
        return items

    async def _end_unanswered(
        self, batch: BatchRow, status: Status, error: object, retryable: bool = True, cancelled: Cancelled | None = None
    ) -> ApplySummary:
        """Items of an ended batch that no result line mentioned: retried (with their own backoff) or
        finished as `status`, in short transactions (each chunk idempotent)."""
        total = ApplySummary()
        # A request handed to the fallback is not the batch's to end: only an answer may still win.
        waiting = [i for i in await self.store.submitted_items(batch.id) if i.state is ItemState.SUBMITTED]
        for start in range(0, len(waiting), DECIDE_CHUNK):
            chunk = waiting[start : start + DECIDE_CHUNK]
            outcomes = unanswered(chunk, status, error, retryable)
            total += await self._record(batch, outcomes, self._retry_at, None, cancelled)
        return total

    # -- webhooks in (issue 12): an event wakes the batch's poller; polling stays the fallback --

    def poll_now(self, batch_id: int) -> bool:
        """Poll this batch now instead of at its next interval; False when this node does not poll it."""
        return self._wake(batch_id)

    def _ceiling(self, batch: BatchRow) -> float:
        """The longest wait between polls: longer for OpenAI batches while webhooks are healthy."""
        batching, http = self.settings.batching, self.settings.http
        if http is None or batch.kind != "openai":
            return batching.poll_interval_max
        return poll_ceiling(
            batching.poll_interval_max, http.webhook_poll_interval, self.webhook_seen_at(), time.time(),
            http.webhook_healthy_for,
        )  # fmt: skip
