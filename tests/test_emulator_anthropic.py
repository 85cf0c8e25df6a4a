"""The emulator's Anthropic Message Batches API, driven by the official async SDK."""

from __future__ import annotations

from typing import Any

import aiohttp
import anthropic
import orjson
import pytest
from anthropic.types import Message
from anthropic.types.messages import MessageBatchIndividualResponse

from .emulator_helpers import admin, message_requests, poll, running, wait_ended


async def results(ant: anthropic.AsyncAnthropic, batch_id: str) -> dict[str, MessageBatchIndividualResponse]:
    """All result lines by custom_id, each validated strictly (the SDK's decoder does not validate)."""
    out: dict[str, MessageBatchIndividualResponse] = {}
    async for line in await ant.messages.batches.results(batch_id):
        checked = MessageBatchIndividualResponse.model_validate(line.model_dump(mode="json", exclude_unset=True))
        if checked.result.type == "succeeded":
            Message.model_validate(line.model_dump(mode="json", exclude_unset=True)["result"]["message"], strict=True)
        out[line.custom_id] = checked
    return out


async def test_batch_lifecycle_and_results() -> None:
    requests: list[Any] = message_requests(3)
    del requests[1]["params"]["max_tokens"]
    requests[2]["params"]["temperature"] = 0.5
    requests.append({"custom_id": "no-messages", "params": {"model": "claude-x", "max_tokens": 5}})
    async with running() as (emu, _, ant):
        raw = await ant.messages.batches.with_raw_response.create(requests=requests)
        assert raw.headers["request-id"].startswith("req_")
        created = await raw.parse()
        assert created.processing_status == "in_progress" and created.results_url is None
        assert created.request_counts.processing == 4 and created.request_counts.succeeded == 0
        wire = orjson.loads(await raw.read())
        assert wire["created_at"].endswith("Z") and wire["ended_at"] is None
        assert (created.expires_at - created.created_at).total_seconds() == 86400
        with pytest.raises(anthropic.AnthropicError, match="results_url"):
            await ant.messages.batches.results(created.id)
        batch = await wait_ended(ant, created.id)
        assert batch.ended_at is not None and batch.results_url is not None
        assert batch.results_url == f"{emu.url}/v1/messages/batches/{created.id}/results"
        assert batch.request_counts.model_dump() == {
            "processing": 0,
            "succeeded": 1,
            "errored": 3,
            "canceled": 0,
            "expired": 0,
        }
        by_id = await results(ant, created.id)
        assert set(by_id) == {"a0", "a1", "a2", "no-messages"}
        succeeded = by_id["a0"].result
        assert succeeded.type == "succeeded" and succeeded.message.usage.output_tokens <= 64
        assert succeeded.message.usage.input_tokens == 2 + 4 + 3  # ceil(len("Hello 0") / 4) + overheads
        errors = {k: v.result for k, v in by_id.items() if v.result.type == "errored"}
        messages = {k: (r.error.error.type, r.error.error.message) for k, r in errors.items()}
        assert messages == {
            "a1": ("invalid_request_error", "max_tokens: Field required"),
            "a2": ("invalid_request_error", "temperature: Extra inputs are not permitted"),
            "no-messages": ("invalid_request_error", "messages: Field required"),
        }
        assert all(r.error.request_id for r in errors.values())


async def test_older_api_version_still_accepts_sampling_params() -> None:
    async with running() as (_, _, ant):
        created = await ant.messages.batches.create(
            requests=message_requests(1, temperature=0.2),  # type: ignore[arg-type]
            extra_headers={"anthropic-version": "2023-06-01"},
        )
        await wait_ended(ant, created.id)
        assert (await results(ant, created.id))["a0"].result.type == "succeeded"


