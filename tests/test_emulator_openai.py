"""The emulator's OpenAI Files and Batch API, driven by the official async SDK."""

from __future__ import annotations

from typing import Any

import aiohttp
import openai
import orjson
import pytest
from openai.types import Completion, CreateEmbeddingResponse, ModerationCreateResponse
from openai.types.chat import ChatCompletion
from openai.types.responses import Response
from pydantic import BaseModel

from .emulator_helpers import admin, chat_body, jsonl, poll, read_lines, running, submit, wait_batch

ENDPOINTS: dict[str, tuple[Any, type[BaseModel]]] = {
    "/v1/chat/completions": (lambda i: chat_body(i, max_tokens=40), ChatCompletion),
    "/v1/responses": (lambda i: {"model": "gpt-4.1-mini", "input": f"Say {i}", "max_output_tokens": 30}, Response),
    "/v1/embeddings": (
        lambda i: {"model": "text-embedding-3-small", "input": [f"a{i}", f"b{i}"]},
        CreateEmbeddingResponse,
    ),
    "/v1/completions": (lambda i: {"model": "gpt-3.5-turbo-instruct", "prompt": f"Count {i}"}, Completion),
    "/v1/moderations": (lambda i: {"model": "omni-moderation-latest", "input": f"text {i}"}, ModerationCreateResponse),
}


def bodies(lines: list[dict[str, Any]]) -> dict[str, Any]:
    """Response bodies by custom_id, without their timestamps."""
    stamps = {"created", "created_at"}
    return {ln["custom_id"]: {k: v for k, v in ln["response"]["body"].items() if k not in stamps} for ln in lines}


@pytest.mark.parametrize("endpoint", list(ENDPOINTS))
async def test_batch_lifecycle_every_endpoint(endpoint: str) -> None:
    make_body, model = ENDPOINTS[endpoint]
    async with running() as (_, oai, _):
        file = await oai.files.create(file=("in.jsonl", jsonl(6, endpoint, make_body), "x"), purpose="batch")
        raw = await oai.batches.with_raw_response.create(
            input_file_id=file.id,
            endpoint=endpoint,  # type: ignore[arg-type]
            completion_window="24h",
            metadata={"job": "nightly"},
        )
        assert raw.headers["x-request-id"].startswith("req_")
        created = raw.parse()
        assert (created.status, created.metadata, created.output_file_id) == ("validating", {"job": "nightly"}, None)
        assert created.expires_at == created.created_at + 86400
        batch = await wait_batch(oai, created.id)
        assert batch.status == "completed" and batch.model == make_body(0)["model"]
        assert batch.request_counts is not None
        assert batch.request_counts.model_dump() == {"total": 6, "completed": 6, "failed": 0}
        assert created.created_at <= batch.in_progress_at <= batch.finalizing_at <= batch.completed_at  # type: ignore[operator]
        assert batch.error_file_id is None
        output = await oai.files.retrieve(batch.output_file_id or "")
        assert output.purpose == "batch_output" and output.status == "processed"
        lines = await read_lines(oai, batch.output_file_id)
        assert sorted(line["custom_id"] for line in lines) == sorted(f"r{i}" for i in range(6))
        input_tokens = output_tokens = 0
        for line in lines:
            assert line["error"] is None and line["id"].startswith("batch_req_")
            assert line["response"]["status_code"] == 200 and line["response"]["request_id"].startswith("req_")
            body = line["response"]["body"]
            model.model_validate(body, strict=True)
            usage = body.get("usage") or {}
            input_tokens += usage.get("prompt_tokens", usage.get("input_tokens", 0))
            output_tokens += usage.get("completion_tokens", usage.get("output_tokens", 0))
        assert batch.usage is not None and batch.usage.output_tokens == output_tokens
        if endpoint != "/v1/moderations":
            assert batch.usage.input_tokens == input_tokens > 0
        # Same request, same answer: bodies are keyed on the request.
        again = await wait_batch(oai, (await submit(oai, jsonl(6, endpoint, make_body), endpoint)).id)
        assert bodies(await read_lines(oai, again.output_file_id)) == bodies(lines)


async def test_usage_heuristic_and_token_caps() -> None:
    async with running() as (_, oai, _):
        body = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "x" * 40}], "max_tokens": 3}
        batch = await wait_batch(oai, (await submit(oai, jsonl(1, body=lambda i: body))).id)
        [line] = await read_lines(oai, batch.output_file_id)
        completion = ChatCompletion.model_validate(line["response"]["body"], strict=True)
        assert completion.usage is not None
        assert completion.usage.prompt_tokens == 10 + 4 + 3  # ceil(40 / 4) + per-message + per-request
        assert completion.usage.completion_tokens == 3 and completion.choices[0].finish_reason == "length"


