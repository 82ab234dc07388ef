"""PostgreSQL storage: the same contract as SQLite (the ``Storage`` protocol), for several
server nodes on one database (``--db postgresql://user:password@host:5432/dbname``).

One :class:`PostgresStorage` owns a small asyncpg pool. Differences that stay inside this
module: there are no worker shards (every node and worker writes the same tables, so the
``shards`` arguments are accepted and ignored); a batch is committed as a ``COPY`` into a
temporary table and one ``INSERT ... SELECT ... ON CONFLICT`` (``bench/pg_upsert.py`` measured
it against one ``unnest`` statement and ``executemany``), with the rows sorted by key so two
nodes upserting the same instances take their row locks in one order and never deadlock;
schema steps run under an advisory lock, so nodes starting together migrate once; retention
runs on one node at a time (another advisory lock).

Failover: ``--db`` may name several servers, ``postgresql://user@host1:5432,host2:5432/db``;
each new connection takes the first of them that accepts writes (``target_session_attrs``:
``read-write`` when several are named and the DSN does not choose). A connection that finds
its server read-only (a standby, or ``default_transaction_read_only``) expires the whole pool,
so that every connection is made anew, through the host list, as it comes back; meanwhile
writes raise :class:`StorageUnavailableError` (a 503 with ``Retry-After``).

The password in a DSN never appears in a log line or an error message: see :func:`redact_dsn`.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import logging
import re
import ssl
import time
import zlib
from collections import Counter
from collections.abc import AsyncIterator, Iterable, Iterator, Sequence
from datetime import date, timedelta
from types import EllipsisType
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

import asyncpg
from asyncpg.connect_utils import SessionAttribute
from asyncpg.pool import PoolConnectionProxy

from opa_telemetry_server.domain.advisories import Advisory
from opa_telemetry_server.domain.protocol import Report
from opa_telemetry_server.domain.releases import Release
from opa_telemetry_server.errors import CatalogError, SchemaError, StorageUnavailableError
from opa_telemetry_server.storage.postgres.migrations import MIGRATIONS
from opa_telemetry_server.storage.records import (
    AGGREGATED_AT_KEY,
    SELECT_PRODUCT_POLICIES_SQL,
    SELECT_RELEASE_POLICIES_SQL,
    STATS_DAY_TABLES,
    WATERMARK_KEY,
    AggregateResult,
    CatalogParts,
    ProductCounts,
    PurgeResult,
    SyncState,
    Window,
    catalog_parts,
    day_detail,
    utc_day,
)

logger = logging.getLogger(__name__)

Conn = asyncpg.Connection | PoolConnectionProxy  # a connection, or one lent by the pool

SCHEMES = ("postgresql://", "postgres://")
# Keys of the advisory locks this module takes (any two fixed 64-bit numbers of our own).
MIGRATION_LOCK = 0x6F70_6174_656C_6D31  # "opatelm1"
RETENTION_LOCK = 0x6F70_6174_656C_6D32
AGGREGATE_LOCK = 0x6F70_6174_656C_6D33
JOB_LOCKS = 0x6F70_6174_0000_0000  # + CRC-32 of the job's name
SECRET_PARAMETERS = frozenset({"password", "sslpassword"})  # in a DSN's query string

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

# -- statistics: the same aggregates as SQLite's (see ``sqlite``), one database for all nodes --
# Product-days with rows seen since the watermark (the day index, then a filter on today's
# rows), and release checks by day.
CHANGED_DAYS_SQL = """
SELECT DISTINCT product, day FROM reports WHERE day >= $1 AND last_seen_at >= $2
"""
CHECK_DAYS_SQL = "SELECT product, day, check_count FROM version_checks WHERE day >= $1"
# One pass over a product-day's rows. Heap bucket b holds heaps in [2^(b/8), 2^((b+1)/8))
# bytes, as in SQLite. The bucket comes from a float8 logarithm (a tenth of numeric's cost: a
# 100,000-instance day groups in 0.35 s instead of 3 s); only a heap whose 8*log2 lies within
# 1e-6 of a whole number (an exact power of two, the only values on an edge) takes numeric's
# exact log, which keeps it on its bucket's lower edge.
DAY_GROUPS_SQL = """
SELECT version, coalesce(os, ''), coalesce(arch, ''), coalesce(min_compatible_version, ''),
       CASE WHEN heap_usage_bytes IS NULL THEN NULL
            WHEN abs(e - round(e)) < 1e-6
            THEN floor(log(2.0, greatest(heap_usage_bytes, 1)::numeric) * 8)::integer
            ELSE floor(e)::integer END,
       count(*), sum(report_count)::bigint
