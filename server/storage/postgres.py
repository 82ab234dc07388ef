"""PostgreSQL storage: the same contract as the SQLite :class:`~.storage.Storage`, for several
server nodes on one database (``--db postgresql://user:password@host:5432/dbname``).

One :class:`PostgresStorage` owns a small asyncpg pool. Differences that stay inside this
module: there are no worker shards (every node and worker writes the same tables, so the
``shards`` arguments are accepted and ignored); a batch is committed as a ``COPY`` into a
temporary table and one ``INSERT ... SELECT ... ON CONFLICT`` (``bench/pg_upsert.py`` measured
it against one ``unnest`` statement and ``executemany``), with the rows sorted by key so two
nodes upserting the same instances take their row locks in one order and never deadlock;
schema steps run under an advisory lock, so nodes starting together migrate once; retention
runs on one node at a time (another advisory lock).

The password in a DSN never appears in a log line or an error message: see :func:`redact_dsn`.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections import Counter
from collections.abc import Iterable, Sequence
from datetime import date
from pathlib import Path
from types import EllipsisType
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import asyncpg
from asyncpg.pool import PoolConnectionProxy

from opa_telemetry_server.advisories import Advisory
from opa_telemetry_server.errors import CatalogError, SchemaError, StorageUnavailableError
from opa_telemetry_server.protocol import Report
from opa_telemetry_server.releases import Release
from opa_telemetry_server.versions import parse_version

from .records import (
    SELECT_PRODUCT_POLICIES_SQL,
    SELECT_RELEASE_POLICIES_SQL,
    CatalogParts,
    Day,
    PlatformCount,
    PurgeResult,
    Stats,
    SyncState,
    VersionCount,
    catalog_parts,
    utc_day,
)

logger = logging.getLogger(__name__)

Conn = asyncpg.Connection | PoolConnectionProxy  # a connection, or one lent by the pool

SCHEMES = ("postgresql://", "postgres://")
# Keys of the advisory locks this module takes (any two fixed 64-bit numbers of our own).
MIGRATION_LOCK = 0x6F70_6174_656C_6D31  # "opatelm1"
RETENTION_LOCK = 0x6F70_6174_656C_6D32
CATALOG_CHANNEL = "opa_telemetry_catalog"  # the channel the trigger below notifies

MIGRATIONS: tuple[tuple[str, ...], ...] = (
    (
        "CREATE TABLE meta (key text PRIMARY KEY, value bigint NOT NULL)",
        "INSERT INTO meta (key, value) VALUES ('catalog_generation', 0)",
        """
        CREATE TABLE releases (
            id bigserial PRIMARY KEY,
            product text NOT NULL,
            tag text NOT NULL,
            release_notes text NOT NULL,
            assets text NOT NULL DEFAULT '[]',
            published_on date,
            prerelease boolean NOT NULL DEFAULT false,
            added_at bigint NOT NULL,
            UNIQUE (product, tag)
        )
        """,
        # Any change to the catalog, from any node, the CLI or psql, bumps the generation
        # (which every node polls) and notifies listeners at once.
        """
        CREATE FUNCTION bump_catalog_generation() RETURNS trigger LANGUAGE plpgsql AS $$
        BEGIN
            UPDATE meta SET value = value + 1 WHERE key = 'catalog_generation';
            PERFORM pg_notify('opa_telemetry_catalog', '');
            RETURN NULL;
        END $$
        """,
        # Per row, not per statement: a statement that changes nothing must not bump it.
        """
        CREATE TRIGGER releases_changed AFTER INSERT OR UPDATE OR DELETE
        ON releases FOR EACH ROW EXECUTE FUNCTION bump_catalog_generation()
        """,
        """
        CREATE TRIGGER releases_truncated AFTER TRUNCATE
        ON releases FOR EACH STATEMENT EXECUTE FUNCTION bump_catalog_generation()
        """,
        """
        CREATE TABLE reports (
            product text NOT NULL,
            day date NOT NULL,
            instance_id text NOT NULL,
            first_seen_at bigint NOT NULL,
            last_seen_at bigint NOT NULL,
            report_count integer NOT NULL,
            version text NOT NULL,
            os text,
            arch text,
            heap_usage_bytes bigint,
            min_compatible_version text,
            extra text,
            PRIMARY KEY (product, day, instance_id)
        )
        """,
        """
        CREATE TABLE version_checks (
            product text NOT NULL,
            day date NOT NULL,
            check_count bigint NOT NULL,
            PRIMARY KEY (product, day)
        )
        """,
        """
        CREATE TABLE product_policies (
            product text PRIMARY KEY,
            pinned_tag text,
            min_version text,
            support_notice text,
            updated_at bigint NOT NULL
        )
        """,
        """
        CREATE TABLE release_policies (
            product text NOT NULL,
            tag text NOT NULL,
            yanked boolean NOT NULL DEFAULT false,
            yank_reason text NOT NULL DEFAULT '',
            rollout_percent integer,
            updated_at bigint NOT NULL,
            PRIMARY KEY (product, tag)
        )
        """,
        """
        CREATE TABLE advisories (
            product text NOT NULL,
            id text NOT NULL,
            record text NOT NULL,
            added_at bigint NOT NULL,
            PRIMARY KEY (product, id)
        )
        """,
        """
        CREATE TABLE sync_state (
            product text PRIMARY KEY,
            source text NOT NULL,
            etag text,
            last_attempt_at bigint,
            last_success_at bigint,
            last_error text,
            last_error_at bigint,
            retry_after_at bigint
        )
        """,
        *(
            f"""
            CREATE TRIGGER {table}_changed AFTER INSERT OR UPDATE OR DELETE
            ON {table} FOR EACH ROW EXECUTE FUNCTION bump_catalog_generation()
            """
            for table in ("product_policies", "release_policies", "advisories")
        ),
        """
        CREATE TABLE daily_rollups (
            product text NOT NULL,
            day date NOT NULL,
            version text NOT NULL,
            os text NOT NULL,
            arch text NOT NULL,
            instances bigint NOT NULL,
            reports bigint NOT NULL,
            heap_p50 bigint,
            heap_p90 bigint,
            heap_p99 bigint,
            PRIMARY KEY (product, day, version, os, arch)
        )
        """,
    ),
)

# Per batch: rows land in a per-connection temporary table by COPY, then one statement
# upserts them all. Rows are already one per (product, instance), merged in Python, because
# ON CONFLICT cannot touch one row twice in a statement.
STAGE_SQL = """
CREATE TEMP TABLE IF NOT EXISTS staged_reports (
    product text, instance_id text, n integer, version text, os text, arch text,
    heap bigint, mcv text, extra text
) ON COMMIT DELETE ROWS
"""
STAGE_COLUMNS = ("product", "instance_id", "n", "version", "os", "arch", "heap", "mcv", "extra")

MERGE_REPORTS_SQL = """
INSERT INTO reports (product, day, instance_id, first_seen_at, last_seen_at, report_count,
                     version, os, arch, heap_usage_bytes, min_compatible_version, extra)
