"""Sending requests through the real-time APIs, paced: the deadline fallback's transport (issue 11).

A request that would miss its deadline in a batch is sent on its own, at the real-time price.
Pacing keeps to the profile's limits before the provider has to say no: at most `concurrency`
calls at once, and at most `requests_per_minute` requests and `tokens_per_minute` estimated tokens
in any sliding window. A 429 stops every sender of the profile for the wait the provider named
(retry-after), or a backoff when it named none. OpenAI's flex tier, where the profile allows it, is
tried first and a 429 from it (flex capacity is best effort) sends that request again on the
standard tier at once. 5xx and connection failures are retried with backoff up to `max_attempts`;
what still fails comes back as an errored, retryable Outcome for the caller to decide on.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from .formats import Outcome
from .logs import get_logger
from .policy import retry_delay
from .providers.base import Provider, ProviderError

log = get_logger("batchd.realtime")

FLEX = "flex"


@dataclass(frozen=True)
class RealtimeLimits:
    """A profile's real-time limits (None: not declared, the provider's 429s pace us instead)."""

    concurrency: int = 8
    requests_per_minute: int | None = None
    tokens_per_minute: int | None = None
    flex: bool = False
    max_attempts: int = 6
    backoff_base: float = 0.5
    backoff_ceiling: float = 30.0
    # The span the per-minute limits apply to; 60 s except where a test scales time down.
    window: float = 60.0


@dataclass(frozen=True)
class RealtimeRequest:
    """One request for the real-time API: its provider custom_id, endpoint, body and token estimate."""

    custom_id: str
    endpoint: str
    body: dict[str, Any]
    tokens: int = 0


@dataclass(frozen=True)
class Sent:
    """How a request ended: its Outcome, the tier that answered, and the calls it took."""

    request: RealtimeRequest
    outcome: Outcome
    tier: str
    attempts: int


@dataclass
class Pacer:
    """Sliding-window pacing of requests and tokens, the concurrency gate, and a shared pause after a 429.

    One per profile: every send_all given the same pacer shares its limits, concurrency included.
    """

    limits: RealtimeLimits
    clock: Callable[[], float] = time.monotonic
    # [stamp, tokens] per request in the window; the stamp moves to when the answer came (see settle).
    _sent: deque[list[float]] = field(default_factory=deque)
    _tokens: int = 0
    _paused_until: float = 0.0
    _lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    _gate: asyncio.Semaphore | None = None

    def gate(self) -> asyncio.Semaphore:
        """At most `limits.concurrency` calls in flight, over every sender sharing this pacer."""
        if self._gate is None:
            self._gate = asyncio.Semaphore(max(1, self.limits.concurrency))
        return self._gate

    def wait_for(self, tokens: int, now: float) -> float:
        """Seconds until a request of `tokens` may go (0: now)."""
        limits = self.limits
        while self._sent and self._sent[0][0] <= now - limits.window:
            self._tokens -= int(self._sent.popleft()[1])
        wait = max(0.0, self._paused_until - now)
        rpm = limits.requests_per_minute
        if rpm is not None and len(self._sent) >= rpm:
            wait = max(wait, self._sent[len(self._sent) - rpm][0] + limits.window - now)
        tpm = limits.tokens_per_minute
        if tpm is not None and self._sent and self._tokens + tokens > tpm:
            # The oldest sends must leave the window until the rest plus this one fit.
            freed, needed = 0.0, self._tokens + tokens - tpm
            for stamp, spent in self._sent:
                freed += spent
                if freed >= needed:
                    wait = max(wait, stamp + limits.window - now)
                    break
        return wait

    async def acquire(self, tokens: int) -> list[float]:
        """Wait for room, then count one request of `tokens` as sent now; returns its entry for settle()."""
        async with self._lock:  # first come, first served: a big request is not starved by small ones
            while True:
                wait = self.wait_for(tokens, self.clock())
                if wait <= 0:
                    break
                await asyncio.sleep(wait)
            entry = [self.clock(), float(tokens)]
            self._sent.append(entry)
            self._tokens += tokens
            return entry

    def settle(self, entry: list[float]) -> None:
        """The answer came: count the request from now, not from when it left.

        The provider stamps a request when it arrives, after we sent it; a window counted from the
        send would open a little before the provider's does and earn a 429 at every edge.
        """
        entry[0] = max(entry[0], self.clock())

    def pause(self, seconds: float) -> None:
        """The provider said 429: nobody sends before `seconds` from now."""
        self._paused_until = max(self._paused_until, self.clock() + seconds)


async def send_all(
    provider: Provider,
    requests: Sequence[RealtimeRequest],
    limits: RealtimeLimits,
    on_sent: Callable[[Sent], Awaitable[None]] | None = None,
    pacer: Pacer | None = None,
) -> list[Sent]:
    """Send every request through `provider`'s real-time API within `limits`; one Sent each, in order.

    `on_sent` runs as each request ends (to record its result at once, so a crash mid-way keeps
    what was already paid for). Pass a shared `pacer` when several calls share one profile's limits.
    """
    pacer = pacer or Pacer(limits)
    gate = pacer.gate()
    results: list[Sent | None] = [None] * len(requests)
    rng = random.Random()

    async def one(index: int, request: RealtimeRequest) -> None:
        tier: str | None = FLEX if limits.flex and provider.kind == "openai" else None
        attempts = 0
        async with gate:
            while True:
                entry = await pacer.acquire(request.tokens)
                attempts += 1
                try:
                    outcome = await provider.realtime(request.endpoint, request.custom_id, request.body, tier)
                    break
                except ProviderError as exc:
                    if exc.status == 429 and tier == FLEX:
                        log.info("realtime.flex_busy", provider=provider.profile, custom_id=request.custom_id)
                        tier = None  # flex capacity is best effort: the standard tier at once
                        continue
                    if not exc.retryable or attempts >= limits.max_attempts:
                        outcome = Outcome(request.custom_id, "errored", None, {"message": str(exc)}, None, True)
                        break
                    wait = exc.retry_after
                    if wait is None:
                        wait = retry_delay(attempts - 1, limits.backoff_base, limits.backoff_ceiling, rng)
                    if exc.status == 429:
                        pacer.pause(wait)
                        log.info("realtime.rate_limited", provider=provider.profile, wait=round(wait, 3))
                    else:
                        await asyncio.sleep(wait)
                finally:
                    pacer.settle(entry)
        sent = Sent(request, outcome, tier or "standard", attempts)
        results[index] = sent
        if on_sent is not None:
            await on_sent(sent)

    async with asyncio.TaskGroup() as group:
        for index, request in enumerate(requests):
            group.create_task(one(index, request))
    return [sent for sent in results if sent is not None]
