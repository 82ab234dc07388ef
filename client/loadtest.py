"""``opa-telemetry-loadtest``: many concurrent simulated OPA reporters against one server.

Each simulated reporter is a distinct instance (its own UUID, a version drawn from a realistic
mix of OPA's releases and ``-dev`` builds, a platform, one of OPA's User-Agent forms), and its
request bytes are built once with the client's own :mod:`opa_telemetry.payload`, so the load
cannot drift from the wire format. Requests go over persistent HTTP/1.1 connections spoken by
a small :class:`asyncio.Protocol` rather than a general-purpose client, so that one process can
outrun the server it measures.

Two modes: closed loop (``--concurrency N``: each connection sends as soon as its last answer
came) and open loop (``--rate R``: arrivals on a fixed schedule, latency measured from the
*scheduled* send time, so a stalled server cannot hide behind coordinated omission). Every run
is bounded by ``--duration`` and/or ``--requests``, and by default refuses any target outside
the loopback range.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import importlib.util
import ipaddress
import json
import math
import multiprocessing
import random
import socket
import sys
import time
import uuid
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, cast
from urllib.parse import urlsplit

from hdrh.histogram import HdrHistogram  # type: ignore[import-untyped]

from .payload import build_body, user_agent

MAX_DURATION = 3600.0
HISTOGRAM_MAX_US = 120_000_000  # two minutes, in microseconds
PLATFORMS = (  # (os, arch, weight): a fleet that is mostly linux/amd64 servers
    ("linux", "amd64", 70), ("linux", "arm64", 12), ("darwin", "arm64", 8),
    ("darwin", "amd64", 5), ("windows", "amd64", 5),
)  # fmt: skip
FALLBACK_VERSIONS = ("1.20.2", "1.20.1", "1.19.1", "1.18.2", "1.15.0", "1.6.0", "0.70.0")
CHECK_PATH = "/repos/open-policy-agent/opa/releases/latest"


class LoadTestError(Exception):
    """The load test cannot run as asked (bad target, refused remote address)."""


# -- what is sent -------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Target:
    host: str
    port: int
    prefix: str

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}{self.prefix}"


def parse_target(url: str) -> Target:
    """Split a base URL (``http://127.0.0.1:9181/prefix``); only plain HTTP is supported."""
    parts = urlsplit(url)
    if parts.scheme != "http" or not parts.hostname:
        raise LoadTestError(f"target must be an http:// URL, not {url!r}")
    return Target(parts.hostname, parts.port or 80, parts.path.rstrip("/"))


def check_loopback(host: str) -> None:
    """Raise unless every address ``host`` resolves to is a loopback address."""
    try:
        infos = socket.getaddrinfo(host, None, proto=socket.IPPROTO_TCP)
    except OSError as exc:
        raise LoadTestError(f"cannot resolve {host!r}: {exc}") from None
    addresses = {str(info[4][0]) for info in infos}
    remote = sorted(a for a in addresses if not ipaddress.ip_address(a).is_loopback)
    if remote:
        raise LoadTestError(
            f"{host} resolves to non-loopback {', '.join(remote)}; "
            "pass --allow-remote to load-test a server you run elsewhere"
        )


def catalog_versions() -> list[str]:
    """OPA's release versions, newest first, from the server package's bundled catalog when it
    is installed (read as data: the client never imports the server), else a short list."""
    spec = importlib.util.find_spec("opa_telemetry_server")
    for location in (spec.submodule_search_locations or []) if spec else []:
        path = Path(location) / "data" / "opa-releases.json"
        if path.is_file():
            return [entry["tag"].lstrip("v") for entry in json.loads(path.read_text())]
    return list(FALLBACK_VERSIONS)


def version_mix(versions: Sequence[str], rng: random.Random, count: int) -> list[str]:
    """``count`` versions as a fleet runs them: mostly recent releases (weight falls with age),
    a long tail of old ones, and about 3% ``-dev`` builds of the next minor version."""
    weights = [1 / (rank + 1) ** 1.1 for rank in range(len(versions))]
    major, minor, _ = (int(part) for part in versions[0].split("-")[0].split("."))
    dev = f"{major}.{minor + 1}.0-dev"
    return [dev if rng.random() < 0.03 else rng.choices(versions, weights)[0] for _ in range(count)]


def opa_user_agent(version: str, os_name: str, arch: str, rng: random.Random) -> str:
    """One of OPA's real User-Agent forms, as the given version would send it."""
    roll = rng.random()
    if roll < 0.03:
        return f"Enterprise OPA/1.2.0 {user_agent('Open Policy Agent', version, os_name, arch)}"
    if roll < 0.04:
        return f'"Open Policy Agent/v{version} ({os_name}, {arch})"'
    major, minor = (int(part) for part in version.split(".")[:2])
    product = "Open-Policy-Agent" if (major, minor) >= (1, 18) else "Open Policy Agent"
    return user_agent(product, version, os_name, arch)


def build_requests(target: Target, count: int, seed: int | None) -> list[bytes]:
    """Request bytes for ``count`` distinct simulated instances."""
    rng = random.Random(seed)  # noqa: S311 - a simulated fleet, not secrets
    host = f"Host: {target.host}:{target.port}\r\n".encode()
    requests = []
    for version in version_mix(catalog_versions(), rng, count):
        os_name, arch, _ = rng.choices(PLATFORMS, [w for *_, w in PLATFORMS])[0]
        instance = str(uuid.UUID(int=rng.getrandbits(128), version=4))
        body = build_body(instance, version, rng.randrange(2_000_000, 200_000_000))
        head = (
            f"POST {target.prefix}/v1/version HTTP/1.1\r\n"
            f"User-Agent: {opa_user_agent(version, os_name, arch, rng)}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n"
        ).encode()
        requests.append(head + host + b"\r\n" + body)
    return requests


def check_request(target: Target) -> bytes:
    """OPA >= 1.7's anonymous GitHub-style release check."""
    return (
        f"GET {target.prefix}{CHECK_PATH} HTTP/1.1\r\nHost: {target.host}:{target.port}\r\n"
        "User-Agent: OPA-Version-Checker\r\n\r\n"
    ).encode()


# -- the wire -------------------------------------------------------------------------------------


class BadAnswerError(Exception):
    """The server's answer is not valid HTTP, or not the answer a report expects."""


class HttpConnection(asyncio.Protocol):
    """One keep-alive HTTP/1.1 connection with at most one request in flight."""

    def __init__(self) -> None:
        self._transport: asyncio.Transport | None = None
        self._buffer = bytearray()
        self._waiter: asyncio.Future[tuple[int, bytes]] | None = None
        self.closed = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_exception(exc or ConnectionResetError("connection closed"))

    def data_received(self, data: bytes) -> None:
        self._buffer += data
        if self._waiter is None or self._waiter.done():
            return
        try:
            answer = self._parse()
        except BadAnswerError as exc:
            self._waiter.set_exception(exc)
            return
        if answer is not None:
            self._waiter.set_result(answer)

    def _parse(self) -> tuple[int, bytes] | None:
        end = self._buffer.find(b"\r\n\r\n")
        if end < 0:
            if len(self._buffer) > 65536:
                raise BadAnswerError("header too long")
            return None
        head = bytes(self._buffer[:end]).split(b"\r\n")
        status_line = head[0].split(b" ", 2)
        if len(status_line) < 2 or not status_line[0].startswith(b"HTTP/1."):
            raise BadAnswerError("not an HTTP/1.x status line")
        try:
            status = int(status_line[1])
        except ValueError:
            raise BadAnswerError("status is not a number") from None
        length = None
        for line in head[1:]:
            name, _, value = line.partition(b":")
            name = name.strip().lower()
            if name == b"content-length":
                length = int(value)
            elif name == b"transfer-encoding" and b"chunked" in value.lower():
                return self._parse_chunked(status, end + 4)
        if length is None:
            raise BadAnswerError("answer without Content-Length")
        if len(self._buffer) < end + 4 + length:
            return None
        body = bytes(self._buffer[end + 4 : end + 4 + length])
        del self._buffer[: end + 4 + length]
        return status, body

    def _parse_chunked(self, status: int, start: int) -> tuple[int, bytes] | None:
        position, body = start, bytearray()
        while True:
            line_end = self._buffer.find(b"\r\n", position)
            if line_end < 0:
                return None
            size = int(bytes(self._buffer[position:line_end]).split(b";")[0], 16)
            if len(self._buffer) < line_end + 2 + size + 2:
                return None
            body += self._buffer[line_end + 2 : line_end + 2 + size]
            position = line_end + 2 + size + 2
            if size == 0:
                del self._buffer[:position]
                return status, bytes(body)

    async def request(self, data: bytes) -> tuple[int, bytes]:
        """Send one request and wait for its complete answer: (status, body)."""
        if self._transport is None or self.closed:
            raise ConnectionResetError("connection closed")
        self._waiter = asyncio.get_running_loop().create_future()
        self._transport.write(data)
        return await self._waiter

    def close(self) -> None:
        if self._transport is not None:
            self._transport.close()


async def connect(target: Target) -> HttpConnection:
    loop = asyncio.get_running_loop()
    _, protocol = await loop.create_connection(HttpConnection, target.host, target.port)
    return protocol


# -- running --------------------------------------------------------------------------------------


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
    live: bool = False


@dataclass
class Result:
    """What one run measured. Latencies are in microseconds in ``histogram``."""

    duration: float = 0.0
    sent: int = 0
    reports_ok: int = 0
    statuses: Counter[int] = field(default_factory=Counter)
    errors: Counter[str] = field(default_factory=Counter)
    histogram: HdrHistogram = field(default_factory=lambda: HdrHistogram(1, HISTOGRAM_MAX_US, 3))

    def merge(self, other: Result) -> None:
        self.duration = max(self.duration, other.duration)
        self.sent += other.sent
        self.reports_ok += other.reports_ok
        self.statuses.update(other.statuses)
        self.errors.update(other.errors)
        self.histogram.add(other.histogram)

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
            "reports_acknowledged": self.reports_ok,
        }


