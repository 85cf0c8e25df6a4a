"""The command line: `batchd run | submit | status | emulator | demo`."""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import sys
from collections.abc import Coroutine
from pathlib import Path
from typing import Any, TypeVar

import orjson

from . import __version__
from .settings import ConfigError, Settings, load_settings

T = TypeVar("T")

EX_CONFIG = 78  # sysexits.h: systemd shows it as a configuration error


def run_loop(coro: Coroutine[Any, Any, T]) -> T:
    """Run a coroutine on uvloop (the daemon's loop), falling back to asyncio where uvloop is absent."""
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency; this is for odd platforms
        return asyncio.run(coro)
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        return runner.run(coro)


def _settings(args: argparse.Namespace) -> Settings:
    return load_settings(args.config)


def cmd_run(args: argparse.Namespace) -> int:
    from .daemon import Daemon
    from .logs import configure_logging

    settings = _settings(args)
    configure_logging(settings.daemon.log_format, settings.daemon.log_level)
    daemon = Daemon(settings)
    status = run_loop(daemon.run())
    if status == 0 and daemon.stop_signal is not None:
        # Die of the signal that stopped us, so the exit status tells systemd the truth.
        sys.stdout.flush()
        signal.signal(daemon.stop_signal, signal.SIG_DFL)
        os.kill(os.getpid(), daemon.stop_signal)
    return status


def cmd_submit(args: argparse.Namespace) -> int:
    from .spool import submit_file

    spool_dir = args.spool_dir or _settings(args).daemon.spool_dir
    for name in args.files:
        source = Path(name)
        if not source.is_file():
            print(f"batchd submit: {name}: not a file", file=sys.stderr)
            return 1
        target = submit_file(source, spool_dir, name=args.name if len(args.files) == 1 else None)
        print(target.path)
        print(f"results: {target.results}")
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    from .status import render_status, watch_status

    settings = _settings(args)
    if args.watch:
        try:
            return run_loop(watch_status(settings, args.interval, args.count))
        except KeyboardInterrupt:
            return 0
    return run_loop(render_status(settings, as_json=args.json))


def cmd_report(args: argparse.Namespace) -> int:
    from .report import run_report
    from .settings import parse_duration

    since = float(parse_duration(args.since))
    return run_loop(run_report(_settings(args), since, args.by, args.json))


def cmd_estimate(args: argparse.Namespace) -> int:
    from .report import estimate_file, render_estimate
    from .status import terminal

    settings = _settings(args)
    for name in args.files:
        estimate = estimate_file(settings, Path(name))
        if args.json:
            print(orjson.dumps(estimate, option=orjson.OPT_INDENT_2).decode())
        else:
            render_estimate(estimate, terminal())
    return 0


def cmd_results(args: argparse.Namespace) -> int:
    from .results import show_results

    return run_loop(show_results(_settings(args), args.file, args.custom_id, args.status, args.limit, args.json))


def cmd_redeliver(args: argparse.Namespace) -> int:
    from .store import Store

    settings = _settings(args)

    async def flag() -> int | None:
        async with Store.existing(settings.daemon.database_path) as store:
            return None if store is None else await store.request_redelivery(args.sink)

    count = run_loop(flag())
    if count is None:
        print(f"batchd redeliver: no database at {settings.daemon.database_path}", file=sys.stderr)
        return 1
    print(f"{count} parked results will be delivered again by the running daemon")
    return 0


def cmd_emulator(args: argparse.Namespace) -> int:
    from .emulator.cli import main as emulator_main

    return emulator_main(args)


def cmd_demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    return run_loop(run_demo(requests=args.requests, keep=args.keep))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="batchd", description="Moves LLM calls that can wait onto batch APIs.")
    parser.add_argument("--version", action="version", version=f"batchd {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)

    def command(name: str, help_text: str) -> argparse.ArgumentParser:
        sub = commands.add_parser(name, help=help_text, description=help_text)
        sub.add_argument("--config", help="TOML config file (default: $BATCHD_CONFIG)")
        return sub

    run = command("run", "run the daemon in the foreground")
    run.set_defaults(handler=cmd_run)

    submit = command("submit", "queue JSONL files by writing them into the spool safely")
    submit.add_argument("files", nargs="+", help="JSONL files of OpenAI batch lines or Anthropic batch requests")
    submit.add_argument("--name", help="file name in the spool (one file only)")
    submit.add_argument("--spool-dir", help="spool directory (default: daemon.spool_dir of the config)")
    submit.set_defaults(handler=cmd_submit)

    status = command("status", "queue depth per route, live batches, recent errors")
    status.add_argument("--json", action="store_true", help="machine-readable output")
    status.add_argument("--watch", action="store_true", help="a live view, until Ctrl-C")
    status.add_argument("--interval", type=float, default=1.0, help="seconds between refreshes with --watch")
    status.add_argument("--count", type=int, help="stop after this many refreshes with --watch")
    status.set_defaults(handler=cmd_status)

    report = command("report", "what was paid, what real-time would have cost, and the saving")
    report.add_argument("--since", default="30d", help="how far back (e.g. 7d, 12h; default 30d)")
    report.add_argument("--by", choices=["model", "day", "file", "provider"], default="model")
    report.add_argument("--json", action="store_true", help="machine-readable output")
    report.set_defaults(handler=cmd_report)

    estimate = command("estimate", "estimated tokens, cost and batches of a JSONL file before submitting it")
    estimate.add_argument("files", nargs="+")
    estimate.add_argument("--json", action="store_true", help="machine-readable output")
    estimate.set_defaults(handler=cmd_estimate)

    results = command("results", "query stored results")
    results.add_argument("--file", help="input file name, e.g. tickets.jsonl")
    results.add_argument("--custom-id", help="the custom_id of the input line")
    results.add_argument(
        "--status", choices=["succeeded", "errored", "expired", "canceled", "invalid"], help="only this outcome"
    )
    results.add_argument("--limit", type=int, default=1000, help="at most this many (default 1000)")
    results.add_argument("--json", action="store_true", help="print the result lines themselves (JSONL)")
    results.set_defaults(handler=cmd_results)

    redeliver = command("redeliver", "send parked results to their sink again")
    redeliver.add_argument("--sink", help="only this sink (default: all)")
    redeliver.set_defaults(handler=cmd_redeliver)

    emulator = commands.add_parser("emulator", help="serve a local emulator of both batch APIs")
    from .emulator.cli import add_arguments

    add_arguments(emulator)
    emulator.set_defaults(handler=cmd_emulator)

    demo = command("demo", "run the emulator and a daemon on a temporary spool, end to end")
    demo.add_argument("--requests", type=int, default=400, help="how many sample requests (default 400)")
    demo.add_argument("--keep", action="store_true", help="keep the temporary directory")
    demo.set_defaults(handler=cmd_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        status: int = args.handler(args)
    except ConfigError as exc:
        print(f"batchd: configuration error:\n{exc}", file=sys.stderr)
        return EX_CONFIG
    except KeyboardInterrupt:
        return 130
    return status


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
