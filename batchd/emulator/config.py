"""Configuration of the emulator: timing, auth and switchable fault injection."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


@dataclass
class Faults:
    """Faults the emulator injects; every field can be changed at start-up and at run time.

    All randomness comes from ``random.Random(seed)`` so a run with the same call sequence replays.
    """

    seed: int = 0
    http_error_rate: float = 0.0
    http_error_statuses: tuple[int, ...] = (429, 500, 529)
    http_error_paths: tuple[str, ...] = ()
    retry_after: float = 0.05
    drop_download_rate: float = 0.0
    shuffle_results: bool = False
    late_output_file: bool = False
    token_limits: dict[str, int] = field(default_factory=dict)
    request_error_rate: float = 0.0
    # Batch creates (both vendors, in call order) answered by script: "ok"; "before:500" fails
    # without creating; "after:500" creates the batch, then answers 500; "after:drop" creates it,
    # then drops the connection (the ambiguous create). Past the end of the script creates are ok.
    create_script: tuple[str, ...] = ()
    # A finished batch loses its output at once: OpenAI output files 404, Anthropic results 404.
    lose_output: bool = False
    # Anthropic results_url points here (e.g. another host) instead of back at the emulator.
    results_url_base: str = ""
    # Order of the batch lists: "desc" (newest first, as documented) or "asc".
    list_order: str = "desc"
    # Real-time endpoints: per-model limits ("*" for any other model) over rate_window seconds.
    realtime_rpm: dict[str, int] = field(default_factory=dict)
    realtime_tpm: dict[str, int] = field(default_factory=dict)
    rate_window: float = 60.0
    # Share of OpenAI flex-tier requests answered 429 "resource unavailable".
    flex_busy_rate: float = 0.0
    # Anthropic: most requests queued in processing batches at once (0: no limit); past it a
    # create answers 429, as the real API's queue limit does.
    anthropic_queue_limit: int = 0
    # OpenAI: a cancel answers "cancelling" at once, but the batch keeps working this many seconds
    # before it stops (a slow cancel: answers finished meanwhile arrive late).
    cancel_delay: float = 0.0

    def merged(self, changes: dict[str, Any]) -> Faults:
        """Return a copy with ``changes`` applied (JSON values coerced); unknown keys raise ValueError."""
        known = {f.name: f for f in dataclasses.fields(self)}
        unknown = set(changes) - set(known)
        if unknown:
            raise ValueError(f"unknown fault field(s): {', '.join(sorted(unknown))}")
        values: dict[str, Any] = {}
        for name, value in changes.items():
            current = getattr(self, name)
            if isinstance(current, tuple):
                if not isinstance(value, list | tuple):
                    raise ValueError(f"{name} must be a list")
                values[name] = tuple(value)
            elif isinstance(current, dict):
                if not isinstance(value, dict):
                    raise ValueError(f"{name} must be an object")
                values[name] = {str(k): int(v) for k, v in value.items()}
            elif isinstance(current, bool):
                if not isinstance(value, bool):
                    raise ValueError(f"{name} must be a boolean")
                values[name] = value
            elif isinstance(current, str):
                if not isinstance(value, str):
                    raise ValueError(f"{name} must be a string")
                values[name] = value
            elif isinstance(current, int):
                values[name] = int(value)
            else:
                values[name] = float(value)
        return dataclasses.replace(self, **values)

    def to_json(self) -> dict[str, Any]:
        """JSON-ready view (tuples become lists)."""
        return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}


@dataclass
class EmulatorConfig:
    """How the emulator behaves: processing time, accepted keys, storage and faults."""

    processing_seconds: float = 0.2
    time_scale: float = 1.0
    api_keys: frozenset[str] | None = None
    data_dir: Path | None = None
    faults: Faults = field(default_factory=Faults)
    # The completion_window values a batch create accepts: OpenAI's own API takes only "24h"; an
    # OpenAI-compatible host may offer others (tests set e.g. ("24h", "1h")).
    completion_windows: tuple[str, ...] = ("24h",)
    # OpenAI batch.* webhooks (batchd/emulator/webhooks.py): sent when both are set.
    webhook_url: str | None = None
    webhook_secret: str | None = None

    @property
    def batch_seconds(self) -> float:
        """Wall time from create to end of one batch."""
        return max(0.0, self.processing_seconds * self.time_scale)
