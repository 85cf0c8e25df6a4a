"""Hostile producers (root tier): the daemon under its own uid, a producer under another, one spool.

The spool is made the way systemd/batchd.tmpfiles makes it (root 2755, tmp/ and new/ 3770, done/,
rejected/ and out/ 2750, owned by the daemon's uid and the producers' group). The daemon runs as
`python -m batchd run` under DAEMON_UID; each producer is a long-lived process under its own uid in
the producers' group that performs system calls on command, so an attack lands at the instant the
test chooses (for example while the daemon is reading a file). Every attack asserts its exact
outcome: no result lost, duplicated or misattributed, and no file of the daemon's touched.
"""

from __future__ import annotations

import asyncio
import errno
import os
import shutil
import signal
import sqlite3
import stat
import subprocess
import tempfile
from collections import Counter
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson
import pytest

from batchd.emulator import RunningEmulator
from batchd.spool import DIR_MODES, SpoolPaths

from .conftest import require_root, wait_until
from .harness import DaemonProcess, open_position, python_for, read_results, wait_for_file, write_config

DAEMON_UID = 64001
PRODUCERS_GID = 64002
PRODUCER_UID = 64003
OTHER_PRODUCER_UID = 64004

# A producer that runs one system call per command line: ["rename", "a", "b"] → "ok" or "errno N".
# Names are strings, or {"hex": …} for bytes (a name that is not UTF-8).
AGENT = r"""
import os, sys, json
def arg(a):
    return bytes.fromhex(a["hex"]) if isinstance(a, dict) else a
def drop(name, data_hex, into="spool/new"):
    tmp = b"spool/tmp/." + os.fsencode(name)
    with open(tmp, "wb") as f:
        f.write(bytes.fromhex(data_hex)); f.flush(); os.fsync(f.fileno())
    if into:
        os.rename(tmp, os.fsencode(into) + b"/" + os.fsencode(name))
def stage(name, data_hex):
    drop(name, data_hex, into=None)
def write(path, data_hex):
    with open(path, "wb") as f:
        f.write(bytes.fromhex(data_hex))
OPS = {"drop": drop, "stage": stage, "write": write}
for line in sys.stdin:
    op, *args = json.loads(line)
    try:
        (OPS.get(op) or getattr(os, op))(*map(arg, args))
        print("ok", flush=True)
    except OSError as exc:
        print(f"errno {exc.errno}", flush=True)
"""


class Producer:
    """A producer process under its own uid in the producers' group."""

    def __init__(self, base: Path, uid: int) -> None:
        python, env = python_for(uid, uid)
        self.proc = subprocess.Popen(
            [*python, "-c", AGENT],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            cwd=base,
            env={**os.environ, **env},
            user=uid,
            group=uid,
            extra_groups=[PRODUCERS_GID],
            umask=0o022,
        )

    def _call(self, command: list[Any]) -> str:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write(orjson.dumps(command) + b"\n")
        self.proc.stdin.flush()
        return self.proc.stdout.readline().decode().strip()

    async def __call__(self, op: str, *args: str | bytes) -> str:
        encoded = [{"hex": a.hex()} if isinstance(a, bytes) else a for a in args]
        return await asyncio.to_thread(self._call, [op, *encoded])

    async def drop(self, name: str | bytes, data: bytes) -> None:
        assert await self("drop", name, data.hex()) == "ok"

    async def refused(self, op: str, *args: str | bytes) -> None:
        answer = await self(op, *args)
        assert answer in (f"errno {errno.EACCES}", f"errno {errno.EPERM}"), f"{op}{args}: {answer}"

    def close(self) -> None:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.close()
        self.proc.wait(10)
        self.proc.stdout.close()


@dataclass
class Setup:
    base: Path
    paths: SpoolPaths
    database: Path
    daemon: DaemonProcess
    producer: Producer
    other: Producer

    def event(self, name: str) -> list[dict[str, Any]]:
        return [e for e in self.daemon.log_events() if e.get("event") == name]

    def database_ok(self) -> None:
        info = os.lstat(self.database)
        assert stat.S_ISREG(info.st_mode) and info.st_uid == DAEMON_UID
        with sqlite3.connect(f"file:{self.database}?mode=ro", uri=True) as db:
            assert db.execute("PRAGMA integrity_check").fetchone() == ("ok",)


