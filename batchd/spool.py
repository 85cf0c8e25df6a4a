"""The spool: a maildir-style directory that producers drop JSONL files into.

    spool/tmp/       producers write here, fsync, then rename into new/
    spool/new/       batchd ingests *.jsonl files found here
    spool/done/      ingested files
    spool/rejected/  files that could not be read at all, each with NAME.error.json
    spool/out/       results (written by the outbox sink)

A file is ingested in one SQLite transaction keyed by (name, content hash); it leaves new/ only
after that commit is durable, so a crash at any point re-ingests it idempotently.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import secrets
import stat
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import IO, Any

import orjson
import watchfiles

from .aio import wait_any
from .crashpoints import CrashPoints
from .formats import LineError, invalid_result, parse_line
from .logs import get_logger
from .settings import Settings
from .store import NewItem, NewResult, Store

SUBDIRS = ("tmp", "new", "done", "rejected", "out")
CHUNK_LINES = 2000
# Bytes around each request in a provider batch (custom_id, method, url, separators).
LINE_OVERHEAD = 96

log = get_logger("batchd.spool")


class SpoolPaths:
    """The directories of one spool."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.tmp = root / "tmp"
        self.new = root / "new"
        self.done = root / "done"
        self.rejected = root / "rejected"
        self.out = root / "out"

    def create(self, mode: int = 0o2775) -> None:
        for name in SUBDIRS:
            path = self.root / name
            path.mkdir(parents=True, exist_ok=True)
        # out/ holds results that may be sensitive: readable by the group, not by others.
        with contextlib.suppress(PermissionError):
            self.out.chmod(0o2750)


@dataclass(slots=True)
class IngestReport:
    name: str
    lines: int = 0
    queued: int = 0
    invalid: int = 0
    seconds: float = 0.0


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _unique_target(directory: Path, name: str) -> Path:
    target = directory / name
    if not target.exists() and not target.is_symlink():
        return target
    stem, dot, suffix = name.partition(".")
    return directory / f"{stem}.{int(time.time())}.{secrets.token_hex(3)}{dot}{suffix}"


def _read_lines(handle: IO[bytes], max_bytes: int) -> Iterator[tuple[int, bytes | None, int]]:
    """(line number, content without newline or None when over max_bytes, length) for each line."""
    number = 0
    while True:
        raw = handle.readline(max_bytes + 2)
        if not raw:
            return
        number += 1
        if len(raw) > max_bytes + 1:  # more than max_bytes before the newline
            # Too long: skip the rest of it without holding it in memory.
            length = len(raw)
            while not raw.endswith(b"\n"):
                raw = handle.readline(1 << 20)
                if not raw:
                    break
                length += len(raw)
            yield number, None, length
            continue
        content = raw[:-1] if raw.endswith(b"\n") else raw
        if content.endswith(b"\r"):
            content = content[:-1]
        yield number, content, len(raw)


def _sha256(path: Path) -> tuple[str, int]:
    digest = hashlib.sha256()
    size = 0
    with path.open("rb") as handle:
        while block := handle.read(1 << 20):
            digest.update(block)
            size += len(block)
    return digest.hexdigest(), size