@pytest.mark.parametrize(
    ("requests", "message"),
    [
        ([], "requests: List should have at least 1 item after validation, not 0"),
        ([{"custom_id": "x" * 65, "params": {}}], "requests.0.custom_id: String should have at most 64 characters"),
        (
            [{"custom_id": "ok", "params": {}}, {"custom_id": "bad id!", "params": {}}],
            "requests.1.custom_id: String should match pattern '^[a-zA-Z0-9_-]{1,64}$'",
        ),
        (
            [{"custom_id": "same", "params": {}}, {"custom_id": "same", "params": {}}],
            "requests.1.custom_id: Duplicate custom_id 'same'; custom_id must be unique within a batch",
        ),
        ([{"custom_id": "np"}], "requests.0.params: Field required"),
        (
            [{"custom_id": f"c{i}", "params": {}} for i in range(6)],
            "requests: List should have at most 5 items after validation, not 6",
        ),
    ],
)
async def test_create_validation(requests: list[Any], message: str) -> None:
    async with running() as (emu, _, ant):
        emu.state.limits.anthropic_max_requests = 5
        with pytest.raises(anthropic.BadRequestError) as bad:
            await ant.messages.batches.create(requests=requests)
        assert bad.value.body == {
            "type": "error",
            "error": {"type": "invalid_request_error", "message": message},
            "request_id": bad.value.request_id,
        }
        assert bad.value.request_id and bad.value.request_id.startswith("req_")
        _, stats = await admin(emu, "GET", "/_emulator/stats")
        assert stats["anthropic"] == {"batches_created": 0, "custom_ids": {}}


async def test_body_over_size_limit_is_413() -> None:
    async with running() as (emu, _, ant):
        emu.state.limits.anthropic_max_body_bytes = 2000
        with pytest.raises(anthropic.ContentTooLargeError) as too_large:
            await ant.messages.batches.create(requests=message_requests(40))  # type: ignore[arg-type]
        assert too_large.value.body["error"]["type"] == "request_too_large"  # type: ignore[index]
        assert (await ant.messages.batches.create(requests=message_requests(2))).request_counts.processing == 2  # type: ignore[arg-type]


async def test_large_request_bodies_parse_across_read_chunks() -> None:
    async with running() as (_, _, ant):
        big = "word " * 300_000  # 1.5 MB per request: several requests straddle the parser's chunks
        requests = [
            {
                "custom_id": f"b{i}",
                "params": {"model": "m", "max_tokens": 5, "messages": [{"role": "user", "content": big + 'é"\\' * i}]},
            }
            for i in range(5)
        ]
        batch = await wait_ended(ant, (await ant.messages.batches.create(requests=requests)).id)  # type: ignore[arg-type]
        assert batch.request_counts.succeeded == 5
        usage = {k: v.result.message.usage.input_tokens for k, v in (await results(ant, batch.id)).items()}  # type: ignore[union-attr]
        assert usage["b0"] == 375_000 + 4 + 3


async def test_list_pagination_both_directions() -> None:
    async with running() as (_, _, ant):
        ids = [(await ant.messages.batches.create(requests=message_requests(1))).id for _ in range(5)]  # type: ignore[arg-type]
        newest_first = ids[::-1]
        assert [b.id async for b in ant.messages.batches.list(limit=2)] == newest_first
        page = await ant.messages.batches.list(limit=2, after_id=ids[3])
        assert [b.id for b in page.data] == [ids[2], ids[1]]
        assert (page.has_more, page.first_id, page.last_id) == (True, ids[2], ids[1])
        page = await ant.messages.batches.list(limit=2, before_id=ids[1])
        assert [b.id for b in page.data] == [ids[3], ids[2]] and page.has_more
        # The SDK pages toward newer batches with before_id=first_id; each page is still newest first.
        assert [b.id async for b in ant.messages.batches.list(limit=2, before_id=ids[0])] == [
            ids[2],
            ids[1],
            ids[4],
            ids[3],
        ]


