"""The release catalog held in memory for the hot path, kept in step with the database."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from typing import Any

from .releases import Catalog, latest_answer
from .storage import Storage
from .versions import Version

logger = logging.getLogger(__name__)

MAX_CACHED_ANSWERS = 4096


class CatalogCache:
    """The release catalog held in memory for the hot path, reloaded when the database's
    catalog generation changes (the CLI or another process edited it)."""

    def __init__(self, storage: Storage, interval: float, dumps: Callable[[Any], bytes]) -> None:
        self._storage = storage
        self._interval = interval
        self._dumps = dumps
        self._generation = -1
        self.checked_at: float | None = None  # when the database last confirmed this copy
        self._answers: dict[tuple[str, Version, str | None, str | None], bytes] = {}
        self.catalog = Catalog()

    def answer(self, product: str, version: Version, os_name: str | None,
               arch: str | None) -> bytes:  # fmt: skip
        """The encoded ``/v1/version`` answer, computed once per distinct caller.

        A fleet has few distinct (product, version, platform) combinations, so the answers are
        cached until the catalog changes; the cache is cleared if it ever reaches its bound.
        """
        key = (product, version, os_name, arch)
        answer = self._answers.get(key)
        if answer is None:
            if len(self._answers) >= MAX_CACHED_ANSWERS:
                self._answers = {}
            latest = latest_answer(self.catalog.latest(product), version, os_name, arch)
            answer = self._answers[key] = self._dumps({"latest": latest})
        return answer

    async def refresh(self) -> bool:
        """Reload if the catalog changed since the last load; returns whether it did."""
        generation = await self._storage.catalog_generation()
        if generation == self._generation:
            self.checked_at = time.time()
            return False
        self.catalog = await self._storage.load_catalog()
        self._answers = {}
        self._generation = generation
        self.checked_at = time.time()
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
