"""Benchmark 5, idle cost: the daemon holding many live batches that never end.

batchd: the daemon (`python -m batchd run`) with N live batches (one request per model, so one batch
each), every poller at poll_interval_min = poll_interval_max = the polling interval. CPU seconds are
read from /proc over a window of whole polling cycles; the emulator counts the HTTP calls. The
daemon looks at each batch once per interval, by listing (100 batches a call) and retrieving only
what changed, so its cost is given per batch looked at ("per poll"), not per HTTP call.
Baseline: a minimal script that retrieves the same N live batches with the SDK in turn, every
interval (one loop, one connection), once the daemon has stopped: the SDK's own cost per poll (one
retrieve per batch, the cookbook way; it is not made to list, and not made slower).

Full: N = 1000 at 60 s, measured directly. Quick: N = 200 at a short interval, and the figure for
the target's load (1000 batches at 60 s) is projected from the daemon's measured cost with no
batches plus 1000 times its measured cost per batch looked at.
"""

from __future__ import annotations

import asyncio
import resource
import shutil
import time
from typing import Any

from .common import (
    API_KEY_OPENAI,
    MB,
    BenchError,
    Context,
    DaemonProcess,
    EmulatorProcess,
    Row,
    cpu_between,
    cpu_reading,
    fmt_mb,
    log,
    proc_status,
    wait_for,
    write_daemon_config,
    write_distinct_models,
)

NEVER = 1e7
TARGET = 0.6  # CPU seconds per minute
TARGET_BATCHES = 1000  # the target's load: this many live batches polled every 60 s


def _cpu_self() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


async def baseline_side(batch_ids: list[str], base_url: str, interval: float, window: float) -> dict[str, Any]:
    """The cookbook loop: retrieve every batch in turn, sleep out the interval, again.

    The window opens half an interval after the first round, so that a window of one interval holds one round.
    """
    import openai

    client = openai.AsyncOpenAI(api_key=API_KEY_OPENAI, base_url=base_url)
    loop = asyncio.get_running_loop()
    measuring = False
    polls = 0
    first_round = asyncio.Event()

    async def poll_all() -> None:
        nonlocal polls
        while True:
            cycle = loop.time()
            for batch_id in batch_ids:
                await client.batches.retrieve(batch_id)
                if measuring:
                    polls += 1
            first_round.set()
            await asyncio.sleep(max(0.0, cycle + interval - loop.time()))

    task = asyncio.create_task(poll_all())
    await asyncio.wait_for(first_round.wait(), timeout=interval + 120)
    await asyncio.sleep(interval / 2)
    before = _cpu_self()
    measuring = True
    await asyncio.sleep(window)
    cpu = _cpu_self() - before
    measuring = False
    rss = proc_status()["VmRSS"]
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)
    await client.close()
    return {"cpu_window": cpu, "polls": polls, "window": window, "rss": rss}


