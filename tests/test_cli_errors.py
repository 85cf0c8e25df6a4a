"""Operator mistakes: one line on stderr, a distinct sysexits status, never a Python traceback.

Each test runs `python -m batchd ...` as a subprocess, as an operator would. The permission cases
run the command as another uid (they need root) against directories and databases owned by root.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import shutil
import sqlite3
import subprocess
import tempfile
from collections.abc import Iterator
from importlib import resources
from pathlib import Path

import orjson
import pytest

from batchd.emulator import RunningEmulator
from batchd.exits import (
    EX_CANTCREAT,
    EX_CONFIG,
    EX_DATAERR,
    EX_IOERR,
    EX_NOINPUT,
    EX_NOPERM,
    EX_USAGE,
)
from batchd.store import SCHEMA_VERSION, open_store

from .conftest import require_root
from .harness import DaemonProcess, as_user, python_for, read_results, wait_for_file, write_config
from .test_acceptance import chat_line, claude_line

OTHER_UID = 61234  # numeric: needs no /etc/passwd entry


def batchd(
    *args: str, user: int | None = None, timeout: float = 60, stdout: int | None = subprocess.PIPE
) -> subprocess.CompletedProcess[str]:
    python, env = python_for(user)
    return subprocess.run(
        [*python, "-m", "batchd", *args],
        stdout=stdout,
        stderr=subprocess.PIPE,
        text=True,
        timeout=timeout,
        env={**os.environ, **env},
        **as_user(user),
    )


def one_line_error(proc: subprocess.CompletedProcess[str], status: int, *words: str) -> str:
    """The single stderr line of a refused command, after checking its status and that no traceback leaked."""
    assert "Traceback" not in proc.stderr, proc.stderr
    lines = proc.stderr.splitlines()
    assert len(lines) == 1, proc.stderr
    assert proc.returncode == status, (proc.returncode, proc.stderr)
    for word in words:
        assert word in lines[0], lines[0]
    return lines[0]


def plain_config(root: Path, **daemon: str) -> Path:
    values = {"spool_dir": str(root / "spool"), "state_dir": str(root / "state"), "log_format": "json", **daemon}
    path = root / "batchd.toml"
    path.write_text(
        "[daemon]\n" + "".join(f"{key} = {orjson.dumps(value).decode()}\n" for key, value in values.items())
    )
    path.chmod(0o644)
    return path


@pytest.fixture
def shared() -> Iterator[Path]:
    """A directory other uids can enter (pytest's tmp_path sits under a directory of mode 0700)."""
    root = Path(tempfile.mkdtemp(prefix="batchd-test-", dir="/tmp"))
    root.chmod(0o755)
    try:
        yield root
    finally:
        shutil.rmtree(root, ignore_errors=True)


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def user_version(path: Path) -> int:
    db = sqlite3.connect(f"file:{path}?mode=ro&immutable=1", uri=True)
    try:
        return int(db.execute("PRAGMA user_version").fetchone()[0])
    finally:
        db.close()


async def make_database(path: Path) -> None:
    store = open_store(f"sqlite:///{path}", "test-node")
    await store.open()
    await store.close()


def old_database(path: Path, version: int) -> None:
    """A database as an older batchd left it: only the migrations up to `version`."""
    path.parent.mkdir(parents=True, exist_ok=True)
    db = sqlite3.connect(path, isolation_level=None)
    db.execute("PRAGMA journal_mode=WAL")
    for entry in sorted(resources.files("batchd.store").joinpath("sqlite_migrations").iterdir(), key=lambda e: e.name):
        if entry.name.endswith(".sql") and int(entry.name[:3]) <= version:
            db.executescript(entry.read_text())
    db.execute(f"PRAGMA user_version={version}")
    db.close()


# -- 64 usage ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("args", "words"),
    [
        (["report", "--since", "banana"], ["banana", "--since"]),
        (["status", "--interval", "0"], ["--interval"]),
        (["results", "--limit", "-3"], ["--limit"]),
        (["frobnicate"], ["frobnicate"]),
        (["estimate"], ["files"]),
    ],
    ids=["since-banana", "interval-zero", "negative-limit", "unknown-command", "no-file"],
)
def test_a_usage_mistake_is_one_line_and_64(tmp_path: Path, args: list[str], words: list[str]) -> None:
    proc = batchd(*args, "--config", str(plain_config(tmp_path))) if args[0] != "frobnicate" else batchd(*args)
    one_line_error(proc, EX_USAGE, *words)


