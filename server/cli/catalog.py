"""The ``releases`` and ``advisories`` commands: the catalog, its policy, GitHub sync, OSV."""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable, Mapping
from datetime import UTC, date, datetime
from typing import TYPE_CHECKING, Any

from opa_telemetry_server.cli.arguments import (
    STORAGE_SETTINGS,
    Parser,
    add_product_flag,
    add_settings_flags,
    percentage,
    read_input,
    settings_from_args,
    settings_type,
    with_github_token,
    with_storage,
)
from opa_telemetry_server.domain.advisories import advisories_from_json
from opa_telemetry_server.domain.releases import check_url, release_from_mapping, releases_from_json
from opa_telemetry_server.domain.versions import VersionError, parse_version
from opa_telemetry_server.errors import CatalogError, SyncError, UsageError
from opa_telemetry_server.services.catalog import Catalog, load_catalog
from opa_telemetry_server.settings import Settings
from opa_telemetry_server.storage import Storage

if TYPE_CHECKING:
    from opa_telemetry_server.services.sync import SyncResult


# What `releases sync` reads, and the short spellings of its flags.
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


def add_commands(commands: Any, environ: Mapping[str, str]) -> None:
    """Add ``releases`` and ``advisories`` to the top-level subcommands."""
    releases = commands.add_parser("releases", help="manage the release catalog")
    actions = releases.add_subparsers(
        dest="action", required=True, metavar="ACTION", parser_class=Parser
    )

    def catalog_command(name: str, help: str, run: Callable[[argparse.Namespace], int]) -> Any:
        return _product_command(actions, environ, name, help, run)

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
            sync.add_argument(alias, dest=name, type=settings_type(kind),
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
    rollout.add_argument("percent", type=percentage, help="0 to 100")

    support = catalog_command(
        "support", "tell instances below a version that it is unsupported", _run_releases_support
    )
    group = support.add_mutually_exclusive_group(required=True)
    group.add_argument("--min-version", metavar="VERSION", help="lowest supported version")
    group.add_argument("--clear", action="store_true", help="remove the minimum version")
    support.add_argument("--notice", metavar="URL", help="a page explaining the support policy")

    advisories = commands.add_parser("advisories", help="manage security advisories (OSV)")
    advisory_actions = advisories.add_subparsers(
        dest="action", required=True, metavar="ACTION", parser_class=Parser
    )

    def advisory_command(name: str, help: str, run: Callable[[argparse.Namespace], int]) -> Any:
        return _product_command(advisory_actions, environ, name, help, run)

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


def _product_command(
    actions: Any,
    environ: Mapping[str, str],
    name: str,
    help: str,
    run: Callable[[argparse.Namespace], int],
) -> Any:
    """An action of ``releases`` or ``advisories``: the database's settings and ``--product``."""
    command = actions.add_parser(name, help=help, description=help)
    add_settings_flags(command, environ, STORAGE_SETTINGS)
    add_product_flag(command)
    command.set_defaults(run=run)
    return command


def _catalog(args: argparse.Namespace) -> Catalog:
    return with_storage(args, load_catalog)


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

    added = with_storage(args, work)
    print(f"{'added' if added else 'replaced'} {args.product} {release.tag}")
    return 0


def _run_releases_import(args: argparse.Namespace) -> int:
    parsed = releases_from_json(read_input(args.file), args.product)

    async def work(storage: Storage) -> tuple[int, int]:
        return await storage.import_releases(args.product, parsed.releases)

    added, updated = with_storage(args, work)
    drafts = f", {parsed.drafts_skipped} drafts skipped" if parsed.drafts_skipped else ""
    print(f"{args.product}: {added} added, {updated} replaced,"
          f" {len(parsed.releases)} read{drafts}")  # fmt: skip
    return 0


def _run_releases_remove(args: argparse.Namespace) -> int:
    async def work(storage: Storage) -> bool:
        return await storage.remove_release(args.product, args.tag)

    if not with_storage(args, work):
        raise CatalogError(f"{args.product} {args.tag} is not in the catalog")
    print(f"removed {args.product} {args.tag}")
    return 0


def _run_releases_sync(args: argparse.Namespace) -> int:
    from opa_telemetry_server.services.sync import (  # an HTTP client: imported only to sync
        sync_product,
        sync_target,
    )

    settings = with_github_token(settings_from_args(args), os.environ)
    target = sync_target(settings)

    async def work(storage: Storage) -> SyncResult:
        return await sync_product(storage, target)

    try:
        result = with_storage(args, work)
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

    catalog, state = with_storage(args, work)
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

    with_storage(args, work)
    print(f"pinned {args.product} to {args.tag}: nothing newer is announced")
    return 0


def _run_releases_unpin(args: argparse.Namespace) -> int:
    async def work(storage: Storage) -> None:
        await storage.set_product_policy(args.product, pinned_tag=None)

    with_storage(args, work)
    print(f"unpinned {args.product}: the newest release is announced")
    return 0


def _run_releases_yank(args: argparse.Namespace) -> int:
    async def work(storage: Storage) -> bool:
        return await storage.set_release_policy(
            args.product, args.tag, yanked=True, reason=args.reason
        )

    changed = with_storage(args, work)
    print(f"yanked {args.product} {args.tag}" + ("" if changed else " (already yanked)"))
    return 0


def _run_releases_unyank(args: argparse.Namespace) -> int:
    async def work(storage: Storage) -> bool:
        return await storage.set_release_policy(args.product, args.tag, yanked=False)

    changed = with_storage(args, work)
    print(f"unyanked {args.product} {args.tag}" + ("" if changed else " (was not yanked)"))
    return 0


def _run_releases_rollout(args: argparse.Namespace) -> int:
    percent = None if args.percent == 100 else args.percent

    async def work(storage: Storage) -> bool:
        return await storage.set_release_policy(args.product, args.tag, rollout_percent=percent)

    with_storage(args, work)
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

    with_storage(args, work)
    if minimum is None:
        print(f"{args.product}: no minimum supported version")
    else:
        print(f"{args.product}: versions below {minimum} are told they are unsupported")
    return 0


def _run_advisories_import(args: argparse.Namespace) -> int:
    advisories = advisories_from_json(read_input(args.file))

    async def work(storage: Storage) -> tuple[int, int]:
        return await storage.import_advisories(args.product, advisories)

    added, updated = with_storage(args, work)
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

    if not with_storage(args, work):
        raise CatalogError(f"advisory {args.id} of {args.product} is not stored")
    print(f"removed advisory {args.id} of {args.product}")
    return 0