FROM reports,
     LATERAL (SELECT ln(greatest(heap_usage_bytes, 1)::float8) / ln(2.0::float8) * 8 AS e) AS l
WHERE product = $1 AND day = $2 GROUP BY 1, 2, 3, 4, 5
"""
UPDATE_STATS_CHECKS_SQL = """
INSERT INTO stats_days (product, day, instances, reports, version_checks)
VALUES ($1, $2, 0, 0, $3)
ON CONFLICT (product, day) DO UPDATE SET version_checks = excluded.version_checks
"""
STATS_COLUMNS = {
    "stats_days": ("product", "day", "instances", "reports", "version_checks"),
    "stats_versions": ("product", "day", "version", "instances", "reports"),
    "stats_platforms": ("product", "day", "os", "arch", "instances"),
    "stats_min_compatible": ("product", "day", "min_compatible_version", "instances"),
    "stats_heaps": ("product", "day", "version", "bucket", "instances"),
}
WINDOW_DAYS_SQL = """
SELECT day::text, instances, reports, version_checks FROM stats_days
WHERE product = $1 AND day BETWEEN $2 AND $3 ORDER BY day
"""
WINDOW_VERSIONS_SQL = """
SELECT day::text, version, instances, reports FROM stats_versions
WHERE product = $1 AND day BETWEEN $2 AND $3
"""
WINDOW_PLATFORMS_SQL = """
SELECT os, arch, sum(instances)::bigint FROM stats_platforms
WHERE product = $1 AND day BETWEEN $2 AND $3 GROUP BY 1, 2
"""
WINDOW_MIN_COMPATIBLE_SQL = """
SELECT min_compatible_version, sum(instances)::bigint FROM stats_min_compatible
WHERE product = $1 AND day BETWEEN $2 AND $3 GROUP BY 1
"""
WINDOW_HEAPS_SQL = """
SELECT version, bucket, sum(instances)::bigint FROM (
    SELECT version, bucket, instances FROM stats_heap_totals
    WHERE product = $1 AND day = (
        SELECT max(day) FROM stats_heap_totals WHERE product = $1 AND day <= $3)
    UNION ALL
    SELECT version, bucket, -instances FROM stats_heap_totals
    WHERE product = $1 AND day = (
        SELECT max(day) FROM stats_heap_totals WHERE product = $1 AND day < $2)
) AS t GROUP BY 1, 2 HAVING sum(instances) > 0
"""
PRODUCTS_SQL = """
SELECT product, sum(reports)::bigint,
       sum(CASE WHEN day = $1 THEN instances ELSE 0 END)::bigint
FROM stats_days GROUP BY 1
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
    asyncpg.exceptions.InternalClientError,  # a connection cut mid-operation, seen by the pool
)

# What a server starting before its database is not kept waiting for: a wrong password or
# database name, a certificate that is not trusted (sslmode=verify-ca, verify-full).
FATAL_AT_START = (
    asyncpg.InvalidPasswordError,
    asyncpg.InvalidCatalogNameError,
    ssl.SSLCertVerificationError,
)


def is_postgres_url(db: str) -> bool:
    """Whether ``--db`` names a PostgreSQL database rather than a SQLite file."""
    return db.startswith(SCHEMES)


def redact_dsn(dsn: str) -> str:
    """``dsn`` with every password replaced by ``***``: in the ``user:password@`` part and in
    the query string (``?password=...``, ``sslpassword``), for logs and errors. Several hosts
    (``host1:5432,host2:5432``) are kept as they are. A password written without
    percent-encoding (a ``#``, ``/`` or ``?`` in it) is hidden whole too (see
    :func:`_split_password`)."""
    head, password, tail = _split_password(dsn)
    base, question, query = (dsn if password is None else f"{head}***{tail}").partition("?")
    query = "&".join(
        f"{key}=***" if key.lower() in SECRET_PARAMETERS else f"{key}={value}" if sep else key
        for key, sep, value in (item.partition("=") for item in query.split("&") if item)
    )
    return f"{base}{question}{query}"


