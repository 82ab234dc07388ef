"""The SQLite backend's SQL (its schema steps are in ``migrations``).

One :class:`SqliteStorage` owns one aiosqlite connection. The ingest writer is its only writer on
the hot path; the CLI opens its own :class:`Storage` for catalog and statistics commands.
Every database failure on a write surfaces as :class:`StorageUnavailableError`, which the
HTTP layer turns into a 503 with ``Retry-After``.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import json
import logging
import math
import os
import re
import sqlite3
import time
from collections import Counter
from collections.abc import AsyncIterator, Iterable, Sequence
from pathlib import Path
from types import EllipsisType
from typing import Any
from urllib.parse import quote

import aiosqlite

from opa_telemetry_server.domain.advisories import Advisory
from opa_telemetry_server.domain.codec import json_codec
from opa_telemetry_server.domain.protocol import Report
from opa_telemetry_server.domain.releases import Release
from opa_telemetry_server.errors import (
    BackupError,
    CatalogError,
    SchemaError,
    StorageUnavailableError,
)
from opa_telemetry_server.settings import Settings
from opa_telemetry_server.storage.records import (
    AGGREGATED_AT_KEY,
    SELECT_PRODUCT_POLICIES_SQL,
    SELECT_RELEASE_POLICIES_SQL,
    SELECT_RELEASES_SQL,
    STATS_DAY_TABLES,
    WATERMARK_KEY,
    AggregateResult,
    BackupFile,
    CatalogParts,
    ProductCounts,
    PurgeResult,
    SyncState,
    Window,
    catalog_parts,
    day_detail,
    utc_day,
)
from opa_telemetry_server.storage.sqlite.migrations import MIGRATIONS

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

# -- statistics: the aggregates (schema step 3) ----------------------------------------------
# The aggregator reads one product's raw rows of one day (a primary-key range): from the main
# database itself, or, with worker shards, from temp.day_rows, where each instance is one row.
DAY_ROWS_SQL = """
CREATE TEMP TABLE IF NOT EXISTS day_rows (
    product TEXT NOT NULL,
    day TEXT NOT NULL,
    instance_id TEXT NOT NULL,
    last_seen_at INTEGER NOT NULL,
    report_count INTEGER NOT NULL,
    version TEXT NOT NULL,
    os TEXT,
    arch TEXT,
    heap_usage_bytes INTEGER,
    min_compatible_version TEXT,
    PRIMARY KEY (product, day, instance_id)
) WITHOUT ROWID
"""

# An instance seen by several workers on one day: its reports add up, and its version,
# platform, heap and min_compatible_version are those of its latest row. (SET expressions read
# the row as it was before the update.)
MERGE_DAY_ROWS_SQL = """
INSERT INTO temp.day_rows
SELECT product, day, instance_id, last_seen_at, report_count, version, os, arch,
       heap_usage_bytes, min_compatible_version
FROM {source}.reports WHERE product = ? AND day = ? AND true
ON CONFLICT (product, day, instance_id) DO UPDATE SET
    report_count = report_count + excluded.report_count,
    last_seen_at = max(last_seen_at, excluded.last_seen_at),
    version = iif(excluded.last_seen_at > last_seen_at, excluded.version, version),
    os = iif(excluded.last_seen_at > last_seen_at, excluded.os, os),
    arch = iif(excluded.last_seen_at > last_seen_at, excluded.arch, arch),
    heap_usage_bytes = iif(excluded.last_seen_at > last_seen_at,
                           excluded.heap_usage_bytes, heap_usage_bytes),
    min_compatible_version = iif(excluded.last_seen_at > last_seen_at,
                                 excluded.min_compatible_version, min_compatible_version)
"""

# One pass (one sort) over a product-day's rows, split into the four detail tables in Python.
# Heap bucket b holds heaps in [2^(b/8), 2^((b+1)/8)) bytes; 0 and 1 byte fall in bucket 0.
DAY_GROUPS_SQL = """
SELECT version, coalesce(os, ''), coalesce(arch, ''), coalesce(min_compatible_version, ''),
       CAST(floor(log2(max(heap_usage_bytes, 1)) * 8) AS INTEGER), count(*), sum(report_count)
