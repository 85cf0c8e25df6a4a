"""Benchmark 2, submit: a full batch of queued requests turned into a created provider batch.

batchd: `Store.claim_batch` + `Batcher._submit` (the batcher's own path: claim the group's items;
OpenAI: write the input file from SQLite, upload it, create; Anthropic: stream the requests from
SQLite into the create call; mark submitted) on a copy of a queued store.
Baseline: the same bytes, prebuilt on disk, uploaded and created with the SDK directly (OpenAI:
files.create + batches.create; Anthropic: one POST of the prebuilt body).
The emulator runs in its own process with batches that never progress, so that only the submission
is measured; each side runs in its own process so that its peak RSS is its own.
"""

from __future__ import annotations

import asyncio
import shutil
import sqlite3
import time
from pathlib import Path
from typing import Any, BinaryIO, Final

from .common import (
    API_KEY_ANTHROPIC,
    API_KEY_OPENAI,
    MB,
    Context,
    EmulatorProcess,
    Row,
    fmt_mb,
    fmt_seconds,
    log,
    median,
    write_anthropic,
    write_large_openai,
)

ROUND_TIMEOUT = 600.0
NEVER = 1e7  # emulator processing time: batches stay `validating` / `in_progress` for good
ENDPOINT: Final = "/v1/chat/completions"


async def batchd_side(template: str, root: str, openai_url: str, anthropic_url: str) -> dict[str, Any]:
    from batchd.batcher import Batcher
    from batchd.crashpoints import CrashPoints
    from batchd.providers import ProviderPool
    from batchd.store import open_store

    from .batchd_setup import install_database, make_settings, quiet_logs

    quiet_logs()
    base = Path(root)
    settings = make_settings(base, openai_url, anthropic_url)
    store = open_store("sqlite:///" + str(install_database(Path(template), base)), "bench")
    await store.open()
    workdir = base / "work"
    workdir.mkdir()
    providers = ProviderPool(settings.providers)
    # As the daemon does at start-up (before READY): its adapters, SSL contexts included, are made
    # once per process, never per batch. The script makes its client per run, as a script must.
    providers.prepare()
    batcher = Batcher(settings, store, providers, workdir, on_submitted=lambda _id: None, crashpoints=CrashPoints(""))
    await batcher.recover()
    started = time.perf_counter()
    now = time.time()
    (group,) = await store.queued_groups(now)
    profile = settings.providers[group.profile]
    batch = await store.claim_batch(group, profile.kind, profile.request_limit, profile.byte_limit, now)
    assert batch is not None
    claimed = time.perf_counter()
    await batcher._submit(batch)
    seconds = time.perf_counter() - started
    done = await store.batch(batch.id)
    await providers.close()
    await store.close()
    if done is None or done.state != "submitted":
        raise RuntimeError(f"batch not submitted: {done}")
    return {
        "seconds": seconds,
        "claim_seconds": claimed - started,
        "requests": done.requests,
        "accounted_bytes": done.bytes,
        "remote_id": done.remote_id,
    }


def _open_binary(path: str) -> BinaryIO:
    return open(path, "rb")


async def baseline_openai(path: str, base_url: str) -> dict[str, Any]:
    import openai

    started = time.perf_counter()
    client = openai.AsyncOpenAI(api_key=API_KEY_OPENAI, base_url=base_url)
    with _open_binary(path) as handle:
        uploaded = await client.files.create(file=("batch.jsonl", handle, "application/jsonl"), purpose="batch")
    batch = await client.batches.create(input_file_id=uploaded.id, endpoint=ENDPOINT, completion_window="24h")
    seconds = time.perf_counter() - started
    await client.close()
    return {"seconds": seconds, "remote_id": batch.id}


async def baseline_anthropic(path: str, base_url: str) -> dict[str, Any]:
    import anthropic
    from anthropic.types.messages import MessageBatch

    started = time.perf_counter()
    client = anthropic.AsyncAnthropic(api_key=API_KEY_ANTHROPIC, base_url=base_url)
    body = await asyncio.to_thread(Path(path).read_bytes)
    batch = await client.post(
        "/v1/messages/batches",
        cast_to=MessageBatch,
        content=body,
        options={"headers": {"Content-Type": "application/json"}},
    )
    seconds = time.perf_counter() - started
    await client.close()
    return {"seconds": seconds, "remote_id": batch.id}


def prebuild(template: Path, target: Path, kind: str) -> int:
    """The exact bytes batchd uploads for this queue (same item ids, same request lines); returns the size."""
    from batchd.formats import anthropic_request, openai_request_line

    db = sqlite3.connect(template)
    rows = db.execute(
        "SELECT i.id, i.endpoint, b.body FROM items i JOIN item_bodies b ON b.item_id = i.id"
        " WHERE i.state = 'queued' ORDER BY i.id"
    )
    with target.open("wb") as out:
        if kind == "openai":
            for item_id, endpoint, body in rows:
                out.write(openai_request_line(item_id, endpoint, body))
        else:
            out.write(b'{"requests":[')
            for index, (item_id, _endpoint, body) in enumerate(rows):
                if index:
                    out.write(b",")
                out.write(anthropic_request(item_id, body))
            out.write(b"]}")
    db.close()
    return target.stat().st_size


