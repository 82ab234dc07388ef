"""Group commit: one writer task turns many queued requests into one transaction.

Handlers :meth:`Ingest.submit` a report (or a version-check count) and await its future; the
writer drains up to ``batch_size`` waiting items, commits them in one transaction and only then
resolves their futures. So a 200 always means "committed", while a busy server pays for one
COMMIT (one fsync) per batch instead of per request. The queue is bounded: when it is full,
:meth:`submit` raises :class:`OverloadedError` at once rather than letting memory and latency
grow without limit.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Final

from .errors import OverloadedError, ShuttingDownError, StorageUnavailableError
from .protocol import Report
from .storage import Storage

logger = logging.getLogger(__name__)

Item = tuple[Report | str, asyncio.Future[None]]
_STOP: Final = None


class Ingest:
    """The ingest queue and its single writer. :meth:`run` is the writer task's body."""

    def __init__(
        self, storage: Storage, *, queue_size: int, batch_size: int, retry_after: int = 1
    ) -> None:
        self._storage = storage
        self._queue: asyncio.Queue[Item | None] = asyncio.Queue(queue_size)
        self._batch_size = batch_size
        self._retry_after = retry_after
        self._accepting = True
        self.batches = 0
        self.committed = 0
        self.writing = 0  # items taken by the writer and not yet committed

    @property
    def pending(self) -> int:
        return self._queue.qsize()

    async def submit(self, item: Report | str) -> None:
        """Queue a report (or a product name, for one version check) and wait for its commit.

        Raises :class:`OverloadedError` when the queue is full, :class:`ShuttingDownError`
        once :meth:`stop` has begun, :class:`StorageUnavailableError` when the commit failed.
        """
        if not self._accepting:
            raise ShuttingDownError("server is shutting down", self._retry_after)
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        try:
            self._queue.put_nowait((item, future))
        except asyncio.QueueFull:
            raise OverloadedError("too many reports waiting", self._retry_after) from None
        await future

    async def run(self) -> None:
        """Drain the queue batch by batch until :meth:`stop`; never raises on a failed write."""
        while True:
            first = await self._queue.get()
            if first is _STOP:
                return
            batch = [first]
            stop = False
            while len(batch) < self._batch_size and not self._queue.empty():
                item = self._queue.get_nowait()
                if item is _STOP:
                    stop = True
                    break
                batch.append(item)
            await self._commit(batch)
            if stop:
                return

    async def _commit(self, batch: list[Item]) -> None:
        self.writing = len(batch)
        reports = [item for item, _ in batch if isinstance(item, Report)]
        checks = [item for item, _ in batch if isinstance(item, str)]
        error: BaseException | None = None
        try:
            await self._storage.write_batch(reports, checks, time.time())
        except StorageUnavailableError as exc:
            logger.warning("batch of %d not committed: %s", len(batch), exc)
            error = StorageUnavailableError(
                "storage is unavailable, try again later", self._retry_after
            )
        except Exception:
            # A bug, not a fault: keep the writer alive so later batches still commit.
            logger.exception("batch of %d not committed", len(batch))
            error = StorageUnavailableError("could not store the report", self._retry_after)
        else:
            self.batches += 1
            self.committed += len(batch)
        self.writing = 0
        for _, future in batch:
            if future.done():  # the handler was cancelled; nothing waits for this one
                continue
            if error is None:
                future.set_result(None)
            else:
                future.set_exception(error)

    async def stop(self) -> None:
        """Refuse new items, commit everything already queued, then let :meth:`run` return."""
        self._accepting = False
        # Blocks only while the queue is full, which the running writer is draining.
        await self._queue.put(_STOP)
