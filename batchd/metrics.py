"""/metrics: Prometheus families, every one named `batchd_…`, labels only from bounded sets.

Two kinds of families:
- database-wide (queue, batches, requests, spend, capacity, turnaround, sinks): read from the store
  at scrape time (`Reporting.metrics()`). With several daemons on one store, only the holder of the
  store's `metrics` lease exports them (a sink-style lease renewed every lease/3), so Prometheus
  never sums one queue N times; `batchd_metrics_exporter` says which daemon it is (1) or is not (0).
- this process's own (webhooks received, live pollers, readiness): every daemon exports its own.

Labels: profile, endpoint, model, status, price, kind, sink, outcome: all from the configuration or
from fixed vocabularies, never a file name or an id. Families are built by the pure `families()`
from the store's read model, so what a scrape shows is unit-testable without a server.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, disable_created_metrics, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector

from .aio import wait_any
from .logs import get_logger
from .store.contract import LIVE_BATCH_STATES, TURNAROUND_BUCKETS, Store

log = get_logger("batchd.metrics")
# A `_created` sample per counter is noise to every dashboard, and one more name to document.
disable_created_metrics()  # type: ignore[no-untyped-call]
# A store read this slow (seconds) is served from memory while the next one runs; it is read again
# once older than STALE_READS times what it cost.
SLOW_READ = 0.25
STALE_READS = 5.0

# The metrics lease, in the store's sink-lease table; not a valid sink name, so no sink can clash.
METRICS_LEASE = ":metrics"
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
_LIVE = {str(state) for state in LIVE_BATCH_STATES}


def _sink_label(cursor: str) -> str:
    # The outbox keeps one cursor per node ("outbox:NODE"): the node id is not a bounded label.
    return cursor.split(":", 1)[0]


def histogram(values: Iterable[float], buckets: tuple[float, ...]) -> tuple[list[tuple[str, float]], float]:
    """Cumulative (le, count) pairs ending with +Inf, and the sum of `values`."""
    ordered = sorted(values)
    pairs: list[tuple[str, float]] = []
    index = 0
    for bound in buckets:
        while index < len(ordered) and ordered[index] <= bound:
            index += 1
        pairs.append((repr(float(bound)), float(index)))
    pairs.append(("+Inf", float(len(ordered))))
    return pairs, float(sum(ordered))


def _pruned_turnaround(rows: Iterable[dict[str, Any]]) -> dict[str, tuple[list[float], float]]:
    """Per profile: the pruned batches' count per bucket (not cumulative; the last is past every
    bound, +Inf) and their seconds summed, from the store's turnaround_pruned rows."""
    pruned: dict[str, tuple[list[float], float]] = {}
    for row in rows:
        counts, total = pruned.get(row["profile"], ([0.0] * (len(TURNAROUND_BUCKETS) + 1), 0.0))
        if row["family"] == "turnaround_sum":
            total += float(row["value"])
        else:
            counts[int(row["bucket"])] += float(row["value"])  # -1: past the last bound, the +Inf slot
        pruned[row["profile"]] = (counts, total)
    return pruned


