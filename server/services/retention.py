"""Retention and aggregation jobs: what the server runs in the background (worker 0) and the
``purge`` and ``stats --refresh`` commands run once, each on a connection of its own."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from datetime import UTC, date, datetime, timedelta

from opa_telemetry_server.errors import TelemetryError
from opa_telemetry_server.settings import Settings
from opa_telemetry_server.storage import RETENTION_RUN_KEY, PurgeResult, open_storage

logger = logging.getLogger(__name__)


def retention_cutoff(settings: Settings, today: date | None = None) -> str | None:
    """The oldest UTC day whose raw rows retention keeps, or ``None`` when
    ``retention_days`` is 0 (keep forever: nothing is ever purged)."""
    if settings.retention_days == 0:
        return None
    day = today or datetime.now(UTC).date()
    return (day - timedelta(days=settings.retention_days)).isoformat()


async def purge_expired(
    settings: Settings,
    today: date | None = None,
    *,
    announce: Callable[[PurgeResult, str], None] | None = None,
    dry_run: bool = False,
) -> PurgeResult:
    """Roll up and delete raw rows older than ``settings.retention_days`` (every shard too),
    on a connection of its own; nothing at all when retention is 0 (keep forever).

    ``announce`` is told what is about to go (days and raw rows, and the cutoff day) before
    anything is deleted; with ``dry_run`` that is all that happens.
    """
    before = retention_cutoff(settings, today)
    if before is None:
        return PurgeResult()
    storage = await open_storage(settings, migrate=False)
    try:
        if announce is not None or dry_run:
            expired = await storage.count_expired(before)
            if announce is not None:
                announce(expired, before)
            if dry_run or not expired.days:
                return PurgeResult()
        result = await storage.roll_up_and_purge(before)
        await storage.set_meta(RETENTION_RUN_KEY, int(datetime.now(UTC).timestamp()))
        return result
    finally:
        await storage.close()


async def aggregate_now(settings: Settings, *, migrate: bool = True) -> None:
    """Bring the statistics aggregates up to date (main database and shards), on a
    connection of its own."""
    storage = await open_storage(settings, migrate=migrate)
    try:
        await storage.aggregate()
    finally:
        await storage.close()


async def run_retention(settings: Settings) -> None:
    """Apply retention now and then every ``purge_interval``; a failed run is retried."""
    while True:
        try:
            result = await purge_expired(settings)
            if result.days:
                logger.info("retention: %d days rolled up, %d raw rows deleted",
                            result.days, result.rows_deleted)  # fmt: skip
        except TelemetryError as exc:  # the database away (a failover...): one line
            logger.warning("retention run failed; will retry: %s", exc)
        except Exception:
            logger.warning("retention run failed; will retry", exc_info=True)
        await asyncio.sleep(settings.purge_interval)
