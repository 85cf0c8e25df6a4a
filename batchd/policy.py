"""Pure policy functions of the batch life cycle: retry backoff, deadlines, where a key may go.

Nothing here does I/O or reads a clock, so every rule is unit-tested on its own; the store only
records what these decide.
"""

from __future__ import annotations

import random
from urllib.parse import urlsplit


def retry_delay(attempt: int, base: float, ceiling: float, rng: random.Random | None = None) -> float:
    """Seconds before a request that failed retryably on its `attempt`-th try (1-based) goes out again.

    Exponential (base, 2·base, 4·base, …) capped at `ceiling`, times a jitter of 0.5–1.0 so that
    requests that failed together do not all come back at the same instant.
    """
    exponent = min(max(attempt - 1, 0), 62)  # 2**62 · base is past any ceiling; avoids float overflow
    delay = min(ceiling, base * float(2**exponent))
    return float(delay * (0.5 + 0.5 * (rng or random).random()))


def overdue(created_at: float, now: float, window: float, grace: float) -> bool:
    """A batch still not ended `grace` after its provider window closed: it must be cancelled."""
    return now > created_at + window + grace


def same_host(base_url: str | None, url: str, default_base: str) -> bool:
    """True when `url` names the same host as the profile's base_url (any port, any scheme).

    The API key goes with every request an SDK makes, so a URL a provider hands us (Anthropic's
    `results_url`) may only be followed to the host we were configured to trust.
    """
    trusted = urlsplit(base_url or default_base).hostname
    target = urlsplit(url).hostname
    return bool(trusted) and bool(target) and (trusted or "").lower() == (target or "").lower()