SELECT product, $1, instance_id, $2, $2, n, version, os, arch, heap, mcv, extra
FROM staged_reports ORDER BY product, instance_id
ON CONFLICT (product, day, instance_id) DO UPDATE SET
    last_seen_at = excluded.last_seen_at,
    report_count = reports.report_count + excluded.report_count,
    version = excluded.version,
    os = excluded.os,
    arch = excluded.arch,
    heap_usage_bytes = excluded.heap_usage_bytes,
    min_compatible_version = excluded.min_compatible_version,
    extra = excluded.extra
"""

COUNT_CHECKS_SQL = """
INSERT INTO version_checks (product, day, check_count)
SELECT product, $1, n FROM unnest($2::text[], $3::bigint[]) AS c(product, n)
ORDER BY product
ON CONFLICT (product, day) DO UPDATE SET
    check_count = version_checks.check_count + excluded.check_count
"""

INSERT_RELEASE_SQL = """
INSERT INTO releases (product, tag, release_notes, assets, published_on, prerelease, added_at)
VALUES ($1, $2, $3, $4, $5, $6, $7)
ON CONFLICT (product, tag) DO NOTHING
"""

SELECT_SYNC_STATE_SQL = """
SELECT product, source, etag, last_attempt_at, last_success_at, last_error, last_error_at,
       retry_after_at FROM sync_state"""

UPDATE_RELEASE_SQL = """
UPDATE releases SET release_notes = $3, assets = $4, published_on = $5, prerelease = $6
WHERE product = $1 AND tag = $2
    AND (release_notes, assets, published_on, prerelease)
        IS DISTINCT FROM ($3, $4, $5::date, $6)
