"""The application factory. ``create_app`` does no I/O: resources open in ``cleanup_ctx``."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections import Counter
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from functools import partial
from pathlib import Path
from typing import Any

from aiohttp import web

from .advisories import bundled_advisories
from .appkeys import CODEC, INSIGHTS, INTAKE, REPOS, REQUESTS, SETTINGS, STORAGE, Insights, Intake
from .catalog import CatalogCache
from .codec import json_codec
from .database import open_storage
from .errors import BackupError
from .http_errors import logging_options
from .ingest import Ingest
from .insights import Aggregator
from .metrics import FLUSH_INTERVAL, ProcessMetrics, RequestTally
from .protocol import DEFAULT_PRODUCT
from .ratelimit import RateLimiter
from .releases import bundled_releases
from .routes import setup_routes
from .settings import Settings
from .storage import (
    RETENTION_RUN_KEY,
    PurgeResult,
    backup_pairs,
    existing_shards,
    shard_path,
)
from .sync import run_sync, sync_target

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
    before the size cap. aiohttp's logging of requests it refuses is bounded and never names
    the client (``http_errors.logging_options``).
    """
    return {
        **logging_options(settings.access_log),
        "keepalive_timeout": settings.read_timeout,
        "max_line_size": MAX_LINE_SIZE,
        "max_field_size": MAX_FIELD_SIZE,
        "max_headers": MAX_HEADERS,
        "auto_decompress": False,
    }


def create_app(
    settings: Settings, *, worker: int = 0, metrics_dir: str | None = None
) -> web.Application:
    """Build the application for ``settings``; the databases open when the app starts.

    ``worker`` numbers the process among ``settings.workers``: worker 0 commits reports to the
    main database, worker N to its own shard beside it (see ``storage.shard_path``), and
    worker 0 alone keeps the statistics aggregates. ``metrics_dir``: the workers' shared
    prometheus-client multiprocess directory (set by the supervisor), else ``None``.
    """
    app = web.Application(client_max_size=settings.max_body_bytes)
    app[SETTINGS] = settings
    app[CODEC] = json_codec(settings.fast)
    app[REPOS] = settings.repo_products()
    app[REQUESTS] = Counter()
    setup_routes(app, settings.prefix)
    app.cleanup_ctx.append(partial(_databases, worker=worker, metrics_dir=metrics_dir))
    return app


async def prepare_database(settings: Settings) -> None:
    """Create or migrate the main database and seed the catalog once (idempotent)."""
    storage = await open_storage(settings, settings.db)
    try:
        if settings.seed_catalog:
            added = await storage.seed_catalog(DEFAULT_PRODUCT, bundled_releases())
            if added:
                logger.info("release catalog seeded with %d bundled OPA releases", added)
            added, _ = await storage.import_advisories(
                DEFAULT_PRODUCT, bundled_advisories(), seed=True
            )
            if added:
                logger.info("advisories seeded with %d bundled OPA advisories", added)
    finally:
        await storage.close()


async def _databases(
    app: web.Application, worker: int, metrics_dir: str | None
) -> AsyncIterator[None]:
    """Open storage, load the catalog and start the writer and the aggregator; on cleanup
    drain the queue, bring the aggregates up to date and close."""
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
            requests=app[REQUESTS],
        )  # fmt: skip
        reader = await open_storage(settings, settings.db, migrate=False)
        stack.push_async_callback(reader.close)
        aggregator = None
        if worker == 0:
            aggregating = await open_storage(settings, settings.db, migrate=False)
            stack.push_async_callback(aggregating.close)
            aggregator = Aggregator(
                aggregating, settings.db, settings.stats_interval, existing_shards
            )
        metrics = ProcessMetrics(metrics_dir)
        app[INSIGHTS] = Insights(reader=reader, metrics=metrics, aggregator=aggregator)
        writer = asyncio.create_task(ingest.run(), name="opa-telemetry-writer")
        refresher = asyncio.create_task(cache.run(), name="opa-telemetry-catalog-refresh")
        stack.push_async_callback(_cancel, refresher)
        flusher = asyncio.create_task(
            _flush_metrics(metrics, app[REQUESTS], ingest), name="opa-telemetry-metrics"
        )
        stack.push_async_callback(_cancel, flusher)
        if worker == 0 and settings.sync_interval:
            syncing = asyncio.create_task(
                run_sync(partial(open_storage, settings, settings.db), [sync_target(settings)],
                         settings.sync_interval),
                name="opa-telemetry-sync",
            )  # fmt: skip
            stack.push_async_callback(_cancel, syncing)
        if worker == 0 and settings.retention_days:
            retention = asyncio.create_task(_retention(settings), name="opa-telemetry-retention")
            stack.push_async_callback(_cancel, retention)
        if aggregator is not None:
            # On the way out, after the drain: the aggregates include every committed report.
            stack.push_async_callback(_final_aggregation, aggregator)
            aggregation = asyncio.create_task(aggregator.run(), name="opa-telemetry-aggregator")
            stack.push_async_callback(_cancel, aggregation)
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
        result = await storage.roll_up_and_purge(before, shards)
        await storage.set_meta(RETENTION_RUN_KEY, int(datetime.now(UTC).timestamp()))
        return result
    finally:
        await storage.close()


