"""``opa-telemetry-server``: serve, manage the release catalog, print statistics.

The only module that reads ``sys.argv`` or ``os.environ``. Every ``serve`` flag comes from a
:class:`Settings` field and can also be set by its env var (``OPA_TELEMETRY_SERVER_<NAME>``);
a flag beats the env var, which beats the default.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import multiprocessing
import multiprocessing.connection
import multiprocessing.queues
import os
import queue
import signal
import socket
import sys
from collections.abc import Callable, Coroutine, Mapping, Sequence
from dataclasses import asdict, fields, replace
from datetime import UTC, date, datetime, timedelta
from multiprocessing.process import BaseProcess
from pathlib import Path
from typing import Any, TypeVar

from aiohttp import web

from . import __version__
from .app import create_app, prepare_database, purge_expired, runner_options
from .errors import CatalogError, SchemaError, TelemetryError
from .protocol import DEFAULT_PRODUCT
from .releases import Release, release_from_mapping, releases_from_json
from .settings import DEFAULT_DB, Settings, env_name
from .storage import Day, Stats, Storage, existing_shards

logger = logging.getLogger(__name__)
T = TypeVar("T")
_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off", ""}


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``opa-telemetry-server`` console script; returns the exit status."""
    parser = build_parser(os.environ)
    args = parser.parse_args(argv)
    try:
        result: int = args.run(args)
    except (TelemetryError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    return result


def build_parser(environ: Mapping[str, str]) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="opa-telemetry-server",
        description="OPA-compatible version-check and anonymous telemetry server.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    serve = commands.add_parser("serve", help="run the HTTP server")
    _add_settings_flags(serve, environ)
    serve.set_defaults(run=_run_serve)

    db_default = environ.get(env_name("db"), DEFAULT_DB)
    db_help = f"SQLite database (env {env_name('db')}; default {DEFAULT_DB})"

    releases = commands.add_parser("releases", help="manage the release catalog")
    actions = releases.add_subparsers(dest="action", required=True, metavar="ACTION")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--db", default=db_default, help=db_help)
    common.add_argument("--product", default=DEFAULT_PRODUCT, help="product (default: opa)")

    listing = actions.add_parser("list", parents=[common], help="list releases, newest first")
    listing.add_argument("--json", action="store_true", help="print JSON")
    listing.set_defaults(run=_run_releases_list)

    latest = actions.add_parser("latest", parents=[common], help="print the latest release")
    latest.add_argument("--json", action="store_true", help="print JSON")
    latest.set_defaults(run=_run_releases_latest)

    add = actions.add_parser("add", parents=[common], help="add one release")
    add.add_argument("tag", help="release tag, e.g. v1.21.0")
    add.add_argument("--notes", help="release notes URL (default: OPA's GitHub release page)")
    add.add_argument(
        "--asset",
        action="append",
        default=[],
        metavar="NAME",
        help="asset name (opa_linux_amd64) or full URL; repeat for each",
    )
    add.add_argument("--published", help="release date, YYYY-MM-DD (default: today)")
    add.add_argument("--prerelease", action="store_true", help="never offer it as latest")
    add.add_argument("--replace", action="store_true", help="overwrite an existing tag")
    add.set_defaults(run=_run_releases_add)

    imports = actions.add_parser(
        "import", parents=[common], help="add or update releases from a JSON file"
    )
    imports.add_argument("file", type=Path, help="JSON array in the bundled catalog's shape")
    imports.set_defaults(run=_run_releases_import)

    remove = actions.add_parser("remove", parents=[common], help="remove one release")
    remove.add_argument("tag")
    remove.set_defaults(run=_run_releases_remove)

    stats = commands.add_parser(
        "stats", parents=[common], help="instances per version and platform"
    )
    stats.add_argument("--days", type=_positive_int, default=7, help="last N UTC days (7)")
    stats.add_argument("--json", action="store_true", help="print JSON")
    stats.add_argument(
        "--daily", action="store_true",
        help="instances and reports per day, including days already rolled up by retention",
    )  # fmt: skip
    stats.set_defaults(run=_run_stats)

    purge = commands.add_parser(
        "purge", help="roll up and delete raw rows older than the retention period"
    )
    purge.add_argument("--db", default=db_default, help=db_help)
    purge.add_argument(
        "--days", type=_positive_int,
        default=int(environ.get(env_name("retention_days"), 90)),
        help=f"keep this many UTC days of raw rows (env {env_name('retention_days')}; 90)",
    )  # fmt: skip
    purge.set_defaults(run=_run_purge)
    return parser


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError("must be at least 1")
    return value


def _add_settings_flags(parser: argparse.ArgumentParser, environ: Mapping[str, str]) -> None:
    for spec in fields(Settings):
        flag = "--" + spec.name.replace("_", "-")
        env = env_name(spec.name)
        kind = type(spec.default)
        default = spec.default
        if env in environ:
            try:
                default = _from_env(kind, environ[env])
            except ValueError:
                parser.error(f"{env}={environ[env]!r} is not a valid {kind.__name__}")
        help_text = f"{spec.metadata['help']} (env {env}; default: {spec.default})"
        if kind is bool:
            parser.add_argument(
                flag, action=argparse.BooleanOptionalAction, default=default, help=help_text
            )
        else:
            parser.add_argument(flag, type=kind, default=default, help=help_text)


def _from_env(kind: type, raw: str) -> Any:
    if kind is bool:
        if raw.strip().lower() in _TRUE:
            return True
        if raw.strip().lower() in _FALSE:
            return False
        raise ValueError(raw)
    return kind(raw)


def settings_from_args(args: argparse.Namespace) -> Settings:
    """The frozen settings named by parsed ``serve`` arguments; raises ValueError if invalid."""
    return Settings(**{spec.name: getattr(args, spec.name) for spec in fields(Settings)})


# -- serve ------------------------------------------------------------------------------------


def _run_serve(args: argparse.Namespace) -> int:
    try:
        settings = settings_from_args(args)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
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
    asyncio.run(prepare_database(settings))
    reserved = None
    if settings.port == 0:  # pick the port here so that every worker binds the same one
        reserved = socket.socket(socket.AF_INET6 if ":" in settings.host else socket.AF_INET)
        reserved.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        reserved.bind((settings.host, 0))
        settings = replace(settings, port=reserved.getsockname()[1])
    context = multiprocessing.get_context("spawn")
    ready = context.Queue()
    workers = [
        context.Process(target=_worker, args=(settings, index, ready),
                        name=f"worker{index}", daemon=True)
        for index in range(settings.workers)
    ]  # fmt: skip
    stopping = False

    def stop(signum: int, frame: object) -> None:
        nonlocal stopping
        stopping = True

    previous = {sig: signal.signal(sig, stop) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        for worker in workers:
            worker.start()
        started = 0
        while started < len(workers) and not stopping:
            try:
                ready.get(timeout=0.2)
                started += 1
            except queue.Empty:
                if any(not w.is_alive() for w in workers):
                    logger.error("a worker failed to start")
                    return _stop_workers(workers, settings, code=1)
        if started == len(workers):
            _print_ready(f"http://{settings.host}:{settings.port}{settings.prefix}")
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


def _worker(settings: Settings, index: int, ready: multiprocessing.queues.Queue[int]) -> None:
    """One worker process: serve on the shared port until SIGTERM (or SIGINT)."""
    _configure_logging(settings)
    with asyncio.Runner(loop_factory=_loop_factory(settings.fast)) as runner:
        runner.run(serve(settings, lambda _: ready.put(index), worker=index, reuse_port=True))


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
) -> None:
    """Serve until SIGINT or SIGTERM, then stop accepting, drain the queue and return.

    ``ready`` receives the base URL once the socket listens (default: print it).
    """
    # Handlers first: a SIGTERM that arrives while we start (or right after "listening") must
    # still mean "drain and exit 0", never the default of dying on the spot.
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)
    try:
        app = create_app(settings, worker=worker)
        runner = web.AppRunner(
            app,
            handle_signals=False,
            shutdown_timeout=settings.shutdown_timeout,
            **runner_options(settings),
        )
        await runner.setup()
        try:
            site = web.TCPSite(runner, settings.host, settings.port, reuse_port=reuse_port or None)
            await site.start()
            host, port = runner.addresses[0][:2]
            (ready or _print_ready)(f"http://{host}:{port}{settings.prefix}")
            await stop.wait()
            logger.info("shutting down: finishing in-flight requests")
        finally:
            await runner.cleanup()
    finally:
        for signum in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(signum)
    logger.info("stopped")


