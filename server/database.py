"""Opening the database with the settings' SQLite options (no web stack: the CLI's catalog
and statistics commands import this, not the app, so that they start fast)."""

from __future__ import annotations

from pathlib import Path

from .settings import Settings
from .storage import Storage


async def open_storage(settings: Settings, path: str | Path, *, migrate: bool = True) -> Storage:
    """Open ``path`` with the settings' SQLite options; only ``serve`` migrates."""
    return await Storage.open(
        path,
        migrate=migrate,
        synchronous=settings.synchronous,
        busy_timeout_ms=int(settings.busy_timeout * 1000),
        wal_checkpoint_pages=settings.wal_checkpoint_pages,
    )
