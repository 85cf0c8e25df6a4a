"""The interface every provider adapter offers the batcher and the pollers.

An adapter is the only code that knows its SDK. It speaks in `RemoteBatch`, `Outcome` and
`ProviderError`, never in SDK types, so the rest of batchd is the same for every provider.
"""

from __future__ import annotations

import abc
import asyncio
import random
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Iterator, Mapping
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson

from ..formats import Outcome, Status

# Batches a listing call asks for: the most OpenAI returns in one page (Anthropic allows more).
LIST_PAGE = 100


class ProviderError(Exception):
    """A provider call failed.

    `retryable`: the same call may succeed later (429, 5xx, timeouts, dropped connections).
    `ambiguous`: the provider may have acted before the failure (a create whose answer was lost),
    so it must be reconciled before it is tried again.
    """

    def __init__(
        self,
        message: str,
        *,
        retryable: bool,
        ambiguous: bool = False,
        status: int | None = None,
        retry_after: float | None = None,
    ):
        super().__init__(message)
        self.retryable = retryable
        self.ambiguous = ambiguous
        self.status = status
        # Seconds the provider asked us to wait (429/503 retry-after), when it said.
        self.retry_after = retry_after


def status_error(vendor: str, status: int, message: str, headers: Mapping[str, str] | None = None) -> ProviderError:
    """An HTTP error answer: 408/409/429/5xx may succeed later; a 5xx or 408 may hide a create that happened."""
    return ProviderError(
        f"{vendor} {status}: {message}",
        retryable=status in (408, 409, 429) or status >= 500,
        ambiguous=status >= 500 or status == 408,
        status=status,
        retry_after=retry_after(headers) if headers is not None else None,
    )


def retry_after(headers: Mapping[str, str]) -> float | None:
    """The wait an error answer asks for: retry-after-ms, else retry-after in seconds (not a date)."""
    for name, scale in (("retry-after-ms", 0.001), ("retry-after", 1.0)):
        raw = headers.get(name)
        if raw is None:
            continue
        try:
            value = float(raw) * scale
        except ValueError:
            continue
        if 0 <= value < 86400:
            return value
    return None


@dataclass(slots=True)
class RemoteBatch:
    """A provider batch as the provider reports it, in provider-neutral terms."""

    id: str
    status: str  # the provider's own status word
    ended: bool  # no further change will come
    created_at: float
    counts: dict[str, int] = field(default_factory=dict)
    output_file_id: str | None = None
    error_file_id: str | None = None
    # OpenAI batch-level failures: [{code, line, message, param}].
    errors: list[dict[str, Any]] = field(default_factory=list)
    # Results are promised but not yet downloadable (a `completed` batch without its file id yet).
    results_pending: bool = False
    # How to finish requests that no result line mentions once the batch has ended.
    unanswered_status: Status = "errored"
    metadata: dict[str, str] = field(default_factory=dict)
    total: int | None = None
    # Anthropic: where the results are; followed only to the profile's own host.
    results_url: str | None = None
    # The status word is one this adapter knows (a new word is logged and treated as not ended).
    known_status: bool = True
    # Requests the provider finished (answered or failed on their own), by its counts; None if unknown.
    finished: int | None = None

    @property
    def failed(self) -> bool:
        return self.status == "failed"


@dataclass(slots=True)
class ResultsReport:
    """What a results download could not deliver, filled in by `Provider.results`.

    `unavailable` names the result files the provider no longer has (404) or that we refused to
    fetch: "output" and "error" (OpenAI), "results" (Anthropic).
    """

    unavailable: set[str] = field(default_factory=set)
    refused: bool = False


class WindowScan:
    """When a scan of a provider's batch list, looking for batches created since `start`, may stop.

    Only at a batch older than the window, and only once the list has shown itself newest-first
    (a decrease seen, no increase): a list in any other order is read to its end, so a batch
    inside the window is never missed.
    """

    def __init__(self, start: float) -> None:
        self.start = start
        self._last: float | None = None
        self._increase = False
        self._decrease = False

    def past_window(self, created_at: float) -> bool:
        if self._last is not None:
            self._increase = self._increase or created_at > self._last
            self._decrease = self._decrease or created_at < self._last
        self._last = created_at
        return self._decrease and not self._increase and created_at < self.start

    def inside(self, created_at: float) -> bool:
        return created_at >= self.start


def backoff(attempt: int, base: float = 1.0, ceiling: float = 60.0, rng: random.Random | None = None) -> float:
    """Exponential backoff with full jitter on the upper half: base·2ⁿ capped, times 0.5–1.0."""
    delay: float = min(ceiling, base * (2 ** max(attempt, 0)))
    return delay * (0.5 + 0.5 * (rng or random).random())


@dataclass
class RequestStream:
    """A batch's request lines (JSON, each with its newline) as the store reads them, for a provider
    whose create call takes them as a body it can stream: `size` is their exact length, known
    before the first byte; `chunks` yields whole lines and may be read once. `failure` keeps an
    error of the store's own that cut the stream short, so the caller reports it as that rather
    than as the provider call it broke."""

    size: int
    chunks: AsyncIterator[bytes]
    failure: BaseException | None = None
    # Set when the chunks did not add up to `size`: the SDK reports the torn request only as a
    # connection error, so the caller says this instead.
    mismatch: str | None = None

    async def exactly(self) -> AsyncIterator[bytes]:
        """The chunks, then an error if they did not add up to `size`: the request's declared
        Content-Length would be wrong, so it is torn off and the provider creates nothing."""
        sent = 0
        async for chunk in self.chunks:
            sent += len(chunk)
            if sent > self.size:
                # Before the HTTP client sees it: it would refuse the excess in words of its own.
                self.mismatch = f"the batch's request lines are over {self.size} bytes, the length declared"
                raise ValueError(self.mismatch)
            yield chunk
        if sent != self.size:
            self.mismatch = f"the batch's request lines are {sent} bytes, not the {self.size} declared"
            raise ValueError(self.mismatch)


