"""The real-time fallback's policy, without I/O: first final wins in decide(), what a deadline cancel
makes of a batch's outcomes, a real-time answer's result line and price (flex priced like batch),
when a failing real-time request is tried again, and the fallback's pacing settings."""

from __future__ import annotations

import random

import orjson
import pytest

from batchd.fallback import limits_of
from batchd.formats import Outcome
from batchd.policy import deadline_outcomes, decide, fallback_retry_at, realtime_final
from batchd.pricing import Cost, PriceTable, served_cost
from batchd.settings import ProviderProfile
from batchd.store.contract import ItemState, RealtimeItem, SubmittedItem

from .test_policy import USAGE, batch

PRICES = PriceTable({})
GPT = PRICES.cost_of("gpt-4o-mini", 0.5)
ANSWER = {"choices": [{"message": {"content": "hi"}}]}


def item(item_id: int, state: ItemState = ItemState.SUBMITTED, deadline: float | None = 100.0) -> SubmittedItem:
    return SubmittedItem(item_id, 1, item_id, f"c{item_id}", 1, state, deadline)


def answered(custom_id: str = "x") -> Outcome:
    return Outcome(custom_id, "succeeded", ANSWER, None, dict(USAGE), False)


def cancelled(custom_id: str = "x") -> Outcome:
    return Outcome(custom_id, "canceled", None, {"code": "batch_cancelled"}, None, True)


def run(items: list[SubmittedItem], outcomes: dict[int, Outcome]) -> tuple[list[int], list[int], int]:
    finals, retries, ignored = decide(batch(), items, outcomes, max_attempts=3, retry_at=5.0, cost_of=GPT)
    return [f.item_id for f in finals], [r.item_id for r in retries], ignored


def test_a_realtime_request_takes_a_final_batch_answer_and_ignores_a_retryable_one() -> None:
    waiting = [item(1, ItemState.REALTIME), item(2, ItemState.REALTIME), item(3)]
    assert run(waiting, {1: answered(), 2: cancelled(), 3: cancelled()}) == ([1], [3], 1)
    finals, _, _ = decide(batch(), waiting[:1], {1: answered()}, max_attempts=3, retry_at=5.0, cost_of=GPT)
    assert finals[0].via == "batch" and orjson.loads(finals[0].payload)["via"] == "batch"
    # Past max_attempts a retryable outcome would end a SUBMITTED request; a REALTIME one is still the fallback's.
    worn = [SubmittedItem(1, 1, 1, "c1", 9, ItemState.REALTIME, 100.0)]
    assert run(worn, {1: cancelled()}) == ([], [], 1)


def test_a_request_the_fallback_answered_gets_a_final_only_for_a_billed_answer() -> None:
    done = [item(1, ItemState.SUCCEEDED), item(2, ItemState.SUCCEEDED)]
    finals, retries, ignored = decide(
        batch(), done, {1: answered(), 2: cancelled()}, max_attempts=3, retry_at=5.0, cost_of=GPT
    )
    assert [f.item_id for f in finals] == [1] and retries == [] and ignored == 1
    assert finals[0].input_tokens == USAGE["input_tokens"] and finals[0].cost_paid == finals[0].cost_batch


def test_a_deadline_cancel_sends_unfinished_requests_with_a_deadline_to_the_fallback() -> None:
    waiting = [item(1), item(2), item(3, deadline=None), item(4, ItemState.REALTIME), item(5)]
    errored = Outcome("c5", "errored", None, {"status_code": 400}, None, False)
    outcomes = {1: answered(), 2: cancelled(), 3: cancelled(), 4: cancelled(), 5: errored}
    split = deadline_outcomes(outcomes, waiting, now=42.0)
    assert split.realtime == [2]
    assert [(r.item_id, r.not_before, r.refund) for r in split.requeue] == [(3, 42.0, True)]
    assert "batch_cancelled" in split.requeue[0].error
    # What the batch finished, a request's own error and a REALTIME request's outcome go on to decide().
    assert sorted(split.outcomes) == [1, 4, 5]
    assert sorted(outcomes) == [1, 2, 3, 4, 5]  # the input mapping is left as it was
    assert run(waiting, dict(split.outcomes)) == ([1, 5], [], 1)