def families(data: dict[str, list[dict[str, Any]]], now: float) -> list[Metric]:
    """The database-wide families from `Store.metrics()` rows (pure)."""
    route = ["profile", "endpoint", "model"]
    depth = GaugeMetricFamily("batchd_queue_depth", "Requests queued (not yet in a batch) per route.", labels=route)
    age = GaugeMetricFamily(
        "batchd_queue_oldest_age_seconds", "Age of the oldest queued request per route.", labels=route
    )
    for row in data["queue"]:
        labels = [row["profile"], row["endpoint"], row["model"]]
        depth.add_metric(labels, float(row["queued"]))
        age.add_metric(labels, max(0.0, now - float(row["oldest"])))
    live = GaugeMetricFamily(
        "batchd_batches",
        "Live batches (pending, unverified, submitted) by provider status.",
        labels=["profile", "status"],
    )
    finished = CounterMetricFamily(
        "batchd_batches_finished",
        "Batches ended and collected, by final provider status.",
        labels=["profile", "status"],
    )
    for row in data["batches"]:
        family = live if row["state"] in _LIVE else finished
        family.add_metric([row["profile"], row["status"]], float(row["n"]))
    requests = CounterMetricFamily(
        "batchd_requests", "Requests with a final result, by status.", labels=["profile", "model", "status"]
    )
    collected = CounterMetricFamily(
        "batchd_collected_results",
        "Result lines collected from providers (collect throughput).",
        labels=["profile", "model"],
    )
    tokens = CounterMetricFamily("batchd_tokens", "Tokens billed, by kind.", labels=["profile", "model", "kind"])
    spend = CounterMetricFamily(
        "batchd_spend_usd",
        "Cost of final results in USD: price=batch is what was paid, price=realtime what real-time calls would cost.",
        labels=["profile", "model", "price"],
    )
    per_model: dict[tuple[str, str], list[float]] = {}
    for row in data["results"]:
        key = (row["profile"], row["model"])
        requests.add_metric([*key, row["status"]], float(row["n"]))
        sums = per_model.setdefault(key, [0.0, 0.0, 0.0, 0.0, 0.0])
        for index, name in enumerate(("collected", "input_tokens", "output_tokens", "cost_batch", "cost_realtime")):
            sums[index] += float(row[name] or 0)
    for key, (n_collected, tokens_in, tokens_out, cost_batch, cost_realtime) in sorted(per_model.items()):
        if not key[0]:
            continue  # invalid lines: never sent, never billed
        collected.add_metric(list(key), n_collected)
        tokens.add_metric([*key, "input"], tokens_in)
        tokens.add_metric([*key, "output"], tokens_out)
        spend.add_metric([*key, "batch"], cost_batch)
        spend.add_metric([*key, "realtime"], cost_realtime)
    retries = CounterMetricFamily(
        "batchd_retries", "Requests sent to a provider again after a retryable outcome.", labels=["profile", "model"]
    )
    for row in data["retries"]:
        retries.add_metric([row["profile"], row["model"]], float(row["retries"]))
    capacity_labels = ["profile", "model"]
    in_flight = GaugeMetricFamily(
        "batchd_in_flight_batches", "Live batches per (profile, model).", labels=capacity_labels
    )
    enqueued_tokens = GaugeMetricFamily(
        "batchd_enqueued_tokens", "Estimated tokens enqueued at the provider (capacity used).", labels=capacity_labels
    )
    enqueued_requests = GaugeMetricFamily(
        "batchd_enqueued_requests", "Requests enqueued at the provider (capacity used).", labels=capacity_labels
    )
    for row in data["capacity"]:
        labels = [row["profile"], row["model"]]
        in_flight.add_metric(labels, float(row["batches"]))
        enqueued_tokens.add_metric(labels, float(row["tokens"]))
        enqueued_requests.add_metric(labels, float(row["requests"]))
    turnaround = HistogramMetricFamily(
        "batchd_batch_turnaround_seconds", "Seconds from a batch's submission to its collection.", labels=["profile"]
    )
    by_profile: dict[str, list[float]] = {}
    for row in data["turnaround"]:
        by_profile.setdefault(row["profile"], []).append(max(0.0, float(row["seconds"])))
    pruned = _pruned_turnaround(data.get("turnaround_pruned", []))
    for profile in sorted(by_profile.keys() | pruned.keys()):
        buckets, total = histogram(by_profile.get(profile, []), TURNAROUND_BUCKETS)
        counts, pruned_total = pruned.get(profile, ([0.0] * (len(TURNAROUND_BUCKETS) + 1), 0.0))
        merged = [(le, count + sum(counts[: index + 1])) for index, (le, count) in enumerate(buckets)]
        turnaround.add_metric([profile], merged, total + pruned_total)
    [ingested] = data["ingested"] or [{"files": 0, "lines": 0}]
    lines = CounterMetricFamily("batchd_ingested_lines", "Input lines taken from the spool (ingest throughput).")
    lines.add_metric([], float(ingested["lines"]))
    files = CounterMetricFamily("batchd_ingested_files", "Input files taken from the spool.")
    files.add_metric([], float(ingested["files"]))
    backlog = GaugeMetricFamily("batchd_sink_backlog", "Results not yet delivered by a sink.", labels=["sink"])
    parked = GaugeMetricFamily(
        "batchd_sink_parked", "Results a sink gave up on (delivery failures; batchd redeliver).", labels=["sink"]
    )
    sinks: dict[str, list[float]] = {}
    for row in data["sinks"]:
        sums = sinks.setdefault(_sink_label(row["sink"]), [0.0, 0.0])
        sums[0] += float(row["pending"])
        sums[1] += float(row["parked"])
    for sink, (pending, n_parked) in sorted(sinks.items()):
        backlog.add_metric([sink], pending)
        parked.add_metric([sink], n_parked)
    return [
        depth, age, live, finished, requests, collected, tokens, spend, retries, in_flight, enqueued_tokens,
        enqueued_requests, turnaround, lines, files, backlog, parked,
    ]  # fmt: skip


