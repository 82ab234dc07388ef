"""The values both storage backends hand out, and what turns their stored rows into them.

Pure: no connection and no SQL dialect here beyond the few statements whose text is the same
in SQLite and PostgreSQL.
"""

from __future__ import annotations

import json
import logging
import time
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from opa_telemetry_server.domain.advisories import Advisory, advisory_from_osv
from opa_telemetry_server.domain.policy import Policy
from opa_telemetry_server.domain.releases import Release, release_from_mapping
from opa_telemetry_server.domain.versions import VersionError, parse_version
from opa_telemetry_server.errors import CatalogError

logger = logging.getLogger(__name__)

SELECT_RELEASES_SQL = """
SELECT id, product, tag, release_notes, assets, published_on, prerelease FROM releases
"""
SELECT_PRODUCT_POLICIES_SQL = """
SELECT product, pinned_tag, min_version, support_notice FROM product_policies
"""
SELECT_RELEASE_POLICIES_SQL = """
SELECT product, tag, yanked, yank_reason, rollout_percent FROM release_policies
"""

WATERMARK_KEY = "stats_watermark"
AGGREGATED_AT_KEY = "stats_aggregated_at"
RETENTION_RUN_KEY = "retention_run_at"


@dataclass(frozen=True, slots=True)
class CatalogParts:
    """Everything the in-memory catalog is built from (see ``catalog.load_catalog``)."""

    releases: list[tuple[str, Release]]
    policies: dict[str, Policy]
    advisories: list[tuple[str, Advisory]]


@dataclass(frozen=True, slots=True)
class SyncState:
    """What the last sync of one product saw (Unix seconds; ``None`` for never)."""

    product: str
    source: str
    etag: str | None = None
    last_attempt_at: int | None = None
    last_success_at: int | None = None
    last_error: str | None = None
    last_error_at: int | None = None
    retry_after_at: int | None = None


@dataclass
class PurgeResult:
    days: int = 0
    rows_deleted: int = 0


def utc_day(at: float) -> str:
    """The UTC calendar day of a Unix time, as ``YYYY-MM-DD``."""
    return time.strftime("%Y-%m-%d", time.gmtime(at))


@dataclass(frozen=True, slots=True)
class Window:
    """One product's aggregates for the UTC days ``since``..``until`` (inclusive), as stored:
    what ``insights`` turns into the statistics document. Counts of instances summed over
    days are instance-days."""

    days: list[tuple[str, int, int, int]]  # (day, instances, reports, version_checks)
    versions: list[tuple[str, str, int, int]]  # (day, version, instances, reports)
    platforms: list[tuple[str, str, int]]  # (os, arch, instance-days); "" = not sent
    min_compatible: list[tuple[str, int]]  # (min_compatible_version, instance-days)
    heaps: list[tuple[str, int, int]]  # (version, bucket, instance-days)
    aggregated_at: int | None  # Unix seconds of the last aggregation; None if never


@dataclass(frozen=True, slots=True)
class ProductCounts:
    """A product known to the catalog or seen in reports."""

    product: str
    releases: int
    reports: int
    instances_today: int


@dataclass
class AggregateResult:
    days: int = 0  # product-days whose aggregates were rewritten
    instances: int = 0  # distinct instances counted over those days


def catalog_parts(
    releases: Iterable[Sequence[Any]],
    product_policies: Iterable[Sequence[Any]],
    release_policies: Iterable[Sequence[Any]],
    advisories: Iterable[Sequence[Any]],
) -> CatalogParts:
    """The catalog from its stored rows, whichever backend read them (the columns of
    ``SELECT_RELEASES_SQL``, ``SELECT_PRODUCT_POLICIES_SQL``, ``SELECT_RELEASE_POLICIES_SQL``
    and ``product, id, record`` of the advisories).

    A stored row that no longer passes validation (written by an older version or by hand) is
    skipped with a warning rather than taking the whole catalog down.
    """
    parsed_releases = []
    for row in releases:
        try:
            parsed_releases.append((row[1], release_from_row(row)))
        except CatalogError as exc:
            logger.warning("catalog: skipping stored release %s %s: %s", row[1], row[2], exc)
    products: dict[str, dict[str, Any]] = {}
    for product, pinned, minimum, notice in product_policies:
        entry = products.setdefault(product, {"yanked": {}, "rollouts": {}})
        entry["pinned"] = pinned
        entry["notice"] = notice
        try:
            entry["min_version"] = parse_version(minimum) if minimum else None
        except VersionError:
            logger.warning("catalog: %s: stored min_version %r ignored", product, minimum)
    for product, tag, yanked, reason, percent in release_policies:
        entry = products.setdefault(product, {"yanked": {}, "rollouts": {}})
        if yanked:
            entry["yanked"][tag] = reason
        if percent is not None:
            entry["rollouts"][tag] = int(percent)
    parsed_advisories = []
    for product, ident, record in advisories:
        try:
            parsed_advisories.append((product, advisory_from_osv(json.loads(record))))
        except (CatalogError, ValueError) as exc:
            logger.warning("catalog: skipping stored advisory %s %s: %s", product, ident, exc)
    policies = {product: Policy(**entry) for product, entry in products.items()}
    return CatalogParts(parsed_releases, policies, parsed_advisories)


def release_from_row(row: Sequence[Any]) -> Release:
    """A release from the columns of ``SELECT_RELEASES_SQL``."""
    release_id, product, tag, notes, assets, published, prerelease = row
    release = release_from_mapping(
        {
            "tag": tag,
            "release_notes": notes,
            "assets": json.loads(assets),
            "published": published,
            "prerelease": bool(prerelease),
        },
        product,
    )
    return replace(release, id=int(release_id))


@dataclass(frozen=True, slots=True)
class BackupFile:
    source: Path
    copy: Path
    size: int  # bytes


# The statistics tables one product-day's aggregates are written to, in this order.
STATS_DAY_TABLES = (
    "stats_days",
    "stats_versions",
    "stats_platforms",
    "stats_min_compatible",
    "stats_heaps",
)


def day_detail(
    product: Any, day: Any, groups: Iterable[Sequence[Any]], checks: int
) -> tuple[dict[str, list[tuple[Any, ...]]], int]:
    """Split one product-day's grouped raw rows (``version, os, arch, min_compatible_version,
    heap bucket, instances, reports``, as both backends' day-groups queries return them) into
    the rows of each table of :data:`STATS_DAY_TABLES`; also returns the day's instances
    (0: nothing to write but the release checks)."""
    versions: Counter[str] = Counter()
    reports_by_version: Counter[str] = Counter()
    platforms: Counter[tuple[str, str]] = Counter()
    min_compatible: Counter[str] = Counter()
    heaps: Counter[tuple[str, int]] = Counter()
    for version, os_name, arch, minimum, bucket, count, reports in groups:
        versions[version] += count
        reports_by_version[version] += reports
        platforms[(os_name, arch)] += count
        min_compatible[minimum] += count
        if bucket is not None:
            heaps[(version, bucket)] += count
    instances = sum(versions.values())
    detail: dict[str, list[tuple[Any, ...]]] = {
        "stats_days": [(product, day, instances, sum(reports_by_version.values()), checks)],
        "stats_versions": [
            (product, day, v, n, reports_by_version[v]) for v, n in versions.items()
        ],
        "stats_platforms": [(product, day, o, a, n) for (o, a), n in platforms.items()],
        "stats_min_compatible": [(product, day, m, n) for m, n in min_compatible.items()],
        "stats_heaps": [(product, day, v, b, n) for (v, b), n in heaps.items()],
    }
    return detail, instances
