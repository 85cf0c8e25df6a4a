"""batchd: moves non-interactive LLM calls onto the providers' batch APIs."""

from __future__ import annotations

from collections.abc import Iterable
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .spool import Submission

__version__ = "0.1.0"


def submit(
    requests: Iterable[Any],
    name: str | None = None,
    spool_dir: Path | str = "/var/spool/batchd",
    deadline: str | datetime | float | None = None,
) -> Submission:
    """Queue requests for the batchd on this host; see `batchd.spool.submit`.

    Returns the file's path in new/ (`.path`, also its `os.fspath`) and where its results will
    appear (`.results`). `deadline`: when every result must exist, as an ISO 8601 string with a
    UTC offset ("2026-12-01T07:00+01:00"), relative to the file's arrival ("8h"), a datetime with
    tzinfo, or a unix time; an unreadable one raises ValueError before anything is written.
    """
    from .spool import submit as spool_submit

    return spool_submit(requests, name=name, spool_dir=spool_dir, deadline=deadline)


__all__ = ["__version__", "submit"]