"""

TOTALS_SQL = """
SELECT count(DISTINCT instance_id), coalesce(sum(report_count), 0) FROM reports
WHERE product = $1 AND day >= $2
"""
CHECKS_SQL = """
SELECT coalesce(sum(check_count), 0) FROM version_checks WHERE product = $1 AND day >= $2
"""
INSTANCES_BY_VERSION_SQL = """
SELECT version, count(DISTINCT instance_id), sum(report_count) FROM reports
WHERE product = $1 AND day >= $2 GROUP BY version
"""
INSTANCES_BY_PLATFORM_SQL = """
SELECT coalesce(os, 'unknown'), coalesce(arch, 'unknown'), count(DISTINCT instance_id)
FROM reports WHERE product = $1 AND day >= $2 GROUP BY 1, 2 ORDER BY 3 DESC, 1, 2
"""
DAILY_SQL = """
SELECT day, count(DISTINCT instance_id), sum(report_count), 'raw' FROM reports
WHERE product = $1 AND day >= $2 GROUP BY day
UNION ALL
SELECT day, sum(instances), sum(reports), 'rollup' FROM daily_rollups
WHERE product = $1 AND day >= $2 GROUP BY day
ORDER BY 1, 4
"""

# One day's raw rows become rollups (nearest-rank heap percentiles: percentile_disc), then go.
ROLL_UP_DAY_SQL = """
INSERT INTO daily_rollups (product, day, version, os, arch, instances, reports,
                           heap_p50, heap_p90, heap_p99)
SELECT product, day, version, coalesce(os, ''), coalesce(arch, ''), count(*), sum(report_count),
       percentile_disc(0.5) WITHIN GROUP (ORDER BY heap_usage_bytes),
       percentile_disc(0.9) WITHIN GROUP (ORDER BY heap_usage_bytes),
       percentile_disc(0.99) WITHIN GROUP (ORDER BY heap_usage_bytes)
FROM reports WHERE day = $1
GROUP BY product, day, version, coalesce(os, ''), coalesce(arch, '')
ON CONFLICT (product, day, version, os, arch) DO UPDATE SET
    instances = daily_rollups.instances + excluded.instances,
    reports = daily_rollups.reports + excluded.reports,
    heap_p50 = coalesce(excluded.heap_p50, daily_rollups.heap_p50),
    heap_p90 = coalesce(excluded.heap_p90, daily_rollups.heap_p90),
    heap_p99 = coalesce(excluded.heap_p99, daily_rollups.heap_p99)
