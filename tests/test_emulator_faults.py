"""Fault injection, admin endpoints and the command line of the emulator."""

from __future__ import annotations

import random
import time

import aiohttp
import anthropic
import httpx2
import openai
import orjson
import pytest

from batchd.emulator import Faults

from .emulator_helpers import (
    admin,
    anthropic_client,
    chat_body,
    emulator_process,
    jsonl,
    message_requests,
    openai_client,
    read_lines,
    running,
    submit,
    wait_batch,
    wait_ended,
)


@pytest.mark.parametrize(
    ("status", "openai_error", "anthropic_error"),
    [
        (429, openai.RateLimitError, anthropic.RateLimitError),
        (500, openai.InternalServerError, anthropic.InternalServerError),
        (529, openai.InternalServerError, anthropic.OverloadedError),
    ],
)
async def test_http_errors_carry_retry_after(
    status: int, openai_error: type[openai.APIStatusError], anthropic_error: type[anthropic.APIStatusError]
) -> None:
    faults = Faults(http_error_rate=1.0, http_error_statuses=(status,), retry_after=0.25)
    async with running(faults=faults) as (emu, oai, ant):
        with pytest.raises(openai_error) as oerr:
            await oai.batches.list()
        assert oerr.value.status_code == (503 if status == 529 else status)
        assert oerr.value.response.headers["retry-after-ms"] == "250"
        assert oerr.value.response.headers["retry-after"] == "0.25" and oerr.value.request_id
        with pytest.raises(anthropic_error) as aerr:
            await ant.messages.batches.list()
        assert aerr.value.status_code == status and aerr.value.response.headers["retry-after"] == "0.25"
        assert aerr.value.body["request_id"] == aerr.value.request_id  # type: ignore[index]
        # Admin calls are never faulted.
        status_code, stats = await admin(emu, "GET", "/_emulator/stats")
        assert status_code == 200 and stats["faults_injected"]["http_errors"] == 2 and stats["http_calls"] == 2


def _seed_failing_once(rate: float) -> int:
    """A seed whose fault stream fails the first API call and passes the second."""
    for seed in range(1000):
        rng = random.Random(seed)
        if rng.random() < rate:
            rng.choice((429,))
            if rng.random() >= rate:
                return seed
    raise AssertionError("no seed")


async def test_sdk_retry_honours_retry_after() -> None:
    faults = Faults(seed=_seed_failing_once(0.5), http_error_rate=0.5, http_error_statuses=(429,), retry_after=1.5)
    async with running(faults=faults) as (emu, _, _):
        client = openai_client(emu, max_retries=2)
        async with client:
            started = time.monotonic()
            page = await client.batches.list()
            elapsed = time.monotonic() - started
        assert page.data == []
        # The SDK's own backoff would be at most 0.5 s; waiting longer proves it read the header.
        assert elapsed >= 1.4
        stats = (await admin(emu, "GET", "/_emulator/stats"))[1]
        assert (stats["http_calls"], stats["faults_injected"]["http_errors"]) == (2, 1)


async def test_error_paths_filter_and_anthropic_retry() -> None:
    faults = Faults(http_error_rate=1.0, http_error_statuses=(529,), http_error_paths=("/v1/messages/batches",))
    async with running(faults=faults) as (emu, oai, _):
        await oai.files.create(file=("in.jsonl", jsonl(1), "application/jsonl"), purpose="batch")
        client = anthropic_client(emu, max_retries=2)
        async with client:
            with pytest.raises(anthropic.OverloadedError):
                await client.messages.batches.list()
        stats = (await admin(emu, "GET", "/_emulator/stats"))[1]
        assert stats["faults_injected"]["http_errors"] == 3 and stats["http_calls"] == 4


async def test_dropped_downloads_raise_in_the_sdk() -> None:
    async with running() as (emu, oai, ant):
        batch = await wait_batch(oai, (await submit(oai, jsonl(50))).id)
        message_batch = await wait_ended(ant, (await ant.messages.batches.create(requests=message_requests(50))).id)  # type: ignore[arg-type]
        await admin(emu, "PUT", "/_emulator/faults", {"drop_download_rate": 1.0})
        with pytest.raises(openai.APIConnectionError):
            await oai.files.content(batch.output_file_id or "")
        # The SDK streams results lazily, so the cut surfaces as httpx2's own error, not an SDK one.
        with pytest.raises(httpx2.RemoteProtocolError):
            async for _ in await ant.messages.batches.results(message_batch.id):
                pass
        await admin(emu, "PUT", "/_emulator/faults", {"drop_download_rate": 0.0})
        assert len(await read_lines(oai, batch.output_file_id)) == 50
        stats = (await admin(emu, "GET", "/_emulator/stats"))[1]
        assert stats["faults_injected"]["dropped_downloads"] == 2


async def test_shuffled_results() -> None:
    async with running(faults=Faults(shuffle_results=True, seed=7)) as (_, oai, ant):
        batch = await wait_batch(oai, (await submit(oai, jsonl(100))).id)
        order = [line["custom_id"] for line in await read_lines(oai, batch.output_file_id)]
        assert sorted(order) == sorted(f"r{i}" for i in range(100)) and order != [f"r{i}" for i in range(100)]
        ended = await wait_ended(ant, (await ant.messages.batches.create(requests=message_requests(100))).id)  # type: ignore[arg-type]
        order = [line.custom_id async for line in await ant.messages.batches.results(ended.id)]
        assert sorted(order) == sorted(f"a{i}" for i in range(100)) and order != [f"a{i}" for i in range(100)]