def run(ctx: Context) -> list[Row]:
    scale = ctx.scale
    count, interval, window = scale.idle_batches, scale.idle_interval, scale.idle_window
    base = ctx.workdir("idle")
    source = base / "models.jsonl"
    write_distinct_models(source, count)
    log(f"idle: {count} live batches, poll every {interval:g} s, window {window:g} s")
    with EmulatorProcess(ctx.workdir("idle", "emulator"), NEVER) as emulator:
        root = ctx.workdir("idle", "daemon")
        # max_requests = 1 makes every one-request group a full batch, flushed at once, so the
        # batcher keeps its default max_wait and tick (its idle wake-ups are part of the cost).
        config = write_daemon_config(
            root,
            emulator,
            batching={"poll_interval_min": interval, "poll_interval_max": interval},
            openai={"max_in_flight": count + 10, "max_requests": 1},
        )
        daemon = DaemonProcess(config, root / "daemon.log")
        try:
            daemon.wait_ready()
            time.sleep(0.5)
            # The daemon's own cost with nothing to poll.
            cpu_start, began = cpu_reading(daemon.pid), time.monotonic()
            time.sleep(scale.idle_base_window)
            base_seconds = time.monotonic() - began
            base_rate = cpu_between(cpu_start, cpu_reading(daemon.pid)) / base_seconds
            # N live batches.
            staged = root / "spool" / "tmp" / "models.jsonl"
            shutil.copyfile(source, staged)
            submitting = time.monotonic()
            staged.rename(root / "spool" / "new" / "models.jsonl")

            def all_submitted() -> bool:
                daemon.check_alive()
                return daemon.events("batch.submitted") >= count

            wait_for(all_submitted, 120 + count / 5, "daemon submitting every batch", interval=0.25)
            log(f"  daemon submitted {count} batches in {time.monotonic() - submitting:.1f} s")

            # Steady state: every poller has made its first poll (which records the status, one
            # durable transaction each); from here on each polls once per interval.
            def all_polled() -> bool:
                daemon.check_alive()
                return daemon.events("batch.status") >= count

            wait_for(all_polled, 120 + count / 5, "every poller's first poll", interval=0.25)
            log(f"  every batch polled once {time.monotonic() - submitting:.1f} s after the drop")
            # The pollers poll in bursts (all started together); a window of one interval opening half
            # an interval after the first burst holds exactly the next burst.
            time.sleep(interval / 2)
            calls_before = emulator.stats()["http_calls"]
            cpu_before, started = cpu_reading(daemon.pid), time.monotonic()
            time.sleep(window)
            cpu = cpu_between(cpu_before, cpu_reading(daemon.pid))
            measured = time.monotonic() - started
            polls = emulator.stats()["http_calls"] - calls_before
            status = proc_status(daemon.pid)
            daemon.check_alive()
        finally:
            daemon.stop()
        # The same live batches, polled by the baseline once the daemon is gone.
        batch_ids = sorted({ids[-1] for ids in emulator.stats()["openai"]["custom_ids"].values()})
        if len(batch_ids) != count:
            raise BenchError(f"the emulator holds {len(batch_ids)} batches, expected {count}")
        baseline = ctx.zygotes["openai"].run(
            "bench.idle:baseline_side",
            window + 120,
            batch_ids=batch_ids,
            base_url=emulator.openai_base_url,
            interval=interval,
            window=window,
        )
    shutil.rmtree(base, ignore_errors=True)

    # Every poller looks at its batch once per interval, however many HTTP calls that takes.
    looks = count * measured / interval
    per_poll = max(cpu - base_rate * measured, 0.0) / max(looks, 1)
    measured_per_minute = cpu / measured * 60
    # The target's load: TARGET_BATCHES polls a minute on top of the daemon's cost with no batches.
    projected = base_rate * 60 + per_poll * TARGET_BATCHES
    base_per_poll = baseline["cpu_window"] / max(baseline["polls"], 1)
    baseline_measured = baseline["cpu_window"] / baseline["window"] * 60
    baseline_projected = base_per_poll * TARGET_BATCHES
    direct = abs(interval - 60.0) < 1e-9 and count == TARGET_BATCHES
    ours = measured_per_minute if direct else projected
    theirs = baseline_measured if direct else baseline_projected
    how = (
        f"measured over {measured:.0f} s"
        if direct
        else f"projected from {count} batches polled every {interval:g} s ({measured_per_minute:.2f} vs"
        f" {baseline_measured:.2f} CPU-s/min measured there)"
    )
    details = {
        "batches": count,
        "interval": interval,
        "window": measured,
        "batchd_cpu_window": cpu,
        "batchd_polls": looks,
        "batchd_http_calls": polls,
        "batchd_base_cpu_per_minute": base_rate * 60,
        "batchd_cpu_per_poll_ms": per_poll * 1000,
        "batchd_cpu_per_minute_measured": measured_per_minute,
        "batchd_cpu_per_minute_projected_60s": projected,
        "batchd_rss": status["VmRSS"],
        "batchd_peak_rss": status["VmHWM"],
        "baseline_cpu_window": baseline["cpu_window"],
        "baseline_polls": baseline["polls"],
        "baseline_cpu_per_poll_ms": base_per_poll * 1000,
        "baseline_cpu_per_minute_measured": baseline_measured,
        "baseline_cpu_per_minute_projected_60s": baseline_projected,
        "baseline_rss": baseline["rss"],
    }
    log(
        f"  daemon: {looks:.0f} polls in {polls} HTTP calls, {cpu:.2f} CPU-s in {measured:.1f} s,"
        f" {per_poll * 1000:.2f} ms/poll,"
        f" idle base {base_rate * 60:.3f} CPU-s/min; baseline {baseline['polls']} polls,"
        f" {baseline['cpu_window']:.2f} CPU-s, {base_per_poll * 1000:.2f} ms/poll"
    )
    return [
        Row(
            name="idle CPU",
            batchd=f"{ours:.2f} CPU-s/min",
            baseline=f"{theirs:.2f} CPU-s/min",
            ratio=ours / theirs if theirs > 0 else None,
            target=f"≤ {TARGET} CPU-s/min",
            met=ours <= TARGET,
            notes=f"{TARGET_BATCHES} live batches polled every 60 s, {how}; per poll {per_poll * 1000:.2f} ms vs"
            f" {base_per_poll * 1000:.2f} ms ({polls} HTTP calls for {looks:.0f} polls vs one each);"
            f" daemon with no batches {base_rate * 60:.3f} CPU-s/min",
            details=details,
        ),
        Row(
            name="idle RSS",
            batchd=fmt_mb(status["VmRSS"]),
            baseline=fmt_mb(baseline["rss"]),
            ratio=status["VmRSS"] / baseline["rss"],
            target="(reported)",
            met=None,
            notes=f"resident memory with {count} live batches (daemon peak {status['VmHWM'] / MB:.0f} MB)",
            details={"batchd_rss": status["VmRSS"], "baseline_rss": baseline["rss"]},
        ),
    ]
