"""`batchd status`: what the queue and the live batches look like now."""

from __future__ import annotations

import asyncio
import os
import sys
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import UTC, datetime
from typing import Any

import orjson
from rich.console import Console, Group
from rich.live import Live
from rich.progress_bar import ProgressBar
from rich.table import Table
from rich.text import Text

from .exits import EX_CONFIG, EX_NOINPUT, EX_NOPERM, OperatorError
from .settings import Settings
from .store import open_store
from .store.contract import LIVE_BATCH_STATES, NotCreated, Store
from .store.url import StoreURL, parse_store_url


def terminal() -> Console:
    """A console; wide when output goes to a file or pipe, so tables are not squeezed."""
    return Console(width=None if sys.stdout.isatty() else 160)


def store_url(settings: Settings) -> StoreURL:
    try:
        return parse_store_url(settings.store_url)
    except ValueError as exc:
        raise OperatorError(f"[store] url: {exc}", EX_CONFIG) from None


def no_store(settings: Settings) -> OperatorError:
    """What a command says when the daemon has not created its database yet."""
    return OperatorError(f"no database at {store_url(settings).redacted()}", EX_NOINPUT)


@asynccontextmanager
async def existing_store(settings: Settings, writable: bool = False) -> AsyncIterator[Store | None]:
    """For commands beside the daemon: the store if a daemon has created it, else None.

    Never creates or migrates it: read-only unless `writable` (for `batchd redeliver`). A schema
    other than this code's, or a database the caller may not read, is an `OperatorError`.
    """
    url = store_url(settings)
    if url.path is not None:
        try:
            os.stat(url.path)
        except (FileNotFoundError, NotADirectoryError):
            yield None
            return
        except PermissionError:
            raise OperatorError(f"cannot reach the database {url.path}: permission denied", EX_NOPERM) from None
    store = open_store(settings.store_url, settings.node_id(create=False) or "", readonly=not writable)
    try:
        await store.open_existing(writable)
    except NotCreated:  # a daemon is creating it right now: nothing to show yet
        yield None
        return
    try:
        yield store
    finally:
        await store.close()


async def snapshot(settings: Settings) -> dict[str, Any] | None:
    """The store's status snapshot, or None when there is no database yet (read-only: never creates it)."""
    from .control import daemon_section  # control imports this module

    async with existing_store(settings) as store:
        if store is None:
            return None
        data = await store.status()
        live = await store.batches_in_state(*LIVE_BATCH_STATES)
        data.update(await daemon_section(settings, store, time.time()))
    url = store_url(settings)
    this_node = settings.node_id(create=False)
    data["store"] = {"engine": url.engine, "url": url.redacted(), "node": this_node}
    owners: dict[str, list[int]] = {}
    leases = {batch.id: (batch.owner, batch.lease_until) for batch in live}
    for batch in live:
        if batch.owner:
            owners.setdefault(batch.owner, []).append(batch.id)
    for row in data.get("batches", []):
        row["owner"], row["lease_until"] = leases.get(row["id"], (None, 0.0))
    # The engine may list every node with its heartbeat; else the nodes that own something (and this one).
    nodes = data.get("nodes")
    if not isinstance(nodes, list):
        names = sorted({*owners, *([this_node] if this_node else [])})
        nodes = [{"node": name} for name in names]
    for node in nodes:
        node["batches"] = owners.get(str(node.get("node")), [])
    data["nodes"] = nodes
    return data


def _when(timestamp: float | None) -> str:
    if not timestamp:
        return "-"
    return datetime.fromtimestamp(timestamp, UTC).strftime("%Y-%m-%d %H:%M:%S")


def _progress(batch: dict[str, Any]) -> tuple[int, int]:
    """(done, total) from the provider's request counts; Anthropic reports all at the end."""
    counts = batch["counts"] or {}
    if "total" in counts:  # OpenAI
        total = counts["total"] or batch["requests"]
        return counts.get("completed", 0) + counts.get("failed", 0), total
    if counts:
        total = sum(counts.values())
        return total - counts.get("processing", 0), total
    return 0, batch["requests"]


def view(data: dict[str, Any]) -> Group:
    """Everything `batchd status` shows, as one renderable (printed once, or live with --watch)."""
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
    batches = Table(title="Live batches", title_justify="left")
    for column in ("id", "provider", "model", "remote id", "status", "progress", "done", "created", "last error"):
        batches.add_column(column)
    for batch in data["batches"]:
        done, total = _progress(batch)
        batches.add_row(
            str(batch["id"]),
            batch["provider"],
            batch["model"],
            batch["remote_id"] or "-",
            batch["remote_status"] or batch["state"],
            ProgressBar(total=max(total, 1), completed=done, width=20),
            f"{done}/{total}",
            _when(batch["created_at"]),
            (batch["last_error"] or "")[:60],
        )
    from .control import daemon_lines

    lines: list[Any] = [Text(line) for line in daemon_lines(data)]
    store = data.get("store")
    if store:
        lines.append(Text(f"Store: {store['engine']} {store['url']} (this node: {store.get('node') or 'none yet'})"))
    for node in data.get("nodes", []):
        owned = ", ".join(str(b) for b in node.get("batches", [])) or "no live batches"
        seen = f", last seen {_when(node['heartbeat_at'])}" if node.get("heartbeat_at") else ""
        lines.append(Text(f"Node {node.get('node')}: {owned}{seen}"))
    lines += [queue, batches]
    results = ", ".join(f"{k}={v}" for k, v in sorted(data["results"].items())) or "none yet"
    lines.append(Text(f"Results: {results}"))
    for sink in data.get("sinks", []):
        parked = f", {sink['parked']} parked (batchd redeliver)" if sink["parked"] else ""
        lines.append(Text(f"Sink {sink['sink']}: {sink['pending']} pending{parked}"))
    for hold in data["holds"]:
        lines.append(Text(f"Held: {hold['profile']}/{hold['model']} until {_when(hold['until'])} ({hold['reason']})"))
    if data["errors"]:
        lines.append(Text("Recent errors:"))
        for error in data["errors"]:
            lines.append(Text(f"  {_when(error['at'])} {error['event']}: {error['message'][:160]}"))
    return Group(*lines)


def render(data: dict[str, Any], console: Console) -> None:
    console.print(view(data))


async def watch_status(settings: Settings, interval: float, count: int | None) -> int:
    """A live view, refreshed every `interval` seconds until Ctrl-C (or `count` refreshes)."""
    shown = 0
    with Live(console=terminal(), auto_refresh=False) as live:
        while count is None or shown < count:
            data = await snapshot(settings)
            live.update(view(data) if data else Text("waiting for the database…"), refresh=True)
            shown += 1
            if count is None or shown < count:
                await asyncio.sleep(interval)
    return 0


async def render_status(settings: Settings, as_json: bool = False) -> int:
    data = await snapshot(settings)
    if data is None:
        raise no_store(settings)
    if as_json:
        sys.stdout.write(orjson.dumps(data, option=orjson.OPT_INDENT_2).decode() + "\n")
    else:
        render(data, terminal())
    return 0
