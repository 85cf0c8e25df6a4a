"""The command line: `batchd run | submit | status | batches | pause | resume | flush | cancel | retry | report | …`.

The configuration is found at --config, else $BATCHD_CONFIG, else /etc/batchd/batchd.toml (when it
exists), else the built-in defaults. Commands that only read (status, batches, report, results,
estimate) open the database read-only and never create or migrate it; pause, resume, flush, cancel, retry and redeliver
write beside the running daemon, but never create or migrate either.

An operator's mistake never ends in a Python traceback: every command reports it in one line on
stderr (`batchd COMMAND: what went wrong`) and exits with a sysexits status (see batchd/exits.py):
64 usage, 65 a database of another schema, 66 missing input, 73 cannot create, 74 I/O error,
75 another daemon holds the state directory, 77 permission, 78 configuration.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import signal
import sys
from collections.abc import Coroutine
from pathlib import Path
from typing import Any, NoReturn, TypeVar

import orjson

from . import __version__
from .exits import (
    EX_CONFIG,
    EX_IOERR,
    EX_USAGE,
    OperatorError,
    creating_status,
    reading_status,
    reason,
)
from .settings import Settings, load_settings, parse_duration

T = TypeVar("T")

EX_SOFTWARE = 70  # an internal error: a bug, reported with its (redacted) traceback in the log

__all__ = ["EX_CONFIG", "build_parser", "main", "run_loop"]


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
    from .logs import configure_logging, get_logger
    from .settings import configured_secrets

    settings = _settings(args)
    configure_logging(settings.daemon.log_format, settings.daemon.log_level, secrets=configured_secrets(settings))
    daemon = Daemon(settings, freeze_after_start=True)
    try:
        status = run_loop(daemon.run())
    except OperatorError:
        raise
    except Exception:
        # A bug, not an operator's mistake: its traceback goes to the log, where secrets are redacted.
        get_logger("batchd.daemon").critical("daemon.crashed", exc_info=True)
        return EX_SOFTWARE
    if status == 0 and daemon.stop_signal is not None:
        # Die of the signal that stopped us, so the exit status tells systemd the truth.
        sys.stdout.flush()
        signal.signal(daemon.stop_signal, signal.SIG_DFL)
        os.kill(os.getpid(), daemon.stop_signal)
    return status


def _input_file(name: str) -> Path:
    """`name` as an input file that exists and can be read, or an OperatorError saying why not."""
    path = Path(name)
    try:
        with path.open("rb"):
            pass
    except OSError as exc:
        raise OperatorError(f"{name}: {reason(exc)}", reading_status(exc)) from None
    return path


def _deadline(text: str | None) -> str | None:
    """A --deadline as its sidecar will say it, checked before anything is written (exit 64 if unreadable)."""
    if text is None:
        return None
    from .sidecar import deadline_text

    try:
        return deadline_text(text)
    except ValueError as exc:
        raise OperatorError(f"--deadline: {exc}", EX_USAGE) from None


def cmd_submit(args: argparse.Namespace) -> int:
    from .spool import submit_file

    deadline = _deadline(args.deadline)
    spool_dir = args.spool_dir or _settings(args).daemon.spool_dir
    sources = [_input_file(name) for name in args.files]
    for source in sources:
        try:
            target = submit_file(source, spool_dir, name=args.name if len(sources) == 1 else None, deadline=deadline)
        except ValueError as exc:  # a --name that is not a plain file name
            raise OperatorError(str(exc), EX_USAGE) from None
        except OSError as exc:
            where = exc.filename if exc.filename is not None else spool_dir
            if exc.filename == str(source):
                raise OperatorError(f"{source}: {reason(exc)}", reading_status(exc)) from None
            raise OperatorError(f"cannot write into the spool ({where}): {reason(exc)}", creating_status(exc)) from None
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

    return run_loop(run_report(_settings(args), args.since, args.by, args.json))


def cmd_estimate(args: argparse.Namespace) -> int:
    from .report import estimate_file, render_estimate
    from .status import terminal

    settings = _settings(args)
    for name in args.files:
        path = _input_file(name)
        try:
            estimate = estimate_file(settings, path)
        except OSError as exc:
            raise OperatorError(f"{name}: {reason(exc)}", reading_status(exc)) from None
        if args.json:
            print(orjson.dumps(estimate, option=orjson.OPT_INDENT_2).decode())
        else:
            render_estimate(estimate, terminal())
    return 0


def cmd_results(args: argparse.Namespace) -> int:
    from .results import show_results

    return run_loop(show_results(_settings(args), args.file, args.custom_id, args.status, args.limit, args.json))


def cmd_redeliver(args: argparse.Namespace) -> int:
    from .status import existing_store, no_store

    settings = _settings(args)

    async def flag() -> int | None:
        # It writes, so read-write; but it never creates or migrates a database.
        async with existing_store(settings, writable=True) as store:
            return None if store is None else await store.request_redelivery(args.sink)

    count = run_loop(flag())
    if count is None:
        raise no_store(settings)
    print(f"{count} parked results will be delivered again by the running daemon")
    return 0


def cmd_migrate(args: argparse.Namespace) -> int:
    from .status import store_url
    from .store import open_store

    settings = _settings(args)
    url = store_url(settings)
    if url.path is not None:
        try:
            url.path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise OperatorError(
                f"cannot create the directory of {url.path}: {reason(exc)}", creating_status(exc)
            ) from None

    async def migrate() -> tuple[int, int]:
        store = open_store(settings.store_url, settings.node_id(create=False) or "")
        try:
            return await store.migrate()
        finally:
            await store.close()

    before, after = run_loop(migrate())
    where = url.redacted()
    if before == after:
        print(f"{where}: schema version {after}, nothing to migrate")
    else:
        print(f"{where}: schema version {before} -> {after}")
    return 0


def cmd_batches(args: argparse.Namespace) -> int:
    from .control import list_batches

    return run_loop(list_batches(_settings(args), args.live, args.limit, args.json))


def cmd_pause(args: argparse.Namespace) -> int:
    from .control import pause

    return run_loop(pause(_settings(args), args.route, args.reason))


def cmd_resume(args: argparse.Namespace) -> int:
    from .control import resume

    return run_loop(resume(_settings(args), args.route))


def cmd_flush(args: argparse.Namespace) -> int:
    from .control import flush

    return run_loop(flush(_settings(args), args.route))


def cmd_cancel(args: argparse.Namespace) -> int:
    from .control import cancel

    return run_loop(cancel(_settings(args), args.batch, args.file))


def cmd_retry(args: argparse.Namespace) -> int:
    from .retry import retry

    deadline = _deadline(args.deadline)
    return run_loop(retry(_settings(args), args.file, args.status, deadline))


def _statuses(text: str) -> list[str]:
    allowed = ("errored", "expired", "canceled")
    words = [word.strip() for word in text.split(",") if word.strip()]
    wrong = [word for word in words if word not in allowed]
    if not words or wrong:
        raise argparse.ArgumentTypeError(f"not among {', '.join(allowed)}: {text!r}")
    return words


def cmd_init_service(args: argparse.Namespace) -> int:
    from .service import SERVICE_FILES, print_service_files, write_service_files

    if args.write is None:
        sys.stdout.write(print_service_files())
        return 0
    for name, path in write_service_files(Path(args.write)).items():
        print(f"{path}  (install as {SERVICE_FILES[name]})")
    return 0


def cmd_emulator(args: argparse.Namespace) -> int:
    from .emulator.cli import main as emulator_main

    return emulator_main(args)


def cmd_demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    return run_loop(run_demo(requests=args.requests, keep=args.keep))


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage mistake is one line and exit status 64 (EX_USAGE), as elsewhere."""

    def error(self, message: str) -> NoReturn:
        self.exit(EX_USAGE, f"{self.prog}: {message} (see {self.prog} --help)\n")


