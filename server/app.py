"""The application factory. ``create_app`` does no I/O: resources open in ``cleanup_ctx``."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator

from aiohttp import web

from .appkeys import CATALOG, CODEC, INGEST, REPOS, SETTINGS, STORAGE
from .codec import json_codec
from .ingest import Ingest
from .middlewares import error_middleware
from .protocol import DEFAULT_PRODUCT
from .releases import Catalog, bundled_releases
from .routes import setup_routes
from .settings import Settings
from .storage import Storage

logger = logging.getLogger(__name__)


class CatalogCache:
    """The release catalog held in memory for the hot path, reloaded when the database's
    catalog generation changes (the CLI or another process edited it)."""

    def __init__(self, storage: Storage, interval: float) -> None:
        self._storage = storage
        self._interval = interval
        self._generation = -1
        self.catalog = Catalog()

    async def refresh(self) -> bool:
        """Reload if the catalog changed since the last load; returns whether it did."""
        generation = await self._storage.catalog_generation()
        if generation == self._generation:
            return False
        self.catalog = await self._storage.load_catalog()
        self._generation = generation
        return True

    async def run(self) -> None:
        """Poll for changes forever; a failed poll is retried at the next interval."""
        while True:
            await asyncio.sleep(self._interval)
            try:
                if await self.refresh():
                    logger.info("release catalog reloaded")
            except Exception:
                logger.warning("release catalog refresh failed", exc_info=True)


def create_app(settings: Settings) -> web.Application:
    """Build the application for ``settings``; the database opens when the app starts."""
    app = web.Application(client_max_size=settings.max_body_bytes, middlewares=[error_middleware])
    app[SETTINGS] = settings
    app[CODEC] = json_codec(settings.fast)
    app[REPOS] = settings.repo_products()
    setup_routes(app, settings.prefix)
    app.cleanup_ctx.append(_database)
    return app


async def _database(app: web.Application) -> AsyncIterator[None]:
    """Open storage, load the catalog and start the writer; on cleanup drain and close."""
    settings = app[SETTINGS]
    storage = await Storage.open(
        settings.db,
        synchronous=settings.synchronous,
        busy_timeout_ms=int(settings.busy_timeout * 1000),
    )
    async with contextlib.AsyncExitStack() as stack:
        stack.push_async_callback(storage.close)
        if settings.seed_catalog:
            added = await storage.seed_catalog(DEFAULT_PRODUCT, bundled_releases())
            if added:
                logger.info("release catalog seeded with %d bundled OPA releases", added)
        cache = CatalogCache(storage, settings.catalog_refresh)
        await cache.refresh()
        ingest = Ingest(
            storage,
            queue_size=settings.queue_size,
            batch_size=settings.batch_size,
            retry_after=settings.retry_after,
        )
        app[STORAGE], app[CATALOG], app[INGEST] = storage, cache, ingest
        writer = asyncio.create_task(ingest.run(), name="opa-telemetry-writer")
        refresher = asyncio.create_task(cache.run(), name="opa-telemetry-catalog-refresh")
        stack.push_async_callback(_cancel, refresher)
        stack.push_async_callback(_drain, ingest, writer, settings.shutdown_timeout)
        yield


async def _drain(ingest: Ingest, writer: asyncio.Task[None], timeout: float) -> None:
    """Commit what is still queued, then stop the writer (cancelled if it overruns)."""
    try:
        await asyncio.wait_for(ingest.stop(), timeout)
        await asyncio.wait_for(asyncio.shield(writer), timeout)
    except TimeoutError:
        logger.warning("writer did not drain within %.1fs; %d reports dropped", timeout,
                       ingest.pending)  # fmt: skip
    await _cancel(writer)


async def _cancel(task: asyncio.Task[None]) -> None:
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
