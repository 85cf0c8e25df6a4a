"""The read-only status page at `/`: plain server-rendered HTML and a little script, no build step.

What a person needs at a glance: the queue per route with when it flushes next and why (the
batcher's own plan, control.route_section), capacity per provider and model, live batches with
a progress bar, sinks with their backlog and parked results, holds, recent errors, and the savings
so far. The script re-fetches the page every `refresh` seconds and swaps its <main> in place (no
flicker, no lost scroll position); without script the page is still complete, just static.
Everything shown is escaped: model names, errors and sink names come from producers and providers.
"""

from __future__ import annotations

from datetime import UTC, datetime
from html import escape
from typing import Any

from .status import _progress


def flush_text(flush: dict[str, Any] | None, now: float) -> str:
    """A route's next flush as the page shows it (from control.route_section: the batcher's own plan)."""
    if flush is None:
        return "-"
    reason = escape(str(flush["reason"]))
    at = flush["next_flush"]
    if at is None:
        if reason == "paused":
            return f'<span class="flush">{reason}</span>: when resumed'
        why = f" ({escape(flush['blocked_by'])})" if flush.get("blocked_by") else ""
        return f'<span class="flush">{reason}</span>{why}: when a batch ends'
    if at <= now:
        return f'<span class="flush">{reason}</span> now'
    return f'<span class="flush">{reason}</span> {escape(_when(at))} (in {_in(at - now)})'


CAPACITY_COLUMNS = [
    "provider",
    "model",
    "batches in flight",
    "enqueued tokens",
    "queued requests",
    "batches this hour",
    "waiting for",
]


def capacity_rows(capacity: list[dict[str, Any]]) -> list[list[str]]:
    """One row per (profile, model): used / limit (free) for each declared limit."""

    def cell(limit: dict[str, Any] | None) -> str:
        if not limit:
            return "-"
        shown = limit.get("usable") or limit.get("limit")
        learned = f", learned {limit['learned']:,}" if limit.get("learned") is not None else ""
        return escape(f"{limit['used']:,} / {shown:,} (free {limit['free']:,}{learned})")

    return [
        [
            escape(row["provider"]),
            f'<span class="model">{escape(row["model"])}</span>',
            cell(row["in_flight_batches"]),
            cell(row.get("enqueued_tokens")),
            cell(row.get("queued_requests")),
            cell(row.get("batches_per_hour")),
            escape(row.get("blocked_by") or "-"),
        ]
        for row in capacity
    ]


