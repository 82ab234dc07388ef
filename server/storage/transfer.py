"""Moving a SQLite database (and its worker shards) into a new PostgreSQL database: the path
from one box to many without losing history.

Everything is copied: the catalog with its policy, advisories and sync state, the raw reports
(an instance that reached two worker shards on one day becomes one row: its reports added up,
its latest report's fields kept), the release checks, the daily rollups, the statistics
aggregates and the bookkeeping in ``meta`` (seeded flags, the aggregator's watermark), so the
PostgreSQL server neither re-seeds nor re-aggregates. The target must hold no reports and no
releases yet; the copy is one transaction, all or nothing.
"""

from __future__ import annotations

import datetime
import sqlite3
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import aiosqlite

from opa_telemetry_server.errors import SchemaError
from opa_telemetry_server.storage.postgres import PostgresStorage
from opa_telemetry_server.storage.sqlite import SqliteStorage, existing_shards

CHUNK = 10_000  # rows read from SQLite and sent by COPY at a time

# Tables copied as they are (columns in SQLite's order, which PostgreSQL's schema shares).
PLAIN_TABLES = (
    "releases",
    "product_policies",
    "release_policies",
    "advisories",
    "sync_state",
    "daily_rollups",
    "stats_days",
    "stats_versions",
    "stats_platforms",
    "stats_min_compatible",
    "stats_heaps",
    "stats_heap_totals",
)
DATE_COLUMNS = {"day", "published_on"}
BOOLEAN_COLUMNS = {("releases", "prerelease"), ("release_policies", "yanked")}
OWN_META_KEYS = ("catalog_generation", "schema_version")  # each backend keeps its own

STAGE_REPORTS_SQL = """
CREATE TEMP TABLE staged_reports_copy (LIKE reports INCLUDING DEFAULTS) ON COMMIT DROP
"""
# One row per (product, day, instance) across shards: counts add up, the latest row's fields.
MERGE_STAGED_REPORTS_SQL = """
INSERT INTO reports
SELECT product, day, instance_id, min(first_seen_at), max(last_seen_at), sum(report_count),
       (array_agg(version ORDER BY last_seen_at DESC))[1],
       (array_agg(os ORDER BY last_seen_at DESC))[1],
       (array_agg(arch ORDER BY last_seen_at DESC))[1],
       (array_agg(heap_usage_bytes ORDER BY last_seen_at DESC))[1],
       (array_agg(min_compatible_version ORDER BY last_seen_at DESC))[1],
       (array_agg(extra ORDER BY last_seen_at DESC))[1]
FROM staged_reports_copy GROUP BY product, day, instance_id
"""
STAGE_CHECKS_SQL = """
CREATE TEMP TABLE staged_checks_copy (LIKE version_checks) ON COMMIT DROP
"""
MERGE_STAGED_CHECKS_SQL = """
INSERT INTO version_checks SELECT product, day, sum(check_count)
FROM staged_checks_copy GROUP BY product, day
"""

Progress = Callable[[str, int], None]