FROM {rows} WHERE product = ? AND day = ? GROUP BY 1, 2, 3, 4, 5
"""

# The next product (or day) after the given one that has raw rows: one seek in the primary
# key per distinct value, instead of a scan of every row.
NEXT_PRODUCT_SQL = "SELECT product FROM {source}.reports WHERE product > ? ORDER BY 1 LIMIT 1"
NEXT_DAY_SQL = """
SELECT day FROM {source}.reports WHERE product = ? AND day > ? ORDER BY day LIMIT 1
"""
CHANGED_SINCE_SQL = """
SELECT 1 FROM {source}.reports WHERE product = ? AND day = ? AND last_seen_at >= ? LIMIT 1
"""
CHECK_DAYS_SQL = """
SELECT product, day, sum(check_count) FROM all_version_checks WHERE day >= ? GROUP BY 1, 2
"""

# A day without raw rows (only release checks, or rows already purged): keep its counts.
UPDATE_STATS_CHECKS_SQL = """
INSERT INTO main.stats_days (product, day, instances, reports, version_checks)
VALUES (?, ?, 0, 0, ?)
ON CONFLICT (product, day) DO UPDATE SET version_checks = excluded.version_checks
"""
# A product-day's new aggregates are staged in temp tables (no lock on the database), then
# applied by one script: the write lock is held for those statements only, never across a
# round trip to the event loop, so the ingest writer never waits on this task's Python.
STAGE_TABLE_SQL = (
    "CREATE TEMP TABLE IF NOT EXISTS staged_{table} AS SELECT * FROM main.{table} LIMIT 0"
)
STAGE_ROWS_SQL = {
    "stats_days": "INSERT INTO temp.staged_stats_days VALUES (?, ?, ?, ?, ?)",
    "stats_versions": "INSERT INTO temp.staged_stats_versions VALUES (?, ?, ?, ?, ?)",
    "stats_platforms": "INSERT INTO temp.staged_stats_platforms VALUES (?, ?, ?, ?, ?)",
    "stats_min_compatible": "INSERT INTO temp.staged_stats_min_compatible VALUES (?, ?, ?, ?)",
    "stats_heaps": "INSERT INTO temp.staged_stats_heaps VALUES (?, ?, ?, ?, ?)",
}
APPLY_STAGED_DAY_SQL = """
BEGIN IMMEDIATE;
DELETE FROM main.stats_days
    WHERE (product, day) IN (SELECT product, day FROM temp.staged_stats_days);
INSERT INTO main.stats_days SELECT * FROM temp.staged_stats_days;
DELETE FROM main.stats_versions
    WHERE (product, day) IN (SELECT product, day FROM temp.staged_stats_days);
INSERT INTO main.stats_versions SELECT * FROM temp.staged_stats_versions;
DELETE FROM main.stats_platforms
    WHERE (product, day) IN (SELECT product, day FROM temp.staged_stats_days);
INSERT INTO main.stats_platforms SELECT * FROM temp.staged_stats_platforms;
DELETE FROM main.stats_min_compatible
    WHERE (product, day) IN (SELECT product, day FROM temp.staged_stats_days);
INSERT INTO main.stats_min_compatible SELECT * FROM temp.staged_stats_min_compatible;
DELETE FROM main.stats_heaps
    WHERE (product, day) IN (SELECT product, day FROM temp.staged_stats_days);
INSERT INTO main.stats_heaps SELECT * FROM temp.staged_stats_heaps;
COMMIT;
"""
# The read side: one product's window of aggregates, each query a primary-key range.
WINDOW_DAYS_SQL = """
SELECT day, instances, reports, version_checks FROM stats_days
WHERE product = ? AND day BETWEEN ? AND ? ORDER BY day
"""
WINDOW_VERSIONS_SQL = """
SELECT day, version, instances, reports FROM stats_versions
WHERE product = ? AND day BETWEEN ? AND ?
"""
WINDOW_PLATFORMS_SQL = """
SELECT os, arch, sum(instances) FROM stats_platforms
WHERE product = ? AND day BETWEEN ? AND ? GROUP BY 1, 2
"""
WINDOW_MIN_COMPATIBLE_SQL = """
SELECT min_compatible_version, sum(instances) FROM stats_min_compatible
WHERE product = ? AND day BETWEEN ? AND ? GROUP BY 1
"""
# The running totals at the window's end minus those before its start.
WINDOW_HEAPS_SQL = """
SELECT version, bucket, sum(instances) FROM (
    SELECT version, bucket, instances FROM stats_heap_totals
    WHERE product = :product AND day = (
        SELECT max(day) FROM stats_heap_totals WHERE product = :product AND day <= :until)
    UNION ALL
    SELECT version, bucket, -instances FROM stats_heap_totals
    WHERE product = :product AND day = (
        SELECT max(day) FROM stats_heap_totals WHERE product = :product AND day < :since)
) GROUP BY 1, 2 HAVING sum(instances) > 0
"""
# Running heap totals, rebuilt from a day on: each day's totals are the previous day's plus
# its own histogram, staged day by day in a temp table, then applied by one script.
HEAP_TOTALS_DAYS_SQL = """
SELECT DISTINCT day FROM stats_heaps WHERE product = ? AND day >= ? ORDER BY day
"""
STAGE_HEAP_TOTALS_SQL = """
INSERT INTO temp.staged_stats_heap_totals (product, day, version, bucket, instances)
SELECT :product, :day, version, bucket, sum(instances) FROM (
    SELECT version, bucket, instances FROM main.stats_heap_totals
    WHERE :previous IS NULL AND product = :product AND day = (
        SELECT max(day) FROM main.stats_heap_totals WHERE product = :product AND day < :since)
    UNION ALL
    SELECT version, bucket, instances FROM temp.staged_stats_heap_totals
    WHERE product = :product AND day = :previous
    UNION ALL
    SELECT version, bucket, instances FROM main.stats_heaps
    WHERE product = :product AND day = :day
) GROUP BY version, bucket
"""
APPLY_STAGED_HEAP_TOTALS_SQL = """
BEGIN IMMEDIATE;
DELETE FROM main.stats_heap_totals WHERE EXISTS (
    SELECT 1 FROM temp.staged_heap_totals_from AS f
    WHERE f.product = stats_heap_totals.product AND stats_heap_totals.day >= f.since);
