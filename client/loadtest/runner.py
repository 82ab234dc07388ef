"""Running the load: closed or open loop, one or several processes, and what they measured.

Closed loop (``concurrency`` connections, each sending as soon as its last answer came) or open
loop (``rate`` arrivals a second on a fixed schedule, latency measured from the *scheduled* send
time, so a stalled server cannot hide behind coordinated omission). With ``new_connection``
every request goes out on a fresh TCP connection that is closed after the answer, as a real
fleet reports (each OPA hourly, on a new connection); the latency then includes the connect.
Every run is bounded by ``duration`` and/or ``requests``.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import multiprocessing
import random
import sys
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from hdrh.histogram import HdrHistogram  # type: ignore[import-untyped]

from .fleet import build_requests, check_request
from .target import Target
from .wire import BadAnswerError, HttpConnection, connect

HISTOGRAM_MAX_US = 120_000_000  # two minutes, in microseconds


@dataclass(frozen=True)
class LoadConfig:
    target: Target
    concurrency: int = 64
    rate: float | None = None
    duration: float | None = 10.0
    requests: int | None = None
    instances: int | None = None
    check_ratio: float = 0.0
    timeout: float = 5.0
    seed: int | None = None
    new_connection: bool = False
    live: bool = False


@dataclass
class Result:
    """What one run measured. Latencies are in microseconds in ``histogram``.

    ``succeeded`` counts 2xx answers that are what the request expects; every other request
    sent (an error, a non-2xx answer, a 2xx that is not a report's answer) is a failure.
    """

    duration: float = 0.0
    sent: int = 0
    succeeded: int = 0
    reports_ok: int = 0
    statuses: Counter[int] = field(default_factory=Counter)
    errors: Counter[str] = field(default_factory=Counter)
    histogram: HdrHistogram = field(default_factory=lambda: HdrHistogram(1, HISTOGRAM_MAX_US, 3))

    @property
    def failures(self) -> int:
        return self.sent - self.succeeded

    @property
    def failure_ratio(self) -> float:
        """Failures over requests sent (1.0 when nothing was sent)."""
        return self.failures / self.sent if self.sent else 1.0

    def merge(self, other: Result) -> None:
        self.duration = max(self.duration, other.duration)
        self.sent += other.sent
        self.succeeded += other.succeeded
        self.reports_ok += other.reports_ok
        self.statuses.update(other.statuses)
        self.errors.update(other.errors)
        self.histogram.add(other.histogram)

    def to_wire(self) -> dict[str, Any]:
        """Plain picklable data, for a child process to hand back (see :meth:`from_wire`)."""
        return {"duration": self.duration, "sent": self.sent, "succeeded": self.succeeded,
                "reports_ok": self.reports_ok, "statuses": dict(self.statuses),
                "errors": dict(self.errors), "histogram": self.histogram.encode()}  # fmt: skip

    @classmethod
    def from_wire(cls, data: dict[str, Any]) -> Result:
        return cls(data["duration"], data["sent"], data["succeeded"], data["reports_ok"],
                   Counter(data["statuses"]), Counter(data["errors"]),
                   HdrHistogram.decode(data["histogram"]))  # fmt: skip

    def summary(self) -> dict[str, Any]:
        """The result as plain data (what ``--json`` writes)."""
        h = self.histogram
        count = h.get_total_count()

        def ms(value: float) -> float:
            return round(value / 1000, 3)

        percentiles = {f"p{p:g}": ms(h.get_value_at_percentile(p)) if count else None
                       for p in (50, 90, 99, 99.9)}  # fmt: skip
        return {
            "duration_s": round(self.duration, 3),
            "requests": self.sent,
            "completed": count,
            "throughput_rps": round(count / self.duration, 1) if self.duration else 0.0,
            "latency_ms": {**percentiles, "max": ms(h.get_max_value()) if count else None},
            "statuses": {str(k): v for k, v in sorted(self.statuses.items())},
            "errors": dict(sorted(self.errors.items())),
            "succeeded": self.succeeded,
            "failures": self.failures,
            "failure_ratio": round(self.failure_ratio, 6),
            "reports_acknowledged": self.reports_ok,
        }


class _Run:
    """The state of one process's load: request tickets, the stop time, the counters."""

    def __init__(self, config: LoadConfig) -> None:
        self.config = config
        self.result = Result()
        self.rng = random.Random(config.seed)  # noqa: S311 - load mix, not secrets
        self.check = check_request(config.target, close=config.new_connection)
        self.deadline = math.inf
        self.remaining = config.requests if config.requests is not None else math.inf

    def take_ticket(self) -> bool:
        if self.remaining <= 0 or time.monotonic() >= self.deadline:
            return False
        self.remaining -= 1
        return True

    async def send(
        self, conn: HttpConnection | None, data: bytes, started_ns: int
    ) -> HttpConnection | None:
        """One request on ``conn`` (connecting first if needed); returns the connection to
        reuse, or None after an error or a connection-per-request exchange closed it.
        Records the latency from ``started_ns``."""
        result = self.result
        result.sent += 1
        try:
            async with asyncio.timeout(self.config.timeout):
                if conn is None or conn.closed:
                    conn = await connect(self.config.target)
                status, body = await conn.request(data)
        except TimeoutError:
            result.errors["timeout"] += 1
        except ConnectionRefusedError:
            result.errors["refused"] += 1
        except (ConnectionResetError, BrokenPipeError, ConnectionAbortedError):
            result.errors["reset"] += 1
        except BadAnswerError:
            result.errors["bad answer"] += 1
        except OSError as exc:
            result.errors[type(exc).__name__] += 1
        else:
            elapsed_us = max(1, (time.perf_counter_ns() - started_ns) // 1000)
            result.histogram.record_value(min(elapsed_us, HISTOGRAM_MAX_US))
            result.statuses[status] += 1
            if data is self.check:
                if 200 <= status < 300:
                    result.succeeded += 1
            elif status == 200 and body.startswith(b'{"latest"'):
                result.succeeded += 1
                result.reports_ok += 1
            elif status == 200:
                result.errors["bad answer"] += 1
            if not self.config.new_connection:
                return conn
        if conn is not None:
            conn.close()
        return None

    def pick(self, requests: Sequence[bytes], index: int) -> bytes:
        ratio = self.config.check_ratio
        if ratio and self.rng.random() < ratio:
            return self.check
        return requests[index]


async def _closed_loop(run: _Run, requests: Sequence[bytes]) -> None:
    stride = run.config.concurrency

    async def reporter(index: int) -> None:
        # Connection i speaks for instances i, i + stride, i + 2*stride, ... in turn.
        conn: HttpConnection | None = None
        try:
            while run.take_ticket():
                conn = await run.send(conn, run.pick(requests, index), time.perf_counter_ns())
                index = (index + stride) % len(requests)
        finally:
            if conn is not None:
                conn.close()

    await asyncio.gather(*(reporter(i) for i in range(run.config.concurrency)))


async def _open_loop(run: _Run, requests: Sequence[bytes]) -> None:
    rate = run.config.rate
    assert rate
    pool: asyncio.Queue[HttpConnection | None] = asyncio.Queue()
    for _ in range(run.config.concurrency):
        pool.put_nowait(None)
    tasks: set[asyncio.Task[None]] = set()

    async def one(index: int, scheduled_ns: int) -> None:
        conn = await pool.get()  # waiting for a free connection counts as latency
        try:
            conn = await run.send(conn, run.pick(requests, index), scheduled_ns)
        finally:
            pool.put_nowait(conn)

    start_ns, interval_ns = time.perf_counter_ns(), int(1e9 / rate)
    for number in range(sys.maxsize):
        if not run.take_ticket():
            break
        scheduled_ns = start_ns + number * interval_ns
        delay = (scheduled_ns - time.perf_counter_ns()) / 1e9
        if delay > 0:
            await asyncio.sleep(delay)
        task = asyncio.create_task(one(number % len(requests), scheduled_ns))
        tasks.add(task)
        task.add_done_callback(tasks.discard)
    if tasks:
        await asyncio.gather(*tasks)
    while not pool.empty():
        conn = pool.get_nowait()
        if conn is not None:
            conn.close()


async def _live_line(run: _Run, started: float) -> None:
    """Once a second on stderr: elapsed time, requests/s, errors and p99 so far."""
    last_count, last_time = 0, started
    while True:
        await asyncio.sleep(1.0)
        now, h = time.monotonic(), run.result.histogram
        count = h.get_total_count()
        rps = (count - last_count) / (now - last_time)
        p99 = h.get_value_at_percentile(99) / 1000 if count else 0.0
        errors = sum(run.result.errors.values())
        print(f"\r{now - started:6.1f}s {rps:10,.0f} req/s  errors {errors:<8,} p99 {p99:8.2f} ms",
              end="", file=sys.stderr, flush=True)  # fmt: skip
        last_count, last_time = count, now


async def run_load(config: LoadConfig) -> Result:
    """Run one process's share of the load and return what it measured."""
    run = _Run(config)
    count = config.instances or max(config.concurrency, 1) * 4
    requests = build_requests(
        config.target, max(count, config.concurrency), config.seed, close=config.new_connection
    )
    started = time.monotonic()
    if config.duration is not None:
        run.deadline = started + config.duration
    live = asyncio.create_task(_live_line(run, started)) if config.live else None
    try:
        await (_open_loop if config.rate else _closed_loop)(run, requests)
    finally:
        if live is not None:
            live.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await live
            print(file=sys.stderr)
    run.result.duration = time.monotonic() - started
    return run.result


def _split(config: LoadConfig, processes: int) -> list[LoadConfig]:
    """Share one load among ``processes`` (each with its own connections and seed)."""
    shares = []
    for index in range(processes):
        concurrency = config.concurrency // processes + (index < config.concurrency % processes)
        requests = None
        if config.requests is not None:
            requests = config.requests // processes + (index < config.requests % processes)
        shares.append(replace(
            config, concurrency=max(concurrency, 1), requests=requests,
            rate=config.rate / processes if config.rate else None,
            seed=None if config.seed is None else config.seed + index,
            live=config.live and index == 0,
        ))  # fmt: skip
    return shares


def _child(config: LoadConfig, uvloop: bool) -> dict[str, Any]:
    return _run_in_loop(config, uvloop).to_wire()


def _run_in_loop(config: LoadConfig, use_uvloop: bool) -> Result:
    if use_uvloop:
        with contextlib.suppress(ImportError):
            import uvloop

            return uvloop.run(run_load(config))
    return asyncio.run(run_load(config))


def run_processes(config: LoadConfig, processes: int = 1, use_uvloop: bool = True) -> Result:
    """Run the load in ``processes`` processes and merge their histograms and counters."""
    if processes <= 1:
        return _run_in_loop(config, use_uvloop)
    context = multiprocessing.get_context("spawn")
    with context.Pool(processes) as pool:
        parts = pool.starmap(_child, [(share, use_uvloop) for share in _split(config, processes)])
    merged = Result()
    for part in parts:
        merged.merge(Result.from_wire(part))
    return merged
