"""``opa-telemetry-server``: serve, manage the release catalog, print statistics.

The only module that reads ``sys.argv`` or ``os.environ``. Every ``serve`` flag comes from a
:class:`Settings` field and can also be set by its env var (``OPA_TELEMETRY_SERVER_<NAME>``);
a flag beats the env var, which beats the default.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
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
import traceback
from collections.abc import Callable, Coroutine, Mapping, Sequence
from dataclasses import asdict, fields, replace
from datetime import UTC, date, datetime, timedelta
from multiprocessing.process import BaseProcess
from pathlib import Path
from typing import Any, NoReturn, TypeVar

from aiohttp import web

from . import __version__
from .app import create_app, open_storage, prepare_database, purge_expired, runner_options
from .errors import CatalogError, TelemetryError, UsageError
from .http_errors import ACCESS_LOG_FORMAT
from .protocol import DEFAULT_PRODUCT
from .releases import Release, release_from_mapping, releases_from_json
from .settings import Settings, env_name
from .storage import Day, PurgeResult, Stats, Storage, existing_shards

logger = logging.getLogger(__name__)
T = TypeVar("T")
_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off", ""}


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``opa-telemetry-server`` console script; returns the exit status.

    Every failure is one line on stderr: exit 2 for a usage error (a bad flag or env var),
    1 for a runtime failure; ``--debug`` adds the traceback.
    """
    parser = build_parser(os.environ)
    args = parser.parse_args(argv)
    try:
        result: int = args.run(args)
    except UsageError as exc:
        return _fail(args, f"{exc}", 2)
    except BrokenPipeError:
        # ``releases list | head``: the reader left; say nothing and let the pipe go quietly.
        with contextlib.suppress(OSError):
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except (TelemetryError, OSError) as exc:
        return _fail(args, _describe(exc), 1)
    except KeyboardInterrupt:
        return 130
    except Exception as exc:  # noqa: BLE001 - a bug: still one line, the traceback on --debug
        return _fail(args, f"unexpected {type(exc).__name__}: {exc} (--debug shows where)", 1)
    return result


def _fail(args: argparse.Namespace, message: str, code: int) -> int:
    if getattr(args, "debug", False):
        traceback.print_exc()
    print(f"error: {message}", file=sys.stderr)
    return code


def _describe(exc: BaseException) -> str:
    """One line for an error: an OSError names its file and says what went wrong in words."""
    if isinstance(exc, OSError) and exc.strerror:
        where = f"{exc.filename}: " if exc.filename else ""
        return f"{where}{exc.strerror.lower()}"
    return str(exc)


class _Parser(argparse.ArgumentParser):
    """argparse, with usage errors on one line (``error: --days: expected ...``), exit 2."""

    def error(self, message: str) -> NoReturn:
        message = message.removeprefix("argument ")
        self.exit(2, f"error: {message} (see {self.prog} --help)\n")


