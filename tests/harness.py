"""Acceptance-tier helpers: a config file, `python -m batchd run` as a subprocess, a fake NOTIFY_SOCKET."""

from __future__ import annotations

import asyncio
import ctypes
import ctypes.util
import os
import signal
import socket
import struct
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import orjson

from batchd.emulator import RunningEmulator


def write_config(root: Path, emulator: RunningEmulator, **sections: dict[str, Any]) -> Path:
    """A TOML config for a daemon on `root` pointed at `emulator`; `sections` override keys."""
    config: dict[str, dict[str, Any]] = {
        "daemon": {
            "spool_dir": str(root / "spool"),
            "state_dir": str(root / "state"),
            "log_format": "json",
            "graceful_timeout": 10,
            "rescan_interval": 1,
            "settle_time": 1,
        },
        "batching": {"max_wait": 1, "poll_interval_min": 0.2, "poll_interval_max": 1, "tick": 0.1},
        "providers.openai": {"kind": "openai", "base_url": emulator.openai_base_url, "api_key_env": "TEST_OPENAI_KEY"},
        "providers.anthropic": {
            "kind": "anthropic",
            "base_url": emulator.anthropic_base_url,
            "api_key_env": "TEST_ANTHROPIC_KEY",
        },
    }
    for name, values in sections.items():
        config.setdefault(name.replace("__", "."), {}).update(values)
    lines = []
    for name, values in config.items():
        lines.append(f"[{name}]")
        for key, value in values.items():
            lines.append(f"{key} = {orjson.dumps(value).decode()}")
        lines.append("")
    path = root / "batchd.toml"
    path.write_text("\n".join(lines))
    return path


OPENAI_KEY = "sk-test-secret-openai-0123456789"
ANTHROPIC_KEY = "sk-ant-test-secret-0123456789"