INSERT INTO main.stats_heap_totals SELECT * FROM temp.staged_stats_heap_totals;
COMMIT;
"""
PRODUCTS_SQL = """
SELECT product, sum(reports), sum(iif(day = ?, instances, 0)) FROM stats_days GROUP BY 1
"""
RELEASE_COUNTS_SQL = "SELECT product, count(*) FROM releases GROUP BY product"
DAY_VERSION_COUNTS_SQL = "SELECT product, version, instances FROM stats_versions WHERE day = ?"


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


def backup_pairs(db: str | Path, dest: str | Path) -> list[tuple[Path, Path]]:
    """(file, copy) for a backup of ``db`` to ``dest``: the main file to ``dest``, each existing
    worker shard to ``dest``'s shard of the same number, so the copy is a database like ``db``."""
    db, dest = Path(db), Path(dest)
    pairs = [(db, dest)]
    for shard in existing_shards(db):
        number = int(shard.name[len(db.stem) + len(".worker") : len(shard.name) - len(db.suffix)])
        pairs.append((shard, shard_path(dest, number)))
    return pairs


class SqliteStorage:
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
    ) -> SqliteStorage:
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
            conn = await _connect(uri)
        except sqlite3.Error as exc:
            raise SchemaError(f"{path}: cannot open the database: {exc}") from None
        try:
            await conn.execute(f"PRAGMA busy_timeout = {int(busy_timeout_ms)}")
            if migrate:
                await _refuse_newer(conn, path)  # before WAL: refused means left as it was
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

    async def backup(self, dest: Path) -> int:
        """Write a consistent snapshot of this database to the new file ``dest`` and flush it
        to disk; returns its size in bytes.

        ``VACUUM INTO`` copies the database as one read transaction sees it (what is still in
        the WAL included) and takes no write lock: the server may go on writing meanwhile.
        Raises :class:`BackupError` if ``dest`` exists or cannot be written.
        """
        try:
            await self._conn.execute("VACUUM INTO ?", (str(dest),))
        except sqlite3.Error as exc:
            raise BackupError(f"cannot back up {self.path} to {dest}: {exc}") from None
        # SQLite does not sync what VACUUM INTO wrote; a backup must survive a power cut.
        return await asyncio.to_thread(_synced_size, dest)

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
            async with self._transaction():
                for sql, parameters in statements:
                    await self._conn.execute(sql, parameters)
        except (sqlite3.Error, ValueError) as exc:
            # ValueError: the connection was closed under us during shutdown.
            raise StorageUnavailableError(f"could not commit: {exc}") from exc

    @contextlib.asynccontextmanager
    async def _transaction(self) -> AsyncIterator[None]:
        """``BEGIN IMMEDIATE`` ... ``COMMIT`` around the block (a ``return`` in it commits
        too); ``ROLLBACK`` if anything, cancellation included, escapes it."""
        await self._conn.execute("BEGIN IMMEDIATE")
        try:
            yield
        except BaseException:
            await self._rollback()
            raise
        await self._conn.execute("COMMIT")

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

    async def load_catalog_parts(self) -> CatalogParts:
        """Read every product's releases, policy and advisories (see :func:`catalog_parts`)."""
        async with self._conn.execute(SELECT_RELEASES_SQL) as cursor:
            releases = await cursor.fetchall()
        async with self._conn.execute(SELECT_PRODUCT_POLICIES_SQL) as cursor:
            product_policies = await cursor.fetchall()
        async with self._conn.execute(SELECT_RELEASE_POLICIES_SQL) as cursor:
            release_policies = await cursor.fetchall()
        async with self._conn.execute("SELECT product, id, record FROM advisories") as cursor:
            advisories = await cursor.fetchall()
        return catalog_parts(releases, product_policies, release_policies, advisories)

    # -- policy (each change bumps the catalog generation through the tables' triggers) -------

    async def set_product_policy(self, product: str, **changes: str | None) -> None:
        """Set ``pinned_tag``, ``min_version`` and/or ``support_notice`` (``None`` clears)."""
        allowed = {"pinned_tag", "min_version", "support_notice"}
        if not changes or set(changes) - allowed:
            raise ValueError(f"policy fields are {sorted(allowed)}")
        columns = sorted(changes)
        await self._conn.execute(
            "INSERT INTO product_policies (product, updated_at) VALUES (?, ?)"
            " ON CONFLICT (product) DO NOTHING",
            (product, int(time.time())),
        )
        assignments = ", ".join(f"{c} = ?" for c in columns)  # names from the allow-list above
        await self._conn.execute(
            f"UPDATE product_policies SET {assignments}, updated_at = ? WHERE product = ?",  # noqa: S608
            (*(changes[c] for c in columns), int(time.time()), product),
        )

    async def set_release_policy(
        self,
        product: str,
        tag: str,
        *,
        yanked: bool | None = None,
        reason: str | None = None,
        rollout_percent: int | EllipsisType | None = ...,
    ) -> bool:
        """Yank/unyank a release or set its rollout (``None``: fully rolled out).

        Returns whether anything changed; raises :class:`CatalogError` if ``tag`` is not in
        the catalog.
        """
        async with self._conn.execute(
            "SELECT 1 FROM releases WHERE product = ? AND tag = ?", (product, tag)
        ) as cursor:
            if await cursor.fetchone() is None:
                raise CatalogError(f"{product} {tag} is not in the catalog")
        async with self._transaction():
            async with self._conn.execute(
                "SELECT yanked, yank_reason, rollout_percent FROM release_policies"
                " WHERE product = ? AND tag = ?",
                (product, tag),
            ) as cursor:
                row = await cursor.fetchone()
            old = (bool(row[0]), row[1], row[2]) if row else (False, "", None)
            new = (
                old[0] if yanked is None else yanked,
                (reason or "") if yanked else ("" if yanked is False else old[1]),
                old[2] if rollout_percent is ... else rollout_percent,
            )
            changed = new != old
            if changed:
                await self._conn.execute(
                    "INSERT INTO release_policies (product, tag, yanked, yank_reason,"
                    " rollout_percent, updated_at) VALUES (?, ?, ?, ?, ?, ?)"
                    " ON CONFLICT (product, tag) DO UPDATE SET yanked = excluded.yanked,"
                    " yank_reason = excluded.yank_reason,"
                    " rollout_percent = excluded.rollout_percent,"
                    " updated_at = excluded.updated_at",
                    (product, tag, int(new[0]), new[1], new[2], int(time.time())),
                )
        return changed

    # -- advisories --------------------------------------------------------------------------

    async def import_advisories(
        self, product: str, advisories: Sequence[Advisory], *, seed: bool = False
    ) -> tuple[int, int]:
        """Add new advisories and replace changed ones in one transaction; (added, updated).

        With ``seed``, import only once per database lifetime (0, 0 after the first time).
        """
        key = f"advisories_seeded:{product}"
        added = updated = 0
        now = int(time.time())
        async with self._transaction():
            if seed:
                async with self._conn.execute("SELECT 1 FROM meta WHERE key = ?", (key,)) as c:
                    if await c.fetchone():
                        return 0, 0
                await self._conn.execute("INSERT INTO meta (key, value) VALUES (?, ?)", (key, now))
            for advisory in advisories:
                record = json.dumps(advisory.record, sort_keys=True)
                cursor = await self._conn.execute(
                    "INSERT INTO advisories (product, id, record, added_at) VALUES (?, ?, ?, ?)"
                    " ON CONFLICT (product, id) DO NOTHING",
                    (product, advisory.id, record, now),
                )
                if cursor.rowcount:
                    added += 1
                    continue
                cursor = await self._conn.execute(
                    "UPDATE advisories SET record = ? WHERE product = ? AND id = ?"
                    " AND record IS NOT ?",
                    (record, product, advisory.id, record),
                )
                updated += cursor.rowcount
        return added, updated

    async def remove_advisory(self, product: str, ident: str) -> bool:
        """Remove one advisory; returns whether it existed."""
        cursor = await self._conn.execute(
            "DELETE FROM advisories WHERE product = ? AND id = ?", (product, ident)
        )
        return cursor.rowcount > 0

    # -- sync state --------------------------------------------------------------------------

    async def sync_state(self, product: str) -> SyncState | None:
        async with self._conn.execute(
            "SELECT product, source, etag, last_attempt_at, last_success_at, last_error,"
            " last_error_at, retry_after_at FROM sync_state WHERE product = ?",
            (product,),
        ) as cursor:
            row = await cursor.fetchone()
        return SyncState(*row) if row else None

    async def sync_states(self) -> list[SyncState]:
        async with self._conn.execute(
            "SELECT product, source, etag, last_attempt_at, last_success_at, last_error,"
            " last_error_at, retry_after_at FROM sync_state ORDER BY product"
        ) as cursor:
            return [SyncState(*row) for row in await cursor.fetchall()]

    async def save_sync_state(self, state: SyncState) -> None:
        await self._conn.execute(
            "INSERT OR REPLACE INTO sync_state (product, source, etag, last_attempt_at,"
            " last_success_at, last_error, last_error_at, retry_after_at)"
            " VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
            (state.product, state.source, state.etag, state.last_attempt_at,
             state.last_success_at, state.last_error, state.last_error_at,
             state.retry_after_at),
        )  # fmt: skip

    async def sync_releases(
        self, product: str, releases: Sequence[Release], *, prune: bool
    ) -> tuple[int, int, int]:
        """Add and update ``releases`` and, with ``prune``, remove the product's releases not
        among them; one transaction. Returns (added, updated, removed)."""
        async with self._transaction():
            added, updated = await self._import(product, releases, update=True)
            removed = 0
            if prune:
                keep = json.dumps([r.tag for r in releases])
                cursor = await self._conn.execute(
                    "DELETE FROM releases WHERE product = ?"
                    " AND tag NOT IN (SELECT value FROM json_each(?))",
                    (product, keep),
                )
                removed = cursor.rowcount
        return added, updated, removed

    async def seed_catalog(self, product: str, releases: Sequence[Release]) -> int:
        """Import ``releases`` once per database lifetime (the first start).

        Returns how many releases were added; 0 when this database was seeded before, even
        if an operator has since removed releases.
        """
        key = f"catalog_seeded:{product}"
        async with self._transaction():
            async with self._conn.execute("SELECT 1 FROM meta WHERE key = ?", (key,)) as cur:
                if await cur.fetchone():
                    return 0
            added, _ = await self._import(product, releases, update=False)
            await self._conn.execute(
                "INSERT INTO meta (key, value) VALUES (?, ?)", (key, int(time.time()))
            )
        return added

    async def add_release(self, product: str, release: Release, *, replace: bool = False) -> bool:
        """Add one release; returns ``True`` if it was new, ``False`` if it replaced one.

        Raises :class:`CatalogError` if the tag exists and not ``replace``.
        """
        async with self._transaction():
            added, _ = await self._import(product, [release], update=replace)
            if not (added or replace):
                raise CatalogError(
                    f"{product} {release.tag} is already in the catalog (use --replace)"
                )
        return bool(added)

    async def import_releases(self, product: str, releases: Sequence[Release]) -> tuple[int, int]:
        """Add new tags and update changed ones in one transaction; returns (added, updated)."""
        async with self._transaction():
            return await self._import(product, releases, update=True)

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
                json.dumps([asset.to_json() for asset in release.assets]),
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

    # -- statistics: aggregates kept by a background task, read by the stats API ------------

    async def aggregate(self, *, now: float | None = None, lag: float = 600.0) -> AggregateResult:
        """Rewrite the aggregates of every (product, UTC day) that may have changed since the
        last run, from the raw rows of this database and its worker shards; then move the
        watermark to ``now - lag``. Idempotent; run it on a connection of its own.

        A day is re-read whole (a primary-key range per product), so an instance seen on
        several shards counts once and heap percentiles stay exact to a bucket. ``lag`` covers
        batches stamped before ``now`` that commit after this run reads (they are re-read next
        time). Days before the watermark are never read again, so the cost of a run is the
        raw rows of today (and of yesterday, for ``lag`` seconds after midnight).
        """
        started = time.time() if now is None else now
        watermark = await self.meta(WATERMARK_KEY)
        async with self._attached(self._shards()) as sources:
            result = await self._aggregate_range(
                sources, utc_day(watermark or 0), changed_since=watermark
            )
        await self.set_meta(WATERMARK_KEY, int(started - lag))
        await self.set_meta(AGGREGATED_AT_KEY, int(started))
        return result

    async def _aggregate_range(
        self,
        sources: Sequence[str],
        since: str,
        before: str | None = None,
        *,
        changed_since: int | None = None,
    ) -> AggregateResult:
        """Rewrite the aggregates of every product-day from ``since`` (and before ``before``)
        that has raw rows or release checks in ``sources`` (attached by :meth:`_attached`).

        With ``changed_since``, a product-day none of whose rows was seen at or after that
        time is not re-read (an idle server's run costs a few seeks); only its release
        checks are brought up to date."""
        product_days: dict[tuple[str, str], int] = {}
        after = (datetime.date.fromisoformat(since) - datetime.timedelta(days=1)).isoformat()
        for source in sources:
            for product in await self._distinct_products(source):
                for day in await self._distinct_days(source, product, after, before):
                    product_days.setdefault((product, day), 0)
        async with self._conn.execute(CHECK_DAYS_SQL, (since,)) as cursor:
            for product, day, checks in await cursor.fetchall():
                if before is None or day < before:
                    product_days[(product, day)] = int(checks)
        if len(sources) > 1:
            await self._conn.execute(DAY_ROWS_SQL)
        result = AggregateResult()
        first_changed: dict[str, str] = {}
        for (product, day), checks in sorted(product_days.items()):
            if changed_since is not None and not await self._changed(
                sources, product, day, changed_since
            ):
                await self._conn.execute(UPDATE_STATS_CHECKS_SQL, (product, day, checks))
                continue
            result.instances += await self._aggregate_day(sources, product, day, checks)
            result.days += 1
            first_changed.setdefault(product, day)
        for product, day in first_changed.items():
            await self._rebuild_heap_totals(product, day)
        return result

    async def _rebuild_heap_totals(self, product: str, since: str) -> None:
        """Recompute the running heap totals of ``product`` from day ``since`` on (normally
        today only: days before it do not change)."""
        async with self._conn.execute(HEAP_TOTALS_DAYS_SQL, (product, since)) as cursor:
            days = [day for (day,) in await cursor.fetchall()]
        await self._stage("stats_heap_totals")
        await self._conn.execute(
            "CREATE TEMP TABLE IF NOT EXISTS staged_heap_totals_from (product TEXT, since TEXT)"
        )
        await self._conn.execute("DELETE FROM temp.staged_heap_totals_from")
        await self._conn.execute(
            "INSERT INTO temp.staged_heap_totals_from VALUES (?, ?)", (product, since)
        )
        previous = None
        for day in days:
            await self._conn.execute(
                STAGE_HEAP_TOTALS_SQL,
                {"product": product, "day": day, "previous": previous, "since": since},
            )
            previous = day
        await self._apply(APPLY_STAGED_HEAP_TOTALS_SQL)

    async def _stage(self, table: str) -> None:
        """An empty temp table ``staged_<table>`` shaped like ``main.<table>``."""
        await self._conn.execute(STAGE_TABLE_SQL.format(table=table))
        await self._conn.execute(f"DELETE FROM temp.staged_{table}")  # noqa: S608 - ours

    async def _apply(self, script: str) -> None:
        """Run a ``BEGIN IMMEDIATE ... COMMIT`` script in one call; rolled back on failure."""
        try:
            await self._conn.executescript(script)
        except BaseException:
            await self._rollback()
            raise

    async def _changed(self, sources: Sequence[str], product: str, day: str, since: int) -> bool:
        for source in sources:
            sql = CHANGED_SINCE_SQL.format(source=source)
            async with self._conn.execute(sql, (product, day, since)) as cursor:
                if await cursor.fetchone():
                    return True
        return False

    async def _aggregate_day(
        self, sources: Sequence[str], product: str, day: str, checks: int
    ) -> int:
        """Recompute one product-day's aggregates; returns its distinct instances."""
        rows = "main.reports"
        args = (product, day)
        if len(sources) > 1:
            rows = "temp.day_rows"
            await self._conn.execute("DELETE FROM temp.day_rows")
            for source in sources:
                await self._conn.execute(MERGE_DAY_ROWS_SQL.format(source=source), args)
        async with self._conn.execute(DAY_GROUPS_SQL.format(rows=rows), args) as cursor:
            groups = await cursor.fetchall()
        detail, instances = day_detail(product, day, groups, checks)
        if not instances:  # raw rows already purged, or release checks only
            await self._conn.execute(UPDATE_STATS_CHECKS_SQL, (product, day, checks))
            return 0
        for table in STATS_DAY_TABLES:
            await self._stage(table)
            await self._conn.executemany(STAGE_ROWS_SQL[table], detail[table])
        await self._apply(APPLY_STAGED_DAY_SQL)
        return instances

    async def _distinct_products(self, source: str) -> list[str]:
        products: list[str] = []
        sql = NEXT_PRODUCT_SQL.format(source=source)
        while True:
            async with self._conn.execute(sql, (products[-1] if products else "",)) as cursor:
                row = await cursor.fetchone()
            if row is None:
                return products
            products.append(row[0])

    async def _distinct_days(
        self, source: str, product: str, after: str, before: str | None
    ) -> list[str]:
        """The days after ``after`` (and before ``before``) with raw rows of ``product``."""
        days: list[str] = []
        sql = NEXT_DAY_SQL.format(source=source)
        while True:
            async with self._conn.execute(sql, (product, days[-1] if days else after)) as cursor:
                row = await cursor.fetchone()
            if row is None or (before is not None and row[0] >= before):
                return days
            days.append(row[0])

    async def meta(self, key: str) -> int | None:
        """The integer kept under ``key`` in the meta table, or ``None``."""
        async with self._conn.execute("SELECT value FROM meta WHERE key = ?", (key,)) as cursor:
            row = await cursor.fetchone()
        return int(row[0]) if row else None

    async def set_meta(self, key: str, value: int) -> None:
        """Keep ``value`` under ``key`` in the meta table (one autocommit statement)."""
        await self._conn.execute(
            "INSERT INTO meta (key, value) VALUES (?, ?)"
            " ON CONFLICT (key) DO UPDATE SET value = excluded.value",
            (key, value),
        )

    async def window(self, product: str, since: str, until: str) -> Window:
        """The aggregates of ``product`` for the UTC days ``since``..``until``."""
        args = (product, since, until)
        results = []
        for sql in (
            WINDOW_DAYS_SQL,
            WINDOW_VERSIONS_SQL,
            WINDOW_PLATFORMS_SQL,
            WINDOW_MIN_COMPATIBLE_SQL,
        ):
            async with self._conn.execute(sql, args) as cursor:
                results.append([tuple(row) for row in await cursor.fetchall()])
        days, versions, platforms, min_compatible = results
        named = {"product": product, "since": since, "until": until}
        async with self._conn.execute(WINDOW_HEAPS_SQL, named) as cursor:
            heaps = [tuple(row) for row in await cursor.fetchall()]
        return Window(
            days=days,
            versions=versions,
            platforms=platforms,
            min_compatible=min_compatible,
            heaps=heaps,
            aggregated_at=await self.meta(AGGREGATED_AT_KEY),
        )

    async def products(self, today: str) -> list[ProductCounts]:
        """Every product with releases or aggregated reports, by name."""
        releases = dict(await self.release_counts())
        async with self._conn.execute(PRODUCTS_SQL, (today,)) as cursor:
            seen = {p: (int(r), int(i)) for p, r, i in await cursor.fetchall()}
        return [
            ProductCounts(name, releases.get(name, 0), *seen.get(name, (0, 0)))
            for name in sorted(releases.keys() | seen.keys())
        ]

    async def release_counts(self) -> list[tuple[str, int]]:
        """(product, releases in the catalog), by product."""
        async with self._conn.execute(RELEASE_COUNTS_SQL) as cursor:
            return sorted((p, int(n)) for p, n in await cursor.fetchall())

    async def day_version_counts(self, day: str) -> list[tuple[str, str, int]]:
        """(product, version, instances) aggregated for one UTC day."""
        async with self._conn.execute(DAY_VERSION_COUNTS_SQL, (day,)) as cursor:
            return [(p, v, int(i)) for p, v, i in await cursor.fetchall()]

    # -- retention ---------------------------------------------------------------------------

    async def roll_up_and_purge(self, before: str) -> PurgeResult:
        """For every UTC day before ``before`` that still has raw rows (here or in its shards),
        write its statistics aggregates and daily rollups, then delete its raw rows; one
        transaction per day.

        Run it on a connection of its own (not the ingest writer's): the transaction must not
        take in the writer's statements. An instance that reached two worker shards on one day
        counts once, with the version of its latest report.
        """
        result = PurgeResult()
        async with self._attached(self._shards()) as sources:
            # Seeks in the primary key, not a scan of every row (this runs every hour).
            days = sorted(
                {
                    day
                    for source in sources
                    for product in await self._distinct_products(source)
                    for day in await self._distinct_days(source, product, "", before)
                }
            )
            if days:  # the statistics must hold these days before their raw rows go
                watermark = await self.meta(WATERMARK_KEY)
                await self._aggregate_range(
                    sources, utc_day(watermark or 0), changed_since=watermark
                )
            for day in days:
                async with self._transaction():
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
                result.days += 1
        return result

    async def count_expired(self, before: str) -> PurgeResult:
        """What :meth:`roll_up_and_purge` would do for ``before``: the days it would roll up
        and the raw rows it would delete (here and in its shards); changes nothing."""
        async with (
            self._attached(self._shards()),
            self._conn.execute(
                "SELECT count(DISTINCT day), count(*) FROM all_reports WHERE day < ?", (before,)
            ) as cursor,
        ):
            days, rows = await cursor.fetchone() or (0, 0)
        return PurgeResult(days=int(days), rows_deleted=int(rows))

    @contextlib.asynccontextmanager
    async def exclusive(self, job: str) -> AsyncIterator[bool]:
        """Always True: one host, and the server runs such jobs in worker 0 only."""
        yield True

    def _shards(self) -> list[Path]:
        """The worker shards beside this database (none when this is a shard itself)."""
        return existing_shards(self.path)

    @contextlib.asynccontextmanager
    async def _attached(self, shards: Sequence[Path]) -> AsyncIterator[list[str]]:
        """Attach ``shards`` and define ``all_reports`` / ``all_version_checks`` over them."""
        sources = ["main"]
        # A run cancelled while it detached (a server stopping) may have left some attached.
        async with self._conn.execute("PRAGMA database_list") as cursor:
            leftovers = [row[1] for row in await cursor.fetchall() if row[1].startswith("shard")]
        for name in leftovers:
            await self._conn.execute(f"DETACH DATABASE {name}")
        try:
            for number, shard in enumerate(shards, start=1):
                name = f"shard{number}"
                await self._conn.execute(f"ATTACH DATABASE ? AS {name}", (str(shard),))
                async with self._conn.execute(f"PRAGMA {name}.user_version") as cursor:
                    row = await cursor.fetchone()
                if not row or row[0] != len(MIGRATIONS):
                    # A worker that is still creating its shard has committed nothing yet.
                    await self._conn.execute(f"DETACH DATABASE {name}")
                    logger.debug("%s is not migrated yet; left out", shard)
                    continue
                sources.append(name)
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


