"""The spool: a maildir-style directory that producers drop JSONL files into.

    spool/           owned by the daemon, not writable by producers (2755)
    spool/tmp/       producers write here, fsync, then rename into new/ (3770: sticky + setgid)
    spool/new/       batchd ingests *.jsonl files found here (3770)
    spool/done/      ingested files (2750)
    spool/rejected/  files that could not be read at all, each with NAME.error.json (2750)
    spool/out/       results (written by the outbox sink; 2750, readable by the group)

The spool is a security boundary: producers share tmp/ and new/ with the daemon, so every name
there may change between two system calls. Each file is opened once (`O_NOFOLLOW | O_NONBLOCK`,
checked with `fstat`) and hashed, settle-checked, parsed and ingested from that one descriptor; it
leaves new/ only while its name still refers to that inode. Everything written or removed in
done/, rejected/ and out/ goes through directory descriptors opened with `O_NOFOLLOW`, with
`O_EXCL` creates and renames that never replace.

A file is ingested in chunks of a bounded number of lines and bytes, each one store transaction
(so no other task waits behind a whole file), and is known by (name, content hash, inode, moved
out of new/): a restart resumes the same inode after its last committed line, and a crash before
the move re-reads nothing; the same name and content dropped again later is new work with its own
results name. A custom_id seen earlier in the file (in this chunk or a committed one) makes the
later line an invalid result: the first one wins. The next chunk is parsed while the one before
is committed, and parsing yields to the event loop every half millisecond.

Small files (up to SMALL_FILE_BYTES, their lines one chunk) are group-committed: read whole, then
up to GROUP_FILES of them (or a chunk's worth of lines or bytes) go into the store in one durable
transaction (`Intake.add_files`), are renamed to done/ with one fsync of done/ and one of new/ for
the group, and their moves are recorded with the next group's transaction. Each file is still
committed before it leaves new/; a crash between the commit and the moves leaves the files in new/
with their rows, and the next pass moves them without queueing a line twice.

A file's per-file options (its deadline) come from the sidecar NAME.meta.json (sidecar.py), which
a producer renames into new/ before NAME.jsonl. It is read once, when the file is taken, with the
same care as the file (one O_NOFOLLOW | O_NONBLOCK descriptor, fstat, a size cap); what it says is
recorded with the file's row, which is the truth from then on (a resumed ingest never reads a
sidecar again). It leaves new/ just before its input, to done/ or rejected/ beside it; one that
cannot be used rejects its input with it; one of another uid than its input is not the input's;
one left alone past ORPHAN_SIDECAR_SECONDS goes to rejected/.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import hashlib
import io
import os
import secrets
import stat
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import IO, Any

import orjson
import watchfiles

from . import retention, safefs, sidecar
from .aio import wait_any
from .capacity import embedding_inputs, estimate_tokens
from .crashpoints import CrashPoints
from .deadlines import parse_deadline
from .formats import LineError, invalid_result, parse_line
from .logs import get_logger
from .settings import ProviderKind, Settings
from .sidecar import FileOptions, SidecarError
from .store.contract import Chunk, DuplicateCustomId, FileKey, FileRow, FileState, Intake, NewItem, NewResult, WholeFile

SUBDIRS = ("tmp", "new", "done", "rejected", "out")
# A chunk of one file's lines, parsed then committed in one store transaction: bounded by lines and
# by bytes, so memory and transactions stay short whatever the lines look like (at least one line
# per chunk, however big).
CHUNK_LINES = 2000
CHUNK_BYTES = 2 << 20
# A file up to this size whose lines fit one chunk is read whole and committed together with other
# such files (group commit): one durable transaction, one fsync of done/ and of new/ for the group.
SMALL_FILE_BYTES = 1 << 20
# A group is committed when it holds this many files (or a chunk's worth of lines or bytes).
GROUP_FILES = 500
# Parsing yields to the event loop after this many seconds of work (looking every PARSE_CHECK lines),
# so a poller's store calls wait for a slice of parsing, not for a chunk.
PARSE_SLICE = 0.0005
PARSE_CHECK = 16
# Bytes around each request in a provider batch (custom_id, method, url, separators).
LINE_OVERHEAD = 96
BOM = b"\xef\xbb\xbf"
# Bytes read at a time while a file is split into lines.
READ_BLOCK = 1 << 20
RESULTS_SUFFIX = ".results.jsonl"
# (subdirectory, mode). tmp/ and new/ are shared with producers: sticky, so nobody renames or
# removes another's file. The root and the daemon's own directories are not group-writable, so
# nobody renames them away. Setgid keeps files in the producers' group.
DIR_MODES: tuple[tuple[str, int], ...] = (
    ("", 0o2755),
    ("tmp", 0o3770),
    ("new", 0o3770),
    ("done", 0o2750),
    ("rejected", 0o2750),
    ("out", 0o2750),
)
SHARED = frozenset({"tmp", "new"})
MAX_SUFFIX = 10_000
# A NAME.meta.json in new/ without NAME.jsonl waits for it (a producer renames the sidecar in
# first, then writes and renames the input, which may take a while); after this long (since it
# was renamed in: its ctime, which a producer cannot set back) it goes to rejected/ with a report.
ORPHAN_SIDECAR_SECONDS = 86_400.0
# How often, at most, the batcher is told of chunks committed while a large file is still being read.
QUEUED_SIGNAL_SECONDS = 0.5

log = get_logger("batchd.spool")


class SpoolDirectoryError(OSError):
    """A directory of the spool is not a plain directory the daemon can use safely."""


class _MissingDirectory(FileNotFoundError):
    """A directory of the spool does not exist (yet): create() makes it."""


class SpoolPaths:
    """The directories of one spool."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.tmp = root / "tmp"
        self.new = root / "new"
        self.done = root / "done"
        self.rejected = root / "rejected"
        self.out = root / "out"

    def create(self) -> None:
        """Make the spool with the modes of systemd/batchd.tmpfiles, as far as this process may.

        Directories someone else owns are left alone; where the sandbox forbids setgid
        (RestrictSUIDSGID) the mode is set without it.
        """
        for sub, mode in DIR_MODES:
            path = self.root / sub if sub else self.root
            path.mkdir(parents=True, exist_ok=True)
            _set_mode(path, mode)

    def check_modes(self, euid: int | None = None) -> str | None:
        """None if producers cannot rename or write the daemon's directories; else a one-line reason.

        The root, done/, rejected/ and out/ must be directories (not symlinks) owned by the daemon
        (or root) without group or other write; tmp/ and new/ may be group-writable only with the
        sticky bit.
        """
        uid = os.geteuid() if euid is None else euid
        for sub, mode in DIR_MODES:
            path = self.root / sub if sub else self.root
            try:
                # The root may be a symlink the operator made (only who controls its parent can change
                # it); the directories below it may not.
                info = os.stat(path) if not sub else os.lstat(path)
            except OSError as exc:
                return f"spool directory {path}: {exc.strerror or exc}"
            if stat.S_ISLNK(info.st_mode):
                return f"spool directory {path} is a symlink: whoever controls it can redirect the daemon's files"
            if not stat.S_ISDIR(info.st_mode):
                return f"spool directory {path} is not a directory"
            if info.st_uid not in (uid, 0):
                return f"spool directory {path} is owned by uid {info.st_uid}, not by the daemon (uid {uid}) or root"
            current = stat.S_IMODE(info.st_mode)
            if current & (stat.S_IWGRP | stat.S_IWOTH):
                if sub not in SHARED:
                    return (
                        f"spool directory {path} has mode {current:04o}: producers could rename or replace it"
                        f" (want {mode:04o}, see systemd/batchd.tmpfiles)"
                    )
                if not current & stat.S_ISVTX:
                    return (
                        f"spool directory {path} has mode {current:04o} without the sticky bit: producers could"
                        f" rename or replace each other's files (want {mode:04o})"
                    )
        return None