def _split_password(dsn: str) -> tuple[str, str | None, str]:
    """``dsn`` as (what comes before its ``user:password@`` part's password, the password,
    what follows it); the password is ``None`` when there is none. Read on the text, not as
    URL parsing reads it: the password runs from the first ``:`` after ``//`` to the last
    ``@``, so that one with an unencoded ``#``, ``/`` or ``?`` (which ends a URL's authority)
    is found whole. A ``@`` in the query string of a DSN without a password hides more than
    the password, never less."""
    scheme, sep, rest = dsn.partition("://")
    userinfo, at, hosts = rest.rpartition("@")
    user, colon, password = userinfo.partition(":")
    if not (at and colon):
        return dsn, None, ""
    return f"{scheme}{sep}{user}:", password, f"@{hosts}"


def _secrets(dsn: str) -> list[str]:
    """Every password ``dsn`` carries, as written and decoded, and the pieces of 3 characters
    or more of one that URL parsing would cut at ``#``, ``/``, ``?`` or ``:`` (a driver's
    message may quote such a piece as a port or a host); for scrubbing messages."""
    _, password, tail = _split_password(dsn)
    found = [password] if password else []
    query = (dsn if password is None else tail).partition("?")[2]
    found += [
        value
        for key, _, value in (item.partition("=") for item in query.split("&"))
        if key.lower() in SECRET_PARAMETERS and value
    ]
    found += [
        piece
        for secret in list(found)
        for piece in re.split(r"[#/?:@\[\]]", secret)
        if len(piece) >= 3
    ]
    return sorted({*found, *map(unquote, found)}, key=len, reverse=True)


def _target_session_attrs(dsn: str) -> SessionAttribute | None:
    """``read-write`` for a DSN naming several hosts and no ``target_session_attrs``: a node
    writes, so it must pass over a standby rather than stick to the first host that answers.
    ``None`` (the DSN's own choice, or asyncpg's default) otherwise."""
    try:
        parts = urlsplit(dsn)
    except ValueError:  # not a URL: open() says so in its own words
        return None
    query = parse_qs(parts.query)
    hosts = [parts.netloc.rpartition("@")[2], *query.get("host", [])]
    several = any("," in value for value in hosts)
    chosen = "target_session_attrs" in query
    return SessionAttribute.read_write if several and not chosen else None


