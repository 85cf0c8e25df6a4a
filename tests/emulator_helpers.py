"""Helpers for the emulator tests: a started emulator with both SDK clients, polling, admin calls."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

import aiohttp
import anthropic
import openai
import orjson
from anthropic.types.messages import MessageBatch
from openai.types import Batch

from batchd.emulator import EmulatorConfig, Faults, RunningEmulator, start_emulator

from .conftest import wait_until

OPENAI_TERMINAL = ("completed", "failed", "expired", "cancelled")


@asynccontextmanager
async def running(
    processing_seconds: float = 0.2, faults: Faults | None = None, **config: Any
) -> AsyncIterator[tuple[RunningEmulator, openai.AsyncOpenAI, anthropic.AsyncAnthropic]]:
    """An emulator plus strict, non-retrying SDK clients pointed at it."""
    cfg = EmulatorConfig(processing_seconds=processing_seconds, faults=faults or Faults(), **config)
    async with await start_emulator(cfg) as emu:
        oai = openai_client(emu)
        ant = anthropic_client(emu)
        try:
            yield emu, oai, ant
        finally:
            await oai.close()
            await ant.close()


def openai_client(emu: RunningEmulator, max_retries: int = 0, api_key: str = "sk-test") -> openai.AsyncOpenAI:
    """The official async OpenAI client, strict validation on."""
    return openai.AsyncOpenAI(
        base_url=emu.openai_base_url, api_key=api_key, max_retries=max_retries, _strict_response_validation=True
    )


def anthropic_client(
    emu: RunningEmulator, max_retries: int = 0, api_key: str = "sk-ant-test"
) -> anthropic.AsyncAnthropic:
    """The official async Anthropic client, strict validation on."""
    return anthropic.AsyncAnthropic(
        base_url=emu.anthropic_base_url, api_key=api_key, max_retries=max_retries, _strict_response_validation=True
    )


def chat_body(i: int, model: str = "gpt-4o-mini", **extra: Any) -> dict[str, Any]:
    """A small chat-completions body."""
    return {"model": model, "messages": [{"role": "user", "content": f"Question number {i}?"}], **extra}


def jsonl(n: int, endpoint: str = "/v1/chat/completions", body: Callable[[int], dict[str, Any]] = chat_body) -> bytes:
    """An OpenAI batch input file of n requests r0..r{n-1}."""
    return b"".join(
        orjson.dumps({"custom_id": f"r{i}", "method": "POST", "url": endpoint, "body": body(i)}) + b"\n"
        for i in range(n)
    )


def message_requests(n: int, **params: Any) -> list[dict[str, Any]]:
    """Anthropic batch requests a0..a{n-1}."""
    base = {"model": "claude-sonnet-4-5", "max_tokens": 64, **params}
    return [
        {"custom_id": f"a{i}", "params": {**base, "messages": [{"role": "user", "content": f"Hello {i}"}]}}
        for i in range(n)
    ]


async def submit(oai: openai.AsyncOpenAI, data: bytes, endpoint: str = "/v1/chat/completions") -> Batch:
    """Upload ``data`` and create a batch on it."""
    file = await oai.files.create(file=("input.jsonl", data, "application/jsonl"), purpose="batch")
    return await oai.batches.create(
        input_file_id=file.id,
        endpoint=endpoint,  # type: ignore[arg-type]
        completion_window="24h",
        metadata={"suite": "emulator"},
    )


async def poll(check: Callable[[], Any], timeout: float = 30.0, interval: float = 0.02) -> Any:
    """Call (and await, if needed) ``check()`` until it returns something truthy; fail at the deadline."""
    return await wait_until(check, timeout=timeout, interval=interval)


async def wait_batch(oai: openai.AsyncOpenAI, batch_id: str, statuses: tuple[str, ...] = OPENAI_TERMINAL) -> Batch:
    """Poll an OpenAI batch until its status is one of ``statuses``."""

    async def check() -> Batch | None:
        batch = await oai.batches.retrieve(batch_id)
        return batch if batch.status in statuses else None

    result: Batch = await poll(check)
    return result


async def wait_ended(ant: anthropic.AsyncAnthropic, batch_id: str) -> MessageBatch:
    """Poll an Anthropic batch until it has ended."""

    async def check() -> MessageBatch | None:
        batch = await ant.messages.batches.retrieve(batch_id)
        return batch if batch.processing_status == "ended" else None

    result: MessageBatch = await poll(check)
    return result


async def read_lines(oai: openai.AsyncOpenAI, file_id: str | None) -> list[dict[str, Any]]:
    """Download a JSONL file and parse its lines."""
    assert file_id is not None
    content = await oai.files.content(file_id)
    return [orjson.loads(line) for line in content.content.splitlines()]


async def admin(emu: RunningEmulator, method: str, path: str, body: Any = None) -> tuple[int, Any]:
    """Call an /_emulator/ endpoint; returns (status, parsed JSON)."""
    async with (
        aiohttp.ClientSession() as session,
        session.request(method, emu.url + path, data=None if body is None else orjson.dumps(body)) as response,
    ):
        return response.status, orjson.loads(await response.read())


@asynccontextmanager
async def emulator_process(*args: str) -> AsyncIterator[tuple[str, int]]:
    """``python -m batchd.emulator --port 0 ARGS``; yields (base url, pid), then SIGTERMs it (exit code 0)."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "batchd.emulator", "--port", "0", *args,
        stdout=asyncio.subprocess.PIPE,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )  # fmt: skip
    assert proc.stdout is not None
    try:
        line = (await asyncio.wait_for(proc.stdout.readline(), 30)).decode()
        assert line.startswith("batchd emulator: openai_base_url=http://127.0.0.1:"), line
        yield line.split("anthropic_base_url=")[1].strip(), proc.pid
    finally:
        if proc.returncode is None:
            proc.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(proc.wait(), 60) == 0


async def stranger_batches(emu: RunningEmulator, vendor: str, count: int) -> list[str]:
    """`count` one-request batches created straight with the SDK (nobody's daemon), newest last."""
    ids: list[str] = []
    if vendor == "openai":
        async with openai_client(emu) as oai:
            for _ in range(count):
                ids.append((await submit(oai, jsonl(1))).id)
    else:
        async with anthropic_client(emu) as ant:
            for _ in range(count):
                ids.append((await ant.messages.batches.create(requests=message_requests(1))).id)  # type: ignore[arg-type]
    return ids