def _when(timestamp: float | None) -> str:
    if not timestamp:
        return "-"
    return datetime.fromtimestamp(timestamp, UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


def _in(seconds: float) -> str:
    seconds = max(0, round(seconds))
    if seconds < 120:
        return f"{seconds} s"
    if seconds < 7200:
        return f"{seconds // 60} min"
    return f"{seconds / 3600:.1f} h"


def _usd(value: float) -> str:
    # Small batches cost fractions of a cent: show them rather than $0.0000.
    if value < 0.01:
        return f"${value:,.6f}"
    return f"${value:,.4f}" if value < 100 else f"${value:,.2f}"


def _table(caption: str, columns: list[str], rows: list[list[str]], empty: str, ident: str) -> str:
    head = "".join(f"<th>{escape(c)}</th>" for c in columns)
    if not rows:
        body = f'<tr><td colspan="{len(columns)}" class="empty">{escape(empty)}</td></tr>'
    else:
        body = "".join("<tr>" + "".join(f"<td>{cell}</td>" for cell in row) + "</tr>" for row in rows)
    return (
        f'<section id="{ident}"><h2>{escape(caption)}</h2>'
        f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table></section>"
    )


def savings(results: list[dict[str, Any]]) -> tuple[float, float]:
    """(paid at batch prices, what real-time calls would have cost) over every final result."""
    paid = sum(float(row["cost_batch"] or 0) for row in results)
    realtime = sum(float(row["cost_realtime"] or 0) for row in results)
    return paid, realtime


def render(
    status: dict[str, Any],
    metrics: dict[str, list[dict[str, Any]]],
    routes: dict[str, Any],
    refresh: float,
    now: float,
) -> str:
    """The whole page from the store's status snapshot, its metrics read model and control.route_section."""
    flushes = {(f["provider"], f["endpoint"], f["model"]): f for f in routes.get("next_flush", [])}
    queue_rows = []
    for route in status["queue"]:
        flush = flush_text(flushes.get((route["provider"], route["endpoint"], route["model"])), now)
        queue_rows.append(
            [
                escape(route["provider"]),
                escape(route["endpoint"]),
                f'<span class="model">{escape(route["model"])}</span>',
                f'<span class="queued">{route["queued"]}</span>',
                str(route["batched"]),
                str(route["submitted"]),
                flush,
            ]
        )
    batch_rows = []
    for batch in status["batches"]:
        done, total = _progress(batch)
        percent = round(100 * done / total) if total else 0
        bar = (
            f'<progress class="bar" value="{done}" max="{max(total, 1)}" aria-label="batch {batch["id"]} progress">'
            f'{percent}%</progress> <span class="done">{done}/{total}</span>'
        )
        batch_rows.append(
            [
                str(batch["id"]),
                escape(batch["provider"]),
                escape(batch["model"]),
                escape(batch["remote_id"] or "-"),
                f'<span class="status">{escape(batch["remote_status"] or batch["state"])}</span>',
                bar,
                escape(_when(batch["created_at"])),
                escape((batch["last_error"] or "")[:120]),
            ]
        )
    sink_rows = [
        [escape(s["sink"]), f'<span class="backlog">{s["pending"]}</span>', str(s["parked"])] for s in status["sinks"]
    ]
    hold_rows = [
        [escape(h["profile"]), escape(h["model"]), escape(_when(h["until"])), escape(h["reason"] or "")]
        for h in status["holds"]
    ]
    error_rows = [[escape(_when(e["at"])), escape(e["event"]), escape(e["message"][:300])] for e in status["errors"]]
    paid, realtime = savings(metrics["results"])
    results = ", ".join(f"{escape(k)} {v}" for k, v in sorted(status["results"].items())) or "none yet"
    saved = realtime - paid
    summary = (
        '<section id="savings"><h2>Savings so far</h2>'
        f'<p><span class="saved">{_usd(saved)} saved</span>: paid {_usd(paid)} at batch prices,'
        f" {_usd(realtime)} at real-time prices.</p><p>Results: {results}</p></section>"
    )
    main = "".join(
        [
            summary,
            _table(
                "Queue",
                ["provider", "endpoint", "model", "queued", "batched", "submitted", "next flush"],
                queue_rows,
                "nothing queued",
                "queue",
            ),
            _table(
                "Live batches",
                ["id", "provider", "model", "remote id", "status", "progress", "created", "last error"],
                batch_rows,
                "no live batches",
                "batches",
            ),
            _table(
                "Capacity",
                CAPACITY_COLUMNS,
                capacity_rows(routes.get("capacity", [])),
                "nothing in flight",
                "capacity",
            ),
            _table("Sinks", ["sink", "backlog", "parked"], sink_rows, "no sinks yet", "sinks"),
            _table("Holds", ["provider", "model", "until", "reason"], hold_rows, "no holds", "holds"),
            _table("Recent errors", ["at", "event", "message"], error_rows, "no errors", "errors"),
        ]
    )
    return PAGE.format(
        main=main, refresh_ms=int(refresh * 1000), updated=escape(_when(now)), refresh=escape(f"{refresh:g}")
    )


PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>batchd</title>
<meta name="viewport" content="width=device-width, initial-scale=1">
<style>
body {{ font: 14px/1.4 system-ui, sans-serif; margin: 1.5em; color: #222; }}
h1 {{ font-size: 1.4em; margin: 0 0 .2em; }} h2 {{ font-size: 1.1em; margin: 1.2em 0 .4em; }}
table {{ border-collapse: collapse; min-width: 40em; }}
th, td {{ border-bottom: 1px solid #ddd; padding: .25em .6em; text-align: left; vertical-align: middle; }}
th {{ background: #f4f4f4; }} td.empty {{ color: #888; font-style: italic; }}
progress.bar {{ width: 12em; height: 1em; }} .saved {{ font-weight: bold; color: #176b2c; }}
#stamp {{ color: #888; }}
</style></head>
<body><h1>batchd</h1><p id="stamp">updated <span id="updated">{updated}</span>, refreshing every {refresh} s</p>
<main id="main">{main}</main>
<script>
// Re-fetch the page and swap <main>: the page stays server-rendered, the script only refreshes it.
setInterval(async () => {{
  try {{
    const response = await fetch(location.pathname, {{cache: "no-store"}});
    if (!response.ok) return;
    const next = new DOMParser().parseFromString(await response.text(), "text/html");
    document.getElementById("main").replaceWith(next.getElementById("main"));
    document.getElementById("updated").textContent = next.getElementById("updated").textContent;
  }} catch (error) {{ /* the daemon is restarting: try again at the next tick */ }}
}}, {refresh_ms});
</script></body></html>
"""
