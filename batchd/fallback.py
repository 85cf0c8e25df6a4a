"""The real-time fallback: requests whose deadline is near leave batch processing for the real-time API.

From an item's `fallback_at` (its deadline less its route's deadline_lead, fixed at ingest) on, an
item still without a final result is the fallback's:

- a QUEUED item (never batched: a closed window, a capacity wait) becomes REALTIME at once;
- a live batch holding one is cancelled at the provider (CancelReason.DEADLINE: the wish is written
  here, the batch's lease holder sends it, see poller.py). A PENDING batch (no remote batch yet) is
  let be created and then cancelled, the simplest correct thing: taking its requests back while
  the batcher may be creating it could put them in a batch and in real time at once. The poller
  waits at most cancel_wait for the batch to end and collects what it finished; the rest goes to
  REALTIME, at collection or when cancel_wait runs out.

This task sends the REALTIME items of the files this node ingested (it owns their results), paced
per profile by realtime.send_all (concurrency, requests and tokens per minute, 429 and retry-after,
OpenAI's flex tier first where the profile allows it). Each answer is recorded as it comes, in its
own short transaction: a final result `via` "realtime" priced at what was paid (policy.realtime_final,
pricing.served_cost) if the item is still REALTIME, else (a late batch answer won) a duplicate cost.
A request whose real-time call still fails retryably after send_all's own attempts is tried again
later while its deadline allows (policy.fallback_retry_at), else its error is final.

The one unrecorded double payment: a crash after a request was answered and before its answer was
recorded sends it again on restart (the window is one request's answer and one commit).
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import time
from collections import Counter
from collections.abc import Callable, Iterable

import orjson

from .aio import wait_any
from .formats import Outcome, provider_custom_id
from .logs import get_logger
from .policy import CostOf, fallback_retry_at, realtime_final
from .providers import ProviderPool
from .realtime import Pacer, RealtimeLimits, RealtimeRequest, Sent, send_all
from .settings import ProviderProfile, Settings
from .store.contract import RealtimeItem, Store

log = get_logger("batchd.fallback")

# REALTIME items taken per look and in flight at most (each send_all paces its own profile).
TAKE = 500
MAX_IN_FLIGHT = 2000
# Without a wake-up (an ingest, a handover, a send done) the task looks again after this long, for
# what another node changed (a batch it collected held this node's requests).
RECHECK = 30.0


def limits_of(profile: ProviderProfile) -> RealtimeLimits:
    """A profile's real-time pacing, from its settings."""
    return RealtimeLimits(
        concurrency=profile.realtime_concurrency,
        requests_per_minute=profile.requests_per_minute,
        tokens_per_minute=profile.tokens_per_minute,
        flex=profile.flex and profile.kind == "openai",
    )