async def copy_sqlite_to_postgres(
    source: Path, target: PostgresStorage, progress: Progress | None = None
) -> dict[str, int]:
    """Copy the SQLite database ``source`` (with its worker shards) into ``target``, a
    migrated PostgreSQL database with no reports and no releases. Returns the rows copied
    per table; ``progress`` is told each table's running count as it goes.

    Raises :class:`SchemaError` when ``source`` is not a database of this version or
    ``target`` already holds data.
    """
    await (await SqliteStorage.open(source, migrate=False)).close()  # checks the schema
    files = [source, *existing_shards(source)]
    counts: dict[str, int] = {}

    def tell(table: str, rows: int) -> None:
        counts[table] = counts.get(table, 0) + rows
        if progress is not None:
            progress(table, counts[table])

    async with target.connection() as pg, pg.transaction():
        if await pg.fetchval("SELECT EXISTS (SELECT 1 FROM reports)") or await pg.fetchval(
            "SELECT EXISTS (SELECT 1 FROM releases)"
        ):
            raise SchemaError(
                f"{target.path} already holds reports or releases: copy into a new database"
            )
        async with _read_only(source) as lite:
            for table in PLAIN_TABLES:
                await _copy_table(lite, pg, table, table, tell)
            meta = await _fetch(lite, "SELECT key, value FROM meta")
            for key, value in meta:
                if key not in OWN_META_KEYS:
                    await pg.execute(
                        "INSERT INTO meta (key, value) VALUES ($1, $2)"
                        " ON CONFLICT (key) DO UPDATE SET value = excluded.value",
                        key, int(value),
                    )  # fmt: skip
            tell("meta", len([k for k, _ in meta if k not in OWN_META_KEYS]))
        await pg.execute(STAGE_REPORTS_SQL)
        await pg.execute(STAGE_CHECKS_SQL)
        for path in files:
            async with _read_only(path) as lite:
                await _copy_table(lite, pg, "reports", "staged_reports_copy", tell)
                await _copy_table(lite, pg, "version_checks", "staged_checks_copy", tell)
        # The copied ids are explicit: move the id sequence past them, or the next release
        # added (by hand or by sync) would collide with one of them.
        await pg.execute(
            "SELECT setval(pg_get_serial_sequence('releases', 'id'), max(id))"
            " FROM releases HAVING max(id) IS NOT NULL"
        )
        merged = await pg.execute(MERGE_STAGED_REPORTS_SQL)
        await pg.execute(MERGE_STAGED_CHECKS_SQL)
        counts["reports (merged)"] = int(merged.rsplit(" ", 1)[-1])
    return counts


class _read_only:
    """An aiosqlite connection that can only read ``path`` (never creates or changes it)."""

    def __init__(self, path: Path) -> None:
        self._path = path
        self._conn: aiosqlite.Connection | None = None

    async def __aenter__(self) -> aiosqlite.Connection:
        uri = f"file:{self._path.resolve()}?mode=ro"
        try:
            self._conn = await aiosqlite.connect(uri, uri=True)
        except sqlite3.Error as exc:
            raise SchemaError(f"{self._path}: cannot open the database: {exc}") from None
        return self._conn

    async def __aexit__(self, *exc: object) -> None:
        if self._conn is not None:
            await self._conn.close()


async def _fetch(conn: aiosqlite.Connection, sql: str) -> list[Any]:
    async with conn.execute(sql) as cursor:
        return list(await cursor.fetchall())


async def _copy_table(
    lite: aiosqlite.Connection,
    pg: Any,
    table: str,
    into: str,
    tell: Callable[[str, int], None],
) -> None:
    """Stream ``table`` from SQLite into the PostgreSQL table ``into`` by COPY, in chunks."""
    columns = [row[1] for row in await _fetch(lite, f"PRAGMA table_info({table})")]
    converters = [_converter(table, column) for column in columns]
    names = ", ".join(columns)
    async with lite.execute(f"SELECT {names} FROM {table}") as cursor:  # noqa: S608 - ours
        while rows := await cursor.fetchmany(CHUNK):
            records = [
                tuple(convert(value) for convert, value in zip(converters, row, strict=True))
                for row in rows
            ]
            await pg.copy_records_to_table(into, records=records, columns=columns)
            tell(table, len(records))


def _converter(table: str, column: str) -> Callable[[Any], Any]:
    """How a SQLite value becomes the PostgreSQL column's type."""
    if column in DATE_COLUMNS:
        return lambda value: None if value is None else datetime.date.fromisoformat(value)
    if (table, column) in BOOLEAN_COLUMNS:
        return lambda value: None if value is None else bool(value)
    return lambda value: value


def describe(counts: dict[str, int]) -> Sequence[str]:
    """One line per table, for the CLI."""
    return [f"{table}: {rows}" for table, rows in counts.items()]
