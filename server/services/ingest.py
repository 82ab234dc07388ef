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
from collections import deque

from opa_telemetry_server.domain.protocol import Report
from opa_telemetry_server.errors import OverloadedError, ShuttingDownError, StorageUnavailableError
from opa_telemetry_server.storage import Storage

logger = logging.getLogger(__name__)

Item = tuple[Report | str, asyncio.Future[None]]


class Ingest:
    """The ingest queue and its single writer. :meth:`run` is the writer task's body.

    The queue is a plain deque with one wake-up future rather than an ``asyncio.Queue``: on
    the hot path every request puts once and the writer takes many at a time, and the simpler
    structure costs measurably less per request.
    """

    def __init__(
        self, storage: Storage, *, queue_size: int, batch_size: int, retry_after: int = 1
    ) -> None:
        self._storage = storage
        self._queue: deque[Item] = deque()
        self._queue_size = queue_size
        self._batch_size = batch_size
        self._retry_after = retry_after
        self._wakeup: asyncio.Future[None] | None = None
        self._loop = asyncio.get_running_loop()  # made inside the app's running loop
        self._accepting = True
        self.batches = 0
        self.committed = 0
        self.reports_committed = 0
        self.checks_committed = 0
        self.writing = 0  # items taken by the writer and not yet committed
        # (items, commit seconds) of recent batches, drained by the metrics; bounded.
        self.batch_log: deque[tuple[int, float]] = deque(maxlen=4096)

    @property
    def pending(self) -> int:
        return len(self._queue)

    def submit(self, item: Report | str) -> asyncio.Future[None]:
        """Queue a report (or a product name, for one version check); await the returned
        future for its commit. A plain method, not a coroutine: one frame less per request.

        Raises :class:`OverloadedError` at once when the queue is full and
        :class:`ShuttingDownError` once :meth:`stop` has begun; the future raises
        :class:`StorageUnavailableError` when the commit failed.
        """
        if not self._accepting:
            raise ShuttingDownError("server is shutting down", self._retry_after)
        if len(self._queue) >= self._queue_size:
            raise OverloadedError("too many reports waiting", self._retry_after)
        future: asyncio.Future[None] = self._loop.create_future()
        self._queue.append((item, future))
        wakeup = self._wakeup
        if wakeup is not None and not wakeup.done():
            wakeup.set_result(None)
        return future

    async def run(self) -> None:
        """Commit the queue batch by batch; after :meth:`stop`, return once it is empty.

        Never raises on a failed write: those requests get a 503 and the writer goes on.
        """
        while True:
            if not self._queue:
                if not self._accepting:
                    return
                self._wakeup = self._loop.create_future()
                await self._wakeup
                continue
            take = min(len(self._queue), self._batch_size)
            batch = [self._queue.popleft() for _ in range(take)]
            await self._commit(batch)

    async def _commit(self, batch: list[Item]) -> None:
        self.writing = len(batch)
        reports = [item for item, _ in batch if isinstance(item, Report)]
        checks = [item for item, _ in batch if isinstance(item, str)]
        error: BaseException | None = None
        started = time.perf_counter()
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
            self.reports_committed += len(reports)
            self.checks_committed += len(checks)
            self.batch_log.append((len(batch), time.perf_counter() - started))
        self.writing = 0
        for _, future in batch:
            if future.done():  # the handler was cancelled; nothing waits for this one
                continue
            if error is None:
                future.set_result(None)
            else:
                future.set_exception(error)

    async def stop(self) -> None:
        """Refuse new items; :meth:`run` returns once everything queued is committed."""
        self._accepting = False
        wakeup = self._wakeup
        if wakeup is not None and not wakeup.done():
            wakeup.set_result(None)