def _duration(text: str) -> float:
    try:
        return float(parse_duration(text))
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _positive(kind: type[int] | type[float]) -> Any:
    def parse(text: str) -> int | float:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
        if value <= 0:
            raise argparse.ArgumentTypeError(f"must be greater than 0: {text!r}")
        return value

    parse.__name__ = kind.__name__
    return parse


def build_parser(command_hint: str | None = None) -> argparse.ArgumentParser:
    """The parser; with `command_hint` (the command about to run), another command's heavy imports are skipped."""
    parser = _Parser(prog="batchd", description="Moves LLM calls that can wait onto batch APIs.")
    parser.add_argument("--version", action="version", version=f"batchd {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    def command(name: str, help_text: str) -> argparse.ArgumentParser:
        sub = commands.add_parser(name, help=help_text, description=help_text)
        sub.add_argument(
            "--config",
            help="TOML config file (default: $BATCHD_CONFIG, else /etc/batchd/batchd.toml if it exists,"
            " else built-in defaults)",
        )
        return sub

    run = command("run", "run the daemon in the foreground")
    run.set_defaults(handler=cmd_run)

    submit = command("submit", "queue JSONL files by writing them into the spool safely")
    submit.add_argument("files", nargs="+", help="JSONL files of OpenAI batch lines or Anthropic batch requests")
    submit.add_argument("--name", help="file name in the spool, one file only (default: the file's own name)")
    submit.add_argument("--spool-dir", help="spool directory (default: daemon.spool_dir of the config)")
    submit.add_argument(
        "--deadline",
        metavar="WHEN",
        help="when every result must exist: ISO 8601 with a UTC offset (2026-12-01T07:00+01:00) or relative to"
        " the file's arrival (8h, 90m); written as NAME.meta.json beside each file (default: its route's deadline)",
    )
    submit.set_defaults(handler=cmd_submit)

    status = command("status", "queue depth per route, live batches, recent errors")
    status.add_argument("--json", action="store_true", help="machine-readable output (default: a table)")
    status.add_argument("--watch", action="store_true", help="a live view, until Ctrl-C (default: print once)")
    status.add_argument(
        "--interval", type=_positive(float), default=1.0, help="seconds between refreshes with --watch (default 1)"
    )
    status.add_argument(
        "--count", type=_positive(int), help="stop after this many refreshes with --watch (default: until Ctrl-C)"
    )
    status.set_defaults(handler=cmd_status)

    report = command("report", "what was paid, what real-time would have cost, and the saving")
    report.add_argument("--since", type=_duration, default="30d", help="how far back (e.g. 7d, 12h; default 30d)")
    report.add_argument(
        "--by", choices=["model", "day", "file", "provider"], default="model", help="one row per (default model)"
    )
    report.add_argument("--json", action="store_true", help="machine-readable output (default: a table)")
    report.set_defaults(handler=cmd_report)

    estimate = command("estimate", "estimated tokens, cost and batches of a JSONL file before submitting it")
    estimate.add_argument("files", nargs="+", help="JSONL files, as they would be submitted")
    estimate.add_argument("--json", action="store_true", help="machine-readable output (default: a table)")
    estimate.set_defaults(handler=cmd_estimate)

    results = command("results", "query stored results")
    results.add_argument("--file", help="input file name, e.g. tickets.jsonl (default: every file)")
    results.add_argument("--custom-id", help="the custom_id of the input line (default: any)")
    results.add_argument(
        "--status",
        choices=["succeeded", "errored", "expired", "canceled", "invalid"],
        help="only this outcome (default: any)",
    )
    results.add_argument("--limit", type=_positive(int), default=1000, help="at most this many (default 1000)")
    results.add_argument(
        "--json", action="store_true", help="print the result lines themselves, JSONL (default: a table)"
    )
    results.set_defaults(handler=cmd_results)

    redeliver = command("redeliver", "send parked results to their sink again")
    redeliver.add_argument("--sink", help="only this sink (default: all)")
    redeliver.set_defaults(handler=cmd_redeliver)

    migrate = command("migrate", "apply the store's schema migrations (the daemon also does at start)")
    migrate.set_defaults(handler=cmd_migrate)

    batches = command("batches", "list batches: id, provider, remote id, state or fate, counts, created, node")
    batches.add_argument("--live", action="store_true", help="only batches not yet ended (default: every state)")
    batches.add_argument(
        "--limit", type=_positive(int), default=50, help="at most this many, newest first (default 50)"
    )
    batches.add_argument("--json", action="store_true", help="machine-readable output (default: a table)")
    batches.set_defaults(handler=cmd_batches)

    route_help = (
        "PROFILE (every model of a provider profile), PROFILE/MODEL, or a [[routes]] name; `*` or nothing"
        " means every route (default: every route)"
    )
    pause = command(
        "pause",
        "stop submitting new batches for a route, through the store, with the daemon running; intake and"
        " collection continue, and the pause survives restarts until `batchd resume`",
    )
    pause.add_argument("route", nargs="?", metavar="ROUTE", help=route_help)
    pause.add_argument("--reason", help="why, shown by `batchd status` (default: none)")
    pause.set_defaults(handler=cmd_pause)

    resume = command("resume", "lift a pause made by `batchd pause`; the daemon submits on its next flush")
    resume.add_argument(
        "route", nargs="?", metavar="ROUTE", help="the ROUTE as it was paused (default: lift every pause)"
    )
    resume.set_defaults(handler=cmd_resume)

    flush = command(
        "flush",
        "submit a route's queued requests at the daemon's next pass, through the store: not waiting for max_wait,"
        " a full batch or the route's window; a pause, a hold or a capacity limit still applies",
    )
    flush.add_argument(
        "route",
        nargs="?",
        metavar="ROUTE",
        help="a route name ([[routes]] name, or a provider profile); `*` or nothing means every route"
        " (default: every route)",
    )
    flush.set_defaults(handler=cmd_flush)

    cancel = command(
        "cancel",
        "cancel a batch, or every batch holding a file's requests, at the provider, through the store with the"
        " daemon running (it makes the call); cancelled requests end `canceled` and are not retried",
    )
    cancel.add_argument(
        "batch",
        nargs="?",
        metavar="BATCH",
        help="our batch id or the provider's batch id, as `batchd batches` shows them (default: none; or --file)",
    )
    cancel.add_argument(
        "--file",
        metavar="NAME",
        help="an input file name, e.g. tickets.jsonl: its queued requests end canceled at once, the batches"
        " holding its other requests are cancelled, and other files' requests in them are requeued",
    )
    cancel.set_defaults(handler=cmd_cancel)

    retry = command(
        "retry",
        "send a file's failed requests again, through the store with the daemon running; their new results"
        " go to out/NAME.retryN.results.jsonl (exactly the retried lines), the original results are not touched",
    )
    retry.add_argument("--file", metavar="NAME", required=True, help="the input file name, e.g. tickets.jsonl")
    retry.add_argument(
        "--status",
        type=_statuses,
        default="errored,expired",
        help="retry the requests whose latest outcome is one of these, comma-separated (default: errored,expired)",
    )
    retry.add_argument(
        "--deadline",
        metavar="WHEN",
        help="a deadline for the retried requests, as for submit (relative: from now); default: none (the"
        " original deadline is not carried over)",
    )
    retry.set_defaults(handler=cmd_retry)

    init_service = commands.add_parser(
        "init-service",
        help="print (or write) the systemd units and the example configuration shipped with batchd",
        description="print (or write) the systemd units and the example configuration shipped with batchd",
    )
    init_service.add_argument(
        "--write", metavar="DIR", help="write the files into DIR, never over existing ones (default: print them)"
    )
    init_service.set_defaults(handler=cmd_init_service)

    emulator_help = "serve a local emulator of both batch APIs (OpenAI and Anthropic), for tests and demos"
    emulator = commands.add_parser("emulator", help=emulator_help, description=emulator_help)
    if command_hint in (None, "emulator"):
        # Its flags come with the emulator (aiohttp and all): ~1 s that `batchd status` need not pay.
        from .emulator.cli import add_arguments

        add_arguments(emulator)
    emulator.set_defaults(handler=cmd_emulator)

    demo_help = "run the emulator and a daemon on a temporary spool, end to end (its own config: no --config)"
    demo = commands.add_parser("demo", help=demo_help, description=demo_help)
    demo.add_argument("--requests", type=_positive(int), default=400, help="how many sample requests (default 400)")
    demo.add_argument("--keep", action="store_true", help="keep the temporary directory (default: removed)")
    demo.set_defaults(handler=cmd_demo)
    _document_defaults(parser)
    return parser


def _document_defaults(parser: argparse.ArgumentParser) -> None:
    """Every option's help names its default: appended where the text does not already say it."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                _document_defaults(sub)
            continue
        if isinstance(action, argparse._HelpAction | argparse._VersionAction):
            continue
        if not action.option_strings or action.help in (None, argparse.SUPPRESS) or "default" in action.help:
            continue
        if action.required:
            action.help += " (required)"
        elif isinstance(action, argparse._StoreTrueAction):
            action.help += " (default: off)"
        elif action.default is None:
            action.help += " (default: none)"
        else:
            action.help += f" (default: {action.default})"


def main(argv: list[str] | None = None) -> int:
    words = sys.argv[1:] if argv is None else argv
    args = build_parser(next((word for word in words if not word.startswith("-")), None)).parse_args(argv)
    prefix = f"batchd {args.command}"
    try:
        status: int = args.handler(args)
        # Output still buffered must reach its target here, where a failure can be reported.
        sys.stdout.flush()
    except OperatorError as exc:
        kind = "configuration error: " if exc.status == EX_CONFIG else ""
        print(f"{prefix}: {kind}{exc.line}", file=sys.stderr)
        return exc.status
    except KeyboardInterrupt:
        return 130
    except OSError as exc:
        if exc.filename is None:
            # Most likely stdout itself (a full disk, a closed pipe): point it at /dev/null so the
            # interpreter's own flush at exit does not add a second message.
            with contextlib.suppress(OSError):
                os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        if isinstance(exc, BrokenPipeError):
            return EX_IOERR  # the reader went away (`batchd results --json | head`): nothing to say
        where = f" ({exc.filename})" if exc.filename is not None else ""
        print(f"{prefix}: {reason(exc)}{where}", file=sys.stderr)
        return EX_IOERR if exc.filename is None else reading_status(exc)
    return status


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
