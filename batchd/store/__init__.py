"""The durable queue: one contract (store/contract.py), two engines (SQLite, PostgreSQL).

SQL lives only in the engines' named-query files and migrations under this package.
`open_store(url, node)` picks the engine from `[store] url`; asyncpg is imported only for a
PostgreSQL URL.
"""

from __future__ import annotations

import importlib
from typing import cast

from .contract import (
    LIVE_BATCH_STATES,
    POLLED_BATCH_STATES,
    ApplySummary,
    BatchRow,
    BatchState,
    Chunk,
    Fate,
    FileKey,
    FileRow,
    FileState,
    FinalResult,
    Group,
    InputSize,
    ItemState,
    NewItem,
    NewResult,
    Pause,
    PendingResult,
    PruneSummary,
    Retry,
    Store,
    SubmittedItem,
    Usage,
)
from .sqlite import SCHEMA_VERSION, SQLiteStore
from .url import StoreURL, parse_store_url


def open_store(url: str, node: str, *, readonly: bool = False) -> Store:
    """The engine for `url`, not yet opened: `await store.open()` connects (and migrates).

    `readonly` is for commands beside the daemon: `open()` then never creates or migrates and
    refuses a schema other than this code's (SQLite: `open_existing`). ValueError for a URL that is
    not a store URL.
    """
    parsed = parse_store_url(url)
    if parsed.engine == "sqlite":
        assert parsed.path is not None
        return SQLiteStore(parsed.path, node, url=parsed.url, readonly=readonly)
    # Imported lazily, by name: asyncpg is needed only for PostgreSQL URLs.
    postgres = importlib.import_module(".postgres", __package__)
    return cast(Store, postgres.PostgresStore(parsed.url, node, readonly=readonly))


def _check(store: SQLiteStore) -> Store:
    """mypy proves here that SQLiteStore satisfies the contract."""
    return store


__all__ = [
    "LIVE_BATCH_STATES",
    "POLLED_BATCH_STATES",
    "SCHEMA_VERSION",
    "ApplySummary",
    "BatchRow",
    "BatchState",
    "Chunk",
    "Fate",
    "FileKey",
    "FileRow",
    "FileState",
    "FinalResult",
    "Group",
    "InputSize",
    "ItemState",
    "NewItem",
    "NewResult",
    "Pause",
    "PendingResult",
    "PruneSummary",
    "Retry",
    "SQLiteStore",
    "Store",
    "StoreURL",
    "SubmittedItem",
    "Usage",
    "open_store",
    "parse_store_url",
]
