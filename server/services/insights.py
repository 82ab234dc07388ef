"""Fleet statistics: the document ``GET /v1/stats`` and ``stats --json`` both answer, built
from the aggregates storage keeps (never from raw rows), and the task that keeps them.

Semantics (also in the README): "instances" are distinct instance ids per UTC day. OPA makes a
new id at every start, so they count process runs, not machines, and ids are never added up
across days: a window reports daily values (the latest day, the average over the days that
have data, the peak). A version's or platform's ``instances`` is likewise its average daily
count over those days, so the groups of a list add up to ``instances.average_daily``.
Heap percentiles are taken over instance-days (each instance's latest heap of each day) from
a log histogram with buckets about 9% wide.
"""

from __future__ import annotations

import asyncio
import logging
import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from typing import Any

from opa_telemetry_server.domain.protocol import DEFAULT_PRODUCT, product_slug
from opa_telemetry_server.domain.releases import Release
from opa_telemetry_server.domain.versions import Version, VersionError, parse_version
from opa_telemetry_server.errors import QueryError, TelemetryError
from opa_telemetry_server.services.catalog import Catalog
from opa_telemetry_server.storage import AggregateResult, ProductCounts, Storage, Window

logger = logging.getLogger(__name__)

MAX_DAYS = 400
DEFAULT_DAYS = 30
TOP_DAILY_VERSIONS = 8  # versions shown by name in ``daily[].by_version``; the rest is "other"
OTHER = "other"
UNKNOWN = "unknown"  # a platform the User-Agent did not name
HEAP_BUCKETS_PER_DOUBLING = 8  # must match each backend's DAY_GROUPS_SQL bucket expression


@dataclass(frozen=True, slots=True)
class StatsQuery:
    product: str
    days: int


def parse_stats_query(query: Mapping[str, str]) -> StatsQuery:
    """``product`` (default ``opa``) and ``days`` (1..400, default 30) from a query string;
    raises :class:`QueryError` naming every bad parameter."""
    problems = []
    unknown = sorted(set(query) - {"product", "days"})
    if unknown:
        problems.append(f"unknown parameters: {', '.join(unknown)}")
    raw_product = query.get("product", DEFAULT_PRODUCT)
    product = product_slug(raw_product)
    if not product:
        problems.append(f"product: {raw_product[:64]!r} is not a product name")
    raw_days = query.get("days", str(DEFAULT_DAYS))
    days = 0
    if raw_days.isascii() and raw_days.isdigit() and len(raw_days) <= 4:
        days = int(raw_days)
    if not 1 <= days <= MAX_DAYS:
        expected = f"a whole number from 1 to {MAX_DAYS}"
        problems.append(f"days: expected {expected}, not {raw_days[:16]!r}")
    if problems:
        raise QueryError("invalid query parameters", problems)
    return StatsQuery(product, days)


def utc_today() -> date:
    return datetime.now(UTC).date()


async def stats_document(
    storage: Storage,
    catalog: Catalog,
    query: StatsQuery,
    *,
    today: date | None = None,
    min_group_size: int = 0,
) -> dict[str, Any]:
    """The statistics document of ``query.product`` for the ``query.days`` UTC days ending
    today. ``min_group_size`` > 0 folds every version, platform and min_compatible_version
    with fewer average daily instances into ``other`` (public statistics)."""
    until = today or utc_today()
    since = until - timedelta(days=query.days - 1)
    window = await storage.window(query.product, since.isoformat(), until.isoformat())
    return build_document(query.product, since, until, window, catalog, min_group_size)