class Spool:
    """Watches new/ and ingests each file into the store."""

    def __init__(
        self, settings: Settings, store: Store, on_ingest: Callable[[], None], crashpoints: CrashPoints | None = None
    ) -> None:
        self.settings = settings
        self._crashpoints = crashpoints or CrashPoints("")
        self.paths = SpoolPaths(settings.daemon.spool_dir)
        self.store = store
        self._on_ingest = on_ingest
        self._wake = asyncio.Event()
        self._waiting: dict[str, float] = {}
        self._routes: dict[tuple[str, str], str | None] = {}  # (kind, model) -> profile, per settings

    def wake(self) -> None:
        self._wake.set()

    async def rescan(self) -> int:
        """Ingest everything in new/ now; returns how many files were taken."""
        taken = 0
        try:
            names = sorted(os.listdir(self.paths.new))
        except FileNotFoundError:
            self.paths.create()
            return 0
        for name in names:
            if name.startswith("."):
                continue
            if await self._take(name):
                taken += 1
        return taken

    async def run(self, stopping: asyncio.Event) -> None:
        """Ingest until `stopping` is set: on inotify events, and every rescan_interval anyway."""
        watcher = asyncio.create_task(self._watch(stopping), name="spool-watch")
        try:
            while not stopping.is_set():
                await self.rescan()
                self._clean_done()
                timeout = self.settings.daemon.rescan_interval
                if self._waiting:  # a file still being written: look again soon
                    timeout = min(timeout, max(self.settings.daemon.settle_time / 2, 0.2))
                await wait_any(timeout, self._wake, stopping)
                self._wake.clear()
        finally:
            watcher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await watcher

    async def _watch(self, stopping: asyncio.Event) -> None:
        try:
            async for _changes in watchfiles.awatch(
                self.paths.new, stop_event=stopping, debounce=50, step=200, recursive=False
            ):
                self._wake.set()
        except (OSError, RuntimeError) as exc:  # inotify unavailable: the periodic rescan still works
            log.warning("spool.watch_failed", error=str(exc))

    def _clean_done(self) -> None:
        cutoff = time.time() - self.settings.daemon.done_retention
        try:
            entries = list(os.scandir(self.paths.done))
        except FileNotFoundError:
            return
        for entry in entries:
            with contextlib.suppress(OSError):
                if entry.is_file(follow_symlinks=False) and entry.stat(follow_symlinks=False).st_mtime < cutoff:
                    os.unlink(entry.path)

    def _reject(self, name: str, reason: str) -> None:
        source = self.paths.new / name
        target = _unique_target(self.paths.rejected, name)
        try:
            os.rename(source, target)
        except FileNotFoundError:
            return
        report = {"file": name, "error": reason, "at": datetime.now(UTC).isoformat()}
        error_path = target.with_name(target.name + ".error.json")
        error_path.write_bytes(orjson.dumps(report, option=orjson.OPT_INDENT_2) + b"\n")
        _fsync_dir(self.paths.rejected)
        log.warning("spool.rejected", file=name, reason=reason)

    async def _take(self, name: str) -> bool:
        path = self.paths.new / name
        try:
            info = os.lstat(path)
        except FileNotFoundError:
            return False
        try:
            name.encode("utf-8")
        except UnicodeEncodeError:
            self._reject(name, "file name is not valid UTF-8")
            return True
        if stat.S_ISLNK(info.st_mode):
            self._reject(name, "symlinks are refused: write the file itself into the spool")
            return True
        if stat.S_ISDIR(info.st_mode):
            self._reject(name, "a directory is not a spool file")
            return True
        if not stat.S_ISREG(info.st_mode):
            self._reject(name, "not a regular file")
            return True
        if not name.endswith(".jsonl"):
            return False
        if info.st_size == 0:
            self._reject(name, "empty file: no request lines")
            return True
        if not self._settled(path, info):
            self._waiting[name] = info.st_mtime
            return False
        self._waiting.pop(name, None)
        try:
            report = await self.ingest(name)
        except OSError as exc:
            self._reject(name, f"cannot read file: {exc.strerror or exc}")
            return True
        if report is None:
            return True
        self._on_ingest()
        return True

    def _settled(self, path: Path, info: os.stat_result) -> bool:
        """False while a file without a final newline may still be being written."""
        with path.open("rb") as handle:
            handle.seek(-1, os.SEEK_END)
            if handle.read(1) == b"\n":
                return True
        return time.time() - info.st_mtime >= self.settings.daemon.settle_time

    async def ingest(self, name: str) -> IngestReport | None:
        """Ingest new/NAME in one transaction and move it to done/."""
        path = self.paths.new / name
        started = time.monotonic()
        sha256, size = await asyncio.to_thread(_sha256, path)
        report = IngestReport(name)
        if await self.store.file_known(name, sha256):
            log.info("spool.already_ingested", file=name)
        else:
            log.info("spool.ingesting", file=name, bytes=size)
            async with self.store.ingest(name, sha256, size) as ingest:
                with path.open("rb") as handle:
                    lines = _read_lines(handle, self.settings.max_line_bytes)
                    while True:
                        items, invalid, count = self._parse_chunk(lines)
                        if not count:
                            break
                        await ingest.add(items, invalid, count)
                        self._crashpoints.reach("mid-ingest")
            report.lines, report.queued, report.invalid = ingest.lines, ingest.queued, ingest.invalid
        target = _unique_target(self.paths.done, name)
        os.rename(path, target)
        _fsync_dir(self.paths.new)
        report.seconds = round(time.monotonic() - started, 3)
        if report.lines:
            log.info(
                "spool.ingested",
                file=name,
                lines=report.lines,
                queued=report.queued,
                invalid=report.invalid,
                bytes=size,
                seconds=report.seconds,
            )
        return report

    def _parse_chunk(
        self, lines: Iterator[tuple[int, bytes | None, int]]
    ) -> tuple[list[NewItem], list[NewResult], int]:
        items: list[NewItem] = []
        invalid: list[NewResult] = []
        count = 0
        for number, content, length in lines:
            count += 1
            try:
                items.append(self._item(number, content, length))
            except LineError as exc:
                custom_id = exc.custom_id or f"line-{number}"
                invalid.append(NewResult(number, "invalid", invalid_result(custom_id, number, str(exc))))
            if count >= CHUNK_LINES:
                break
        return items, invalid, count

    def _item(self, number: int, content: bytes | None, length: int) -> NewItem:
        if content is None:
            raise LineError(f"line is {length} bytes, over the largest batch any provider accepts")
        if not content.strip():
            raise LineError("empty line")
        parsed = parse_line(content, number)
        route = (parsed.kind, parsed.model)
        if route not in self._routes:
            self._routes[route] = self.settings.profile_for(parsed.kind, parsed.model)
        profile_name = self._routes[route]
        if profile_name is None:
            raise LineError(
                f"no provider profile of kind {parsed.kind!r} is configured for model {parsed.model!r}",
                parsed.custom_id,
            )
        size = len(parsed.body) + len(parsed.endpoint) + LINE_OVERHEAD
        limit = self.settings.providers[profile_name].byte_limit
        if size > limit:
            raise LineError(
                f"request is {size} bytes, over provider {profile_name!r}'s batch limit of {limit} bytes",
                parsed.custom_id,
            )
        return NewItem(number, parsed.custom_id, profile_name, parsed.endpoint, parsed.model, parsed.body, size)


