"""`python -m bench.run [--quick] [--only NAME,...]`: run the benchmarks, print the table, write results.json.

Every benchmark runs batchd's real code path and a baseline, interleaved round by round (the
machine may be shared), each side in its own process, and reports medians. Targets are printed
beside each figure; a missed target is reported, not failed: the exit status is 0 whenever the
benchmarks ran, and 1 only if one of them could not run.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path
from typing import Any

from . import collect, drain, e2e, idle, ingest, ingest_poll, queue_scale, submit
from .common import BENCH_SCHEMA_PREFIX, POSTGRES_ENV, Context, Row, Scale, Zygotes, log

BENCHMARKS: dict[str, Callable[[Context], list[Row]]] = {
    "ingest": ingest.run,
    "submit": submit.run,
    "collect": collect.run,
    "e2e": e2e.run,
    "idle": idle.run,
    "ingest_poll": ingest_poll.run,
    "drain": drain.run,
    "queue_scale": queue_scale.run,  # full runs only: the 10M-request database takes minutes to build
}

FULL = Scale(
    quick=False,
    ingest_lines=1_000_000,
    ingest_small_lines=100_000,
    ingest_rounds=3,
    submit_openai=50_000,
    submit_anthropic=100_000,
    submit_rounds=3,
    collect_lines=50_000,
    collect_rounds=3,
    e2e_lines=200_000,
    e2e_processing=30.0,
    e2e_poll=2.0,
    e2e_rounds=3,
    idle_batches=1000,
    idle_interval=60.0,
    idle_window=60.0,
    idle_base_window=10.0,
    drain_lines=50_000,
    drain_processing=3.0,
    drain_rounds=2,
)

QUICK = Scale(
    quick=True,
    ingest_lines=100_000,
    ingest_small_lines=10_000,
    ingest_rounds=2,
    submit_openai=5_000,
    submit_anthropic=10_000,
    submit_rounds=2,
    collect_lines=5_000,
    collect_rounds=3,
    e2e_lines=20_000,
    e2e_processing=2.0,
    e2e_poll=0.5,
    e2e_rounds=1,
    idle_batches=200,
    idle_interval=3.0,
    idle_window=3.0,
    idle_base_window=1.5,
    drain_lines=20_000,
    drain_processing=1.0,
    drain_rounds=1,
)

# The worker zygotes each benchmark uses; all are started together before the first measurement.
ZYGOTES: dict[str, tuple[str, ...]] = {
    "ingest": ("batchd-core", "sqlite"),
    "submit": ("batchd-openai", "openai", "batchd-anthropic", "anthropic"),
    "collect": ("batchd-openai", "openai"),
    "e2e": ("openai",),
    "idle": ("openai",),
    "ingest_poll": ("batchd-core",),
    "drain": ("batchd-core", "openai"),
    "queue_scale": ("batchd-core",),
}

DEFAULT_OUTPUT = Path(__file__).resolve().parent / "results.json"
# What `--engine postgresql` runs: the benchmarks whose batchd side starts from an empty store.
# submit and collect copy prepared SQLite databases, and the 10M-row queue is SQLite's target.
POSTGRES_BENCHMARKS = ("ingest", "e2e", "idle", "ingest_poll", "drain")
DEFAULT_POSTGRES_URL = "postgresql://postgres@127.0.0.1:5432/test"
COLUMNS = ("name", "batchd", "baseline", "ratio", "target", "met")


def machine() -> dict[str, Any]:
    """What the figures were measured on."""
    cpu = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.partition(":")[2].strip()
                break
    except OSError:
        pass
    ram = 0
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                ram = int(line.split()[1]) * 1024
    except OSError:
        pass
    versions: dict[str, str | None] = {}
    for package in ("batchd", "openai", "anthropic", "aiosqlite", "orjson", "uvloop"):
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            versions[package] = None
    commit = None
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        commit = (
            subprocess.run(
                ["git", "rev-parse", "--short", "HEAD"],
                cwd=Path(__file__).resolve().parent.parent,
                capture_output=True,
                text=True,
                timeout=10,
                check=False,
            ).stdout.strip()
            or None
        )
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "cores_usable": len(os.sched_getaffinity(0)),
        "ram_bytes": ram,
        "ram_gb": round(ram / 1024**3, 1),
        "python": f"{platform.python_implementation()} {platform.python_version()}",
        "platform": platform.platform(),
        "load_average": [round(x, 2) for x in os.getloadavg()],
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "versions": versions,
        "git_commit": commit,
    }


def drop_bench_schemas(url: str) -> None:
    """Drop the schemas the PostgreSQL run's batchd sides created (a daemon killed by SIGKILL cannot)."""
    import asyncio

    import asyncpg

    async def drop() -> None:
        conn = await asyncpg.connect(url)
        try:
            names = await conn.fetch(
                "SELECT nspname FROM pg_namespace WHERE nspname LIKE $1", BENCH_SCHEMA_PREFIX + "%"
            )
            for row in names:
                await conn.execute(f'DROP SCHEMA IF EXISTS "{row["nspname"]}" CASCADE')
        finally:
            await conn.close()

    try:
        asyncio.run(drop())
    except Exception as exc:  # the figures are printed anyway; say what is left behind
        log(f"could not drop the bench schemas ({BENCH_SCHEMA_PREFIX}*): {exc}")