def _print_ready(url: str) -> None:
    print(f"opa-telemetry-server {__version__} listening on {url}", flush=True)


# -- releases and stats -------------------------------------------------------------------------


def _with_storage(db: str, work: Callable[[Storage], Coroutine[Any, Any, T]]) -> T:
    async def run() -> T:
        storage = await Storage.open(db)
        try:
            return await work(storage)
        finally:
            await storage.close()

    if not Path(db).exists():
        raise SchemaError(f"{db}: no such database (start the server once, or check --db)")
    return asyncio.run(run())


def _release_json(release: Release) -> dict[str, Any]:
    return {
        "tag": release.tag,
        "published": release.published.isoformat() if release.published else None,
        "release_notes": release.release_notes,
        "assets": list(release.assets),
        "prerelease": release.prerelease,
    }


def _run_releases_list(args: argparse.Namespace) -> int:
    async def work(storage: Storage) -> Sequence[Release]:
        return (await storage.load_catalog()).releases(args.product)

    releases = _with_storage(args.db, work)
    if args.json:
        print(json.dumps([_release_json(r) for r in releases], indent=1))
        return 0
    print(f"{'TAG':<16} {'PUBLISHED':<10}  ASSETS")
    for r in releases:
        flag = " (pre-release)" if r.prerelease else ""
        day = r.published.isoformat() if r.published else "-"
        print(f"{r.tag:<16} {day:<10}  {len(r.assets)}{flag}")
    print(f"{len(releases)} releases of {args.product}")
    return 0


