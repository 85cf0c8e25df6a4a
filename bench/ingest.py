"""Benchmark 1, ingest: spool files of small chat requests into the SQLite queue.

Two rows of speed, one of memory:

- one large file (1M lines; `--quick`: 100k). batchd: `Spool.ingest` on a fresh store, the daemon's
  own intake (hash, parse and validate every line, duplicate custom_ids, chunk transactions, move
  to done/). Baseline: a minimal loop that parses each line with orjson and inserts the same
  columns into the same tables (batchd's current schema: every SQLite migration, same pragmas,
  item rows and their bodies, ids assigned by the loop itself) with `executemany` in one
  transaction.
- many small files (20,000 files of 10 lines; `--quick`: 2,000). batchd: one `Spool.rescan()` of
  new/ holding them all. Baseline: an honest minimal loop, per file: open it, parse each line,
  insert the file row, its items and bodies, commit durably (WAL, synchronous=FULL), rename it out
  of new/ into done/ (no directory fsync: a script that does not record the move need not make it
  durable, so the baseline is, if anything, faster than it may safely be).

Each side runs in its own process; peak RSS is measured at two file sizes to show it stays flat.
"""

from __future__ import annotations

import os
import shutil
import sqlite3
import time
from importlib import resources
from pathlib import Path
from typing import Any

import orjson

from .common import MB, Context, Row, fmt_mb, fmt_rate, log, median, store_url, write_small_openai

ROUND_TIMEOUT = 900.0
# Peak RSS may grow by at most this much when the file grows 10×, to count as "not growing".
RSS_FLAT_SLACK = 25 * MB

INSERT_ITEM = (
    "INSERT INTO items (id, file_id, line, custom_id, profile, endpoint, model, size, queued_at)"
    " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)"
)
INSERT_BODY = "INSERT INTO item_bodies (item_id, body) VALUES (?, ?)"
INSERT_FILE = "INSERT INTO files (name, sha256, size, out_name, ingested_at, state) VALUES (?, '', 0, ?, ?, 'open')"
LINE_OVERHEAD = 96  # as batchd.spool.LINE_OVERHEAD
# The baseline's executemany slice: bounded memory, few Python calls.
SLICE = 10_000
SMALL_FILES = 20_000
SMALL_FILES_QUICK = 2_000
SMALL_FILE_LINES = 10


async def batchd_side(source: str, root: str) -> dict[str, Any]:
    from batchd.store import open_store

    from .batchd_setup import ingest_file, make_settings, quiet_logs

    quiet_logs()
    settings = make_settings(Path(root))
    store = open_store(store_url(settings.daemon.database_path), "bench")
    await store.open()
    started = time.perf_counter()
    lines = await ingest_file(settings, store, Path(source))
    seconds = time.perf_counter() - started
    await store.close()
    return {"seconds": seconds, "lines": lines}


def _baseline_db(root: str, schema: str) -> sqlite3.Connection:
    db = sqlite3.connect(Path(root) / "baseline.sqlite3", isolation_level=None)
    db.execute("PRAGMA journal_mode=WAL")
    db.execute("PRAGMA synchronous=FULL")
    db.executescript(schema)
    return db


def _parsed(raw: bytes) -> tuple[str, str, str, bytes, int]:
    """(custom_id, url, model, body, size) of one OpenAI batch line."""
    line = orjson.loads(raw)
    body = orjson.dumps(line["body"])
    url = line["url"]
    return line["custom_id"], url, line["body"]["model"], body, len(body) + len(url) + LINE_OVERHEAD


def _insert(db: sqlite3.Connection, file_id: int, first_id: int, rows: list[tuple[int, bytes]], now: float) -> None:
    items = []
    bodies = []
    for offset, (number, raw) in enumerate(rows):
        custom_id, url, model, body, size = _parsed(raw)
        items.append((first_id + offset, file_id, number, custom_id, "openai", url, model, size, now))
        bodies.append((first_id + offset, body))
    db.executemany(INSERT_ITEM, items)
    db.executemany(INSERT_BODY, bodies)


def baseline_side(source: str, root: str, schema: str) -> dict[str, Any]:
    db = _baseline_db(root, schema)
    now = time.time()
    lines = 0
    started = time.perf_counter()
    db.execute("BEGIN IMMEDIATE")
    file_id = db.execute(INSERT_FILE, ("bench.jsonl", "bench.results.jsonl", now)).lastrowid
    assert file_id is not None
    next_id = db.execute("SELECT COALESCE(MAX(id), 0) + 1 FROM items").fetchone()[0]
    with open(source, "rb") as handle:
        rows: list[tuple[int, bytes]] = []
        for number, raw in enumerate(handle, 1):
            rows.append((number, raw))
            if len(rows) >= SLICE:
                _insert(db, file_id, next_id, rows, now)
                next_id += len(rows)
                rows.clear()
            lines = number
        _insert(db, file_id, next_id, rows, now)
    db.execute("COMMIT")
    seconds = time.perf_counter() - started
    db.close()
    return {"seconds": seconds, "lines": lines}