class NotifySocket:
    """A stand-in for systemd's notification socket."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.sock.setblocking(False)
        self.messages: list[str] = []

    def drain(self) -> list[str]:
        while True:
            try:
                self.messages.append(self.sock.recv(4096).decode())
            except BlockingIOError:
                return self.messages

    def seen(self, text: str) -> bool:
        return any(text in message for message in self.drain())

    def close(self) -> None:
        self.sock.close()


class DaemonProcess:
    """`python -m batchd run --config PATH` in a subprocess, its log in a file."""

    def __init__(
        self,
        config: Path,
        log_path: Path,
        env: dict[str, str] | None = None,
        user: int | None = None,
        group: int | None = None,
        extra_groups: list[int] | None = None,
    ) -> None:
        self.config = config
        self.log_path = log_path
        self.env = {
            **os.environ,
            "TEST_OPENAI_KEY": OPENAI_KEY,
            "TEST_ANTHROPIC_KEY": ANTHROPIC_KEY,
            "PYTHONUNBUFFERED": "1",
            **(env or {}),
        }
        self.user = user
        self.group = group
        self.extra_groups = extra_groups
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, **extra_env: str) -> DaemonProcess:
        python, python_env = python_for(self.user, self.group)
        env = {**self.env, **python_env, **extra_env}
        log = self.log_path.open("ab")
        self.proc = subprocess.Popen(
            [*python, "-m", "batchd", "run", "--config", str(self.config)],
            stdout=log,
            stderr=subprocess.STDOUT,
            env=env,
            **as_user(self.user, self.group, self.extra_groups),
        )
        log.close()
        return self

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def signal(self, signum: int) -> None:
        assert self.proc is not None
        self.proc.send_signal(signum)

    async def wait(self, timeout: float) -> int:
        """The exit status; waits in a thread so an in-process emulator keeps serving."""
        assert self.proc is not None
        return await asyncio.to_thread(self.proc.wait, timeout)

    async def kill(self) -> None:
        if self.running():
            self.signal(signal.SIGKILL)
            await self.wait(30)

    async def stop(self, timeout: float = 30) -> int:
        if not self.running():
            assert self.proc is not None
            return self.proc.returncode
        self.signal(signal.SIGTERM)
        return await self.wait(timeout)

    def log_events(self) -> list[dict[str, Any]]:
        events = []
        for line in self.log_path.read_bytes().splitlines():
            try:
                event = orjson.loads(line)
            except orjson.JSONDecodeError:
                continue
            if isinstance(event, dict):
                events.append(event)
        return events


def read_results(path: Path) -> list[dict[str, Any]]:
    return [orjson.loads(line) for line in path.read_bytes().splitlines()]


POLL_SECONDS = 0.1


async def wait_for_file(path: Path, timeout: float, daemon: DaemonProcess | None = None) -> None:
    """Wait until `path` exists; fail early if the daemon died."""
    deadline = time.monotonic() + timeout
    while not path.exists():
        if daemon is not None and not daemon.running():
            raise AssertionError(f"daemon exited with {daemon.proc.returncode if daemon.proc else None}")
        if time.monotonic() > deadline:
            raise AssertionError(f"{path} did not appear within {timeout} s")
        await asyncio.sleep(POLL_SECONDS)


def open_position(pid: int, info: os.stat_result) -> int | None:
    """Where process `pid` is reading the file `info` describes (its fd's offset), or None if not open.

    Lets a test act while the daemon is mid-way through a file, without hooks in the daemon.
    """
    base = Path(f"/proc/{pid}")
    try:
        fds = os.listdir(base / "fd")
    except OSError:
        return None
    for fd in fds:
        try:
            now = os.stat(base / "fd" / fd)
            if (now.st_dev, now.st_ino) != (info.st_dev, info.st_ino):
                continue
            for line in (base / "fdinfo" / fd).read_text().splitlines():
                if line.startswith("pos:"):
                    return int(line.split()[1])
        except OSError:
            continue
    return None


def as_user(user: int | None, group: int | None = None, extra_groups: list[int] | None = None) -> dict[str, Any]:
    """subprocess keyword arguments that run a child as `user` (and `group`, default the same id)."""
    if user is None:
        return {}
    return {"user": user, "group": user if group is None else group, "extra_groups": extra_groups or []}


_PYTHONS: dict[tuple[int | None, int | None], tuple[list[str], dict[str, str]]] = {}


def python_for(user: int | None, group: int | None = None) -> tuple[list[str], dict[str, str]]:
    """An interpreter command that `user` can execute, and the environment it needs to import batchd.

    Where the test interpreter lives under a directory other users cannot enter (a pyenv under
    /root), fall back to a system interpreter of the same minor version with this checkout and its
    site-packages on PYTHONPATH.
    """
    key = (user, group)
    if key in _PYTHONS:
        return _PYTHONS[key]
    choice: tuple[list[str], dict[str, str]] = ([sys.executable], {})
    if user is not None:
        repo = str(Path(__file__).resolve().parent.parent)
        path = os.pathsep.join([repo, *(p for p in sys.path if p.endswith("site-packages"))])
        minor = f"python{sys.version_info.major}.{sys.version_info.minor}"
        candidates = [([sys.executable], {})]
        candidates += [([f"{prefix}/{minor}"], {"PYTHONPATH": path}) for prefix in ("/usr/local/bin", "/usr/bin")]
        for command, env in candidates:
            try:
                probe = subprocess.run(
                    [*command, "-c", "import batchd.cli"],
                    env={**os.environ, **env},
                    capture_output=True,
                    timeout=60,
                    **as_user(user, group),
                )
            except OSError:
                continue
            if probe.returncode == 0:
                choice = (command, env)
                break
        else:
            raise AssertionError(f"no Python interpreter that uid {user} may run can import batchd")
    _PYTHONS[key] = choice
    return choice


async def http_url(daemon: DaemonProcess, timeout: float = 60) -> str:
    """The base URL of the daemon's [http] listener, from its `http.listening` log line (listen port 0)."""
    deadline = time.monotonic() + timeout
    while True:
        for event in daemon.log_events():
            if event.get("event") == "http.listening":
                return str(event["bound"][0])
        if not daemon.running():
            raise AssertionError(f"daemon exited with {daemon.proc.returncode if daemon.proc else None}")
        if time.monotonic() > deadline:
            raise AssertionError(f"no http.listening line within {timeout} s")
        await asyncio.sleep(POLL_SECONDS)


def metric_samples(text: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    """Prometheus exposition text as {(sample name, labels): value}, parsed by prometheus-client's own parser."""
    from prometheus_client.parser import text_string_to_metric_families

    samples: dict[tuple[str, frozenset[tuple[str, str]]], float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return samples


def metric(samples: dict[tuple[str, frozenset[tuple[str, str]]], float], name: str, **labels: str) -> float:
    """The sum of `name` over every sample whose labels include `labels` (0 when none)."""
    wanted = set(labels.items())
    return sum(value for (sample, have), value in samples.items() if sample == name and wanted <= have)


class MovedInto:
    """The names renamed into a directory, in the kernel's order (inotify IN_MOVED_TO, via libc).

    Shows the order in which a producer's files appeared in spool/new/ even when the daemon takes
    them away at once; a context manager that closes its inotify descriptor.
    """

    IN_MOVED_TO = 0x80
    _EVENT = struct.Struct("iIII")  # wd, mask, cookie, len; then len bytes of NUL-padded name

    def __init__(self, directory: Path) -> None:
        libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
        self.fd = libc.inotify_init1(os.O_NONBLOCK | os.O_CLOEXEC)
        if self.fd < 0:
            raise OSError(ctypes.get_errno(), "inotify_init1")
        if libc.inotify_add_watch(self.fd, os.fsencode(directory), self.IN_MOVED_TO) < 0:
            os.close(self.fd)
            raise OSError(ctypes.get_errno(), "inotify_add_watch", str(directory))

    def names(self) -> list[str]:
        """Every name moved in since the last call, oldest first."""
        data = b""
        while True:
            try:
                data += os.read(self.fd, 1 << 16)
            except BlockingIOError:
                break
        names, offset = [], 0
        while offset < len(data):
            _wd, _mask, _cookie, length = self._EVENT.unpack_from(data, offset)
            offset += self._EVENT.size
            names.append(os.fsdecode(data[offset : offset + length].rstrip(b"\0")))
            offset += length
        return names

    def __enter__(self) -> MovedInto:
        return self

    def __exit__(self, *_: object) -> None:
        os.close(self.fd)
