"""Benchmark 3, collect: a completed batch's output file streamed into SQLite and the outbox.

batchd: `Pollers._collect` (download to disk, parse and classify every line, apply outcomes to
SQLite in chunks, requeue the unanswered) with the sink runner delivering every result line into
`spool/out/NAME.results.jsonl` alongside, woken by each results commit as in the daemon, on a copy
of a store whose batch the emulator has completed; timed until the results file is complete.
Baseline: what any script that collects a batch must do, and nothing more: download the output file
with the SDK, parse each line (orjson), join it to its request by custom_id (one dict lookup in a
map of the script's requests, built before the clock starts, as a script holds its requests), and
write the results file (one line per request: its own custom_id and line, status, response, error)
in one buffered write, flushed and fsynced once. It keeps no database, so it survives no crash:
that durability is what batchd's extra time buys.

Floor (details only, not a side of the ratio): batchd's store writes alone, `record_outcomes` for
the same chunks of the same 50k outcomes (decided before its clock starts), on a fresh copy of the
store: the inserts, state updates and body deletes with their commits and fsyncs, and nothing else.
Its ratio to the baseline is the least batchd's collect can reach with its present schema and statements.
"""

from __future__ import annotations

import asyncio
import shutil
import sqlite3
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson

from .common import (
    API_KEY_OPENAI,
    MB,
    Context,
    EmulatorProcess,
    Row,
    count_lines,
    count_matching_lines,
    fmt_mb,
    fmt_rate,
    log,
    median,
    write_durably,
    write_small_openai,
)


@dataclass
class _Collecting:
    """What both batchd-side runs start from (see _collecting)."""

    settings: Any
    store: Any
    providers: Any
    pollers: Any
    workdir: Path
    batch: Any
    remote: Any


ROUND_TIMEOUT = 600.0
PROCESSING = 0.5


async def _collecting(template: str, root: str, openai_url: str, on_results: Callable[[], None]) -> _Collecting:
    """A copy of the template store with its one submitted batch, and the daemon's pollers over it."""
    from batchd.crashpoints import CrashPoints
    from batchd.poller import Pollers
    from batchd.providers import ProviderPool
    from batchd.store import open_store
    from batchd.store.contract import BatchState

    from .batchd_setup import install_database, make_settings, quiet_logs

    quiet_logs()
    base = Path(root)
    settings = make_settings(base, openai_url)
    store = open_store("sqlite:///" + str(install_database(Path(template), base)), "bench")
    await store.open()
    workdir = base / "work"
    workdir.mkdir()
    providers = ProviderPool(settings.providers)
    pollers = Pollers(
        settings,
        store,
        providers,
        workdir,
        on_results=on_results,
        on_requeued=lambda: None,
        crashpoints=CrashPoints(""),
    )
    (batch,) = await store.batches_in_state(BatchState.SUBMITTED)
    assert batch.remote_id is not None
    remote = await providers.get(batch.profile).retrieve(batch.remote_id)
    return _Collecting(settings, store, providers, pollers, workdir, batch, remote)


async def batchd_side(template: str, root: str, openai_url: str) -> dict[str, Any]:
    from batchd.sinks import SinkRunner
    from batchd.sinks.outbox import OutboxSink
    from batchd.spool import SpoolPaths

    wake: list[Callable[[], None]] = []
    run = await _collecting(template, root, openai_url, lambda: wake[0]())
    # The daemon makes its spool at start-up; the outbox writes only below a spool that exists.
    SpoolPaths(run.settings.daemon.spool_dir).create()
    out_dir = run.settings.daemon.spool_dir / "out"
    outbox = OutboxSink(run.store, out_dir)
    sinks = SinkRunner(run.store, [outbox])
    wake.append(sinks.wake)  # as the daemon wires them
    await sinks.recover()
    stopping = asyncio.Event()
    started = time.perf_counter()
    delivering = asyncio.create_task(sinks.run(stopping))
    await run.pollers._collect(run.batch, run.remote, set())
    stopping.set()
    await delivering
    await sinks._deliver_pending(outbox)  # what was committed after the runner's last round
    seconds = time.perf_counter() - started
    await run.providers.close()
    await run.store.close()
    results = out_dir / "bench.results.jsonl"
    exists = results.exists()
    return {
        "seconds": seconds,
        "lines": count_lines(results) if exists else 0,
        "succeeded": count_matching_lines(results, b'"status":"succeeded"') if exists else 0,
    }


