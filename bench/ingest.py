"""Benchmark 1, ingest: a spool file of small chat requests into the SQLite queue.

batchd: `Spool.ingest` on a fresh Store, the daemon's own intake (hash, parse and validate every
line, one transaction, duplicate check, move to done/).
Baseline: a minimal loop that parses each line with orjson and inserts the same columns into the
same table (batchd's schema, same pragmas) in one transaction.
Each side runs in its own process; peak RSS is measured at two file sizes to show it stays flat.
"""

from __future__ import annotations

import shutil
import sqlite3
import time
from importlib import resources
from pathlib import Path
from typing import Any

import orjson

from .common import MB, Context, Row, fmt_mb, fmt_rate, log, median, write_small_openai

ROUND_TIMEOUT = 900.0
# Peak RSS may grow by at most this much when the file grows 10×, to count as "not growing".
RSS_FLAT_SLACK = 25 * MB

INSERT = (
    "INSERT INTO items (file_id, line, custom_id, profile, endpoint, model, body, size, queued_at)"
    " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)"
)
LINE_OVERHEAD = 96  # as batchd.spool.LINE_OVERHEAD


async def batchd_side(source: str, root: str) -> dict[str, Any]:
    from batchd.store import open_store

    from .batchd_setup import ingest_file, make_settings, quiet_logs

    quiet_logs()
    settings = make_settings(Path(root))
    store = open_store("sqlite:///" + str(settings.daemon.database_path), "bench")
    await store.open()
    started = time.perf_counter()
    lines = await ingest_file(settings, store, Path(source))
    seconds = time.perf_counter() - started
    await store.close()
    return {"seconds": seconds, "lines": lines}


def baseline_side(source: str, root: str, schema: str) -> dict[str, Any]:
    db = sqlite3.connect(Path(root) / "baseline.sqlite3", isolation_level=None)
    db.execute("PRAGMA journal_mode=WAL")
    db.execute("PRAGMA synchronous=FULL")
    db.executescript(schema)
    file_id = db.execute(
        "INSERT INTO files (name, sha256, size, out_name, ingested_at) VALUES ('bench.jsonl', '', 0, '', 0)"
    ).lastrowid
    now = time.time()
    lines = 0

    def rows() -> Any:
        nonlocal lines
        with open(source, "rb") as handle:
            for number, raw in enumerate(handle, 1):
                line = orjson.loads(raw)
                body = orjson.dumps(line["body"])
                url = line["url"]
                lines = number
                size = len(body) + len(url) + LINE_OVERHEAD
                yield (file_id, number, line["custom_id"], "openai", url, line["body"]["model"], body, size, now)

    started = time.perf_counter()
    db.execute("BEGIN IMMEDIATE")
    db.executemany(INSERT, rows())
    db.execute("COMMIT")
    seconds = time.perf_counter() - started
    db.close()
    return {"seconds": seconds, "lines": lines}


def _schema() -> str:
    return resources.files("batchd").joinpath("sql", "001_initial.sql").read_text()


def _round(ctx: Context, source: Path, tag: str, batchd_first: bool) -> tuple[dict[str, Any], dict[str, Any]]:
    results: dict[str, dict[str, Any]] = {}
    order = ("batchd", "baseline") if batchd_first else ("baseline", "batchd")
    for side in order:
        root = ctx.workdir("ingest", f"{tag}-{side}")
        try:
            if side == "batchd":
                results[side] = ctx.zygotes["batchd-core"].run(
                    "bench.ingest:batchd_side", ROUND_TIMEOUT, source=str(source), root=str(root)
                )
            else:
                results[side] = ctx.zygotes["sqlite"].run(
                    "bench.ingest:baseline_side", ROUND_TIMEOUT, source=str(source), root=str(root), schema=_schema()
                )
        finally:
            shutil.rmtree(root, ignore_errors=True)
    return results["batchd"], results["baseline"]