def _cell(row: Row, column: str) -> str:
    if column == "ratio":
        return "—" if row.ratio is None else f"{row.ratio:.2f}"
    if column == "met":
        return "—" if row.met is None else ("yes" if row.met else "NO")
    return str(getattr(row, column))


def table(rows: list[Row]) -> str:
    cells = [list(COLUMNS)] + [[_cell(row, column) for column in COLUMNS] for row in rows]
    widths = [max(len(line[i]) for line in cells) for i in range(len(COLUMNS))]
    lines = [" | ".join(value.ljust(width) for value, width in zip(line, widths, strict=True)) for line in cells]
    lines.insert(1, "-+-".join("-" * width for width in widths))
    return "\n".join(line.rstrip() for line in lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.run", description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="scaled down: under a minute")
    parser.add_argument("--only", default="", help=f"comma-separated subset of: {', '.join(BENCHMARKS)}")
    parser.add_argument("--output", type=Path, default=DEFAULT_OUTPUT, help="results JSON (default bench/results.json)")
    parser.add_argument("--keep", action="store_true", help="keep the temporary directory (for debugging)")
    parser.add_argument(
        "--engine",
        choices=("sqlite", "postgresql"),
        default="sqlite",
        help="batchd's store: sqlite (default, where the targets hold) or postgresql (a fresh schema per"
        f" run side, on --postgres-url; runs {', '.join(POSTGRES_BENCHMARKS)})",
    )
    parser.add_argument("--postgres-url", default=DEFAULT_POSTGRES_URL, help=f"default {DEFAULT_POSTGRES_URL}")
    args = parser.parse_args(argv)
    available = POSTGRES_BENCHMARKS if args.engine == "postgresql" else tuple(BENCHMARKS)
    selected = [name.strip() for name in args.only.split(",") if name.strip()] or list(available)
    unknown = [name for name in selected if name not in available]
    if unknown:
        parser.error(f"unknown benchmark(s) for the {args.engine} engine: {', '.join(unknown)}")
    if args.engine == "postgresql":
        # Set before the zygotes fork, so every batchd side and daemon sees it.
        os.environ[POSTGRES_ENV] = args.postgres_url
        if args.output == DEFAULT_OUTPUT:
            args.output = DEFAULT_OUTPUT.with_name("results-postgresql.json")
    scale = QUICK if args.quick else FULL
    info = machine()
    log(
        f"{'quick' if scale.quick else 'full'} run on {info['cpu']}, {info['cores']} cores, {info['ram_gb']} GB,"
        f" {info['python']}, load {info['load_average']}"
    )
    started = time.monotonic()
    root = Path(tempfile.mkdtemp(prefix="batchd-bench-"))
    zygotes = Zygotes(root)
    ctx = Context(scale=scale, root=root, zygotes=zygotes)
    rows: list[Row] = []
    timings: dict[str, float] = {}
    failed: list[str] = []
    try:
        began = time.monotonic()
        zygotes.start(dict.fromkeys(name for benchmark in selected for name in ZYGOTES[benchmark]))
        log(f"worker zygotes ready in {time.monotonic() - began:.1f} s")
        for name in selected:
            began = time.monotonic()
            try:
                rows.extend(BENCHMARKS[name](ctx))
            except Exception as exc:
                failed.append(name)
                traceback.print_exc(file=sys.stderr)
                rows.append(Row(name, "error", "error", None, "—", None, notes=f"{type(exc).__name__}: {exc}"))
            timings[name] = round(time.monotonic() - began, 1)
            log(f"{name}: {timings[name]:.1f} s")
    finally:
        zygotes.close()
        if args.engine == "postgresql":
            drop_bench_schemas(args.postgres_url)
        if args.keep:
            log(f"kept {root}")
        else:
            shutil.rmtree(root, ignore_errors=True)
    total = time.monotonic() - started
    mode = "quick" if scale.quick else "full"
    print(
        f"batchd benchmarks ({mode}, {args.engine}): {info['cpu']}, {info['cores']} cores,"
        f" {info['ram_gb']} GB RAM, {info['python']}, {info['date']}"
    )
    print(table(rows))
    for row in rows:
        if row.notes:
            print(f"  {row.name}: {row.notes}")
    print(f"total {total:.0f} s" + (f"; could not run: {', '.join(failed)}" if failed else ""))
    document = {
        "mode": "quick" if scale.quick else "full",
        "engine": args.engine,
        "machine": info,
        "scale": scale.__dict__,
        "seconds": round(total, 1),
        "benchmark_seconds": timings,
        "rows": [row.to_json() for row in rows],
        "failed": failed,
    }
    args.output.write_text(json.dumps(document, indent=2) + "\n")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