class Fallback:
    """The daemon's fallback task: hands due requests over, asks for deadline cancels, sends in real time."""

    def __init__(
        self,
        settings: Settings,
        store: Store,
        providers: ProviderPool,
        on_results: Callable[[], None],
        on_cancel: Callable[[int], object],
    ) -> None:
        self.settings = settings
        self.store = store
        self.providers = providers
        self._on_results = on_results
        self._on_cancel = on_cancel  # a batch was marked for a DEADLINE cancel: wake its poller, if ours
        self._wake = asyncio.Event()
        self._in_flight: set[int] = set()
        self._retry_at: dict[int, float] = {}  # item -> when it may be sent again (retryable failure)
        self._failures: dict[int, int] = {}
        self._pacers: dict[str, Pacer] = {}
        self._sends: set[asyncio.Task[None]] = set()
        self._instance = ""
        self.failure: BaseException | None = None

    def wake(self) -> None:
        """Look now: new work (an ingest), or requests handed over by a poller."""
        self._wake.set()

    async def run(self, stopping: asyncio.Event) -> None:
        self._instance = await self.store.instance_id()
        try:
            while not stopping.is_set():
                self._wake.clear()
                if self.failure is not None:
                    raise RuntimeError(f"a real-time sender died: {self.failure!r}") from self.failure
                now = time.time()
                due = await self.store.fallback_due(now)
                if due.realtime:
                    log.warning("fallback.handed_over", batch=None, requests=due.realtime, when="queued")
                for batch_id in due.batches:
                    log.info("fallback.cancel_wanted", batch=batch_id)
                    self._on_cancel(batch_id)
                await self._send_due()
                next_due = await self.store.next_fallback_at(now)
                wake_at = min(next_due or math.inf, min(self._retry_at.values(), default=math.inf))
                await wait_any(min(max(wake_at - time.time(), 0.0), RECHECK), stopping, self._wake)
        finally:
            # Answers not yet recorded are sent again after a restart (see the module docstring).
            for task in self._sends:
                task.cancel()
            for task in list(self._sends):
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task

    async def _send_due(self) -> None:
        free = MAX_IN_FLIGHT - len(self._in_flight)
        if free <= 0:
            return
        now = time.time()
        # A retry whose time has come is sent with the rest (or is gone: a late batch answer won it).
        self._retry_at = {item_id: at for item_id, at in self._retry_at.items() if at > now}
        later = set(self._retry_at)
        items = await self.store.realtime_items(min(free, TAKE), exclude=self._in_flight | later)
        by_profile: dict[str, list[RealtimeItem]] = {}
        for item in items:
            by_profile.setdefault(item.profile, []).append(item)
        for profile, group in by_profile.items():
            self._in_flight.update(item.id for item in group)
            task = asyncio.create_task(self._send(profile, group), name=f"realtime-{profile}")
            self._sends.add(task)
            task.add_done_callback(self._sent)

    def _sent(self, task: asyncio.Task[None]) -> None:
        self._sends.discard(task)
        if not task.cancelled() and task.exception() is not None and self.failure is None:
            self.failure = task.exception()  # the run loop raises it: the daemon stops, not limps on
        self._wake.set()  # room for the next requests

    async def _send(self, profile: str, items: list[RealtimeItem]) -> None:
        started = time.monotonic()
        counts: Counter[str] = Counter()
        try:
            if profile not in self.settings.providers:
                # Its profile left the configuration: nothing can send it; say so in its result.
                error = {"message": f"provider profile {profile!r} is no longer configured"}
                await self._record_all(items, error)
                counts["errored"] += len(items)
                return
            prof = self.settings.providers[profile]
            limits = limits_of(prof)
            pacer = self._pacers.setdefault(profile, Pacer(limits))
            provider = self.providers.get(profile)
            prices = self.settings.price_table()
            costs: dict[str, CostOf] = {}
            by_custom_id: dict[str, RealtimeItem] = {}
            requests = []
            for item in items:
                custom_id = provider_custom_id(item.id, self._instance)
                by_custom_id[custom_id] = item
                requests.append(RealtimeRequest(custom_id, item.endpoint, orjson.loads(item.body), item.tokens))

            async def on_sent(sent: Sent) -> None:
                item = by_custom_id[sent.request.custom_id]
                counts[sent.tier] += 1
                if sent.outcome.retryable and self._later(item, sent.outcome):
                    counts["retry_later"] += 1
                    return
                cost_of = costs.get(item.model)
                if cost_of is None:
                    cost_of = costs[item.model] = prices.cost_of(item.model, prof.batch_discount)
                final = realtime_final(item, sent.outcome, sent.tier, cost_of)
                summary = await self.store.record_realtime([final])
                self._failures.pop(item.id, None)
                self._retry_at.pop(item.id, None)
                counts[str(sent.outcome.status)] += 1
                if summary.duplicates:
                    counts["duplicates"] += 1
                    log.warning(
                        "result.duplicate", item=item.id, batch=item.batch_id, via="realtime", cost=final.cost_paid
                    )
                if summary.final:
                    self._on_results()

            await send_all(provider, requests, limits, on_sent, pacer)
        finally:
            self._in_flight.difference_update(item.id for item in items)
            log.info(
                "realtime.sent",
                provider=profile,
                requests=len(items),
                seconds=round(time.monotonic() - started, 3),
                **dict(sorted(counts.items())),
            )

    def _later(self, item: RealtimeItem, outcome: Outcome) -> bool:
        """Whether a request that still failed retryably goes again later (False: its error is final)."""
        failures = self._failures.get(item.id, 0) + 1
        limits = RealtimeLimits()
        at = fallback_retry_at(item.deadline, time.time(), failures, limits.backoff_base, limits.backoff_ceiling)
        if at is None:
            return False
        self._failures[item.id] = failures
        self._retry_at[item.id] = at
        log.info("realtime.retry_later", item=item.id, failures=failures, at=round(at, 3), error=outcome.error)
        return True

    async def _record_all(self, items: Iterable[RealtimeItem], error: object) -> None:
        finals = [
            realtime_final(item, Outcome(item.custom_id, "errored", None, error, None, False), "standard", None)
            for item in items
        ]
        if (await self.store.record_realtime(finals)).final:
            self._on_results()