# -- 66 missing input ----------------------------------------------------------------------------


@pytest.mark.parametrize("command", ["estimate", "submit"])
def test_a_missing_input_file_is_66(tmp_path: Path, command: str) -> None:
    config = plain_config(tmp_path)
    proc = batchd(command, "--config", str(config), str(tmp_path / "missing.jsonl"))
    one_line_error(proc, EX_NOINPUT, "missing.jsonl", "No such file")
    assert not (tmp_path / "spool" / "new").exists() or not list((tmp_path / "spool" / "new").iterdir())


def test_a_directory_given_as_input_is_66(tmp_path: Path) -> None:
    (tmp_path / "adir").mkdir()
    proc = batchd("estimate", "--config", str(plain_config(tmp_path)), str(tmp_path / "adir"))
    one_line_error(proc, EX_NOINPUT, "adir")


@pytest.mark.parametrize("command", ["status", "results", "report", "redeliver", "batches", "pause", "resume"])
def test_no_database_is_66_and_none_is_created(tmp_path: Path, command: str) -> None:
    proc = batchd(command, "--config", str(plain_config(tmp_path)))
    one_line_error(proc, EX_NOINPUT, "no database", str(tmp_path / "state"))
    assert not (tmp_path / "state").exists()


# -- 78 configuration ----------------------------------------------------------------------------


def test_configuration_mistakes_are_78(tmp_path: Path) -> None:
    (tmp_path / "conf.d").mkdir()
    one_line_error(batchd("status", "--config", str(tmp_path / "conf.d")), EX_CONFIG, "conf.d", "directory")
    one_line_error(batchd("status", "--config", str(tmp_path / "none.toml")), EX_CONFIG, "none.toml", "no such file")
    unknown = tmp_path / "unknown.toml"
    unknown.write_text("[daemon]\nspool_directory = '/tmp/x'\n[batching]\nmax_wait = 'soon'\n")
    line = one_line_error(batchd("run", "--config", str(unknown)), EX_CONFIG, "unknown key daemon.spool_directory")
    assert "batching.max_wait" in line  # every problem, on the one line
    broken = tmp_path / "broken.toml"
    broken.write_text("[daemon\n")
    one_line_error(batchd("report", "--config", str(broken)), EX_CONFIG, "not valid TOML")
    assert not (tmp_path / "state").exists()


# -- 74 I/O error --------------------------------------------------------------------------------


def test_output_to_a_full_device_is_74(tmp_path: Path) -> None:
    source = tmp_path / "in.jsonl"
    source.write_bytes(b"".join(orjson.dumps(chat_line(n)) + b"\n" for n in range(200)))
    with open("/dev/full", "w") as full:
        proc = batchd("estimate", "--json", "--config", str(plain_config(tmp_path)), str(source), stdout=full.fileno())
    one_line_error(proc, EX_IOERR, "No space left on device")


# -- schema: never migrated by a reader -----------------------------------------------------------


def test_an_older_schema_is_not_migrated_by_a_reader(tmp_path: Path) -> None:
    database = tmp_path / "state" / "batchd.sqlite3"
    old_database(database, SCHEMA_VERSION - 1)
    before = digest(database)
    for command in ("status", "results", "report", "redeliver", "batches", "pause", "resume"):
        proc = batchd(command, "--config", str(plain_config(tmp_path)))
        one_line_error(proc, EX_DATAERR, f"schema version {SCHEMA_VERSION - 1}", "batchd run")
    assert user_version(database) == SCHEMA_VERSION - 1
    assert digest(database) == before


async def test_a_newer_schema_is_refused_by_readers_and_by_the_daemon(tmp_path: Path) -> None:
    database = tmp_path / "state" / "batchd.sqlite3"
    await make_database(database)
    db = sqlite3.connect(database, isolation_level=None)
    db.execute(f"PRAGMA user_version={SCHEMA_VERSION + 1}")
    db.close()
    before = digest(database)
    config = str(plain_config(tmp_path))
    for command in ("status", "report"):
        one_line_error(await asyncio.to_thread(batchd, command, "--config", config), EX_DATAERR, "newer")
    one_line_error(await asyncio.to_thread(batchd, "run", "--config", config, timeout=30), EX_DATAERR, "newer")
    assert user_version(database) == SCHEMA_VERSION + 1
    assert digest(database) == before


