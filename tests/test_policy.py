"""Policy out of the store: what each provider outcome becomes, decided without any I/O.

The payload bytes must be exactly what the old Store.apply_outcomes wrote (result_line with the
same fields, cost or the unpriced marker), so results files do not change with the store.
"""

from __future__ import annotations

from functools import partial

import orjson

from batchd.formats import Outcome, provider_custom_id, result_line
from batchd.policy import (
    Cancelled,
    cancel_outcomes,
    canceled_results,
    decide,
    hold_pause,
    index_outcomes,
    lines_to_retry,
    refund_error,
    unanswered,
)
from batchd.pricing import UNPRICED, Cost, PriceTable
from batchd.store.contract import BatchRow, BatchState, FileItem, ItemState, SubmittedItem

INSTANCE = "0123456789abcdef0123456789abcdef"
USAGE = {"input_tokens": 1000, "output_tokens": 200}


def batch(model: str = "gpt-4o-mini") -> BatchRow:
    return BatchRow(
        id=7,
        profile="openai",
        kind="openai",
        endpoint="/v1/chat/completions",
        model=model,
        state=BatchState.SUBMITTED,
        remote_id="batch_abc",
        remote_status="completed",
        input_file_id=None,
        output_file_id=None,
        error_file_id=None,
        requests=3,
        bytes=100,
        counts=None,
        created_at=0.0,
        submitted_at=0.0,
        submit_attempts=0,
        not_before=0.0,
        last_error=None,
    )


def item(item_id: int, attempts: int = 1) -> SubmittedItem:
    return SubmittedItem(id=item_id, file_id=3, line=item_id + 10, custom_id=f"req-{item_id}", attempts=attempts)


def outcome(
    item_id: int, status: str = "succeeded", retryable: bool = False, usage: dict[str, int] | None = None
) -> Outcome:
    error = {"code": "server_error"} if status == "errored" else None
    response = {"ok": item_id} if status == "succeeded" else None
    return Outcome(provider_custom_id(item_id, INSTANCE), status, response, error, usage, retryable)  # type: ignore[arg-type]


def test_index_outcomes_maps_custom_ids_to_items_and_counts_foreign_ones() -> None:
    foreign = Outcome(provider_custom_id(5, "f" * 32), "succeeded", None, None, None, False)
    by_item, ignored = index_outcomes([outcome(1), foreign, outcome(2), outcome(1, "errored")], INSTANCE)
    assert sorted(by_item) == [1, 2] and ignored == 1
    assert by_item[1].status == "errored"  # the last outcome of an item wins


def test_a_final_outcome_gets_the_result_line_and_cost_of_the_old_store() -> None:
    prices = PriceTable({})
    cost_of = partial(prices.cost, "gpt-4o-mini", discount=0.5)
    by_item, _ = index_outcomes([outcome(1, usage=USAGE)], INSTANCE)
    finals, retries, ignored = decide(
        batch(), [item(1)], by_item, max_attempts=3, retry_at=100.0, cost_of=cost_of, instance=INSTANCE
    )
    assert retries == [] and ignored == 0
    [final] = finals
    cost = cost_of(USAGE)
    assert cost is not None
    assert final.payload == result_line(
        custom_id="req-1",
        status="succeeded",
        line=11,
        response={"ok": 1},
        error=None,
        provider="openai",
        model="gpt-4o-mini",
        batch_id="batch_abc",
        usage=USAGE,
        cost=cost.as_json(),
        via="batch",
    )
    assert (final.item_id, final.file_id, final.line, final.status) == (1, 3, 11, "succeeded")
    assert (final.input_tokens, final.output_tokens, final.cached_input_tokens) == (1000, 200, None)
    assert (final.cost_batch, final.cost_realtime) == (cost.batch, cost.realtime)
    assert (final.via, final.cost_paid, cost.as_json()["paid"]) == ("batch", cost.batch, cost.batch)


def test_usage_without_a_price_is_marked_unpriced_and_no_usage_has_no_cost() -> None:
    prices = PriceTable({}, use_defaults=False)
    cost_of = partial(prices.cost, "no-such-model", discount=0.5)
    by_item, _ = index_outcomes([outcome(1, usage=USAGE), outcome(2, "errored")], INSTANCE)
    finals, _, _ = decide(
        batch("no-such-model"), [item(1), item(2)], by_item, max_attempts=1, retry_at=0.0, cost_of=cost_of
    )
    first, second = (orjson.loads(f.payload) for f in finals)
    assert first["cost"] == UNPRICED and finals[0].cost_batch is None
    assert second["cost"] is None and second["usage"] is None and second["error"] == {"code": "server_error"}


