"""The release catalog held in memory for the hot path, kept in step with the database."""

from __future__ import annotations

import asyncio
import logging

from .releases import Catalog
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
