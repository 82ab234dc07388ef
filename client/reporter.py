"""The background reporter: an app's startup never waits on the network.

:meth:`Reporter.start` only schedules a task. That task reports at once and then on OPA's
schedule; each report's exchange runs in a thread of its own and the task only awaits it, and
nothing is imported on the way (see :mod:`.transport`). Every
failure ends at the one ``except Exception`` below and is logged at DEBUG; nothing reaches the
host app. :meth:`Reporter.aclose` cancels the task and waits a bounded time for it.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import os
from collections.abc import Awaitable, Callable, Iterator, Mapping
from types import TracebackType
from typing import Protocol

from .answer import LatestRelease
from .config import do_not_track, service_base_url, version_url
from .payload import Gatherer, Payload, build_payload, check_product_name, new_instance_id
from .transport import post_report

logger = logging.getLogger(__name__)

# Each advisory is logged once per process (per product and version), not at every report.
_ADVISORIES_LOGGED: set[tuple[str, str, str]] = set()

OnLatest = Callable[[LatestRelease], Awaitable[None] | None]


class Uniform(Protocol):
    """A source of jitter: ``random.Random`` or anything with its ``uniform``."""

    def uniform(self, a: float, b: float) -> float: ...


class _OSRandom:
    """Jitter from ``os.urandom`` (``random`` is not imported: this package's import stays
    cheap, and fresh randomness after a fork comes for free)."""

    def uniform(self, a: float, b: float) -> float:
        return a + (b - a) * int.from_bytes(os.urandom(7), "big") / (1 << 56)


_SCHEDULE_FIELDS = ("first_delay", "interval", "interval_count", "long_interval", "jitter",
                    "max_delay")  # fmt: skip


class Schedule:
    """When reports go out. The default is OPA 1.x's: one at start, then hourly six times,
    then every six hours; each wait is scaled by a random factor in ``1 ± jitter`` so a fleet
    restarted together does not report in lockstep.

    After consecutive failures the next wait doubles per failure (up to ``max_delay``), so a
    service that is down is not hammered by a whole fleet; a ``Retry-After`` from the service
    is honoured as a minimum, clamped to ``max_delay`` so that no header can silence a
    reporter for longer.

    Immutable. A plain class rather than a dataclass: building a dataclass costs about a
    millisecond at import, and importing this package must stay cheap.
    """

    __slots__ = _SCHEDULE_FIELDS

    first_delay: float
    interval: float
    interval_count: int
    long_interval: float
    jitter: float
    max_delay: float

    def __init__(
        self,
        first_delay: float = 0.0,
        interval: float = 3600.0,
        interval_count: int = 6,
        long_interval: float = 6 * 3600.0,
        jitter: float = 0.1,
        max_delay: float = 24 * 3600.0,
    ) -> None:
        if min(first_delay, interval, long_interval) < 0 or not (0 <= jitter < 1):
            raise ValueError("delays must be non-negative and 0 <= jitter < 1")
        if max_delay < max(interval, long_interval):
            raise ValueError("max_delay must be at least the longest interval")
        values = (first_delay, interval, interval_count, long_interval, jitter, max_delay)
        for name, value in zip(_SCHEDULE_FIELDS, values, strict=True):
            object.__setattr__(self, name, value)

    def __setattr__(self, name: str, value: object) -> None:
        raise AttributeError("Schedule is immutable")

    def __eq__(self, other: object) -> bool:
        return self._values() == other._values() if isinstance(other, Schedule) else NotImplemented

    def __hash__(self) -> int:
        return hash(self._values())

    def __repr__(self) -> str:
        pairs = zip(_SCHEDULE_FIELDS, self._values(), strict=True)
        return f"Schedule({', '.join(f'{name}={value!r}' for name, value in pairs)})"

    def _values(self) -> tuple[float, ...]:
        return tuple(getattr(self, name) for name in _SCHEDULE_FIELDS)

    def next_delay(
        self,
        scheduled: float,
        failures: int,
        retry_after: float | None,
        rng: Uniform,
    ) -> float:
        """The wait before the next attempt: ``scheduled`` (already jittered) doubled per
        consecutive failure, at least ``retry_after``, never more than ``max_delay``."""
        delay: float = scheduled * 2.0 ** min(failures, 32)
        if failures:
            delay = self._jittered(delay, rng)
        if retry_after is not None:
            delay = max(delay, retry_after)
        return float(min(delay, self.max_delay))

    def delays(self, rng: Uniform) -> Iterator[float]:
        """The wait before each report, forever."""
        yield self.first_delay
        for _ in range(self.interval_count):
            yield self._jittered(self.interval, rng)
        while True:
            yield self._jittered(self.long_interval, rng)

    def _jittered(self, delay: float, rng: Uniform) -> float:
        return delay * rng.uniform(1 - self.jitter, 1 + self.jitter)


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
        self.instance_id = new_instance_id()
        self.reports_sent = 0
        self._gatherers = dict(gatherers or {})
        self._on_latest = on_latest
        self._environ = environ
        self._task: asyncio.Task[None] | None = None
        self._pid = os.getpid()
        self._rng = _OSRandom()

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
            self.instance_id = new_instance_id()
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
        failures, retry_after = 0, None
        for scheduled in self.schedule.delays(self._rng):
            delay = self.schedule.next_delay(scheduled, failures, retry_after, self._rng)
            await asyncio.sleep(delay)
            answered = False
            try:
                latest = await post_report(self.url, self.payload(), self.timeout, self._environ)
                answered = True
                self.reports_sent += 1
                failures, retry_after = 0, None
                await self._deliver(latest)
            except Exception as exc:  # the client's one catch-all: nothing reaches the host
                if not _loop_running():  # closed under us (GeneratorExit, re-raised as another
                    return  # error by a callback): stop, await nothing
                if answered:  # the host's on_latest callback failed, not the service
                    logger.debug("opa-telemetry on_latest callback failed", exc_info=True)
                    continue
                failures += 1
                retry_after = getattr(exc, "retry_after", None)
                logger.debug("opa-telemetry report to %s failed (%d in a row): %s", self.url,
                             failures, exc, exc_info=True)  # fmt: skip

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
    payload = build_payload(product, version, new_instance_id())
    return await post_report(target, payload, timeout, environ)
