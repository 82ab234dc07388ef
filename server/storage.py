"""SQLite storage: the only module that speaks SQL (with ``migrations``, which holds the schema).

One :class:`Storage` owns one aiosqlite connection. The ingest writer is its only writer on
the hot path; the CLI opens its own :class:`Storage` for catalog and statistics commands.
Every database failure on a write surfaces as :class:`StorageUnavailableError`, which the
HTTP layer turns into a 503 with ``Retry-After``.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import re
import sqlite3
import time
from collections import Counter
from collections.abc import AsyncIterator, Iterable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any
from urllib.parse import quote

import aiosqlite

from .codec import json_codec
from .errors import CatalogError, SchemaError, StorageUnavailableError
from .migrations import MIGRATIONS
from .protocol import Report
from .releases import Catalog, Release, release_from_mapping
from .versions import parse_version

logger = logging.getLogger(__name__)

MIN_SQLITE = (3, 38, 0)
_rows_json = json_codec(fast=True).dumps

# A whole batch is one statement over a JSON array of rows: SQLite parses and upserts it in C
# with the GIL released once, instead of being re-entered from Python for every row. What is
# the same for the whole batch (the day, the time) is a parameter, not a field of every row:
# the three fields this saves were about 1 µs of writer CPU per report (``bench/cpu.py real``).
# ("WHERE true" resolves the parsing ambiguity of INSERT ... SELECT ... ON CONFLICT.)
UPSERT_REPORTS_SQL = """
INSERT INTO reports (product, day, instance_id, first_seen_at, last_seen_at, report_count,
                     version, os, arch, heap_usage_bytes, min_compatible_version, extra)
SELECT value ->> 0, :day, value ->> 1, :seconds, :seconds, 1,
       value ->> 2, value ->> 3, value ->> 4, value ->> 5, value ->> 6, value ->> 7
FROM json_each(:rows) WHERE true
ON CONFLICT (product, day, instance_id) DO UPDATE SET
    last_seen_at = excluded.last_seen_at,
    report_count = report_count + 1,
    version = excluded.version,
    os = excluded.os,
    arch = excluded.arch,
    heap_usage_bytes = excluded.heap_usage_bytes,
    min_compatible_version = excluded.min_compatible_version,
    extra = excluded.extra
"""

COUNT_CHECKS_SQL = """
INSERT INTO version_checks (product, day, check_count)
SELECT value ->> 0, :day, value ->> 1 FROM json_each(:rows) WHERE true
ON CONFLICT (product, day) DO UPDATE SET check_count = check_count + excluded.check_count
"""

INSERT_RELEASE_SQL = """
INSERT INTO releases (product, tag, release_notes, assets, published_on, prerelease, added_at)
VALUES (?, ?, ?, ?, ?, ?, ?)
ON CONFLICT (product, tag) DO NOTHING
"""

UPDATE_RELEASE_SQL = """
UPDATE releases SET release_notes = ?, assets = ?, published_on = ?, prerelease = ?
WHERE product = ? AND tag = ?
    AND (release_notes, assets, coalesce(published_on, ''), prerelease)
        IS NOT (?, ?, coalesce(?, ''), ?)
"""

SELECT_RELEASES_SQL = """
SELECT id, product, tag, release_notes, assets, published_on, prerelease FROM releases
"""

INSTANCES_BY_VERSION_SQL = """
SELECT version, count(DISTINCT instance_id), sum(report_count) FROM all_reports
WHERE product = ? AND day >= ? GROUP BY version
"""

INSTANCES_BY_PLATFORM_SQL = """
SELECT coalesce(os, 'unknown'), coalesce(arch, 'unknown'), count(DISTINCT instance_id)
FROM all_reports WHERE product = ? AND day >= ? GROUP BY 1, 2 ORDER BY 3 DESC, 1, 2
"""

TOTALS_SQL = """
SELECT count(DISTINCT instance_id), coalesce(sum(report_count), 0) FROM all_reports
WHERE product = ? AND day >= ?
"""

CHECKS_SQL = """
SELECT coalesce(sum(check_count), 0) FROM all_version_checks WHERE product = ? AND day >= ?
"""


# One day's instances across every shard: each instance once, with the version, platform and
# heap of its latest row and the reports of all its rows.
DAY_INSTANCES_SQL = """
WITH latest AS (
    SELECT product, instance_id, max(last_seen_at) AS last_seen_at, sum(report_count) AS reports
    FROM all_reports WHERE day = ? GROUP BY product, instance_id
)
SELECT r.product, r.version, coalesce(r.os, ''), coalesce(r.arch, ''), r.heap_usage_bytes,
       latest.reports
