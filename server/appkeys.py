"""Typed keys for what the application holds (shared by the app factory and the handlers)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from aiohttp import web

from .catalog import CatalogCache
from .codec import JsonCodec
from .ingest import Ingest
from .ratelimit import RateLimiter
from .settings import Settings
from .storage import Storage

SETTINGS = web.AppKey("settings", Settings)
CODEC = web.AppKey("codec", JsonCodec)
REPOS = web.AppKey("repos", dict[str, str])
STORAGE = web.AppKey("storage", Storage)


@dataclass(frozen=True, slots=True)
class Intake:
    """What the request handlers need from the running app, gathered once when it starts:
    one application lookup per request instead of one per setting or service."""

    ingest: Ingest
    catalog: CatalogCache
    limiter: RateLimiter | None
    trusted_proxy_header: str  # "" when no proxy header is trusted
    loads: Callable[[bytes], Any]
    extra_keys: frozenset[str]
    extra_max_bytes: int
    max_body_bytes: int
    read_timeout: float


INTAKE = web.AppKey("intake", Intake)
