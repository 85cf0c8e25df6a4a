"""Shared machinery of the benchmarks: worker processes, the emulator subprocess, data files, reporting.

Nothing here imports batchd or an SDK at module level: this module is imported by the worker
processes too, and a baseline worker must not carry batchd's memory.
"""

from __future__ import annotations

import contextlib
import json
import os
import select
import shutil
import signal
import statistics
import subprocess
import sys
import time
import urllib.request
import uuid
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from datetime import datetime
from pathlib import Path
from types import TracebackType
from typing import IO, Any

PYTHON = sys.executable
API_KEY_OPENAI = "sk-bench-openai-0000000000"
API_KEY_ANTHROPIC = "sk-ant-bench-0000000000"
MB = 1024 * 1024

# Modules each kind of worker needs, imported once by its zygote (see bench/zygote.py) so that a
# round pays neither the SDK's import time nor another side's memory.
PRELOADS: dict[str, tuple[str, ...]] = {
    "batchd-core": ("orjson", "uvloop", "batchd.cli", "batchd.spool", "batchd.store", "bench.batchd_setup"),
    "sqlite": ("orjson", "sqlite3"),
    "batchd-openai": (
        "orjson",
        "uvloop",
        "openai",
        "batchd.cli",
        "batchd.batcher",
        "batchd.poller",
        "batchd.sinks",
        "batchd.sinks.outbox",
        "batchd.providers.openai",
        "bench.batchd_setup",
    ),
    "openai": ("orjson", "uvloop", "openai"),
    "batchd-anthropic": (
        "orjson",
        "uvloop",
        "anthropic",
        "batchd.cli",
        "batchd.batcher",
        "batchd.providers.anthropic",
        "bench.batchd_setup",
    ),
    "anthropic": ("orjson", "uvloop", "anthropic"),
}


@dataclass(frozen=True)
class Scale:
    """Sizes, rounds and timings of one mode (full or --quick)."""

    quick: bool
    ingest_lines: int
    ingest_small_lines: int
    ingest_rounds: int
    submit_openai: int
    submit_anthropic: int
    submit_rounds: int
    collect_lines: int
    collect_rounds: int
    e2e_lines: int
    e2e_processing: float
    e2e_poll: float
    e2e_rounds: int
    idle_batches: int
    idle_interval: float
    idle_window: float
    idle_base_window: float
    drain_lines: int = 20_000
    drain_processing: float = 1.0
    drain_rounds: int = 1


@dataclass
class Context:
    """What every benchmark gets: its scale, a temporary root, the worker zygotes."""

    scale: Scale
    root: Path
    zygotes: Zygotes

    def workdir(self, *parts: str) -> Path:
        path = self.root.joinpath(*parts)
        path.mkdir(parents=True, exist_ok=True)
        return path


class BenchError(Exception):
    """A benchmark could not run (a worker failed, a deadline passed)."""


@dataclass
class Row:
    """One line of the results table."""

    name: str
    batchd: str
    baseline: str
    ratio: float | None
    target: str
    met: bool | None
    notes: str = ""
    details: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def median(values: Sequence[float]) -> float:
    return float(statistics.median(values)) if values else float("nan")