def _synced_size(path: Path) -> int:
    """Flush ``path`` to disk; its size in bytes."""
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.fsync(descriptor)
        return os.fstat(descriptor).st_size
    finally:
        os.close(descriptor)


def _checked_synchronous(value: str) -> str:
    if value.lower() not in ("off", "normal", "full", "extra"):
        raise ValueError(f"synchronous must be off, normal, full or extra, not {value!r}")
    return value.upper()


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


async def _connect(uri: str) -> aiosqlite.Connection:
    """Connect in aiosqlite's thread. If we are cancelled meanwhile (a background task
    stopped as the server shuts down), wait for the connection and close it: an abandoned
    one would finish later and call back into an event loop that may be closed by then."""
    connecting = asyncio.ensure_future(aiosqlite.connect(uri, isolation_level=None, uri=True))
    try:
        return await asyncio.shield(connecting)
    except asyncio.CancelledError:
        with contextlib.suppress(Exception):
            await (await connecting).close()
        raise


async def _refuse_newer(
    conn: aiosqlite.Connection,
    path: str | Path,
    migrations: Sequence[Sequence[str]] = MIGRATIONS,
) -> None:
    """Raise :class:`SchemaError` for a database migrated by a newer version."""
    version, target = await _user_version(conn), len(migrations)
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
    await _refuse_newer(conn, "database", migrations)
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


