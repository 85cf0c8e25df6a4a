"""Benchmark 4, end to end: one spool file of requests through to its final results file.

batchd: the daemon itself (`python -m batchd run`, a subprocess), a producer renaming the file into
spool/new/; timed from the rename to the appearance of spool/out/NAME.results.jsonl.
Baseline: a direct-SDK script in the style of the providers' cookbooks: split the file into
50,000-line files, upload and create each, poll at the same interval, download, write the results.
Both against the same emulator subprocess, whose batches take a fixed processing time.
"""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path
from typing import Any, Final

from .common import (
    API_KEY_OPENAI,
    MB,
    Context,
    DaemonProcess,
    EmulatorProcess,
    Row,
    count_lines,
    count_matching_lines,
    cpu_between,
    cpu_reading,
    fmt_mb,
    fmt_seconds,
    log,
    median,
    paired_seconds,
    proc_status,
    wait_for,
    write_daemon_config,
    write_small_openai,
)

LINES_PER_FILE = 50_000
ENDPOINT: Final = "/v1/chat/completions"
TERMINAL = ("completed", "failed", "expired", "cancelled")


def baseline_side(source: str, root: str, base_url: str, poll_seconds: float, timeout: float) -> dict[str, Any]:
    """The cookbook: split, upload, create, poll, download, write (synchronous client)."""
    import openai

    started = time.perf_counter()
    client = openai.OpenAI(api_key=API_KEY_OPENAI, base_url=base_url)
    base = Path(root)
    parts: list[Path] = []
    with open(source, "rb") as handle:
        out = None
        for number, line in enumerate(handle):
            if number % LINES_PER_FILE == 0:
                if out is not None:
                    out.close()
                parts.append(base / f"part-{len(parts)}.jsonl")
                out = parts[-1].open("wb")
            assert out is not None
            out.write(line)
        if out is not None:
            out.close()
    split = time.perf_counter() - started
    batch_ids = []
    for part in parts:
        with part.open("rb") as upload:
            uploaded = client.files.create(file=upload, purpose="batch")
        batch = client.batches.create(input_file_id=uploaded.id, endpoint=ENDPOINT, completion_window="24h")
        batch_ids.append(batch.id)
    created = time.perf_counter() - started
    finished: dict[str, Any] = {}
    deadline = time.monotonic() + timeout
    while len(finished) < len(batch_ids):
        for batch_id in batch_ids:
            if batch_id not in finished:
                batch = client.batches.retrieve(batch_id)
                if batch.status in TERMINAL:
                    finished[batch_id] = batch
        if len(finished) < len(batch_ids):
            if time.monotonic() > deadline:
                raise TimeoutError("batches did not end")
            time.sleep(poll_seconds)
    ended = time.perf_counter() - started
    results = base / "results.jsonl"
    with results.open("wb") as out:
        for batch_id in batch_ids:
            batch = finished[batch_id]
            for file_id in (batch.output_file_id, batch.error_file_id):
                if file_id:
                    out.write(client.files.content(file_id).content)
    seconds = time.perf_counter() - started
    client.close()
    milestones = {"split": round(split, 2), "last_created": round(created, 2), "all_ended": round(ended, 2)}
    return {"seconds": seconds, "lines": count_lines(results), "batches": len(batch_ids), "milestones": milestones}


def _daemon_round(ctx: Context, emulator: EmulatorProcess, source: Path, root: Path, timeout: float) -> dict[str, Any]:
    scale = ctx.scale
    config = write_daemon_config(
        root,
        emulator,
        batching={"max_wait": 0.25, "poll_interval_min": scale.e2e_poll, "poll_interval_max": scale.e2e_poll},
        openai={},
    )
    daemon = DaemonProcess(config, root / "daemon.log")
    try:
        daemon.wait_ready()
        spool = root / "spool"
        staged = spool / "tmp" / "bench.jsonl"
        os.link(source, staged)
        cpu_before = cpu_reading(daemon.pid)
        started_at = time.time()
        started = time.perf_counter()
        os.rename(staged, spool / "new" / "bench.jsonl")
        results = spool / "out" / "bench.results.jsonl"

        def arrived() -> bool:
            daemon.check_alive()
            return results.exists()

        wait_for(arrived, timeout, "results file", interval=0.02)
        seconds = time.perf_counter() - started
        cpu = cpu_between(cpu_before, cpu_reading(daemon.pid))
        status = proc_status(daemon.pid)
        # The critical path: the last batch can only be claimed once the file's last line is queued.
        milestones = {
            name: round(max(times) - started_at, 2) if (times := daemon.event_times(event)) else None
            for name, event in (
                ("ingested", "spool.ingested"),
                ("last_submitted", "batch.submitted"),
                ("last_collected", "batch.collected"),
            )
        }
    finally:
        daemon.stop()
    return {
        "milestones": milestones,
        "seconds": seconds,
        "cpu_s": cpu,
        "peak_rss": status["VmHWM"],
        "end_rss": status["VmRSS"],
        "lines": count_lines(results),
        "succeeded": count_matching_lines(results, b'"status":"succeeded"'),
        "batches": daemon.events("batch.submitted"),
    }


