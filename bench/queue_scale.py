"""Benchmark 7, a queue of 10M requests (`make bench` only): does the cost stay flat as the queue grows?

The same three measurements on a database holding 100,000 queued requests and on one holding
10,000,000, all on batchd's real code paths:
- ingest: `Spool.ingest` of a 100,000-line file on top of the queue (lines/s);
- claim: `Store.claim_batch` of one 20,000-request batch from the route the file on top joined
  (the batcher's claim, one transaction), best of three claims;
- status: a fresh `python -m batchd status --json` process (wall time, the page cache warm: the
  first run is not counted), best of three.
Three rounds, each measuring both sizes in turn (the machine may be shared); medians reported.
The "baseline" of each row is batchd's own figure at 100,000; the target is the 10M figure within
1.5× of it, and `batchd status` under 0.5 s.

Building the databases: the store creates its own schema (`Store.open`, every migration), then
the queue is bulk-inserted straight into that schema with sqlite3 (one transaction,
synchronous=OFF, rows with exactly the columns and values the spool writes: `items`,
`item_bodies`, one `files` row per 100,000 lines, a few routes; then the queue counts are folded
with the statements the store runs in each transaction that inserts items). Going through the spool would
take an hour at 10M; the build is not what is measured, and it is done before any measurement.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import sqlite3
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from .common import Context, Row, fmt_rate, log, median, write_small_openai

SMALL = 100_000
BIG = int(os.environ.get("BATCHD_BENCH_QUEUE_BIG", "10000000"))
PER_FILE = 100_000
ROUNDS = 3
ON_TOP = 100_000
CLAIM = 20_000
ENDPOINT = "/v1/chat/completions"
ROUTES = ("gpt-4o-mini", "gpt-4o", "gpt-4.1-mini", "gpt-4.1-nano")
TARGET_RATIO = 1.5
TARGET_STATUS = 0.5
ROUND_TIMEOUT = 3600.0
# As the spool writes a chat line of bench.common.SMALL_OPENAI: its body, and the per-line overhead.
BODY = (
    b'{"model":"%s","messages":[{"role":"system","content":"Classify the support ticket in one word."},'
    b'{"role":"user","content":"Ticket %07d: my order #%07d has not arrived, what can I do?"}],"max_tokens":16}'
)


def build(root: str, count: int) -> dict[str, Any]:
    """A store under `root` with `count` queued requests (see the module docstring)."""
    from batchd.store import open_store
    from batchd.store.sqlite import Q

    from .batchd_setup import make_settings, quiet_logs

    quiet_logs()
    settings = make_settings(Path(root))
    path = settings.daemon.database_path

    async def create() -> None:
        store = open_store("sqlite:///" + str(path), "bench")
        await store.open()
        await store.close()

    asyncio.run(create())
    started = time.perf_counter()
    db = sqlite3.connect(path, isolation_level=None)
    db.execute("PRAGMA synchronous=OFF")
    db.execute("PRAGMA cache_size=-262144")
    db.execute("BEGIN")
    now = time.time() - 3600
    item_id = 0
    for first in range(0, count, PER_FILE):
        lines = min(PER_FILE, count - first)
        name = f"queued-{first // PER_FILE:05d}.jsonl"
        file_id = db.execute(
            "INSERT INTO files (name, sha256, size, out_name, lines, state, ingested_at, node, lines_committed,"
            " offset_committed, moved_at) VALUES (?, ?, ?, ?, ?, 'open', ?, '', ?, ?, ?)",
            (name, f"{first:064x}", lines * 300, name.replace(".jsonl", ""), lines, now, lines, lines * 300, now),
        ).lastrowid
        items = []
        bodies = []
        for line in range(1, lines + 1):
            item_id += 1
            n = first + line
            model = ROUTES[n % len(ROUTES)]
            body = BODY % (model.encode(), n, 100_000 + n)
            size = len(body) + 96
            items.append((item_id, file_id, line, f"req-{n:08d}", "openai", ENDPOINT, model, size, 30, now))
            bodies.append((item_id, body))
        db.executemany(
            "INSERT INTO items (id, file_id, line, custom_id, profile, endpoint, model, size, tokens, queued_at)"
            " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            items,
        )
        db.executemany("INSERT INTO item_bodies (item_id, body) VALUES (?, ?)", bodies)
    # The store folds the items each transaction inserts into the queue counts (migration 014), in
    # that transaction; the bulk insert did not, so the whole queue is folded once here, as one chunk,
    # with the store's own statements.
    db.execute(Q.fold_queued_counts)
    db.execute(Q.advance_queued_counts_mark)
    db.execute("COMMIT")
    # No ANALYZE: batchd never runs it, and its statistics (10M NULL batch_ids) would change the plans.
    db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    db.close()
    return {"seconds": time.perf_counter() - started, "bytes": path.stat().st_size}


async def measure(root: str, source: str, name: str) -> dict[str, Any]:
    """Ingest a file on top, then claim: the store as the daemon opens it."""
    from batchd.store import open_store
    from batchd.store.contract import Group

    from .batchd_setup import ingest_file, make_settings, quiet_logs

    quiet_logs()
    settings = make_settings(Path(root))
    store = open_store("sqlite:///" + str(settings.daemon.database_path), "bench")
    await store.open()
    try:
        started = time.perf_counter()
        lines = await ingest_file(settings, store, Path(source), name=name)
        ingest = time.perf_counter() - started
        # Reported, not a target: the batcher's per-tick look at the queue (every route, due items).
        began = time.perf_counter()
        await store.queued_groups(time.time())
        groups = time.perf_counter() - began
        claims = []
        for _ in range(3):
            group = Group("openai", ENDPOINT, ROUTES[0], 0, 0, 0.0)
            began = time.perf_counter()
            batch = await store.claim_batch(group, "openai", CLAIM, 1 << 40, time.time())
            claims.append(time.perf_counter() - began)
            if batch is None or batch.requests != CLAIM:
                raise RuntimeError(f"claimed {batch.requests if batch else 0} requests, expected {CLAIM}")
    finally:
        await store.close()
    return {"ingest_seconds": ingest, "lines": lines, "claim_seconds": claims, "queued_groups_seconds": groups}


def status_times(root: Path, rounds: int = 4) -> tuple[list[float], dict[str, Any]]:
    """Wall time of fresh `batchd status --json` processes (the first warms the page cache)."""
    config = root / "batchd.toml"
    config.write_text(
        f'[daemon]\nspool_dir = "{root / "spool"}"\nstate_dir = "{root / "state"}"\n\n'
        '[providers.openai]\nkind = "openai"\napi_key = "sk-bench"\n'
    )
    times = []
    out = b""
    for _ in range(rounds):
        began = time.perf_counter()
        out = subprocess.run(
            [sys.executable, "-m", "batchd", "status", "--json", "--config", str(config)],
            check=True,
            capture_output=True,
        ).stdout
        times.append(time.perf_counter() - began)
    import orjson

    data: dict[str, Any] = orjson.loads(out)
    return times[1:], data


def _queued(data: dict[str, Any]) -> int:
    return sum(int(row["queued"]) + int(row["batched"]) for row in data["queue"])


def run(ctx: Context) -> list[Row]:
    if ctx.scale.quick:
        return []  # `make bench` only: the 10M database takes minutes to build
    source = ctx.workdir("queue_scale", "data") / "on-top.jsonl"
    write_small_openai(source, ON_TOP)
    roots = {count: ctx.workdir("queue_scale", f"q{count}") for count in (SMALL, BIG)}
    runs: dict[int, list[dict[str, Any]]] = {SMALL: [], BIG: []}
    try:
        for count, root in roots.items():
            built = ctx.zygotes["batchd-core"].run(
                "bench.queue_scale:build", ROUND_TIMEOUT, root=str(root), count=count
            )
            log(f"queue_scale: {count:,} queued built in {built['seconds']:.0f} s ({built['bytes'] / 2**30:.1f} GiB)")
            times, before = status_times(root)
            if _queued(before) != count:
                raise RuntimeError(f"batchd status counts {_queued(before):,} queued, expected {count:,}")
        # Rounds interleave the two sizes, so that the load of a shared machine falls on both alike.
        for number in range(ROUNDS):
            for count, root in roots.items():
                measured = ctx.zygotes["batchd-core"].run(
                    "bench.queue_scale:measure",
                    ROUND_TIMEOUT,
                    root=str(root),
                    source=str(source),
                    name=f"on-top-{number}.jsonl",
                )
                times, after = status_times(root)
                expected = count + ON_TOP * (number + 1)
                if _queued(after) != expected:
                    raise RuntimeError(f"batchd status counts {_queued(after):,} queued or batched, not {expected:,}")
                run_ = {
                    **measured,
                    "status": min(times),
                    "claim": min(measured["claim_seconds"]),
                    "rate": measured["lines"] / measured["ingest_seconds"],
                }
                runs[count].append(run_)
                log(
                    f"  round {number + 1}, {count:,} queued: ingest {run_['rate']:,.0f} lines/s,"
                    f" claim {run_['claim'] * 1000:.0f} ms, status {run_['status'] * 1000:.0f} ms"
                )
    finally:
        for root in roots.values():
            shutil.rmtree(root, ignore_errors=True)
    figures = {
        count: {key: median([r[key] for r in rounds]) for key in ("status", "claim", "rate", "queued_groups_seconds")}
        | {"rounds": rounds}
        for count, rounds in runs.items()
    }
    small, big = figures[SMALL], figures[BIG]
    size = f"{BIG / 1e6:g}M vs {SMALL / 1e3:g}k queued"
    ingest_ratio = small["rate"] / big["rate"]
    claim_ratio = big["claim"] / small["claim"]
    status_ratio = big["status"] / small["status"]
    details = {"small": small, "big": big, "small_count": SMALL, "big_count": BIG}
    return [
        Row(
            name="queue 10M: ingest",
            batchd=fmt_rate(big["rate"], "lines/s"),
            baseline=fmt_rate(small["rate"], "lines/s"),
            ratio=ingest_ratio,
            target=f"≤ {TARGET_RATIO}",
            met=ingest_ratio <= TARGET_RATIO,
            notes=f"Spool.ingest of {ON_TOP:,} lines on top of the queue, median of {ROUNDS} interleaved rounds,"
            f" {size}; ratio = time at 10M / at 100k",
            details=details,
        ),
        Row(
            name="queue 10M: claim",
            batchd=f"{big['claim'] * 1000:.0f} ms",
            baseline=f"{small['claim'] * 1000:.0f} ms",
            ratio=claim_ratio,
            target=f"≤ {TARGET_RATIO}",
            met=claim_ratio <= TARGET_RATIO,
            notes=f"Store.claim_batch of {CLAIM:,} requests, median of rounds of best of 3, {size}; the batcher's"
            " queued_groups"
            f" (reported, not a target): {big['queued_groups_seconds'] * 1000:.0f} vs"
            f" {small['queued_groups_seconds'] * 1000:.0f} ms",
            details={},
        ),
        Row(
            name="queue 10M: status",
            batchd=f"{big['status'] * 1000:.0f} ms",
            baseline=f"{small['status'] * 1000:.0f} ms",
            ratio=status_ratio,
            target=f"≤ {TARGET_RATIO}, ≤ {TARGET_STATUS} s",
            met=status_ratio <= TARGET_RATIO and big["status"] <= TARGET_STATUS,
            notes=f"a fresh `python -m batchd status --json` process, page cache warm, median of rounds of best of 3,"
            f" {size}",
            details={},
        ),
    ]
