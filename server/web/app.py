"""The application factory. ``create_app`` does no I/O: resources open in ``cleanup_ctx``."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import Counter
from collections.abc import AsyncIterator
from functools import partial
from typing import Any

from aiohttp import web

from opa_telemetry_server.domain.advisories import bundled_advisories
from opa_telemetry_server.domain.codec import json_codec
from opa_telemetry_server.domain.protocol import DEFAULT_PRODUCT
from opa_telemetry_server.domain.releases import bundled_releases
from opa_telemetry_server.errors import TelemetryError
from opa_telemetry_server.services.catalog import CatalogCache
from opa_telemetry_server.services.ingest import Ingest
from opa_telemetry_server.services.insights import Aggregator
from opa_telemetry_server.services.metrics import FLUSH_INTERVAL, ProcessMetrics, RequestTally
from opa_telemetry_server.services.retention import run_retention
from opa_telemetry_server.services.sync import run_sync, sync_target
from opa_telemetry_server.settings import Settings
from opa_telemetry_server.storage import open_storage
from opa_telemetry_server.web.appkeys import (
    CODEC,
    INSIGHTS,
    INTAKE,
    REPOS,
    REQUESTS,
    SETTINGS,
    STORAGE,
    Insights,
    Intake,
)
from opa_telemetry_server.web.http_errors import logging_options
from opa_telemetry_server.web.ratelimit import RateLimiter
from opa_telemetry_server.web.routes import setup_routes

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
    main database, worker N to its own shard beside it with SQLite (see ``storage.sqlite``), and
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
    storage = await open_storage(settings, wait=settings.db_connect_wait)
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
        main = await open_storage(settings, wait=settings.db_connect_wait)
        stack.push_async_callback(main.close)
        shard = main
        if worker:
            shard = await open_storage(settings, worker=worker, wait=settings.db_connect_wait)
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
        reader = await open_storage(settings, migrate=False)
        stack.push_async_callback(reader.close)
        aggregator = None
        if worker == 0:
            aggregating = await open_storage(settings, migrate=False)
            stack.push_async_callback(aggregating.close)
            aggregator = Aggregator(aggregating, settings.stats_interval)
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
                run_sync(partial(open_storage, settings), [sync_target(settings)],
                         settings.sync_interval),
                name="opa-telemetry-sync",
            )  # fmt: skip
            stack.push_async_callback(_cancel, syncing)
        if worker == 0 and settings.retention_days:
            retention = asyncio.create_task(run_retention(settings), name="opa-telemetry-retention")
            stack.push_async_callback(_cancel, retention)
        if aggregator is not None:
            # On the way out, after the drain: the aggregates include every committed report.
            stack.push_async_callback(_final_aggregation, aggregator)
            aggregation = asyncio.create_task(aggregator.run(), name="opa-telemetry-aggregator")
            stack.push_async_callback(_cancel, aggregation)
        stack.push_async_callback(_drain, ingest, writer, settings.shutdown_timeout)
        yield


async def _final_aggregation(aggregator: Aggregator) -> None:
    try:
        await aggregator.run_once()
    except TelemetryError as exc:  # the database away (a failover...): one line
        logger.warning("statistics aggregation at shutdown failed: %s", exc)
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
