"""The real-time transport of the deadline fallback, through the adapters and SDKs, over the emulator."""

from __future__ import annotations

import orjson
import pytest

from batchd.emulator import Faults
from batchd.emulator.responses import openai_body
from batchd.formats import provider_custom_id
from batchd.providers.anthropic import AnthropicProvider
from batchd.providers.openai import OpenAIProvider
from batchd.realtime import Pacer, RealtimeLimits, RealtimeRequest, send_all

from .emulator_helpers import admin, chat_body, message_requests, running


def chat_requests(n: int) -> list[RealtimeRequest]:
    return [
        RealtimeRequest(provider_custom_id(i, "ab" * 8), "/v1/chat/completions", chat_body(i), tokens=50)
        for i in range(n)
    ]


async def test_answers_come_back_as_batch_outcomes_with_usage() -> None:
    async with running() as (emu, _oai, _ant):
        provider = OpenAIProvider("openai", "sk-test", emu.openai_base_url, timeout=10)
        try:
            sent = await send_all(provider, chat_requests(5), RealtimeLimits())
        finally:
            await provider.close()
        assert [s.outcome.provider_custom_id for s in sent] == [r.custom_id for r in chat_requests(5)]
        for index, item in enumerate(sent):
            expected, tokens_in, tokens_out = openai_body("/v1/chat/completions", chat_body(index))
            assert item.outcome.status == "succeeded" and item.tier == "standard" and item.attempts == 1
            assert item.outcome.usage is not None
            assert (item.outcome.usage["input_tokens"], item.outcome.usage["output_tokens"]) == (tokens_in, tokens_out)
            assert item.outcome.response["choices"] == expected["choices"]
        ledger = (await admin(emu, "GET", "/_emulator/realtime"))[1]
        assert ledger["requests"] == 5


async def test_declared_rate_limit_paces_without_a_single_429() -> None:
    faults = Faults(realtime_rpm={"*": 4}, rate_window=0.5)
    async with running(faults=faults) as (emu, _oai, _ant):
        provider = OpenAIProvider("openai", "sk-test", emu.openai_base_url, timeout=10)
        limits = RealtimeLimits(requests_per_minute=4, window=0.5)
        try:
            sent = await send_all(provider, chat_requests(12), limits)
        finally:
            await provider.close()
        assert all(s.outcome.status == "succeeded" for s in sent) and len(sent) == 12
        ledger = (await admin(emu, "GET", "/_emulator/realtime"))[1]
        assert ledger["rate_limited"] == 0 and ledger["requests"] == 12


async def test_undeclared_limit_is_learned_from_429_and_retry_after() -> None:
    faults = Faults(realtime_rpm={"*": 3}, rate_window=0.3)
    async with running(faults=faults) as (emu, _oai, _ant):
        provider = OpenAIProvider("openai", "sk-test", emu.openai_base_url, timeout=10)
        try:
            sent = await send_all(provider, chat_requests(10), RealtimeLimits(concurrency=4))
        finally:
            await provider.close()
        assert all(s.outcome.status == "succeeded" for s in sent)
        ledger = (await admin(emu, "GET", "/_emulator/realtime"))[1]
        assert ledger["rate_limited"] > 0 and ledger["requests"] == 10
        assert sum(s.attempts for s in sent) == 10 + ledger["rate_limited"]


@pytest.mark.parametrize(("busy", "tier"), [(0.0, "flex"), (1.0, "standard")])
async def test_flex_first_and_standard_when_flex_is_busy(busy: float, tier: str) -> None:
    async with running(faults=Faults(flex_busy_rate=busy)) as (emu, _oai, _ant):
        provider = OpenAIProvider("openai", "sk-test", emu.openai_base_url, timeout=10)
        try:
            sent = await send_all(provider, chat_requests(4), RealtimeLimits(flex=True))
        finally:
            await provider.close()
        assert {s.tier for s in sent} == {tier}
        assert all(s.outcome.status == "succeeded" for s in sent)
        ledger = (await admin(emu, "GET", "/_emulator/realtime"))[1]
        served_tiers = {entry["tier"] for entry in ledger["served"]}
        assert served_tiers == {"flex" if tier == "flex" else "default"}


async def test_a_bad_request_is_an_errored_outcome_not_a_retry() -> None:
    async with running() as (emu, _oai, _ant):
        provider = OpenAIProvider("openai", "sk-test", emu.openai_base_url, timeout=10)
        bad = RealtimeRequest("b" + "0" * 16 + "_1", "/v1/chat/completions", {"model": "gpt-4o-mini", "messages": []})
        try:
            [sent] = await send_all(provider, [bad], RealtimeLimits())
        finally:
            await provider.close()
        assert sent.outcome.status == "errored" and not sent.outcome.retryable and sent.attempts == 1
        assert sent.outcome.error["status_code"] == 400


async def test_anthropic_messages_in_real_time() -> None:
    async with running() as (emu, _oai, _ant):
        provider = AnthropicProvider("anthropic", "sk-ant-test", emu.anthropic_base_url, timeout=10)
        requests = [
            RealtimeRequest(f"a{i}", "/v1/messages", r["params"])
            for i, r in enumerate(message_requests(3, model="claude-haiku-4-5"))
        ]
        requests.append(RealtimeRequest("bad", "/v1/messages", {"model": "claude-haiku-4-5", "messages": []}))
        try:
            sent = await send_all(provider, requests, RealtimeLimits())
        finally:
            await provider.close()
        assert [s.outcome.status for s in sent] == ["succeeded"] * 3 + ["errored"]
        assert sent[0].outcome.usage is not None and sent[0].outcome.usage["output_tokens"] > 0
        assert "max_tokens" in orjson.dumps(sent[3].outcome.error).decode()


def test_pacer_token_window() -> None:
    now = [100.0]
    pacer = Pacer(RealtimeLimits(tokens_per_minute=100), clock=lambda: now[0])
    pacer._sent.extend([[90.0, 60], [95.0, 30]])
    pacer._tokens = 90
    assert pacer.wait_for(10, now[0]) == 0
    assert pacer.wait_for(20, now[0]) == pytest.approx(50.0)  # the 60 at t=90 leaves at t=150
    assert pacer.wait_for(80, now[0]) == pytest.approx(55.0)  # both must leave
