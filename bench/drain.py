"""Benchmark 8, drain 5x an enqueued-token limit: a queue holding five times an OpenAI model's
enqueued-token limit, from the first request queued to the last result written.

The emulator (its own process, a fresh one per side and round) enforces the limit on its own token
count (`token_limits` fault: a batch that would take the model's enqueued tokens past it fails
validation with `token_limit_exceeded`); the limit is a fifth of the queue's tokens as the emulator
counts them.

batchd: the daemon itself (`python -m batchd run`), the profile declaring that limit
(`enqueued_tokens`, default `capacity_margin` 0.1); the file is renamed into spool/new/ and timed to
the appearance of its results file. batchd never creates a batch that would take its own estimate
of the in-flight tokens past the limit less the margin, so it should see no refusal at all.
Baseline: a naive submitter, a plain SDK script: it splits the file into 20 equal parts (each a
quarter of the limit), uploads and creates all of them at once, polls every batch at the same
interval as batchd, and creates a refused part again after an exponential backoff (1 s doubling,
at most 30 s, jittered), until every part has completed; then downloads every output.
"""

from __future__ import annotations

import os
import random
import shutil
import time
from pathlib import Path
from typing import Any, Final

from .common import (
    API_KEY_OPENAI,
    Context,
    DaemonProcess,
    EmulatorProcess,
    Row,
    count_lines,
    count_matching_lines,
    fmt_seconds,
    log,
    median,
    paired_seconds,
    wait_for,
    write_daemon_config,
    write_small_openai,
)

ENDPOINT: Final = "/v1/chat/completions"
MODEL: Final = "gpt-4o-mini"
PARTS = 20
LIMIT_SHARE = 5  # the queue holds this many times the limit
POLL = 0.5
TERMINAL = ("completed", "failed", "expired", "cancelled")


def emulator_tokens(source: str) -> dict[str, Any]:
    """The queue's tokens as the emulator counts them (its own rule, not batchd's estimate)."""
    import orjson

    from batchd.emulator.responses import estimate_input_tokens

    total = 0
    with open(source, "rb") as handle:
        for line in handle:
            request = orjson.loads(line)
            total += estimate_input_tokens(request["url"], request["body"])
    return {"tokens": total}


