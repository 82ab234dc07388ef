"""``opa-telemetry-server``: serve, manage the release catalog, print statistics.

The only module that reads ``sys.argv`` or ``os.environ``. Every ``serve`` flag comes from a
:class:`Settings` field and can also be set by its env var (``OPA_TELEMETRY_SERVER_<NAME>``);
a flag beats the env var, which beats the default. The web stack (aiohttp, the app) is
imported only by the commands that need it, so that ``stats`` and ``releases`` start fast.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import sys
import traceback
from collections.abc import Callable, Coroutine, Mapping, Sequence
from dataclasses import fields, replace
from datetime import UTC, date, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn, TypeVar

from . import __version__
from .advisories import advisories_from_json
from .catalog import Catalog, load_catalog
from .errors import (
    CatalogError,
    QueryError,
    SyncError,
    TelemetryError,
    UsageError,
    describe,
)
from .insights import (
    DEFAULT_DAYS,
    MAX_DAYS,
    parse_stats_query,
    products_document,
    stats_document,
    utc_today,
)
from .protocol import DEFAULT_PRODUCT, product_slug
from .releases import check_url, release_from_mapping, releases_from_json
from .settings import Settings, env_name, is_loopback_url
from .storage import ProductCounts, PurgeResult, Storage, open_storage

if TYPE_CHECKING:
    from .sync import SyncResult
from .versions import VersionError, parse_version

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
        return _fail(args, describe(exc), 1)
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
        command = actions.add_parser(name, help=help, description=help)
        add_settings_flags(command, environ, STORAGE_SETTINGS)
        _add_product_flag(command)
        command.set_defaults(run=run)
        return command

    listing = catalog_command("list", "list releases, newest first", _run_releases_list)
    listing.add_argument("--json", action="store_true", help="print JSON")

    latest = catalog_command(
        "latest", "print the release offered as latest (after pin, yanks and rollouts)",
        _run_releases_latest,
    )  # fmt: skip
    latest.add_argument("--json", action="store_true", help="print JSON")

    add = catalog_command("add", "add one release", _run_releases_add)
    add.add_argument("tag", help="release tag, e.g. v1.21.0")
    add.add_argument(
        "--notes", metavar="URL",
        help="release notes URL (required except for opa, whose default is its GitHub page)",
    )  # fmt: skip
    add.add_argument(
        "--asset", action="append", default=[], metavar="ASSET",
        help="a full URL whose file name ends in _<os>_<arch> (myapp_linux_amd64.tar.gz),"
        " OS/ARCH=URL to give the platform, or for opa a bare name (opa_linux_amd64);"
        " repeat for each",
    )  # fmt: skip
    add.add_argument("--published", help="release date, YYYY-MM-DD (default: today)")
    add.add_argument("--prerelease", action="store_true", help="never offer it as latest")
    add.add_argument("--replace", action="store_true", help="overwrite an existing tag")

    imports = catalog_command(
        "import", "add or update releases from a JSON file", _run_releases_import
    )
    imports.add_argument(
        "file",
        help="JSON file ('-' reads standard input): an array or one object, in the bundled"
        " catalog's shape or GitHub's release JSON (drafts are skipped)",
    )

    remove = catalog_command("remove", "remove one release", _run_releases_remove)
    remove.add_argument("tag")

    sync = actions.add_parser(
        "sync", help="add and update releases from GitHub's release list (or another server's)"
    )
    add_settings_flags(sync, environ, (*STORAGE_SETTINGS, *SYNC_SETTINGS))
    for alias, name in SYNC_ALIASES.items():  # the short spellings of the sync_* settings
        kind = type(Settings.__dataclass_fields__[name].default)
        if kind is bool:
            sync.add_argument(alias, dest=name, action="store_true", default=argparse.SUPPRESS,
                              help=f"same as --{name.replace('_', '-')}")  # fmt: skip
        else:
            sync.add_argument(alias, dest=name, type=_settings_type(kind),
                              default=argparse.SUPPRESS,
                              help=f"same as --{name.replace('_', '-')}")  # fmt: skip
    sync.set_defaults(run=_run_releases_sync)

    catalog_command("status", "show the policy and the last sync", _run_releases_status)

    pin = catalog_command("pin", "announce nothing newer than TAG", _run_releases_pin)
    pin.add_argument("tag")
    catalog_command("unpin", "announce the newest release again", _run_releases_unpin)

    yank = catalog_command(
        "yank", "never offer TAG; tell instances running it to move", _run_releases_yank
    )
    yank.add_argument("tag")
    yank.add_argument("--reason", default="", help="why, shown to instances running it")
    unyank = catalog_command("unyank", "offer TAG again", _run_releases_unyank)
    unyank.add_argument("tag")

    rollout = catalog_command(
        "rollout", "offer TAG to PERCENT of instances (100: everyone)", _run_releases_rollout
    )
    rollout.add_argument("tag")
    rollout.add_argument("percent", type=_percent, help="0 to 100")

    support = catalog_command(
        "support", "tell instances below a version that it is unsupported", _run_releases_support
    )
    group = support.add_mutually_exclusive_group(required=True)
    group.add_argument("--min-version", metavar="VERSION", help="lowest supported version")
    group.add_argument("--clear", action="store_true", help="remove the minimum version")
    support.add_argument("--notice", metavar="URL", help="a page explaining the support policy")

    advisories = commands.add_parser("advisories", help="manage security advisories (OSV)")
    advisory_actions = advisories.add_subparsers(
        dest="action", required=True, metavar="ACTION", parser_class=_Parser
    )

    def advisory_command(name: str, help: str, run: Callable[[argparse.Namespace], int]) -> Any:
        command = advisory_actions.add_parser(name, help=help, description=help)
        add_settings_flags(command, environ, STORAGE_SETTINGS)
        _add_product_flag(command)
        command.set_defaults(run=run)
        return command

    advisory_import = advisory_command(
        "import", "add or replace advisories from OSV JSON", _run_advisories_import
    )
    advisory_import.add_argument(
        "file", help="a JSON array of OSV records (or one record); '-' reads standard input"
    )
    advisory_list = advisory_command("list", "list advisories", _run_advisories_list)
    advisory_list.add_argument("--json", action="store_true", help="print the OSV records")
    advisory_remove = advisory_command("remove", "remove one advisory", _run_advisories_remove)
    advisory_remove.add_argument("id")

    stats = commands.add_parser(
        "stats", help="fleet statistics: instances per day, version and platform"
    )
    add_settings_flags(stats, environ, (*STORAGE_SETTINGS, "min_group_size"))
    _add_product_flag(stats)
    stats.add_argument(
        "--days", type=positive_int, default=DEFAULT_DAYS,
        help=f"the last N UTC days, today included (1-{MAX_DAYS}; default {DEFAULT_DAYS})",
    )  # fmt: skip
    stats.add_argument(
        "--json", action="store_true", help="print the JSON document GET /v1/stats answers"
    )
    stats.add_argument("--daily", action="store_true", help="print one line per day")
    stats.add_argument(
        "--refresh", action="store_true",
        help="first bring the aggregates up to date from new reports (the server does this"
        " every --stats-interval seconds and when it stops)",
    )  # fmt: skip
    stats.add_argument(
        "--public", action="store_true",
        help="what anyone sees with --public-stats: groups under --min-group-size as 'other'",
    )  # fmt: skip
    stats.set_defaults(run=_run_stats)

    products = commands.add_parser(
        "products", help="the products the server knows, with release and report counts"
    )
    add_settings_flags(products, environ, STORAGE_SETTINGS)
    products.add_argument(
        "--json", action="store_true", help="print the JSON document GET /v1/products answers"
    )
    products.set_defaults(run=_run_products)

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

    backup = commands.add_parser(
        "backup", help="copy the database and its worker shards, safely while the server runs"
    )
    add_settings_flags(backup, environ, STORAGE_SETTINGS)
    backup.add_argument(
        "dest", type=Path, metavar="DEST",
        help="file (or folder) for the copy of the database; shard copies go beside it",
    )  # fmt: skip
    backup.add_argument("--force", action="store_true", help="overwrite an existing copy")
    backup.set_defaults(run=_run_backup)

    copy = commands.add_parser(
        "import-sqlite",
        help="copy a SQLite database (and its worker shards) into a new PostgreSQL database",
    )
    add_settings_flags(copy, environ, ("db", "busy_timeout"))
    copy.add_argument(
        "source", type=Path, metavar="SQLITE_DB",
        help="the SQLite database to copy (stop its server first, or back it up and copy that)",
    )  # fmt: skip
    copy.set_defaults(run=_run_import_sqlite)
    return parser


# The settings every command that opens the database reads.
STORAGE_SETTINGS = ("db", "busy_timeout", "synchronous")
SYNC_SETTINGS = (
    "sync_product",
    "sync_repo",
    "sync_api_url",
    "sync_include_prereleases",
    "sync_prune",
    "sync_token",
)
SYNC_ALIASES = {
    "--product": "sync_product",
    "--repo": "sync_repo",
    "--api-url": "sync_api_url",
    "--include-prereleases": "sync_include_prereleases",
    "--prune": "sync_prune",
}
GITHUB_TOKEN_ENV = "GITHUB_TOKEN"  # noqa: S105 - the variable's name, not a token
GITHUB_API = "https://api.github.com"


def product_name(text: str) -> str:
    """An argparse ``type`` for ``--product``: the product's slug (``OtherApp`` ->
    ``otherapp``), made by the same function as a User-Agent's, so names match
    case-insensitively everywhere."""
    slug = product_slug(text)
    if not slug:
        raise argparse.ArgumentTypeError(f"expected a product name, not {text!r}")
    return slug


def _add_product_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--product", type=product_name, default=DEFAULT_PRODUCT,
        help="product (default: opa); compared case-insensitively, as its slug",
    )  # fmt: skip


def _percent(text: str) -> int:
    if not text.isdigit() or not 0 <= int(text) <= 100:
        raise argparse.ArgumentTypeError(f"expected a whole number from 0 to 100, not {text!r}")
    return int(text)


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
    from .runner import run_server

    return run_server(with_github_token(settings_from_args(args), os.environ))


# -- releases and stats -------------------------------------------------------------------------


def _with_storage(args: argparse.Namespace, work: Callable[[Storage], Coroutine[Any, Any, T]]) -> T:
    """Run ``work`` on the command's existing database, opened without migrating it."""
    settings = settings_from_args(args)

    async def run() -> T:
        storage = await open_storage(settings, migrate=False)
        try:
            return await work(storage)
        finally:
            await storage.close()

    return asyncio.run(run())