def chat(custom_id: str) -> bytes:
    line = {
        "custom_id": custom_id,
        "method": "POST",
        "url": "/v1/chat/completions",
        "body": {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": custom_id}], "max_tokens": 8},
    }
    return orjson.dumps(line) + b"\n"


def no_messages(custom_id: str) -> bytes:
    """A line that is invalid (no messages) but keeps its custom_id: cheap to answer, easy to attribute."""
    return (
        orjson.dumps({"custom_id": custom_id, "method": "POST", "url": "/v1/chat/completions", "body": {"model": "m"}})
        + b"\n"
    )


@pytest.fixture
async def hostile(emulator: RunningEmulator) -> AsyncIterator[Setup]:
    require_root()
    base = Path(tempfile.mkdtemp(prefix="batchd-hostile-"))
    base.chmod(0o755)  # the daemon and producer uids must reach the spool (pytest's tmp_path is 0700)
    producers: list[Producer] = []
    daemon: DaemonProcess | None = None
    try:
        paths = SpoolPaths(base / "spool")
        paths.create()
        for sub, mode in DIR_MODES:  # as systemd-tmpfiles would: daemon uid, producers' group
            path = paths.root / sub if sub else paths.root
            os.chown(path, DAEMON_UID, PRODUCERS_GID)
            os.chmod(path, mode)
        state = base / "state"
        state.mkdir(mode=0o700)
        os.chown(state, DAEMON_UID, DAEMON_UID)
        config = write_config(base, emulator)
        config.chmod(0o644)
        daemon = DaemonProcess(
            config, base / "daemon.log", user=DAEMON_UID, group=DAEMON_UID, extra_groups=[PRODUCERS_GID]
        ).start()
        await wait_until(
            lambda: not daemon.running() or any(e.get("event") == "daemon.ready" for e in daemon.log_events()), 30
        )
        assert daemon.running(), (base / "daemon.log").read_text()[-3000:]
        assert paths.check_modes(euid=DAEMON_UID) is None
        producers = [Producer(base, PRODUCER_UID), Producer(base, OTHER_PRODUCER_UID)]
        yield Setup(base, paths, state / "batchd.sqlite3", daemon, *producers)
    finally:
        for producer in producers:
            producer.close()
        if daemon is not None:
            await daemon.stop()
        shutil.rmtree(base, ignore_errors=True)


async def test_a_producer_cannot_rename_the_daemons_directories_or_plant_links_in_them(hostile: Setup) -> None:
    producer, paths = hostile.producer, hostile.paths
    db = str(hostile.database)
    for sub in ("rejected", "out", "done", "new", "tmp"):
        await producer.refused("rename", f"spool/{sub}", f"spool/{sub}.mine")
    await producer.refused("mkdir", "spool/rejected.mine")
    # Symlinks named like the next report and the next results, aimed at the daemon's database.
    await producer.refused("symlink", db, "spool/rejected/empty.jsonl.error.json")
    await producer.refused("symlink", db, "spool/out/ok.results.jsonl")
    await producer.refused("symlink", db, "spool/out/ok.results.jsonl.part")
    await producer.refused("symlink", db, "spool/done/ok.jsonl")
    # Another producer's file in new/ (a name the daemon ignores) cannot be renamed or removed by it.
    await producer.drop("notes.txt", b"mine\n")
    await hostile.other.refused("rename", "spool/new/notes.txt", "spool/new/taken.txt")
    await hostile.other.refused("unlink", "spool/new/notes.txt")
    assert await hostile.other("stage", "mine.txt", b"theirs\n".hex()) == "ok"
    await hostile.other.refused("rename", "spool/tmp/.mine.txt", "spool/new/notes.txt")

    await producer.drop("empty.jsonl", b"")
    await producer.drop("ok.jsonl", chat("ok-1") + chat("ok-2"))
    await wait_for_file(paths.out / "ok.results.jsonl", 60, hostile.daemon)
    assert Counter(r["custom_id"] for r in read_results(paths.out / "ok.results.jsonl")) == {"ok-1": 1, "ok-2": 1}
    assert sorted(os.listdir(paths.rejected)) == ["empty.jsonl", "empty.jsonl.error.json"]
    assert orjson.loads((paths.rejected / "empty.jsonl.error.json").read_bytes())["file"] == "empty.jsonl"
    assert (paths.new / "notes.txt").read_bytes() == b"mine\n"
    assert paths.check_modes(euid=DAEMON_UID) is None
    hostile.database_ok()


async def test_links_fifos_and_undecodable_names_are_rejected_and_the_daemon_stays_responsive(
    hostile: Setup,
) -> None:
    producer, paths = hostile.producer, hostile.paths
    await producer("symlink", str(hostile.database), "spool/new/link.jsonl")
    assert await producer("mkfifo", "spool/new/pipe.jsonl") == "ok"
    await producer.drop(b"bad\xff.jsonl", chat("bad-1"))
    await producer.drop("after.jsonl", chat("after-1"))
    await wait_for_file(paths.out / "after.results.jsonl", 60, hostile.daemon)
    assert [r["custom_id"] for r in read_results(paths.out / "after.results.jsonl")] == ["after-1"]

    rejected = sorted(os.listdir(os.fsencode(paths.rejected)))
    assert rejected == [
        b"bad\\xff.jsonl",
        b"bad\\xff.jsonl.error.json",
        b"link.jsonl",
        b"link.jsonl.error.json",
        b"pipe.jsonl",
        b"pipe.jsonl.error.json",
    ]
    assert os.readlink(paths.rejected / "link.jsonl") == str(hostile.database)  # moved, never followed
    assert stat.S_ISFIFO(os.lstat(paths.rejected / "pipe.jsonl").st_mode)
    reports = {
        name: orjson.loads((paths.rejected / f"{name}.error.json").read_bytes())
        for name in ("bad\\xff.jsonl", "link.jsonl", "pipe.jsonl")
    }
    assert {name: report["file"] for name, report in reports.items()} == {n: n for n in reports}
    assert "UTF-8" in reports["bad\\xff.jsonl"]["error"]
    assert "symlink" in reports["link.jsonl"]["error"]
    assert not [e for e in hostile.daemon.log_events() if e.get("event") == "daemon.task_died"]
    hostile.database_ok()
    # SIGTERM still stops it gracefully: nothing blocked the event loop.
    assert await hostile.daemon.stop(timeout=30) == -signal.SIGTERM


async def test_a_file_renamed_over_its_name_mid_ingest_and_a_file_dropped_twice_each_get_all_results(
    hostile: Setup,
) -> None:
    producer, paths = hostile.producer, hostile.paths
    big = b"".join(no_messages(f"big-{n}") for n in range(150_000)) + chat("big-valid")
    await producer("stage", "big.jsonl", big.hex())
    await producer("stage", "other.jsonl", (chat("other-1") + chat("other-2")).hex())
    staged = os.stat(paths.tmp / ".big.jsonl")
    assert await producer("rename", "spool/tmp/.big.jsonl", "spool/new/big.jsonl") == "ok"
    # The attack: once the daemon is reading big.jsonl, rename another file over its name.
    await wait_until(lambda: (open_position(hostile.daemon.pid, staged) or 0) > 0, timeout=30, interval=0.002)
    assert await producer("rename", "spool/tmp/.other.jsonl", "spool/new/big.jsonl") == "ok"
    assert open_position(hostile.daemon.pid, staged) is not None, "the rename came after the ingest: proves nothing"

    await wait_for_file(paths.out / "big.results.jsonl", 120, hostile.daemon)
    await wait_for_file(paths.out / "big.1.results.jsonl", 120, hostile.daemon)
    first = read_results(paths.out / "big.results.jsonl")
    assert len(first) == 150_001
    assert Counter(r["custom_id"] for r in first) == {f"big-{n}": 1 for n in range(150_000)} | {"big-valid": 1}
    assert Counter(r["status"] for r in first) == {"invalid": 150_000, "succeeded": 1}
    second = read_results(paths.out / "big.1.results.jsonl")
    assert Counter((r["custom_id"], r["status"]) for r in second) == {
        ("other-1", "succeeded"): 1,
        ("other-2", "succeeded"): 1,
    }
    assert hostile.event("spool.replaced_during_ingest")
    assert [e["results"] for e in hostile.event("spool.results_renamed")] == ["big.1.results.jsonl"]

    # The same name and the same content dropped again after the first was done: new work.
    twice = chat("twice-1") + chat("twice-2")
    await producer.drop("twice.jsonl", twice)
    await wait_for_file(paths.out / "twice.results.jsonl", 60, hostile.daemon)
    await producer.drop("twice.jsonl", twice)
    await wait_for_file(paths.out / "twice.1.results.jsonl", 60, hostile.daemon)
    for name in ("twice.results.jsonl", "twice.1.results.jsonl"):
        results = read_results(paths.out / name)
        assert Counter((r["custom_id"], r["status"]) for r in results) == {
            ("twice-1", "succeeded"): 1,
            ("twice-2", "succeeded"): 1,
        }, name
    assert sorted(os.listdir(paths.new)) == []
    hostile.database_ok()
