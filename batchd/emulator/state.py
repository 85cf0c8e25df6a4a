"""In-memory state of one emulator: files, batches of both vendors, faults and statistics."""

from __future__ import annotations

import asyncio
import dataclasses
import random
import tempfile
import time
import uuid
from collections import Counter
from collections.abc import Coroutine
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from batchd.emulator.config import EmulatorConfig, Faults
from batchd.emulator.ledger import RealtimeLedger


class Job:
    """Control block of one batch's processing task; handlers flip flags and poke it awake."""

    def __init__(self, rng: random.Random) -> None:
        self.rng = rng
        self.wake = asyncio.Event()
        self.cancel_requested = False
        self.expire_fraction: float | None = None
        # Admin: keep the batch running (in_progress) after its work is done, until cancel/expiry.
        self.held = False

    @property
    def interrupted(self) -> bool:
        """True once a cancel or a forced expiry has been requested."""
        return self.cancel_requested or self.expire_fraction is not None

    def poke(self) -> None:
        """Wake the task so it re-reads its flags and deadlines."""
        self.wake.set()


@dataclass
class Limits:
    """Vendor limits; tests may lower them on ``state.limits`` to exercise the edges cheaply."""

    openai_max_lines: int = 50_000
    openai_max_embedding_inputs: int = 50_000  # inputs over every request of one /v1/embeddings batch
    openai_max_file_bytes: int = 200 * 1024 * 1024
    anthropic_max_requests: int = 100_000
    anthropic_max_body_bytes: int = 256 * 1024 * 1024
    max_validation_errors: int = 100


@dataclass
class FileRecord:
    """An OpenAI file stored on disk."""

    id: str
    bytes: int
    created_at: int
    filename: str
    purpose: str
    path: Path
    expires_at: int | None = None

    def to_json(self) -> dict[str, Any]:
        """The FileObject wire shape."""
        return {
            "id": self.id,
            "object": "file",
            "bytes": self.bytes,
            "created_at": self.created_at,
            "expires_at": self.expires_at,
            "filename": self.filename,
            "purpose": self.purpose,
            "status": "processed",
            "status_details": None,
        }


@dataclass
class InputScan:
    """What the create-time pass over an OpenAI input file found."""

    lines: int = 0
    tokens: int = 0
    inputs: int = 0  # embedding inputs (an embeddings request may carry many)
    model: str | None = None
    errors: list[dict[str, Any]] = field(default_factory=list)
    custom_ids: list[str] = field(default_factory=list)


_WINDOW_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def window_seconds(window: str) -> int:
    """Seconds of a completion_window such as "24h" (unknown shapes count as 24 h)."""
    unit = _WINDOW_UNITS.get(window[-1:])
    return int(window[:-1]) * unit if unit and window[:-1].isdigit() else 86400


@dataclass
class OpenAIBatch:
    """One OpenAI batch; ``scan`` holds what its input file looked like at create time."""

    id: str
    endpoint: str
    input_file_id: str
    created_at: int
    metadata: dict[str, str] | None
    output_expires_after: int | None
    job: Job
    seq: int
    scan: InputScan
    status: str = "validating"
    times: dict[str, int] = field(default_factory=dict)
    errors: list[dict[str, Any]] | None = None
    completed: int = 0
    failed: int = 0
    usage: dict[str, int] | None = None
    output_file_id: str | None = None
    error_file_id: str | None = None
    late_pending: bool = False
    # Admin: a status word shown instead of the real one, until a cancel.
    status_override: str | None = None
    completion_window: str = "24h"

    def to_json(self, hide_files: bool = False) -> dict[str, Any]:
        """The Batch wire shape; ``hide_files`` serves the late_output_file fault."""
        body: dict[str, Any] = {
            "id": self.id,
            "object": "batch",
            "endpoint": self.endpoint,
            "model": self.scan.model if self.status not in ("validating", "failed") else None,
            "errors": {"object": "list", "data": self.errors} if self.errors else None,
            "input_file_id": self.input_file_id,
            "completion_window": self.completion_window,
            "status": self.status_override or self.status,
            "output_file_id": None if hide_files else self.output_file_id,
            "error_file_id": None if hide_files else self.error_file_id,
            "created_at": self.created_at,
            "expires_at": self.created_at + window_seconds(self.completion_window),
            "request_counts": {
                "total": self.scan.lines if self.status not in ("validating", "failed") else 0,
                "completed": self.completed,
                "failed": self.failed,
            },
            "usage": None,
            "metadata": self.metadata,
        }
        for name in ("in_progress", "finalizing", "completed", "failed", "expired", "cancelling", "cancelled"):
            body[f"{name}_at"] = self.times.get(name)
        if self.usage is not None:
            body["usage"] = {
                "input_tokens": self.usage["input"],
                "input_tokens_details": {"cached_tokens": 0},
                "output_tokens": self.usage["output"],
                "output_tokens_details": {"reasoning_tokens": 0},
                "total_tokens": self.usage["input"] + self.usage["output"],
            }
        return body


@dataclass
class AnthropicBatch:
    """One Anthropic message batch; its requests live in a normalized JSONL file on disk."""

    id: str
    created_at: float
    total: int
    requests_path: Path
    results_path: Path
    legacy_sampling: bool
    job: Job
    status: str = "in_progress"
    cancel_initiated_at: float | None = None
    ended_at: float | None = None
    counts: Counter[str] = field(default_factory=Counter)
    status_override: str | None = None

    def to_json(self, base_url: str) -> dict[str, Any]:
        """The MessageBatch wire shape; ``base_url`` is how the client reached us."""
        ended = self.status == "ended"
        counts = {k: self.counts[k] if ended else 0 for k in ("succeeded", "errored", "canceled", "expired")}
        return {
            "id": self.id,
            "type": "message_batch",
            "processing_status": self.status_override or self.status,
            "request_counts": {"processing": 0 if ended else self.total, **counts},
            "ended_at": rfc3339(self.ended_at),
            "created_at": rfc3339(self.created_at),
            "expires_at": rfc3339(self.created_at + 86400),
            "archived_at": None,
            "cancel_initiated_at": rfc3339(self.cancel_initiated_at),
            "results_url": f"{base_url}/v1/messages/batches/{self.id}/results" if ended else None,
        }