class Provider(abc.ABC):
    """One provider profile's client."""

    kind: str
    # Whether submit takes a RequestStream (the lines straight from the store, read while they are
    # sent) or only a file of them (a multipart upload of the SDK's own).
    streams_input = False

    def __init__(self, profile: str) -> None:
        self.profile = profile

    @abc.abstractmethod
    async def submit(
        self,
        batch_id: int,
        endpoint: str,
        lines: Path | RequestStream,
        request_count: int,
        metadata: dict[str, str],
        remember_input: Callable[[str | None], Any],
    ) -> RemoteBatch:
        """Create a batch from `lines` (our request lines, one JSON per line): a file, or a stream
        where `streams_input` says so.

        Makes exactly one create call (never retried by the SDK), so that a failure can be
        reconciled before trying again. `remember_input` is awaited with any uploaded file id
        before the create call, so a crash leaves a trace of it.
        """

    @abc.abstractmethod
    async def find_created(
        self, batch_id: int, metadata: dict[str, str], created_after: float, request_count: int, taken: set[str]
    ) -> RemoteBatch | None:
        """A batch that an earlier, interrupted submit of `batch_id` created at the provider, if any."""

    @abc.abstractmethod
    async def retrieve(self, remote_id: str) -> RemoteBatch:
        """The batch's current state."""

    @abc.abstractmethod
    def results(
        self, remote: RemoteBatch, workdir: Path, report: ResultsReport, chunk: int = 2000
    ) -> AsyncIterator[list[Outcome]]:
        """Every result line of an ended batch, in chunks, downloaded to `workdir` first.

        A result file the provider no longer has (or that may not be fetched) is skipped and
        named in `report`; any other failure raises ProviderError.
        """

    @abc.abstractmethod
    async def realtime(self, endpoint: str, custom_id: str, body: dict[str, Any], tier: str | None = None) -> Outcome:
        """Send one request through the real-time API (the deadline fallback), answered as a batch would be.

        Returns the Outcome a batch result line for `custom_id` would give (a 4xx answer is an
        errored Outcome). Raises ProviderError when the call may succeed later (429, 5xx,
        connection), with `retry_after` when the provider named a wait.
        """

    @abc.abstractmethod
    async def cancel(self, remote_id: str) -> RemoteBatch:
        """Ask the provider to cancel the batch."""

    async def delete_file(self, file_id: str) -> None:  # noqa: B027 - optional for providers without files
        """Delete an uploaded file that no batch uses (only OpenAI has files)."""

    def list_batches(self) -> AsyncGenerator[list[RemoteBatch], None] | None:
        """The provider's batches, newest first, a page (up to LIST_PAGE) at a time; None if it cannot list.

        The pollers read the list to learn, in one call per LIST_PAGE batches, which live batches
        changed, and retrieve only those; a provider that cannot list is polled by one retrieve per batch.
        """
        return None

    @abc.abstractmethod
    async def close(self) -> None:
        """Release the HTTP client."""

    @abc.abstractmethod
    async def ping(self, timeout: float = 10.0) -> None:
        """One cheap authenticated call (list one batch), not retried: raises ProviderError if it fails.

        For /readyz: proves the provider is reachable and accepts the key.
        """


DOWNLOAD_ATTEMPTS = 5


async def download(
    open_stream: Callable[[], AbstractAsyncContextManager[Any]],
    target: Path,
    sdk_error: type[Exception],
    classify: Callable[[Exception], ProviderError],
) -> None:
    """Stream a provider file to `target`; a dropped connection restarts the download from zero.

    Results are applied only after the whole file is on disk, so a restart never duplicates one.
    """
    for attempt in range(DOWNLOAD_ATTEMPTS):
        try:
            with target.open("wb") as out:
                async with open_stream() as response:
                    async for chunk in response.iter_bytes():
                        out.write(chunk)
            return
        except sdk_error as exc:
            error = classify(exc)
            if not error.retryable or attempt == DOWNLOAD_ATTEMPTS - 1:
                raise error from exc
        except Exception as exc:  # a transport cut mid-body surfaces as the HTTP library's own error
            if attempt == DOWNLOAD_ATTEMPTS - 1:
                raise ProviderError(f"download to {target.name}: {exc}", retryable=True) from exc
        await asyncio.sleep(backoff(attempt, base=0.2, ceiling=5.0))


def read_outcomes(path: Path, parse: Callable[[dict[str, Any]], Outcome], chunk: int) -> Iterator[list[Outcome]]:
    """The result lines of a downloaded file, parsed, in chunks.

    A line that cannot be read is skipped: its request stays unanswered and is retried.
    """
    outcomes: list[Outcome] = []
    with path.open("rb") as handle:
        for raw in handle:
            if not raw.strip():
                continue
            try:
                outcomes.append(parse(orjson.loads(raw)))
            except (orjson.JSONDecodeError, AttributeError, TypeError, ValueError):
                continue
            if len(outcomes) >= chunk:
                yield outcomes
                outcomes = []
    if outcomes:
        yield outcomes