def test_migrate_applies_pending_migrations_says_so_and_refuses_a_newer_schema(tmp_path: Path) -> None:
    database = tmp_path / "state" / "batchd.sqlite3"
    old_database(database, SCHEMA_VERSION - 1)
    config = str(plain_config(tmp_path))
    proc = batchd("migrate", "--config", config)
    assert proc.returncode == 0 and proc.stderr == "", proc.stderr
    assert f"schema version {SCHEMA_VERSION - 1} -> {SCHEMA_VERSION}" in proc.stdout
    assert user_version(database) == SCHEMA_VERSION
    again = batchd("migrate", "--config", config)
    assert again.returncode == 0 and f"schema version {SCHEMA_VERSION}, nothing to migrate" in again.stdout
    db = sqlite3.connect(database, isolation_level=None)
    db.execute(f"PRAGMA user_version={SCHEMA_VERSION + 1}")
    db.close()
    one_line_error(batchd("migrate", "--config", config), EX_DATAERR, "newer")


# -- 77 permission, and read-only commands on a read-only database -----------------------------------


async def test_an_unreadable_database_is_77_for_status(shared: Path) -> None:
    require_root()
    database = shared / "state" / "batchd.sqlite3"
    await make_database(database)
    (shared / "state").chmod(0o755)
    database.chmod(0o600)  # root's, as a daemon running as root leaves it
    config = str(plain_config(shared))
    for command in ("status", "results", "report"):
        proc = await asyncio.to_thread(batchd, command, "--config", config, user=OTHER_UID)
        one_line_error(proc, EX_NOPERM, str(database), "ermission denied")


async def test_read_only_commands_work_on_a_read_only_database_and_leave_it_byte_identical(
    shared: Path, emulator: RunningEmulator
) -> None:
    require_root()
    config = write_config(shared, emulator)
    config.chmod(0o644)
    lines = [chat_line(n) for n in range(4)] + [claude_line(n) for n in range(3)] + [{"not": "a request"}]
    daemon = DaemonProcess(config, shared / "daemon.log").start()
    try:
        (shared / "spool" / "new").mkdir(parents=True, exist_ok=True)
        staged = shared / "spool" / "tmp" / "ro.jsonl"
        staged.parent.mkdir(parents=True, exist_ok=True)
        staged.write_bytes(b"".join(orjson.dumps(line) + b"\n" for line in lines))
        staged.rename(shared / "spool" / "new" / "ro.jsonl")
        await wait_for_file(shared / "spool" / "out" / "ro.results.jsonl", timeout=60, daemon=daemon)
    finally:
        await daemon.stop()
    assert len(read_results(shared / "spool" / "out" / "ro.results.jsonl")) == len(lines)

    state = shared / "state"
    database = state / "batchd.sqlite3"
    assert sorted(p.name for p in state.iterdir() if p.name.startswith("batchd.sqlite3")) == ["batchd.sqlite3"]
    # The database belongs to the other uid and is read-only to it; the directory is root's.
    database.chmod(0o400)
    os.chown(database, OTHER_UID, OTHER_UID)
    state.chmod(0o755)
    before = (digest(database), user_version(database), database.stat().st_mtime_ns, sorted(os.listdir(state)))

    status = await asyncio.to_thread(batchd, "status", "--json", "--config", str(config), user=OTHER_UID)
    assert status.returncode == 0 and "Traceback" not in status.stderr, status.stderr
    snapshot = orjson.loads(status.stdout)
    assert snapshot["results"] == {"succeeded": 7, "invalid": 1}
    watch = await asyncio.to_thread(
        batchd, "status", "--watch", "--count", "1", "--config", str(config), user=OTHER_UID
    )
    assert watch.returncode == 0 and "Traceback" not in watch.stderr, watch.stderr
    results = await asyncio.to_thread(
        batchd, "results", "--json", "--file", "ro.jsonl", "--config", str(config), user=OTHER_UID
    )
    assert results.returncode == 0, results.stderr
    assert len(results.stdout.splitlines()) == len(lines)
    report = await asyncio.to_thread(batchd, "report", "--json", "--config", str(config), user=OTHER_UID)
    assert report.returncode == 0, report.stderr
    assert orjson.loads(report.stdout)["total"]["requests"] == len(lines)
    batches = await asyncio.to_thread(batchd, "batches", "--json", "--config", str(config), user=OTHER_UID)
    assert batches.returncode == 0, batches.stderr
    assert {batch["provider"] for batch in orjson.loads(batches.stdout)} == {"openai", "anthropic"}
    # And as root, on the file made read-only: still no migration, no checkpoint, no new file.
    root_status = await asyncio.to_thread(batchd, "status", "--json", "--config", str(config))
    assert root_status.returncode == 0, root_status.stderr

    after = (digest(database), user_version(database), database.stat().st_mtime_ns, sorted(os.listdir(state)))
    assert after == before