def _encode(request: Any) -> bytes:
    if isinstance(request, bytes):
        line = request.rstrip(b"\n")
    elif isinstance(request, str):
        line = request.rstrip("\n").encode()
    else:
        line = orjson.dumps(request)
    if b"\n" in line:
        raise ValueError("a request must be one line of JSON")
    return line + b"\n"


def submit(requests: Iterable[Any], name: str | None = None, spool_dir: Path | str = "/var/spool/batchd") -> Path:
    """Queue requests for batchd by writing them into the spool safely (tmp, fsync, rename).

    `requests` are dicts (OpenAI batch lines or Anthropic batch requests) or ready JSON lines.
    Returns the path of the file in new/. Works from any process on the same host.
    """
    paths = SpoolPaths(Path(spool_dir))
    base = name or f"submit-{datetime.now(UTC):%Y%m%dT%H%M%S}-{secrets.token_hex(3)}"
    base = base if base.endswith(".jsonl") else f"{base}.jsonl"
    if "/" in base or base.startswith("."):
        raise ValueError(f"not a plain file name: {base!r}")
    for directory in (paths.tmp, paths.new):
        directory.mkdir(parents=True, exist_ok=True)
    temporary = paths.tmp / f".{base}.{os.getpid()}.{secrets.token_hex(4)}"
    try:
        with temporary.open("wb") as handle:
            for request in requests:
                handle.write(_encode(request))
            handle.flush()
            os.fsync(handle.fileno())
        target = _unique_target(paths.new, base)
        os.rename(temporary, target)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise
    _fsync_dir(paths.new)
    return target


def submit_file(source: Path, spool_dir: Path | str, name: str | None = None) -> Path:
    """Copy an existing JSONL file into the spool safely; lines are passed through unchanged."""

    def lines() -> Iterator[bytes]:
        with source.open("rb") as handle:
            yield from handle

    return submit(lines(), name=name or source.name, spool_dir=spool_dir)