def test_retryable_outcomes_requeue_while_attempts_remain_with_their_own_backoff() -> None:
    by_item, _ = index_outcomes(
        [outcome(1, "errored", True), outcome(2, "errored", True), outcome(3, "expired", True)], INSTANCE
    )
    items = [item(1, attempts=1), item(2, attempts=3), item(3, attempts=2)]
    finals, retries, _ = decide(batch(), items, by_item, max_attempts=3, retry_at=lambda attempts: 1000.0 + attempts)
    assert [(r.item_id, r.not_before, r.error) for r in retries] == [
        (1, 1001.0, '{"code":"server_error"}'),
        (3, 1002.0, "expired"),  # no error object: the status is the error
    ]
    assert [(f.item_id, f.status) for f in finals] == [(2, "errored")]  # out of attempts: final


def test_outcomes_of_items_no_longer_waiting_are_ignored_and_items_without_outcome_untouched() -> None:
    by_item, _ = index_outcomes([outcome(1), outcome(9)], INSTANCE)
    finals, retries, ignored = decide(batch(), [item(1), item(2)], by_item, max_attempts=3, retry_at=0.0)
    assert [f.item_id for f in finals] == [1] and retries == [] and ignored == 1


def test_unanswered_items_retry_or_end_at_once_when_not_retryable() -> None:
    items = [item(1, attempts=1), item(2, attempts=1)]
    error = {"message": "no result for this request"}
    _, retries, _ = decide(batch(), items, unanswered(items, "expired", error), max_attempts=3, retry_at=5.0)
    assert [(r.item_id, r.not_before) for r in retries] == [(1, 5.0), (2, 5.0)]
    finals, retries, _ = decide(
        batch(), items, unanswered(items, "errored", error, retryable=False), max_attempts=3, retry_at=5.0
    )
    assert retries == [] and [orjson.loads(f.payload)["error"] for f in finals] == [error, error]
    assert refund_error("errored", {"code": "x"}) == '{"code":"x"}' and refund_error("errored", None) == "errored"


def test_hold_pause_doubles_per_consecutive_failure_up_to_the_ceiling() -> None:
    assert [hold_pause(n, 60.0, 900.0) for n in range(1, 7)] == [60.0, 120.0, 240.0, 480.0, 900.0, 900.0]
    assert hold_pause(10_000, 1.0, 50.0) == 50.0
    assert hold_pause(0, 60.0, 900.0) == 60.0


# -- operators' cancels ----------------------------------------------------------------------------


def canceled_by_provider(item_id: int) -> Outcome:
    return Outcome(f"x-{item_id}", "canceled", None, {"code": "batch_cancelled"}, None, retryable=True)


def test_a_cancelled_batch_ends_every_stopped_request_canceled_for_good_and_keeps_finished_answers() -> None:
    items = [item(1), item(2), item(3, attempts=1)]
    answered = Outcome("x-1", "succeeded", {"id": "r"}, None, {"input_tokens": 1, "output_tokens": 1}, False)
    outcomes = {1: answered, 2: canceled_by_provider(2), 3: canceled_by_provider(3)}
    changed, bystanders = cancel_outcomes(outcomes, items, Cancelled(whole=True))
    assert bystanders == set()
    assert changed[1] is answered
    assert [(changed[n].status, changed[n].retryable) for n in (2, 3)] == [("canceled", False)] * 2
    finals, retries, _ = decide(batch(), items, changed, max_attempts=5, retry_at=0.0, always_retry=bystanders)
    assert retries == []
    assert [orjson.loads(f.payload)["status"] for f in finals] == ["succeeded", "canceled", "canceled"]
    # Unanswered requests (no result line at all) are stopped requests too.
    stopped, _ = cancel_outcomes(unanswered([item(4)], "canceled", {"message": "none"}), [item(4)], Cancelled(True))
    assert (stopped[4].status, stopped[4].retryable, stopped[4].error) == ("canceled", False, {"message": "none"})


