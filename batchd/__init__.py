"""batchd: moves non-interactive LLM calls onto the providers' batch APIs."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .spool import Submission

__version__ = "0.1.0"


def submit(requests: Iterable[Any], name: str | None = None, spool_dir: Path | str = "/var/spool/batchd") -> Submission:
    """Queue requests for the batchd on this host; see `batchd.spool.submit`.

    Returns the file's path in new/ (`.path`, also its `os.fspath`) and where its results will
    appear (`.results`).
    """
    from .spool import submit as spool_submit

    return spool_submit(requests, name=name, spool_dir=spool_dir)


__all__ = ["__version__", "submit"]
