"""The background reporter: an app's startup never waits on the network.

:meth:`Reporter.start` only schedules a task. That task imports the transport in a worker
thread, opens its own HTTP session, reports at once and then on OPA's schedule. Every failure
ends at the one ``except Exception`` below and is logged at DEBUG; nothing reaches the host
app. :meth:`Reporter.aclose` cancels the task and waits a bounded time for it.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib
import inspect
import logging
import os
import random
import sys
import uuid
from collections.abc import Awaitable, Callable, Iterator, Mapping
from dataclasses import dataclass
from types import ModuleType, TracebackType
from typing import Any

from .answer import LatestRelease
from .config import do_not_track, service_base_url, version_url
from .payload import Gatherer, Payload, build_payload, check_product_name

logger = logging.getLogger(__name__)

# Each advisory is logged once per process (per product and version), not at every report.
_ADVISORIES_LOGGED: set[tuple[str, str, str]] = set()

OnLatest = Callable[[LatestRelease], Awaitable[None] | None]
_TRANSPORT = "opa_telemetry.transport"


@dataclass(frozen=True, slots=True)
class Schedule:
    """When reports go out. The default is OPA 1.x's: one at start, then hourly six times,
    then every six hours; each wait is scaled by a random factor in ``1 ± jitter`` so a fleet
    restarted together does not report in lockstep.

    After consecutive failures the next wait doubles per failure (up to ``max_delay``), so a
    service that is down is not hammered by a whole fleet; a ``Retry-After`` from the service
    is honoured as a minimum, clamped to ``max_delay`` so that no header can silence a
    reporter for longer.
    """

    first_delay: float = 0.0
    interval: float = 3600.0
    interval_count: int = 6
    long_interval: float = 6 * 3600.0
    jitter: float = 0.1
    max_delay: float = 24 * 3600.0

    def __post_init__(self) -> None:
        if min(self.first_delay, self.interval, self.long_interval) < 0 or not (
            0 <= self.jitter < 1
        ):
            raise ValueError("delays must be non-negative and 0 <= jitter < 1")
        if self.max_delay < max(self.interval, self.long_interval):
            raise ValueError("max_delay must be at least the longest interval")

    def next_delay(
        self,
        scheduled: float,
        failures: int,
        retry_after: float | None,
        rng: random.Random,
    ) -> float:
        """The wait before the next attempt: ``scheduled`` (already jittered) doubled per
        consecutive failure, at least ``retry_after``, never more than ``max_delay``."""
        delay: float = scheduled * 2.0 ** min(failures, 32)
        if failures:
            delay = self._jittered(delay, rng)
        if retry_after is not None:
            delay = max(delay, retry_after)
        return float(min(delay, self.max_delay))

    def delays(self, rng: random.Random) -> Iterator[float]:
        """The wait before each report, forever."""
        yield self.first_delay
        for _ in range(self.interval_count):
            yield self._jittered(self.interval, rng)
        while True:
            yield self._jittered(self.long_interval, rng)

    def _jittered(self, delay: float, rng: random.Random) -> float:
        return delay * rng.uniform(1 - self.jitter, 1 + self.jitter)


async def import_transport() -> ModuleType:
    """The transport module, imported in a worker thread the first time (aiohttp's import and
    TLS set-up take tens of milliseconds that must not stall the host's event loop)."""
    module = sys.modules.get(_TRANSPORT)
    if module is None:
        module = await asyncio.to_thread(importlib.import_module, _TRANSPORT)
    return module


class Reporter:
    """Reports ``product``/``version`` to a telemetry service in the background.

    >>> reporter = Reporter("MyApp", "1.2.3", url="http://127.0.0.1:9181")
    >>> reporter.start()          # inside a running event loop; returns at once
    >>> await reporter.aclose()   # or: async with Reporter(...) as reporter: ...

    Sends nothing when ``enabled`` is false or ``DO_NOT_TRACK`` is set. ``on_latest`` (a plain
    or async callable) receives every answer; an out-of-date answer is logged at INFO.
    """

    def __init__(
        self,
        product: str,
        version: str,
        *,
        url: str | None = None,
        enabled: bool = True,
        schedule: Schedule | None = None,
        timeout: float = 5.0,
        close_timeout: float = 1.0,
        gatherers: Mapping[str, Gatherer] | None = None,
        on_latest: OnLatest | None = None,
        environ: Mapping[str, str] | None = None,
    ) -> None:
        self.product = check_product_name(product)
        self.version = version
        self.url = version_url(service_base_url(url, environ))
        self.enabled = enabled and not do_not_track(environ)
        self.schedule = schedule or Schedule()
        self.timeout = timeout
        self.close_timeout = close_timeout
        self.instance_id = str(uuid.uuid4())
        self.reports_sent = 0
        self._gatherers = dict(gatherers or {})
        self._on_latest = on_latest
        self._task: asyncio.Task[None] | None = None
        self._pid = os.getpid()
        self._rng = random.Random()  # noqa: S311 - jitter, not secrets

    def payload(self) -> Payload:
        """What the next report would send (the dry run)."""
        return build_payload(
            self.product, self.version, self.instance_id, gatherers=self._gatherers
        )

    def start(self) -> None:
        """Schedule the background reports and return at once; idempotent.

        Must be called with a running event loop (raises RuntimeError otherwise); does nothing
        when reporting is disabled.
        """
        if self._pid != os.getpid():
            # Created before a fork (a pre-fork server): this process is a new instance, and
            # the parent's task belongs to a loop that does not run here.
            self._pid, self._task = os.getpid(), None
            self.instance_id = str(uuid.uuid4())
        if not self.enabled or self._task is not None:
            return
        loop = asyncio.get_running_loop()
        self._task = loop.create_task(self._run(), name=f"opa-telemetry reporter {self.url}")
        # A host that closes its loop without cancelling tasks would otherwise print "Task was
        # destroyed but it is pending!" for us; we hold nothing that must be flushed.
        self._task._log_destroy_pending = False  # type: ignore[attr-defined]

    async def aclose(self) -> None:
        """Stop reporting: cancel the task and wait at most ``close_timeout`` for it; idempotent."""
        task, self._task = self._task, None
        if task is None or task.done():
            return
        task.cancel()
        done, _ = await asyncio.wait({task}, timeout=self.close_timeout)
        if not done:
            logger.debug("reporter task still closing after %.1fs", self.close_timeout)

    async def __aenter__(self) -> Reporter:
        self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    async def _run(self) -> None:
        session: Any = None
        failures, retry_after = 0, None
        loop_gone = False
        try:
            for scheduled in self.schedule.delays(self._rng):
                delay = self.schedule.next_delay(scheduled, failures, retry_after, self._rng)
                await asyncio.sleep(delay)
                answered = False
                try:
                    transport = await import_transport()
                    if session is None:
                        session = transport.new_session()
                    latest = await transport.post_report(
                        session, self.url, self.payload(), self.timeout
                    )
                    answered = True
                    self.reports_sent += 1
                    failures, retry_after = 0, None
                    await self._deliver(latest)
                except Exception as exc:  # the client's one catch-all: nothing reaches the host
                    if not _loop_running():  # closed under us (GeneratorExit, re-raised as
                        loop_gone = True  # another error by a library): stop, await nothing
                        return
                    if answered:  # the host's on_latest callback failed, not the service
                        logger.debug("opa-telemetry on_latest callback failed", exc_info=True)
                        continue
                    failures += 1
                    retry_after = getattr(exc, "retry_after", None)
                    logger.debug("opa-telemetry report to %s failed (%d in a row)", self.url,
                                 failures, exc_info=True)  # fmt: skip
        except GeneratorExit:
            # The host closed its loop with us mid-await: nothing can be awaited any more.
            loop_gone = True
            raise
        finally:
            if session is not None:
                if loop_gone:
                    _abandon(session)
                else:
                    await session.close()

    async def _deliver(self, latest: LatestRelease) -> None:
        for advisory in latest.advisories:
            if (self.product, self.version, advisory.id) not in _ADVISORIES_LOGGED:
                _ADVISORIES_LOGGED.add((self.product, self.version, advisory.id))
                logger.log(
                    logging.WARNING if advisory.serious else logging.INFO,
                    "%s %s is affected by security advisory %s (%s): %s; fixed in %s; %s",
                    self.product, self.version, advisory.id,
                    advisory.severity or "severity unknown", advisory.summary,
                    advisory.fixed or "no release yet", advisory.url or "",
                    extra={"advisory": advisory.id, "severity": advisory.severity},
                )  # fmt: skip
        if not latest.up_to_date and latest.latest_release:
            logger.info(
                "%s is out of date: current_version=%s latest_version=%s download=%s"
                " release_notes=%s",
                self.product,
                self.version,
                latest.version,
                latest.download,
                latest.release_notes,
                extra={
                    "current_version": self.version,
                    "latest_version": latest.version,
                    "download": latest.download,
                    "release_notes": latest.release_notes,
                },
            )
        if self._on_latest is not None:
            result = self._on_latest(latest)
            if inspect.isawaitable(result):
                await result


def _abandon(session: Any) -> None:
    """Mark a session closed without awaiting (its loop is gone), so that aiohttp does not log
    "Unclosed client session" for it at garbage collection. ``_close`` is the connector's
    synchronous close; with a closed loop it only sets the flag. If a future aiohttp renames
    it, the only loss is that log line."""
    with contextlib.suppress(AttributeError, TypeError):
        session.connector._close()


def _loop_running() -> bool:
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return False
    return True


async def check_latest(
    product: str,
    version: str,
    *,
    url: str | None = None,
    timeout: float = 5.0,
    environ: Mapping[str, str] | None = None,
) -> LatestRelease:
    """Send one report now and return the service's answer (what ``version --check`` does).

    This is an explicit request, so ``DO_NOT_TRACK`` does not stop it. Raises a
    :class:`~opa_telemetry.errors.TelemetryError` subclass when no valid answer arrives
    within ``timeout`` seconds.
    """
    check_product_name(product)
    target = version_url(service_base_url(url, environ))
    payload = build_payload(product, version, str(uuid.uuid4()))
    transport = await import_transport()
    async with transport.new_session() as session:
        latest: LatestRelease = await transport.post_report(session, target, payload, timeout)
    return latest