def _catalog(args: argparse.Namespace) -> Catalog:
    return _with_storage(args, load_catalog)


def _warn_if_unknown(catalog: Catalog, product: str) -> None:
    if not catalog.releases(product):
        known = ", ".join(sorted(catalog.products())) or "none"
        print(f"warning: no releases of {product} (products with releases: {known})",
              file=sys.stderr)  # fmt: skip


def _run_releases_list(args: argparse.Namespace) -> int:
    catalog = _catalog(args)
    releases = catalog.releases(args.product)
    _warn_if_unknown(catalog, args.product)
    policy = catalog.policy(args.product)
    if args.json:
        print(json.dumps([r.to_json() for r in releases], indent=1))
        return 0
    print(f"{'TAG':<16} {'PUBLISHED':<10}  ASSETS")
    for r in releases:
        notes = []
        if r.prerelease:
            notes.append("pre-release")
        if r.tag in policy.yanked:
            notes.append("yanked")
        if r.tag in policy.rollouts:
            notes.append(f"rollout {policy.rollouts[r.tag]}%")
        if r.tag == policy.pinned:
            notes.append("pinned")
        flag = f" ({', '.join(notes)})" if notes else ""
        day = r.published.isoformat() if r.published else "-"
        print(f"{r.tag:<16} {day:<10}  {len(r.assets)}{flag}")
    print(f"{len(releases)} releases of {args.product}")
    return 0


