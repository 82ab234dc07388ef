"""Typed keys for what the application holds (shared by the app factory and the handlers)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from aiohttp import web

from opa_telemetry_server.domain.codec import JsonCodec
from opa_telemetry_server.services.catalog import CatalogCache
from opa_telemetry_server.services.ingest import Ingest
from opa_telemetry_server.services.insights import Aggregator
from opa_telemetry_server.services.metrics import ProcessMetrics, RequestTally
from opa_telemetry_server.settings import Settings
from opa_telemetry_server.storage import Storage
from opa_telemetry_server.web.ratelimit import RateLimiter

SETTINGS = web.AppKey("settings", Settings)
CODEC = web.AppKey("codec", JsonCodec)
REPOS = web.AppKey("repos", dict[str, str])
STORAGE = web.AppKey("storage", Storage)
# Requests answered per (route, status), bumped by the handlers, read by the metrics.
REQUESTS = web.AppKey("requests", RequestTally)


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
    requests: RequestTally  # the app's REQUESTS tally


INTAKE = web.AppKey("intake", Intake)


@dataclass(frozen=True, slots=True)
class Insights:
    """The read side: statistics, products and metrics."""

    reader: Storage  # a connection of its own, so reads never queue behind the writer
    metrics: ProcessMetrics
    aggregator: Aggregator | None  # the worker that keeps the aggregates (worker 0)


INSIGHTS = web.AppKey("insights", Insights)