async def test_rejected_requests_become_error_lines() -> None:
    bodies = {
        0: chat_body(0, max_tokens=0),
        1: {"model": "gpt-4o-mini"},
        2: chat_body(2, max_completion_tokens=0),
        3: chat_body(3),
    }
    async with running() as (_, oai, _):
        batch = await wait_batch(oai, (await submit(oai, jsonl(4, body=lambda i: bodies[i]))).id)
        assert batch.status == "completed" and batch.request_counts is not None
        assert (batch.request_counts.completed, batch.request_counts.failed) == (1, 3)
        errors = {line["custom_id"]: line for line in await read_lines(oai, batch.error_file_id)}
        assert errors["r0"]["error"] is None and errors["r0"]["response"]["status_code"] == 400
        assert errors["r0"]["response"]["body"]["error"] == {
            "message": "Invalid 'max_tokens': integer below minimum value. Expected a value >= 1, but got 0 instead.",
            "type": "invalid_request_error",
            "param": "max_tokens",
            "code": "integer_below_min_value",
        }
        assert errors["r1"]["response"]["body"]["error"]["param"] == "messages"
        assert errors["r2"]["response"]["body"]["error"]["param"] == "max_completion_tokens"
        responses = jsonl(1, "/v1/responses", lambda i: {"model": "gpt-4.1"})
        batch = await wait_batch(oai, (await submit(oai, responses, "/v1/responses")).id)
        assert batch.output_file_id is None and batch.request_counts and batch.request_counts.failed == 1
        [line] = await read_lines(oai, batch.error_file_id)
        assert line["response"]["body"]["error"]["param"] == "input"


def _line(custom_id: str, url: str = "/v1/chat/completions", model: str = "gpt-4o-mini") -> bytes:
    return orjson.dumps({"custom_id": custom_id, "method": "POST", "url": url, "body": chat_body(0, model)}) + b"\n"


@pytest.mark.parametrize(
    ("content", "code", "line"),
    [
        (_line("a") + b"{not json\n", "invalid_json_line", 2),
        (_line("a") + _line("b") + _line("a"), "duplicate_custom_id", 3),
        (_line("a") + _line("b", url="/v1/embeddings"), "url_mismatch", 2),
        (_line("a") + _line("b", model="gpt-4o"), "model_mismatch", 2),
        (b"", "empty_file", None),
        (b"".join(_line(f"x{i}") for i in range(4)), "too_many_tasks", None),
        (b"".join(_line(f"x{i}") for i in range(40)), "file_too_large", None),
    ],
)
async def test_validation_failures(content: bytes, code: str, line: int | None) -> None:
    async with running() as (emu, oai, _):
        emu.state.limits.openai_max_lines = 3
        emu.state.limits.openai_max_file_bytes = 3000
        created = await submit(oai, content)
        assert created.status == "validating"
        batch = await wait_batch(oai, created.id)
        assert batch.status == "failed" and batch.failed_at is not None and batch.errors and batch.errors.data
        error = batch.errors.data[0]
        assert (error.code, error.line) == (code, line) and error.message
        if code == "invalid_json_line":
            assert error.message == "This line is not parseable as valid JSON."
        assert batch.output_file_id is None and batch.error_file_id is None


async def test_create_rejects_bad_parameters() -> None:
    async with running() as (_, oai, _):
        with pytest.raises(openai.NotFoundError) as not_found:
            await oai.batches.create(
                input_file_id="file-nope", endpoint="/v1/chat/completions", completion_window="24h"
            )
        assert not_found.value.param == "input_file_id"
        with pytest.raises(openai.BadRequestError):
            await oai.files.create(file=("input.csv", b"a,b\n", "text/csv"), purpose="batch")
        file = await oai.files.create(file=("in.jsonl", jsonl(1), "application/jsonl"), purpose="batch")
        with pytest.raises(openai.BadRequestError) as bad:
            await oai.batches.create(input_file_id=file.id, endpoint="/v1/images/generations", completion_window="24h")
        assert bad.value.param == "endpoint"


async def test_files_upload_retrieve_list_delete() -> None:
    async with running() as (_, oai, _):
        file = await oai.files.create(
            file=("in.jsonl", jsonl(3), "application/jsonl"),
            purpose="batch",
            expires_after={"anchor": "created_at", "seconds": 7200},
        )
        assert (file.filename, file.bytes, file.purpose) == ("in.jsonl", len(jsonl(3)), "batch")
        assert file.expires_at == file.created_at + 7200
        assert (await oai.files.retrieve(file.id)) == file
        assert (await oai.files.content(file.id)).content == jsonl(3)
        assert [f.id async for f in oai.files.list(purpose="batch")] == [file.id]
        deleted = await oai.files.delete(file.id)
        assert (deleted.id, deleted.deleted) == (file.id, True)
        with pytest.raises(openai.NotFoundError):
            await oai.files.retrieve(file.id)


async def test_list_pagination_newest_first() -> None:
    async with running() as (_, oai, _):
        ids = [(await submit(oai, jsonl(1))).id for _ in range(5)]
        assert [b.id async for b in oai.batches.list(limit=2)] == ids[::-1]
        page = await oai.batches.list(limit=2, after=ids[3])
        assert [b.id for b in page.data] == [ids[2], ids[1]] and page.has_more
        raw = await oai.batches.with_raw_response.list(limit=2, after=ids[1])
        assert orjson.loads(raw.content) | {"data": None} == {
            "object": "list",
            "data": None,
            "first_id": ids[0],
            "last_id": ids[0],
            "has_more": False,
        }