FROM latest JOIN all_reports AS r
    ON r.day = ? AND r.product = latest.product AND r.instance_id = latest.instance_id
    AND r.last_seen_at = latest.last_seen_at
GROUP BY r.product, r.instance_id
"""

UPSERT_ROLLUP_SQL = """
INSERT INTO main.daily_rollups (product, day, version, os, arch, instances, reports,
                                heap_p50, heap_p90, heap_p99)
VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)
ON CONFLICT (product, day, version, os, arch) DO UPDATE SET
    instances = instances + excluded.instances,
    reports = reports + excluded.reports,
    heap_p50 = coalesce(excluded.heap_p50, heap_p50),
    heap_p90 = coalesce(excluded.heap_p90, heap_p90),
    heap_p99 = coalesce(excluded.heap_p99, heap_p99)
"""

DAILY_SQL = """
SELECT day, count(DISTINCT instance_id), sum(report_count), 'raw' FROM all_reports
WHERE product = ? AND day >= ? GROUP BY day
UNION ALL
SELECT day, sum(instances), sum(reports), 'rollup' FROM main.daily_rollups
WHERE product = ? AND day >= ? GROUP BY day
ORDER BY 1, 4
"""


def shard_path(db: str | Path, worker: int) -> Path:
    """Where worker ``worker`` commits its reports: the main file for worker 0, else a sibling
    (``telemetry.db`` -> ``telemetry.worker1.db``), so that workers never share a write lock."""
    path = Path(db)
    return path if worker == 0 else path.with_name(f"{path.stem}.worker{worker}{path.suffix}")


def existing_shards(db: str | Path) -> list[Path]:
    """The shard files beside ``db`` that workers have written (not the main file)."""
    path = Path(db)
    pattern = re.compile(re.escape(path.stem) + r"\.worker\d+" + re.escape(path.suffix) + "$")
    return sorted(p for p in path.parent.glob(f"{path.stem}.worker*") if pattern.match(p.name))


@dataclass
class PurgeResult:
    days: int = 0
    rows_deleted: int = 0


@dataclass(frozen=True, slots=True)
class Day:
    day: str
    instances: int
    reports: int
    source: str  # "raw" or "rollup"


def utc_day(at: float) -> str:
    """The UTC calendar day of a Unix time, as ``YYYY-MM-DD``."""
    return time.strftime("%Y-%m-%d", time.gmtime(at))


@dataclass(frozen=True, slots=True)
class VersionCount:
    version: str
    instances: int
    reports: int


@dataclass(frozen=True, slots=True)
class PlatformCount:
    os: str
    arch: str
    instances: int


@dataclass(frozen=True, slots=True)
class Stats:
    """Anonymous counts for one product since ``since`` (a UTC day, inclusive)."""

    product: str
    since: str
    instances: int
    reports: int
    version_checks: int
    by_version: list[VersionCount] = field(default_factory=list)
    by_platform: list[PlatformCount] = field(default_factory=list)


class Storage:
    """A migrated SQLite database in WAL mode. Create with :meth:`open`; close is idempotent."""

    def __init__(self, conn: aiosqlite.Connection, path: str) -> None:
        self._conn = conn
        self.path = path
        self._closed = False

    @classmethod
    async def open(
        cls,
        path: str | Path,
        *,
        synchronous: str = "full",
        busy_timeout_ms: int = 5000,
        wal_checkpoint_pages: int = 1000,
        migrate: bool = True,
    ) -> Storage:
        """Open the database at ``path``: with ``migrate``, create it if missing and apply the
        schema steps it lacks (only the server does this); without, open an existing database
        of exactly this version's schema and change nothing.

        Raises :class:`SchemaError`, with a message a person can act on, when the path cannot
        be a database (a directory, a missing folder, no permission) or the file is not one
        this version can use (not SQLite, not ours, older without ``migrate``, newer).
        """
        if sqlite3.sqlite_version_info < MIN_SQLITE:
            raise SchemaError(
                f"SQLite {sqlite3.sqlite_version} is too old: opa-telemetry needs"
                f" {'.'.join(map(str, MIN_SQLITE))} or newer (its JSON operators)"
            )
        # A few stat calls at open time, before any connection exists: not worth a thread.
        uri = _database_uri(Path(path), create=migrate)
        try:
            conn = await aiosqlite.connect(uri, isolation_level=None, uri=True)
        except sqlite3.Error as exc:
            raise SchemaError(f"{path}: cannot open the database: {exc}") from None
        try:
            await conn.execute(f"PRAGMA busy_timeout = {int(busy_timeout_ms)}")
            if migrate:
                await conn.execute("PRAGMA journal_mode = WAL")
            await conn.execute(f"PRAGMA wal_autocheckpoint = {int(wal_checkpoint_pages)}")
            await conn.execute(f"PRAGMA synchronous = {_checked_synchronous(synchronous)}")
            if migrate:
                await _migrate(conn)
            else:
                await _check_current(conn, path)
        except sqlite3.DatabaseError as exc:
            await conn.close()
            raise SchemaError(f"{path}: cannot use this database: {exc}") from None
        except BaseException:
            await conn.close()
            raise
        return cls(conn, str(path))

    async def close(self) -> None:
        if not self._closed:
            self._closed = True
            await self._conn.close()

    async def ping(self) -> None:
        """Raise :class:`StorageUnavailableError` unless the database answers a query."""
        try:
            async with self._conn.execute("SELECT count(*) FROM meta") as cursor:
                await cursor.fetchone()
        except (sqlite3.Error, ValueError) as exc:
            raise StorageUnavailableError(f"database does not answer: {exc}") from exc

    async def schema_version(self) -> int:
        return await _user_version(self._conn)

    # -- the hot path -----------------------------------------------------------------------

    async def write_batch(
        self, reports: Sequence[Report], checks: Iterable[str], now: float
    ) -> None:
        """Commit ``reports`` (upserted per product, day, instance) and version ``checks``
        (one product name per check) in one transaction; all or nothing.

        Raises :class:`StorageUnavailableError` when the transaction cannot commit.
        """
        day, seconds = utc_day(now), int(now)
        statements: list[tuple[str, dict[str, str | int]]] = []
        if reports:
            rows = [
                (r.product, r.instance_id, r.version.text, r.os, r.arch, r.heap_usage_bytes,
                 r.min_compatible_version, r.extra)
                for r in reports
            ]  # fmt: skip
            rows_json = _rows_json(rows).decode()
            statements.append(
                (UPSERT_REPORTS_SQL, {"rows": rows_json, "day": day, "seconds": seconds})
            )
        counts = Counter(checks)
        if counts:
            totals = _rows_json(list(counts.items())).decode()
            statements.append((COUNT_CHECKS_SQL, {"rows": totals, "day": day}))
        try:
            if len(statements) == 1:  # the common case: one statement is one transaction
                await self._conn.execute(*statements[0])
                return
            await self._conn.execute("BEGIN IMMEDIATE")
            try:
                for sql, parameters in statements:
                    await self._conn.execute(sql, parameters)
                await self._conn.execute("COMMIT")
            except BaseException:
                await self._rollback()
                raise
        except (sqlite3.Error, ValueError) as exc:
            # ValueError: the connection was closed under us during shutdown.
            raise StorageUnavailableError(f"could not commit: {exc}") from exc

    async def _rollback(self) -> None:
        """Roll back if a transaction is open; never raises (the caller re-raises its error)."""
        try:
            await self._conn.execute("ROLLBACK")
        except (sqlite3.Error, ValueError):
            logger.debug("nothing to roll back", exc_info=True)

    # -- the release catalog ----------------------------------------------------------------

    async def catalog_generation(self) -> int:
        """A number that changes whenever any process changes the ``releases`` table."""
        async with self._conn.execute(
            "SELECT value FROM meta WHERE key = 'catalog_generation'"
        ) as cursor:
            row = await cursor.fetchone()
        return int(row[0]) if row else 0

    async def load_catalog(self) -> Catalog:
        """Read every product's releases into an in-memory :class:`Catalog`."""
        async with self._conn.execute(SELECT_RELEASES_SQL) as cursor:
            rows = await cursor.fetchall()
        return Catalog((row[1], _release_from_row(row)) for row in rows)

    async def seed_catalog(self, product: str, releases: Sequence[Release]) -> int:
        """Import ``releases`` once per database lifetime (the first start).

        Returns how many releases were added; 0 when this database was seeded before, even
        if an operator has since removed releases.
        """
        key = f"catalog_seeded:{product}"
        await self._conn.execute("BEGIN IMMEDIATE")
        try:
            async with self._conn.execute("SELECT 1 FROM meta WHERE key = ?", (key,)) as cur:
                if await cur.fetchone():
                    await self._conn.execute("COMMIT")
                    return 0
            added, _ = await self._import(product, releases, update=False)
            await self._conn.execute(
                "INSERT INTO meta (key, value) VALUES (?, ?)", (key, int(time.time()))
            )
            await self._conn.execute("COMMIT")
        except BaseException:
            await self._rollback()
            raise
        return added

    async def add_release(self, product: str, release: Release, *, replace: bool = False) -> None:
        """Add one release; raises :class:`CatalogError` if the tag exists and not ``replace``."""
        await self._conn.execute("BEGIN IMMEDIATE")
        try:
            added, updated = await self._import(product, [release], update=replace)
            if not (added or updated or replace):
                raise CatalogError(f"{product} {release.tag} is already in the catalog")
            await self._conn.execute("COMMIT")
        except BaseException:
            await self._rollback()
            raise

    async def import_releases(self, product: str, releases: Sequence[Release]) -> tuple[int, int]:
        """Add new tags and update changed ones in one transaction; returns (added, updated)."""
        await self._conn.execute("BEGIN IMMEDIATE")
        try:
            counts = await self._import(product, releases, update=True)
            await self._conn.execute("COMMIT")
        except BaseException:
            await self._rollback()
            raise
        return counts

    async def remove_release(self, product: str, tag: str) -> bool:
        """Remove one release; returns whether it existed."""
        cursor = await self._conn.execute(
            "DELETE FROM releases WHERE product = ? AND tag = ?", (product, tag)
        )
        return cursor.rowcount > 0

    async def _import(
        self, product: str, releases: Iterable[Release], *, update: bool
    ) -> tuple[int, int]:
        added = updated = 0
        now = int(time.time())
        for release in releases:
            fields = (
                release.release_notes,
                json.dumps(list(release.assets)),
                release.published.isoformat() if release.published else None,
                int(release.prerelease),
            )
            cursor = await self._conn.execute(
                INSERT_RELEASE_SQL, (product, release.tag, *fields, now)
            )
            if cursor.rowcount:
                added += 1
            elif update:
                cursor = await self._conn.execute(
                    UPDATE_RELEASE_SQL, (*fields, product, release.tag, *fields)
                )
                updated += cursor.rowcount
        return added, updated

    # -- statistics -------------------------------------------------------------------------

    async def stats(self, product: str, since: str, shards: Sequence[Path] = ()) -> Stats:
        """Instances and reports per version and platform for ``product`` since day ``since``,
        over the raw rows of this database and the worker ``shards``."""
        async with self._attached(shards):
            return await self._stats(product, since)

    async def _stats(self, product: str, since: str) -> Stats:
        args = (product, since)
        async with self._conn.execute(TOTALS_SQL, args) as cursor:
            instances, reports = await cursor.fetchone() or (0, 0)
        async with self._conn.execute(CHECKS_SQL, args) as cursor:
            (checks,) = await cursor.fetchone() or (0,)
        async with self._conn.execute(INSTANCES_BY_VERSION_SQL, args) as cursor:
            by_version = [VersionCount(v, i, r) for v, i, r in await cursor.fetchall()]
        async with self._conn.execute(INSTANCES_BY_PLATFORM_SQL, args) as cursor:
            by_platform = [PlatformCount(o, a, i) for o, a, i in await cursor.fetchall()]
        by_version.sort(key=lambda c: parse_version(c.version).precedence, reverse=True)
        return Stats(product, since, instances, reports, checks, by_version, by_platform)

    # -- retention ---------------------------------------------------------------------------

    async def roll_up_and_purge(self, before: str, shards: Sequence[Path] = ()) -> PurgeResult:
        """For every UTC day before ``before`` that still has raw rows (here or in ``shards``),
        write its daily rollups, then delete its raw rows; one transaction per day.

        Run it on a connection of its own (not the ingest writer's): the transaction must not
        take in the writer's statements. An instance that reached two worker shards on one day
        counts once, with the version of its latest report.
        """
        result = PurgeResult()
        async with self._attached(shards) as sources:
            async with self._conn.execute(
                "SELECT DISTINCT day FROM all_reports WHERE day < ? ORDER BY day", (before,)
            ) as cursor:
                days = [day for (day,) in await cursor.fetchall()]
            for day in days:
                await self._conn.execute("BEGIN IMMEDIATE")
                try:
                    async with self._conn.execute(DAY_INSTANCES_SQL, (day, day)) as cursor:
                        rows = await cursor.fetchall()
                    rollups = _rollups(day, rows)
                    await self._conn.executemany(UPSERT_ROLLUP_SQL, rollups)
                    for source in sources:
                        cursor = await self._conn.execute(
                            f"DELETE FROM {source}.reports WHERE day = ?",  # noqa: S608 - ours
                            (day,),
                        )
                        result.rows_deleted += cursor.rowcount
                    await self._conn.execute("COMMIT")
                except BaseException:
                    await self._rollback()
                    raise
                result.days += 1
        return result

    async def count_expired(self, before: str, shards: Sequence[Path] = ()) -> PurgeResult:
        """What :meth:`roll_up_and_purge` would do for ``before``: the days it would roll up
        and the raw rows it would delete (here and in ``shards``); changes nothing."""
        async with (
            self._attached(shards),
            self._conn.execute(
                "SELECT count(DISTINCT day), count(*) FROM all_reports WHERE day < ?", (before,)
            ) as cursor,
        ):
            days, rows = await cursor.fetchone() or (0, 0)
        return PurgeResult(days=int(days), rows_deleted=int(rows))

    async def daily(self, product: str, since: str, shards: Sequence[Path] = ()) -> list[Day]:
        """Instances and reports per UTC day since ``since``: from raw rows where they are
        still kept, from the daily rollups where retention has removed them."""
        args = (product, since, product, since)
        async with self._attached(shards), self._conn.execute(DAILY_SQL, args) as cursor:
            return [Day(d, i, r, source) for d, i, r, source in await cursor.fetchall()]

    @contextlib.asynccontextmanager
    async def _attached(self, shards: Sequence[Path]) -> AsyncIterator[list[str]]:
        """Attach ``shards`` and define ``all_reports`` / ``all_version_checks`` over them."""
        sources = ["main"]
        try:
            for number, shard in enumerate(shards, start=1):
                await self._conn.execute(f"ATTACH DATABASE ? AS shard{number}", (str(shard),))
                sources.append(f"shard{number}")
            for table in ("reports", "version_checks"):
                # Schema and table names are ours (main, shardN; two constants), never input.
                union = " UNION ALL ".join(f"SELECT * FROM {s}.{table}" for s in sources)  # noqa: S608
                await self._conn.execute(f"CREATE TEMP VIEW all_{table} AS {union}")
            yield sources
        finally:
            for table in ("reports", "version_checks"):
                await self._conn.execute(f"DROP VIEW IF EXISTS temp.all_{table}")
            for source in sources[1:]:
                await self._conn.execute(f"DETACH DATABASE {source}")