class _Run:
    """The state of one process's load: request tickets, the stop time, the counters."""

    def __init__(self, config: LoadConfig) -> None:
        self.config = config
        self.result = Result()
        self.rng = random.Random(config.seed)  # noqa: S311 - load mix, not secrets
        self.check = check_request(config.target)
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
        reuse, or None after an error closed it. Records the latency from ``started_ns``."""
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
            if status == 200 and data is not self.check:
                if body.startswith(b'{"latest"'):
                    result.reports_ok += 1
                else:
                    result.errors["bad answer"] += 1
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
    requests = build_requests(config.target, max(count, config.concurrency), config.seed)
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
    result = _run_in_loop(config, uvloop)
    return {"duration": result.duration, "sent": result.sent, "reports_ok": result.reports_ok,
            "statuses": dict(result.statuses), "errors": dict(result.errors),
            "histogram": result.histogram.encode()}  # fmt: skip


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
        piece = Result(part["duration"], part["sent"], part["reports_ok"],
                       Counter(part["statuses"]), Counter(part["errors"]),
                       HdrHistogram.decode(part["histogram"]))  # fmt: skip
        merged.merge(piece)
    return merged


# -- the command ----------------------------------------------------------------------------------


def format_summary(summary: dict[str, Any], config: LoadConfig, processes: int) -> str:
    mode = (f"open loop at {config.rate:g} req/s over up to {config.concurrency} connections"
            if config.rate else f"closed loop, {config.concurrency} connections")  # fmt: skip
    lat = summary["latency_ms"]

    def cell(value: float | None) -> str:
        return "-" if value is None else f"{value:.2f}"

    statuses = "  ".join(f"{k}: {v:,}" for k, v in summary["statuses"].items()) or "none"
    errors = "  ".join(f"{k}: {v:,}" for k, v in summary["errors"].items()) or "none"
    return "\n".join([
        f"target      {config.target.url}  ({mode}, {processes} process(es))",
        f"duration    {summary['duration_s']:.2f} s",
        f"requests    {summary['completed']:,} answered of {summary['requests']:,} sent"
        f"  ({summary['throughput_rps']:,.1f} req/s)",
        f"latency ms  p50 {cell(lat['p50'])}  p90 {cell(lat['p90'])}  p99 {cell(lat['p99'])}"
        f"  p99.9 {cell(lat['p99.9'])}  max {cell(lat['max'])}",
        f"statuses    {statuses}",
        f"errors      {errors}",
        f"stored      {summary['reports_acknowledged']:,} reports acknowledged with 200"
        " (the server must have stored each)",
    ])  # fmt: skip


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="opa-telemetry-loadtest",
        description="Load-test an OPA-compatible telemetry server with simulated reporters.",
    )
    parser.add_argument("url", help="server base URL, e.g. http://127.0.0.1:9181")
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument(
        "--concurrency",
        type=int,
        default=64,
        help="closed loop: connections, each sending as soon as answered (64)",
    )
    mode.add_argument("--rate", type=float, help="open loop: requests per second, on a schedule")
    parser.add_argument(
        "--connections", type=int, default=256, help="open loop: most connections in flight (256)"
    )
    parser.add_argument("--duration", type=float, help="seconds to run (default 10)")
    parser.add_argument("--requests", type=int, help="stop after this many requests")
    parser.add_argument(
        "--instances", type=int, help="distinct simulated instances (default: 4 per connection)"
    )
    parser.add_argument(
        "--check-ratio",
        type=float,
        default=0.0,
        help="fraction of requests that are OPA >= 1.7 release checks (0)",
    )
    parser.add_argument(
        "--processes",
        type=int,
        default=1,
        help="load-generating processes; their histograms are merged (1)",
    )
    parser.add_argument("--timeout", type=float, default=5.0, help="seconds per request (5)")
    parser.add_argument("--seed", type=int, help="random seed, for a repeatable fleet")
    parser.add_argument(
        "--json", metavar="PATH", help="also write the result as JSON ('-': stdout)"
    )
    parser.add_argument(
        "--allow-remote", action="store_true", help="allow a target outside the loopback range"
    )
    parser.add_argument("--no-uvloop", action="store_true", help="use the stdlib event loop")
    return parser  # fmt: skip


def config_from_args(args: argparse.Namespace, live: bool) -> LoadConfig:
    """A validated :class:`LoadConfig`; raises LoadTestError for out-of-range values."""
    duration = args.duration if args.duration is not None else (
        None if args.requests is not None else 10.0)  # fmt: skip
    problems = []
    if duration is not None and not 0 < duration <= MAX_DURATION:
        problems.append(f"--duration must be in (0, {MAX_DURATION:g}]")
    if args.requests is not None and args.requests < 1:
        problems.append("--requests must be at least 1")
    if args.rate is not None and args.rate <= 0:
        problems.append("--rate must be positive")
    if args.instances is not None and not 1 <= args.instances <= 1_000_000:
        problems.append("--instances must be between 1 and 1,000,000")
    if args.concurrency < 1 or args.connections < 1 or args.processes < 1:
        problems.append("--concurrency, --connections and --processes must be at least 1")
    if not 0 <= args.check_ratio <= 1:
        problems.append("--check-ratio must be between 0 and 1")
    if args.timeout <= 0:
        problems.append("--timeout must be positive")
    if problems:
        raise LoadTestError("; ".join(problems))
    target = parse_target(args.url)
    if not args.allow_remote:
        check_loopback(target.host)
    return LoadConfig(
        target=target,
        concurrency=args.connections if args.rate else args.concurrency,
        rate=args.rate,
        duration=duration,
        requests=args.requests,
        instances=args.instances,
        check_ratio=args.check_ratio,
        timeout=args.timeout,
        seed=args.seed,
        live=live,
    )


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``opa-telemetry-loadtest``; returns the exit status."""
    args = build_parser().parse_args(argv)
    try:
        config = config_from_args(args, live=sys.stderr.isatty())
    except LoadTestError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    result = run_processes(config, args.processes, use_uvloop=not args.no_uvloop)
    summary = result.summary()
    print(format_summary(summary, config, args.processes))
    if args.json:
        document = {"config": {**asdict(config), "target": config.target.url,
                               "processes": args.processes}, **summary}  # fmt: skip
        text = json.dumps(document, indent=1)
        if args.json == "-":
            print(text)
        else:
            Path(args.json).write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