async def test_cancel_while_validating_and_on_terminal_batch() -> None:
    async with running(processing_seconds=600) as (_, oai, _):
        created = await submit(oai, jsonl(3))
        cancelling = await oai.batches.cancel(created.id)
        assert cancelling.status == "cancelling" and cancelling.cancelling_at is not None
        batch = await wait_batch(oai, created.id)
        assert batch.status == "cancelled" and batch.cancelled_at is not None
        assert batch.output_file_id is None and batch.error_file_id is None
        with pytest.raises(openai.ConflictError) as conflict:
            await oai.batches.cancel(created.id)
        assert conflict.value.body == {
            "message": "Cannot cancel a batch with status 'cancelled'.",
            "type": "invalid_request_error",
            "param": None,
            "code": None,
        }


async def test_cancel_mid_flight_keeps_partial_output() -> None:
    async with running(processing_seconds=4) as (_, oai, _):
        created = await submit(oai, jsonl(200))

        async def progressed() -> bool:
            batch = await oai.batches.retrieve(created.id)
            return bool(batch.request_counts and batch.request_counts.completed >= 20)

        await poll(progressed)
        await oai.batches.cancel(created.id)
        batch = await wait_batch(oai, created.id)
        assert batch.status == "cancelled" and batch.request_counts is not None
        done = batch.request_counts.completed
        assert 20 <= done < 200 and batch.request_counts.total == 200
        lines = await read_lines(oai, batch.output_file_id)
        assert sorted(line["custom_id"] for line in lines) == sorted(f"r{i}" for i in range(done))


async def test_forced_expiry_with_partial_results() -> None:
    async with running(processing_seconds=600) as (emu, oai, _):
        created = await submit(oai, jsonl(10))
        status, body = await admin(emu, "POST", f"/_emulator/batches/{created.id}/expire", {"completed_fraction": 0.3})
        assert status == 200 and body["id"] == created.id
        batch = await wait_batch(oai, created.id)
        assert batch.status == "expired" and batch.expired_at is not None and batch.completed_at is None
        assert batch.request_counts is not None and batch.request_counts.model_dump() == {
            "total": 10,
            "completed": 3,
            "failed": 7,
        }
        assert [line["custom_id"] for line in await read_lines(oai, batch.output_file_id)] == ["r0", "r1", "r2"]
        expired = await read_lines(oai, batch.error_file_id)
        assert [line["custom_id"] for line in expired] == [f"r{i}" for i in range(3, 10)]
        assert {
            orjson.dumps({k: v for k, v in line.items() if k != "custom_id" and k != "id"}) for line in expired
        } == {
            orjson.dumps(
                {
                    "response": None,
                    "error": {
                        "code": "batch_expired",
                        "message": "This request could not be executed before the completion window expired.",
                    },
                }
            )
        }
        status, _ = await admin(emu, "POST", f"/_emulator/batches/{created.id}/expire")
        assert status == 409


async def test_config_change_reaches_running_batches() -> None:
    async with running(processing_seconds=3600) as (emu, oai, _):
        created = await submit(oai, jsonl(2))
        assert (await admin(emu, "PUT", "/_emulator/config", {"processing_seconds": 0.1}))[0] == 200
        assert (await wait_batch(oai, created.id)).status == "completed"


async def test_auth_and_request_ids() -> None:
    async with running(api_keys=frozenset({"sk-good"})) as (emu, oai, _):
        with pytest.raises(openai.AuthenticationError) as denied:
            await oai.batches.list()
        assert denied.value.code == "invalid_api_key" and denied.value.request_id
        assert denied.value.body["type"] == "invalid_request_error"  # type: ignore[index]
        assert "sk-test" not in str(denied.value.body)
        good = openai.AsyncOpenAI(base_url=emu.openai_base_url, api_key="sk-good", max_retries=0)
        async with good:
            raw = await good.batches.with_raw_response.list()
            assert raw.headers["x-request-id"].startswith("req_")
            with pytest.raises(openai.NotFoundError) as missing:
                await good.batches.retrieve("batch_missing")
            assert missing.value.request_id and missing.value.response.headers["x-request-id"]
        async with aiohttp.ClientSession() as session:
            async with session.get(emu.url + "/v1/models", headers={"Authorization": "Bearer sk-good"}) as response:
                assert response.status == 404 and response.headers["x-request-id"].startswith("req_")
                assert (await response.json())["error"]["type"] == "invalid_request_error"
            # Cancel arrives with a JSON content type and an empty body.
            headers = {"Authorization": "Bearer sk-good", "Content-Type": "application/json"}
            async with session.post(emu.url + "/v1/batches/batch_x/cancel", headers=headers) as response:
                assert response.status == 404