async def test_cancel_then_delete_rules() -> None:
    async with running(processing_seconds=600) as (_, _, ant):
        created = await ant.messages.batches.create(requests=message_requests(3))  # type: ignore[arg-type]
        with pytest.raises(anthropic.BadRequestError) as not_ended:
            await ant.messages.batches.delete(created.id)
        assert not_ended.value.body["error"]["type"] == "invalid_request_error"  # type: ignore[index]
        canceling = await ant.messages.batches.cancel(created.id)
        assert canceling.processing_status == "canceling" and canceling.cancel_initiated_at is not None
        assert canceling.request_counts.processing == 3
        batch = await wait_ended(ant, created.id)
        assert batch.request_counts.model_dump() == {
            "processing": 0,
            "succeeded": 0,
            "errored": 0,
            "canceled": 3,
            "expired": 0,
        }
        assert {v.result.type for v in (await results(ant, created.id)).values()} == {"canceled"}
        with pytest.raises(anthropic.BadRequestError):
            await ant.messages.batches.cancel(created.id)
        deleted = await ant.messages.batches.delete(created.id)
        assert (deleted.id, deleted.type) == (created.id, "message_batch_deleted")
        with pytest.raises(anthropic.NotFoundError) as gone:
            await ant.messages.batches.retrieve(created.id)
        assert gone.value.body["error"]["type"] == "not_found_error"  # type: ignore[index]
        with pytest.raises(anthropic.NotFoundError):
            await ant.messages.batches.delete(created.id)


async def test_cancel_mid_flight_keeps_finished_results() -> None:
    async with running(processing_seconds=4) as (emu, _, ant):
        created = await ant.messages.batches.create(requests=message_requests(200))  # type: ignore[arg-type]
        # Counts stay in `processing` until the end, so watch the emulator's own progress.
        await poll(lambda: _done(emu, created.id) >= 20)
        await ant.messages.batches.cancel(created.id)
        counts = (await wait_ended(ant, created.id)).request_counts
        assert counts.succeeded >= 20 and counts.canceled > 0 and counts.succeeded + counts.canceled == 200


def _done(emu: Any, batch_id: str) -> int:
    path = emu.state.anthropic_batches[batch_id].results_path
    return path.read_bytes().count(b"\n") if path.exists() else 0


async def test_forced_expiry_with_partial_results() -> None:
    async with running(processing_seconds=600) as (emu, _, ant):
        created = await ant.messages.batches.create(requests=message_requests(4))  # type: ignore[arg-type]
        status, body = await admin(emu, "POST", f"/_emulator/batches/{created.id}/expire", {"completed_fraction": 0.5})
        assert status == 200 and body["type"] == "message_batch"
        batch = await wait_ended(ant, created.id)
        assert batch.request_counts.model_dump() == {
            "processing": 0,
            "succeeded": 2,
            "errored": 0,
            "canceled": 0,
            "expired": 2,
        }
        by_id = await results(ant, created.id)
        assert {k: v.result.type for k, v in by_id.items()} == {
            "a0": "succeeded",
            "a1": "succeeded",
            "a2": "expired",
            "a3": "expired",
        }


async def test_auth_shapes_and_x_api_key() -> None:
    async with running(api_keys=frozenset({"sk-ant-good"})) as (emu, _, ant):
        with pytest.raises(anthropic.AuthenticationError) as denied:
            await ant.messages.batches.list()
        assert denied.value.body == {
            "type": "error",
            "error": {"type": "authentication_error", "message": "invalid x-api-key"},
            "request_id": denied.value.request_id,
        }
        assert denied.value.response.headers["request-id"] == denied.value.request_id
        async with aiohttp.ClientSession() as session:
            url = f"{emu.url}/v1/messages/batches"
            async with session.get(url, headers={"x-api-key": "sk-ant-good", "anthropic-version": "2023-06-01"}) as ok:
                assert ok.status == 200 and ok.headers["request-id"].startswith("req_")
                assert await ok.json() == {"data": [], "has_more": False, "first_id": None, "last_id": None}
            async with session.get(url) as missing:
                assert missing.status == 401
                assert (await missing.json())["error"]["type"] == "authentication_error"