def _rollups(day: str, rows: Iterable[Any]) -> list[tuple[Any, ...]]:
    """Group one day's per-instance rows into rollup rows with heap percentiles."""
    groups: dict[tuple[str, str, str, str], tuple[int, int, list[int]]] = {}
    for product, version, os_name, arch, heap, reports in rows:
        key = (product, version, os_name, arch)
        instances, total, heaps = groups.get(key, (0, 0, []))
        if heap is not None:
            heaps.append(int(heap))
        groups[key] = (instances + 1, total + int(reports), heaps)
    return [
        (product, day, version, os_name, arch, instances, total,
         *(_percentile(heaps, p) for p in (50, 90, 99)))
        for (product, version, os_name, arch), (instances, total, heaps) in groups.items()
    ]  # fmt: skip


def _percentile(values: list[int], percent: float) -> int | None:
    """Nearest-rank percentile, ``None`` for no values."""
    if not values:
        return None
    ordered = sorted(values)
    rank = max(1, math.ceil(percent / 100 * len(ordered)))
    return ordered[rank - 1]


def _checked_synchronous(value: str) -> str:
    if value.lower() not in ("off", "normal", "full", "extra"):
        raise ValueError(f"synchronous must be off, normal, full or extra, not {value!r}")
    return value.upper()