def _run_releases_latest(args: argparse.Namespace) -> int:
    catalog = _catalog(args)
    release = catalog.latest(args.product)
    if release is None:
        _warn_if_unknown(catalog, args.product)
        raise CatalogError(f"no release of {args.product} is offered")
    print(json.dumps(release.to_json(), indent=1) if args.json else release.tag)
    return 0


def _asset_argument(text: str) -> str | dict[str, str]:
    """``--asset``: a name or URL as is; ``OS/ARCH=URL`` as an explicit-platform asset."""
    platform, sep, url = text.partition("=")
    if sep and "/" in platform and "://" not in platform:
        os_name, _, arch = platform.partition("/")
        return {"url": url, "os": os_name, "arch": arch}
    return text


def _run_releases_add(args: argparse.Namespace) -> int:
    entry: dict[str, Any] = {
        "tag": args.tag,
        "assets": [_asset_argument(a) for a in args.asset],
        "published": args.published or date.today().isoformat(),
        "prerelease": args.prerelease,
    }
    if args.notes is not None:
        entry["release_notes"] = args.notes
    release = release_from_mapping(entry, args.product)

    async def work(storage: Storage) -> bool:
        return await storage.add_release(args.product, release, replace=args.replace)

    added = _with_storage(args, work)
    print(f"{'added' if added else 'replaced'} {args.product} {release.tag}")
    return 0