@contextlib.contextmanager
def _faults(action: str) -> Iterator[None]:
    """Raise the database's being away (down, cut, failing over, read-only) as
    :class:`StorageUnavailableError`: one line for a background job's log, no traceback."""
    try:
        yield
    except UNAVAILABLE as exc:
        raise StorageUnavailableError(f"{action}: {_reason(exc)}") from None


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
        # No floor of open connections (min_size=0): asyncpg would keep one by reconnecting in
        # the background, logging a traceback per attempt while a failover lasts. Connections
        # are made when needed and kept while in use (idle ones close after five minutes).
        pool = await asyncpg.create_pool(
            dsn,
            target_session_attrs=_target_session_attrs(dsn),
            min_size=0,
            max_size=pool_size,
            timeout=10,
            command_timeout=statement_timeout + 5 if statement_timeout else None,
            server_settings={
                "statement_timeout": str(int(statement_timeout * 1000)),
                "application_name": "opa-telemetry",
            },
        )
        deadline = time.monotonic() + wait
        try:
            while True:
                try:
                    async with pool.acquire():  # reachable, and it lets us in
                        break
                except asyncpg.ClientConfigurationError as exc:  # a setting: no use retrying
                    raise SchemaError(f"{redact_dsn(dsn)}: {_reason(exc, dsn)}") from None
                except (*UNAVAILABLE, asyncpg.PostgresError) as exc:
                    reason = _reason(exc, dsn)
                    if isinstance(exc, FATAL_AT_START):  # waiting will not mend these
                        raise SchemaError(f"{redact_dsn(dsn)}: {reason}") from None
                    if time.monotonic() >= deadline:
                        raise SchemaError(f"{redact_dsn(dsn)}: cannot connect: {reason}") from None
                    logger.warning(
                        "PostgreSQL at %s is not reachable (%s); retrying", redact_dsn(dsn), reason
                    )
                    await asyncio.sleep(1)
                except ValueError:  # the URL; its text may quote a piece of the password: not shown
                    raise SchemaError(
                        f"{redact_dsn(dsn)}: not a valid PostgreSQL URL (percent-encode any"
                        " of : / ? # @ [ ] in the password: # as %23, / as %2F...)"
                    ) from None
        except BaseException:
            await pool.close()
            raise
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

    def connection(self) -> Any:
        """A connection lent by the pool, as an async context manager (for ``transfer``, whose
        block also reads SQLite: its errors stay its own)."""
        return self._pool.acquire()

    @contextlib.asynccontextmanager
    async def _acquire(self, action: str = "database does not answer") -> AsyncIterator[Conn]:
        """A connection lent by the pool, for a block that only talks to the database: its
        being away (down, cut, failing over, read-only) raises :class:`StorageUnavailableError`
        (``action: reason``, one line). A connection that finds its server read-only (a
        standby, a demoted primary, ``default_transaction_read_only``) expires the pool: each
        connection is closed as it comes back and made anew through the DSN's hosts, so the
        pool finds the new primary by itself after a failover."""
        with _faults(action):
            async with self._pool.acquire() as conn:
                try:
                    yield conn
                except asyncpg.ReadOnlySQLTransactionError:
                    await self._pool.expire_connections()
                    raise

    async def _execute(self, sql: str, *args: Any) -> str:
        async with self._acquire() as conn:
            return await conn.execute(sql, *args)

    async def _fetch(self, sql: str, *args: Any) -> list[asyncpg.Record]:
        async with self._acquire() as conn:
            return await conn.fetch(sql, *args)

    async def _fetchrow(self, sql: str, *args: Any) -> asyncpg.Record | None:
        async with self._acquire() as conn:
            return await conn.fetchrow(sql, *args)

    async def _fetchval(self, sql: str, *args: Any) -> Any:
        async with self._acquire() as conn:
            return await conn.fetchval(sql, *args)

    async def close(self) -> None:
        if not self._closed:
            self._closed = True
            await self._pool.close()

    async def ping(self) -> None:
        """Raise :class:`StorageUnavailableError` unless the database answers a query."""
        await self._fetchval("SELECT value FROM meta WHERE key = 'catalog_generation'")

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
        async with self._acquire("could not commit") as conn, conn.transaction():
            if rows:
                await conn.execute(STAGE_SQL)
                await conn.copy_records_to_table(
                    "staged_reports", records=rows, columns=STAGE_COLUMNS
                )
                await conn.execute(MERGE_REPORTS_SQL, day, seconds)
            if counts:
                products, numbers = zip(*counts, strict=True)
                await conn.execute(COUNT_CHECKS_SQL, day, list(products), list(numbers))

    # -- the release catalog ----------------------------------------------------------------

    async def catalog_generation(self) -> int:
        value = await self._fetchval("SELECT value FROM meta WHERE key = 'catalog_generation'")
        return int(value or 0)

    async def load_catalog_parts(self) -> CatalogParts:
        """Read every product's releases, policy and advisories (see ``catalog_parts``)."""
        async with (
            self._acquire("cannot read the catalog") as conn,
            conn.transaction(readonly=True),
        ):
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
        await self._execute(
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
        async with self._acquire() as conn, conn.transaction():
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
        async with self._acquire() as conn, conn.transaction():
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
        status = await self._execute(
            "DELETE FROM advisories WHERE product = $1 AND id = $2", product, ident
        )
        return _count(status) > 0

    async def sync_state(self, product: str) -> SyncState | None:
        row = await self._fetchrow(SELECT_SYNC_STATE_SQL + " WHERE product = $1", product)
        return SyncState(*row) if row else None

    async def sync_states(self) -> list[SyncState]:
        rows = await self._fetch(SELECT_SYNC_STATE_SQL + " ORDER BY product")
        return [SyncState(*row) for row in rows]

    async def save_sync_state(self, state: SyncState) -> None:
        await self._execute(
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
        async with self._acquire() as conn, conn.transaction():
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
        async with self._acquire() as conn, conn.transaction():
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
        async with self._acquire() as conn, conn.transaction():
            added, _ = await _import(conn, product, [release], update=replace)
            if not (added or replace):
                raise CatalogError(
                    f"{product} {release.tag} is already in the catalog (use --replace)"
                )
        return bool(added)

    async def import_releases(self, product: str, releases: Sequence[Release]) -> tuple[int, int]:
        async with self._acquire() as conn, conn.transaction():
            return await _import(conn, product, releases, update=True)

    async def remove_release(self, product: str, tag: str) -> bool:
        status = await self._execute(
            "DELETE FROM releases WHERE product = $1 AND tag = $2", product, tag
        )
        return _count(status) > 0

    # -- statistics -------------------------------------------------------------------------

    async def aggregate(self, *, now: float | None = None, lag: float = 600.0) -> AggregateResult:
        """Rewrite the aggregates of every product-day with rows seen since the watermark,
        then move the watermark to ``now - lag`` (see ``SqliteStorage.aggregate``). One node
        at a time: a node that finds another at it returns an empty result. Raises
        :class:`StorageUnavailableError` when the database is away."""
        started = time.time() if now is None else now
        async with self._acquire("cannot aggregate") as conn:
            if not await conn.fetchval("SELECT pg_try_advisory_lock($1)", AGGREGATE_LOCK):
                return AggregateResult()
            try:
                watermark = await _meta(conn, WATERMARK_KEY)
                result = await _aggregate_since(conn, watermark)
                await _set_meta(conn, WATERMARK_KEY, int(started - lag))
                await _set_meta(conn, AGGREGATED_AT_KEY, int(started))
            finally:
                await _unlock(conn, AGGREGATE_LOCK)
        return result

    async def window(self, product: str, since: str, until: str) -> Window:
        args = (product, _day(since), _day(until))
        async with self._acquire() as conn, conn.transaction(readonly=True):
            results = [
                [tuple(row) for row in await conn.fetch(sql, *args)]
                for sql in (
                    WINDOW_DAYS_SQL,
                    WINDOW_VERSIONS_SQL,
                    WINDOW_PLATFORMS_SQL,
                    WINDOW_MIN_COMPATIBLE_SQL,
                    WINDOW_HEAPS_SQL,
                )
            ]
            aggregated_at = await _meta(conn, AGGREGATED_AT_KEY)
        days, versions, platforms, min_compatible, heaps = results
        return Window(
            days=days,
            versions=versions,
            platforms=platforms,
            min_compatible=min_compatible,
            heaps=heaps,
            aggregated_at=aggregated_at,
        )

    async def products(self, today: str) -> list[ProductCounts]:
        releases = dict(await self.release_counts())
        rows = await self._fetch(PRODUCTS_SQL, _day(today))
        seen = {p: (int(r), int(i)) for p, r, i in rows}
        return [
            ProductCounts(name, releases.get(name, 0), *seen.get(name, (0, 0)))
            for name in sorted(releases.keys() | seen.keys())
        ]

    async def release_counts(self) -> list[tuple[str, int]]:
        rows = await self._fetch("SELECT product, count(*) FROM releases GROUP BY product")
        return sorted((p, int(n)) for p, n in rows)

    async def day_version_counts(self, day: str) -> list[tuple[str, str, int]]:
        rows = await self._fetch(
            "SELECT product, version, instances FROM stats_versions WHERE day = $1", _day(day)
        )
        return [(p, v, int(i)) for p, v, i in rows]

    async def meta(self, key: str) -> int | None:
        async with self._acquire() as conn:
            return await _meta(conn, key)

    async def set_meta(self, key: str, value: int) -> None:
        async with self._acquire() as conn:
            await _set_meta(conn, key, value)

    @contextlib.asynccontextmanager
    async def exclusive(self, job: str) -> AsyncIterator[bool]:
        """Hold ``job``'s advisory lock for the block if no other process holds it (True),
        else run the block without it (False). The lock goes with its connection, so a node
        that dies mid-job frees it."""
        key = JOB_LOCKS + zlib.crc32(job.encode())
        async with contextlib.AsyncExitStack() as stack:
            with _faults(f"cannot take the lock of {job}"):  # not the block's own errors
                conn = await stack.enter_async_context(self._pool.acquire())
                mine = bool(await conn.fetchval("SELECT pg_try_advisory_lock($1)", key))
            try:
                yield mine
            finally:
                if mine:
                    await _unlock(conn, key)

    # -- retention ---------------------------------------------------------------------------

    async def count_expired(self, before: str) -> PurgeResult:
        days, rows = await self._fetchrow(
            "SELECT count(DISTINCT day), count(*) FROM reports WHERE day < $1", _day(before)
        ) or (0, 0)
        return PurgeResult(days=int(days), rows_deleted=int(rows))

    async def roll_up_and_purge(self, before: str) -> PurgeResult:
        """For every UTC day before ``before`` with raw rows, bring its aggregates up to date,
        write its rollups and delete its rows, one transaction per day. One node at a time:
        a node that finds another at it returns an empty result. Raises
        :class:`StorageUnavailableError` when the database is away (the days done stay done)."""
        result = PurgeResult()
        async with self._acquire("cannot apply retention") as conn:
            if not await conn.fetchval("SELECT pg_try_advisory_lock($1)", RETENTION_LOCK):
                logger.info("retention: another node is running it; skipped")
                return result
            try:
                days = await conn.fetch(
                    "SELECT DISTINCT day FROM reports WHERE day < $1 ORDER BY day", _day(before)
                )
                if days:  # the statistics must hold these days before their raw rows go
                    await self.aggregate()
                for (day,) in days:
                    async with conn.transaction():
                        await conn.execute(ROLL_UP_DAY_SQL, day)
                        status = await conn.execute("DELETE FROM reports WHERE day = $1", day)
                    result.rows_deleted += _count(status)
                    result.days += 1
            finally:
                await _unlock(conn, RETENTION_LOCK)
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
        async with self._acquire() as conn:
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


async def _unlock(conn: Conn, key: int) -> None:
    """Release a session's advisory lock. A connection that died took its locks with it, and
    one that fails here has them released by the pool's reset: the error that matters is the
    one the block raised, if any."""
    with contextlib.suppress(*UNAVAILABLE):
        await conn.execute("SELECT pg_advisory_unlock($1)", key)


async def _meta(conn: Conn, key: str) -> int | None:
    value = await conn.fetchval("SELECT value FROM meta WHERE key = $1", key)
    return None if value is None else int(value)


async def _set_meta(conn: Conn, key: str, value: int) -> None:
    await conn.execute(
        "INSERT INTO meta (key, value) VALUES ($1, $2)"
        " ON CONFLICT (key) DO UPDATE SET value = excluded.value",
        key, value,
    )  # fmt: skip


async def _aggregate_since(conn: Conn, watermark: int | None) -> AggregateResult:
    """Rewrite the aggregates of each product-day with rows seen at or after ``watermark``;
    bring the release checks of the other days since then up to date."""
    since = _day(utc_day(watermark or 0)) - timedelta(days=1)
    changed = {
        (product, day) for product, day in await conn.fetch(CHANGED_DAYS_SQL, since, watermark or 0)
    }
    checks = {(p, d): int(n) for p, d, n in await conn.fetch(CHECK_DAYS_SQL, since)}
    result = AggregateResult()
    first_changed: dict[str, date] = {}
    for product, day in sorted(changed | checks.keys()):
        count = checks.get((product, day), 0)
        if (product, day) not in changed:
            await conn.execute(UPDATE_STATS_CHECKS_SQL, product, day, count)
            continue
        groups = [tuple(row) for row in await conn.fetch(DAY_GROUPS_SQL, product, day)]
        detail, instances = day_detail(product, day, groups, count)
        async with conn.transaction():
            if not instances:
                await conn.execute(UPDATE_STATS_CHECKS_SQL, product, day, count)
                continue
            for table in STATS_DAY_TABLES:
                await conn.execute(
                    f"DELETE FROM {table} WHERE product = $1 AND day = $2",  # noqa: S608 - ours
                    product, day,
                )  # fmt: skip
                await conn.copy_records_to_table(
                    table, records=detail[table], columns=STATS_COLUMNS[table]
                )
        result.days += 1
        result.instances += instances
        first_changed.setdefault(product, day)
    for product, day in first_changed.items():
        await _rebuild_heap_totals(conn, product, day)
    return result


async def _rebuild_heap_totals(conn: Conn, product: str, since: date) -> None:
    """Recompute the running heap totals of ``product`` from day ``since`` on."""
    async with conn.transaction():
        base = await conn.fetch(
            "SELECT version, bucket, instances FROM stats_heap_totals WHERE product = $1"
            " AND day = (SELECT max(day) FROM stats_heap_totals"
            "            WHERE product = $1 AND day < $2)",
            product, since,
        )  # fmt: skip
        running: Counter[tuple[str, int]] = Counter({(v, b): int(n) for v, b, n in base})
        deltas = await conn.fetch(
            "SELECT day, version, bucket, instances FROM stats_heaps"
            " WHERE product = $1 AND day >= $2 ORDER BY day",
            product, since,
        )  # fmt: skip
        rows: list[tuple[Any, ...]] = []
        for day, day_rows in itertools.groupby(deltas, key=lambda row: row[0]):
            for _, version, bucket, instances in day_rows:
                running[(version, bucket)] += int(instances)
            rows += [(product, day, v, b, n) for (v, b), n in running.items()]
        await conn.execute(
            "DELETE FROM stats_heap_totals WHERE product = $1 AND day >= $2", product, since
        )
        await conn.copy_records_to_table(
            "stats_heap_totals", records=rows, columns=STATS_COLUMNS["stats_heaps"]
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
    for secret in _secrets(dsn) if dsn else ():
        text = text.replace(secret, "***")
    return text