async def floor_side(template: str, root: str, openai_url: str) -> dict[str, Any]:
    from batchd.policy import index_outcomes
    from batchd.poller import APPLY_CHUNK
    from batchd.providers.base import ResultsReport
    from batchd.store.contract import FinalResult, Retry

    run = await _collecting(template, root, openai_url, lambda: None)
    settings, store, providers, pollers, batch, remote = (
        run.settings, run.store, run.providers, run.pollers, run.batch, run.remote
    )  # fmt: skip
    instance = await store.instance_id()
    pollers._instance = instance
    cost_of = settings.price_table().cost_of(batch.model, settings.providers[batch.profile].batch_discount)
    # Decided as _apply_all decides them, before the clock: only the store's writes are timed.
    waiting = {item.id: item for item in await store.submitted_items(batch.id)}
    decided: list[tuple[list[FinalResult], list[Retry], list[int]]] = []
    async for outcomes in providers.get(batch.profile).results(remote, run.workdir, ResultsReport(), APPLY_CHUNK):
        by_item, _ = index_outcomes(outcomes, instance)
        items = [waiting.pop(item_id) for item_id in sorted(by_item) if item_id in waiting]
        finals, retries, handovers, _ = pollers._decide(batch, items, by_item, pollers._retry_at, cost_of, None)
        decided.append((finals, retries, handovers))
    started, cpu = time.perf_counter(), time.process_time()
    recorded = 0
    for finals, retries, handovers in decided:
        recorded += (await store.record_outcomes(batch.id, finals, retries, handovers)).final
    seconds, cpu = time.perf_counter() - started, time.process_time() - cpu
    await providers.close()
    await store.close()
    return {"seconds": seconds, "store_cpu_s": cpu, "lines": recorded}


async def baseline_side(file_id: str, base_url: str, target: str, requests: str) -> dict[str, Any]:
    import openai
    import orjson

    # The script's own requests, by the custom_id it sent: (its request's custom_id, its line).
    by_custom_id: dict[str, tuple[str, int]] = {
        sent: (mine, line) for sent, mine, line in orjson.loads(Path(requests).read_bytes())
    }
    started = time.perf_counter()
    client = openai.AsyncOpenAI(api_key=API_KEY_OPENAI, base_url=base_url)
    content = await client.files.content(file_id)
    data = content.content
    out: list[bytes] = []
    dumps = orjson.dumps
    for raw in data.splitlines():
        line = orjson.loads(raw)
        mine, number = by_custom_id[line["custom_id"]]
        response = line.get("response") or {}
        ok = response.get("status_code") == 200
        out.append(
            dumps(
                {
                    "custom_id": mine,
                    "line": number,
                    "status": "succeeded" if ok else "errored",
                    "response": response.get("body") if ok else None,
                    "error": line.get("error") or (None if ok else response.get("body")),
                }
            )
        )
    out.append(b"")
    write_durably(Path(target), b"\n".join(out))
    seconds = time.perf_counter() - started
    await client.close()
    return {"seconds": seconds, "lines": len(out) - 1, "bytes": len(data)}


def write_request_map(database: Path, target: Path) -> None:
    """[[custom_id sent, the request's own custom_id, line], ...] for the baseline's join."""
    from batchd.formats import provider_custom_id

    db = sqlite3.connect(database)
    try:
        (instance,) = db.execute("SELECT value FROM meta WHERE key = 'instance'").fetchone()
        rows = db.execute("SELECT id, custom_id, line FROM items ORDER BY id").fetchall()
    finally:
        db.close()
    target.write_bytes(orjson.dumps([[provider_custom_id(i, instance), mine, line] for i, mine, line in rows]))


async def _completed_store(root: Path, source: Path, openai_url: str, timeout: float) -> tuple[Path, str]:
    """A store whose one batch the emulator has completed; returns (database, output file id)."""
    from batchd.batcher import Batcher
    from batchd.crashpoints import CrashPoints
    from batchd.providers import ProviderPool
    from batchd.store import open_store

    from .batchd_setup import ingest_file, make_settings

    settings = make_settings(root, openai_url)
    store = open_store("sqlite:///" + str(settings.daemon.database_path), "bench")
    await store.open()
    providers = ProviderPool(settings.providers)
    try:
        await ingest_file(settings, store, source)
        workdir = root / "work"
        workdir.mkdir()
        batcher = Batcher(settings, store, providers, workdir, lambda _id: None, CrashPoints(""))
        await batcher.recover()
        now = time.time()
        (group,) = await store.queued_groups(now)
        batch = await store.claim_batch(group, "openai", 50_000, 200_000_000, now)
        assert batch is not None
        await batcher._submit(batch)
        submitted = await store.batch(batch.id)
        assert submitted is not None and submitted.remote_id is not None
        provider = providers.get("openai")
        deadline = time.monotonic() + timeout
        while True:
            remote = await provider.retrieve(submitted.remote_id)
            if remote.ended and not remote.results_pending:
                break
            if time.monotonic() > deadline:
                raise TimeoutError(f"emulator batch still {remote.status} after {timeout:.0f} s")
            await asyncio.sleep(0.1)
        if remote.status != "completed" or not remote.output_file_id:
            raise RuntimeError(f"emulator batch ended {remote.status} without an output file")
        return settings.daemon.database_path, remote.output_file_id
    finally:
        await providers.close()
        await store.close()