def rfc3339(ts: float | None) -> str | None:
    """Unix time to RFC 3339 with microseconds and a Z suffix, as Anthropic sends it."""
    if ts is None:
        return None
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(ts)) + f".{int(ts % 1 * 1e6):06d}Z"


class EmulatorState:
    """Everything one emulator knows; handlers and batch tasks share it (one event loop)."""

    def __init__(self, config: EmulatorConfig) -> None:
        self.config = config
        self.limits = Limits()
        self._tmp: tempfile.TemporaryDirectory[str] | None = None
        if config.data_dir is None:
            self._tmp = tempfile.TemporaryDirectory(prefix="batchd-emulator-", ignore_cleanup_errors=True)
            self.data_dir = Path(self._tmp.name)
        else:
            self.data_dir = Path(config.data_dir)
        for sub in ("files", "anthropic"):
            (self.data_dir / sub).mkdir(parents=True, exist_ok=True)
        self.rng = random.Random(config.faults.seed)
        self.files: dict[str, FileRecord] = {}
        self.openai_batches: dict[str, OpenAIBatch] = {}
        self.anthropic_batches: dict[str, AnthropicBatch] = {}
        self.openai_custom_ids: dict[str, list[str]] = {}
        self.anthropic_custom_ids: dict[str, list[str]] = {}
        self.counters: Counter[str] = Counter()
        self.realtime = RealtimeLedger()
        # Highest enqueued tokens per OpenAI model seen when a batch starts (the capacity tests' check).
        self.peak_enqueued: dict[str, int] = {}
        # OpenAI batches failed at validation, by the first error's code (token_limit_exceeded, ...).
        self.failed_batches: Counter[str] = Counter()
        # API calls by route ("GET /v1/batches/{batch_id}"): what a client asked for, and how often.
        self.routes: Counter[str] = Counter()
        self.create_index = 0
        self.closing = False
        self._tasks: set[asyncio.Task[None]] = set()
        self.webhook_deliveries: list[dict[str, Any]] = []

    @property
    def faults(self) -> Faults:
        """The live faults."""
        return self.config.faults

    def set_faults(self, faults: Faults) -> None:
        """Replace the live faults; a new seed restarts the random stream so runs replay."""
        if faults.seed != self.config.faults.seed:
            self.rng = random.Random(faults.seed)
        if faults.create_script != self.config.faults.create_script:
            self.create_index = 0
        self.config = dataclasses.replace(self.config, faults=faults)

    def next_create_action(self) -> str:
        """The create_script entry for this create call ("ok" once the script is used up)."""
        script = self.faults.create_script
        action = script[self.create_index] if self.create_index < len(script) else "ok"
        self.create_index += 1
        if action != "ok":
            self.counters["create_faults"] += 1
        return action

    def set_timing(self, processing_seconds: float | None, time_scale: float | None) -> None:
        """Change processing time; running batches re-read their deadlines at once."""
        changes: dict[str, float] = {}
        if processing_seconds is not None:
            changes["processing_seconds"] = float(processing_seconds)
        if time_scale is not None:
            changes["time_scale"] = float(time_scale)
        self.config = dataclasses.replace(self.config, **changes)  # type: ignore[arg-type]
        self.poke_all()

    def poke_all(self) -> None:
        """Wake every batch task."""
        for job in [b.job for b in self.openai_batches.values()] + [b.job for b in self.anthropic_batches.values()]:
            job.poke()

    def chance(self, rate: float) -> bool:
        """One draw from the fault stream."""
        return rate > 0 and self.rng.random() < rate

    def new_job(self) -> Job:
        """A job with its own random stream, split off the fault stream at a replayable point."""
        return Job(random.Random(self.rng.getrandbits(64)))

    @staticmethod
    def new_id(prefix: str) -> str:
        """A fresh opaque id; ids are not part of the replayable fault stream."""
        return prefix + uuid.uuid4().hex

    @staticmethod
    def now() -> float:
        """Wall-clock unix time."""
        return time.time()

    def spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        """Run a batch task, keeping a reference until it finishes."""
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def stats(self) -> dict[str, Any]:
        """The GET /_emulator/stats document."""
        c = self.counters
        return {
            "openai": {
                "batches_created": c["openai_batches"],
                "files_uploaded": c["files_uploaded"],
                "custom_ids": self.openai_custom_ids,
            },
            "anthropic": {"batches_created": c["anthropic_batches"], "custom_ids": self.anthropic_custom_ids},
            "http_calls": c["http_calls"],
            "realtime": self.realtime.summary(),
            "peak_enqueued": dict(self.peak_enqueued),
            "failed_batches": dict(self.failed_batches),
            "queue_limited": c["queue_limited"],
            "calls_by_route": dict(self.routes),
            "create_faults": c["create_faults"],
            "faults_injected": {
                k: c[k] for k in ("http_errors", "dropped_downloads", "request_errors", "late_output_files")
            },
        }

    async def close(self) -> None:
        """Stop batch tasks (they notice ``closing`` between chunks) and drop temporary storage."""
        self.closing = True
        self.poke_all()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None
