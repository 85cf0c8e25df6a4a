"""Anthropic Message Batches adapter: the only module that imports the `anthropic` SDK."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import datetime
from pathlib import Path
from typing import Any, TypeVar

import anthropic
from anthropic.types.messages import MessageBatch

from ..formats import Outcome, anthropic_outcome
from .base import Provider, ProviderError, RemoteBatch, download, read_outcomes, status_error

T = TypeVar("T")

CLOCK_SKEW = 600.0


def _error(exc: Exception) -> ProviderError:
    if isinstance(exc, anthropic.APIStatusError):
        return status_error("anthropic", exc.status_code, exc.message)
    if isinstance(exc, anthropic.APIConnectionError | anthropic.APITimeoutError):
        return ProviderError(f"anthropic connection: {exc}", retryable=True, ambiguous=True)
    return ProviderError(f"anthropic: {exc}", retryable=False)


async def _call(coro: Awaitable[T]) -> T:
    try:
        return await coro
    except anthropic.AnthropicError as exc:
        raise _error(exc) from exc


BODY_OPEN = b'{"requests":['
BODY_CLOSE = b"]}"


async def _create_body(lines: Path, size: int) -> AsyncIterator[bytes]:
    """`{"requests":[line,line,…]}` from a file of newline-terminated JSON requests."""
    yield BODY_OPEN
    remaining = size
    with lines.open("rb") as handle:
        while chunk := handle.read(1 << 20):
            remaining -= len(chunk)
            if remaining == 0:
                chunk = chunk[:-1]  # the last request's newline
            yield chunk.replace(b"\n", b",")
    yield BODY_CLOSE


def _timestamp(value: datetime | None) -> float:
    return value.timestamp() if value else 0.0


def _remote(batch: MessageBatch) -> RemoteBatch:
    counts = batch.request_counts
    count_map = {
        "processing": counts.processing,
        "succeeded": counts.succeeded,
        "errored": counts.errored,
        "canceled": counts.canceled,
        "expired": counts.expired,
    }
    ended = batch.processing_status == "ended"
    return RemoteBatch(
        id=batch.id,
        status=batch.processing_status,
        ended=ended,
        created_at=_timestamp(batch.created_at),
        counts=count_map,
        results_pending=ended and not batch.results_url,
        total=sum(count_map.values()),
    )


class AnthropicProvider(Provider):
    """A profile of kind `anthropic`."""

    kind = "anthropic"

    def __init__(self, profile: str, api_key: str, base_url: str | None, timeout: float) -> None:
        super().__init__(profile)
        self._client = anthropic.AsyncAnthropic(api_key=api_key, base_url=base_url, timeout=timeout, max_retries=3)
        self._create_client = self._client.with_options(max_retries=0)

    async def submit(
        self,
        batch_id: int,
        endpoint: str,
        lines: Path,
        request_count: int,
        metadata: dict[str, str],
        remember_input: Callable[[str | None], Any],
    ) -> RemoteBatch:
        # The body streams from our request file (one request per line) in 1 MiB chunks: newlines
        # become commas, so the batch is never held in memory, however large.
        size = lines.stat().st_size
        created = await _call(
            self._create_client.post(
                "/v1/messages/batches",
                cast_to=MessageBatch,
                content=_create_body(lines, size),
                options={
                    "headers": {
                        "Content-Type": "application/json",
                        "Content-Length": str(len(BODY_OPEN) + size - 1 + len(BODY_CLOSE)),
                    }
                },
            )
        )
        return _remote(created)

    async def find_created(
        self, batch_id: int, metadata: dict[str, str], created_after: float, request_count: int, taken: set[str]
    ) -> RemoteBatch | None:
        # Anthropic batches carry no metadata: adopt the oldest batch created since our intent
        # with exactly our request count that no other local batch has claimed.
        candidates: list[RemoteBatch] = []
        page = await _call(self._client.messages.batches.list(limit=100))
        while True:
            done = False
            for batch in page.data:
                remote = _remote(batch)
                if remote.created_at < created_after - CLOCK_SKEW:
                    done = True
                    break
                if remote.id not in taken and remote.total == request_count:
                    candidates.append(remote)
            if done or not page.has_next_page():
                break
            page = await _call(page.get_next_page())
        candidates.sort(key=lambda r: abs(r.created_at - created_after))
        return candidates[0] if candidates else None

    async def retrieve(self, remote_id: str) -> RemoteBatch:
        return _remote(await _call(self._client.messages.batches.retrieve(remote_id)))

    async def cancel(self, remote_id: str) -> RemoteBatch:
        return _remote(await _call(self._client.messages.batches.cancel(remote_id)))

    async def results(self, remote: RemoteBatch, workdir: Path, chunk: int = 2000) -> AsyncIterator[list[Outcome]]:
        target = workdir / f"{remote.id}.jsonl"
        try:
            await download(
                lambda: self._client.messages.batches.with_streaming_response.results(remote.id),
                target,
                anthropic.AnthropicError,
                _error,
            )
            for outcomes in read_outcomes(target, anthropic_outcome, chunk):
                yield outcomes
        finally:
            target.unlink(missing_ok=True)

    async def close(self) -> None:
        await self._client.close()