def _path(milestones: dict[str, Any]) -> str:
    return ", ".join(f"{name} {value}" for name, value in milestones.items() if value is not None)


def run(ctx: Context) -> list[Row]:
    scale = ctx.scale
    count = scale.e2e_lines
    source = ctx.workdir("e2e", "data") / "requests.jsonl"
    size = write_small_openai(source, count)
    timeout = 120 + scale.e2e_processing * 4 + count / 1000
    log(
        f"e2e: {count:,} requests ({size / MB:.0f} MB), {scale.e2e_processing:g} s per batch,"
        f" poll every {scale.e2e_poll:g} s, {scale.e2e_rounds} rounds"
    )
    ours: list[dict[str, Any]] = []
    theirs: list[dict[str, Any]] = []
    with EmulatorProcess(ctx.workdir("e2e", "emulator"), scale.e2e_processing) as emulator:
        for number in range(scale.e2e_rounds):
            order = ("batchd", "baseline") if number % 2 == 0 else ("baseline", "batchd")
            for side in order:
                root = ctx.workdir("e2e", f"r{number}-{side}")
                try:
                    if side == "batchd":
                        ours.append(_daemon_round(ctx, emulator, source, root, timeout))
                    else:
                        theirs.append(
                            ctx.zygotes["openai"].run(
                                "bench.e2e:baseline_side",
                                timeout + 30,
                                source=str(source),
                                root=str(root),
                                base_url=emulator.openai_base_url,
                                poll_seconds=scale.e2e_poll,
                                timeout=timeout,
                            )
                        )
                finally:
                    shutil.rmtree(root, ignore_errors=True)
            log(
                f"  round {number + 1}: batchd {ours[-1]['seconds']:.2f} s, baseline {theirs[-1]['seconds']:.2f} s,"
                f" peak RSS {ours[-1]['peak_rss'] / MB:.0f} / {theirs[-1]['peak_rss'] / MB:.0f} MB"
            )
    shutil.rmtree(ctx.root / "e2e", ignore_errors=True)
    ours_s, theirs_s, ratio = paired_seconds(ours, theirs, count, "baseline")
    processing = scale.e2e_processing
    peak = median([r["peak_rss"] for r in ours])
    peak_base = median([r["peak_rss"] for r in theirs])
    cpu_ours = median([r["cpu_s"] for r in ours])
    cpu_theirs = median([r["cpu_s"] for r in theirs])
    cpu_ratio = median([a["cpu_s"] / max(b["cpu_s"], 0.01) for a, b in zip(ours, theirs, strict=True)])
    paths = "; ".join(
        f"batchd {_path(a['milestones'])} / script {_path(b['milestones'])}" for a, b in zip(ours, theirs, strict=True)
    )
    return [
        Row(
            name="end to end",
            batchd=fmt_seconds(ours_s),
            baseline=fmt_seconds(theirs_s),
            ratio=ratio,
            target="≤ 1.1",
            met=ratio <= 1.1,
            notes=f"{count:,} requests in one file → {ours[0]['batches']} batches of ≤ {LINES_PER_FILE:,};"
            f" emulator {processing:g} s per batch, poll every {scale.e2e_poll:g} s;"
            f" time beyond processing {ours_s - processing:.1f} s vs {theirs_s - processing:.1f} s;"
            f" seconds from the drop: {paths}",
            details={
                "requests": count,
                "bytes": size,
                "processing_seconds": processing,
                "poll_seconds": scale.e2e_poll,
                "batchd_seconds": [r["seconds"] for r in ours],
                "baseline_seconds": [r["seconds"] for r in theirs],
                "batchd_milestones": [r["milestones"] for r in ours],
                "baseline_milestones": [r["milestones"] for r in theirs],
            },
        ),
        Row(
            name="end to end CPU",
            batchd=f"{cpu_ours:.1f} CPU-s",
            baseline=f"{cpu_theirs:.1f} CPU-s",
            ratio=cpu_ratio,
            target="≤ 3",
            met=cpu_ratio <= 3,
            notes="CPU (user + system) of the daemon process from the drop to the results file vs the"
            " script's whole run; the emulator's CPU is neither's",
            details={
                "batchd_cpu_s": [r["cpu_s"] for r in ours],
                "baseline_cpu_s": [r["cpu_s"] for r in theirs],
            },
        ),
        Row(
            name="end to end peak RSS",
            batchd=fmt_mb(peak),
            baseline=fmt_mb(peak_base),
            ratio=peak / peak_base,
            target="(reported)",
            met=None,
            notes="peak RSS of the daemon process (its whole life) vs the cookbook script",
            details={
                "batchd_peak_rss": [r["peak_rss"] for r in ours],
                "baseline_peak_rss": [r["peak_rss"] for r in theirs],
            },
        ),
    ]
