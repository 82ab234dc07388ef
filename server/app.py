"""The application factory. ``create_app`` does no I/O: resources open in ``cleanup_ctx``."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Callable
from datetime import UTC, date, datetime, timedelta
from functools import partial
from pathlib import Path
from typing import Any

from aiohttp import web

from .appkeys import CODEC, INTAKE, REPOS, SETTINGS, STORAGE, Intake
from .catalog import CatalogCache
from .codec import json_codec
from .http_errors import install_address_redaction
from .ingest import Ingest
from .protocol import DEFAULT_PRODUCT
from .ratelimit import RateLimiter
from .releases import bundled_releases
from .routes import setup_routes
from .settings import Settings
from .storage import PurgeResult, Storage, existing_shards, shard_path

logger = logging.getLogger(__name__)


# Limits on what a client controls before a handler runs. OPA's request line and headers are a
# few hundred bytes; nothing legitimate comes near these.
MAX_LINE_SIZE = 2048
MAX_FIELD_SIZE = 2048
MAX_HEADERS = 32


def runner_options(settings: Settings) -> dict[str, Any]:
    """Keyword arguments for aiohttp's runner/server that enforce the protocol-level limits.

    ``keepalive_timeout`` is armed when a connection opens and after every answer, and closes
    a connection still waiting for a complete request when it fires: so a client trickling its
    headers is cut off after ``read_timeout``. (Bodies are bounded in ``handlers``.) Request
    bodies are never decompressed: OPA does not compress them, and inflating one would happen
    before the size cap.
    """
    return {
        "keepalive_timeout": settings.read_timeout,
        "max_line_size": MAX_LINE_SIZE,
        "max_field_size": MAX_FIELD_SIZE,
        "max_headers": MAX_HEADERS,
        "auto_decompress": False,
    }


def create_app(settings: Settings, *, worker: int = 0) -> web.Application:
    """Build the application for ``settings``; the databases open when the app starts.

    ``worker`` numbers the process among ``settings.workers``: worker 0 commits reports to the
    main database, worker N to its own shard beside it (see ``storage.shard_path``).
    """
    install_address_redaction()
    app = web.Application(client_max_size=settings.max_body_bytes)
    app[SETTINGS] = settings
    app[CODEC] = json_codec(settings.fast)
    app[REPOS] = settings.repo_products()
    setup_routes(app, settings.prefix)
    app.cleanup_ctx.append(partial(_databases, worker=worker))
    return app


async def open_storage(settings: Settings, path: str | Path, *, migrate: bool = True) -> Storage:
    """Open ``path`` with the settings' SQLite options; only ``serve`` migrates."""
    return await Storage.open(
        path,
        migrate=migrate,
        synchronous=settings.synchronous,
        busy_timeout_ms=int(settings.busy_timeout * 1000),
        wal_checkpoint_pages=settings.wal_checkpoint_pages,
    )


async def prepare_database(settings: Settings) -> None:
    """Create or migrate the main database and seed the catalog once (idempotent)."""
    storage = await open_storage(settings, settings.db)
    try:
        if settings.seed_catalog:
            added = await storage.seed_catalog(DEFAULT_PRODUCT, bundled_releases())
            if added:
                logger.info("release catalog seeded with %d bundled OPA releases", added)
    finally:
        await storage.close()


async def _databases(app: web.Application, worker: int) -> AsyncIterator[None]:
    """Open storage, load the catalog and start the writer; on cleanup drain and close."""
    settings = app[SETTINGS]
    if worker == 0:
        await prepare_database(settings)
    async with contextlib.AsyncExitStack() as stack:
        main = await open_storage(settings, settings.db)
        stack.push_async_callback(main.close)
        shard = main
        if worker:
            shard = await open_storage(settings, shard_path(settings.db, worker))
            stack.push_async_callback(shard.close)
        cache = CatalogCache(main, settings.catalog_refresh, app[CODEC].dumps)
        await cache.refresh()
        ingest = Ingest(
            shard,
            queue_size=settings.queue_size,
            batch_size=settings.batch_size,
            retry_after=settings.retry_after,
        )
        app[STORAGE] = main
        app[INTAKE] = Intake(
            ingest=ingest,
            catalog=cache,
            limiter=(RateLimiter(settings.rate_limit, settings.rate_burst)
                     if settings.rate_limit else None),
            trusted_proxy_header=settings.trusted_proxy_header,
            loads=app[CODEC].loads,
            extra_keys=settings.extra_key_set(),
            extra_max_bytes=settings.extra_max_bytes,
            max_body_bytes=settings.max_body_bytes,
            read_timeout=settings.read_timeout,
        )  # fmt: skip
        writer = asyncio.create_task(ingest.run(), name="opa-telemetry-writer")
        refresher = asyncio.create_task(cache.run(), name="opa-telemetry-catalog-refresh")
        stack.push_async_callback(_cancel, refresher)
        if worker == 0 and settings.retention_days:
            retention = asyncio.create_task(_retention(settings), name="opa-telemetry-retention")
            stack.push_async_callback(_cancel, retention)
        stack.push_async_callback(_drain, ingest, writer, settings.shutdown_timeout)
        yield


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
    """Roll up and delete raw rows older than ``settings.retention_days`` (main and shards),
    on a connection of its own; nothing at all when retention is 0 (keep forever).

    ``announce`` is told what is about to go (days and raw rows, and the cutoff day) before
    anything is deleted; with ``dry_run`` that is all that happens.
    """
    before = retention_cutoff(settings, today)
    if before is None:
        return PurgeResult()
    storage = await open_storage(settings, settings.db, migrate=False)
    try:
        shards = existing_shards(settings.db)
        if announce is not None or dry_run:
            expired = await storage.count_expired(before, shards)
            if announce is not None:
                announce(expired, before)
            if dry_run or not expired.days:
                return PurgeResult()
        return await storage.roll_up_and_purge(before, shards)
    finally:
        await storage.close()


async def _retention(settings: Settings) -> None:
    """Apply retention now and then every ``purge_interval``; a failed run is retried."""
    while True:
        try:
            result = await purge_expired(settings)
            if result.days:
                logger.info("retention: %d days rolled up, %d raw rows deleted",
                            result.days, result.rows_deleted)  # fmt: skip
        except Exception:
            logger.warning("retention run failed; will retry", exc_info=True)
        await asyncio.sleep(settings.purge_interval)


async def _drain(ingest: Ingest, writer: asyncio.Task[None], timeout: float) -> None:
    """Commit what is still queued, then stop the writer (cancelled if it overruns)."""
    try:
        await asyncio.wait_for(ingest.stop(), timeout)
        await asyncio.wait_for(asyncio.shield(writer), timeout)
    except TimeoutError:
        logger.warning(
            "writer did not drain within %.1fs; %d reports dropped", timeout, ingest.pending
        )
    await _cancel(writer)


async def _cancel(task: asyncio.Task[None], timeout: float = 10.0) -> None:
    """Cancel a background task and wait for it, at most ``timeout`` seconds."""
    task.cancel()
    done, _ = await asyncio.wait({task}, timeout=timeout)
    if not done:
        logger.warning("%s did not stop within %.0fs", task.get_name(), timeout)
    elif not task.cancelled() and task.exception() is not None:
        logger.warning("%s failed", task.get_name(), exc_info=task.exception())
