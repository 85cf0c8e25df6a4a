"""Benchmark: poll/collect latency while a large file is being ingested, against the same loop idle.

A poller's store traffic is a write (`record_poll`: the provider's latest answer) and a read
(`results_after`: what a sink delivers next). Both run here in a loop, in the same process and on
the same store as a spool that ingests a 1M-line file (`--quick`: 100k), and each iteration's
latency is timed. The baseline is the same loop on the same store with no ingest running. When an
ingest holds the store for a whole file (the old all-in-one-transaction intake), every poll waits
until the file is done; with chunked ingest a poll waits at most for one chunk. On SQLite that
chunk (2,000 lines, the unit tests/test_crash.py pins) is one write transaction of the single
writer, so the loaded latency cannot fall below about half a chunk's insert time plus the poll's own
FULL commit, whatever the intake does around it.

Works on the old store (`Store(path)`) and on the contract (`open_store(url, node)`), so the row
can be measured before and after the store split.
"""

from __future__ import annotations

import asyncio
import shutil
import time
from pathlib import Path
from typing import Any

from .common import MB, Context, Row, log, median, write_small_openai

ROUND_TIMEOUT = 1800.0
ROUNDS = 2
# The idle loop's length; the loaded loop runs for as long as the ingest does.
IDLE_SAMPLES = 400
# A poller does not spin: it sleeps between polls. Short, so an ingest of a few seconds gets samples.
POLL_GAP = 0.005
# The row's target: the loaded p99 at most this many times the idle p99.
TARGET_RATIO = 2.0
SETUP_VALID = 50
SETUP_INVALID = 100


def percentile(values: list[float], fraction: float) -> float:
    """Nearest-rank percentile; nan for no values."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    rank = max(0, min(len(ordered) - 1, round(fraction * len(ordered) + 0.5) - 1))
    return ordered[rank]


async def _open(root: Path) -> Any:
    """The store under `root`: the contract's `open_store` where it exists, else the old class."""
    from .batchd_setup import make_settings

    path = make_settings(root).daemon.state_dir / "batchd.sqlite3"
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        from batchd.store import open_store  # type: ignore[attr-defined,unused-ignore]
    except ImportError:
        from batchd.store import Store

        store: Any = Store(path)
    else:
        from .common import store_url

        store = open_store(store_url(path), node="bench")
    await store.open()
    return store


async def _live_batch(root: Path, store: Any) -> int:
    """A submitted batch to poll and some results to read, made through the spool and the queue."""
    from .batchd_setup import ingest_file, make_settings

    setup = root / "setup.jsonl"
    write_small_openai(setup, SETUP_VALID)
    with setup.open("ab") as handle:
        handle.write(b"not json\n" * SETUP_INVALID)  # each an invalid result, for results_after to read
    await ingest_file(make_settings(root), store, setup, name="setup.jsonl")
    now = time.time()
    [group] = await store.queued_groups(now)
    batch = await store.claim_batch(group, "openai", 10_000, 10**9, now)
    assert batch is not None
    await store.mark_submitted(batch.id, "batch_bench", "in_progress", now)
    return int(batch.id)


async def _poll_once(store: Any, batch_id: int, number: int, split: list[tuple[float, float]]) -> float:
    """One poll: the write, then the read; their latencies apart go to `split` (where the time goes)."""
    started = time.perf_counter()
    await store.record_poll(
        batch_id, "in_progress", {"total": SETUP_VALID, "completed": number % SETUP_VALID, "failed": 0}, None, None
    )
    written = time.perf_counter()
    results = await store.results_after(0, 100)
    elapsed = time.perf_counter() - started
    split.append((written - started, elapsed - (written - started)))
    assert len(results) == SETUP_INVALID
    return elapsed


