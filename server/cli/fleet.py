"""The fleet's data: ``stats``, ``products``, ``purge``, ``backup`` and ``import-sqlite``."""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from opa_telemetry_server.cli.arguments import (
    STORAGE_SETTINGS,
    add_product_flag,
    add_settings_flags,
    positive_int,
    settings_from_args,
    settings_type,
    with_storage,
)
from opa_telemetry_server.errors import QueryError, UsageError
from opa_telemetry_server.services.catalog import load_catalog
from opa_telemetry_server.services.insights import (
    DEFAULT_DAYS,
    MAX_DAYS,
    parse_stats_query,
    products_document,
    stats_document,
    utc_today,
)
from opa_telemetry_server.storage import ProductCounts, PurgeResult, Storage


def add_commands(commands: Any, environ: Mapping[str, str]) -> None:
    """Add the data commands to the top-level subcommands."""
    stats = commands.add_parser(
        "stats", help="fleet statistics: instances per day, version and platform"
    )
    add_settings_flags(stats, environ, (*STORAGE_SETTINGS, "min_group_size"))
    add_product_flag(stats)
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
        "--days", dest="retention_days", type=settings_type(int), help=argparse.SUPPRESS
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

    from opa_telemetry_server.services.retention import purge_expired

    result = asyncio.run(purge_expired(settings, announce=announce, dry_run=args.dry_run))
    if result.days:
        print(f"{result.days} days rolled up, {result.rows_deleted} raw rows deleted")
    return 0


def _run_backup(args: argparse.Namespace) -> int:
    settings = settings_from_args(args)
    from opa_telemetry_server.storage import backup_database

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
    from opa_telemetry_server.storage import import_sqlite

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
        from opa_telemetry_server.services.retention import aggregate_now

        asyncio.run(aggregate_now(settings, migrate=False))

    async def work(storage: Storage) -> tuple[dict[str, Any], list[ProductCounts]]:
        catalog = await load_catalog(storage)
        minimum = settings.min_group_size if args.public else 0
        document = await stats_document(storage, catalog, query, min_group_size=minimum)
        return document, await storage.products(utc_today().isoformat())

    document, products = with_storage(args, work)
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

    products = with_storage(args, work)
    if args.json:
        print(json.dumps(products_document(products), indent=1))
        return 0
    print(f"{'PRODUCT':<24} {'RELEASES':>8} {'REPORTS':>10} {'INSTANCES TODAY':>15}")
    for p in products:
        print(f"{p.product:<24} {p.releases:>8} {p.reports:>10} {p.instances_today:>15}")
    return 0
