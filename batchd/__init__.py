"""batchd: moves non-interactive LLM calls onto the providers' batch APIs."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any

__version__ = "0.1.0"


def submit(requests: Iterable[Any], name: str | None = None, spool_dir: Path | str = "/var/spool/batchd") -> Path:
    """Queue requests for the batchd on this host; see `batchd.spool.submit`."""
    from .spool import submit as spool_submit

    return spool_submit(requests, name=name, spool_dir=spool_dir)


__all__ = ["__version__", "submit"]
