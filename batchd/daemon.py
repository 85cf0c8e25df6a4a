"""The daemon: opens the store, recovers, runs the side tasks, and stops gracefully.

Side tasks: the spool watcher, the batcher, the pollers, the real-time fallback, the sinks, the leases
and the watchdog. If
any of them dies, the daemon stops (and systemd restarts it) instead of limping on.

Leases (several daemons on one PostgreSQL store): each live batch is submitted, polled and
collected only by the node holding its lease. The lease task renews this node's leases every
lease/3 seconds and takes over expired ones (a dead node's batches) every lease/2 seconds. A node
that cannot renew for most of its lease stops (the lease task raises) before another node may
take its batches, so two nodes never work one batch: that is the fencing. Signal handlers only
set a flag; a second signal forces an immediate exit. systemd is told READY=1 once the database is
open and the spool rescanned, WATCHDOG=1 from the event loop itself, and STOPPING=1 when a
graceful stop begins.

Before any of that, a preflight: the state directory is created and locked (one daemon per state
directory; the lock file holds the owner's pid), and the spool directories are created and proven
writable. A failure there is an `OperatorError` with a sysexits status, reported in one line by the
command line, before READY and before anything in the spool or the database is touched.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import fcntl
import os
import secrets
import shutil
import signal
import socket
import time
from pathlib import Path

from . import gcpolicy
from .aio import wait_any
from .batcher import Batcher
from .crashpoints import CrashPoints
from .exits import EX_NOPERM, EX_TEMPFAIL, OperatorError, creating_status, reason
from .fallback import Fallback
from .http import HttpServer
from .logs import get_logger
from .poller import HOLD_BASE, Pollers
from .providers import ProviderPool
from .retention import Retention
from .settings import Settings
from .sinks import SinkRunner
from .sinks.base import Sink
from .sinks.outbox import OutboxSink
from .sinks.webhook import WebhookSink
from .spool import Spool
from .store import open_store
from .store.contract import LIVE_BATCH_STATES, POLLED_BATCH_STATES, BatchRow, BatchState, CancelReason, Store
from .store.url import parse_store_url

log = get_logger("batchd.daemon")

LOCK_NAME = "batchd.lock"
# The spool directories the daemon itself writes in: it renames files out of new/ and creates
# files in the others. tmp/ belongs to producers.
DAEMON_WRITES = ("new", "done", "rejected", "out")


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


class StateLock:
    """An exclusive flock on STATE_DIR/batchd.lock for as long as the daemon runs; the file holds its pid.

    The kernel drops the lock when the process dies, however it dies, so a stale file never blocks.
    """

    def __init__(self, state_dir: Path) -> None:
        self.path = state_dir / LOCK_NAME
        self._fd: int | None = None

    def acquire(self) -> None:
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
        except OSError as exc:
            raise OperatorError(f"cannot open the lock file {self.path}: {reason(exc)}", creating_status(exc)) from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            holder = self._holder(fd)
            os.close(fd)
            if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN):
                raise OperatorError(f"cannot lock {self.path}: {reason(exc)}", creating_status(exc)) from None
            raise OperatorError(
                f"another batchd (pid {holder}) is running on {self.path.parent} (it holds {self.path})",
                EX_TEMPFAIL,
            ) from None
        try:
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        except OSError as exc:
            os.close(fd)
            raise OperatorError(
                f"cannot write the lock file {self.path}: {reason(exc)}", creating_status(exc)
            ) from None
        self._fd = fd

    @staticmethod
    def _holder(fd: int) -> str:
        try:
            text = os.pread(fd, 32, 0).decode("ascii", "replace").strip()
        except OSError:
            text = ""
        # The holder writes its pid just after it locks; an empty file means it has only just started.
        return text if text.isdigit() else "unknown"

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


def probe_writable(directory: Path, what: str) -> None:
    """Prove that the daemon may create (and remove) a file in `directory`, or raise an OperatorError.

    Trying is the only exact test: permission bits, ACLs, a read-only mount and a full disk all
    answer here, before READY, instead of as a traceback in the middle of an ingest.
    """
    probe = f".batchd-probe-{os.getpid()}-{secrets.token_hex(4)}"
    try:
        dir_fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError as exc:
        raise OperatorError(f"cannot open the {what} {directory}: {reason(exc)}", creating_status(exc)) from None
    try:
        fd = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600, dir_fd=dir_fd)
        os.close(fd)
        os.unlink(probe, dir_fd=dir_fd)
    except OSError as exc:
        raise OperatorError(f"cannot write in the {what} {directory}: {reason(exc)}", creating_status(exc)) from None
    finally:
        os.close(dir_fd)


class Daemon:
    """One batchd process: everything between the spool and the sinks."""

    def __init__(
        self,
        settings: Settings,
        crashpoints: CrashPoints | None = None,
        hold_base: float = HOLD_BASE,
        freeze_after_start: bool = False,
    ):
        self.settings = settings
        # `batchd run` owns its process: what lives after start-up may leave the collector's sight.
        # A daemon run inside another program (the tests) leaves that program's collector alone.
        self.freeze_after_start = freeze_after_start
        for webhook in settings.sinks:
            webhook.require_secret()  # a ConfigError (exit 78) before anything is opened, so nothing hangs
        self.crashpoints = crashpoints or CrashPoints()
        self.store_url = parse_store_url(settings.store_url)
        # The node id lives in the state directory, which the preflight creates; until then a placeholder.
        self.store: Store = open_store(settings.store_url, settings.store.node or "")
        self.workdir = settings.daemon.state_dir / "work"
        self.providers = ProviderPool(settings.providers)
        self.stopping = asyncio.Event()
        self.stop_signal: int | None = None
        self._signals = 0
        sinks: list[Sink] = []
        if settings.outbox.enabled:
            sinks.append(OutboxSink(self.store, settings.daemon.spool_dir / "out", self.crashpoints))
        self.sinks = SinkRunner(self.store, sinks)
        self.batcher = Batcher(
            settings,
            self.store,
            self.providers,
            self.workdir,
            self._on_submitted,
            self.crashpoints,
            intake_busy=lambda: self.spool.busy,
            on_results=self._on_results,
        )
        self.pollers = Pollers(
            settings,
            self.store,
            self.providers,
            self.workdir,
            on_results=self._on_results,
            on_requeued=self.batcher.wake,
            crashpoints=self.crashpoints,
            hold_base=hold_base,
            on_realtime=lambda: self.fallback.wake(),
        )
        self.fallback = Fallback(
            settings,
            self.store,
            self.providers,
            on_results=self.sinks.wake,
            on_cancel=lambda batch_id: self.pollers.cancel_wanted(batch_id, CancelReason.DEADLINE),
        )
        self.spool = Spool(
            settings, self.store, on_ingest=self._on_ingest, crashpoints=self.crashpoints, on_queued=self.batcher.wake
        )
        self.http = (
            HttpServer(settings, settings.http, self.store, self.providers, self.pollers, lambda: self.sinks.failures)
            if settings.http
            else None
        )
        self.lock = StateLock(settings.daemon.state_dir)
        self._poll_requests_seen: dict[int, float] = {}
        self.retention = Retention(settings, self.store)

    async def _leases(self) -> None:
        """Renew this node's leases every lease/3 s; take over expired ones every lease/2 s.

        Fencing: a renewal that keeps failing raises before the last renewed lease runs out, which
        stops the daemon (supervised task), so no other node ever takes a batch this one still works.
        """
        lease = self.settings.store.lease
        renew_every, take_every = lease / 3, lease / 2
        renewed_at = time.monotonic()
        next_take = time.monotonic() + take_every
        while not self.stopping.is_set():
            await wait_any(min(renew_every, max(next_take - time.monotonic(), 0.0)), self.stopping)
            if self.stopping.is_set():
                return
            now = time.monotonic()
            if now - renewed_at >= renew_every * 0.99:
                try:
                    await self.store.renew_leases(lease, time.time())
                    renewed_at = time.monotonic()
                    rows = await self.store.owned_batches(*LIVE_BATCH_STATES)
                    owned = {b.id for b in rows}
                except Exception as exc:
                    log.error("lease.renew_failed", error=str(exc), since=round(now - renewed_at, 1))
                    if time.monotonic() + renew_every >= renewed_at + lease:
                        raise RuntimeError(f"leases not renewed for {now - renewed_at:.0f} s: {exc}") from exc
                    continue
                # A lease taken away meanwhile (this node was too slow): stop working those batches.
                self.pollers.keep_only(owned)
                self.batcher.keep_only(owned)
                self._polls_requested(rows)
            if time.monotonic() >= next_take:
                next_take = time.monotonic() + take_every
                self._adopt(*await self._take_over(lease))

    async def _take_over(self, lease: float) -> tuple[list[BatchRow], dict[int, str | None]]:
        """Take every expired lease; also who held each before (take_over's rows name the new owner)."""
        now = time.time()
        before = {b.id: b.owner for b in await self.store.batches_in_state(*LIVE_BATCH_STATES) if b.lease_until < now}
        if not before:
            return [], {}
        return await self.store.take_over(lease, now), before

    def _adopt(self, taken: list[BatchRow], previous: dict[int, str | None]) -> None:
        """Start the work of batches this node took over from a node whose lease expired."""
        for batch in taken:
            self._log_taken(batch, previous.get(batch.id))
            if batch.state == BatchState.PENDING:
                self.batcher.taken_over(batch)
            elif batch.state in POLLED_BATCH_STATES:
                self.pollers.start(batch.id)

    def _polls_requested(self, owned: list[BatchRow]) -> None:
        """Poll now the batches another node asked for (a webhook reached it: store.request_poll), and
        cancel those an operator cancelled (store.request_cancel)."""
        seen = self._poll_requests_seen
        self._poll_requests_seen = {b.id: seen[b.id] for b in owned if b.id in seen}
        for batch in owned:
            if batch.cancel_wanted_at and batch.cancel_requested_at is None and batch.cancel_reason is not None:
                # An operator's `batchd cancel`: this node holds the lease, so it makes the call.
                self.pollers.cancel_wanted(batch.id, batch.cancel_reason)
            if batch.poll_requested_at and batch.poll_requested_at > self._poll_requests_seen.get(batch.id, 0.0):
                self._poll_requests_seen[batch.id] = batch.poll_requested_at
                if self.pollers.poll_now(batch.id):
                    log.info("batch.poll_requested", batch=batch.id)

    def _log_taken(self, batch: BatchRow, previous: str | None) -> None:
        log.warning("batch.taken_over", batch=batch.id, previous_owner=previous, state=str(batch.state))

    def _on_results(self) -> None:
        self.sinks.wake()
        # A batch that ended frees capacity (in flight, enqueued tokens): a route waiting for it may go.
        self.batcher.capacity_freed()

    def _on_submitted(self, batch_id: int) -> None:
        self.pollers.start(batch_id)

    def _on_ingest(self) -> None:
        self.batcher.wake()
        self.fallback.wake()
        self.sinks.ingested()

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
        """Run until stopped; returns the exit status (0 after a graceful stop).

        Raises `OperatorError` when the preflight refuses to start (another daemon holds the state
        directory, a directory that cannot be created or written), before READY.
        """
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, self._on_signal, signum)
        try:
            return await self._run()
        finally:
            for signum in (signal.SIGTERM, signal.SIGINT):
                loop.remove_signal_handler(signum)
            self.lock.release()

    def _preflight(self) -> None:
        """Everything that must hold before the daemon touches the spool or the database."""
        state_dir = self.settings.daemon.state_dir
        try:
            state_dir.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise OperatorError(
                f"cannot create the state directory {state_dir}: {reason(exc)}", creating_status(exc)
            ) from None
        # The lock comes first: a second daemon must not even clear the first one's work directory.
        self.lock.acquire()
        probe_writable(state_dir, "state directory")
        paths = self.spool.paths
        try:
            paths.create()
        except OSError as exc:
            raise OperatorError(
                f"cannot create the spool {paths.root}: {reason(exc)} ({exc.filename})", creating_status(exc)
            ) from None
        for name in DAEMON_WRITES:
            probe_writable(paths.root / name, "spool directory")
        # Producers share the spool: if they could rename or write the daemon's own directories,
        # they could redirect its writes (reports over the database, cleanup in another directory).
        unsafe = paths.check_modes()
        if unsafe is not None:
            raise OperatorError(f"refusing an unsafe spool {paths.root}: {unsafe}", EX_NOPERM)

    async def _start(self) -> None:
        self._preflight()
        self.providers.prepare()
        if self.freeze_after_start:
            gcpolicy.freeze_start_up()
        if self.workdir.exists():
            shutil.rmtree(self.workdir, ignore_errors=True)
        self.workdir.mkdir(parents=True, mode=0o700, exist_ok=True)
        node = self._node()
        self.store.node = node
        await self.store.open()
        lease = self.settings.store.lease
        # This node's own leases (a quick restart) first, then anything a dead node left behind.
        await self.store.renew_leases(lease, time.time())
        taken, previous = await self._take_over(lease)
        instance = await self.store.instance_id()
        for webhook in self.settings.sinks:
            self.sinks.add(WebhookSink(self.store, webhook, instance, lease=self.settings.store.lease))
        await self.sinks.recover()
        await self.batcher.recover()
        for batch in taken:  # the batcher's recover and the pollers' start pick them up as this node's own
            self._log_taken(batch, previous.get(batch.id))
        files = await self.spool.rescan()
        if self.http is not None:
            await self.http.start()  # before READY: a port that cannot be bound refuses the start
        log.info(
            "daemon.ready",
            spool=str(self.spool.paths.root),
            store=self.store_url.redacted(),
            engine=self.store_url.engine,
            node=node,
            files_taken=files,
            providers=sorted(self.settings.providers),
        )
        sd_notify("READY=1\nSTATUS=running")

    def _node(self) -> str:
        try:
            node = self.settings.node_id(create=True)
        except OSError as exc:
            path = self.settings.daemon.state_dir / "node-id"
            raise OperatorError(f"cannot keep the node id in {path}: {reason(exc)}", creating_status(exc)) from None
        assert node is not None
        return node

    async def _run(self) -> int:
        started = time.monotonic()
        try:
            await self._start()
        except BaseException as exc:
            if isinstance(exc, OperatorError):
                log.error("daemon.start_refused", reason=exc.line, exit_status=exc.status)
            # Nothing may keep the process alive after a failed start (the database thread would).
            await self.providers.close()
            await self.store.close()
            raise
        tasks = {
            asyncio.create_task(self.spool.run(self.stopping), name="spool"),
            asyncio.create_task(self.batcher.run(self.stopping), name="batcher"),
            asyncio.create_task(self.pollers.run(self.stopping), name="pollers"),
            asyncio.create_task(self.fallback.run(self.stopping), name="fallback"),
            asyncio.create_task(self.sinks.run(self.stopping), name="sinks"),
            asyncio.create_task(self._leases(), name="leases"),
            asyncio.create_task(self._watchdog(), name="watchdog"),
            asyncio.create_task(self.retention.run(self.stopping), name="retention"),
        }
        if self.http is not None:
            tasks.add(asyncio.create_task(self.http.run(self.stopping), name="http"))
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
        # Nothing of this node works a batch any more: another node may take them at once, not after the lease.
        with contextlib.suppress(Exception):
            await self.store.release_leases()
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
