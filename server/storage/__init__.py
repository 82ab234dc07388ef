"""Storage: one interface, two backends. The rest of the server sees only :class:`Storage`
and :func:`open_storage`; which backend runs, and everything particular to it (SQLite's worker
shards, PRAGMAs and ``ATTACH``; PostgreSQL's pool and advisory locks), stays in ``sqlite`` or
``postgres``.

``--db`` selects the backend: a ``postgresql://`` (or ``postgres://``) URL is PostgreSQL, any
other value a SQLite file. Each backend keeps its own numbered migrations.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from contextlib import AbstractAsyncContextManager
from pathlib import Path
from types import EllipsisType
from typing import Protocol

from opa_telemetry_server.domain.advisories import Advisory
from opa_telemetry_server.domain.protocol import Report
from opa_telemetry_server.domain.releases import Release
from opa_telemetry_server.errors import BackupError, UsageError
from opa_telemetry_server.settings import Settings
from opa_telemetry_server.storage.records import (
    AGGREGATED_AT_KEY,
    RETENTION_RUN_KEY,
    WATERMARK_KEY,
    AggregateResult,
    BackupFile,
    CatalogParts,
    ProductCounts,
    PurgeResult,
    SyncState,
    Window,
    utc_day,
)

__all__ = [
    "AGGREGATED_AT_KEY",
    "RETENTION_RUN_KEY",
    "WATERMARK_KEY",
    "AggregateResult",
    "BackupFile",
    "CatalogParts",
    "ProductCounts",
    "PurgeResult",
    "Storage",
    "SyncState",
    "Window",
    "backup_database",
    "import_sqlite",
    "is_postgres_url",
    "open_storage",
    "utc_day",
]

POSTGRES_SCHEMES = ("postgresql://", "postgres://")


def is_postgres_url(db: str) -> bool:
    """Whether ``--db`` names a PostgreSQL database rather than a SQLite file."""
    return db.startswith(POSTGRES_SCHEMES)


class Storage(Protocol):
    """What the server needs of a database. Every method is safe to call from several
    processes (SQLite workers, PostgreSQL nodes) at once; ``close`` is idempotent."""

    path: str  # for messages: a file path, or a URL without its password

    async def close(self) -> None: ...
    async def ping(self) -> None: ...
    async def schema_version(self) -> int: ...

    # The hot path: one transaction per batch, all or nothing (StorageUnavailableError).
    async def write_batch(
        self, reports: Sequence[Report], checks: Sequence[str], now: float
    ) -> None: ...

    # The catalog, its policy and advisories, and the sync state.
    async def catalog_generation(self) -> int: ...
    async def load_catalog_parts(self) -> CatalogParts: ...
    async def seed_catalog(self, product: str, releases: Sequence[Release]) -> int: ...
    async def add_release(
        self, product: str, release: Release, *, replace: bool = False
    ) -> bool: ...
    async def import_releases(
        self, product: str, releases: Sequence[Release]
    ) -> tuple[int, int]: ...
    async def remove_release(self, product: str, tag: str) -> bool: ...
    async def sync_releases(
        self, product: str, releases: Sequence[Release], *, prune: bool
    ) -> tuple[int, int, int]: ...
    async def set_product_policy(self, product: str, **changes: str | None) -> None: ...
    async def set_release_policy(
        self,
        product: str,
        tag: str,
        *,
        yanked: bool | None = None,
        reason: str | None = None,
        rollout_percent: int | EllipsisType | None = ...,
    ) -> bool: ...
    async def import_advisories(
        self, product: str, advisories: Sequence[Advisory], *, seed: bool = False
    ) -> tuple[int, int]: ...
    async def remove_advisory(self, product: str, ident: str) -> bool: ...
    async def sync_state(self, product: str) -> SyncState | None: ...
    async def sync_states(self) -> list[SyncState]: ...
    async def save_sync_state(self, state: SyncState) -> None: ...

    # Statistics: aggregates kept in the background, read in milliseconds.
    async def aggregate(
        self, *, now: float | None = None, lag: float = 600.0
    ) -> AggregateResult: ...
    async def window(self, product: str, since: str, until: str) -> Window: ...
    async def products(self, today: str) -> list[ProductCounts]: ...
    async def release_counts(self) -> list[tuple[str, int]]: ...
    async def day_version_counts(self, day: str) -> list[tuple[str, str, int]]: ...
    async def meta(self, key: str) -> int | None: ...
    async def set_meta(self, key: str, value: int) -> None: ...

    # Jobs that one process of the whole deployment runs at a time (GitHub sync): the block
    # gets True when this process holds the job, False when another does.
    def exclusive(self, job: str) -> AbstractAsyncContextManager[bool]: ...

    # Retention.
    async def count_expired(self, before: str) -> PurgeResult: ...
    async def roll_up_and_purge(self, before: str) -> PurgeResult: ...


async def open_storage(
    settings: Settings,
    *,
    migrate: bool = True,
    worker: int = 0,
    wait: float = 0.0,
) -> Storage:
    """Open the database ``settings.db`` names. Only ``serve`` migrates (creates or upgrades
    the schema); every other command opens an existing database of exactly this version.

    ``worker`` is the process's number among ``settings.workers``: with SQLite, worker N
    writes its own shard beside the database; with PostgreSQL every worker and node shares
    one database. ``wait``: seconds to keep retrying a PostgreSQL server that cannot be
    reached yet (the server waits; the CLI does not). Raises :class:`SchemaError` with a
    message a person can act on.
    """
    if is_postgres_url(settings.db):
        # asyncpg is imported only by those who use it
        from opa_telemetry_server.storage.postgres import PostgresStorage

        return await PostgresStorage.open(
            settings.db,
            migrate=migrate,
            statement_timeout=settings.busy_timeout,
            pool_size=settings.db_pool_size,
            wait=wait,
        )
    from opa_telemetry_server.storage.sqlite import SqliteStorage, shard_path

    return await SqliteStorage.open(
        shard_path(settings.db, worker),
        migrate=migrate,
        synchronous=settings.synchronous,
        busy_timeout_ms=int(settings.busy_timeout * 1000),
        wal_checkpoint_pages=settings.wal_checkpoint_pages,
    )


async def backup_database(
    settings: Settings, dest: Path, *, force: bool = False
) -> list[BackupFile]:
    """A consistent copy of a live SQLite database and its worker shards at ``dest`` (see
    ``sqlite.backup_database``). A PostgreSQL database is backed up with its own tools."""
    if is_postgres_url(settings.db):
        raise BackupError(
            "the database is PostgreSQL: back it up with pg_dump (or your provider's snapshots),"
            " e.g. pg_dump --format=custom --file=telemetry.dump DBNAME"
        )
    from opa_telemetry_server.storage.sqlite import backup_database as backup_sqlite

    return await backup_sqlite(settings, dest, force=force)


async def import_sqlite(
    settings: Settings, source: Path, progress: Callable[[str, int], None] | None = None
) -> tuple[dict[str, int], str]:
    """Copy the SQLite database ``source`` (with its shards) into the PostgreSQL database
    ``settings.db``, creating its schema; returns the rows copied per table and the target's
    name (without its password). See ``transfer``."""
    if not is_postgres_url(settings.db):
        raise UsageError("--db must name the PostgreSQL database to copy into (postgresql://...)")
    from opa_telemetry_server.storage.postgres import PostgresStorage
    from opa_telemetry_server.storage.transfer import copy_sqlite_to_postgres

    # One long transaction by design: no statement timeout.
    target = await PostgresStorage.open(settings.db, statement_timeout=0)
    try:
        return await copy_sqlite_to_postgres(source, target, progress), target.path
    finally:
        await target.close()
