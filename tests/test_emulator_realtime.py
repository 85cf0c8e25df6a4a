"""The emulator's real-time endpoints, driven by the official SDKs: bodies, usage, limits, flex, ledger."""

from __future__ import annotations

import anthropic
import openai
import pytest

from batchd.emulator import Faults
from batchd.emulator.responses import openai_body

from .emulator_helpers import (
    admin,
    chat_body,
    jsonl,
    message_requests,
    openai_client,
    read_lines,
    running,
    submit,
    wait_batch,
)


async def test_chat_answer_in_real_time_matches_the_batch_answer() -> None:
    """Same request, same body and usage, whether it was batched or sent in real time."""
    async with running() as (_emu, oai, _ant):
        batch = await submit(oai, jsonl(1))
        done = await wait_batch(oai, batch.id)
        batched = (await read_lines(oai, done.output_file_id))[0]["response"]["body"]
        live = await oai.chat.completions.create(**chat_body(0))
        assert live.choices[0].message.content == batched["choices"][0]["message"]["content"]
        assert live.usage is not None
        usage = (live.usage.prompt_tokens, live.usage.completion_tokens, live.usage.total_tokens)
        assert usage == (
            batched["usage"]["prompt_tokens"],
            batched["usage"]["completion_tokens"],
            batched["usage"]["total_tokens"],
        )
        assert live.service_tier == "default"


@pytest.mark.parametrize(
    ("endpoint", "call"),
    [
        ("/v1/embeddings", lambda oai: oai.embeddings.create(model="text-embedding-3-small", input=["a b c", "d e"])),
        ("/v1/completions", lambda oai: oai.completions.create(model="gpt-3.5-turbo-instruct", prompt="say hi")),
        ("/v1/moderations", lambda oai: oai.moderations.create(model="omni-moderation-latest", input="hello")),
        ("/v1/responses", lambda oai: oai.responses.create(model="gpt-4o-mini", input="hello there")),
    ],
)
async def test_every_openai_kind_is_served_and_recorded(endpoint: str, call: object) -> None:
    async with running() as (emu, oai, _ant):
        answer = await call(oai)  # type: ignore[operator]
        assert answer is not None
        status, ledger = await admin(emu, "GET", "/_emulator/realtime")
        assert status == 200
        [served] = ledger["served"]
        assert served["endpoint"] == endpoint and served["vendor"] == "openai"
        stats = (await admin(emu, "GET", "/_emulator/stats"))[1]
        assert stats["realtime"]["requests"] == 1


async def test_anthropic_message_in_real_time() -> None:
    async with running() as (emu, _oai, ant):
        params = message_requests(1, model="claude-haiku-4-5")[0]["params"]
        message = await ant.messages.create(**params)
        assert message.usage.service_tier == "standard"
        assert message.usage.input_tokens > 0 and message.usage.output_tokens > 0
        ledger = (await admin(emu, "GET", "/_emulator/realtime"))[1]
        assert ledger["by_tier"]["anthropic:standard"]["output_tokens"] == message.usage.output_tokens


async def test_request_rate_limit_answers_429_with_retry_after() -> None:
    faults = Faults(realtime_rpm={"*": 2}, rate_window=0.5)
    async with running(faults=faults) as (emu, oai, _ant):
        await oai.chat.completions.create(**chat_body(0))
        await oai.chat.completions.create(**chat_body(1))
        with pytest.raises(openai.RateLimitError) as caught:
            await oai.chat.completions.create(**chat_body(2))
        retry_after = float(caught.value.response.headers["retry-after-ms"]) / 1000
        assert 0 < retry_after <= 0.5
        # The window moves: the SDK's own retry, honouring retry-after, gets the request admitted.
        patient = openai_client(emu, max_retries=3)
        try:
            await patient.chat.completions.create(**chat_body(2))
        finally:
            await patient.close()
        ledger = (await admin(emu, "GET", "/_emulator/realtime"))[1]
        assert ledger["rate_limited"] >= 1 and ledger["requests"] == 3


async def test_token_rate_limit_counts_input_and_output() -> None:
    body = chat_body(0)
    _, tokens_in, tokens_out = openai_body("/v1/chat/completions", body)
    per_request = tokens_in + tokens_out
    faults = Faults(realtime_tpm={"gpt-4o-mini": per_request * 2}, rate_window=30)
    async with running(faults=faults) as (_emu, oai, ant):
        await oai.chat.completions.create(**body)
        await oai.chat.completions.create(**body)
        with pytest.raises(openai.RateLimitError):
            await oai.chat.completions.create(**body)
        # Another model (and another vendor) has its own window.
        await oai.chat.completions.create(**chat_body(0, model="gpt-4o"))
        await ant.messages.create(**message_requests(1, model="claude-haiku-4-5")[0]["params"])


async def test_flex_tier_busy_answers_429_and_default_tier_still_serves() -> None:
    async with running(faults=Faults(flex_busy_rate=1.0)) as (emu, oai, _ant):
        with pytest.raises(openai.RateLimitError) as caught:
            await oai.chat.completions.create(**chat_body(0), service_tier="flex")
        assert caught.value.code == "resource_unavailable"
        answer = await oai.chat.completions.create(**chat_body(0))
        assert answer.service_tier == "default"
        ledger = (await admin(emu, "GET", "/_emulator/realtime"))[1]
        assert ledger["flex_busy"] == 1 and list(ledger["by_tier"]) == ["openai:default"]
    async with running() as (emu, oai, _ant):
        answer = await oai.chat.completions.create(**chat_body(0), service_tier="flex")
        assert answer.service_tier == "flex"


async def test_bad_request_gets_400_in_vendor_shape() -> None:
    async with running() as (_emu, oai, ant):
        with pytest.raises(openai.BadRequestError) as caught:
            await oai.chat.completions.create(model="gpt-4o-mini", messages=[])
        assert caught.value.code == "empty_array"
        with pytest.raises(anthropic.BadRequestError):
            await ant.messages.create(model="claude-x", max_tokens=0, messages=[{"role": "user", "content": "x"}])


async def test_peak_enqueued_tokens_are_kept_per_model() -> None:
    async with running(processing_seconds=1.0) as (emu, oai, _ant):
        first = await submit(oai, jsonl(3))
        second = await submit(oai, jsonl(2))
        await wait_batch(oai, first.id)
        await wait_batch(oai, second.id)
        peak = (await admin(emu, "GET", "/_emulator/stats"))[1]["peak_enqueued"]["gpt-4o-mini"]
        per_line = openai_body("/v1/chat/completions", chat_body(0))[1]
        assert peak >= 3 * per_line  # at least the first batch, counted the emulator's own way


async def test_anthropic_queue_limit_refuses_a_create_past_it() -> None:
    async with running(processing_seconds=5.0, faults=Faults(anthropic_queue_limit=3)) as (emu, _oai, ant):
        await ant.messages.batches.create(requests=message_requests(2))  # type: ignore[arg-type]
        with pytest.raises(anthropic.RateLimitError):
            await ant.messages.batches.create(requests=message_requests(2))  # type: ignore[arg-type]
        stats = (await admin(emu, "GET", "/_emulator/stats"))[1]
        assert stats["anthropic"]["batches_created"] == 1
