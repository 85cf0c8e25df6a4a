"""Full-size batches through an emulator subprocess, with its peak memory measured."""

from __future__ import annotations

import time
from pathlib import Path

import anthropic
import openai
import orjson
import pytest

from .emulator_helpers import emulator_process, message_requests, poll

RSS_LIMIT_MIB = 600


def peak_rss_mib(pid: int) -> float:
    """VmHWM (peak resident set size) of a process, in MiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmHWM")


def write_big_input(path: Path, lines: int, line_bytes: int) -> int:
    """A chat-completions input file of ``lines`` requests of about ``line_bytes`` each; returns its size."""
    filler = "lorem ipsum dolor sit amet " * (line_bytes // 27)
    with path.open("wb") as f:
        for i in range(lines):
            body = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": f"{i} {filler}"}]}
            line = {"custom_id": f"req-{i}", "method": "POST", "url": "/v1/chat/completions", "body": body}
            f.write(orjson.dumps(line) + b"\n")
    return path.stat().st_size


async def openai_full_batch(oai: openai.AsyncOpenAI, path: Path) -> None:
    """Upload, run and download a 50,000-request batch."""
    with path.open("rb") as f:
        file = await oai.files.create(file=("big.jsonl", f, "application/jsonl"), purpose="batch")
    assert file.bytes == path.stat().st_size
    batch = await oai.batches.create(input_file_id=file.id, endpoint="/v1/chat/completions", completion_window="24h")

    async def finished() -> openai.types.Batch | None:
        current = await oai.batches.retrieve(batch.id)
        return current if current.status in ("completed", "failed") else None

    done = await poll(finished, timeout=180, interval=0.2)
    assert done.status == "completed" and done.request_counts.completed == 50_000
    async with oai.files.with_streaming_response.content(done.output_file_id) as response:
        assert sum([1 async for _ in response.iter_lines()]) == 50_000


async def anthropic_full_batch(ant: anthropic.AsyncAnthropic) -> int:
    """Create, run and read back a 100,000-request message batch close to the 256 MB limit; returns its size."""
    requests = message_requests(100_000, system="Be terse. " * 240)
    size = len(orjson.dumps({"requests": requests}))
    assert 250_000_000 < size <= 256 * 1024 * 1024
    created = await ant.messages.batches.create(requests=requests)  # type: ignore[arg-type]
    del requests

    async def ended() -> bool:
        return (await ant.messages.batches.retrieve(created.id)).processing_status == "ended"

    await poll(ended, timeout=180, interval=0.2)
    results = await ant.messages.batches.results(created.id)
    assert sum([line.result.type == "succeeded" async for line in results]) == 100_000
    return size


@pytest.mark.slow
async def test_full_size_batches_stay_within_memory(tmp_path: Path) -> None:
    size = write_big_input(tmp_path / "big.jsonl", 50_000, 3_980)
    assert 190_000_000 < size <= 200 * 1024 * 1024
    async with emulator_process("--processing-seconds", "1", "--data-dir", str(tmp_path / "data")) as (base, pid):
        oai = openai.AsyncOpenAI(base_url=base + "/v1", api_key="sk-test", max_retries=0, timeout=300)
        ant = anthropic.AsyncAnthropic(base_url=base, api_key="sk-ant-test", max_retries=0, timeout=300)
        async with oai, ant:
            started = time.monotonic()
            await openai_full_batch(oai, tmp_path / "big.jsonl")
            openai_seconds, openai_rss = time.monotonic() - started, peak_rss_mib(pid)
            started = time.monotonic()
            body_size = await anthropic_full_batch(ant)
            anthropic_seconds, peak_rss = time.monotonic() - started, peak_rss_mib(pid)
    print(
        f"\nemulator peak RSS: {openai_rss:.0f} MiB after the 50,000-request {size / 1e6:.0f} MB OpenAI batch "
        f"({openai_seconds:.1f} s); {peak_rss:.0f} MiB after the 100,000-request {body_size / 1e6:.0f} MB "
        f"Anthropic batch ({anthropic_seconds:.1f} s)"
    )
    assert peak_rss < RSS_LIMIT_MIB
