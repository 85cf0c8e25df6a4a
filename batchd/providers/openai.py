"""OpenAI Batch API adapter: the only module that imports the `openai` SDK."""

from __future__ import annotations

from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable
from functools import partial
from pathlib import Path
from typing import Any, TypeVar, cast

import openai
import orjson
import pydantic
from openai._models import construct_type
from openai.types import Batch

from ..formats import Outcome, Status, openai_file_outcome, openai_outcome
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

ENDED = frozenset({"completed", "failed", "expired", "cancelled"})
KNOWN = ENDED | {"validating", "in_progress", "finalizing", "cancelling"}
# Ended batches whose results live in files: until the files are named, the results are pending.
WITH_FILES = frozenset({"completed", "expired", "cancelled"})
UNANSWERED: dict[str, Status] = {"expired": "expired", "cancelled": "canceled"}
# A provider clock may differ from ours; search a little before our own intent time.
CLOCK_SKEW = 600.0


def _error(exc: Exception) -> ProviderError:
    if isinstance(exc, openai.APIStatusError):
        return status_error("openai", exc.status_code, exc.message, exc.response.headers)
    if isinstance(exc, openai.APIConnectionError | openai.APITimeoutError):
        return ProviderError(f"openai connection: {exc}", retryable=True, ambiguous=True)
    return ProviderError(f"openai: {exc}", retryable=False)


async def _call(coro: Awaitable[T]) -> T:
    try:
        return await coro
    except openai.OpenAIError as exc:
        raise _error(exc) from exc


def _remote(batch: Any) -> RemoteBatch:
    counts = batch.request_counts
    count_map = {"total": counts.total, "completed": counts.completed, "failed": counts.failed} if counts else {}
    errors = [
        {"code": e.code, "line": e.line, "message": e.message, "param": e.param}
        for e in ((batch.errors.data or []) if batch.errors else [])
    ]
    completed = count_map.get("completed", 0)
    failed = count_map.get("failed", 0)
    # An expired or cancelled batch also writes its finished (and unfinished) requests to files:
    # requeueing before they are named would pay again for the ones that did finish.
    pending = batch.status in WITH_FILES and (
        (completed > 0 and batch.output_file_id is None)
        or (failed > 0 and batch.error_file_id is None)
        or (
            batch.status == "completed"
            and batch.output_file_id is None
            and batch.error_file_id is None
            and count_map.get("total", 0) > 0
        )
    )
    return RemoteBatch(
        id=batch.id,
        status=batch.status,
        ended=batch.status in ENDED,
        created_at=float(batch.created_at),
        counts=count_map,
        output_file_id=batch.output_file_id,
        error_file_id=batch.error_file_id,
        errors=errors,
        results_pending=pending,
        unanswered_status=UNANSWERED.get(batch.status, "errored"),
        metadata=dict(batch.metadata or {}),
        total=count_map.get("total"),
        known_status=batch.status in KNOWN,
        finished=completed if counts else None,
    )


def _listed_batch(item: dict[str, Any]) -> Batch:
    """A listed batch as the SDK's model: validated (fast), or built as leniently as the SDK does."""
    try:
        return Batch.model_validate(item)
    except pydantic.ValidationError:
        return cast(Batch, construct_type(type_=Batch, value=item))  # a status word newer than this SDK