def run(ctx: Context) -> list[Row]:
    from .batchd_setup import quiet_logs
    from .worker import run_loop

    quiet_logs()
    scale = ctx.scale
    count = scale.collect_lines
    source = ctx.workdir("collect", "data") / "requests.jsonl"
    write_small_openai(source, count)
    with EmulatorProcess(ctx.workdir("collect", "emulator"), PROCESSING) as emulator:
        template, file_id = run_loop(
            _completed_store(ctx.workdir("collect", "template"), source, emulator.openai_base_url, 300.0)
        )
        request_map = ctx.workdir("collect", "data") / "requests.map.json"
        write_request_map(template, request_map)
        log(f"collect: {count:,} result lines, {scale.collect_rounds} rounds")
        ours: list[dict[str, Any]] = []
        theirs: list[dict[str, Any]] = []
        floors: list[dict[str, Any]] = []
        for number in range(scale.collect_rounds):
            order = ("batchd", "baseline") if number % 2 == 0 else ("baseline", "batchd")
            for side in order:
                root = ctx.workdir("collect", f"r{number}-{side}")
                try:
                    if side == "batchd":
                        ours.append(
                            ctx.zygotes["batchd-openai"].run(
                                "bench.collect:batchd_side",
                                ROUND_TIMEOUT,
                                template=str(template),
                                root=str(root),
                                openai_url=emulator.openai_base_url,
                            )
                        )
                    else:
                        theirs.append(
                            ctx.zygotes["openai"].run(
                                "bench.collect:baseline_side",
                                ROUND_TIMEOUT,
                                file_id=file_id,
                                base_url=emulator.openai_base_url,
                                target=str(root / "output.jsonl"),
                                requests=str(request_map),
                            )
                        )
                finally:
                    shutil.rmtree(root, ignore_errors=True)
            root = ctx.workdir("collect", f"r{number}-floor")
            try:
                floors.append(
                    ctx.zygotes["batchd-openai"].run(
                        "bench.collect:floor_side",
                        ROUND_TIMEOUT,
                        template=str(template),
                        root=str(root),
                        openai_url=emulator.openai_base_url,
                    )
                )
            finally:
                shutil.rmtree(root, ignore_errors=True)
            log(
                f"  round {number + 1}: batchd {ours[-1]['seconds']:.2f} s, baseline {theirs[-1]['seconds']:.2f} s,"
                f" floor (record_outcomes alone) {floors[-1]['seconds']:.2f} s,"
                f" peak RSS {ours[-1]['peak_rss'] / MB:.0f} / {theirs[-1]['peak_rss'] / MB:.0f} MB"
            )
    shutil.rmtree(ctx.root / "collect", ignore_errors=True)
    for result in ours:
        if result["lines"] != count or result["succeeded"] != count:
            raise RuntimeError(f"batchd wrote {result['lines']} result lines ({result['succeeded']} succeeded)")
    if any(result["lines"] != count for result in theirs):
        raise RuntimeError(f"baseline downloaded {[r['lines'] for r in theirs]} lines, expected {count}")
    if any(result["lines"] != count for result in floors):
        raise RuntimeError(f"floor recorded {[r['lines'] for r in floors]} results, expected {count}")
    ratio = median([a["seconds"] / b["seconds"] for a, b in zip(ours, theirs, strict=True)])
    floor = median([a["seconds"] / b["seconds"] for a, b in zip(floors, theirs, strict=True)])
    output_bytes = theirs[0]["bytes"]
    return [
        Row(
            name="collect",
            batchd=fmt_rate(count / median([r["seconds"] for r in ours]), "results/s"),
            baseline=fmt_rate(count / median([r["seconds"] for r in theirs]), "results/s"),
            ratio=ratio,
            target="≤ 1.5",
            met=ratio <= 1.5,
            notes=f"{count:,}-line output file ({output_bytes / MB:.0f} MB): download + SQLite + outbox vs download"
            f" + parse + join + one durable write; peak RSS {fmt_mb(median([r['peak_rss'] for r in ours]))}"
            f" vs {fmt_mb(median([r['peak_rss'] for r in theirs]))}; floor: record_outcomes alone on the same"
            f" outcomes {floor:.2f}× the baseline",
            details={
                "lines": count,
                "output_bytes": output_bytes,
                "batchd_seconds": [r["seconds"] for r in ours],
                "baseline_seconds": [r["seconds"] for r in theirs],
                "batchd_cpu_s": [r["cpu_s"] for r in ours],
                "baseline_cpu_s": [r["cpu_s"] for r in theirs],
                "batchd_peak_rss": [r["peak_rss"] for r in ours],
                "baseline_peak_rss": [r["peak_rss"] for r in theirs],
                "floor_ratio": floor,
                "floor_seconds": [r["seconds"] for r in floors],
                "floor_cpu_s": [r["store_cpu_s"] for r in floors],  # both threads, within its clock
            },
        )
    ]
