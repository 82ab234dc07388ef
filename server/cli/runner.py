"""Running the server: one process, or a supervisor with ``--workers N`` processes on one
port (SO_REUSEPORT) that start and stop together. ``cli`` parses the settings and hands them
here; nothing here reads argv or the environment.
"""

from __future__ import annotations

import asyncio
import logging
import multiprocessing
import multiprocessing.connection
import os
import shutil
import signal
import socket
import sys
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import replace
from multiprocessing.process import BaseProcess

from opa_telemetry_server import __version__
from opa_telemetry_server.errors import TelemetryError, describe
from opa_telemetry_server.settings import Settings
from opa_telemetry_server.web.tls import server_tls_context

logger = logging.getLogger(__name__)

# prometheus-client's switch to multiprocess mode: the directory the workers share, handed to
# the spawned workers through their environment.
MULTIPROCESS_ENV = "PROMETHEUS_MULTIPROC_DIR"
ORPHAN_CHECK_INTERVAL = 1.0  # seconds between a worker's checks that its supervisor lives


def run_server(settings: Settings) -> int:
    """Serve ``settings`` until SIGINT/SIGTERM; returns the exit status."""
    _configure_logging(settings)
    if settings.workers > 1:
        return _supervise(settings)
    with asyncio.Runner(loop_factory=_loop_factory(settings.fast)) as runner:
        runner.run(serve(settings))
    return 0


def _configure_logging(settings: Settings) -> None:
    logging.basicConfig(
        level=settings.log_level.upper(),
        format="%(asctime)s %(levelname)s %(processName)s %(name)s: %(message)s",
    )


def _supervise(settings: Settings) -> int:
    """Run ``settings.workers`` server processes on one port and stop them together.

    The database is migrated and seeded here, once, before any worker starts. Returns 0 when
    every worker exited cleanly after SIGINT/SIGTERM, 1 if one died on its own (the others are
    then stopped too, so a process manager can restart the whole server).
    """
    from opa_telemetry_server.services.retention import aggregate_now
    from opa_telemetry_server.web.app import prepare_database

    server_tls_context(settings)  # each worker loads its own; a bad file stops us here, once
    asyncio.run(prepare_database(settings))
    reserved = None
    if settings.port == 0:  # pick the port here so that every worker binds the same one
        reserved = socket.socket(socket.AF_INET6 if ":" in settings.host else socket.AF_INET)
        reserved.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        reserved.bind((settings.host, 0))
        settings = replace(settings, port=reserved.getsockname()[1])
    # One private directory where every worker's metrics live, so that a scrape of any worker
    # adds up all of them (prometheus-client's multiprocess mode reads it from the environment
    # the spawned workers inherit, before their first import of it).
    metrics_dir = tempfile.TemporaryDirectory(prefix="opa-telemetry-metrics-")
    previous_env = os.environ.get(MULTIPROCESS_ENV)
    os.environ[MULTIPROCESS_ENV] = metrics_dir.name
    context = multiprocessing.get_context("spawn")
    # One pipe per worker for its "listening" (or why it could not start): no lock shared
    # between processes, so a worker stopped at any moment cannot block another's message.
    pipes = [context.Pipe(duplex=False) for _ in range(settings.workers)]
    workers = [
        context.Process(target=_worker, args=(settings, index, pipes[index][1], metrics_dir.name),
                        name=f"worker{index}", daemon=True)
        for index in range(settings.workers)
    ]  # fmt: skip
    stopping = False

    def stop(signum: int, frame: object) -> None:
        nonlocal stopping
        stopping = True

    previous = {sig: signal.signal(sig, stop) for sig in (signal.SIGINT, signal.SIGTERM)}
    started = 0
    try:
        for worker in workers:
            worker.start()
        for _, sender in pipes:
            sender.close()  # the worker holds its end; ours would hide its exit from recv()
        waiting = {receiver: index for index, (receiver, _) in enumerate(pipes)}
        started = 0
        while waiting and not stopping:
            readable = multiprocessing.connection.wait(list(waiting), timeout=0.2)
            for receiver in [r for r in waiting if r in readable]:
                index = waiting.pop(receiver)
                try:
                    news = receiver.recv()
                except EOFError:
                    news = f"worker {index} exited while starting"
                if isinstance(news, str):  # a worker could not start, and says why
                    _stop_workers(workers, settings, code=1)
                    raise TelemetryError(news)
                started += 1
        if started == len(workers):
            _print_ready(f"{_scheme(settings)}://{settings.host}:{settings.port}{settings.prefix}")
        while not stopping:
            multiprocessing.connection.wait([w.sentinel for w in workers], timeout=0.5)
            if not stopping and any(not w.is_alive() for w in workers):
                logger.error("a worker exited unexpectedly; stopping the others")
                return _stop_workers(workers, settings, code=1)
        return _stop_workers(workers, settings, code=0)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        if reserved is not None:
            reserved.close()
        if previous_env is None:
            os.environ.pop(MULTIPROCESS_ENV, None)
        else:
            os.environ[MULTIPROCESS_ENV] = previous_env
        metrics_dir.cleanup()
        if started == len(workers):
            # Every worker has drained: the aggregates now include each acknowledged report.
            try:
                asyncio.run(aggregate_now(settings, migrate=False))
            except Exception as exc:  # noqa: BLE001 - the server has stopped; say so and go
                logger.warning("statistics aggregation after the workers stopped: %s", exc)


