"""Typed keys for what the application holds (shared by the app factory and the handlers)."""

from __future__ import annotations

from aiohttp import web

from .catalog import CatalogCache
from .codec import JsonCodec
from .ingest import Ingest
from .ratelimit import RateLimiter
from .settings import Settings
from .storage import Storage

SETTINGS = web.AppKey("settings", Settings)
LIMITER = web.AppKey("limiter", RateLimiter)
CODEC = web.AppKey("codec", JsonCodec)
REPOS = web.AppKey("repos", dict[str, str])
EXTRA_KEYS = web.AppKey("extra_keys", frozenset[str])
STORAGE = web.AppKey("storage", Storage)
INGEST = web.AppKey("ingest", Ingest)
CATALOG = web.AppKey("catalog", CatalogCache)