async def test_late_output_file_id() -> None:
    async with running(faults=Faults(late_output_file=True)) as (emu, oai, _):
        created = await submit(oai, jsonl(2, body=lambda i: chat_body(i, max_tokens=i)))
        first = await wait_batch(oai, created.id)
        assert first.status == "completed" and (first.output_file_id, first.error_file_id) == (None, None)
        second = await oai.batches.retrieve(created.id)
        assert second.output_file_id and second.error_file_id
        assert (await oai.batches.retrieve(created.id)).output_file_id == second.output_file_id
        assert (await admin(emu, "GET", "/_emulator/stats"))[1]["faults_injected"]["late_output_files"] == 1


async def test_token_limit_exceeded() -> None:
    # Each request is ceil(18 / 4) + 4 + 3 = 12 tokens; two 3-request batches need 72 > 50.
    async with running(faults=Faults(token_limits={"gpt-4o-mini": 50})) as (_, oai, _):
        first = await submit(oai, jsonl(3))
        second = await submit(oai, jsonl(3))
        assert (await wait_batch(oai, first.id)).status == "completed"
        failed = await wait_batch(oai, second.id)
        assert failed.status == "failed" and failed.errors and failed.errors.data
        assert failed.errors.data[0].model_dump() == {
            "code": "token_limit_exceeded",
            "line": None,
            "param": None,
            "message": "Enqueued token limit reached for gpt-4o-mini in organization org-emulator. Limit: 50 "
            "enqueued tokens. Please try again once some in_progress batches have been completed.",
        }
        # Another model is not affected.
        other = await submit(oai, jsonl(10, body=lambda i: chat_body(i, model="gpt-4o")))
        assert (await wait_batch(oai, other.id)).status == "completed"


async def test_request_error_rate() -> None:
    async with running(faults=Faults(request_error_rate=0.3, seed=3)) as (emu, oai, ant):
        batch = await wait_batch(oai, (await submit(oai, jsonl(100))).id)
        errors = await read_lines(oai, batch.error_file_id)
        assert 10 < len(errors) < 60 and batch.request_counts and batch.request_counts.failed == len(errors)
        for line in errors:
            assert line["response"]["status_code"] == 500 and line["error"] is None
            assert line["response"]["body"]["error"]["type"] == "server_error"
        ended = await wait_ended(ant, (await ant.messages.batches.create(requests=message_requests(100))).id)  # type: ignore[arg-type]
        errored = [
            line.result.error.error
            async for line in await ant.messages.batches.results(ended.id)
            if line.result.type == "errored"
        ]
        assert {(e.type, e.message) for e in errored} == {("api_error", "Internal server error")}
        stats = (await admin(emu, "GET", "/_emulator/stats"))[1]
        assert stats["faults_injected"]["request_errors"] == len(errors) + len(errored)
        assert ended.request_counts.errored == len(errored)


async def test_admin_faults_config_reset_and_stats() -> None:
    async with running() as (emu, oai, ant):
        status, faults = await admin(
            emu, "PUT", "/_emulator/faults", {"http_error_rate": 0.5, "token_limits": {"m": 5}}
        )
        assert status == 200 and faults["http_error_rate"] == 0.5 and faults["token_limits"] == {"m": 5}
        assert (await admin(emu, "GET", "/_emulator/faults"))[1] == faults
        assert emu.state.faults.http_error_rate == 0.5
        assert (await admin(emu, "PUT", "/_emulator/faults", {"nope": 1}))[0] == 400
        status, reset = await admin(emu, "POST", "/_emulator/reset")
        assert status == 200 and reset == Faults().to_json()
        status, config = await admin(emu, "PUT", "/_emulator/config", {"processing_seconds": 0.1, "time_scale": 0.5})
        assert (status, config) == (200, {"processing_seconds": 0.1, "time_scale": 0.5})
        # Submitting the same custom_ids twice shows up in the stats.
        one = await submit(oai, jsonl(2))
        two = await submit(oai, jsonl(1))
        message_batch = await ant.messages.batches.create(requests=message_requests(1))  # type: ignore[arg-type]
        stats = (await admin(emu, "GET", "/_emulator/stats"))[1]
        assert stats["openai"] == {
            "batches_created": 2,
            "files_uploaded": 2,
            "custom_ids": {"r0": [one.id, two.id], "r1": [one.id]},
        }
        assert stats["anthropic"] == {"batches_created": 1, "custom_ids": {"a0": [message_batch.id]}}
        assert set(stats["faults_injected"]) == {
            "http_errors",
            "dropped_downloads",
            "request_errors",
            "late_output_files",
        }
        assert (await admin(emu, "POST", "/_emulator/batches/nope/expire"))[0] == 404


async def test_command_line_serves_until_sigterm() -> None:
    faults = orjson.dumps({"http_error_rate": 1.0, "http_error_statuses": [500]}).decode()
    args = ("--processing-seconds", "0.1", "--faults", faults, "--api-key", "sk-a", "--api-key", "sk-b")
    async with emulator_process(*args) as (base, _):
        async with openai.AsyncOpenAI(base_url=base + "/v1", api_key="sk-b", max_retries=0) as client:
            with pytest.raises(openai.InternalServerError):
                await client.batches.list()
        async with aiohttp.ClientSession() as session, session.get(base + "/_emulator/faults") as response:
            assert (await response.json())["http_error_statuses"] == [500]