def baseline_side(source: str, root: str, base_url: str, poll_seconds: float, timeout: float) -> dict[str, Any]:
    """The naive submitter (see the module docstring), synchronous client."""
    import openai

    started = time.perf_counter()
    client = openai.OpenAI(api_key=API_KEY_OPENAI, base_url=base_url)
    lines = Path(source).read_bytes().splitlines(keepends=True)
    size = -(-len(lines) // PARTS)
    files = []
    for number in range(PARTS):
        part = Path(root) / f"part-{number}.jsonl"
        part.write_bytes(b"".join(lines[number * size : (number + 1) * size]))
        with part.open("rb") as upload:
            files.append(client.files.create(file=upload, purpose="batch").id)
    rng = random.Random(7)
    live: dict[str, int] = {}  # batch id -> part
    retry_at: dict[int, float] = {}
    attempts = [0] * PARTS
    done: dict[int, Any] = {}
    refusals = 0

    def create(part: int) -> None:
        batch = client.batches.create(input_file_id=files[part], endpoint=ENDPOINT, completion_window="24h")
        live[batch.id] = part

    for part in range(PARTS):
        create(part)
    deadline = time.monotonic() + timeout
    while len(done) < PARTS:
        if time.monotonic() > deadline:
            raise TimeoutError("the naive submitter did not drain the queue")
        time.sleep(poll_seconds)
        for batch_id, part in list(live.items()):
            batch = client.batches.retrieve(batch_id)
            if batch.status not in TERMINAL:
                continue
            del live[batch_id]
            codes = [e.code for e in (batch.errors.data if batch.errors and batch.errors.data else [])]
            if batch.status == "failed" and "token_limit_exceeded" in codes:
                refusals += 1
                attempts[part] += 1
                delay = min(30.0, 2.0 ** (attempts[part] - 1)) * rng.uniform(0.5, 1.0)
                retry_at[part] = time.monotonic() + delay
            elif batch.status == "completed":
                done[part] = batch
            else:
                raise RuntimeError(f"part {part}: batch {batch_id} ended {batch.status} ({codes})")
        for part, when in list(retry_at.items()):
            if when <= time.monotonic():
                del retry_at[part]
                create(part)
    results = Path(root) / "results.jsonl"
    with results.open("wb") as out:
        for part in range(PARTS):
            batch = done[part]
            for file_id in (batch.output_file_id, batch.error_file_id):
                if file_id:
                    out.write(client.files.content(file_id).content)
    seconds = time.perf_counter() - started
    client.close()
    return {"seconds": seconds, "lines": count_lines(results), "refusals": refusals}


def _daemon_round(emulator: EmulatorProcess, source: Path, root: Path, limit: int, timeout: float) -> dict[str, Any]:
    config = write_daemon_config(
        root,
        emulator,
        batching={"max_wait": 0.25, "poll_interval_min": POLL, "poll_interval_max": POLL},
        openai={"enqueued_tokens": limit},
    )
    daemon = DaemonProcess(config, root / "daemon.log")
    try:
        daemon.wait_ready()
        spool = root / "spool"
        staged = spool / "tmp" / "drain.jsonl"
        os.link(source, staged)
        started = time.perf_counter()
        os.rename(staged, spool / "new" / "drain.jsonl")
        results = spool / "out" / "drain.results.jsonl"

        def arrived() -> bool:
            daemon.check_alive()
            return results.exists()

        wait_for(arrived, timeout, "results file", interval=0.02)
        seconds = time.perf_counter() - started
    finally:
        daemon.stop()
    return {
        "seconds": seconds,
        "lines": count_lines(results),
        "succeeded": count_matching_lines(results, b'"status":"succeeded"'),
        "batches": daemon.events("batch.submitted"),
        "waits": daemon.events("batch.capacity_wait"),
    }


def run(ctx: Context) -> list[Row]:
    scale = ctx.scale
    count = scale.drain_lines
    source = ctx.workdir("drain", "data") / "requests.jsonl"
    write_small_openai(source, count, model=MODEL)
    counted = ctx.zygotes["batchd-core"].run("bench.drain:emulator_tokens", 300, source=str(source))
    limit = int(counted["tokens"]) // LIMIT_SHARE
    timeout = 300 + scale.drain_processing * 60
    log(
        f"drain: {count:,} requests, {LIMIT_SHARE}x an enqueued-token limit of {limit:,} (emulator's count),"
        f" {scale.drain_processing:g} s per batch, {scale.drain_rounds} rounds"
    )
    ours: list[dict[str, Any]] = []
    theirs: list[dict[str, Any]] = []
    faults = {"token_limits": {MODEL: limit}}
    for number in range(scale.drain_rounds):
        order = ("batchd", "baseline") if number % 2 == 0 else ("baseline", "batchd")
        for side in order:
            root = ctx.workdir("drain", f"r{number}-{side}")
            try:
                with EmulatorProcess(root, scale.drain_processing, faults) as emulator:
                    if side == "batchd":
                        result = _daemon_round(emulator, source, root, limit, timeout)
                    else:
                        result = ctx.zygotes["openai"].run(
                            "bench.drain:baseline_side",
                            timeout + 30,
                            source=str(source),
                            root=str(root),
                            base_url=emulator.openai_base_url,
                            poll_seconds=POLL,
                            timeout=timeout,
                        )
                    stats = emulator.stats()
                result["emulator_refusals"] = stats.get("failed_batches", {}).get("token_limit_exceeded", 0)
                result["peak_enqueued"] = stats.get("peak_enqueued", {}).get(MODEL, 0)
                (ours if side == "batchd" else theirs).append(result)
            finally:
                shutil.rmtree(root, ignore_errors=True)
        log(
            f"  round {number + 1}: batchd {ours[-1]['seconds']:.2f} s ({ours[-1]['emulator_refusals']} refused),"
            f" naive {theirs[-1]['seconds']:.2f} s ({theirs[-1]['emulator_refusals']} refused)"
        )
    shutil.rmtree(ctx.root / "drain", ignore_errors=True)
    ours_s, theirs_s, ratio = paired_seconds(ours, theirs, count, "naive submitter")
    refused = max(r["emulator_refusals"] for r in ours)
    peak = max(r["peak_enqueued"] for r in ours)
    return [
        Row(
            name="drain 5x enqueued-token limit",
            batchd=fmt_seconds(ours_s),
            baseline=fmt_seconds(theirs_s),
            ratio=ratio,
            target="0 token_limit_exceeded",
            met=refused == 0 and peak <= limit,
            notes=f"{count:,} requests = {LIMIT_SHARE}x a limit of {limit:,} tokens (emulator's count);"
            f" batchd {median([r['batches'] for r in ours]):.0f} batches, {refused} refused, peak enqueued"
            f" {peak:,}; naive {PARTS} parts, {median([r['emulator_refusals'] for r in theirs]):.0f} refused"
            f" (retried with backoff), peak {max(r['peak_enqueued'] for r in theirs):,};"
            f" emulator {scale.drain_processing:g} s per batch, poll every {POLL:g} s",
            details={
                "requests": count,
                "limit": limit,
                "batchd_seconds": [r["seconds"] for r in ours],
                "baseline_seconds": [r["seconds"] for r in theirs],
                "batchd_refusals": [r["emulator_refusals"] for r in ours],
                "baseline_refusals": [r["emulator_refusals"] for r in theirs],
                "batchd_peak_enqueued": [r["peak_enqueued"] for r in ours],
                "baseline_peak_enqueued": [r["peak_enqueued"] for r in theirs],
            },
        )
    ]