def _run_releases_latest(args: argparse.Namespace) -> int:
    async def work(storage: Storage) -> Release | None:
        return (await storage.load_catalog()).latest(args.product)

    release = _with_storage(args.db, work)
    if release is None:
        print(f"error: no release of {args.product} in the catalog", file=sys.stderr)
        return 1
    print(json.dumps(_release_json(release), indent=1) if args.json else release.tag)
    return 0


def _run_releases_add(args: argparse.Namespace) -> int:
    entry = {
        "tag": args.tag,
        "release_notes": args.notes,
        "assets": args.asset,
        "published": args.published or date.today().isoformat(),
        "prerelease": args.prerelease,
    }
    release = release_from_mapping(entry)

    async def work(storage: Storage) -> None:
        await storage.add_release(args.product, release, replace=args.replace)

    _with_storage(args.db, work)
    print(f"added {args.product} {release.tag}")
    return 0


def _run_releases_import(args: argparse.Namespace) -> int:
    releases = releases_from_json(args.file.read_bytes())

    async def work(storage: Storage) -> tuple[int, int]:
        return await storage.import_releases(args.product, releases)

    added, updated = _with_storage(args.db, work)
    print(f"{args.product}: {added} added, {updated} updated, {len(releases)} read")
    return 0


def _run_releases_remove(args: argparse.Namespace) -> int:
    async def work(storage: Storage) -> bool:
        return await storage.remove_release(args.product, args.tag)

    if not _with_storage(args.db, work):
        raise CatalogError(f"{args.product} {args.tag} is not in the catalog")
    print(f"removed {args.product} {args.tag}")
    return 0


def _print_daily(args: argparse.Namespace, since: str) -> int:
    async def work(storage: Storage) -> list[Day]:
        return await storage.daily(args.product, since, existing_shards(args.db))

    days = _with_storage(args.db, work)
    if args.json:
        print(json.dumps([asdict(day) for day in days], indent=1))
        return 0
    print(f"{'DAY (UTC)':<12} {'INSTANCES':>9} {'REPORTS':>9}  SOURCE")
    for day in days:
        print(f"{day.day:<12} {day.instances:>9} {day.reports:>9}  {day.source}")
    return 0


def _run_purge(args: argparse.Namespace) -> int:
    if not Path(args.db).exists():
        raise SchemaError(f"{args.db}: no such database")
    settings = Settings(db=args.db, retention_days=args.days)
    result = asyncio.run(purge_expired(settings))
    print(f"{result.days} days rolled up, {result.rows_deleted} raw rows deleted")
    return 0


def _run_stats(args: argparse.Namespace) -> int:
    since = (datetime.now(UTC).date() - timedelta(days=args.days - 1)).isoformat()

    if args.daily:
        return _print_daily(args, since)

    async def work(storage: Storage) -> Stats:
        return await storage.stats(args.product, since, existing_shards(args.db))

    stats = _with_storage(args.db, work)
    if args.json:
        print(json.dumps(asdict(stats), indent=1))
        return 0
    print(
        f"{stats.product} since {stats.since} (UTC): {stats.instances} instances,"
        f" {stats.reports} reports, {stats.version_checks} release checks"
    )
    print(f"\n{'VERSION':<24} {'INSTANCES':>9} {'REPORTS':>9}")
    for v in stats.by_version:
        print(f"{v.version:<24} {v.instances:>9} {v.reports:>9}")
    print(f"\n{'OS':<10} {'ARCH':<10} {'INSTANCES':>9}")
    for p in stats.by_platform:
        print(f"{p.os:<10} {p.arch:<10} {p.instances:>9}")
    return 0