def test_served_cost_is_the_real_time_price_or_the_batch_price_on_flex() -> None:
    cost = Cost(batch=0.5, realtime=1.0)
    assert served_cost(cost, "standard").paid == 1.0
    assert served_cost(cost, "flex").paid == 0.5
    flex = served_cost(cost, "flex")
    assert (flex.batch, flex.realtime) == (0.5, 1.0)
    assert flex.as_json() == {"currency": "USD", "batch": 0.5, "realtime": 1.0, "paid": 0.5}


@pytest.mark.parametrize(("tier", "paid_share"), [("standard", 1.0), ("default", 1.0), ("flex", 0.5)])
def test_a_real_time_answer_is_a_realtime_result_priced_at_what_was_paid(tier: str, paid_share: float) -> None:
    request = RealtimeItem(9, 2, 4, "mine-4", "openai", "/v1/chat/completions", "gpt-4o-mini", b"{}", 10, 50.0, 7)
    final = realtime_final(request, answered(), tier, GPT)
    line = orjson.loads(final.payload)
    realtime = (1000 * 0.15 + 200 * 0.60) / 1_000_000
    assert (final.item_id, final.file_id, final.line, final.via) == (9, 2, 4, "realtime")
    assert final.cost_realtime == pytest.approx(realtime) and final.cost_batch == pytest.approx(realtime / 2)
    assert final.cost_paid == pytest.approx(realtime * paid_share)
    assert line["via"] == "realtime" and line["batch_id"] is None and line["custom_id"] == "mine-4"
    assert line["cost"]["paid"] == pytest.approx(realtime * paid_share) and line["response"] == ANSWER
    assert (final.input_tokens, final.output_tokens) == (1000, 200)


def test_an_unpriced_or_failed_real_time_answer() -> None:
    request = RealtimeItem(9, 2, 4, "c4", "openai", "/v1/chat/completions", "my-model", b"{}", 10, 50.0, None)
    unpriced = realtime_final(request, answered(), "standard", PRICES.cost_of("my-model", 0.5))
    assert orjson.loads(unpriced.payload)["cost"]["unpriced"] is True and unpriced.cost_paid is None
    failed = realtime_final(request, Outcome("c4", "errored", None, {"m": 1}, None, False), "standard", GPT)
    assert failed.status == "errored" and failed.input_tokens is None and orjson.loads(failed.payload)["cost"] is None


def test_a_failing_request_is_tried_again_only_while_its_deadline_allows() -> None:
    rng = random.Random(1)
    at = fallback_retry_at(100.0, now=10.0, failures=1, base=2.0, ceiling=30.0, rng=rng)
    assert at is not None and 11.0 <= at <= 12.0
    assert fallback_retry_at(100.0, now=99.5, failures=1, base=2.0, ceiling=30.0, rng=rng) is None
    assert fallback_retry_at(100.0, now=10.0, failures=10, base=2.0, ceiling=200.0, rng=rng) is None
    assert fallback_retry_at(None, now=10.0, failures=1, base=2.0, ceiling=30.0, rng=rng) is not None
    assert fallback_retry_at(None, now=10.0, failures=5, base=2.0, ceiling=30.0, rng=rng) is None


def test_limits_of_a_profile() -> None:
    openai = ProviderProfile(
        kind="openai", realtime_concurrency=3, requests_per_minute=60, tokens_per_minute=1000, flex=True
    )
    limits = limits_of(openai)
    assert (limits.concurrency, limits.requests_per_minute, limits.tokens_per_minute, limits.flex) == (
        3,
        60,
        1000,
        True,
    )
    assert not limits_of(ProviderProfile(kind="anthropic", flex=True)).flex  # flex is OpenAI's only
