"""`batchd status`: what the queue and the live batches look like now."""

from __future__ import annotations

import sys
from datetime import UTC, datetime
from typing import Any

import orjson
from rich.console import Console
from rich.table import Table

from .settings import Settings
from .store import Store


def terminal() -> Console:
    """A console; wide when output goes to a file or pipe, so tables are not squeezed."""
    return Console(width=None if sys.stdout.isatty() else 160)


async def snapshot(settings: Settings) -> dict[str, Any] | None:
    """The store's status snapshot, or None when there is no database yet."""
    path = settings.daemon.database_path
    if not path.exists():
        return None
    store = Store(path)
    await store.open()
    try:
        return await store.status()
    finally:
        await store.close()


def _when(timestamp: float | None) -> str:
    if not timestamp:
        return "-"
    return datetime.fromtimestamp(timestamp, UTC).strftime("%Y-%m-%d %H:%M:%S")


def render(data: dict[str, Any], console: Console) -> None:
    queue = Table(title="Queue", title_justify="left")
    for column in ("provider", "endpoint", "model", "queued", "batched", "submitted"):
        queue.add_column(column, justify="right" if column in ("queued", "batched", "submitted") else "left")
    for row in data["queue"]:
        queue.add_row(
            row["provider"],
            row["endpoint"],
            row["model"],
            str(row["queued"]),
            str(row["batched"]),
            str(row["submitted"]),
        )
    console.print(queue)
    batches = Table(title="Live batches", title_justify="left")
    for column in ("id", "provider", "model", "remote id", "status", "requests", "counts", "created", "last error"):
        batches.add_column(column)
    for batch in data["batches"]:
        counts = ", ".join(f"{k}={v}" for k, v in (batch["counts"] or {}).items())
        batches.add_row(
            str(batch["id"]),
            batch["provider"],
            batch["model"],
            batch["remote_id"] or "-",
            batch["remote_status"] or batch["state"],
            str(batch["requests"]),
            counts or "-",
            _when(batch["created_at"]),
            (batch["last_error"] or "")[:60],
        )
    console.print(batches)
    results = ", ".join(f"{k}={v}" for k, v in sorted(data["results"].items())) or "none yet"
    console.print(f"Results: {results}")
    for sink in data.get("sinks", []):
        parked = f", {sink['parked']} parked (batchd redeliver)" if sink["parked"] else ""
        console.print(f"Sink {sink['sink']}: {sink['pending']} pending{parked}")
    for hold in data["holds"]:
        console.print(f"Held: {hold['profile']}/{hold['model']} until {_when(hold['until'])} ({hold['reason']})")
    if data["errors"]:
        console.print("Recent errors:")
        for error in data["errors"]:
            console.print(f"  {_when(error['at'])} {error['event']}: {error['message'][:160]}")


async def render_status(settings: Settings, as_json: bool = False) -> int:
    data = await snapshot(settings)
    if data is None:
        print(f"batchd status: no database at {settings.daemon.database_path}", file=sys.stderr)
        return 1
    if as_json:
        sys.stdout.write(orjson.dumps(data, option=orjson.OPT_INDENT_2).decode() + "\n")
    else:
        render(data, terminal())
    return 0