class _Snapshot(Collector):
    """Yields the families of the last scrape's store read (refreshed by `Metrics.render`)."""

    def __init__(self) -> None:
        self.families: list[Metric] = []

    def collect(self) -> Iterator[Metric]:
        yield from self.families


class _SinkFailures(Collector):
    """This process's failed delivery attempts per sink (each daemon delivers, and counts, its own)."""

    def __init__(self, failures: Callable[[], Mapping[str, int]]) -> None:
        self.failures = failures

    def collect(self) -> Iterator[Metric]:
        family = CounterMetricFamily(
            "batchd_sink_delivery_failures",
            "Failed delivery attempts by this daemon per sink (each is retried with backoff).",
            labels=["sink"],
        )
        for sink, count in sorted(self.failures().items()):
            family.add_metric([sink], float(count))
        yield family


class Metrics:
    """One daemon's registry: its own counters plus, while it holds the metrics lease, the store's."""

    def __init__(
        self,
        store: Store,
        lease: float,
        live_pollers: Callable[[], int],
        sink_failures: Callable[[], Mapping[str, int]] = dict,
    ) -> None:
        self.store = store
        self.lease = lease
        self.registry = CollectorRegistry(auto_describe=False)
        self.webhooks = Counter(
            "batchd_webhooks_received",
            "OpenAI webhook deliveries by outcome: accepted (our batch, poll woken), unknown (not our batch),"
            " ignored (not a batch event), refused (bad, missing or stale signature).",
            ["outcome"],
            registry=self.registry,
        )
        for outcome in ("accepted", "unknown", "ignored", "refused"):
            self.webhooks.labels(outcome)
        self.exporter = Gauge(
            "batchd_metrics_exporter",
            "1 if this daemon exports the database-wide families (it holds the metrics lease), else 0.",
            registry=self.registry,
        )
        pollers = Gauge("batchd_live_pollers", "Batches this daemon is polling now.", registry=self.registry)
        pollers.set_function(lambda: float(live_pollers()))
        self.registry.register(_SinkFailures(sink_failures))
        self._snapshot = _Snapshot()
        self.registry.register(self._snapshot)
        self.leader = False
        self._read: dict[str, list[dict[str, Any]]] | None = None
        self._read_at = 0.0
        self._read_cost = 0.0
        self._refreshing: asyncio.Task[None] | None = None

    async def hold_lease(self, stopping: asyncio.Event) -> None:
        """Take or renew the metrics lease every lease/3 s, so one daemon keeps exporting the store's families."""
        while not stopping.is_set():
            try:
                leader = await self.store.take_sink_lease(METRICS_LEASE, self.lease, time.time())
            except Exception as exc:  # a store hiccup: not the exporter until the next renewal proves it
                log.warning("metrics.lease_failed", error=str(exc))
                leader = False
            if leader != self.leader:
                log.info("metrics.exporter", exporting=leader)
            self.leader = leader
            self.exporter.set(1.0 if leader else 0.0)
            await wait_any(self.lease / 3, stopping)

    async def store_read(self) -> dict[str, list[dict[str, Any]]]:
        """The store's metrics read. A read that took SLOW_READ or longer (a large database) is served
        to the next scrapes and page loads while a fresh one runs in the background, once it is older
        than STALE_READS times its own cost: a scrape never waits for (nor piles up) whole-table reads."""
        if self._read is None or self._read_cost < SLOW_READ:
            return await self._refresh()
        stale = time.monotonic() - self._read_at > STALE_READS * self._read_cost
        if stale and (self._refreshing is None or self._refreshing.done()):
            self._refreshing = asyncio.create_task(self._refresh_quietly(), name="metrics-read")
        return self._read

    async def _refresh(self) -> dict[str, list[dict[str, Any]]]:
        started = time.monotonic()
        read = await self.store.metrics()
        self._read, self._read_at, self._read_cost = read, time.monotonic(), time.monotonic() - started
        return read

    async def _refresh_quietly(self) -> None:
        try:
            await self._refresh()
        except Exception as exc:  # the last read stays served; the next scrape tries again
            log.warning("metrics.read_failed", error=str(exc))

    async def render(self) -> bytes:
        """The exposition text: this process's families, and the store's if this daemon is the exporter."""
        self._snapshot.families = families(await self.store_read(), time.time()) if self.leader else []
        return generate_latest(self.registry)