def _read_input(name: str) -> bytes:
    """A file's bytes, or standard input's for ``-``."""
    return sys.stdin.buffer.read() if name == "-" else Path(name).read_bytes()


def _run_releases_import(args: argparse.Namespace) -> int:
    parsed = releases_from_json(_read_input(args.file), args.product)

    async def work(storage: Storage) -> tuple[int, int]:
        return await storage.import_releases(args.product, parsed.releases)

    added, updated = _with_storage(args, work)
    drafts = f", {parsed.drafts_skipped} drafts skipped" if parsed.drafts_skipped else ""
    print(f"{args.product}: {added} added, {updated} replaced,"
          f" {len(parsed.releases)} read{drafts}")  # fmt: skip
    return 0


def _run_releases_remove(args: argparse.Namespace) -> int:
    async def work(storage: Storage) -> bool:
        return await storage.remove_release(args.product, args.tag)

    if not _with_storage(args, work):
        raise CatalogError(f"{args.product} {args.tag} is not in the catalog")
    print(f"removed {args.product} {args.tag}")
    return 0


def with_github_token(settings: Settings, environ: Mapping[str, str]) -> Settings:
    """``settings`` with the sync token from ``$GITHUB_TOKEN`` when the setting has none and
    the sync reads GitHub itself: a token meant for GitHub never goes to another server (a
    chain's outer server, say; a stand-in on this host is fine). For any other API, name the
    token with ``--sync-token``."""
    if settings.sync_token or not environ.get(GITHUB_TOKEN_ENV):
        return settings
    url = settings.sync_api_url.rstrip("/")
    if url != GITHUB_API and not (url.startswith("http://") and is_loopback_url(url)):
        return settings
    return replace(settings, sync_token=environ[GITHUB_TOKEN_ENV])


def _run_releases_sync(args: argparse.Namespace) -> int:
    from .sync import sync_product, sync_target  # an HTTP client: imported only to sync

    settings = with_github_token(settings_from_args(args), os.environ)
    target = sync_target(settings)

    async def work(storage: Storage) -> SyncResult:
        return await sync_product(storage, target)

    try:
        result = _with_storage(args, work)
    except SyncError as exc:
        raise SyncError(f"sync of {target.product} from {target.source} failed: {exc}") from None
    print(result.describe(target.product))
    return 0