def _set_mode(path: Path, mode: int) -> None:
    try:
        fd = safefs.open_dir(path)
    except OSError:
        return  # a symlink or unreadable: check_modes says why
    try:
        info = os.fstat(fd)
        if stat.S_IMODE(info.st_mode) == mode or (os.geteuid() != 0 and info.st_uid != os.geteuid()):
            return
        try:
            os.fchmod(fd, mode)
        except PermissionError:
            with contextlib.suppress(PermissionError):
                os.fchmod(fd, mode & ~stat.S_ISGID)
    finally:
        os.close(fd)


class _Dirs:
    """Descriptors of the spool's directories for one pass, each opened once without following symlinks."""

    def __init__(self, root: Path) -> None:
        self._root_path = root
        self._root: int | None = None
        self._fds: dict[str, int] = {}

    def fd(self, sub: str) -> int:
        if sub in self._fds:
            return self._fds[sub]
        try:
            if self._root is None:
                # The root is the operator's configured path (it may be a symlink the operator made);
                # below it, nothing is followed.
                self._root = os.open(self._root_path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
            fd = safefs.open_dir(sub, self._root)
        except FileNotFoundError:
            raise _MissingDirectory(errno.ENOENT, f"spool/{sub} is missing") from None
        except OSError as exc:
            reason = "a symlink" if exc.errno in (errno.ELOOP, errno.ENOTDIR) else exc.strerror
            raise SpoolDirectoryError(exc.errno, f"spool/{sub} is not a usable directory ({reason})") from None
        self._fds[sub] = fd
        return fd

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()
        if self._root is not None:
            os.close(self._root)
            self._root = None

    def __enter__(self) -> _Dirs:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()


@dataclass(slots=True)
class IngestReport:
    name: str
    lines: int = 0
    queued: int = 0
    invalid: int = 0
    seconds: float = 0.0
    out_name: str = ""


@dataclass(slots=True)
class _Committed:
    """How far a file's chunks are committed (shared by the chunk tasks of one ingest)."""

    lines: int


class _FileChanged(Exception):
    """The file's bytes changed between hashing and parsing (its writer is not done)."""


def _valid_utf8(name: str) -> bool:
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _variants(name: str) -> Iterator[str]:
    """`name`, then NAME.1.jsonl, NAME.2.jsonl, … (NAME.1.meta.json, … for a sidecar; else name.1, name.2)."""
    yield name
    suffix = next((end for end in (".jsonl", sidecar.SUFFIX) if name.endswith(end)), "")
    stem = name[: len(name) - len(suffix)]
    for number in range(1, MAX_SUFFIX):
        yield f"{stem}.{number}{suffix}"
    yield f"{stem}.{secrets.token_hex(6)}{suffix}"


def _read_lines(
    handle: IO[bytes], max_bytes: int, digest: Any = None, first: int = 1, offset: int = 0
) -> Iterator[tuple[int, bytes | None, int, int]]:
    """(line number, content without newline or None when over max_bytes, length, end offset) per line.

    Reading starts at line `first`, at byte `offset` (where the handle is); the end offset is the
    byte offset just after the line. Every byte read goes into `digest` (when given), so the caller
    can prove it parsed what it hashed. The file is read in blocks split into lines (one C call per
    block, not one per line); a line longer than max_bytes is counted, never held whole.
    """
    number = first - 1
    pieces: list[bytes] = []  # the start of a line that runs past the block
    held = 0  # bytes in pieces
    skipped = 0  # > 0: the bytes so far of a line too long to hold
    while block := handle.read(READ_BLOCK):
        if digest is not None:
            digest.update(block)
        parts = block.split(b"\n")
        tail = parts.pop()  # after the block's last newline: a line that goes on in the next block
        for index, part in enumerate(parts):
            content: bytes | None = part
            length = len(part) + 1
            if index == 0 and (pieces or skipped):
                if skipped:
                    length += skipped
                    content, skipped = None, 0
                else:
                    pieces.append(part)
                    content = b"".join(pieces)
                    length = len(content) + 1
                    pieces.clear()
                    held = 0
            number += 1
            offset += length
            if number == 1 and content is not None and content.startswith(BOM):
                # Files written on Windows often start with one.
                content = content[len(BOM) :]
                length -= len(BOM)
            if content is not None and len(content) > max_bytes:
                content = None
            elif content is not None and content.endswith(b"\r"):
                content = content[:-1]
            yield number, content, length, offset
        if tail:  # the start of the next line (or more of a line that no block has ended yet)
            if skipped:
                skipped += len(tail)
            else:
                pieces.append(tail)
                held += len(tail)
                if held > max_bytes + 1:
                    # Too long already: count the rest of it without holding it in memory.
                    skipped, held = held, 0
                    pieces.clear()
    if pieces or skipped:  # a last line without a newline
        content = b"".join(pieces) if pieces else None
        length = held or skipped
        number += 1
        offset += length
        if number == 1 and content is not None and content.startswith(BOM):
            content = content[len(BOM) :]
            length -= len(BOM)
        if content is not None and len(content) > max_bytes + 1:
            content = None
        elif content is not None and content.endswith(b"\r"):
            content = content[:-1]
        yield number, content, length, offset


def _sha256_fd(fd: int) -> tuple[str, int]:
    """Hash the whole file behind `fd` with pread, leaving its offset alone."""
    digest = hashlib.sha256()
    offset = 0
    while block := os.pread(fd, 1 << 20, offset):
        digest.update(block)
        offset += len(block)
    return digest.hexdigest(), offset


def _reader(fd: int, offset: int = 0) -> IO[bytes]:
    """A buffered reader of `fd` from `offset`, which it leaves open."""
    os.lseek(fd, offset, os.SEEK_SET)
    return open(fd, "rb", closefd=False)


def _hash_prefix(fd: int, length: int, digest: Any) -> None:
    """Feed the first `length` bytes of `fd` (already committed lines) into `digest`, with pread."""
    offset = 0
    while offset < length:
        block = os.pread(fd, min(1 << 20, length - offset), offset)
        if not block:
            raise _FileChanged("shorter than its committed lines")
        digest.update(block)
        offset += len(block)


def _unchanged(fd: int, info: os.stat_result) -> bool:
    """Whether the open file still has the size and modification time it had when it was taken."""
    now = os.fstat(fd)
    return (now.st_size, now.st_mtime_ns) == (info.st_size, info.st_mtime_ns)


def _identity(info: os.stat_result) -> tuple[int, int, int, int, int]:
    return (info.st_dev, info.st_ino, info.st_mode, info.st_size, info.st_ctime_ns)


def _arrival(info: os.stat_result) -> float:
    """When a spool file arrived: its mtime (the same after a crash and a resumed ingest), never in the future."""
    return min(info.st_mtime, time.time())


def _deadline_field(deadline: float | None) -> dict[str, str]:
    """A log line's `deadline` (ISO 8601, UTC) when the file gave one."""
    return {} if deadline is None else {"deadline": datetime.fromtimestamp(deadline, UTC).isoformat()}


def _out_taken(out_fd: int, out_name: str) -> bool:
    return safefs.exists(out_fd, out_name) or safefs.exists(out_fd, out_name + ".part")


def _drop_duplicates(chunk: Chunk, seen: set[str]) -> Chunk:
    """The chunk with each item whose custom_id is in `seen` (or earlier in the chunk) made an invalid result."""
    items: list[NewItem] = []
    duplicates: list[NewResult] = []
    for item in chunk.items:
        if item.custom_id in seen:
            message = f"duplicate custom_id {item.custom_id!r} in this file"
            duplicates.append(NewResult(item.line, "invalid", invalid_result(item.custom_id, item.line, message)))
        else:
            seen.add(item.custom_id)
            items.append(item)
    if not duplicates:
        return chunk
    invalid = sorted([*chunk.invalid, *duplicates], key=lambda result: result.line)
    return Chunk(chunk.first_line, chunk.last_line, chunk.end_offset, items, invalid)


@dataclass(frozen=True, slots=True)
class _Sidecar:
    """new/NAME.meta.json as found for new/NAME.jsonl: the entry seen (moved only while the name is
    still it) and what it said, or why it cannot be used."""

    name: str
    info: os.stat_result
    options: FileOptions | None = None
    error: str | None = None  # set: the input file is rejected with it (unless its row exists)
    foreign: bool = False  # another user's: not this file's sidecar at all


class _Rejected(Exception):
    """The input file went to rejected/ (or could not) because of its sidecar; `taken` as _reject said."""

    def __init__(self, taken: bool) -> None:
        self.taken = taken


_Entry = tuple[str, os.stat_result, WholeFile, _Sidecar | None]


class _Group:
    """Small files read whole, waiting to be committed together."""

    def __init__(self) -> None:
        self.entries: list[_Entry] = []
        self.lines = 0
        self.bytes = 0

    def add(self, name: str, info: os.stat_result, whole: WholeFile, side: _Sidecar | None) -> None:
        self.entries.append((name, info, whole, side))
        self.lines += whole.lines
        self.bytes += whole.key.size

    def full(self) -> bool:
        return len(self.entries) >= GROUP_FILES or self.lines >= CHUNK_LINES or self.bytes >= CHUNK_BYTES

    def take(self) -> list[_Entry]:
        entries, self.entries = self.entries, []
        self.lines = self.bytes = 0
        return entries


@dataclass(slots=True)
class _GroupDone:
    """What committing a group did: files taken, their ids (moved out of new/), files to resume by chunks."""

    taken: int = 0
    moved: list[int] = field(default_factory=list)
    resume: list[str] = field(default_factory=list)


class Spool:
    """Watches new/ and ingests each file into the store."""

    def __init__(
        self,
        settings: Settings,
        store: Intake,
        on_ingest: Callable[[], None],
        crashpoints: CrashPoints | None = None,
        on_queued: Callable[[], None] | None = None,
    ) -> None:
        self.settings = settings
        self._crashpoints = crashpoints or CrashPoints("")
        self.paths = SpoolPaths(settings.daemon.spool_dir)
        self.store = store
        self._on_ingest = on_ingest
        # Chunks of a large file are claimable as soon as they commit: the batcher hears of them at most
        # every QUEUED_SIGNAL_SECONDS, so a full batch leaves while the rest of the file is still read.
        self._on_queued = on_queued or (lambda: None)
        self._queued_signalled = 0.0
        self._wake = asyncio.Event()
        self._waiting: dict[str, float] = {}
        self._stuck: set[tuple[str, int]] = set()  # entries that could not be moved to rejected/
        self._routes: dict[tuple[str, str], tuple[str, int]] = {}  # (kind, model) -> (profile, byte limit)
        # True while a file is being committed chunk by chunk (the batcher holds back partial groups).
        self.busy = False
        self.orphan_sidecar_age = ORPHAN_SIDECAR_SECONDS

    def wake(self) -> None:
        self._wake.set()

    async def rescan(self) -> int:
        """Ingest everything in new/ now; returns how many files were taken."""
        taken = 0
        with _Dirs(self.paths.root) as dirs:
            try:
                names = sorted(os.listdir(dirs.fd("new")))
            except _MissingDirectory:
                self.paths.create()
                return 0
            except SpoolDirectoryError as exc:
                log.error("spool.unsafe_directory", error=exc.strerror)
                return 0
            group = _Group()
            # The group being committed while the next one is read.
            pending: asyncio.Task[_GroupDone] | None = None
            resume: list[str] = []  # files a group found half ingested by chunks before a crash
            try:
                for name in names:
                    if name.startswith("."):
                        continue
                    if await self._take(dirs, name, group):
                        taken += 1
                    if group.full():
                        last = await asyncio.shield(pending) if pending is not None else _GroupDone()
                        taken += last.taken
                        resume += last.resume
                        pending = asyncio.ensure_future(self._commit_group(dirs, group.take(), last.moved))
                last = await asyncio.shield(pending) if pending is not None else _GroupDone()
                pending = None
                final = await self._commit_group(dirs, group.take(), last.moved)
                await self.store.files_moved(final.moved)
                taken += last.taken + final.taken
                for name in [*last.resume, *final.resume, *resume]:
                    log.info("spool.resuming", file=name)
                    if await self._take(dirs, name):
                        taken += 1
                self._sweep_sidecars(dirs, names)
            except SpoolDirectoryError as exc:
                # done/, rejected/ or out/ was swapped for something else: touch nothing through
                # it; start-up refuses such a spool (check_modes).
                log.error("spool.unsafe_directory", error=exc.strerror)
                return taken
            except _MissingDirectory:
                self.paths.create()
                return taken
            finally:
                if pending is not None and not pending.done():
                    await asyncio.wait({pending})  # its transaction runs whole; nothing outlives the pass
        return taken

    def _sweep_sidecars(self, dirs: _Dirs, names: list[str]) -> None:
        """Move sidecars that waited longer than orphan_sidecar_age without their input to rejected/.

        A sidecar whose NAME.jsonl is in new/ waits with it (it goes wherever the input goes); one
        left alone (its input never came, or was renamed in before it) would otherwise sit in new/
        for ever, and would give its deadline to a later file of the same name.
        """
        present = set(names)
        now = time.time()
        for name in names:
            if not name.endswith(sidecar.SUFFIX) or name.startswith(".") or sidecar.input_name(name) in present:
                continue
            try:
                info = os.stat(name, dir_fd=dirs.fd("new"), follow_symlinks=False)
            except FileNotFoundError:
                continue
            if now - info.st_ctime >= self.orphan_sidecar_age:
                alone = f"a sidecar without its input file {sidecar.input_name(name)}"
                self._reject(dirs, name, info, f"{alone} for over {self.orphan_sidecar_age:g} s")

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
        """Remove files past their retention (retention.py) from done/, rejected/ and out/ (delivered
        results only, never a .part), through the directories' descriptors only."""
        daemon, now = self.settings.daemon, time.time()
        ages = (
            ("done", daemon.done_retention, None),
            ("rejected", daemon.rejected_retention, None),
            ("out", daemon.out_retention, retention.still_growing),
        )
        with _Dirs(self.paths.root) as dirs:
            for sub, max_age, keep in ages:
                before = retention.cutoff(max_age, now)
                if before is None:
                    continue
                try:
                    directory = dirs.fd(sub)
                except OSError as exc:
                    if not isinstance(exc, FileNotFoundError):
                        log.error("spool.unsafe_directory", error=exc.strerror)
                    continue
                removed = retention.prune_directory(directory, before, keep)
                if removed:
                    log.info("spool.pruned", directory=sub, files=len(removed))

    def _move_out(
        self, dirs: _Dirs, name: str, info: os.stat_result, sub: str, preferred: str, sync: bool = True
    ) -> str | None:
        """Move new/NAME to SUB/ under `preferred` (or a variant of it) if NAME is still the inode `info`.

        Returns the name it got there, or None when NAME now refers to another file (or none):
        that file was never read, so it stays in new/ for the next pass. Never replaces anything.
        With `sync` false the caller fsyncs SUB/ and new/ (once for several moves).
        """
        new, target_dir = dirs.fd("new"), dirs.fd(sub)
        if not safefs.same_file(new, name, info):
            return None
        for candidate in _variants(preferred):
            if sub == "rejected" and safefs.exists(target_dir, candidate + ".error.json"):
                continue
            try:
                safefs.rename_noreplace(new, name, target_dir, candidate)
            except FileExistsError:
                continue
            except FileNotFoundError:
                return None
            break
        else:  # pragma: no cover - _variants ends with a random name
            raise FileExistsError(errno.EEXIST, "no free name", preferred)
        if not safefs.same_file(target_dir, candidate, info):
            # Swapped between the check and the rename: what was moved was never read. Put it back.
            self._give_back(dirs, sub, candidate, name)
            return None
        if sync:
            safefs.fsync_dir(target_dir)
            safefs.fsync_dir(new)
        return candidate

    def _carry_sidecar(
        self, dirs: _Dirs, name: str, sub: str, preferred: str, side: _Sidecar | None = None, sync: bool = True
    ) -> str | None:
        """Move new/NAME.meta.json of the input new/NAME to SUB/ as the sidecar of `preferred`; its new name.

        `side`: only that entry (the one read); without it, whatever has the name now. Moved before
        its input, so that a crash between the two renames never leaves a sidecar for a later file
        of the same name: the input's row holds the options already. Never raises for the sidecar
        alone: an entry that cannot be moved stays for the orphan sweep.
        """
        name_of = sidecar.sidecar_name(name)
        try:
            info = os.stat(name_of, dir_fd=dirs.fd("new"), follow_symlinks=False)
        except FileNotFoundError:
            return None
        if side is not None:
            # Its descriptor is closed: a replacement may have its inode number already. What was
            # read also kept its type and change time (a rename in or out changes the latter).
            if _identity(info) != _identity(side.info):
                return None
            info = side.info
        try:
            return self._move_out(dirs, name_of, info, sub, sidecar.sidecar_name(preferred), sync=sync)
        except SpoolDirectoryError:
            raise
        except OSError as exc:
            log.error("spool.sidecar_move_failed", sidecar=safefs.display_name(name_of), error=exc.strerror or str(exc))
            return None

    def _sidecar_to_done(self, dirs: _Dirs, name: str, preferred: str, side: _Sidecar | None, row: FileRow) -> None:
        """The sidecar read with new/NAME goes to done/ beside it, unless it says other than the row.

        It can only differ for a file committed before a crash, whose sidecar was replaced since:
        the row's options stand, and a sidecar in done/ must not claim otherwise.
        """
        if side is None:
            return
        said = side.options.text if side.options is not None else None
        if said != row.options:
            reason = f"{safefs.display_name(name)} was committed before with other options ({row.options or 'none'})"
            log.warning("spool.sidecar_ignored", file=name, sidecar=side.name, reason=reason)
            self._reject(dirs, side.name, side.info, reason)
            return
        self._carry_sidecar(dirs, name, "done", preferred, side, sync=False)

    def _give_back(self, dirs: _Dirs, sub: str, moved: str, name: str) -> None:
        new = dirs.fd("new")
        for candidate in _variants(name):
            try:
                safefs.rename_noreplace(dirs.fd(sub), moved, new, candidate)
            except FileExistsError:
                continue
            log.warning("spool.returned", file=safefs.display_name(name), returned_as=safefs.display_name(candidate))
            self._wake.set()
            return

    def _reject(self, dirs: _Dirs, name: str, info: os.stat_result, reason: str) -> bool:
        """Move new/NAME to rejected/ with NAME.error.json beside it; False if it could not be moved.

        An input's sidecar (new/NAME.meta.json, whatever it is) goes first, beside it: left behind,
        it would give its options to the next file of that name.
        """
        shown = safefs.display_name(name)
        side = self._carry_sidecar(dirs, name, "rejected", shown) if name.endswith(".jsonl") else None
        try:
            target = self._move_out(dirs, name, info, "rejected", shown)
        except SpoolDirectoryError:
            raise
        except OSError as exc:
            # e.g. a producer's directory that is not writable by the daemon cannot change parent.
            self._stuck.add((name, info.st_ino))
            log.error("spool.reject_failed", file=shown, reason=reason, error=exc.strerror or str(exc))
            return False
        if target is None:
            self._wake.set()
            return False
        report = {"file": shown, "error": reason, "at": datetime.now(UTC).isoformat()}
        if target != shown:
            report["moved_to"] = target
        if side is not None:
            report["sidecar"] = side
        rejected = dirs.fd("rejected")
        try:
            safefs.write_new(rejected, target + ".error.json", orjson.dumps(report, option=orjson.OPT_INDENT_2) + b"\n")
        except FileExistsError:
            log.error("spool.report_exists", file=shown, report=target + ".error.json")
        safefs.fsync_dir(rejected)
        log.warning("spool.rejected", file=shown, reason=reason, moved_to=target)
        return True

    async def _take(self, dirs: _Dirs, name: str, group: _Group | None = None) -> bool:
        """Ingest new/NAME (or, a small file, read it into `group` to be committed with others)."""
        new = dirs.fd("new")
        try:
            info = os.stat(name, dir_fd=new, follow_symlinks=False)
        except FileNotFoundError:
            return False
        if (name, info.st_ino) in self._stuck:
            return False
        if name.endswith(sidecar.SUFFIX) and _valid_utf8(name):
            # Whatever it is (a FIFO, a symlink), a sidecar goes with its input, which it refuses
            # then; alone for too long, the orphan sweep moves it.
            return False
        if not _valid_utf8(name):
            return self._reject(dirs, name, info, "file name is not valid UTF-8")
        if stat.S_ISLNK(info.st_mode):
            return self._reject(dirs, name, info, "symlinks are refused: write the file itself into the spool")
        if stat.S_ISDIR(info.st_mode):
            return self._reject(dirs, name, info, "a directory is not a spool file")
        if not stat.S_ISREG(info.st_mode):
            return self._reject(dirs, name, info, "not a regular file (a FIFO, socket or device)")
        if not name.endswith(".jsonl"):
            return False
        try:
            fd, info = safefs.open_regular(new, name)
        except FileNotFoundError:
            return False
        except safefs.UnsafeFileError as exc:
            # Swapped for a symlink, FIFO or directory after the lstat: refuse what is there now.
            try:
                now = os.stat(name, dir_fd=new, follow_symlinks=False)
            except FileNotFoundError:
                return False
            return self._reject(dirs, name, now, f"not a regular file: {exc.strerror}")
        except OSError as exc:
            return self._reject(dirs, name, info, f"cannot read file: {exc.strerror or exc}")
        try:
            if info.st_size == 0:
                return self._reject(dirs, name, info, "empty file: no request lines")
            if not self._settled(fd, info):
                self._waiting[name] = info.st_mtime
                return False
            self._waiting.pop(name, None)
            try:
                side = await self._sidecar_of(dirs, name, fd, info)
                if group is not None and info.st_size <= SMALL_FILE_BYTES:
                    whole = await self._read_whole(fd, info, name, side)
                    if whole is not None:
                        group.add(name, info, whole, side)
                        return False
                report = await self._ingest_fd(dirs, name, fd, info, side)
            except _Rejected as rejected:
                return rejected.taken
            except SpoolDirectoryError:
                raise
            except _FileChanged:
                log.warning("spool.changed_during_ingest", file=name)
                self._waiting[name] = info.st_mtime
                return False
            except OSError as exc:
                return self._reject(dirs, name, info, f"cannot read file: {exc.strerror or exc}")
        finally:
            os.close(fd)
        if report is None:
            return False
        self._on_ingest()
        return True

    def _read_sidecar(self, new: int, name: str, info: os.stat_result) -> _Sidecar | None:
        """new/NAME.meta.json of the input new/NAME (`info`: the input's), read once; None if there is none.

        Read as carefully as an input: one O_NOFOLLOW | O_NONBLOCK descriptor, a regular file proven
        by fstat, a size checked before reading (a FIFO, a symlink or a huge file never blocks or
        fills the loop). A sidecar of another uid than the input's is not this file's.
        """
        name_of = sidecar.sidecar_name(name)
        try:
            fd, found = safefs.open_regular(new, name_of)
        except FileNotFoundError:
            return None
        except OSError as exc:
            try:
                found = os.stat(name_of, dir_fd=new, follow_symlinks=False)
            except FileNotFoundError:
                return None
            what = "not a regular file" if isinstance(exc, safefs.UnsafeFileError) else "cannot read it"
            error = f"{what} ({exc.strerror or exc})"
            return _Sidecar(name_of, found, error=error, foreign=found.st_uid != info.st_uid)
        try:
            if found.st_uid != info.st_uid:
                return _Sidecar(name_of, found, foreign=True)
            if found.st_size > sidecar.MAX_BYTES:
                return _Sidecar(name_of, found, error=f"{found.st_size} bytes, over the limit of {sidecar.MAX_BYTES}")
            data = os.pread(fd, sidecar.MAX_BYTES + 1, 0)
            return _Sidecar(name_of, found, sidecar.parse_options(data, _arrival(info)))
        except SidecarError as exc:
            return _Sidecar(name_of, found, error=str(exc))
        except OSError as exc:
            return _Sidecar(name_of, found, error=f"cannot read it ({exc.strerror or exc})")
        finally:
            os.close(fd)

    async def _sidecar_of(self, dirs: _Dirs, name: str, fd: int, info: os.stat_result) -> _Sidecar | None:
        """The sidecar whose options apply to new/NAME (open on `fd`), or None.

        Raises _Rejected once a sidecar that cannot be used has taken the input to rejected/ with
        it: a producer that asked for a deadline must not have its file queued without one. Not
        so for a file this node already has a row for (committed, wholly or in part, before a
        crash): its row holds the options it was taken with, and a sidecar found now changes
        nothing. Another user's sidecar is not the file's: it goes to rejected/ alone.
        """
        side = self._read_sidecar(dirs.fd("new"), name, info)
        if side is None:
            return None
        if side.foreign:
            reason = (
                f"a sidecar of uid {side.info.st_uid} for {safefs.display_name(name)}, a file of uid {info.st_uid}:"
                " only a file's own producer gives it options"
            )
            self._reject(dirs, side.name, side.info, reason)
            return None
        if side.error is None:
            return side
        if await self._has_row(fd, info, name):
            log.warning("spool.sidecar_ignored", file=name, sidecar=side.name, reason=side.error)
            self._reject(dirs, side.name, side.info, f"{side.error}; its file was committed before, without it")
            return None
        raise _Rejected(self._reject(dirs, name, info, f"its sidecar {side.name}: {side.error}"))

    async def _has_row(self, fd: int, info: os.stat_result, name: str) -> bool:
        """Whether this node has a row for exactly this file (see Intake.find_file)."""
        sha256, size = await asyncio.to_thread(_sha256_fd, fd)
        return await self.store.find_file(FileKey(name, sha256, size, info.st_dev, info.st_ino)) is not None

    async def _read_whole(
        self, fd: int, info: os.stat_result, name: str, side: _Sidecar | None = None
    ) -> WholeFile | None:
        """The small file on `fd` read, hashed and parsed at once; None if its lines do not fit one chunk."""
        data = os.pread(fd, info.st_size + 1, 0)
        if len(data) != info.st_size or not _unchanged(fd, info):
            raise _FileChanged(name)
        if data.count(b"\n") + (not data.endswith(b"\n")) > CHUNK_LINES:
            return None
        options = side.options if side is not None else None
        given = options.deadline if options is not None else None
        chunk = await self._parse_chunk(
            _read_lines(io.BytesIO(data), self.settings.max_line_bytes), self._deadlines(info, given)
        )
        assert chunk is not None  # a file of at least one byte has a line
        chunk = _drop_duplicates(chunk, set())
        key = FileKey(name, hashlib.sha256(data).hexdigest(), info.st_size, info.st_dev, info.st_ino)
        text = options.text if options is not None else None
        return WholeFile(key, chunk.last_line, chunk.items, chunk.invalid, text, given)

    async def _commit_group(self, dirs: _Dirs, entries: list[_Entry], moved_before: list[int]) -> _GroupDone:
        """Commit small files in one transaction, then move them to done/.

        Each file is committed before it leaves new/, as alone: a crash after the commit leaves the
        files in new/ with their rows, and the next pass moves them without queueing anything twice.
        The moves of the group before (`moved_before`, durable renames) are recorded in the same
        transaction; the caller records this group's (files_moved) after the last group.
        """
        if not entries:
            return _GroupDone(moved=moved_before)
        out = dirs.fd("out")
        rows = await self.store.add_files(
            [whole for _, _, whole, _ in entries], out_taken=lambda o: _out_taken(out, o), moved=moved_before
        )
        self._crashpoints.reach("mid-ingest")
        moved: list[tuple[str, WholeFile, FileRow]] = []
        resume: list[str] = []
        for (name, info, whole, side), row in zip(entries, rows, strict=True):
            if row.state == FileState.INGESTING:
                resume.append(name)  # chunks of it were committed before a crash: resume them
                continue
            preferred = row.out_name[: -len(RESULTS_SUFFIX)] + ".jsonl"
            self._sidecar_to_done(dirs, name, preferred, side, row)
            if self._move_out(dirs, name, info, "done", preferred, sync=False) is None:
                # Renamed over (or away) while it was read: what has the name now is new work.
                log.warning("spool.replaced_during_ingest", file=name)
                self._wake.set()
                continue
            moved.append((name, whole, row))
        if moved:
            # One fsync of each directory makes every rename of the group durable.
            safefs.fsync_dir(dirs.fd("done"))
            safefs.fsync_dir(dirs.fd("new"))
        self._on_ingest()
        for name, whole, row in moved:
            if row.out_name != name[: -len(".jsonl")] + RESULTS_SUFFIX:
                log.info("spool.results_renamed", file=name, results=row.out_name)
            log.info(
                "spool.ingested",
                file=name,
                lines=whole.lines,
                queued=len(whole.items),
                invalid=len(whole.invalid),
                bytes=whole.key.size,
                results=row.out_name,
                group=len(entries),
                **_deadline_field(row.deadline),
            )
        return _GroupDone(len(moved), [row.id for _, _, row in moved], resume)

    def _settled(self, fd: int, info: os.stat_result) -> bool:
        """False while a file without a final newline may still be being written."""
        if os.pread(fd, 1, info.st_size - 1) == b"\n":
            return True
        return time.time() - info.st_mtime >= self.settings.daemon.settle_time

    async def ingest(self, name: str) -> IngestReport | None:
        """Ingest new/NAME (chunk by chunk) and move it to done/ (None if it was not taken)."""
        with _Dirs(self.paths.root) as dirs:
            fd, info = safefs.open_regular(dirs.fd("new"), name)
            try:
                try:
                    side = await self._sidecar_of(dirs, name, fd, info)
                except _Rejected:
                    return None
                return await self._ingest_fd(dirs, name, fd, info, side)
            finally:
                os.close(fd)

    async def _ingest_fd(
        self, dirs: _Dirs, name: str, fd: int, info: os.stat_result, side: _Sidecar | None = None
    ) -> IngestReport | None:
        """Ingest the file open on `fd` (new/NAME when opened) and move it to done/ if NAME is still it.

        `side`: its sidecar, whose options go into a new row (a row found is resumed with its own)
        and which moves to done/ just before it.
        """
        started = time.monotonic()
        sha256, size = await asyncio.to_thread(_sha256_fd, fd)
        report = IngestReport(name)
        key = FileKey(name, sha256, size, info.st_dev, info.st_ino)
        row = await self.store.find_file(key)
        if row is not None and row.state != FileState.INGESTING:
            # This very file was ingested before a crash and never left new/.
            log.info("spool.already_ingested", file=name, results=row.out_name)
        else:
            if row is None:
                if size != info.st_size or not _unchanged(fd, info):
                    raise _FileChanged(name)
                out = dirs.fd("out")
                options = side.options if side is not None else None
                row = await self.store.begin_file(
                    key,
                    out_taken=lambda out_name: _out_taken(out, out_name),
                    options=options.text if options is not None else None,
                    deadline=options.deadline if options is not None else None,
                )
                log.info("spool.ingesting", file=name, bytes=size, **_deadline_field(row.deadline))
                if row.out_name != name[: -len(".jsonl")] + RESULTS_SUFFIX:
                    log.info("spool.results_renamed", file=name, results=row.out_name)
            else:
                # Chunks of this very file were committed before a crash: go on after the last one.
                log.info("spool.resuming", file=name, line=row.lines_committed + 1, offset=row.offset_committed)
            self.busy = True
            try:
                finished, report.lines = await self._ingest_chunks(fd, info, row, sha256, report)
            finally:
                self.busy = False
            if not finished:
                return await self._changed_mid_ingest(dirs, name, info, row, report)
        report.out_name = row.out_name
        preferred = report.out_name[: -len(RESULTS_SUFFIX)] + ".jsonl"
        # Durable with the input's rename: the same two directories are fsynced after it.
        self._sidecar_to_done(dirs, name, preferred, side, row)
        moved = self._move_out(dirs, name, info, "done", preferred)
        if moved is None:
            # Renamed over (or away) while it was read: what has the name now is new work.
            log.warning("spool.replaced_during_ingest", file=name)
            self._wake.set()
        else:
            await self.store.file_moved(row.id)
        report.seconds = round(time.monotonic() - started, 3)
        if report.lines:
            log.info(
                "spool.ingested",
                file=name,
                lines=report.lines,
                queued=report.queued,
                invalid=report.invalid,
                bytes=size,
                results=report.out_name,
                seconds=report.seconds,
                **_deadline_field(row.deadline),
            )
        return report

    async def _ingest_chunks(
        self, fd: int, info: os.stat_result, row: FileRow, sha256: str, report: IngestReport
    ) -> tuple[bool, int]:
        """Commit the file's lines after row.lines_committed chunk by chunk, then finish it.

        Returns (finished, lines committed): not finished when the file changed while it was read
        (nothing more is committed then). The next chunk is parsed while the one before it is being
        committed: the writer's thread runs SQLite's C code without the GIL, the event loop parses.
        """
        digest = hashlib.sha256()
        # What was committed before is hashed too, so the digest still proves the whole file was what we hashed.
        await asyncio.to_thread(_hash_prefix, fd, row.offset_committed, digest)
        committed = _Committed(row.lines_committed)
        pending: asyncio.Task[bool] | None = None
        try:
            with _reader(fd, row.offset_committed) as handle:
                lines = _read_lines(
                    handle, self.settings.max_line_bytes, digest, row.lines_committed + 1, row.offset_committed
                )
                # The row's own deadline (the sidecar's when it began), never a sidecar read again.
                deadlines = self._deadlines(info, row.deadline)
                while (chunk := await self._parse_chunk(lines, deadlines)) is not None:
                    if pending is not None and not await asyncio.shield(pending):
                        return False, committed.lines
                    pending = asyncio.ensure_future(self._commit_chunk(fd, info, row.id, chunk, report, committed))
            if pending is not None and not await asyncio.shield(pending):
                return False, committed.lines
        finally:
            if pending is not None and not pending.done():
                # A chunk's transaction runs whole (shielded); nothing here outlives this call.
                await asyncio.wait({pending})
        if digest.hexdigest() != sha256:
            return False, committed.lines
        await self.store.finish_file(row.id, committed.lines)
        return True, committed.lines

    async def _commit_chunk(
        self, fd: int, info: os.stat_result, file_id: int, chunk: Chunk, report: IngestReport, committed: _Committed
    ) -> bool:
        """Commit the chunk (deduped against the committed ones if need be); False if the file changed."""
        chunk = _drop_duplicates(chunk, set())
        if not _unchanged(fd, info):
            return False
        try:
            applied = await self.store.add_chunk(file_id, chunk)
        except DuplicateCustomId:
            # A committed chunk holds some of its custom_ids (rare): those lines become invalid.
            chunk = await self._dedupe(file_id, chunk)
            applied = await self.store.add_chunk(file_id, chunk)
        if applied:
            report.queued += len(chunk.items)
            report.invalid += len(chunk.invalid)
            if chunk.items and time.monotonic() - self._queued_signalled >= QUEUED_SIGNAL_SECONDS:
                self._queued_signalled = time.monotonic()
                self._on_queued()
        committed.lines = chunk.last_line
        self._crashpoints.reach("mid-ingest")
        return True

    async def _dedupe(self, file_id: int, chunk: Chunk) -> Chunk:
        """Later lines with a custom_id already seen in this file (this chunk or a committed one) become invalid."""
        if not chunk.items:
            return chunk
        seen = await self.store.seen_custom_ids(file_id, {item.custom_id for item in chunk.items})
        return _drop_duplicates(chunk, seen)

    async def _changed_mid_ingest(
        self, dirs: _Dirs, name: str, info: os.stat_result, row: FileRow, report: IngestReport
    ) -> IngestReport:
        """The file changed after some of its lines were committed: a writer still at work in new/.

        What is committed stays (its results go to out/ as usual) and the file ends there: it is
        finished with the lines committed and moved to rejected/ with a report naming the first line
        not taken, so nothing is lost silently and nothing is queued twice.
        """
        committed = report.lines
        await self.store.finish_file(row.id, committed)
        log.error("spool.changed_during_ingest", file=name, lines_committed=committed, results=row.out_name)
        reason = (
            f"the file changed while it was being ingested (write files in tmp/ and rename them into new/):"
            f" lines 1-{committed} were taken (results in out/{row.out_name}), line {committed + 1} and after were not"
        )
        if self._reject(dirs, name, info, reason):
            await self.store.file_moved(row.id)
        report.out_name = row.out_name
        return report

    def _deadlines(self, info: os.stat_result, given: float | None) -> _Deadlines:
        """How a file's requests get their deadlines: `given` by the file, else their route's default
        counted from the file's arrival (its mtime: the same after a crash and a resumed ingest)."""
        return _Deadlines(self.settings, _arrival(info), given)

    async def _parse_chunk(
        self, lines: Iterator[tuple[int, bytes | None, int, int]], deadlines: _Deadlines
    ) -> Chunk | None:
        """The next chunk of lines, bounded by CHUNK_LINES and CHUNK_BYTES (at least one line); None at the end.

        Yields to the event loop every PARSE_SLICE seconds, so pollers and sinks run during a long ingest.
        """
        items: list[NewItem] = []
        invalid: list[NewResult] = []
        count = 0
        size = 0
        first = last = end = 0
        item = self._item
        since = time.perf_counter()
        for number, content, length, offset in lines:
            if not count:
                first = number
            count += 1
            size += length
            last, end = number, offset
            try:
                items.append(item(number, content, length, deadlines))
            except LineError as exc:
                custom_id = exc.custom_id or f"line-{number}"
                invalid.append(NewResult(number, "invalid", invalid_result(custom_id, number, str(exc))))
            if count >= CHUNK_LINES or size >= CHUNK_BYTES:
                break
            if not count % PARSE_CHECK and time.perf_counter() - since > PARSE_SLICE:
                await asyncio.sleep(0)
                since = time.perf_counter()
        if not count:
            return None
        return Chunk(first, last, end, items, invalid)

    def _item(self, number: int, content: bytes | None, length: int, deadlines: _Deadlines) -> NewItem:
        if content is None:
            raise LineError(f"line is {length} bytes, over the largest batch any provider accepts")
        try:
            parsed = parse_line(content, number)
        except LineError:
            if not content.strip():
                raise LineError("empty line") from None
            raise
        route = self._routes.get((parsed.kind, parsed.model))
        if route is None:
            route = self._route(parsed.kind, parsed.model)
        profile_name, limit = route
        if not profile_name:
            raise LineError(
                f"no provider profile of kind {parsed.kind!r} is configured for model {parsed.model!r}",
                parsed.custom_id,
            )
        size = len(parsed.body) + len(parsed.endpoint) + LINE_OVERHEAD
        if size > limit:
            raise LineError(
                f"request is {size} bytes, over provider {profile_name!r}'s batch limit of {limit} bytes",
                parsed.custom_id,
            )
        tokens, inputs = request_capacity(parsed.endpoint, parsed.body)
        deadline, fallback_at = deadlines.of(profile_name, parsed.model)
        return NewItem(
            number,
            parsed.custom_id,
            profile_name,
            parsed.endpoint,
            parsed.model,
            parsed.body,
            size,
            tokens,
            deadline,
            fallback_at,
            inputs,
        )

    def _route(self, kind: ProviderKind, model: str) -> tuple[str, int]:
        """(profile, its byte limit) for lines of `kind` and `model`, ("", 0) for none; remembered."""
        profile_name = self.settings.profile_for(kind, model)
        route = (profile_name, self.settings.providers[profile_name].byte_limit) if profile_name else ("", 0)
        self._routes[(kind, model)] = route
        return route


class _Deadlines:
    """A file's deadline per route: the one it gave (NAME.meta.json), else its route's default."""

    def __init__(self, settings: Settings, arrival: float, given: float | None) -> None:
        self.settings = settings
        self.arrival = arrival
        self.given = given
        self._by_route: dict[tuple[str, str], tuple[float | None, float | None]] = {}

    def of(self, profile: str, model: str) -> tuple[float | None, float | None]:
        """(deadline, fallback_at) of a request of this file routed to (profile, model)."""
        key = (profile, model)
        known = self._by_route.get(key)
        if known is None:
            plan = self.settings.route_plan(profile, model)
            deadline = self.given
            if deadline is None and plan.deadline is not None:
                deadline = parse_deadline(plan.deadline, self.arrival)
            known = (deadline, None if deadline is None else deadline - plan.deadline_lead)
            self._by_route[key] = known
        return known


def request_capacity(endpoint: str, body: bytes) -> tuple[int, int]:
    """(estimated enqueued tokens, embedding inputs) of one request body (capacity.py's estimate).

    Only the endpoints whose input may be token ids or a list of inputs are parsed again; every
    other request is estimated from its size alone.
    """
    if endpoint in ("/v1/embeddings", "/v1/completions"):
        parsed = orjson.loads(body)
        if isinstance(parsed, dict):
            inputs = embedding_inputs(parsed) if endpoint == "/v1/embeddings" else 1
            return estimate_tokens(endpoint, parsed, len(body)), inputs
    return estimate_tokens(endpoint, {}, len(body)), 1


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


@dataclass(frozen=True, slots=True)
class Submission:
    """Where a submitted file went and where its results will appear. Usable as its spool path."""

    path: Path
    results: Path

    def __fspath__(self) -> str:
        return str(self.path)

    def __str__(self) -> str:
        return str(self.path)


def _submit_names(base: str) -> Iterator[str]:
    """BASE.jsonl, then BASE-1.jsonl, BASE-2.jsonl, … (a suffix the daemon's own fallback never uses)."""
    stem = base[: -len(".jsonl")]
    yield base
    for number in range(1, MAX_SUFFIX):
        yield f"{stem}-{number}.jsonl"
    yield f"{stem}-{secrets.token_hex(6)}.jsonl"


def _open_optional(path: Path) -> int | None:
    try:
        return safefs.open_dir(path)
    except OSError:
        return None


def submit(
    requests: Iterable[Any],
    name: str | None = None,
    spool_dir: Path | str = "/var/spool/batchd",
    deadline: str | datetime | float | None = None,
) -> Submission:
    """Queue requests for batchd by writing them into the spool safely (tmp, fsync, rename).

    `requests` are dicts (OpenAI batch lines or Anthropic batch requests) or ready JSON lines.
    The file gets a name free in new/, done/ and out/ (NAME.jsonl, else NAME-1.jsonl, …), so its
    results will be out/NAME.results.jsonl; returns both paths. Works from any process on the host.

    `deadline` (an ISO 8601 string with a UTC offset, a time relative to the file's arrival such
    as "8h", a datetime with tzinfo, or a unix time) is checked before anything is written
    (DeadlineError, a ValueError) and travels in the sidecar NAME.meta.json, renamed into new/
    (and made durable there) before NAME.jsonl.
    """
    options = None if deadline is None else sidecar.encode_options(sidecar.deadline_text(deadline))
    paths = SpoolPaths(Path(spool_dir))
    base = name or f"submit-{datetime.now(UTC):%Y%m%dT%H%M%S}-{secrets.token_hex(3)}"
    base = base if base.endswith(".jsonl") else f"{base}.jsonl"
    if "/" in base or base.startswith(".") or base == ".jsonl":
        raise ValueError(f"not a plain file name: {base!r}")
    for directory in (paths.tmp, paths.new):
        directory.mkdir(parents=True, exist_ok=True)
    token = f"{os.getpid()}.{secrets.token_hex(4)}"
    temporary = f".{base}.{token}"
    staged = f".{sidecar.sidecar_name(base)}.{token}"
    with safefs.directory(paths.tmp) as tmp, safefs.directory(paths.new) as new:
        fd = safefs.create_exclusive(tmp, temporary, 0o644)
        try:
            with open(fd, "wb") as handle:
                for request in requests:
                    handle.write(_encode(request))
                handle.flush()
                os.fsync(handle.fileno())
            done, out = _open_optional(paths.done), _open_optional(paths.out)
            try:
                for candidate in _submit_names(base):
                    results = candidate[: -len(".jsonl")] + RESULTS_SUFFIX
                    if done is not None and safefs.exists(done, candidate):
                        continue
                    if out is not None and _out_taken(out, results):
                        continue
                    # A sidecar present (another submit's, or one left behind) belongs to whatever
                    # file takes this name: never this one's.
                    if safefs.exists(new, sidecar.sidecar_name(candidate)):
                        continue
                    if options is not None and not _place_sidecar(tmp, new, staged, options, candidate):
                        continue
                    try:
                        safefs.rename_noreplace(tmp, temporary, new, candidate)
                    except FileExistsError:
                        if options is not None:
                            _take_sidecar_back(tmp, new, staged, candidate)
                        continue
                    break
            finally:
                for fd_ in (done, out):
                    if fd_ is not None:
                        os.close(fd_)
        except BaseException:
            for leftover in (temporary, staged):
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(leftover, dir_fd=tmp)
            raise
        safefs.fsync_dir(new)
    return Submission(paths.new / candidate, paths.out / results)


def _place_sidecar(tmp: int, new: int, staged: str, options: bytes, candidate: str) -> bool:
    """Put the sidecar of new/CANDIDATE in place, durably, before its input; False if the name is taken.

    Written in tmp/ (once: it stays there between candidates) and renamed into new/ without
    replacing anything; new/ is fsynced before the input is renamed in, so no crash leaves the
    input in new/ without its sidecar.
    """
    if not safefs.exists(tmp, staged):
        safefs.write_new(tmp, staged, options, 0o644)
    if safefs.exists(new, candidate):
        return False  # a sidecar must never join a file already in new/
    try:
        safefs.rename_noreplace(tmp, staged, new, sidecar.sidecar_name(candidate))
    except FileExistsError:
        return False
    safefs.fsync_dir(new)
    return True


def _take_sidecar_back(tmp: int, new: int, staged: str, candidate: str) -> None:
    """Another file took CANDIDATE between our sidecar's rename and the input's: the sidecar is not its own."""
    with contextlib.suppress(FileNotFoundError):  # the daemon rejected it already (another user's file)
        safefs.rename_noreplace(new, sidecar.sidecar_name(candidate), tmp, staged)


def submit_file(
    source: Path, spool_dir: Path | str, name: str | None = None, deadline: str | datetime | float | None = None
) -> Submission:
    """Copy an existing JSONL file into the spool safely; lines are passed through unchanged."""

    def lines() -> Iterator[bytes]:
        with source.open("rb") as handle:
            yield from handle

    return submit(lines(), name=name or source.name, spool_dir=spool_dir, deadline=deadline)
