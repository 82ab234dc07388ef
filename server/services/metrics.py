"""``GET /metrics``: the server's own health and the fleet's, in Prometheus' text format.

Two kinds of numbers, kept apart so that one scrape answers for the whole server:

- Per-process counters and histograms (requests by route and status, reports accepted, ingest
  queue depth, batch sizes, commit latency). The hot path only bumps plain integers (a dict
  entry per request, a list append per batch); :meth:`ProcessMetrics.flush` copies them into
  prometheus-client metrics once a second and before every scrape. With ``--workers N`` the
  supervisor gives every worker one private directory and prometheus-client's multiprocess
  mode adds up the workers' files, so any worker answers for all of them.
- Shared state read at scrape time from the database and the catalog (today's active instances
  per product and version, top 20 and ``other``; catalog age; the last retention and
  aggregation runs): the same whichever worker answers.
"""

from __future__ import annotations

import time
from collections import Counter as Tally
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.metrics_core import GaugeMetricFamily, Metric
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.registry import Collector

from opa_telemetry_server.services.ingest import Ingest
from opa_telemetry_server.storage import SyncState

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
FLUSH_INTERVAL = 1.0  # seconds between copies of the hot path's tallies into the metrics
TOP_VERSIONS = 20  # fleet gauge: versions per product shown by name; the rest is "other"
TOP_PRODUCTS = 20  # and products shown by name; the rest is product "other"
BATCH_BUCKETS = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000)
COMMIT_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)

RequestTally = Tally[tuple[str, int]]  # (route, status) -> requests


class ProcessMetrics:
    """This process's metrics, fed from the tallies the request path and the writer keep.

    ``multiprocess_dir``: the directory shared by the workers of one server (prometheus-client
    must already be in multiprocess mode, which the supervisor arranges), or ``None``.
    """

    def __init__(self, multiprocess_dir: str | None = None) -> None:
        self.multiprocess_dir = multiprocess_dir
        self.registry = CollectorRegistry(auto_describe=True)
        registry = self.registry
        self.requests = Counter(
            "opa_telemetry_requests", "HTTP requests answered, by route template and status",
            ["route", "status"], registry=registry,
        )  # fmt: skip
        self.reports = Counter(
            "opa_telemetry_reports_accepted", "reports committed to the database",
            registry=registry,
        )  # fmt: skip
        self.checks = Counter(
            "opa_telemetry_version_checks_accepted",
            "GitHub-style release checks counted", registry=registry,
        )  # fmt: skip
        self.queue = Gauge(
            "opa_telemetry_ingest_queue_depth", "reports and checks waiting for a commit",
            registry=registry, multiprocess_mode="livesum",
        )  # fmt: skip
        self.batch_size = Histogram(
            "opa_telemetry_ingest_batch_size", "items committed per transaction",
            registry=registry, buckets=BATCH_BUCKETS,
        )  # fmt: skip
        self.commit_seconds = Histogram(
            "opa_telemetry_ingest_commit_seconds", "time to commit one batch",
            registry=registry, buckets=COMMIT_BUCKETS,
        )  # fmt: skip
        self._requests_seen: RequestTally = Tally()
        self._reports_seen = 0
        self._checks_seen = 0

    def flush(self, tally: RequestTally, ingest: Ingest | None) -> None:
        """Copy what the tallies gained since the last flush into the metrics."""
        for key, count in list(tally.items()):
            delta = count - self._requests_seen[key]
            if delta:
                route, status = key
                self.requests.labels(route, str(status)).inc(delta)
                self._requests_seen[key] = count
        if ingest is None:
            return
        if ingest.reports_committed != self._reports_seen:
            self.reports.inc(ingest.reports_committed - self._reports_seen)
            self._reports_seen = ingest.reports_committed
        if ingest.checks_committed != self._checks_seen:
            self.checks.inc(ingest.checks_committed - self._checks_seen)
            self._checks_seen = ingest.checks_committed
        self.queue.set(ingest.pending + ingest.writing)
        batches = ingest.batch_log
        while batches:
            size, seconds = batches.popleft()
            self.batch_size.observe(size)
            self.commit_seconds.observe(seconds)

    def render(self, fleet: FleetState) -> bytes:
        """The exposition text: this process (or every worker) plus the shared state."""
        if self.multiprocess_dir:
            registry = CollectorRegistry()
            MultiProcessCollector(registry, path=self.multiprocess_dir)  # type: ignore[no-untyped-call]
            own = generate_latest(registry)
        else:
            own = generate_latest(self.registry)
        shared = CollectorRegistry()
        shared.register(_FleetCollector(fleet))
        return own + generate_latest(shared)