def _rows(
    kind: str, count: int, upload_bytes: int, ours: list[dict[str, Any]], theirs: list[dict[str, Any]]
) -> list[Row]:
    ratio = median([a["seconds"] / b["seconds"] for a, b in zip(ours, theirs, strict=True)])
    peak = median([r["peak_rss"] for r in ours])
    peak_base = median([r["peak_rss"] for r in theirs])
    limit = 2 * upload_bytes + 100 * MB
    what = "write + upload + create" if kind == "openai" else "create (one POST, streamed from SQLite)"
    theirs_what = "upload + create" if kind == "openai" else "create (one POST)"
    return [
        Row(
            name=f"submit {kind}",
            batchd=fmt_seconds(median([r["seconds"] for r in ours])),
            baseline=fmt_seconds(median([r["seconds"] for r in theirs])),
            ratio=ratio,
            target="≤ 1.5",
            met=ratio <= 1.5,
            notes=f"{count:,} requests, {upload_bytes / MB:.0f} MB batch: claim + {what} vs {theirs_what} of"
            " prebuilt bytes; emulator in its own process",
            details={
                "requests": count,
                "batch_bytes": upload_bytes,
                "batchd_seconds": [r["seconds"] for r in ours],
                # queued_groups + claim_batch; the rest is Batcher._submit (write, upload, create, mark).
                "batchd_claim_seconds": [r["claim_seconds"] for r in ours],
                "baseline_seconds": [r["seconds"] for r in theirs],
                "batchd_cpu_s": [r["cpu_s"] for r in ours],
                "baseline_cpu_s": [r["cpu_s"] for r in theirs],
            },
        ),
        Row(
            name=f"submit {kind} peak RSS",
            batchd=fmt_mb(peak),
            baseline=fmt_mb(peak_base),
            ratio=peak / peak_base,
            target=f"≤ 2×batch+100 MB = {fmt_mb(limit)}",
            met=peak <= limit,
            notes=f"peak RSS of each side's process for a {upload_bytes / MB:.0f} MB batch"
            f" (batchd's imports alone: {fmt_mb(median([r['start_rss'] for r in ours]))});"
            " ratio = batchd / baseline",
            details={
                "batch_bytes": upload_bytes,
                "limit": limit,
                "batchd_peak_rss": [r["peak_rss"] for r in ours],
                "baseline_peak_rss": [r["peak_rss"] for r in theirs],
                "batchd_start_rss": [r["start_rss"] for r in ours],
                "baseline_start_rss": [r["start_rss"] for r in theirs],
            },
        ),
    ]


def run(ctx: Context) -> list[Row]:
    from .batchd_setup import build_queued_store, quiet_logs
    from .worker import run_loop

    quiet_logs()
    scale = ctx.scale
    data = ctx.workdir("submit", "data")
    plans = (
        ("openai", scale.submit_openai, write_large_openai),
        ("anthropic", scale.submit_anthropic, write_anthropic),
    )
    prepared: dict[str, tuple[Path, Path, int]] = {}
    for kind, count, write in plans:
        source = data / f"{kind}.jsonl"
        write(source, count)
        template = run_loop(build_queued_store(ctx.workdir("submit", f"template-{kind}"), source))
        prebuilt = data / f"{kind}-prebuilt.json{'l' if kind == 'openai' else ''}"
        prepared[kind] = (template, prebuilt, prebuild(template, prebuilt, kind))
        source.unlink()
    rows: list[Row] = []
    with EmulatorProcess(ctx.workdir("submit", "emulator"), NEVER) as emulator:
        for kind, count, _write in plans:
            template, prebuilt, size = prepared[kind]
            log(f"submit {kind}: {count:,} requests, {size / MB:.0f} MB, {scale.submit_rounds} rounds")
            ours: list[dict[str, Any]] = []
            theirs: list[dict[str, Any]] = []
            for number in range(scale.submit_rounds):
                order = ("batchd", "baseline") if number % 2 == 0 else ("baseline", "batchd")
                for side in order:
                    if side == "batchd":
                        root = ctx.workdir("submit", f"{kind}-r{number}")
                        try:
                            ours.append(
                                ctx.zygotes[f"batchd-{kind}"].run(
                                    "bench.submit:batchd_side",
                                    ROUND_TIMEOUT,
                                    template=str(template),
                                    root=str(root),
                                    openai_url=emulator.openai_base_url,
                                    anthropic_url=emulator.anthropic_base_url,
                                )
                            )
                        finally:
                            shutil.rmtree(root, ignore_errors=True)
                    else:
                        url = emulator.openai_base_url if kind == "openai" else emulator.anthropic_base_url
                        theirs.append(
                            ctx.zygotes[kind].run(
                                f"bench.submit:baseline_{kind}", ROUND_TIMEOUT, path=str(prebuilt), base_url=url
                            )
                        )
                log(
                    f"  round {number + 1}: batchd {ours[-1]['seconds']:.2f} s, baseline {theirs[-1]['seconds']:.2f} s,"
                    f" peak RSS {ours[-1]['peak_rss'] / MB:.0f} / {theirs[-1]['peak_rss'] / MB:.0f} MB"
                )
            if any(r["requests"] != count for r in ours):
                raise RuntimeError(f"batchd submitted {[r['requests'] for r in ours]} requests, expected {count}")
            rows.extend(_rows(kind, count, size, ours, theirs))
    shutil.rmtree(ctx.root / "submit", ignore_errors=True)
    return rows
