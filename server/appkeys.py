"""Typed keys for what the application holds (shared by the app factory and the handlers)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from aiohttp import web

from .codec import JsonCodec
from .ingest import Ingest
from .settings import Settings
from .storage import Storage

if TYPE_CHECKING:
    from .app import CatalogCache

SETTINGS = web.AppKey("settings", Settings)
CODEC = web.AppKey("codec", JsonCodec)
REPOS = web.AppKey("repos", dict[str, str])
STORAGE = web.AppKey("storage", Storage)
INGEST = web.AppKey("ingest", Ingest)
CATALOG = web.AppKey("catalog", "CatalogCache")
