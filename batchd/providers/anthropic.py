"""Anthropic Message Batches adapter: the only module that imports the `anthropic` SDK."""

from __future__ import annotations

from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable
from datetime import datetime
from pathlib import Path
from typing import Any, TypeVar

import anthropic
import httpx2
import orjson
from anthropic.types.messages import MessageBatch

from ..formats import Outcome, anthropic_file_outcome, anthropic_outcome
from ..logs import get_logger
from ..policy import same_host
from .base import (
    LIST_PAGE,
    Provider,
    ProviderError,
    RemoteBatch,
    RequestStream,
    ResultsReport,
    WindowScan,
    download,
    read_outcomes,
    status_error,
)

T = TypeVar("T")

log = get_logger("batchd.providers.anthropic")

CLOCK_SKEW = 600.0
DEFAULT_BASE_URL = "https://api.anthropic.com"
KNOWN = frozenset({"in_progress", "canceling", "ended"})


class ForeignHost(Exception):
    """A request about to leave for a host other than the profile's own (it would carry the key)."""


def _error(exc: Exception) -> ProviderError:
    if isinstance(exc, anthropic.APIStatusError):
        return status_error("anthropic", exc.status_code, exc.message, exc.response.headers)
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


async def _create_body(lines: RequestStream) -> AsyncIterator[bytes]:
    """`{"requests":[line,line,…]}` from a stream of newline-terminated JSON requests, as they
    come: each newline becomes a comma but the last, which is dropped."""
    yield BODY_OPEN
    held: bytes | None = None  # one chunk behind, so the last one is known when it comes
    async for chunk in lines.exactly():
        if held is not None:
            yield held.replace(b"\n", b",")
        held = chunk
    if held is not None:
        yield held[:-1].replace(b"\n", b",")
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
        results_url=batch.results_url,
        known_status=batch.processing_status in KNOWN,
        # Counters stay 0 until the batch has ended; then these two were run by the provider.
        finished=counts.succeeded + counts.errored if ended else None,
    )


