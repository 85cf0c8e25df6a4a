"""Command-line entry of the emulator; ``batchd emulator`` wires these two functions."""

from __future__ import annotations

import argparse
import asyncio
import signal
import sys
from pathlib import Path

import orjson

from batchd.emulator.config import EmulatorConfig, Faults
from batchd.emulator.server import start_emulator


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the emulator's flags to ``parser``."""
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=8089, help="port to listen on; 0 picks a free one")
    parser.add_argument(
        "--processing-seconds",
        type=float,
        default=EmulatorConfig.processing_seconds,
        help="wall time from create to end of each batch",
    )
    parser.add_argument("--time-scale", type=float, default=1.0, help="multiplies --processing-seconds")
    parser.add_argument(
        "--api-key",
        action="append",
        dest="api_keys",
        metavar="KEY",
        help="accept only this key (repeatable); default: any non-empty key",
    )
    parser.add_argument(
        "--faults", default="{}", metavar="JSON", help="faults as JSON, e.g. '{\"http_error_rate\": 0.1}'"
    )
    parser.add_argument("--data-dir", type=Path, default=None, help="where files live (default: a temp dir)")
    parser.add_argument(
        "--completion-window",
        action="append",
        dest="completion_windows",
        metavar="WINDOW",
        help="a completion_window OpenAI batch creates accept (repeatable, e.g. 24h, 1h); default: 24h only",
    )
    parser.add_argument(
        "--webhook-url", default=None, help="POST signed OpenAI batch.* events here when a batch ends (default: none)"
    )
    parser.add_argument(
        "--webhook-secret", default=None, help="the whsec_ secret those events are signed with (default: none)"
    )


def config_from_args(args: argparse.Namespace) -> EmulatorConfig:
    """Build the configuration from parsed flags; raises ValueError on bad --faults."""
    changes = orjson.loads(args.faults)
    if not isinstance(changes, dict):
        raise ValueError("--faults must be a JSON object")
    return EmulatorConfig(
        processing_seconds=args.processing_seconds,
        time_scale=args.time_scale,
        api_keys=frozenset(args.api_keys) if args.api_keys else None,
        data_dir=args.data_dir,
        faults=Faults().merged(changes),
        completion_windows=tuple(args.completion_windows or ("24h",)),
        webhook_url=args.webhook_url,
        webhook_secret=args.webhook_secret,
    )


async def _serve(config: EmulatorConfig, host: str, port: int) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    async with await start_emulator(config, host, port) as emu:
        print(
            f"batchd emulator: openai_base_url={emu.openai_base_url} anthropic_base_url={emu.anthropic_base_url}",
            flush=True,
        )
        await stop.wait()


def main(args: argparse.Namespace) -> int:
    """Serve until SIGINT/SIGTERM; returns the process exit code."""
    try:
        config = config_from_args(args)
    except (ValueError, TypeError) as exc:  # orjson.JSONDecodeError is a ValueError too
        print(f"batchd emulator: invalid --faults: {exc}", file=sys.stderr)
        return 2
    try:
        asyncio.run(_serve(config, args.host, args.port))
    except OSError as exc:  # typically the port is taken
        print(f"batchd emulator: cannot listen on {args.host}:{args.port}: {exc}", file=sys.stderr)
        return 1
    return 0