def build_parser(environ: Mapping[str, str]) -> argparse.ArgumentParser:
    """The whole command line. ``environ`` supplies defaults through the settings' env vars;
    a bad value there is only reported by a subcommand that reads that setting."""
    parser = _Parser(
        prog="opa-telemetry-server",
        description="OPA-compatible version-check and anonymous telemetry server.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    parser.add_argument("--debug", action="store_true", help="print tracebacks of failures")
    commands = parser.add_subparsers(
        dest="command", required=True, metavar="COMMAND", parser_class=_Parser
    )

    serve = commands.add_parser("serve", help="run the HTTP server")
    add_settings_flags(serve, environ)
    serve.set_defaults(run=_run_serve)

    releases = commands.add_parser("releases", help="manage the release catalog")
    actions = releases.add_subparsers(
        dest="action", required=True, metavar="ACTION", parser_class=_Parser
    )

    def catalog_command(name: str, help: str, run: Callable[[argparse.Namespace], int]) -> Any:
        command = actions.add_parser(name, help=help)
        add_settings_flags(command, environ, STORAGE_SETTINGS)
        command.add_argument("--product", default=DEFAULT_PRODUCT, help="product (default: opa)")
        command.set_defaults(run=run)
        return command

    listing = catalog_command("list", "list releases, newest first", _run_releases_list)
    listing.add_argument("--json", action="store_true", help="print JSON")

    latest = catalog_command("latest", "print the latest release", _run_releases_latest)
    latest.add_argument("--json", action="store_true", help="print JSON")

    add = catalog_command("add", "add one release", _run_releases_add)
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

    imports = catalog_command(
        "import", "add or update releases from a JSON file", _run_releases_import
    )
    imports.add_argument("file", type=Path, help="JSON array in the bundled catalog's shape")

    remove = catalog_command("remove", "remove one release", _run_releases_remove)
    remove.add_argument("tag")

    stats = commands.add_parser("stats", help="instances per version and platform")
    add_settings_flags(stats, environ, STORAGE_SETTINGS)
    stats.add_argument("--product", default=DEFAULT_PRODUCT, help="product (default: opa)")
    stats.add_argument("--days", type=positive_int, default=7, help="last N UTC days (7)")
    stats.add_argument("--json", action="store_true", help="print JSON")
    stats.add_argument(
        "--daily", action="store_true",
        help="instances and reports per day, including days already rolled up by retention",
    )  # fmt: skip
    stats.set_defaults(run=_run_stats)

    purge = commands.add_parser(
        "purge", help="roll up and delete raw rows older than the retention period"
    )
    add_settings_flags(purge, environ, (*STORAGE_SETTINGS, "retention_days"))
    purge.add_argument(  # the historical spelling of --retention-days
        "--days", dest="retention_days", type=_settings_type(int), help=argparse.SUPPRESS
    )
    purge.add_argument(
        "--dry-run", action="store_true", help="only print what would be rolled up and deleted"
    )
    purge.set_defaults(run=_run_purge)
    return parser


# The settings every command that opens the database reads.
STORAGE_SETTINGS = ("db", "busy_timeout", "synchronous")


class _FromEnv:
    """A setting's raw env var value, converted (and checked) only by a command that uses it."""

    __slots__ = ("name", "raw")

    def __init__(self, name: str, raw: str) -> None:
        self.name, self.raw = name, raw

    def __repr__(self) -> str:
        return f"{self.name}={self.raw!r}"


_EXPECTED = {bool: "true or false", int: "a whole number", float: "a number", str: "text"}


def _settings_type(kind: type) -> Callable[[str], Any]:
    """An argparse ``type`` whose error reads naturally: ``--port: expected a whole number``."""

    def convert(text: str) -> Any:
        try:
            return _from_env(kind, text)
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"expected {_EXPECTED.get(kind, kind.__name__)}, not {text!r}"
            ) from None

    return convert


def positive_int(text: str) -> int:
    """An argparse ``type`` for counts such as ``--days``."""
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive whole number, not {text!r}")
    return value


def add_settings_flags(
    parser: argparse.ArgumentParser,
    environ: Mapping[str, str],
    names: Sequence[str] | None = None,
) -> None:
    """Give ``parser`` a flag for each named :class:`Settings` field (all when ``names`` is
    None): ``--max-body-bytes`` for ``max_body_bytes``, defaulting to its env var
    (``OPA_TELEMETRY_SERVER_MAX_BODY_BYTES``), else the field's default.

    This is the one path from argv and env to settings for every subcommand; read the result
    with :func:`settings_from_args`.
    """
    wanted = set(names) if names is not None else None
    used = []
    for spec in fields(Settings):
        if wanted is not None and spec.name not in wanted:
            continue
        used.append(spec.name)
        flag = "--" + spec.name.replace("_", "-")
        env = env_name(spec.name)
        kind = type(spec.default)
        default: Any = _FromEnv(env, environ[env]) if env in environ else spec.default
        help_text = f"{spec.metadata['help']} (env {env}; default: {spec.default})"
        if kind is bool:
            parser.add_argument(
                flag, action=argparse.BooleanOptionalAction, default=default, help=help_text
            )
        else:
            parser.add_argument(flag, type=_settings_type(kind), default=default, help=help_text)
    if wanted is not None and (unknown := wanted.difference(used)):
        raise ValueError(f"not settings: {', '.join(sorted(unknown))}")
    parser.set_defaults(settings_fields=tuple(used))


def _from_env(kind: type, raw: str) -> Any:
    if kind is bool:
        if raw.strip().lower() in _TRUE:
            return True
        if raw.strip().lower() in _FALSE:
            return False
        raise ValueError(raw)
    return kind(raw.strip())


def settings_from_args(args: argparse.Namespace) -> Settings:
    """The frozen settings named by parsed arguments (fields the command has no flag for keep
    their defaults). Raises :class:`UsageError` naming every bad value or env var."""
    values: dict[str, Any] = {}
    problems = []
    kinds = {spec.name: type(spec.default) for spec in fields(Settings)}
    for name in args.settings_fields:
        value = getattr(args, name)
        if isinstance(value, _FromEnv):
            try:
                value = _from_env(kinds[name], value.raw)
            except ValueError:
                expected = _EXPECTED.get(kinds[name], kinds[name].__name__)
                problems.append(f"{value!r}: expected {expected}")
                continue
        values[name] = value
    if not problems:
        try:
            return Settings(**values)
        except ValueError as exc:
            problems.append(str(exc))
    raise UsageError("; ".join(problems))