def build_document(
    product: str,
    since: date,
    until: date,
    window: Window,
    catalog: Catalog,
    min_group_size: int = 0,
) -> dict[str, Any]:
    """Pure: the statistics document from one window of aggregates (see the module doc)."""
    by_day = {day: (i, r, c) for day, i, r, c in window.days}
    active_days = sum(1 for i, _, _ in by_day.values() if i > 0)

    def average(instance_days: float) -> float:
        return round(instance_days / active_days, 1) if active_days else 0.0

    def shown(instance_days: float) -> bool:
        return not min_group_size or instance_days / max(active_days, 1) >= min_group_size

    day_versions: dict[str, dict[str, int]] = {}
    version_totals: dict[str, list[int]] = {}
    for day, version, instances, reports in window.versions:
        day_versions.setdefault(day, {})[version] = instances
        totals = version_totals.setdefault(version, [0, 0])
        totals[0] += instances
        totals[1] += reports

    by_version = _fold(
        [{"version": v, "instances": t[0], "reports": t[1]} for v, t in version_totals.items()],
        "version",
        shown,
        ("instances", "reports"),
    )
    order = {v: i for i, v in enumerate(_newest_first(e["version"] for e in by_version))}
    by_version.sort(key=lambda entry: order[entry["version"]])
    top = _newest_first(
        sorted(
            (v for v, t in version_totals.items() if shown(t[0])),
            key=lambda v: -version_totals[v][0],
        )[:TOP_DAILY_VERSIONS]
    )
    latest_by_day = _latest_release_by_day(catalog.releases(product), since, until)

    daily: list[dict[str, Any]] = []
    current = since
    while current <= until:
        key = current.isoformat()
        instances, reports, checks = by_day.get(key, (0, 0, 0))
        versions = day_versions.get(key, {})
        named = {v: versions.get(v, 0) for v in top}
        if min_group_size:
            named = {v: n if n >= min_group_size else 0 for v, n in named.items()}
        named[OTHER] = instances - sum(named.values())
        latest = latest_by_day.get(key)
        out_of_date = (
            sum(n for v, n in versions.items() if _older(v, latest.version)) if latest else 0
        )
        daily.append(
            {
                "day": key,
                "instances": instances,
                "reports": reports,
                "version_checks": checks,
                "out_of_date": out_of_date,
                "out_of_date_share": round(out_of_date / instances, 4) if instances else 0.0,
                "latest_release": latest.tag if latest else None,
                "by_version": named,
            }
        )
        current += timedelta(days=1)

    platforms = _fold(
        [
            {"os": os_name or UNKNOWN, "arch": arch or UNKNOWN, "instances": n}
            for os_name, arch, n in window.platforms
        ],
        ("os", "arch"),
        shown,
        ("instances",),
    )
    platforms.sort(key=lambda p: (p["os"] == OTHER, -p["instances"], p["os"], p["arch"]))
    min_compatible = _fold(
        [{"min_compatible_version": m, "instances": n} for m, n in window.min_compatible],
        "min_compatible_version",
        shown,
        ("instances",),
    )
    min_compatible.sort(key=lambda m: (m["min_compatible_version"] == OTHER, -m["instances"]))

    for entry in (*by_version, *platforms, *min_compatible):
        entry["instances"] = average(entry["instances"])
    daily_instances = [d["instances"] for d in daily]
    latest_release = catalog.latest(product)
    return {
        "product": product,
        "since": since.isoformat(),
        "until": until.isoformat(),
        "days": (until - since).days + 1,
        "aggregated_at": _iso(window.aggregated_at),
        "latest_release": latest_release.tag if latest_release else None,
        "public": bool(min_group_size),
        "instances": {
            "latest_day": daily_instances[-1],
            "average_daily": average(sum(daily_instances)),
            "peak_daily": max(daily_instances),
            "active_days": active_days,
        },
        "reports": sum(d["reports"] for d in daily),
        "version_checks": sum(d["version_checks"] for d in daily),
        "by_version": by_version,
        "daily_versions": [*top, OTHER],
        "by_platform": platforms,
        "daily": daily,
        "heap_by_version": _heaps(window.heaps, shown, average),
        "min_compatible_versions": min_compatible,
        "advisories": _advisories(catalog, product, version_totals, average, shown),
    }


def _advisories(
    catalog: Catalog,
    product: str,
    version_totals: Mapping[str, list[int]],
    average: Callable[[float], float],
    shown: Callable[[float], bool],
) -> list[dict[str, Any]]:
    """The product's advisories that affect reported versions, with the average daily
    instances on those versions (by version; a record limited to some operating systems counts
    every platform), most first. Public: an advisory under the group size is left out, and a
    version under it is named ``other``."""
    result: list[dict[str, Any]] = []
    for advisory in catalog.advisories(product):
        affected = [
            v
            for v in version_totals
            if (parsed := _version(v)) is not None and advisory.affects(parsed, None)[0]
        ]
        instance_days = sum(version_totals[v][0] for v in affected)
        if not instance_days or not shown(instance_days):
            continue
        named = {v if shown(version_totals[v][0]) else OTHER for v in affected}
        result.append(
            {
                "id": advisory.id,
                "severity": advisory.severity,
                "summary": advisory.summary,
                "instances": average(instance_days),
                "versions": _newest_first(named),
            }
        )
    result.sort(key=lambda entry: -entry["instances"])
    return result


def products_document(
    products: Iterable[ProductCounts], *, min_group_size: int = 0
) -> dict[str, Any]:
    """The product list. ``min_group_size`` > 0 (public statistics): a product is listed only
    if the catalog has releases of it or it has at least that many instances today, and its
    counts only in the second case, so that no caller learns of one small deployment (any
    client names a product by its User-Agent)."""
    listed = []
    for p in products:
        big = p.instances_today >= min_group_size
        if not (big or p.releases):
            continue
        listed.append(
            {
                "product": p.product,
                "releases": p.releases,
                "reports": p.reports if big else None,
                "instances_today": p.instances_today if big else None,
            }
        )
    return {"products": listed}


def publicly_listed(products: Iterable[ProductCounts], product: str, min_group_size: int) -> bool:
    """Whether public statistics may show ``product`` (see :func:`products_document`)."""
    return any(
        p.product == product and (p.releases or p.instances_today >= min_group_size)
        for p in products
    )


