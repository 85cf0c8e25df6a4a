"""`batchd results`: query the stored result lines."""

from __future__ import annotations

import sys

import orjson
from rich.table import Table

from .settings import Settings
from .status import existing_store, no_store, terminal


async def show_results(
    settings: Settings, file: str | None, custom_id: str | None, status: str | None, limit: int, as_json: bool
) -> int:
    async with existing_store(settings) as store:
        if store is None:
            raise no_store(settings)
        rows = await store.query_results(file, custom_id, status, limit)
    if as_json:
        sys.stdout.buffer.write(b"".join(bytes(row["payload"]) + b"\n" for row in rows))
        return 0 if rows else 1
    table = Table()
    for column in ("file", "line", "custom_id", "status", "via", "model", "tokens in/out", "detail"):
        table.add_column(column)
    for row in rows:
        result = orjson.loads(row["payload"])
        usage = result.get("usage") or {}
        error = result.get("error") or {}
        detail = error.get("message") or (error.get("error") or {}).get("message") or ""
        table.add_row(
            row["file"],
            str(row["line"]),
            str(result["custom_id"]),
            row["status"],
            result.get("via") or "-",  # batch, realtime (the deadline fallback), or none (invalid, cancelled)
            result.get("model") or "-",
            f"{usage.get('input_tokens', '-')}/{usage.get('output_tokens', '-')}",
            str(detail)[:80],
        )
    terminal().print(table)
    return 0 if rows else 1