def log(message: str) -> None:
    """Progress goes to stderr; stdout is for the table."""
    print(f"[bench {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


# -- processes ----------------------------------------------------------------------------------


def proc_status(pid: int | str = "self") -> dict[str, int]:
    """The Vm* lines of /proc/PID/status, in bytes."""
    values: dict[str, int] = {}
    with open(f"/proc/{pid}/status") as handle:
        for line in handle:
            if line.startswith("Vm") and line.rstrip().endswith("kB"):
                key, _, rest = line.partition(":")
                values[key] = int(rest.split()[0]) * 1024
    return values


CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


@dataclass(frozen=True)
class CpuReading:
    """A process's CPU time: per-thread nanosecond counters, and the tick-resolution total."""

    threads: dict[str, int]
    ticks_seconds: float


def cpu_reading(pid: int) -> CpuReading:
    with open(f"/proc/{pid}/stat") as handle:
        fields = handle.read().rpartition(")")[2].split()
    # After the command name, utime and stime are fields 14 and 15 (0-based 11 and 12 here);
    # they include threads that have exited, but only in clock ticks (10 ms).
    ticks = (int(fields[11]) + int(fields[12])) / CLOCK_TICKS
    threads: dict[str, int] = {}
    for tid in os.listdir(f"/proc/{pid}/task"):
        with contextlib.suppress(OSError), open(f"/proc/{pid}/task/{tid}/schedstat") as handle:
            threads[tid] = int(handle.read().split()[0])
    return CpuReading(threads, ticks)


def cpu_between(before: CpuReading, after: CpuReading) -> float:
    """CPU seconds between two readings: nanosecond-exact unless a thread came or went meanwhile."""
    if set(before.threads) <= set(after.threads):
        return sum(after.threads[tid] - before.threads.get(tid, 0) for tid in after.threads) / 1e9
    return after.ticks_seconds - before.ticks_seconds


class Zygote:
    """A `python -m bench.zygote` process (or a spawn of one): imports once, forks a fresh child per job."""

    def __init__(self, name: str, root: Path, parent: Zygote | None = None) -> None:
        self.name = name
        self._root = root
        self._jobs = 0
        self._ready = False
        self._fifos: list[Path] = []
        self.proc: subprocess.Popen[bytes] | None = None
        if parent is None:
            self.log_path = root / f"zygote-{name}.log"
            self._log: IO[bytes] | None = self.log_path.open("ab")
            self.proc = subprocess.Popen(
                [PYTHON, "-m", "bench.zygote", ",".join(PRELOADS[name])],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=self._log,
                env={**os.environ, "PYTHONUNBUFFERED": "1"},
            )
            assert self.proc.stdin is not None and self.proc.stdout is not None
            self._commands: IO[bytes] = self.proc.stdin
            self._channel: IO[bytes] = self.proc.stdout
            return
        # A spawn of `parent`: it already holds the parent's imports and adds its own.
        self.log_path = parent.log_path
        self._log = None
        commands, channel = root / f"zygote-{name}.commands", root / f"zygote-{name}.channel"
        for fifo in (commands, channel):
            os.mkfifo(fifo)
            self._fifos.append(fifo)
        parent.wait_ready()
        parent._send({"spawn": list(PRELOADS[name]), "commands": str(commands), "channel": str(channel)})
        parent._read(30.0)  # {"pid"}
        self._commands = _open_fifo_for_writing(commands, 60.0)
        self._channel = channel.open("rb")

    def _send(self, command: dict[str, Any]) -> None:
        self._commands.write(json.dumps(command).encode() + b"\n")
        self._commands.flush()

    def wait_ready(self, timeout: float = 180.0) -> None:
        """Wait until the imports are done."""
        if not self._ready:
            try:
                self._read(timeout)
            except TimeoutError:
                raise BenchError(f"zygote {self.name} not ready within {timeout:.0f} s") from None
            self._ready = True

    def _read(self, timeout: float) -> dict[str, Any]:
        ready, _, _ = select.select([self._channel], [], [], max(timeout, 0.0))
        if not ready:
            raise TimeoutError
        line = self._channel.readline()
        if not line:
            raise BenchError(f"zygote {self.name} exited; see {self.log_path}:\n{self.tail()}")
        message: dict[str, Any] = json.loads(line)
        return message

    def tail(self, lines: int = 25) -> str:
        text = self.log_path.read_text(errors="replace").splitlines()
        return "\n".join(text[-lines:])

    def run(self, func: str, job_timeout: float, **args: Any) -> dict[str, Any]:
        """Run `module:function(**args)` in a fresh child; returns its result with peak_rss and cpu_s."""
        self.wait_ready()
        self._jobs += 1
        out = self._root / f"job-{self.name}-{self._jobs}.json"
        self._send({"func": func, "args": args, "out": str(out)})
        pid = int(self._read(30.0)["pid"])
        try:
            status = int(self._read(job_timeout)["status"])
        except TimeoutError:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
            self._read(30.0)
            raise BenchError(f"{func} did not finish within {job_timeout:.0f} s") from None
        if status != 0 or not out.exists():
            raise BenchError(f"{func} failed (exit {status}); log {self.log_path}:\n{self.tail()}")
        result: dict[str, Any] = json.loads(out.read_text())
        out.unlink()
        return result

    def close(self) -> None:
        """End of commands: the zygote (or spawn) leaves its loop and exits."""
        with contextlib.suppress(OSError):
            self._commands.close()
        if self.proc is not None:
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self._channel.close()
        if self._log is not None:
            self._log.close()
        for fifo in self._fifos:
            fifo.unlink(missing_ok=True)


def _open_fifo_for_writing(path: Path, timeout: float) -> IO[bytes]:
    """Open a named pipe's writing end once its reader is there (without blocking forever)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            fd = os.open(path, os.O_WRONLY | os.O_NONBLOCK)
        except OSError as exc:  # ENXIO: no reader yet
            if time.monotonic() > deadline:
                raise BenchError(f"no zygote reading {path}") from exc
            time.sleep(0.01)
            continue
        os.set_blocking(fd, True)
        return os.fdopen(fd, "wb")


# Zygotes made by spawning another (which holds a subset of their imports) instead of from scratch.
SPAWNED_FROM = {"batchd-openai": "openai", "batchd-anthropic": "anthropic"}


class Zygotes:
    """One zygote per preload set, started on first use (or all together up front)."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self._running: dict[str, Zygote] = {}

    def start(self, names: Iterable[str]) -> None:
        """Start these zygotes, in parallel where possible, and wait until all have their imports."""
        wanted = list(names)
        for name in wanted:  # the roots first, all at once
            root_name = SPAWNED_FROM.get(name, name)
            if root_name not in self._running:
                self._running[root_name] = Zygote(root_name, self.root)
        for name in wanted:
            self[name]
        for zygote in self._running.values():
            zygote.wait_ready()

    def __getitem__(self, name: str) -> Zygote:
        if name not in self._running:
            parent_name = SPAWNED_FROM.get(name)
            parent = self[parent_name] if parent_name else None
            self._running[name] = Zygote(name, self.root, parent)
        return self._running[name]

    def close(self) -> None:
        for zygote in reversed(list(self._running.values())):  # spawns before their parents
            zygote.close()
        self._running.clear()


class EmulatorProcess:
    """`python -m batchd.emulator` in its own process, so its CPU and memory are not batchd's."""

    def __init__(self, root: Path, processing_seconds: float, faults: dict[str, Any] | None = None) -> None:
        self.data_dir = root / "emulator-data"
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.log_path = root / "emulator.log"
        self._log = self.log_path.open("ab")
        self.proc = subprocess.Popen(
            [
                PYTHON,
                "-m",
                "batchd.emulator",
                "--host",
                "127.0.0.1",
                "--port",
                "0",
                "--processing-seconds",
                repr(processing_seconds),
                "--data-dir",
                str(self.data_dir),
                "--faults",
                json.dumps(faults or {}),
            ],
            stdout=subprocess.PIPE,
            stderr=self._log,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
        assert self.proc.stdout is not None
        ready, _, _ = select.select([self.proc.stdout], [], [], 60.0)
        line = self.proc.stdout.readline().decode() if ready else ""
        fields = dict(part.split("=", 1) for part in line.split() if "=" in part)
        if "openai_base_url" not in fields:
            self.close()
            raise BenchError(f"emulator did not start: {line!r}; see {self.log_path}")
        self.openai_base_url = fields["openai_base_url"]
        self.anthropic_base_url = fields["anthropic_base_url"]
        self.url = self.anthropic_base_url

    def stats(self) -> dict[str, Any]:
        with urllib.request.urlopen(self.url + "/_emulator/stats", timeout=30) as response:
            stats: dict[str, Any] = json.loads(response.read())
        return stats

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self._log.close()
        shutil.rmtree(self.data_dir, ignore_errors=True)

    def __enter__(self) -> EmulatorProcess:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


def wait_for(condition: Any, timeout: float, what: str, interval: float = 0.05) -> Any:
    """Poll `condition()` until truthy; BenchError at the deadline."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise BenchError(f"{what}: not within {timeout:.0f} s")
        time.sleep(interval)


# -- data -----------------------------------------------------------------------------------------

# A small chat request, about 300 bytes as a line.
SMALL_OPENAI = (
    b'{"custom_id":"req-%07d","method":"POST","url":"/v1/chat/completions","body":{"model":"%s",'
    b'"messages":[{"role":"system","content":"Classify the support ticket in one word."},'
    b'{"role":"user","content":"Ticket %07d: my order #%07d has not arrived, what can I do?"}],"max_tokens":16}}\n'
)
FILLER = (
    "The customer explains at length that the parcel left the warehouse on time, was scanned at the "
    "regional hub, then vanished from tracking for nine days before reappearing in another country. "
)
LARGE_OPENAI = (
    b'{"custom_id":"req-%07d","method":"POST","url":"/v1/chat/completions","body":{"model":"gpt-4o-mini",'
    b'"messages":[{"role":"system","content":"Summarise the support ticket in two sentences."},'
    b'{"role":"user","content":"Ticket %07d: %s"}],"max_tokens":128}}\n'
)
ANTHROPIC = (
    b'{"custom_id":"req-%07d","params":{"model":"claude-haiku-4-5","max_tokens":128,'
    b'"messages":[{"role":"user","content":"Ticket %07d: %s"}]}}\n'
)
# Body sizes chosen so that a full batch stays under each provider's byte limit (OpenAI: 50,000
# requests ≈ 198 MB of batchd's accounted size against 200 MB; Anthropic: 100,000 ≈ 210 MB of 256 MB).
LARGE_OPENAI_TEXT = 3_680
ANTHROPIC_TEXT = 1_940


def _filler(length: int) -> bytes:
    text = (FILLER * (length // len(FILLER) + 1))[:length]
    return text.encode()


def _write_lines(path: Path, lines: Iterator[bytes], chunk: int = 10_000) -> int:
    path.parent.mkdir(parents=True, exist_ok=True)
    size = 0
    buffer: list[bytes] = []
    with path.open("wb") as out:
        for line in lines:
            buffer.append(line)
            if len(buffer) >= chunk:
                size += out.write(b"".join(buffer))
                buffer.clear()
        size += out.write(b"".join(buffer))
    return size


def write_small_openai(path: Path, count: int, model: str = "gpt-4o-mini") -> int:
    """`count` small chat requests (about 300 bytes a line); returns the file size."""
    encoded = model.encode()
    return _write_lines(path, (SMALL_OPENAI % (i, encoded, i, 100_000 + i) for i in range(count)))


def write_large_openai(path: Path, count: int) -> int:
    """`count` chat requests of about 3.9 kB each (a full batch of 50,000 is about 200 MB)."""
    text = _filler(LARGE_OPENAI_TEXT)
    return _write_lines(path, (LARGE_OPENAI % (i, i, text) for i in range(count)))


def write_anthropic(path: Path, count: int) -> int:
    """`count` Anthropic batch requests of about 2 kB each (a full batch of 100,000 is about 200 MB)."""
    text = _filler(ANTHROPIC_TEXT)
    return _write_lines(path, (ANTHROPIC % (i, i, text) for i in range(count)))


def write_distinct_models(path: Path, count: int) -> int:
    """One small request per model, so that each becomes its own batch."""
    return _write_lines(path, (SMALL_OPENAI % (i, f"gpt-idle-{i:05d}".encode(), i, 100_000 + i) for i in range(count)))


def write_durably(path: Path, data: bytes) -> None:
    """Write, flush and fsync (a blocking helper, also for async code that means to block)."""
    with path.open("wb") as out:
        out.write(data)
        out.flush()
        os.fsync(out.fileno())


def count_matching_lines(path: Path, needle: bytes) -> int:
    """Lines containing `needle`, read line by line (so that checking a result uses no memory)."""
    with path.open("rb") as handle:
        return sum(1 for line in handle if needle in line)


def count_lines(path: Path) -> int:
    lines = 0
    with path.open("rb") as handle:
        while block := handle.read(1 << 20):
            lines += block.count(b"\n")
    return lines


# `python -m bench.run --engine postgresql` sets this to the server's URL: batchd's side then opens a
# fresh schema of it (BENCH_SCHEMA_PREFIX + random) wherever it would open a new SQLite file.
POSTGRES_ENV = "BENCH_POSTGRES_URL"
BENCH_SCHEMA_PREFIX = "batchd_bench_"


def store_url(sqlite_path: Path) -> str:
    """The store batchd's side opens: the SQLite file at `sqlite_path`, or a fresh PostgreSQL schema."""
    base = os.environ.get(POSTGRES_ENV)
    if not base:
        return "sqlite:///" + str(sqlite_path)
    return f"{base}{'&' if '?' in base else '?'}schema={BENCH_SCHEMA_PREFIX}{uuid.uuid4().hex[:12]}"


def write_daemon_config(
    root: Path, emulator: EmulatorProcess, batching: dict[str, Any], openai: dict[str, Any]
) -> Path:
    """A TOML config for `python -m batchd run` on `root`, pointed at the emulator subprocess."""
    sections: dict[str, dict[str, Any]] = {
        "daemon": {
            "spool_dir": str(root / "spool"),
            "state_dir": str(root / "state"),
            "log_format": "json",
            "log_level": "info",
        },
        **({"store": {"url": store_url(root / "state" / "batchd.sqlite3")}} if os.environ.get(POSTGRES_ENV) else {}),
        "batching": batching,
        "providers.openai": {
            "kind": "openai",
            "base_url": emulator.openai_base_url,
            "api_key_env": "BENCH_OPENAI_KEY",
            **openai,
        },
        "providers.anthropic": {
            "kind": "anthropic",
            "base_url": emulator.anthropic_base_url,
            "api_key_env": "BENCH_ANTHROPIC_KEY",
        },
    }
    text = []
    for name, values in sections.items():
        text.append(f"[{name}]")
        text.extend(f"{key} = {json.dumps(value)}" for key, value in values.items())
        text.append("")
    path = root / "batchd.toml"
    path.write_text("\n".join(text))
    return path


class DaemonProcess:
    """`python -m batchd run --config PATH`, its JSON log in a file."""

    def __init__(self, config: Path, log_path: Path) -> None:
        self.log_path = log_path
        self._log = log_path.open("ab")
        env = {
            **os.environ,
            "BENCH_OPENAI_KEY": API_KEY_OPENAI,
            "BENCH_ANTHROPIC_KEY": API_KEY_ANTHROPIC,
            "PYTHONUNBUFFERED": "1",
        }
        self.proc = subprocess.Popen(
            [PYTHON, "-m", "batchd", "run", "--config", str(config)],
            stdout=self._log,
            stderr=subprocess.STDOUT,
            env=env,
        )
        self.pid = self.proc.pid

    def events(self, name: str) -> int:
        """How many log events of this name so far."""
        needle = f'"event":"{name}"'.encode()
        return self.log_path.read_bytes().count(needle)

    def event_times(self, name: str) -> list[float]:
        """The unix times of this event's log lines so far, in log order."""
        times = []
        for line in self.log_path.read_bytes().splitlines():
            if f'"event":"{name}"'.encode() in line:
                with contextlib.suppress(ValueError, KeyError):
                    stamp = json.loads(line)["timestamp"].replace("Z", "+00:00")
                    times.append(datetime.fromisoformat(stamp).timestamp())
        return times

    def wait_ready(self, timeout: float = 120.0) -> None:
        def ready() -> bool:
            if self.proc.poll() is not None:
                raise BenchError(f"daemon exited with {self.proc.returncode}; see {self.log_path}")
            return self.events("daemon.ready") > 0

        wait_for(ready, timeout, "daemon ready")

    def check_alive(self) -> None:
        if self.proc.poll() is not None:
            raise BenchError(f"daemon exited with {self.proc.returncode}; see {self.log_path}")

    def stop(self) -> None:
        """SIGKILL: the figures have been read, and batchd is built to survive kill -9 (a graceful stop
        would wait for graceful_timeout, as the spool loop notices a stop only at its next rescan)."""
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(30)
        self._log.close()


# -- reporting ------------------------------------------------------------------------------------


def fmt_rate(value: float, unit: str) -> str:
    if value >= 1_000_000:
        return f"{value / 1_000_000:.2f}M {unit}"
    if value >= 10_000:
        return f"{value / 1000:.1f}k {unit}"
    return f"{value:.0f} {unit}"


def fmt_mb(value: float) -> str:
    return f"{value / MB:.0f} MB"


def fmt_seconds(value: float) -> str:
    return f"{value:.2f} s" if value < 100 else f"{value:.0f} s"


def paired_seconds(
    ours: list[dict[str, Any]], theirs: list[dict[str, Any]], count: int, baseline: str
) -> tuple[float, float, float]:
    """Medians of batchd's and the baseline's seconds and of their per-round ratio, once both sides
    are proven to have written one result line per request (batchd: every one succeeded)."""
    for result in ours:
        if result["lines"] != count or result["succeeded"] != count:
            raise BenchError(f"daemon wrote {result['lines']} result lines ({result['succeeded']} succeeded)")
    if any(result["lines"] != count for result in theirs):
        raise BenchError(f"{baseline} wrote {[r['lines'] for r in theirs]} result lines, expected {count}")
    ratio = median([a["seconds"] / b["seconds"] for a, b in zip(ours, theirs, strict=True)])
    return median([r["seconds"] for r in ours]), median([r["seconds"] for r in theirs]), ratio
