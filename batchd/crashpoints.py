"""Named crash points: `BATCHD_CRASH_AT=name[,name…]` makes the daemon SIGKILL itself there.

Used by the acceptance tests to prove recovery from a crash at the worst moments. With
`BATCHD_CRASH_AT=name@N` the process dies on the Nth time it reaches `name`.
"""

from __future__ import annotations

import os
import signal

ENV = "BATCHD_CRASH_AT"

POINTS = (
    "after-upload",  # OpenAI input file uploaded, batch not created
    "after-create",  # batch created at the provider, remote id not yet recorded
    "after-results-commit",  # results committed to SQLite, not yet written to any sink
    "after-outbox-write",  # outbox .part written and fsynced, delivery not yet committed
    "mid-ingest",  # in the middle of a spool file's transaction
)


class CrashPoints:
    """Parses the environment once; `reach(name)` kills the process when armed."""

    def __init__(self, spec: str | None = None) -> None:
        self._armed: dict[str, int] = {}
        for part in (spec if spec is not None else os.environ.get(ENV, "")).split(","):
            name, _, count = part.strip().partition("@")
            if name:
                if name not in POINTS:
                    raise ValueError(f"{ENV}: unknown crash point {name!r} (known: {', '.join(POINTS)})")
                self._armed[name] = int(count or 1)

    def reach(self, name: str) -> None:
        remaining = self._armed.get(name)
        if remaining is None:
            return
        if remaining > 1:
            self._armed[name] = remaining - 1
            return
        os.kill(os.getpid(), signal.SIGKILL)