def _when(at: int | None) -> str:
    if at is None:
        return "never"
    return datetime.fromtimestamp(at, UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


def _run_releases_status(args: argparse.Namespace) -> int:
    async def work(storage: Storage) -> tuple[Catalog, Any]:
        return await load_catalog(storage), await storage.sync_state(args.product)

    catalog, state = _with_storage(args, work)
    product = args.product
    policy = catalog.policy(product)
    latest = catalog.latest(product)
    print(f"product:      {product}")
    print(f"releases:     {len(catalog.releases(product))}")
    print(f"latest:       {latest.tag if latest else '-'} (offered to callers without an id)")
    print(f"pinned:       {policy.pinned or '-'}")
    print(f"min version:  {policy.min_version.text if policy.min_version else '-'}")
    print(f"notice:       {policy.notice or '-'}")
    for tag, reason in sorted(policy.yanked.items()):
        print(f"yanked:       {tag}{f' ({reason})' if reason else ''}")
    for tag, percent in sorted(policy.rollouts.items()):
        print(f"rollout:      {tag} at {percent}%")
    print(f"advisories:   {len(catalog.advisories(product))}")
    if state is None:
        print("last sync:    never")
        return 0
    print(f"sync source:  {state.source}")
    print(f"last attempt: {_when(state.last_attempt_at)}")
    print(f"last success: {_when(state.last_success_at)}")
    print(f"etag:         {state.etag or '-'}")
    if state.last_error:
        print(f"last error:   {_when(state.last_error_at)}: {state.last_error}")
    if state.retry_after_at:
        print(f"retry after:  {_when(state.retry_after_at)}")
    return 0


def _require_release(storage_catalog: Catalog, product: str, tag: str) -> None:
    if not any(r.tag == tag for r in storage_catalog.releases(product)):
        raise CatalogError(f"{product} {tag} is not in the catalog")


def _run_releases_pin(args: argparse.Namespace) -> int:
    async def work(storage: Storage) -> None:
        _require_release(await load_catalog(storage), args.product, args.tag)
        await storage.set_product_policy(args.product, pinned_tag=args.tag)

    _with_storage(args, work)
    print(f"pinned {args.product} to {args.tag}: nothing newer is announced")
    return 0


def _run_releases_unpin(args: argparse.Namespace) -> int:
    async def work(storage: Storage) -> None:
        await storage.set_product_policy(args.product, pinned_tag=None)

    _with_storage(args, work)
    print(f"unpinned {args.product}: the newest release is announced")
    return 0


def _run_releases_yank(args: argparse.Namespace) -> int:
    async def work(storage: Storage) -> bool:
        return await storage.set_release_policy(
            args.product, args.tag, yanked=True, reason=args.reason
        )

    changed = _with_storage(args, work)
    print(f"yanked {args.product} {args.tag}" + ("" if changed else " (already yanked)"))
    return 0


def _run_releases_unyank(args: argparse.Namespace) -> int:
    async def work(storage: Storage) -> bool:
        return await storage.set_release_policy(args.product, args.tag, yanked=False)

    changed = _with_storage(args, work)
    print(f"unyanked {args.product} {args.tag}" + ("" if changed else " (was not yanked)"))
    return 0


def _run_releases_rollout(args: argparse.Namespace) -> int:
    percent = None if args.percent == 100 else args.percent

    async def work(storage: Storage) -> bool:
        return await storage.set_release_policy(args.product, args.tag, rollout_percent=percent)

    _with_storage(args, work)
    print(f"{args.product} {args.tag} is offered to {args.percent}% of instances")
    return 0


def _run_releases_support(args: argparse.Namespace) -> int:
    minimum = None
    if args.min_version is not None:
        try:
            minimum = parse_version(args.min_version).text
        except VersionError as exc:
            raise UsageError(
                f"--min-version: {args.min_version!r} is not a version ({exc})"
            ) from None
    notice = None
    if args.notice is not None:
        try:
            notice = check_url(args.notice)
        except ValueError as exc:
            raise UsageError(f"--notice: {exc}") from None

    async def work(storage: Storage) -> None:
        await storage.set_product_policy(args.product, min_version=minimum, support_notice=notice)

    _with_storage(args, work)
    if minimum is None:
        print(f"{args.product}: no minimum supported version")
    else:
        print(f"{args.product}: versions below {minimum} are told they are unsupported")
    return 0


def _run_advisories_import(args: argparse.Namespace) -> int:
    advisories = advisories_from_json(_read_input(args.file))

    async def work(storage: Storage) -> tuple[int, int]:
        return await storage.import_advisories(args.product, advisories)

    added, updated = _with_storage(args, work)
    print(f"{args.product}: {added} advisories added, {updated} replaced, {len(advisories)} read")
    return 0


def _run_advisories_list(args: argparse.Namespace) -> int:
    advisories = _catalog(args).advisories(args.product)
    if args.json:
        print(json.dumps([a.record for a in advisories], indent=1))
        return 0
    print(f"{'ID':<22} {'SEVERITY':<9} {'FIXED':<16} SUMMARY")
    for a in advisories:
        fixed = ", ".join(sorted({e[2] for r in a.ranges for e in r.events if e[0] == "fixed"}))
        print(f"{a.id:<22} {a.severity or '-':<9} {fixed or '-':<16} {a.summary[:70]}")
    print(f"{len(advisories)} advisories of {args.product}")
    return 0


def _run_advisories_remove(args: argparse.Namespace) -> int:
    async def work(storage: Storage) -> bool:
        return await storage.remove_advisory(args.product, args.id)

    if not _with_storage(args, work):
        raise CatalogError(f"advisory {args.id} of {args.product} is not stored")
    print(f"removed advisory {args.id} of {args.product}")
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

    from .retention import purge_expired

    result = asyncio.run(purge_expired(settings, announce=announce, dry_run=args.dry_run))
    if result.days:
        print(f"{result.days} days rolled up, {result.rows_deleted} raw rows deleted")
    return 0


def _run_backup(args: argparse.Namespace) -> int:
    settings = settings_from_args(args)
    from .storage import backup_database

    written = asyncio.run(backup_database(settings, args.dest, force=args.force))
    for file in written:
        print(f"wrote {file.copy} ({file.size} bytes), a snapshot of {file.source}")
    print(
        f"backup complete: {len(written)} file{'s' if len(written) > 1 else ''}. To restore: stop"
        " the server, copy each file back to the name it is a snapshot of, start the server."
    )
    return 0


def _run_import_sqlite(args: argparse.Namespace) -> int:
    settings = settings_from_args(args)
    from .storage import import_sqlite

    def progress(table: str, rows: int) -> None:
        print(f"\r{table}: {rows} rows", end="\x1b[K", file=sys.stderr, flush=True)

    counts, target = asyncio.run(import_sqlite(settings, args.source, progress))
    print(file=sys.stderr)
    for table, rows in counts.items():
        print(f"{table}: {rows} rows")
    print(f"copied {args.source} into {target}; point every server at it with --db")
    return 0


def _run_stats(args: argparse.Namespace) -> int:
    """The statistics document, built by the same code as ``GET /v1/stats``."""
    try:
        query = parse_stats_query({"product": args.product, "days": str(args.days)})
    except QueryError as exc:
        raise UsageError("; ".join(f"--{detail}" for detail in exc.details)) from None
    settings = settings_from_args(args)
    if args.refresh:
        from .retention import aggregate_now

        asyncio.run(aggregate_now(settings, migrate=False))

    async def work(storage: Storage) -> tuple[dict[str, Any], list[ProductCounts]]:
        catalog = await load_catalog(storage)
        minimum = settings.min_group_size if args.public else 0
        document = await stats_document(storage, catalog, query, min_group_size=minimum)
        return document, await storage.products(utc_today().isoformat())

    document, products = _with_storage(args, work)
    _warn_about_stats(document, products)
    if args.json:
        print(json.dumps(document, indent=1))
    elif args.daily:
        _print_daily(document)
    else:
        _print_stats(document)
    return 0


def _warn_about_stats(document: dict[str, Any], products: Sequence[ProductCounts]) -> None:
    """A warning line on stderr when the product has no releases or no reports."""
    product = document["product"]
    known = ", ".join(p.product for p in products) or "none"
    counts = next((p for p in products if p.product == product), None)
    if counts is None or not counts.releases:
        print(f"warning: {product} has no releases in the catalog (products: {known})",
              file=sys.stderr)  # fmt: skip
    if counts is None or not counts.reports:
        print(f"warning: no reports from {product} have been aggregated (products: {known})",
              file=sys.stderr)  # fmt: skip


def _print_stats(document: dict[str, Any]) -> None:
    instances = document["instances"]
    print(
        f"{document['product']}, {document['since']} to {document['until']}"
        f" ({document['days']} UTC days; aggregated {document['aggregated_at'] or 'never'})"
    )
    print(
        f"instances a day (distinct ids: process runs): {instances['average_daily']:g} average,"
        f" {instances['peak_daily']} peak, {instances['latest_day']} on {document['until']}"
    )
    print(
        f"{document['reports']} reports, {document['version_checks']} release checks;"
        f" latest release {document['latest_release'] or 'unknown'}"
    )
    print(f"\n{'VERSION':<24} {'INSTANCES/DAY':>13} {'REPORTS':>10}")
    for v in document["by_version"]:
        print(f"{v['version']:<24} {v['instances']:>13g} {v['reports']:>10}")
    print(f"\n{'OS':<10} {'ARCH':<10} {'INSTANCES/DAY':>13}")
    for p in document["by_platform"]:
        print(f"{p['os']:<10} {p['arch']:<10} {p['instances']:>13g}")


def _print_daily(document: dict[str, Any]) -> None:
    print(f"{'DAY (UTC)':<12} {'INSTANCES':>9} {'REPORTS':>9} {'CHECKS':>7} {'OUT OF DATE':>11}")
    for day in document["daily"]:
        share = f"{day['out_of_date_share']:.1%}" if day["instances"] else "-"
        print(
            f"{day['day']:<12} {day['instances']:>9} {day['reports']:>9}"
            f" {day['version_checks']:>7} {share:>11}"
        )


def _run_products(args: argparse.Namespace) -> int:
    async def work(storage: Storage) -> list[ProductCounts]:
        return await storage.products(utc_today().isoformat())

    products = _with_storage(args, work)
    if args.json:
        print(json.dumps(products_document(products), indent=1))
        return 0
    print(f"{'PRODUCT':<24} {'RELEASES':>8} {'REPORTS':>10} {'INSTANCES TODAY':>15}")
    for p in products:
        print(f"{p.product:<24} {p.releases:>8} {p.reports:>10} {p.instances_today:>15}")
    return 0
