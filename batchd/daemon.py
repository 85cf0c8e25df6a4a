"""The daemon: opens the store, recovers, runs the side tasks, and stops gracefully.

Side tasks: the spool watcher, the batcher, the pollers, the sinks and the watchdog. If any of
them dies, the daemon stops (and systemd restarts it) instead of limping on. Signal handlers only
set a flag; a second signal forces an immediate exit. systemd is told READY=1 once the database is
open and the spool rescanned, WATCHDOG=1 from the event loop itself, and STOPPING=1 when a
graceful stop begins.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import socket
import time

from .aio import wait_any
from .batcher import Batcher
from .crashpoints import CrashPoints
from .logs import get_logger
from .poller import HOLD_BASE, Pollers
from .providers import ProviderPool
from .settings import Settings
from .sinks import SinkRunner
from .sinks.base import Sink
from .sinks.outbox import OutboxSink
from .sinks.webhook import WebhookSink
from .spool import Spool
from .store import Store

log = get_logger("batchd.daemon")


def sd_notify(message: str) -> bool:
    """Send one notification to systemd if NOTIFY_SOCKET is set; never raises."""
    address = os.environ.get("NOTIFY_SOCKET")
    if not address:
        return False
    if address.startswith("@"):
        address = "\0" + address[1:]
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
            sock.connect(address)
            sock.sendall(message.encode())
        return True
    except OSError:
        return False


class Daemon:
    """One batchd process: everything between the spool and the sinks."""

    def __init__(self, settings: Settings, crashpoints: CrashPoints | None = None, hold_base: float = HOLD_BASE):
        self.settings = settings
        for webhook in settings.sinks:
            webhook.require_secret()  # a ConfigError (exit 78) before anything is opened, so nothing hangs
        self.crashpoints = crashpoints or CrashPoints()
        self.store = Store(settings.daemon.database_path)
        self.workdir = settings.daemon.state_dir / "work"
        self.providers = ProviderPool(settings.providers)
        self.stopping = asyncio.Event()
        self.stop_signal: int | None = None
        self._signals = 0
        sinks: list[Sink] = []
        if settings.outbox.enabled:
            sinks.append(OutboxSink(self.store, settings.daemon.spool_dir / "out", self.crashpoints))
        self.sinks = SinkRunner(self.store, sinks)
        self.batcher = Batcher(settings, self.store, self.providers, self.workdir, self._on_submitted, self.crashpoints)
        self.pollers = Pollers(
            settings,
            self.store,
            self.providers,
            self.workdir,
            on_results=self.sinks.wake,
            on_requeued=self.batcher.wake,
            crashpoints=self.crashpoints,
            hold_base=hold_base,
        )
        self.spool = Spool(settings, self.store, on_ingest=self._on_ingest, crashpoints=self.crashpoints)

    def _on_submitted(self, batch_id: int) -> None:
        self.pollers.start(batch_id)

    def _on_ingest(self) -> None:
        self.batcher.wake()
        self.sinks.wake()

    def request_stop(self, reason: str) -> None:
        if not self.stopping.is_set():
            log.info("daemon.stopping", reason=reason)
            sd_notify("STOPPING=1")
            self.stopping.set()

    def _on_signal(self, signum: int) -> None:
        self._signals += 1
        if self._signals > 1:
            log.warning("daemon.forced_exit", signal=signal.Signals(signum).name)
            os._exit(128 + signum)
        self.stop_signal = signum
        self.request_stop(signal.Signals(signum).name)

    async def run(self) -> int:
        """Run until stopped; returns the exit status (0 after a graceful stop)."""
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, self._on_signal, signum)
        try:
            return await self._run()
        finally:
            for signum in (signal.SIGTERM, signal.SIGINT):
                loop.remove_signal_handler(signum)

    async def _start(self) -> None:
        self.spool.paths.create()
        if self.workdir.exists():
            shutil.rmtree(self.workdir, ignore_errors=True)
        self.workdir.mkdir(parents=True, mode=0o700, exist_ok=True)
        await self.store.open()
        instance = await self.store.instance_id()
        for webhook in self.settings.sinks:
            self.sinks.add(WebhookSink(self.store, webhook, instance))
        await self.sinks.recover()
        await self.batcher.recover()
        taken = await self.spool.rescan()
        log.info(
            "daemon.ready",
            spool=str(self.spool.paths.root),
            database=str(self.store.path),
            files_taken=taken,
            providers=sorted(self.settings.providers),
        )
        sd_notify("READY=1\nSTATUS=running")

    async def _run(self) -> int:
        started = time.monotonic()
        await self._start()
        tasks = {
            asyncio.create_task(self.spool.run(self.stopping), name="spool"),
            asyncio.create_task(self.batcher.run(self.stopping), name="batcher"),
            asyncio.create_task(self.pollers.run(self.stopping), name="pollers"),
            asyncio.create_task(self.sinks.run(self.stopping), name="sinks"),
            asyncio.create_task(self._watchdog(), name="watchdog"),
        }
        stop_waiter = asyncio.create_task(self.stopping.wait(), name="stop-waiter")
        status = 0
        done, _ = await asyncio.wait({*tasks, stop_waiter}, return_when=asyncio.FIRST_COMPLETED)
        for task in done - {stop_waiter}:
            error = None if task.cancelled() else task.exception()
            if error is None and self.stopping.is_set():
                continue  # it finished because the stop had already begun
            log.error("daemon.task_died", task=task.get_name(), error=repr(error), exc_info=error)
            status = 1
        self.request_stop("task died" if status else "signal")
        _, pending = await asyncio.wait(tasks, timeout=self.settings.daemon.graceful_timeout)
        for task in pending:
            task.cancel()
        for task in pending:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        if not pending:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self.sinks.drain(), timeout=max(self.settings.daemon.graceful_timeout / 2, 1))
        await self.providers.close()
        await self.store.close()
        stop_waiter.cancel()
        log.info("daemon.stopped", status=status, seconds=round(time.monotonic() - started, 1))
        return status

    async def _watchdog(self) -> None:
        """WATCHDOG=1 at half of WatchdogSec, from the event loop, so a stuck loop is noticed."""
        usec = os.environ.get("WATCHDOG_USEC")
        pid = os.environ.get("WATCHDOG_PID")
        if not usec or (pid and pid != str(os.getpid())):
            await self.stopping.wait()
            return
        interval = int(usec) / 1_000_000 / 2
        while not self.stopping.is_set():
            sd_notify("WATCHDOG=1")
            await wait_any(interval, self.stopping)