# -- the daemon's preflight: before READY, one line, never a hang -----------------------------------


def _run_daemon(config: Path, user: int | None = None) -> subprocess.CompletedProcess[str]:
    try:
        return batchd("run", "--config", str(config), user=user, timeout=30)
    except subprocess.TimeoutExpired as exc:
        raise AssertionError(f"the daemon neither started nor refused within 30 s: {exc.stderr!r}") from None


def _ready(proc: subprocess.CompletedProcess[str]) -> bool:
    return "daemon.ready" in proc.stdout


def test_a_spool_the_daemon_cannot_write_is_77_before_ready(shared: Path) -> None:
    require_root()
    config = plain_config(shared)
    state = shared / "state"
    state.mkdir()
    shutil.chown(state, OTHER_UID, OTHER_UID)
    spool = shared / "spool"
    for name in ("tmp", "new", "done", "rejected", "out"):
        (spool / name).mkdir(parents=True, mode=0o755)
    (spool / "new" / "waiting.jsonl").write_bytes(orjson.dumps(chat_line(1)) + b"\n")
    proc = _run_daemon(config, user=OTHER_UID)
    one_line_error(proc, EX_NOPERM, str(spool / "new"), "ermission denied")
    assert not _ready(proc)
    assert (spool / "new" / "waiting.jsonl").exists()


def test_a_spool_root_the_daemon_cannot_create_in_is_77(shared: Path) -> None:
    require_root()
    config = plain_config(shared)
    (shared / "state").mkdir()
    shutil.chown(shared / "state", OTHER_UID, OTHER_UID)
    (shared / "spool").mkdir(mode=0o755)
    proc = _run_daemon(config, user=OTHER_UID)
    one_line_error(proc, EX_NOPERM, str(shared / "spool"))
    assert not _ready(proc)


def test_a_state_directory_the_daemon_cannot_write_is_77(shared: Path) -> None:
    require_root()
    config = plain_config(shared)
    (shared / "state").mkdir(mode=0o755)
    proc = _run_daemon(config, user=OTHER_UID)
    one_line_error(proc, EX_NOPERM, str(shared / "state"))
    assert not _ready(proc)
    assert not (shared / "spool").exists()


@pytest.mark.parametrize("which", ["state_dir", "spool_dir"])
def test_a_directory_under_a_file_is_73(tmp_path: Path, which: str) -> None:
    (tmp_path / "a-file").write_text("not a directory\n")
    config = plain_config(tmp_path, **{which: str(tmp_path / "a-file" / "sub")})
    proc = _run_daemon(config)
    one_line_error(proc, EX_CANTCREAT, str(tmp_path / "a-file"))
    assert not _ready(proc)


@pytest.mark.parametrize("directory", ["", "out", "done"])
def test_a_spool_directory_others_could_rename_or_write_is_refused_with_77(tmp_path: Path, directory: str) -> None:
    # A spool root writable by a producer lets it rename done/, out/ or rejected/ away and plant
    # symlinks in their place; an out/ it can write lets it replace results. The daemon fixes the
    # modes of directories it owns, and refuses, before READY, one that somebody else owns.
    require_root()
    config = plain_config(tmp_path)
    spool = tmp_path / "spool"
    for name in ("tmp", "new", "done", "rejected", "out"):
        (spool / name).mkdir(parents=True, mode=0o755)
    target = spool / directory
    shutil.chown(target, OTHER_UID, OTHER_UID)
    target.chmod(0o775)
    proc = _run_daemon(config)
    one_line_error(proc, EX_NOPERM, "unsafe spool", str(target))
    assert not _ready(proc)