def test_a_cancelled_file_ends_only_its_requests_and_requeues_the_others_whatever_their_attempts() -> None:
    mine, theirs, spent = item(1), SubmittedItem(2, 9, 1, "t-2", 1), SubmittedItem(3, 9, 2, "t-3", 5)
    outcomes = {n: canceled_by_provider(n) for n in (1, 2, 3)}
    changed, bystanders = cancel_outcomes(outcomes, [mine, theirs, spent], Cancelled(files=frozenset({3})))
    assert bystanders == {2, 3}
    finals, retries, _ = decide(
        batch(), [mine, theirs, spent], changed, max_attempts=5, retry_at=7.0, always_retry=bystanders
    )
    assert [(f.item_id, f.status) for f in finals] == [(1, "canceled")]
    assert sorted(r.item_id for r in retries) == [2, 3]  # 3 has used its 5 attempts and goes back all the same
    # Without an operator's cancel nothing changes: the spent request ends as the provider said.
    same, none = cancel_outcomes(outcomes, [spent], None)
    assert same is outcomes and none == set()


def test_queued_requests_of_a_cancelled_file_get_canceled_result_lines() -> None:
    [result] = canceled_results([item(5)])
    line = orjson.loads(result.payload)
    assert (result.item_id, result.file_id, result.line, result.status) == (5, 3, 15, "canceled")
    assert (line["custom_id"], line["status"], line["line"], line["error"]["code"]) == (
        "req-5",
        "canceled",
        15,
        "batch_cancelled",
    )


def test_a_retry_takes_each_lines_latest_outcome_and_never_a_request_on_its_way() -> None:
    def at(line: int, state: ItemState) -> FileItem:
        return FileItem(line * 10 + len(state), line, f"req-{line}", state, "openai", "/v1/chat/completions", "m")

    original = [
        at(1, ItemState.ERRORED),
        at(2, ItemState.EXPIRED),
        at(3, ItemState.SUCCEEDED),
        at(4, ItemState.ERRORED),
    ]
    retry1 = [at(1, ItemState.SUCCEEDED), at(4, ItemState.SUBMITTED)]
    assert [i.line for i in lines_to_retry([original], ("errored", "expired"))] == [1, 2, 4]
    assert [i.line for i in lines_to_retry([original], ("expired",))] == [2]
    # Line 1 succeeded in retry1, line 4 is still on its way there: only line 2 goes again.
    assert lines_to_retry([original, retry1], ("errored", "expired")) == [original[1]]


def test_each_answer_is_priced_by_its_own_token_counts_when_many_share_them() -> None:
    """decide prices each distinct (input, output, cached, cache-write) count once and reuses it."""
    prices = PriceTable({})
    calls: list[dict[str, int] | None] = []

    def cost_of(usage: dict[str, int] | None) -> Cost | None:
        calls.append(usage)
        return prices.cost("gpt-4o-mini", usage, 0.5)

    usages = [
        {"input_tokens": 1000, "output_tokens": 200, "cached_input_tokens": 0},
        {"input_tokens": 1000, "output_tokens": 200, "cached_input_tokens": 0},
        {"input_tokens": 1000, "output_tokens": 200, "cached_input_tokens": 400},
        {"input_tokens": 1000, "output_tokens": 201, "cached_input_tokens": 0},
        {"input_tokens": 1000, "output_tokens": 200, "cached_input_tokens": 0},
    ]
    by_item, _ = index_outcomes([outcome(n, usage=u) for n, u in enumerate(usages, 1)], INSTANCE)
    items = [item(n) for n in range(1, len(usages) + 1)]
    finals, _retries, _ignored = decide(batch(), items, by_item, max_attempts=3, retry_at=0.0, cost_of=cost_of)
    assert len(calls) == 3  # three distinct counts
    for final, usage in zip(finals, usages, strict=True):
        expected = prices.cost("gpt-4o-mini", usage, 0.5)
        assert expected is not None
        assert (final.cost_batch, final.cost_realtime, final.cost_paid) == (
            expected.batch,
            expected.realtime,
            expected.batch,
        )
        assert orjson.loads(final.payload)["cost"] == expected.as_json()
    assert finals[0].cost_batch != finals[2].cost_batch != finals[3].cost_batch