class OpenAIProvider(Provider):
    """A profile of kind `openai`: api.openai.com or any OpenAI-compatible batch API."""

    kind = "openai"

    def __init__(
        self, profile: str, api_key: str, base_url: str | None, timeout: float, completion_window: str = "24h"
    ) -> None:
        super().__init__(profile)
        # OpenAI accepts only "24h"; some OpenAI-compatible hosts offer other windows.
        self._completion_window = completion_window
        self._client = openai.AsyncOpenAI(api_key=api_key, base_url=base_url, timeout=timeout, max_retries=3)
        # Creates are never retried by the SDK: a lost answer must be reconciled, not repeated.
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
        if not isinstance(lines, Path):
            raise TypeError("an OpenAI batch is created from an uploaded file: streams_input is False")
        with lines.open("rb") as handle:
            uploaded = await _call(
                self._client.files.create(
                    file=(f"batchd-{batch_id}.jsonl", handle, "application/jsonl"), purpose="batch"
                )
            )
        await remember_input(uploaded.id)
        created = await _call(
            self._create_client.batches.create(
                input_file_id=uploaded.id,
                endpoint=endpoint,  # type: ignore[arg-type]
                completion_window=self._completion_window,  # type: ignore[arg-type]
                metadata=metadata,
            )
        )
        return _remote(created)

    async def find_created(
        self, batch_id: int, metadata: dict[str, str], created_after: float, request_count: int, taken: set[str]
    ) -> RemoteBatch | None:
        # Ours only by metadata (our instance and this intent); the whole window is read, whatever
        # order the list comes in.
        scan = WindowScan(created_after - CLOCK_SKEW)
        page = await _call(self._client.batches.list(limit=100))
        while True:
            for batch in page.data:
                created = float(batch.created_at)
                if scan.past_window(created):
                    return None
                found = dict(batch.metadata or {})
                if (
                    scan.inside(created)
                    and batch.id not in taken
                    and metadata
                    and all(found.get(k) == v for k, v in metadata.items())
                ):
                    return _remote(batch)
            if not page.has_next_page():
                return None
            page = await _call(page.get_next_page())

    async def retrieve(self, remote_id: str) -> RemoteBatch:
        return _remote(await _call(self._client.batches.retrieve(remote_id)))

    async def realtime(self, endpoint: str, custom_id: str, body: dict[str, Any], tier: str | None = None) -> Outcome:
        payload = {**body, "service_tier": tier} if tier else body
        try:
            raw = await self._realtime_client.post(endpoint.removeprefix("/v1"), body=payload, cast_to=bytes)
        except openai.APIStatusError as exc:
            error = _error(exc)
            if error.retryable:
                raise error from exc
            detail = exc.body if isinstance(exc.body, dict) else {"message": exc.message}
            response = {"status_code": exc.status_code, "body": {"error": detail}}
            return openai_outcome({"custom_id": custom_id, "response": response, "error": None})
        except openai.OpenAIError as exc:
            raise _error(exc) from exc
        response = {"status_code": 200, "body": orjson.loads(raw)}
        return openai_outcome({"custom_id": custom_id, "response": response, "error": None})

    async def cancel(self, remote_id: str) -> RemoteBatch:
        return _remote(await _call(self._client.batches.cancel(remote_id)))

    async def ping(self, timeout: float = 10.0) -> None:
        await _call(self._client.with_options(max_retries=0, timeout=timeout).batches.list(limit=1))

    async def delete_file(self, file_id: str) -> None:
        try:
            await self._client.files.delete(file_id)
        except openai.NotFoundError:
            pass
        except openai.OpenAIError as exc:
            raise _error(exc) from exc

    async def results(
        self, remote: RemoteBatch, workdir: Path, report: ResultsReport, chunk: int = 2000
    ) -> AsyncIterator[list[Outcome]]:
        for kind, file_id in (("output", remote.output_file_id), ("error", remote.error_file_id)):
            if not file_id:
                continue
            target = workdir / f"{remote.id}-{file_id}.jsonl"
            try:
                try:
                    await download(
                        partial(self._client.files.with_streaming_response.content, file_id),
                        target,
                        openai.OpenAIError,
                        _error,
                    )
                except ProviderError as exc:
                    if exc.status != 404:
                        raise
                    report.unavailable.add(kind)  # deleted (or expired) at the provider
                    continue
                for outcomes in read_outcomes(target, openai_file_outcome, chunk):
                    yield outcomes
            finally:
                target.unlink(missing_ok=True)

    async def list_batches(self) -> AsyncGenerator[list[RemoteBatch], None]:
        # GET /v1/batches?limit=100, then &after=<last id>: newest first (protocol reference 2.6).
        # The page is read raw: the SDK's lenient model construction costs ~0.2 ms a batch, ten
        # times pydantic's validation, and the pollers list every live batch at every turn.
        after: str | None = None
        while True:
            options = {"limit": LIST_PAGE} if after is None else {"limit": LIST_PAGE, "after": after}
            raw = await _call(self._client.batches.with_raw_response.list(**options))
            try:
                page = orjson.loads(raw.content)
                data = page.get("data") or []
                batches = [_remote(_listed_batch(item)) for item in data]
                more = bool(data) and page.get("has_more") is not False
                last = str(data[-1]["id"]) if data else None
            except (orjson.JSONDecodeError, AttributeError, KeyError, TypeError, ValueError) as exc:
                raise ProviderError(f"openai: unreadable batch list: {exc}", retryable=True) from exc
            yield batches
            # As the SDK pages: on while has_more (or, without it, while data comes), after the last id.
            if not more:
                return
            after = last

    async def close(self) -> None:
        await self._client.close()