# -- backup ------------------------------------------------------------------------------


async def backup_database(
    settings: Settings, dest: Path, *, force: bool = False
) -> list[BackupFile]:
    """Copy ``settings.db`` and every worker shard beside it to ``dest`` (a file, or a folder
    to hold one of the database's name) and its shard names (see ``storage.backup_pairs``):
    each file a consistent snapshot, taken while the server may be running, so that the copy
    is a database ``stats`` or ``serve`` can open as it is.

    Nothing is created or migrated at the source. Each copy is written under a temporary name,
    flushed, then renamed into place: a failed backup never leaves a half-written file under a
    copy's name. Raises :class:`BackupError` when ``dest`` is the database itself, its folder
    is missing, or (without ``force``) a file the backup would write, or a stale shard copy
    that a restore would pick up, already exists; :class:`SchemaError` when ``settings.db`` is
    not a database of this version.
    """
    pairs, stale = _plan_backup(Path(settings.db), dest, force=force)
    written = []
    for source, copy in pairs:
        temporary = copy.with_name(f".{copy.name}.partial")
        temporary.unlink(missing_ok=True)  # left by a backup that was killed
        storage = await SqliteStorage.open(
            source,
            migrate=False,
            busy_timeout_ms=int(settings.busy_timeout * 1000),
        )
        try:
            size = await storage.backup(temporary)
        finally:
            await storage.close()
        for sidecar in _sidecars(copy):  # an old -wal would be replayed over the new copy
            sidecar.unlink(missing_ok=True)
        os.replace(temporary, copy)
        written.append(BackupFile(source, copy, size))
    for shard in stale:
        for path in (shard, *_sidecars(shard)):
            path.unlink(missing_ok=True)
    _sync_directory(pairs[0][1].parent)
    return written