def _stop_workers(workers: Sequence[BaseProcess], settings: Settings, code: int) -> int:
    for worker in workers:
        if worker.is_alive() and worker.pid is not None:
            os.kill(worker.pid, signal.SIGTERM)
    for worker in workers:
        worker.join(settings.shutdown_timeout + 5)
        if worker.is_alive():
            logger.error("%s did not stop in time; killing it", worker.name)
            worker.kill()
            worker.join()
            code = 1
        elif worker.exitcode not in (0, -signal.SIGTERM):
            code = 1
    return code


def _worker(
    settings: Settings,
    index: int,
    ready: multiprocessing.connection.Connection,
    metrics_dir: str,
) -> None:
    """One worker process: serve on the shared port until SIGTERM (or SIGINT). It sends its
    index once it listens, or the one-line reason it could not start."""
    _configure_logging(settings)
    supervisor = os.getppid()
    try:
        with asyncio.Runner(loop_factory=_loop_factory(settings.fast)) as runner:
            runner.run(
                serve(settings, lambda _: ready.send(index), worker=index, reuse_port=True,
                      metrics_dir=metrics_dir, supervisor=supervisor)
            )  # fmt: skip
    except (TelemetryError, OSError) as exc:
        ready.send(f"worker {index}: {describe(exc)}")
        sys.exit(1)
    finally:
        ready.close()
        if os.getppid() != supervisor:  # it was killed: nobody else will remove our metrics
            shutil.rmtree(metrics_dir, ignore_errors=True)


def _loop_factory(fast: bool) -> Callable[[], asyncio.AbstractEventLoop] | None:
    if fast and sys.platform != "win32":
        try:
            import uvloop
        except ImportError:
            return None
        factory: Callable[[], asyncio.AbstractEventLoop] = uvloop.new_event_loop
        return factory
    return None


async def serve(
    settings: Settings,
    ready: Callable[[str], None] | None = None,
    *,
    worker: int = 0,
    reuse_port: bool = False,
    metrics_dir: str | None = None,
    supervisor: int | None = None,
) -> None:
    """Serve until SIGINT or SIGTERM, then stop accepting, drain the queue and return.

    ``ready`` receives the base URL once the socket listens (default: print it): ``https://``
    when ``settings`` name a TLS certificate (raises :class:`TlsError` if it cannot be used).
    ``supervisor``: a worker's parent pid; if that process goes away without stopping us (it
    was killed), we stop too, the same graceful way, rather than serve on as an orphan.
    """
    from aiohttp import web

    from opa_telemetry_server.web.app import create_app, runner_options

    tls = server_tls_context(settings)  # before anything else: a bad file is a one-line error
    # Handlers first: a SIGTERM that arrives while we start (or right after "listening") must
    # still mean "drain and exit 0", never the default of dying on the spot.
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)
    watchdog = None
    if supervisor is not None:
        watchdog = asyncio.create_task(_stop_when_orphaned(supervisor, stop))
    try:
        app = create_app(settings, worker=worker, metrics_dir=metrics_dir)
        runner = web.AppRunner(
            app,
            handle_signals=False,
            shutdown_timeout=settings.shutdown_timeout,
            **runner_options(settings),
        )
        await runner.setup()
        try:
            site = web.TCPSite(
                runner, settings.host, settings.port, ssl_context=tls,
                reuse_port=reuse_port or None,
            )  # fmt: skip
            await site.start()
            host, port = runner.addresses[0][:2]
            (ready or _print_ready)(f"{_scheme(settings)}://{host}:{port}{settings.prefix}")
            await stop.wait()
            logger.info("shutting down: finishing in-flight requests")
        finally:
            await runner.cleanup()
    finally:
        for signum in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(signum)
        if watchdog is not None:
            watchdog.cancel()
            await asyncio.gather(watchdog, return_exceptions=True)
    logger.info("stopped")


async def _stop_when_orphaned(supervisor: int, stop: asyncio.Event) -> None:
    """Set ``stop`` once our parent is no longer ``supervisor`` (checked every second)."""
    while os.getppid() == supervisor:  # noqa: ASYNC110 - a parent dying sends no event
        await asyncio.sleep(ORPHAN_CHECK_INTERVAL)
    logger.warning("the supervisor is gone; stopping this worker")
    stop.set()


def _scheme(settings: Settings) -> str:
    return "https" if settings.tls_cert else "http"


def _print_ready(url: str) -> None:
    print(f"opa-telemetry-server {__version__} listening on {url}", flush=True)