def heap_bucket_value(bucket: int) -> int:
    """The bytes a heap bucket stands for: the geometric middle of its range."""
    return round(2 ** ((bucket + 0.5) / HEAP_BUCKETS_PER_DOUBLING))


def _heaps(
    rows: Iterable[tuple[str, int, int]],
    shown: Callable[[float], bool],
    average: Callable[[float], float],
) -> list[dict[str, Any]]:
    histograms: dict[str, dict[int, int]] = {}
    for version, bucket, count in rows:
        histograms.setdefault(version, {})[bucket] = count
    folded: dict[str, dict[int, int]] = {}
    for version, histogram in histograms.items():
        name = version if shown(sum(histogram.values())) else OTHER
        target = folded.setdefault(name, {})
        for bucket, count in histogram.items():
            target[bucket] = target.get(bucket, 0) + count
    result = []
    for version in _newest_first(folded):
        histogram = folded[version]
        total = sum(histogram.values())
        entry: dict[str, Any] = {"version": version, "instances": average(total)}
        for percent in (50, 90, 99):
            entry[f"p{percent}"] = _histogram_percentile(histogram, total, percent)
        result.append(entry)
    return result


def _histogram_percentile(histogram: Mapping[int, int], total: int, percent: int) -> int:
    """Nearest-rank percentile over a bucketed histogram."""
    rank = max(1, math.ceil(percent / 100 * total))
    seen = 0
    for bucket in sorted(histogram):
        seen += histogram[bucket]
        if seen >= rank:
            return heap_bucket_value(bucket)
    return heap_bucket_value(max(histogram))


def _fold(
    entries: list[dict[str, Any]],
    key: str | tuple[str, ...],
    shown: Callable[[float], bool],
    summed: Sequence[str],
) -> list[dict[str, Any]]:
    """Entries whose instance-days are too few to show merge into one ``other`` entry."""
    keys = (key,) if isinstance(key, str) else key
    kept = [e for e in entries if shown(e["instances"])]
    hidden = [e for e in entries if not shown(e["instances"])]
    if hidden:
        other: dict[str, Any] = dict.fromkeys(keys, OTHER)
        for name in summed:
            other[name] = sum(e[name] for e in hidden)
        kept.append(other)
    return kept


def _version(text: str) -> Version | None:
    try:
        return parse_version(text)
    except VersionError:
        return None


def _newest_first(texts: Iterable[str]) -> list[str]:
    """Versions by descending precedence, then whatever is not a version (``other`` last)."""
    parsed = [(text, _version(text)) for text in texts]
    versions = [(t, v) for t, v in parsed if v is not None]
    versions.sort(key=lambda pair: pair[1].precedence, reverse=True)
    rest = sorted((t for t, v in parsed if v is None), key=lambda t: (t == OTHER, t))
    return [t for t, _ in versions] + rest


def _older(version: str, latest: Version) -> bool:
    parsed = _version(version)
    return parsed is not None and parsed.precedence < latest.precedence


def _latest_release_by_day(
    releases: Sequence[Release], since: date, until: date
) -> dict[str, Release]:
    """For each day of the window, the highest non-pre-release published on or before it
    (a release without a date counts from the start)."""
    dated = sorted(
        (r for r in releases if not r.prerelease),
        key=lambda r: r.published or date.min,
    )
    result: dict[str, Release] = {}
    best: Release | None = None
    index = 0
    day = since
    while day <= until:
        while index < len(dated) and (dated[index].published or date.min) <= day:
            candidate = dated[index]
            if best is None or candidate.version.precedence > best.version.precedence:
                best = candidate
            index += 1
        if best is not None:
            result[day.isoformat()] = best
        day += timedelta(days=1)
    return result


def _iso(seconds: int | None) -> str | None:
    if seconds is None:
        return None
    return datetime.fromtimestamp(seconds, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


class Aggregator:
    """Keeps the statistics aggregates up to date: one run now, then one every ``interval``
    seconds, on a connection of its own (every worker shard included, with SQLite)."""

    def __init__(self, storage: Storage, interval: float) -> None:
        self._storage = storage
        self._interval = interval
        self._lock = asyncio.Lock()  # one run at a time on the one connection
        self.runs = 0

    async def run_once(self) -> AggregateResult:
        """Bring the aggregates up to date now (waits for a run in progress)."""
        async with self._lock:
            result = await self._storage.aggregate()
            self.runs += 1
        return result

    async def run(self) -> None:
        """Aggregate forever; a failed run is logged and retried at the next interval."""
        while True:
            try:
                result = await self.run_once()
                logger.debug("statistics: %d product-days aggregated", result.days)
            except TelemetryError as exc:  # the database away (a failover...): one line
                logger.warning("statistics aggregation failed; will retry: %s", exc)
            except Exception:
                logger.warning("statistics aggregation failed; will retry", exc_info=True)
            await asyncio.sleep(self._interval)