# -- serve ------------------------------------------------------------------------------------


def _run_serve(args: argparse.Namespace) -> int:
    settings = settings_from_args(args)
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
                news = ready.get(timeout=0.2)
                if isinstance(news, str):  # a worker could not start, and says why
                    _stop_workers(workers, settings, code=1)
                    raise TelemetryError(news)
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


def _worker(settings: Settings, index: int, ready: multiprocessing.queues.Queue[int | str]) -> None:
    """One worker process: serve on the shared port until SIGTERM (or SIGINT). It reports
    its index once it listens, or the one-line reason it could not start."""
    _configure_logging(settings)
    try:
        with asyncio.Runner(loop_factory=_loop_factory(settings.fast)) as runner:
            runner.run(serve(settings, lambda _: ready.put(index), worker=index, reuse_port=True))
    except (TelemetryError, OSError) as exc:
        ready.put(f"worker {index}: {_describe(exc)}")
        sys.exit(1)


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
            access_log=logging.getLogger("aiohttp.access") if settings.access_log else None,
            access_log_format=ACCESS_LOG_FORMAT,
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


def _with_storage(args: argparse.Namespace, work: Callable[[Storage], Coroutine[Any, Any, T]]) -> T:
    """Run ``work`` on the command's existing database, opened without migrating it."""
    settings = settings_from_args(args)

    async def run() -> T:
        storage = await open_storage(settings, settings.db, migrate=False)
        try:
            return await work(storage)
        finally:
            await storage.close()

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

    releases = _with_storage(args, work)
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

    release = _with_storage(args, work)
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

    _with_storage(args, work)
    print(f"added {args.product} {release.tag}")
    return 0


def _run_releases_import(args: argparse.Namespace) -> int:
    releases = releases_from_json(args.file.read_bytes())

    async def work(storage: Storage) -> tuple[int, int]:
        return await storage.import_releases(args.product, releases)

    added, updated = _with_storage(args, work)
    print(f"{args.product}: {added} added, {updated} updated, {len(releases)} read")
    return 0


def _run_releases_remove(args: argparse.Namespace) -> int:
    async def work(storage: Storage) -> bool:
        return await storage.remove_release(args.product, args.tag)

    if not _with_storage(args, work):
        raise CatalogError(f"{args.product} {args.tag} is not in the catalog")
    print(f"removed {args.product} {args.tag}")
    return 0


def _print_daily(args: argparse.Namespace, since: str) -> int:
    shards = existing_shards(settings_from_args(args).db)

    async def work(storage: Storage) -> list[Day]:
        return await storage.daily(args.product, since, shards)

    days = _with_storage(args, work)
    if args.json:
        print(json.dumps([asdict(day) for day in days], indent=1))
        return 0
    print(f"{'DAY (UTC)':<12} {'INSTANCES':>9} {'REPORTS':>9}  SOURCE")
    for day in days:
        print(f"{day.day:<12} {day.instances:>9} {day.reports:>9}  {day.source}")
    return 0


def _run_purge(args: argparse.Namespace) -> int:
    settings = settings_from_args(args)
    if settings.retention_days == 0:
        print("retention_days is 0 (keep forever): nothing to purge")
        return 0

    def announce(expired: PurgeResult, before: str) -> None:
        if not expired.days:
            print(f"nothing to purge: no raw rows before {before}")
            return
        verb = "would roll up" if args.dry_run else "rolling up"
        print(
            f"{verb} {expired.days} days before {before} and delete their"
            f" {expired.rows_deleted} raw rows (retention {settings.retention_days} days)",
            flush=True,
        )

    result = asyncio.run(purge_expired(settings, announce=announce, dry_run=args.dry_run))
    if result.days:
        print(f"{result.days} days rolled up, {result.rows_deleted} raw rows deleted")
    return 0


def _run_stats(args: argparse.Namespace) -> int:
    since = (datetime.now(UTC).date() - timedelta(days=args.days - 1)).isoformat()

    if args.daily:
        return _print_daily(args, since)
    shards = existing_shards(settings_from_args(args).db)

    async def work(storage: Storage) -> Stats:
        return await storage.stats(args.product, since, shards)

    stats = _with_storage(args, work)
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
