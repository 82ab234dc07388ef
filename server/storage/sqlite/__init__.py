"""The embedded SQLite backend: one file per worker (shards), WAL, group commit, online backup.

``backend`` holds :class:`SqliteStorage` and the shard and backup helpers; ``migrations`` the
numbered schema steps. Nothing outside ``storage`` imports this package but the tests.
"""

from __future__ import annotations

from opa_telemetry_server.storage.sqlite.backend import (
    SqliteStorage,
    backup_database,
    backup_pairs,
    existing_shards,
    shard_path,
)

__all__ = ["SqliteStorage", "backup_database", "backup_pairs", "existing_shards", "shard_path"]