def baseline_files_side(source: str, root: str, schema: str) -> dict[str, Any]:
    """Per file: open, parse each line, insert, commit durably, rename out of new/."""
    db = _baseline_db(root, schema)
    new, done = Path(source), Path(root) / "done"
    done.mkdir()
    names = sorted(os.listdir(new))
    lines = 0
    started = time.perf_counter()
    next_id = db.execute("SELECT COALESCE(MAX(id), 0) + 1 FROM items").fetchone()[0]
    for name in names:
        now = time.time()
        with open(new / name, "rb") as handle:
            rows = list(enumerate(handle, 1))
        db.execute("BEGIN IMMEDIATE")
        file_id = db.execute(INSERT_FILE, (name, name + ".results", now)).lastrowid
        assert file_id is not None
        _insert(db, file_id, next_id, rows, now)
        db.execute("COMMIT")
        next_id += len(rows)
        lines += len(rows)
        os.rename(new / name, done / name)
    seconds = time.perf_counter() - started
    db.close()
    return {"seconds": seconds, "lines": lines, "files": len(names)}


async def batchd_files_side(source: str, root: str) -> dict[str, Any]:
    """One `Spool.rescan()` of a new/ holding every file (hard links of the shared data)."""
    from batchd.spool import Spool, SpoolPaths
    from batchd.store import open_store

    from .batchd_setup import make_settings, quiet_logs

    quiet_logs()
    settings = make_settings(Path(root))
    SpoolPaths(settings.daemon.spool_dir).create()
    store = open_store(store_url(settings.daemon.database_path), "bench")
    await store.open()
    spool = Spool(settings, store, on_ingest=lambda: None)
    started = time.perf_counter()
    files = await spool.rescan()
    seconds = time.perf_counter() - started
    lines = sum(f.lines for f in await store.open_files())
    await store.close()
    return {"seconds": seconds, "lines": lines, "files": files}


def _schema() -> str:
    """batchd's current SQLite schema: every migration, in order."""
    folder = resources.files("batchd.store").joinpath("sqlite_migrations")
    scripts = sorted((entry.name, entry.read_text()) for entry in folder.iterdir() if entry.name.endswith(".sql"))
    return ";\n".join(text for _, text in scripts)


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


def _link_all(data: Path, target: Path) -> None:
    target.mkdir(parents=True, exist_ok=True)
    for name in os.listdir(data):
        os.link(data / name, target / name)


def _files_round(ctx: Context, data: Path, tag: str, batchd_first: bool) -> tuple[dict[str, Any], dict[str, Any]]:
    results: dict[str, dict[str, Any]] = {}
    order = ("batchd", "baseline") if batchd_first else ("baseline", "batchd")
    for side in order:
        root = ctx.workdir("ingest", f"files-{tag}-{side}")
        try:
            if side == "batchd":
                _link_all(data, root / "spool" / "new")
                results[side] = ctx.zygotes["batchd-core"].run(
                    "bench.ingest:batchd_files_side", ROUND_TIMEOUT, source=str(data), root=str(root)
                )
            else:
                _link_all(data, root / "new")
                results[side] = ctx.zygotes["sqlite"].run(
                    "bench.ingest:baseline_files_side",
                    ROUND_TIMEOUT,
                    source=str(root / "new"),
                    root=str(root),
                    schema=_schema(),
                )
        finally:
            shutil.rmtree(root, ignore_errors=True)
    return results["batchd"], results["baseline"]


def run_files(ctx: Context) -> Row:
    """The many-small-files row: files/s of batchd's rescan vs the per-file baseline loop."""
    count = SMALL_FILES_QUICK if ctx.scale.quick else SMALL_FILES
    data = ctx.workdir("ingest", "files-data")
    for number in range(count):
        write_small_openai(data / f"f{number:06d}.jsonl", SMALL_FILE_LINES)
    log(f"ingest files: {count:,} files of {SMALL_FILE_LINES} lines, {ctx.scale.ingest_rounds} rounds")
    ours_runs: list[dict[str, Any]] = []
    theirs_runs: list[dict[str, Any]] = []
    for number in range(ctx.scale.ingest_rounds):
        ours, theirs = _files_round(ctx, data, f"r{number}", batchd_first=number % 2 == 0)
        for run_ in (ours, theirs):
            if run_["files"] != count or run_["lines"] != count * SMALL_FILE_LINES:
                raise ValueError(f"files ingest took {run_['files']} files, {run_['lines']} lines")
        ours_runs.append(ours)
        theirs_runs.append(theirs)
        log(
            f"  round {number + 1}: batchd {count / ours['seconds']:,.0f} files/s,"
            f" baseline {count / theirs['seconds']:,.0f} files/s"
        )
    shutil.rmtree(data, ignore_errors=True)
    ours_rate = median([count / r["seconds"] for r in ours_runs])
    theirs_rate = median([count / r["seconds"] for r in theirs_runs])
    ratio = median([a["seconds"] / b["seconds"] for a, b in zip(ours_runs, theirs_runs, strict=True)])
    return Row(
        name="ingest small files",
        batchd=fmt_rate(ours_rate, "files/s"),
        baseline=fmt_rate(theirs_rate, "files/s"),
        ratio=ratio,
        target="≥ 1,000 files/s",
        met=ours_rate >= 1000,
        notes=f"{count:,} files of {SMALL_FILE_LINES} lines; baseline: per file open, parse, insert, durable"
        " commit, rename; ratio = batchd time / baseline time, median of paired rounds",
        details={
            "files": count,
            "batchd_seconds": [r["seconds"] for r in ours_runs],
            "baseline_seconds": [r["seconds"] for r in theirs_runs],
            "batchd_cpu_s": [r["cpu_s"] for r in ours_runs],
            "baseline_cpu_s": [r["cpu_s"] for r in theirs_runs],
        },
    )


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
    return [speed, run_files(ctx), memory]