def _release_from_row(row: sqlite3.Row | tuple[Any, ...]) -> Release:
    release_id, _product, tag, notes, assets, published, prerelease = row
    release = release_from_mapping(
        {
            "tag": tag,
            "release_notes": notes,
            "assets": json.loads(assets),
            "published": published,
            "prerelease": bool(prerelease),
        }
    )
    return replace(release, id=int(release_id))


def _database_uri(path: Path, *, create: bool) -> str:
    """The SQLite URI to open ``path`` with (``mode=rw`` never creates the file), after
    refusing in words a path that cannot hold the database (SQLite says it less clearly)."""
    uri = f"file:{quote(str(path.resolve()))}?mode={'rwc' if create else 'rw'}"
    if path.is_dir():
        raise SchemaError(f"{path} is a directory; --db takes a database file")
    if path.exists():
        return uri
    if not create:
        raise SchemaError(f"{path}: no such database (start the server once, or check --db)")
    if not path.parent.is_dir():
        raise SchemaError(
            f"{path}: the directory {path.parent} does not exist (create it, or choose another"
            " --db)"
        )
    if not os.access(path.parent, os.W_OK | os.X_OK):
        raise SchemaError(f"{path}: cannot create the database: {path.parent} is not writable")
    return uri


async def _check_current(conn: aiosqlite.Connection, path: str | Path) -> None:
    """Raise :class:`SchemaError` unless ``conn`` holds exactly this version's schema."""
    version, target = await _user_version(conn), len(MIGRATIONS)
    async with conn.execute(
        "SELECT count(*) FROM sqlite_master WHERE type = 'table' AND name = 'meta'"
    ) as cursor:
        row = await cursor.fetchone()
    if version == 0 or not row or not row[0]:
        raise SchemaError(
            f"{path} is not an opa-telemetry database (start the server with it once to"
            " create one, or check --db)"
        )
    if version < target:
        raise SchemaError(
            f"{path} has schema version {version}, older than this version's {target}:"
            " start the server once to upgrade it"
        )
    if version > target:
        raise SchemaError(
            f"{path} has schema version {version}, newer than this version's {target};"
            " upgrade opa-telemetry"
        )


