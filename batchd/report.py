"""What the batches cost and saved (`batchd report`), and what a file will cost (`batchd estimate`).

Report keys per row and in `total` (README, "Costs"): `cost_batch` (the results at batch price),
`cost_realtime` (what real time would have cost), `cost_paid` (the results at the price each was
actually paid: batch, or the fallback's real-time or flex price), `fallback_requests` and
`fallback_cost` (the results the real-time fallback served, and what it paid for them),
`duplicate_requests` and `duplicate_cost` (second answers paid for but not results: a cancelled
batch's late answer after the fallback's), `paid` (cost_paid + duplicate_cost: everything paid),
`saving` (cost_realtime - paid), `deadlines_met` / `deadlines_missed` (results with a deadline, made
at or before it / after it).

Estimate heuristic (documented in the README): input tokens are ceil(characters / 4) of every
text in the request plus 4 per message; output tokens are the request's own ceiling
(max_tokens, max_completion_tokens or max_output_tokens), or 256 when it sets none, and 0 for
embeddings and moderations. So the output side is an upper bound, the input side an estimate.
"""

from __future__ import annotations

import math
import sys
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import orjson
from rich.console import Console
from rich.table import Table

from .formats import LineError, parse_line
from .settings import Settings
from .spool import LINE_OVERHEAD
from .status import existing_store, no_store, terminal

DEFAULT_OUTPUT_TOKENS = 256
NO_OUTPUT_ENDPOINTS = ("/v1/embeddings", "/v1/moderations")


def _money(value: float | None) -> str:
    return "unpriced" if value is None else f"${value:,.4f}"


async def build_report(settings: Settings, since_seconds: float, by: str) -> dict[str, Any] | None:
    async with existing_store(settings) as store:
        if store is None:
            return None
        rows = await store.report(time.time() - since_seconds, by)
    for row in rows:
        for key in ("cost_paid", "fallback_cost", "duplicate_cost"):
            row.setdefault(key, None)
        if row["cost_batch"] is None and not row["unpriced"]:
            # Nothing billed (invalid or failed requests, or only duplicates in this row).
            row["cost_batch"] = row["cost_realtime"] = 0.0
            row["cost_paid"] = row["cost_paid"] or 0.0
        row["fallback_cost"] = row["fallback_cost"] or 0.0
        row["duplicate_cost"] = row["duplicate_cost"] or 0.0
        priced = row["cost_batch"] is not None and row["cost_paid"] is not None
        row["paid"] = row["cost_paid"] + row["duplicate_cost"] if priced else None
        row["saving"] = (row["cost_realtime"] - row["paid"]) if priced else None
    totals: dict[str, Any] = {key: sum(int(row.get(key) or 0) for row in rows) for key in COUNTS}
    for key in MONEY:
        values = [row[key] for row in rows if row[key] is not None]
        totals[key] = sum(values) if values else None
    return {"since_seconds": since_seconds, "by": by, "rows": rows, "total": totals}


COUNTS = (
    "requests",
    "succeeded",
    "input_tokens",
    "cached_input_tokens",
    "output_tokens",
    "unpriced",
    "fallback_requests",
    "deadlines_met",
    "deadlines_missed",
    "duplicate_requests",
)
MONEY = ("cost_batch", "cost_realtime", "cost_paid", "fallback_cost", "duplicate_cost", "paid", "saving")


def render_report(report: dict[str, Any], console: Console) -> None:
    table = Table(title=f"batchd savings, last {report['since_seconds'] / 86400:g} days, by {report['by']}")
    columns = (report["by"], "requests", "input tok", "output tok", "paid", "real-time", "saved", "real-time fallback")
    for column in (*columns, "deadlines met/missed", "duplicates"):
        table.add_column(column, justify="left" if column == report["by"] else "right")
    for row in [*report["rows"], {"key": "total", **report["total"]}]:
        note = f" (+{row['unpriced']} unpriced)" if row["unpriced"] and row["paid"] is not None else ""
        table.add_row(
            str(row["key"]),
            f"{row['requests']:,}",
            f"{row['input_tokens']:,}",
            f"{row['output_tokens']:,}",
            _money(row["paid"]) + note,
            _money(row["cost_realtime"]),
            _money(row["saving"]),
            f"{row['fallback_requests']:,} / {_money(row['fallback_cost'])}" if row["fallback_requests"] else "-",
            f"{row['deadlines_met']:,} / {row['deadlines_missed']:,}"
            if row["deadlines_met"] or row["deadlines_missed"]
            else "-",
            f"{row['duplicate_requests']:,} / {_money(row['duplicate_cost'])}" if row["duplicate_requests"] else "-",
        )
    console.print(table)


