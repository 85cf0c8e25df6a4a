"""Pure policy functions of the batch life cycle: retry backoff, deadlines, where a key may go,
what each provider outcome becomes (a result line with its cost, or a retry), and token-limit holds.

Nothing here does I/O or reads a clock, so every rule is unit-tested on its own; the store only
records what these decide.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import orjson

from .formats import Outcome, Status, item_id_reader, result_line
from .pricing import UNPRICED, Cost, served_cost
from .store.contract import BatchRow, FileItem, FinalResult, ItemState, RealtimeItem, Retry, SubmittedItem, Via


def retry_delay(attempt: int, base: float, ceiling: float, rng: random.Random | None = None) -> float:
    """Seconds before a request that failed retryably on its `attempt`-th try (1-based) goes out again.

    Exponential (base, 2·base, 4·base, …) capped at `ceiling`, times a jitter of 0.5–1.0 so that
    requests that failed together do not all come back at the same instant.
    """
    exponent = min(max(attempt - 1, 0), 62)  # 2**62 · base is past any ceiling; avoids float overflow
    delay = min(ceiling, base * float(2**exponent))
    return float(delay * (0.5 + 0.5 * (rng or random).random()))


def overdue(created_at: float, now: float, window: float, grace: float) -> bool:
    """A batch still not ended `grace` after its provider window closed: it must be cancelled."""
    return now > created_at + window + grace


def same_host(base_url: str | None, url: str, default_base: str) -> bool:
    """True when `url` names the same host as the profile's base_url (any port, any scheme).

    The API key goes with every request an SDK makes, so a URL a provider hands us (Anthropic's
    `results_url`) may only be followed to the host we were configured to trust.
    """
    trusted = urlsplit(base_url or default_base).hostname
    target = urlsplit(url).hostname
    return bool(trusted) and bool(target) and (trusted or "").lower() == (target or "").lower()


# -- outcomes: what the store records for each answered (or unanswered) request ---------------

RetryAt = float | Callable[[int], float]
CostOf = Callable[[dict[str, int] | None], Cost | None]


def index_outcomes(outcomes: Iterable[Outcome], instance: str) -> tuple[dict[int, Outcome], int]:
    """Provider outcomes by local item id, and how many name an id another database sent (ignored).

    The last outcome of an item wins, as the old Store.apply_outcomes did.
    """
    by_item: dict[int, Outcome] = {}
    foreign = 0
    read = item_id_reader(instance)
    for outcome in outcomes:
        item_id = read(outcome.provider_custom_id)
        if item_id is None:
            foreign += 1
        else:
            by_item[item_id] = outcome
    return by_item, foreign


def decide(
    batch: BatchRow,
    items: Sequence[SubmittedItem],
    outcomes_by_item: Mapping[int, Outcome],
    *,
    max_attempts: int,
    retry_at: RetryAt,
    cost_of: CostOf | None = None,
    instance: str = "",
    always_retry: Collection[int] = (),
) -> tuple[list[FinalResult], list[Retry], int]:
    """(finals, retries, ignored) for the outcomes of `items`, the batch's items still waiting.

    A retryable outcome of an item with attempts left goes back to the queue at `retry_at` (a time,
    or a function of the attempts made: its own backoff); anything else is final, with its result
    line composed here (formats.result_line) and its cost priced by `cost_of` (usage without a
    price is marked unpriced). Outcomes of items not among `items` (already decided, or no longer
    in this batch) are counted as ignored. `instance` is accepted for symmetry with
    index_outcomes; the items are already this database's. Items in `always_retry` go back on a
    retryable outcome whatever their attempts (bystanders of an operator's cancel, see cancel_outcomes).

    The first final answer wins (the real-time fallback, issue 11): an item REALTIME (handed to the
    fallback) takes a final batch answer, but its retryable one (cancelled, expired, a 5xx) is
    ignored: the fallback has it. An item already final (the fallback answered it first, see
    Outcomes.fallback_answered) gets a final for a billed answer only, which the store records as
    a duplicate cost, never as a second result.
    """
    del instance  # the ids were resolved by index_outcomes
    finals: list[FinalResult] = []
    retries: list[Retry] = []
    waiting = {item.id for item in items}
    ignored = sum(1 for item_id in outcomes_by_item if item_id not in waiting)
    profile, model, remote_id = batch.profile, batch.model, batch.remote_id
    no_tokens = (None, None, None, None)
    submitted, realtime = ItemState.SUBMITTED, ItemState.REALTIME
    # A price depends on the four token counts only, and a batch's answers repeat few of them:
    # each distinct count is priced once (Cost and its JSON are shared, never changed).
    prices: dict[tuple[int | None, ...], tuple[Cost | None, Any]] = {}
    get_outcome = outcomes_by_item.get
    append_final = finals.append
    batch_via = Via.BATCH
    # One pass per result line of a batch of up to 100,000: positional arguments, few lookups.
    for item in items:
        outcome = get_outcome(item.id)
        if outcome is None:
            continue
        state = item.state
        if state is not submitted:
            # REALTIME: only a final batch answer counts. Final already: only a billed one (a duplicate).
            if outcome.retryable if state is realtime else not outcome.usage:
                ignored += 1
                continue
        elif outcome.retryable and (item.attempts < max_attempts or item.id in always_retry):
            error = orjson.dumps(outcome.error).decode() if outcome.error else outcome.status
            not_before = retry_at(item.attempts) if callable(retry_at) else retry_at
            retries.append(Retry(item.id, not_before, error))
            continue
        usage = outcome.usage
        if usage:
            get = usage.get
            tokens = (
                get("input_tokens"),
                get("output_tokens"),
                get("cached_input_tokens"),
                get("cache_creation_input_tokens"),
            )
            priced = prices.get(tokens)
            if priced is None:
                cost = cost_of(usage) if cost_of is not None else None
                priced = prices[tokens] = (cost, cost.as_json() if cost else UNPRICED)
            cost, cost_json = priced
        else:
            cost, cost_json, tokens = None, None, no_tokens
        payload = result_line(
            custom_id=item.custom_id,
            status=outcome.status,
            line=item.line,
            response=outcome.response,
            error=outcome.error,
            provider=profile,
            model=model,
            batch_id=remote_id,
            usage=usage,
            cost=cost_json,
            via=batch_via,
        )
        append_final(
            FinalResult(
                item.id,
                item.file_id,
                item.line,
                outcome.status,
                payload,
                *tokens,
                cost.batch if cost else None,
                cost.realtime if cost else None,
                batch_via,
                cost.batch if cost else None,
            )
        )
    return finals, retries, ignored


# -- deadlines: the real-time fallback (issue 11) ----------------------------------------------


@dataclass(slots=True)
class Handover:
    """What a deadline cancel makes of a batch's retryable outcomes (see deadline_outcomes)."""

    outcomes: Mapping[int, Outcome]  # the rest, for decide()
    realtime: list[int]  # items with a deadline: to the real-time fallback
    requeue: list[Retry]  # bystanders without one: back to the queue, attempt given back


DEADLINE_CANCEL_ERROR = {"code": "batch_cancelled", "message": "batch cancelled for the real-time fallback"}


def deadline_outcomes(outcomes_by_item: Mapping[int, Outcome], items: Iterable[SubmittedItem], now: float) -> Handover:
    """A batch cancelled because a request's deadline came (CancelReason.DEADLINE), at its collection.

    What it finished stands (its answers, and each request's own final error). A request it did not
    finish (a retryable outcome: cancelled, expired, a 5xx, no line at all) goes to the real-time
    fallback when it has a deadline; one without a deadline was only a bystander of the cancel: it
    goes back to the queue at once with its attempt given back (the batch was cut short for others).
    Items already REALTIME are left to decide(), which ignores their retryable outcomes.
    """
    outcomes = dict(outcomes_by_item)
    realtime: list[int] = []
    requeue: list[Retry] = []
    for item in items:
        outcome = outcomes.get(item.id)
        if outcome is None or not outcome.retryable or item.state is not ItemState.SUBMITTED:
            continue
        del outcomes[item.id]
        if item.deadline is not None:
            realtime.append(item.id)
        else:
            error = orjson.dumps(outcome.error or DEADLINE_CANCEL_ERROR).decode()
            requeue.append(Retry(item.id, now, error, refund=True))
    return Handover(outcomes, realtime, requeue)


def realtime_final(item: RealtimeItem, outcome: Outcome, tier: str, cost_of: CostOf | None) -> FinalResult:
    """The final result of a request the real-time fallback sent: its result line (via "realtime",
    no batch id) priced at what was paid for the tier that answered (pricing.served_cost)."""
    usage = outcome.usage
    priced = cost_of(usage) if usage and cost_of is not None else None
    cost = served_cost(priced, tier) if priced is not None else None
    cost_json = cost.as_json() if cost else (UNPRICED if usage else None)
    tokens = (
        (usage.get("input_tokens"), usage.get("output_tokens"), usage.get("cached_input_tokens"),
         usage.get("cache_creation_input_tokens"))
        if usage else (None, None, None, None)
    )  # fmt: skip
    payload = result_line(
        custom_id=item.custom_id,
        status=outcome.status,
        line=item.line,
        response=outcome.response,
        error=outcome.error,
        provider=item.profile,
        model=item.model,
        batch_id=None,
        usage=usage,
        cost=cost_json,
        via=Via.REALTIME,
    )
    return FinalResult(
        item.id,
        item.file_id,
        item.line,
        outcome.status,
        payload,
        *tokens,
        cost.batch if cost else None,
        cost.realtime if cost else None,
        Via.REALTIME,
        cost.paid if cost else None,
    )


# Without a deadline (not expected: the fallback only takes requests that have one) a request is
# tried this many times before its error is final.
FALLBACK_TRIES_WITHOUT_DEADLINE = 5


def fallback_retry_at(
    deadline: float | None, now: float, failures: int, base: float, ceiling: float, rng: random.Random | None = None
) -> float | None:
    """When the fallback sends a request again after its `failures`-th retryable failure (each one
    after send_all's own retries), or None: its error is final, because the next try would come
    after its deadline (a late answer is no longer what the fallback is for)."""
    at = now + retry_delay(failures, base, ceiling, rng)
    if deadline is None:
        return at if failures < FALLBACK_TRIES_WITHOUT_DEADLINE else None
    return at if at < deadline else None


def unanswered(
    items: Iterable[SubmittedItem], status: Status, error: Any, retryable: bool = True
) -> dict[int, Outcome]:
    """The outcome each item of an ended batch gets when no result line mentioned it.

    Retryable by default (decide() requeues it while attempts remain); not retryable when the
    provider has lost output it had finished (it ends as `status` at once).
    """
    return {item.id: Outcome(item.custom_id, status, None, error, None, retryable=retryable) for item in items}


def refund_error(status: Status, error: Any) -> str:
    """The last_error recorded on items given back to the queue with their attempt refunded."""
    return orjson.dumps(error).decode() if error else status


def hold_pause(failures: int, base: float, ceiling: float) -> float:
    """Seconds to hold back a (profile, model) after its `failures`-th consecutive token-limit failure.

    Doubles per consecutive failure (base, 2·base, 4·base, …) up to `ceiling`.
    """
    exponent = min(max(failures - 1, 0), 62)
    return float(min(base * float(2**exponent), ceiling))


# -- operators' cancels (`batchd cancel BATCH|--file NAME`) -------------------------------------


@dataclass(frozen=True, slots=True)
class Cancelled:
    """Which requests of a batch an operator cancelled: all of them (`whole`), or those of `files`."""

    whole: bool = False
    files: frozenset[int] = frozenset()

    def covers(self, item: SubmittedItem) -> bool:
        return self.whole or item.file_id in self.files


def cancel_outcomes(
    outcomes_by_item: Mapping[int, Outcome], items: Iterable[SubmittedItem], cancelled: Cancelled | None
) -> tuple[Mapping[int, Outcome], set[int]]:
    """What an operator's cancel makes of a batch's outcomes: (outcomes, bystanders).

    A request the operator cancelled ends `canceled` for good: its retryable outcome (the provider
    stopped it) becomes final. Its answers that were final already (succeeded before the cancel
    reached it, or a request's own error) stand. Any other request in the batch is a bystander: a
    retryable outcome sends it back to the queue whatever its attempts (pass `always_retry` to decide).
    """
    if cancelled is None:
        return outcomes_by_item, set()
    outcomes = dict(outcomes_by_item)
    bystanders: set[int] = set()
    for item in items:
        outcome = outcomes.get(item.id)
        if outcome is None or not outcome.retryable:
            continue
        if cancelled.covers(item):
            error = outcome.error or OPERATOR_CANCEL_ERROR
            outcomes[item.id] = Outcome(outcome.provider_custom_id, "canceled", None, error, None, retryable=False)
        else:
            bystanders.add(item.id)
    return outcomes, bystanders


OPERATOR_CANCEL_ERROR = {"code": "batch_cancelled", "message": "cancelled by an operator (batchd cancel)"}


def canceled_results(items: Iterable[SubmittedItem]) -> list[FinalResult]:
    """The final `canceled` results of a cancelled file's requests that never left the queue."""
    return [
        FinalResult(
            item.id,
            item.file_id,
            item.line,
            "canceled",
            result_line(custom_id=item.custom_id, status="canceled", line=item.line, error=OPERATOR_CANCEL_ERROR),
        )
        for item in items
    ]


# -- operators' retries (`batchd retry --file NAME`) ---------------------------------------------


def lines_to_retry(generations: Sequence[Sequence[FileItem]], statuses: Collection[str]) -> list[FileItem]:
    """The requests `batchd retry` sends again, by line: those whose latest outcome is in `statuses`.

    `generations` are the requests of a file, then of each earlier retry of it, in order; a line's
    latest outcome is that of the last generation holding it (a request still on its way is not final,
    so never retried).
    """
    latest: dict[int, FileItem] = {}
    for items in generations:
        for item in items:
            latest[item.line] = item
    return [item for _line, item in sorted(latest.items()) if item.state.value in statuses]
