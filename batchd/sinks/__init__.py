"""Sinks: where results go once they are durable in the store. Each runs as its own task."""

from __future__ import annotations

import asyncio
import contextlib

from ..aio import wait_any
from ..logs import get_logger
from ..providers.base import backoff
from ..store.contract import Store
from .base import Sink

log = get_logger("batchd.sinks")


class SinkRunner:
    """Feeds every sink the results after its cursor; a failing sink never holds up the others."""

    def __init__(self, store: Store, sinks: list[Sink]) -> None:
        self.store = store
        self.sinks: list[Sink] = []
        # Failed delivery attempts per sink kind (the name before any ":NODE"), for /metrics.
        self.failures: dict[str, int] = {}
        self._wakes: dict[Sink, asyncio.Event] = {}  # by sink: a name may depend on the node id
        for sink in sinks:
            self.add(sink)

    def add(self, sink: Sink) -> None:
        self.sinks.append(sink)
        self._wakes[sink] = asyncio.Event()

    def wake(self) -> None:
        for event in self._wakes.values():
            event.set()

    def ingested(self) -> None:
        """A file was wholly ingested: sinks that track files look at them again, then deliver."""
        for sink in self.sinks:
            sink.ingested()
        self.wake()

    async def recover(self) -> None:
        for sink in self.sinks:
            await sink.recover()

    async def run(self, stopping: asyncio.Event) -> None:
        try:
            async with asyncio.TaskGroup() as group:
                for sink in self.sinks:
                    group.create_task(self._feed(sink, stopping), name=f"sink-{sink.name}")
        finally:
            for sink in self.sinks:
                await sink.close()

    async def drain(self) -> None:
        """Deliver everything committed so far (used on a graceful stop)."""
        for sink in self.sinks:
            with contextlib.suppress(Exception):
                await self._deliver_pending(sink)
            await sink.close()

    async def _deliver_pending(self, sink: Sink) -> int:
        if not await sink.may_deliver():
            return 0  # another node delivers this sink now
        await sink.before_delivery()
        cursor = await sink.cursor()
        delivered = 0
        while await sink.may_deliver():
            results = await self.store.results_after(cursor, sink.chunk, node=sink.node)
            if not results:
                break
            await sink.deliver(results)
            cursor = results[-1].id
            delivered += len(results)
        return delivered

    async def _feed(self, sink: Sink, stopping: asyncio.Event) -> None:
        wake = self._wakes[sink]
        failures = 0
        while not stopping.is_set():
            wake.clear()
            try:
                await self._deliver_pending(sink)
                failures = 0
                timeout = 1.0
            except Exception as exc:
                failures += 1
                label = sink.name.split(":", 1)[0]
                self.failures[label] = self.failures.get(label, 0) + 1
                timeout = backoff(failures, base=1.0, ceiling=300.0)
                log.warning("sink.delivery_failed", sink=sink.name, error=str(exc), retry_in=round(timeout, 1))
                try:
                    await self.store.add_error("sink.delivery_failed", f"{sink.name}: {exc}")
                except Exception as record_exc:
                    # The database may be what failed ("database is locked"); the sink must live on and retry.
                    log.warning("sink.error_not_recorded", sink=sink.name, error=str(record_exc))
            # While a sink is failing only its backoff (or a stop) ends the wait, not new results.
            await wait_any(timeout, stopping) if failures else await wait_any(timeout, wake, stopping)