"""

# Errors that mean "the database is not there right now" (down, restarting, cut, failing
# over, too slow) rather than a bug: a write that meets one is a 503, and is retried.
UNAVAILABLE = (
    OSError,
    TimeoutError,
    asyncpg.PostgresConnectionError,
    asyncpg.InterfaceError,
    asyncpg.CannotConnectNowError,
    asyncpg.QueryCanceledError,  # statement_timeout
    asyncpg.AdminShutdownError,
    asyncpg.ReadOnlySQLTransactionError,  # a standby during failover
    asyncpg.DeadlockDetectedError,
    asyncpg.SerializationError,
    asyncpg.InsufficientResourcesError,
)


def is_postgres_url(db: str) -> bool:
    """Whether ``--db`` names a PostgreSQL database rather than a SQLite file."""
    return db.startswith(SCHEMES)


def redact_dsn(dsn: str) -> str:
    """``dsn`` with any password replaced by ``***`` (for logs and errors)."""
    parts = urlsplit(dsn)
    if parts.password is None:
        return dsn
    host = parts.hostname or ""
    if ":" in host:
        host = f"[{host}]"
    netloc = f"{parts.username or ''}:***@{host}" + (f":{parts.port}" if parts.port else "")
    return urlunsplit(parts._replace(netloc=netloc))


def _day(text: str) -> date:
    return date.fromisoformat(text)


class PostgresStorage:
    """A migrated PostgreSQL database behind a small pool. Create with :meth:`open`; close
    is idempotent."""

    def __init__(self, pool: asyncpg.Pool, dsn: str) -> None:
        self._pool = pool
        self.path = redact_dsn(dsn)
        self._closed = False

    @classmethod
    async def open(
        cls,
        dsn: str,
        *,
        migrate: bool = True,
        statement_timeout: float = 5.0,
        pool_size: int = 4,
        wait: float = 0.0,
    ) -> PostgresStorage:
        """Connect to ``dsn`` (TLS when it says ``sslmode=require`` or stricter) and, with
        ``migrate``, apply the schema steps it lacks; without, require exactly this version's
        schema and change nothing.

        While the database cannot be reached, retry every second for up to ``wait`` seconds,
        logging each failure; then raise :class:`SchemaError` (the password never shown).
        """
        deadline = time.monotonic() + wait
        while True:
            try:
                pool = await asyncpg.create_pool(
                    dsn,
                    min_size=1,
                    max_size=pool_size,
                    timeout=10,
                    command_timeout=statement_timeout + 5,
                    server_settings={
                        "statement_timeout": str(int(statement_timeout * 1000)),
                        "application_name": "opa-telemetry",
                    },
                )
                break
            except (*UNAVAILABLE, asyncpg.PostgresError) as exc:
                reason = _reason(exc, dsn)
                if isinstance(exc, asyncpg.InvalidPasswordError | asyncpg.InvalidCatalogNameError):
                    raise SchemaError(f"{redact_dsn(dsn)}: {reason}") from None
                if time.monotonic() >= deadline:
                    raise SchemaError(f"{redact_dsn(dsn)}: cannot connect: {reason}") from None
                logger.warning(
                    "PostgreSQL at %s is not reachable (%s); retrying", redact_dsn(dsn), reason
                )
                await asyncio.sleep(1)
        storage = cls(pool, dsn)
        try:
            if migrate:
                await storage._migrate()
            else:
                await storage._check_current()
        except BaseException:
            await storage.close()
            raise
        return storage

    async def close(self) -> None:
        if not self._closed:
            self._closed = True
            await self._pool.close()

    async def ping(self) -> None:
        """Raise :class:`StorageUnavailableError` unless the database answers a query."""
        try:
            await self._pool.fetchval("SELECT value FROM meta WHERE key = 'catalog_generation'")
        except UNAVAILABLE as exc:
            raise StorageUnavailableError(f"database does not answer: {exc}") from None

    async def schema_version(self) -> int:
        return await self._schema_version(self._pool)

    # -- the hot path -----------------------------------------------------------------------

    async def write_batch(
        self, reports: Sequence[Report], checks: Iterable[str], now: float
    ) -> None:
        """Commit ``reports`` (upserted per product, day, instance) and version ``checks`` in
        one transaction; all or nothing. Raises :class:`StorageUnavailableError` when the
        transaction cannot commit (the database down, restarting, cut off, read-only)."""
        day, seconds = _day(utc_day(now)), int(now)
        merged: dict[tuple[str, str], list[Any]] = {}
        for r in reports:  # the latest report of an instance wins; its count adds up
            key = (r.product, r.instance_id)
            count = merged[key][2] + 1 if key in merged else 1
            merged[key] = [
                r.product, r.instance_id, count, r.version.text, r.os, r.arch,
                r.heap_usage_bytes, r.min_compatible_version, r.extra,
            ]  # fmt: skip
        rows = [tuple(merged[key]) for key in sorted(merged)]
        counts = sorted(Counter(checks).items())
        try:
            async with self._pool.acquire() as conn, conn.transaction():
                if rows:
                    await conn.execute(STAGE_SQL)
                    await conn.copy_records_to_table(
                        "staged_reports", records=rows, columns=STAGE_COLUMNS
                    )
                    await conn.execute(MERGE_REPORTS_SQL, day, seconds)
                if counts:
                    products, numbers = zip(*counts, strict=True)
                    await conn.execute(COUNT_CHECKS_SQL, day, list(products), list(numbers))
        except UNAVAILABLE as exc:
            raise StorageUnavailableError(f"could not commit: {_reason(exc)}") from None

    # -- the release catalog ----------------------------------------------------------------

    async def catalog_generation(self) -> int:
        value = await self._pool.fetchval("SELECT value FROM meta WHERE key = 'catalog_generation'")
        return int(value or 0)

    async def load_catalog_parts(self) -> CatalogParts:
        """Read every product's releases, policy and advisories (see ``catalog_parts``)."""
        async with self._pool.acquire() as conn, conn.transaction(readonly=True):
            releases = await conn.fetch(
                "SELECT id, product, tag, release_notes, assets, published_on::text, prerelease"
                " FROM releases"
            )
            product_policies = await conn.fetch(SELECT_PRODUCT_POLICIES_SQL)
            release_policies = await conn.fetch(SELECT_RELEASE_POLICIES_SQL)
            advisories = await conn.fetch("SELECT product, id, record FROM advisories")
        rows = (releases, product_policies, release_policies, advisories)
        return catalog_parts(*([tuple(row) for row in table] for table in rows))

    async def set_product_policy(self, product: str, **changes: str | None) -> None:
        """Set ``pinned_tag``, ``min_version`` and/or ``support_notice`` (``None`` clears)."""
        allowed = ("pinned_tag", "min_version", "support_notice")
        if not changes or set(changes) - set(allowed):
            raise ValueError(f"policy fields are {sorted(allowed)}")
        # Untouched fields keep their value: each column is set from $n or left as it is.
        given = [name in changes for name in allowed]
        values = [changes.get(name) for name in allowed]
        await self._pool.execute(
            """
            INSERT INTO product_policies AS p (product, pinned_tag, min_version,
                                               support_notice, updated_at)
            VALUES ($1, $2, $3, $4, $8)
            ON CONFLICT (product) DO UPDATE SET
                pinned_tag = CASE WHEN $5 THEN excluded.pinned_tag ELSE p.pinned_tag END,
                min_version = CASE WHEN $6 THEN excluded.min_version ELSE p.min_version END,
                support_notice = CASE WHEN $7 THEN excluded.support_notice
                                      ELSE p.support_notice END,
                updated_at = excluded.updated_at
            """,
            product, *values, *given, int(time.time()),
        )  # fmt: skip

    async def set_release_policy(
        self,
        product: str,
        tag: str,
        *,
        yanked: bool | None = None,
        reason: str | None = None,
        rollout_percent: int | EllipsisType | None = ...,
    ) -> bool:
        """Yank/unyank a release or set its rollout (``None``: fully rolled out); returns
        whether anything changed; :class:`CatalogError` if ``tag`` is not in the catalog."""
        async with self._pool.acquire() as conn, conn.transaction():
            if not await conn.fetchval(
                "SELECT 1 FROM releases WHERE product = $1 AND tag = $2", product, tag
            ):
                raise CatalogError(f"{product} {tag} is not in the catalog")
            row = await conn.fetchrow(
                "SELECT yanked, yank_reason, rollout_percent FROM release_policies"
                " WHERE product = $1 AND tag = $2 FOR UPDATE",
                product, tag,
            )  # fmt: skip
            old = (bool(row[0]), row[1], row[2]) if row else (False, "", None)
            new = (
                old[0] if yanked is None else yanked,
                (reason or "") if yanked else ("" if yanked is False else old[1]),
                old[2] if rollout_percent is ... else rollout_percent,
            )
            if new == old:
                return False
            await conn.execute(
                "INSERT INTO release_policies (product, tag, yanked, yank_reason,"
                " rollout_percent, updated_at) VALUES ($1, $2, $3, $4, $5, $6)"
                " ON CONFLICT (product, tag) DO UPDATE SET yanked = excluded.yanked,"
                " yank_reason = excluded.yank_reason,"
                " rollout_percent = excluded.rollout_percent, updated_at = excluded.updated_at",
                product, tag, *new, int(time.time()),
            )  # fmt: skip
        return True

    async def import_advisories(
        self, product: str, advisories: Sequence[Advisory], *, seed: bool = False
    ) -> tuple[int, int]:
        """Add new advisories and replace changed ones in one transaction; (added, updated).
        With ``seed``, only once per database lifetime."""
        added = updated = 0
        now = int(time.time())
        async with self._pool.acquire() as conn, conn.transaction():
            if seed:
                key = f"advisories_seeded:{product}"
                await conn.execute("SELECT pg_advisory_xact_lock($1)", MIGRATION_LOCK)
                if await conn.fetchval("SELECT 1 FROM meta WHERE key = $1", key):
                    return 0, 0
                await conn.execute("INSERT INTO meta (key, value) VALUES ($1, $2)", key, now)
            for advisory in advisories:
                record = json.dumps(advisory.record, sort_keys=True)
                status = await conn.execute(
                    "INSERT INTO advisories (product, id, record, added_at)"
                    " VALUES ($1, $2, $3, $4) ON CONFLICT (product, id) DO NOTHING",
                    product, advisory.id, record, now,
                )  # fmt: skip
                if status != "INSERT 0 0":
                    added += 1
                    continue
                status = await conn.execute(
                    "UPDATE advisories SET record = $3 WHERE product = $1 AND id = $2"
                    " AND record IS DISTINCT FROM $3",
                    product, advisory.id, record,
                )  # fmt: skip
                updated += _count(status)
        return added, updated

    async def remove_advisory(self, product: str, ident: str) -> bool:
        status = await self._pool.execute(
            "DELETE FROM advisories WHERE product = $1 AND id = $2", product, ident
        )
        return _count(status) > 0

    async def sync_state(self, product: str) -> SyncState | None:
        row = await self._pool.fetchrow(SELECT_SYNC_STATE_SQL + " WHERE product = $1", product)
        return SyncState(*row) if row else None

    async def sync_states(self) -> list[SyncState]:
        rows = await self._pool.fetch(SELECT_SYNC_STATE_SQL + " ORDER BY product")
        return [SyncState(*row) for row in rows]

    async def save_sync_state(self, state: SyncState) -> None:
        await self._pool.execute(
            """
            INSERT INTO sync_state (product, source, etag, last_attempt_at, last_success_at,
                                    last_error, last_error_at, retry_after_at)
            VALUES ($1, $2, $3, $4, $5, $6, $7, $8)
            ON CONFLICT (product) DO UPDATE SET source = excluded.source,
                etag = excluded.etag, last_attempt_at = excluded.last_attempt_at,
                last_success_at = excluded.last_success_at, last_error = excluded.last_error,
                last_error_at = excluded.last_error_at, retry_after_at = excluded.retry_after_at
            """,
            state.product, state.source, state.etag, state.last_attempt_at,
            state.last_success_at, state.last_error, state.last_error_at, state.retry_after_at,
        )  # fmt: skip

    async def sync_releases(
        self, product: str, releases: Sequence[Release], *, prune: bool
    ) -> tuple[int, int, int]:
        """Add and update ``releases`` and, with ``prune``, remove the product's releases not
        among them; one transaction. Returns (added, updated, removed)."""
        async with self._pool.acquire() as conn, conn.transaction():
            added, updated = await _import(conn, product, releases, update=True)
            removed = 0
            if prune:
                status = await conn.execute(
                    "DELETE FROM releases WHERE product = $1 AND NOT (tag = ANY($2::text[]))",
                    product, [r.tag for r in releases],
                )  # fmt: skip
                removed = _count(status)
        return added, updated, removed

    async def seed_catalog(self, product: str, releases: Sequence[Release]) -> int:
        """Import ``releases`` once per database lifetime; 0 when seeded before."""
        key = f"catalog_seeded:{product}"
        async with self._pool.acquire() as conn, conn.transaction():
            await conn.execute("SELECT pg_advisory_xact_lock($1)", MIGRATION_LOCK)
            if await conn.fetchval("SELECT 1 FROM meta WHERE key = $1", key):
                return 0
            added, _ = await _import(conn, product, releases, update=False)
            await conn.execute(
                "INSERT INTO meta (key, value) VALUES ($1, $2)", key, int(time.time())
            )
        return added

    async def add_release(self, product: str, release: Release, *, replace: bool = False) -> bool:
        """Add one release; ``True`` if new, ``False`` if it replaced one; CatalogError if
        the tag exists and not ``replace``."""
        async with self._pool.acquire() as conn, conn.transaction():
            added, _ = await _import(conn, product, [release], update=replace)
            if not (added or replace):
                raise CatalogError(
                    f"{product} {release.tag} is already in the catalog (use --replace)"
                )
        return bool(added)

    async def import_releases(self, product: str, releases: Sequence[Release]) -> tuple[int, int]:
        async with self._pool.acquire() as conn, conn.transaction():
            return await _import(conn, product, releases, update=True)

    async def remove_release(self, product: str, tag: str) -> bool:
        status = await self._pool.execute(
            "DELETE FROM releases WHERE product = $1 AND tag = $2", product, tag
        )
        return _count(status) > 0

    # -- statistics -------------------------------------------------------------------------

    async def stats(self, product: str, since: str, shards: Sequence[Path] = ()) -> Stats:
        args = (product, _day(since))
        async with self._pool.acquire() as conn, conn.transaction(readonly=True):
            instances, reports = await conn.fetchrow(TOTALS_SQL, *args) or (0, 0)
            checks = await conn.fetchval(CHECKS_SQL, *args) or 0
            by_version = [
                VersionCount(v, int(i), int(r))
                for v, i, r in await conn.fetch(INSTANCES_BY_VERSION_SQL, *args)
            ]
            by_platform = [
                PlatformCount(o, a, int(i))
                for o, a, i in await conn.fetch(INSTANCES_BY_PLATFORM_SQL, *args)
            ]
        by_version.sort(key=lambda c: parse_version(c.version).precedence, reverse=True)
        return Stats(
            product, since, int(instances), int(reports), int(checks), by_version, by_platform
        )

    async def daily(self, product: str, since: str, shards: Sequence[Path] = ()) -> list[Day]:
        rows = await self._pool.fetch(DAILY_SQL, product, _day(since))
        return [Day(d.isoformat(), int(i), int(r), source) for d, i, r, source in rows]

    # -- retention ---------------------------------------------------------------------------

    async def count_expired(self, before: str, shards: Sequence[Path] = ()) -> PurgeResult:
        days, rows = await self._pool.fetchrow(
            "SELECT count(DISTINCT day), count(*) FROM reports WHERE day < $1", _day(before)
        ) or (0, 0)
        return PurgeResult(days=int(days), rows_deleted=int(rows))

    async def roll_up_and_purge(self, before: str, shards: Sequence[Path] = ()) -> PurgeResult:
        """For every UTC day before ``before`` with raw rows, write its rollups and delete its
        rows, one transaction per day. Only one node does this at a time: a node that finds
        another at it returns an empty result."""
        result = PurgeResult()
        async with self._pool.acquire() as conn:
            if not await conn.fetchval("SELECT pg_try_advisory_lock($1)", RETENTION_LOCK):
                logger.info("retention: another node is running it; skipped")
                return result
            try:
                days = await conn.fetch(
                    "SELECT DISTINCT day FROM reports WHERE day < $1 ORDER BY day", _day(before)
                )
                for (day,) in days:
                    async with conn.transaction():
                        await conn.execute(ROLL_UP_DAY_SQL, day)
                        status = await conn.execute("DELETE FROM reports WHERE day = $1", day)
                    result.rows_deleted += _count(status)
                    result.days += 1
            finally:
                await conn.execute("SELECT pg_advisory_unlock($1)", RETENTION_LOCK)
        return result

    # -- schema -------------------------------------------------------------------------------

    @staticmethod
    async def _schema_version(conn: asyncpg.Pool | Conn) -> int:
        exists = await conn.fetchval("SELECT to_regclass('meta') IS NOT NULL")
        if not exists:
            return 0
        value = await conn.fetchval("SELECT value FROM meta WHERE key = 'schema_version'")
        return int(value or 0)

    async def _migrate(self) -> None:
        """Apply the steps this database lacks, each in its own transaction, under an
        advisory lock so that nodes starting together migrate once."""
        target = len(MIGRATIONS)
        async with self._pool.acquire() as conn:
            for number, statements in enumerate(MIGRATIONS, start=1):
                async with conn.transaction():
                    await conn.execute("SELECT pg_advisory_xact_lock($1)", MIGRATION_LOCK)
                    version = await self._schema_version(conn)
                    if version > target:
                        raise SchemaError(
                            f"{self.path} has schema version {version}, newer than this"
                            f" version's {target}; upgrade opa-telemetry"
                        )
                    if version >= number:
                        continue
                    for statement in statements:
                        await conn.execute(statement)
                    await conn.execute(
                        "INSERT INTO meta (key, value) VALUES ('schema_version', $1)"
                        " ON CONFLICT (key) DO UPDATE SET value = excluded.value",
                        number,
                    )
                    logger.info("database migrated to schema version %d", number)

    async def _check_current(self) -> None:
        version, target = await self.schema_version(), len(MIGRATIONS)
        if version == 0:
            raise SchemaError(
                f"{self.path} is not an opa-telemetry database (start the server with it once"
                " to create one, or check --db)"
            )
        if version != target:
            which = "older" if version < target else "newer"
            action = (
                "start the server once to upgrade it"
                if version < target
                else "upgrade opa-telemetry"
            )
            raise SchemaError(
                f"{self.path} has schema version {version}, {which} than this version's"
                f" {target}: {action}"
            )


async def _import(
    conn: Conn, product: str, releases: Iterable[Release], *, update: bool
) -> tuple[int, int]:
    added = updated = 0
    now = int(time.time())
    for release in releases:
        fields = (
            release.release_notes,
            json.dumps([asset.to_json() for asset in release.assets]),
            release.published,
            release.prerelease,
        )
        status = await conn.execute(INSERT_RELEASE_SQL, product, release.tag, *fields, now)
        if status != "INSERT 0 0":
            added += 1
        elif update:
            status = await conn.execute(UPDATE_RELEASE_SQL, product, release.tag, *fields)
            updated += _count(status)
    return added, updated


def _count(status: str) -> int:
    """The row count of a command status such as ``DELETE 3``."""
    return int(status.rsplit(" ", 1)[-1])


def _reason(exc: BaseException, dsn: str = "") -> str:
    """A one-line reason for a database error, with any password removed."""
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    password = urlsplit(dsn).password if dsn else None
    return text.replace(password, "***") if password else text