async def measure(source: str, root: str) -> dict[str, Any]:
    """One round: the idle loop, then the same loop while `source` is ingested."""
    from .batchd_setup import ingest_file, make_settings, quiet_logs

    quiet_logs()
    base = Path(root)
    store = await _open(base)
    try:
        batch_id = await _live_batch(base, store)
        idle_split: list[tuple[float, float]] = []
        idle = [await _poll_once(store, batch_id, n, idle_split) for n in range(IDLE_SAMPLES)]
        loaded: list[float] = []
        loaded_split: list[tuple[float, float]] = []
        started = time.perf_counter()
        ingest = asyncio.create_task(ingest_file(make_settings(base), store, Path(source)))
        await asyncio.sleep(0)  # the ingest starts before the first loaded sample
        number = 0
        while not ingest.done():
            loaded.append(await _poll_once(store, batch_id, number, loaded_split))
            number += 1
            await asyncio.sleep(POLL_GAP)
        lines = await ingest
        ingest_seconds = time.perf_counter() - started
    finally:
        await store.close()
    return {
        "idle": idle,
        "loaded": loaded,
        "loaded_write_p50": percentile([w for w, _ in loaded_split], 0.5),
        "loaded_read_p50": percentile([r for _, r in loaded_split], 0.5),
        "idle_write_p50": percentile([w for w, _ in idle_split], 0.5),
        "idle_read_p50": percentile([r for _, r in idle_split], 0.5),
        "lines": lines,
        "ingest_seconds": ingest_seconds,
    }


def _ms(seconds: float) -> str:
    return f"{seconds * 1000:.1f} ms"


def run(ctx: Context) -> list[Row]:
    lines = ctx.scale.ingest_lines
    data = ctx.workdir("ingest_poll", "data")
    source = data / "large.jsonl"
    size = write_small_openai(source, lines)
    log(f"ingest_poll: {lines:,} lines ({size / MB:.0f} MB), {ROUNDS} rounds")
    rounds: list[dict[str, Any]] = []
    for number in range(ROUNDS):
        root = ctx.workdir("ingest_poll", f"r{number}")
        try:
            result = ctx.zygotes["batchd-core"].run(
                "bench.ingest_poll:measure", ROUND_TIMEOUT, source=str(source), root=str(root)
            )
        finally:
            shutil.rmtree(root, ignore_errors=True)
        if result["lines"] != lines:
            raise ValueError(f"ingest counted {result['lines']} lines, not {lines}")
        rounds.append(result)
        log(
            f"  round {number + 1}: ingest {result['ingest_seconds']:.1f} s, {len(result['loaded'])} polls meanwhile;"
            f" p50 {_ms(percentile(result['loaded'], 0.5))} / idle {_ms(percentile(result['idle'], 0.5))},"
            f" p99 {_ms(percentile(result['loaded'], 0.99))} / idle {_ms(percentile(result['idle'], 0.99))};"
            f" p50 write {_ms(result['loaded_write_p50'])}, read {_ms(result['loaded_read_p50'])}"
        )
    shutil.rmtree(data, ignore_errors=True)
    loaded_p50 = median([percentile(r["loaded"], 0.5) for r in rounds])
    loaded_p99 = median([percentile(r["loaded"], 0.99) for r in rounds])
    idle_p50 = median([percentile(r["idle"], 0.5) for r in rounds])
    idle_p99 = median([percentile(r["idle"], 0.99) for r in rounds])
    ratio = loaded_p99 / idle_p99 if idle_p99 > 0 else None
    return [
        Row(
            name="poll during ingest",
            batchd=f"p50 {_ms(loaded_p50)}, p99 {_ms(loaded_p99)}",
            baseline=f"p50 {_ms(idle_p50)}, p99 {_ms(idle_p99)}",
            ratio=ratio,
            target=f"≤ {TARGET_RATIO:g}",
            met=ratio is not None and ratio <= TARGET_RATIO,
            notes=f"record_poll + results_after latency while {lines:,} lines ({size / MB:.0f} MB) are ingested"
            f" in the same process (batchd) vs the same loop idle (baseline); ratio = p99 / idle p99,"
            f" median of {ROUNDS} rounds",
            details={
                "lines": lines,
                "bytes": size,
                "ingest_seconds": [r["ingest_seconds"] for r in rounds],
                "polls_during_ingest": [len(r["loaded"]) for r in rounds],
                "loaded_p50": [percentile(r["loaded"], 0.5) for r in rounds],
                "loaded_p99": [percentile(r["loaded"], 0.99) for r in rounds],
                "loaded_max": [max(r["loaded"], default=float("nan")) for r in rounds],
                "idle_p50": [percentile(r["idle"], 0.5) for r in rounds],
                "idle_p99": [percentile(r["idle"], 0.99) for r in rounds],
                "loaded_write_p50": [r["loaded_write_p50"] for r in rounds],
                "loaded_read_p50": [r["loaded_read_p50"] for r in rounds],
                "idle_write_p50": [r["idle_write_p50"] for r in rounds],
                "idle_read_p50": [r["idle_read_p50"] for r in rounds],
            },
        )
    ]