async def aggregate_now(settings: Settings, *, migrate: bool = True) -> None:
    """Bring the statistics aggregates up to date (main database and shards), on a
    connection of its own."""
    storage = await open_storage(settings, settings.db, migrate=migrate)
    try:
        await storage.aggregate(existing_shards(settings.db))
    finally:
        await storage.close()


async def _final_aggregation(aggregator: Aggregator) -> None:
    try:
        await aggregator.run_once()
    except Exception:
        logger.warning("statistics aggregation at shutdown failed", exc_info=True)


async def _flush_metrics(metrics: ProcessMetrics, requests: RequestTally, ingest: Ingest) -> None:
    """Copy the hot path's tallies into the metrics every ``FLUSH_INTERVAL`` seconds."""
    while True:
        await asyncio.sleep(FLUSH_INTERVAL)
        try:
            metrics.flush(requests, ingest)
        except Exception:
            logger.warning("metrics flush failed", exc_info=True)


@dataclass(frozen=True, slots=True)
class BackupFile:
    source: Path
    copy: Path
    size: int  # bytes


async def backup_database(
    settings: Settings, dest: Path, *, force: bool = False
) -> list[BackupFile]:
    """Copy ``settings.db`` and every worker shard beside it to ``dest`` (a file, or a folder
    to hold one of the database's name) and its shard names (see ``storage.backup_pairs``):
    each file a consistent snapshot, taken while the server may be running, so that the copy
    is a database ``stats`` or ``serve`` can open as it is.

    Nothing is created or migrated at the source. Each copy is written under a temporary name,
    flushed, then renamed into place: a failed backup never leaves a half-written file under a
    copy's name. Raises :class:`BackupError` when ``dest`` is the database itself, its folder
    is missing, or (without ``force``) a file the backup would write, or a stale shard copy
    that a restore would pick up, already exists; :class:`SchemaError` when ``settings.db`` is
    not a database of this version.
    """
    pairs, stale = _plan_backup(Path(settings.db), dest, force=force)
    written = []
    for source, copy in pairs:
        temporary = copy.with_name(f".{copy.name}.partial")
        temporary.unlink(missing_ok=True)  # left by a backup that was killed
        storage = await open_storage(settings, source, migrate=False)
        try:
            size = await storage.backup(temporary)
        finally:
            await storage.close()
        for sidecar in _sidecars(copy):  # an old -wal would be replayed over the new copy
            sidecar.unlink(missing_ok=True)
        os.replace(temporary, copy)
        written.append(BackupFile(source, copy, size))
    for shard in stale:
        for path in (shard, *_sidecars(shard)):
            path.unlink(missing_ok=True)
    _sync_directory(pairs[0][1].parent)
    return written


def _plan_backup(
    db: Path, dest: Path, *, force: bool
) -> tuple[list[tuple[Path, Path]], list[Path]]:
    """The (file, copy) pairs of a backup of ``db`` to ``dest``, and the stale shard copies to
    remove; raises :class:`BackupError` (see :func:`backup_database`). A few stat calls: not
    worth a thread."""
    if dest.is_dir():  # a folder: the copy takes the database's own name in it
        dest = dest / db.name
    pairs = backup_pairs(db, dest)
    copies = {copy for _, copy in pairs}
    if {copy.resolve() for copy in copies} & {source.resolve() for source, _ in pairs}:
        raise BackupError(f"{dest} is the database itself; choose another destination")
    if not dest.parent.is_dir():
        raise BackupError(f"{dest}: the directory {dest.parent} does not exist")
    stale = [shard for shard in existing_shards(dest) if shard not in copies]
    in_the_way = [
        path for copy in [*copies, *stale] for path in (copy, *_sidecars(copy)) if path.exists()
    ]
    if in_the_way and not force:
        names = ", ".join(str(path) for path in sorted(in_the_way))
        raise BackupError(f"{names} already exist{'s' if len(in_the_way) == 1 else ''};"
                          " choose another destination or give --force to overwrite")  # fmt: skip
    return pairs, stale


def _sidecars(db: Path) -> tuple[Path, Path]:
    """SQLite's files beside a database in WAL mode."""
    return db.with_name(db.name + "-wal"), db.with_name(db.name + "-shm")


def _sync_directory(folder: Path) -> None:
    """Flush a folder's entries (the renames) to disk."""
    descriptor = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


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
