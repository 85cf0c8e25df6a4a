"""The read-only status page at `/`: plain server-rendered HTML and a little script, no build step.

What a person needs at a glance: the queue per route with when it flushes next, live batches with
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


def next_flush(
    oldest: float, max_wait: float, hold_until: float | None, now: float, at_capacity: bool = False
) -> tuple[float, str]:
    """When a queued route's group goes out at the latest, and why (pure; the batcher's own rule:
    a group flushes when full or once its oldest request has waited max_wait, unless held, and
    only while its profile has a free batch slot: max_in_flight)."""
    due = oldest + max_wait
    if hold_until is not None and hold_until > max(due, now):
        return hold_until, "held"
    if due <= now:
        return now, "due now, waiting for a free batch slot" if at_capacity else "due now"
    return due, "max_wait"


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
    max_wait: float,
    refresh: float,
    now: float,
    max_in_flight: dict[str, int] | None = None,
) -> str:
    """The whole page from the store's status snapshot and its metrics read model."""
    live: dict[str, int] = {}
    for batch in status["batches"]:
        live[batch["provider"]] = live.get(batch["provider"], 0) + 1
    limits = max_in_flight or {}
    holds = {(h["profile"], h["model"]): float(h["until"]) for h in status["holds"]}
    oldest = {(q["profile"], q["endpoint"], q["model"]): float(q["oldest"]) for q in metrics["queue"]}
    queue_rows = []
    for route in status["queue"]:
        key = (route["provider"], route["endpoint"], route["model"])
        if key in oldest:
            full = key[0] in limits and live.get(key[0], 0) >= limits[key[0]]
            at, why = next_flush(oldest[key], max_wait, holds.get((key[0], key[2])), now, full)
            flush = f'<span class="flush">{escape(why)}</span> {escape(_when(at))} (in {_in(at - now)})'
        else:
            flush = "-"
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