def _plan_backup(
    db: Path, dest: Path, *, force: bool
) -> tuple[list[tuple[Path, Path]], list[Path]]:
    """The (file, copy) pairs of a backup of ``db`` to ``dest``, and the stale shard copies to
    remove; raises :class:`BackupError` (see :func:`backup_database`). A few stat calls: not
    worth a thread."""
    if dest.is_dir():  # a folder: the copy takes the database's own name in it
        dest = dest / db.name
    pairs = backup_pairs(db, dest)
    copies = {copy for _, copy in pairs}
    if {copy.resolve() for copy in copies} & {source.resolve() for source, _ in pairs}:
        raise BackupError(f"{dest} is the database itself; choose another destination")
    if not dest.parent.is_dir():
        raise BackupError(f"{dest}: the directory {dest.parent} does not exist")
    stale = [shard for shard in existing_shards(dest) if shard not in copies]
    in_the_way = [
        path for copy in [*copies, *stale] for path in (copy, *_sidecars(copy)) if path.exists()
    ]
    if in_the_way and not force:
        names = ", ".join(str(path) for path in sorted(in_the_way))
        raise BackupError(f"{names} already exist{'s' if len(in_the_way) == 1 else ''};"
                          " choose another destination or give --force to overwrite")  # fmt: skip
    return pairs, stale


def _sidecars(db: Path) -> tuple[Path, Path]:
    """SQLite's files beside a database in WAL mode."""
    return db.with_name(db.name + "-wal"), db.with_name(db.name + "-shm")


def _sync_directory(folder: Path) -> None:
    """Flush a folder's entries (the renames) to disk."""
    descriptor = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)