class AnthropicProvider(Provider):
    """A profile of kind `anthropic`."""

    kind = "anthropic"
    # The create call's body is the requests themselves, so they stream from the store as it reads them.
    streams_input = True

    def __init__(self, profile: str, api_key: str, base_url: str | None, timeout: float) -> None:
        super().__init__(profile)
        self._base_url = base_url or DEFAULT_BASE_URL

        async def same_host_only(request: httpx2.Request) -> None:
            # Defence in depth: the SDK follows whatever results_url a batch names, with our key.
            if not same_host(self._base_url, str(request.url), DEFAULT_BASE_URL):
                raise ForeignHost(f"refused a request to {request.url.host}: not the profile's host")

        http_client = anthropic.DefaultAsyncHttpxClient(event_hooks={"request": [same_host_only]})
        self._client = anthropic.AsyncAnthropic(
            api_key=api_key, base_url=base_url, timeout=timeout, max_retries=3, http_client=http_client
        )
        # The host the SDK really talks to (base_url may also come from ANTHROPIC_BASE_URL).
        self._base_url = str(self._client.base_url)
        self._create_client = self._client.with_options(max_retries=0)
        # Real-time sends retry in batchd's fallback, which paces them by the rate limits it knows.
        self._realtime_client = self._client.with_options(max_retries=0)

    async def submit(
        self,
        batch_id: int,
        endpoint: str,
        lines: Path | RequestStream,
        request_count: int,
        metadata: dict[str, str],
        remember_input: Callable[[str | None], Any],
    ) -> RemoteBatch:
        if not isinstance(lines, RequestStream):
            raise TypeError("an Anthropic batch streams from the store: streams_input is True")
        # The body streams from the store, one request per line: newlines become commas, so the
        # batch is never held in memory, however large.
        size = lines.size
        created = await _call(
            self._create_client.post(
                "/v1/messages/batches",
                cast_to=MessageBatch,
                content=_create_body(lines),
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
        # Anthropic batches carry no metadata: a candidate is a batch created since our intent with
        # exactly our request count that no local batch holds and that was not already found to be
        # a stranger's (`taken`). It is only a candidate: the caller holds it unverified until its
        # results prove it ours (every custom_id carries our instance and an item of the intent).
        candidates: list[RemoteBatch] = []
        scan = WindowScan(created_after - CLOCK_SKEW)
        page = await _call(self._client.messages.batches.list(limit=100))
        while True:
            done = False
            for batch in page.data:
                remote = _remote(batch)
                if scan.past_window(remote.created_at):
                    done = True
                    break
                if scan.inside(remote.created_at) and remote.id not in taken and remote.total == request_count:
                    candidates.append(remote)
            if done or not page.has_next_page():
                break
            page = await _call(page.get_next_page())
        candidates.sort(key=lambda r: abs(r.created_at - created_after))
        return candidates[0] if candidates else None

    async def retrieve(self, remote_id: str) -> RemoteBatch:
        return _remote(await _call(self._client.messages.batches.retrieve(remote_id)))

    async def realtime(self, endpoint: str, custom_id: str, body: dict[str, Any], tier: str | None = None) -> Outcome:
        # Anthropic has no flex tier: `tier` is ignored here.
        try:
            raw = await self._realtime_client.post("/v1/messages", body=body, cast_to=bytes)
        except anthropic.APIStatusError as exc:
            error = _error(exc)
            if error.retryable:
                raise error from exc
            detail = exc.body if isinstance(exc.body, dict) else {"type": "api_error", "message": exc.message}
            result = {"type": "errored", "error": {"type": "error", "error": detail}}
            return anthropic_outcome({"custom_id": custom_id, "result": result})
        except anthropic.AnthropicError as exc:
            raise _error(exc) from exc
        return anthropic_outcome(
            {"custom_id": custom_id, "result": {"type": "succeeded", "message": orjson.loads(raw)}}
        )

    async def ping(self, timeout: float = 10.0) -> None:
        await _call(self._client.with_options(max_retries=0, timeout=timeout).messages.batches.list(limit=1))

    async def cancel(self, remote_id: str) -> RemoteBatch:
        return _remote(await _call(self._client.messages.batches.cancel(remote_id)))

    async def results(
        self, remote: RemoteBatch, workdir: Path, report: ResultsReport, chunk: int = 2000
    ) -> AsyncIterator[list[Outcome]]:
        if remote.results_url and not same_host(self._base_url, remote.results_url, DEFAULT_BASE_URL):
            # The key would go to that host with the request: never. The results count as unavailable.
            log.warning(
                "batch.results_url_refused",
                provider=self.profile,
                remote_id=remote.id,
                host=httpx2.URL(remote.results_url).host,
            )
            report.unavailable.add("results")
            report.refused = True
            return
        target = workdir / f"{remote.id}.jsonl"
        try:
            try:
                await download(
                    lambda: self._client.messages.batches.with_streaming_response.results(remote.id),
                    target,
                    anthropic.AnthropicError,
                    _error,
                )
            except ProviderError as exc:
                if exc.status != 404:
                    raise
                report.unavailable.add("results")  # the batch or its results were deleted at the provider
                return
            for outcomes in read_outcomes(target, anthropic_file_outcome, chunk):
                yield outcomes
        finally:
            target.unlink(missing_ok=True)

    async def list_batches(self) -> AsyncGenerator[list[RemoteBatch], None]:
        # GET /v1/messages/batches?limit=100, then &after_id=<last_id>: newest first (protocol reference 3.4).
        page = await _call(self._client.messages.batches.list(limit=LIST_PAGE))
        while True:
            yield [_remote(batch) for batch in page.data]
            if not page.has_next_page():
                return
            page = await _call(page.get_next_page())

    async def close(self) -> None:
        await self._client.close()
