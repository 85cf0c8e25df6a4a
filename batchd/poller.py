"""Pollers: one task per live batch, and the collection of its results.

Each poller retrieves its batch at an adaptive interval (from poll_interval_min, growing to
poll_interval_max while nothing changes, back to the minimum on any progress). A poll error is
logged and retried; it never fails a batch. When the batch has ended, its result files are
downloaded to disk and applied to SQLite in chunks; requests with a retryable outcome go back to
the queue, and requests that no result line mentions are retried too.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path

from .aio import wait_any
from .crashpoints import CrashPoints
from .formats import Outcome, provider_custom_id
from .logs import get_logger
from .providers import ProviderError, ProviderPool
from .providers.base import RemoteBatch, backoff
from .settings import Settings
from .store import ApplySummary, BatchRow, Store

log = get_logger("batchd.poller")

TOKEN_LIMIT = "token_limit_exceeded"
HOLD_BASE = 60.0


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
    ) -> None:
        self.settings = settings
        self.store = store
        self.providers = providers
        self.workdir = workdir
        self._on_results = on_results
        self._on_requeued = on_requeued
        self._crashpoints = crashpoints
        self._hold_base = hold_base
        self._tasks: dict[int, asyncio.Task[None]] = {}
        self._stopping = asyncio.Event()
        self._failed = asyncio.Event()
        self.failure: BaseException | None = None

    def start(self, batch_id: int) -> None:
        if batch_id in self._tasks or self._stopping.is_set():
            return
        task = asyncio.create_task(self._poll(batch_id), name=f"poll-{batch_id}")
        self._tasks[batch_id] = task
        task.add_done_callback(self._done)

    def _done(self, task: asyncio.Task[None]) -> None:
        self._tasks = {batch_id: t for batch_id, t in self._tasks.items() if t is not task}
        if not task.cancelled() and task.exception() is not None and self.failure is None:
            # A poller that dies of a bug must not leave its batch silently unwatched.
            self.failure = task.exception()
            self._failed.set()

    @property
    def live(self) -> int:
        return len(self._tasks)

    async def run(self, stopping: asyncio.Event) -> None:
        self._stopping = stopping
        for batch in await self.store.batches_in_state("submitted"):
            self.start(batch.id)
        await wait_any(float("inf"), stopping, self._failed)
        tasks = list(self._tasks.values())
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        if self.failure is not None:
            raise RuntimeError(f"a poller died: {self.failure!r}") from self.failure

    async def _poll(self, batch_id: int) -> None:
        batching = self.settings.batching
        interval = batching.poll_interval_min
        failures = 0
        # Read once: only this poller changes the batch until it is collected.
        batch = await self.store.batch(batch_id)
        if batch is None or batch.state != "submitted" or batch.remote_id is None:
            return
        # What the database already holds is not news: no write until the provider's answer changes.
        seen: tuple[str, dict[str, int]] | None = (
            (batch.remote_status, batch.counts) if batch.remote_status and batch.counts else None
        )
        # Jitter, so that a thousand pollers started together do not poll in one burst forever.
        await wait_any(random.uniform(0, interval), self._stopping)
        while not self._stopping.is_set():
            try:
                provider = self.providers.get(batch.profile)
                remote = await provider.retrieve(batch.remote_id)
                failures = 0
            except ProviderError as exc:
                failures += 1
                log.warning("batch.poll_failed", batch=batch_id, remote_id=batch.remote_id, error=str(exc))
                await self.store.note_batch_error(batch_id, "batch.poll_failed", str(exc))
                await wait_any(
                    max(interval, backoff(failures, base=1.0, ceiling=batching.poll_interval_max)), self._stopping
                )
                continue
            state = (remote.status, remote.counts)
            if state != seen:
                if seen is None or remote.status != seen[0]:
                    log.info(
                        "batch.status", batch=batch_id, remote_id=remote.id, status=remote.status, counts=remote.counts
                    )
                await self.store.record_poll(
                    batch_id, remote.status, remote.counts, remote.output_file_id, remote.error_file_id
                )
                interval = batching.poll_interval_min
                seen = state
            else:
                interval = min(interval * 1.5, batching.poll_interval_max)
            if remote.ended and not remote.results_pending:
                try:
                    await self._collect(batch, remote)
                    return
                except ProviderError as exc:
                    log.warning("batch.collect_failed", batch=batch_id, remote_id=remote.id, error=str(exc))
                    await self.store.note_batch_error(batch_id, "batch.collect_failed", str(exc))
            await wait_any(interval, self._stopping)

    async def _collect(self, batch: BatchRow, remote: RemoteBatch) -> None:
        started = time.monotonic()
        batching = self.settings.batching
        provider = self.providers.get(batch.profile)
        now = time.time()
        total = ApplySummary()
        if remote.failed:
            total = await self._collect_failed(batch, remote)
        else:
            prices = self.settings.price_table()
            discount = self.settings.providers[batch.profile].batch_discount
            cost_of = partial(prices.cost, batch.model, discount=discount)
            async for chunk in provider.results(remote, self.workdir):
                summary = await self.store.apply_outcomes(batch, chunk, batching.max_attempts, now, cost_of)
                total += summary
                self._crashpoints.reach("after-results-commit")
                self._on_results()
            leftover = await self.store.requeue_unanswered(
                batch,
                remote.unanswered_status,
                {"message": f"no result for this request in batch {remote.id} ({remote.status})"},
                batching.max_attempts,
                now,
                refund=False,
            )
            total += leftover
            await self.store.release_hold(batch.profile, batch.model)
        await self.store.finish_batch(batch.id)
        if batch.kind == "openai" and batch.input_file_id:
            with contextlib.suppress(ProviderError):
                await provider.delete_file(batch.input_file_id)
        self._on_results()
        if total.requeued:
            self._on_requeued()
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
            seconds=round(time.monotonic() - started, 3),
        )

    async def _collect_failed(self, batch: BatchRow, remote: RemoteBatch) -> ApplySummary:
        """A batch the provider refused as a whole (validation, enqueued-token limit)."""
        batching = self.settings.batching
        now = time.time()
        codes = {str(error.get("code")) for error in remote.errors}
        log.warning("batch.failed", batch=batch.id, remote_id=remote.id, codes=sorted(codes), errors=remote.errors[:5])
        if TOKEN_LIMIT in codes:
            pause = await self.store.hold(
                batch.profile, batch.model, self._hold_base, batching.retry_backoff_max, TOKEN_LIMIT
            )
            log.warning("batch.held", provider=batch.profile, model=batch.model, seconds=round(pause, 1))
            return await self.store.requeue_unanswered(
                batch, "errored", remote.errors[0], batching.max_attempts, now, refund=True
            )
        # Errors that name a line are about that request itself; the rest of the batch goes back.
        by_line = {int(e["line"]): e for e in remote.errors if isinstance(e.get("line"), int)}
        summary = ApplySummary()
        if by_line:
            ids = await self.store.batch_item_ids(batch.id)
            bad = [
                Outcome(provider_custom_id(ids[line - 1]), "invalid", None, error, None, retryable=False)
                for line, error in by_line.items()
                if 0 < line <= len(ids)
            ]
            summary = await self.store.apply_outcomes(batch, bad, batching.max_attempts, now)
        rest = await self.store.requeue_unanswered(
            batch,
            "errored",
            {"message": f"batch {remote.id} failed", "errors": remote.errors[:5]},
            batching.max_attempts,
            now,
            refund=False,
        )
        return summary + rest