@dataclass(frozen=True, slots=True)
class FleetState:
    """What every worker reads alike at scrape time."""

    version_counts: Sequence[tuple[str, str, int]]  # today's (product, version, instances)
    catalog_checked_at: float | None  # when the catalog was last confirmed current
    catalog_releases: Sequence[tuple[str, int]]  # (product, releases)
    retention_run_at: int | None
    aggregated_at: int | None
    min_group_size: int = 0  # public metrics: versions with fewer instances show as other
    syncs: Sequence[SyncState] = ()  # the last GitHub sync of each product, if any


def top_versions(
    counts: Iterable[tuple[str, str, int]], limit: int = TOP_VERSIONS, min_group_size: int = 0
) -> list[tuple[str, str, int]]:
    """Per product, the ``limit`` versions with most instances and one ``other`` for the rest
    (so the number of series stays bounded whatever the fleet reports); with
    ``min_group_size`` (public metrics), smaller versions go to ``other`` too."""
    by_product: dict[str, list[tuple[str, int]]] = {}
    for product, version, instances in counts:
        by_product.setdefault(product, []).append((version, instances))
    # Products too: any client names one by its User-Agent. The busiest TOP_PRODUCTS (with at
    # least min_group_size instances) keep their name; the rest add up under "other".
    totals = {product: sum(n for _, n in pairs) for product, pairs in by_product.items()}
    ranked_products = sorted(totals, key=lambda product: (-totals[product], product))
    named = {p for p in ranked_products[:TOP_PRODUCTS] if totals[p] >= max(min_group_size, 1)}
    folded = sum(totals[p] for p in totals if p not in named)
    result = []
    for product in sorted(named):
        ranked = sorted(by_product[product], key=lambda pair: (-pair[1], pair[0]))
        shown = [pair for pair in ranked[:limit] if pair[1] >= min_group_size]
        result += [(product, version, n) for version, n in shown]
        if len(shown) < len(ranked):
            rest = sum(n for _, n in ranked) - sum(n for _, n in shown)
            result.append((product, "other", rest))
    if folded:
        result.append(("other", "other", folded))
    return result


class _FleetCollector(Collector):
    def __init__(self, fleet: FleetState) -> None:
        self._fleet = fleet

    def collect(self) -> Iterator[Metric]:
        fleet = self._fleet
        now = time.time()
        instances = GaugeMetricFamily(
            "opa_telemetry_fleet_instances",
            "distinct instance ids reporting today (UTC) per product and version"
            f" (top {TOP_VERSIONS} versions, the rest as other), as of the last aggregation",
            labels=["product", "version"],
        )
        for product, version, n in top_versions(
            fleet.version_counts, min_group_size=fleet.min_group_size
        ):
            instances.add_metric([product, version], n)
        yield instances
        releases = GaugeMetricFamily(
            "opa_telemetry_catalog_releases", "releases in the catalog per product",
            labels=["product"],
        )  # fmt: skip
        for product, n in fleet.catalog_releases:
            releases.add_metric([product], n)
        yield releases
        for name, text, at in (
            ("opa_telemetry_catalog_age_seconds",
             "seconds since the release catalog was last loaded or confirmed current",
             fleet.catalog_checked_at),
            ("opa_telemetry_retention_last_run_timestamp_seconds",
             "Unix time of the last completed retention run (0: never)", fleet.retention_run_at),
            ("opa_telemetry_stats_aggregated_timestamp_seconds",
             "Unix time of the last statistics aggregation (0: never)", fleet.aggregated_at),
        ):  # fmt: skip
            if name == "opa_telemetry_catalog_age_seconds":
                value = now - at if at is not None else float("nan")
            else:
                value = float(at or 0)
            yield GaugeMetricFamily(name, text, value=value)
        for name, text, field in (
            ("opa_telemetry_sync_last_success_timestamp_seconds",
             "Unix time of the product's last successful release sync (0: never)",
             "last_success_at"),
            ("opa_telemetry_sync_last_error_timestamp_seconds",
             "Unix time of the product's last failed release sync (0: never)", "last_error_at"),
        ):  # fmt: skip
            family = GaugeMetricFamily(name, text, labels=["product"])
            for state in fleet.syncs:
                family.add_metric([state.product], float(getattr(state, field) or 0))
            yield family
