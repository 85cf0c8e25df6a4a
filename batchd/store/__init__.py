"""The durable queue: one contract (store/contract.py), two engines (SQLite, PostgreSQL).

SQL lives only in the engines' named-query files and migrations under this package.
"""

from __future__ import annotations

from .sqlite import (
    SCHEMA_VERSION,
    ApplySummary,
    BatchRow,
    BatchState,
    FileRow,
    Group,
    NewItem,
    NewResult,
    PendingResult,
    RetryAt,
    Store,
)

__all__ = [
    "SCHEMA_VERSION",
    "ApplySummary",
    "BatchRow",
    "BatchState",
    "FileRow",
    "Group",
    "NewItem",
    "NewResult",
    "PendingResult",
    "RetryAt",
    "Store",
]