async def run_report(settings: Settings, since_seconds: float, by: str, as_json: bool) -> int:
    report = await build_report(settings, since_seconds, by)
    if report is None:
        raise no_store(settings)
    if as_json:
        sys.stdout.write(orjson.dumps(report, option=orjson.OPT_INDENT_2).decode() + "\n")
    else:
        render_report(report, terminal())
    return 0


def _text_chars(value: Any) -> int:
    if isinstance(value, str):
        return len(value)
    if isinstance(value, list):
        return sum(_text_chars(v) for v in value)
    if isinstance(value, dict):
        return sum(_text_chars(v) for k, v in value.items() if k not in ("type", "role", "model"))
    return 0


def estimate_tokens(endpoint: str, body: dict[str, Any]) -> tuple[int, int]:
    """(input, output) tokens for one request by the heuristic in this module's docstring."""
    messages = body.get("messages")
    text = {k: v for k, v in body.items() if k in ("messages", "input", "prompt", "system", "instructions")}
    tokens_in = math.ceil(_text_chars(text) / 4) + 4 * (len(messages) if isinstance(messages, list) else 1)
    if endpoint in NO_OUTPUT_ENDPOINTS:
        return tokens_in, 0
    ceiling = body.get("max_tokens") or body.get("max_completion_tokens") or body.get("max_output_tokens")
    return tokens_in, int(ceiling) if isinstance(ceiling, int) and ceiling > 0 else DEFAULT_OUTPUT_TOKENS


def estimate_file(settings: Settings, path: Path) -> dict[str, Any]:
    """Per (provider, endpoint, model): requests, estimated tokens, cost, and how many batches."""
    prices = settings.price_table()
    groups: dict[tuple[str, str, str], dict[str, Any]] = defaultdict(
        lambda: {"requests": 0, "bytes": 0, "input_tokens": 0, "output_tokens": 0}
    )
    invalid = 0
    with path.open("rb") as handle:
        for number, raw in enumerate(handle, start=1):
            try:
                parsed = parse_line(raw.rstrip(b"\r\n"), number)
            except LineError:
                invalid += 1
                continue
            profile = settings.profile_for(parsed.kind, parsed.model)
            if profile is None:
                invalid += 1
                continue
            tokens_in, tokens_out = estimate_tokens(parsed.endpoint, orjson.loads(parsed.body))
            group = groups[(profile, parsed.endpoint, parsed.model)]
            group["requests"] += 1
            group["bytes"] += len(parsed.body) + len(parsed.endpoint) + LINE_OVERHEAD
            group["input_tokens"] += tokens_in
            group["output_tokens"] += tokens_out
    rows = []
    for (profile, endpoint, model), group in sorted(groups.items()):
        limits = settings.providers[profile]
        batches = max(
            math.ceil(group["requests"] / limits.request_limit), math.ceil(group["bytes"] / limits.byte_limit)
        )
        usage = {"input_tokens": group["input_tokens"], "output_tokens": group["output_tokens"]}
        cost = prices.cost(model, usage, limits.batch_discount)
        rows.append(
            {
                "provider": profile,
                "endpoint": endpoint,
                "model": model,
                **group,
                "batches": batches,
                "cost_batch": cost.batch if cost else None,
                "cost_realtime": cost.realtime if cost else None,
            }
        )
    return {"file": str(path), "rows": rows, "invalid_lines": invalid}


def render_estimate(estimate: dict[str, Any], console: Console) -> None:
    table = Table(title=f"Estimate for {estimate['file']} (output tokens are an upper bound)")
    for column in (
        "provider",
        "model",
        "endpoint",
        "requests",
        "batches",
        "input tok",
        "output tok",
        "batch price",
        "real-time",
    ):
        table.add_column(column)
    for row in estimate["rows"]:
        table.add_row(
            row["provider"],
            row["model"],
            row["endpoint"],
            f"{row['requests']:,}",
            str(row["batches"]),
            f"{row['input_tokens']:,}",
            f"{row['output_tokens']:,}",
            _money(row["cost_batch"]),
            _money(row["cost_realtime"]),
        )
    console.print(table)
    priced = [row for row in estimate["rows"] if row["cost_batch"] is not None]
    if priced:
        batch = sum(row["cost_batch"] for row in priced)
        realtime = sum(row["cost_realtime"] for row in priced)
        console.print(
            f"Total: {_money(batch)} at batch price instead of {_money(realtime)} ({_money(realtime - batch)} saved)"
        )
    if estimate["invalid_lines"]:
        console.print(f"{estimate['invalid_lines']} lines are invalid and will not be sent")
