"""The emulator's own bookkeeping of real-time traffic: rate-limit windows and what was served."""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import Any


@dataclass
class Window:
    """What one (vendor, model) spent inside the sliding window: (time, tokens) per request."""

    entries: deque[tuple[float, int]] = field(default_factory=deque)
    tokens: int = 0

    def trim(self, now: float, span: float) -> None:
        while self.entries and self.entries[0][0] <= now - span:
            self.tokens -= self.entries.popleft()[1]

    def wait(self, now: float, span: float, rpm: int | None, tpm: int | None, tokens: int) -> float | None:
        """Seconds until one more request of `tokens` fits, or None when it fits now."""
        self.trim(now, span)
        if rpm is not None and len(self.entries) + 1 > rpm:
            return self.entries[0][0] + span - now
        if tpm is not None and self.tokens + tokens > tpm and self.entries:
            # The oldest entries must leave until the rest plus this request fit.
            freed, needed = 0, self.tokens + tokens - tpm
            for stamp, spent in self.entries:
                freed += spent
                if freed >= needed:
                    return stamp + span - now
        return None


@dataclass
class RealtimeLedger:
    """The emulator's own record of real-time traffic."""

    windows: dict[tuple[str, str], Window] = field(default_factory=dict)
    served: list[dict[str, Any]] = field(default_factory=list)
    rate_limited: int = 0
    flex_busy: int = 0

    def summary(self) -> dict[str, Any]:
        """Counts and token totals per vendor and tier (the stats document's "realtime" key)."""
        by: dict[str, dict[str, int]] = {}
        for entry in self.served:
            key = f"{entry['vendor']}:{entry['tier']}"
            totals = by.setdefault(key, {"requests": 0, "input_tokens": 0, "output_tokens": 0})
            totals["requests"] += 1
            totals["input_tokens"] += entry["input_tokens"]
            totals["output_tokens"] += entry["output_tokens"]
        return {
            "requests": len(self.served),
            "rate_limited": self.rate_limited,
            "flex_busy": self.flex_busy,
            "by_tier": by,
        }