def run(ctx: Context) -> list[Row]:
    scale = ctx.scale
    data = ctx.workdir("ingest", "data")
    large, small = data / "large.jsonl", data / "small.jsonl"
    large_bytes = write_small_openai(large, scale.ingest_lines)
    small_bytes = write_small_openai(small, scale.ingest_small_lines)
    log(f"ingest: {scale.ingest_lines:,} lines ({large_bytes / MB:.0f} MB), {scale.ingest_rounds} rounds")
    batchd_runs: list[dict[str, Any]] = []
    baseline_runs: list[dict[str, Any]] = []
    for number in range(scale.ingest_rounds):
        ours, theirs = _round(ctx, large, f"r{number}", batchd_first=number % 2 == 0)
        batchd_runs.append(ours)
        baseline_runs.append(theirs)
        log(
            f"  round {number + 1}: batchd {ours['seconds']:.2f} s, baseline {theirs['seconds']:.2f} s,"
            f" peak RSS {ours['peak_rss'] / MB:.0f} / {theirs['peak_rss'] / MB:.0f} MB"
        )
    small_ours, small_theirs = _round(ctx, small, "small", batchd_first=True)
    log(f"  small file ({scale.ingest_small_lines:,} lines): peak RSS {small_ours['peak_rss'] / MB:.0f} MB")
    shutil.rmtree(data, ignore_errors=True)

    for run_ in (*batchd_runs, *baseline_runs, small_ours, small_theirs):
        if run_["lines"] not in (scale.ingest_lines, scale.ingest_small_lines):
            raise ValueError(f"ingest counted {run_['lines']} lines")
    ours_s = median([r["seconds"] for r in batchd_runs])
    theirs_s = median([r["seconds"] for r in baseline_runs])
    ratio = median([a["seconds"] / b["seconds"] for a, b in zip(batchd_runs, baseline_runs, strict=True)])
    peak_large = median([r["peak_rss"] for r in batchd_runs])
    peak_large_base = median([r["peak_rss"] for r in baseline_runs])
    growth = peak_large - small_ours["peak_rss"]
    speed = Row(
        name="ingest",
        batchd=fmt_rate(scale.ingest_lines / ours_s, "lines/s"),
        baseline=fmt_rate(scale.ingest_lines / theirs_s, "lines/s"),
        ratio=ratio,
        target="≤ 1.3",
        met=ratio <= 1.3,
        notes=f"{scale.ingest_lines:,} lines, {large_bytes / MB:.0f} MB; ratio = batchd time / baseline time,"
        " median of paired rounds",
        details={
            "lines": scale.ingest_lines,
            "bytes": large_bytes,
            "batchd_seconds": [r["seconds"] for r in batchd_runs],
            "baseline_seconds": [r["seconds"] for r in baseline_runs],
            "batchd_cpu_s": [r["cpu_s"] for r in batchd_runs],
            "baseline_cpu_s": [r["cpu_s"] for r in baseline_runs],
        },
    )
    memory = Row(
        name="ingest peak RSS",
        batchd=f"{fmt_mb(small_ours['peak_rss'])} → {fmt_mb(peak_large)}",
        baseline=f"{fmt_mb(small_theirs['peak_rss'])} → {fmt_mb(peak_large_base)}",
        ratio=peak_large / peak_large_base,
        target=f"flat: +≤ {RSS_FLAT_SLACK // MB} MB for {scale.ingest_lines // scale.ingest_small_lines}× input",
        met=growth <= RSS_FLAT_SLACK,
        notes=f"peak RSS at {scale.ingest_small_lines:,} → {scale.ingest_lines:,} lines"
        f" ({small_bytes / MB:.0f} → {large_bytes / MB:.0f} MB); batchd grows {growth / MB:+.1f} MB;"
        " ratio = batchd / baseline at the large size",
        details={
            "small_lines": scale.ingest_small_lines,
            "small_bytes": small_bytes,
            "batchd_peak_rss_small": small_ours["peak_rss"],
            "batchd_peak_rss_large": [r["peak_rss"] for r in batchd_runs],
            "baseline_peak_rss_small": small_theirs["peak_rss"],
            "baseline_peak_rss_large": [r["peak_rss"] for r in baseline_runs],
            "batchd_start_rss": small_ours["start_rss"],
            "baseline_start_rss": small_theirs["start_rss"],
        },
    )
    return [speed, memory]