async def _user_version(conn: aiosqlite.Connection) -> int:
    async with conn.execute("PRAGMA user_version") as cursor:
        row = await cursor.fetchone()
    return int(row[0]) if row else 0


async def _migrate(
    conn: aiosqlite.Connection, migrations: Sequence[Sequence[str]] = MIGRATIONS
) -> None:
    """Apply the steps this database lacks, each in its own transaction.

    Safe when several processes start at once: each step re-reads the version under the write
    lock. Raises :class:`SchemaError` for a database newer than ``migrations``.
    """
    target = len(migrations)
    if await _user_version(conn) > target:
        raise SchemaError(
            f"database schema version {await _user_version(conn)} is newer than this"
            f" server's ({target}); upgrade opa-telemetry"
        )
    for number, statements in enumerate(migrations, start=1):
        await conn.execute("BEGIN IMMEDIATE")
        try:
            if await _user_version(conn) < number:
                for statement in statements:
                    await conn.execute(statement)
                await conn.execute(f"PRAGMA user_version = {number}")
                logger.info("database migrated to schema version %d", number)
            await conn.execute("COMMIT")
        except BaseException:
            # Never let a failed ROLLBACK (the COMMIT may have completed after all, e.g. when
            # we were cancelled while it ran) replace the error that brought us here.
            with contextlib.suppress(sqlite3.Error, ValueError):
                await conn.execute("ROLLBACK")
            raise
