"""Thin request handlers: parse, store, answer. No SQL and no HTTP status decisions here."""

from __future__ import annotations

import asyncio
import math
import zlib
from typing import Any

from aiohttp import hdrs, web

from opa_telemetry_server.domain.protocol import parse_report, parse_user_agent, product_slug
from opa_telemetry_server.domain.releases import Release
from opa_telemetry_server.errors import (
    BodyTooLargeError,
    NotFoundError,
    QueryError,
    RateLimitedError,
    SlowRequestError,
    UnsupportedMediaTypeError,
)
from opa_telemetry_server.services.insights import (
    parse_stats_query,
    products_document,
    publicly_listed,
    stats_document,
    utc_today,
)
from opa_telemetry_server.services.metrics import CONTENT_TYPE, FleetState
from opa_telemetry_server.storage import AGGREGATED_AT_KEY, RETENTION_RUN_KEY
from opa_telemetry_server.web import dashboard
from opa_telemetry_server.web.access import View, authorize
from opa_telemetry_server.web.appkeys import (
    CODEC,
    INSIGHTS,
    INTAKE,
    REPOS,
    REQUESTS,
    SETTINGS,
    STORAGE,
    Intake,
)
from opa_telemetry_server.web.http_errors import error_answer
from opa_telemetry_server.web.openapi import openapi_json

# GitHub's list pagination: 30 per page unless ``per_page`` says otherwise, at most 100.
DEFAULT_PER_PAGE = 30
MAX_PER_PAGE = 100
VERSION_ROUTE = "/v1/version"
_VERSION_OK = (VERSION_ROUTE, 200)


async def post_version(request: web.Request) -> web.StreamResponse:
    """``POST /v1/version``: store the report, then answer with the latest release.

    The hot path: it turns its own errors into answers (see ``http_errors``) rather than
    being wrapped, and reads everything it needs from one :class:`Intake`.
    """
    try:
        intake = request.app[INTAKE]
        _check_rate(request, intake)
        body = _body_if_complete(request, intake.max_body_bytes)
        if body is None:
            body = await _read_body(request, intake.max_body_bytes, intake.read_timeout)
        client = parse_user_agent(request.headers.get(hdrs.USER_AGENT))
        report = parse_report(body, client, intake.loads, intake.extra_keys, intake.extra_max_bytes)
        await intake.ingest.submit(report)
        answer = intake.catalog.answer(
            report.product, report.version, report.os, report.arch, report.instance_id
        )
        intake.requests[_VERSION_OK] += 1
        return web.Response(body=answer, content_type="application/json")
    except Exception as exc:  # noqa: BLE001 (error_answer logs the unexpected ones)
        response = error_answer(request, exc)
        request.app[REQUESTS][(VERSION_ROUTE, response.status)] += 1
        return response


# Handlers that turn their own errors into JSON answers; ``routes`` wraps all the others.
SELF_ANSWERING_ERRORS = frozenset({post_version})


async def get_latest_release(request: web.Request) -> web.Response:
    """``GET /repos/{owner}/{repo}/releases/latest`` in GitHub's shape (OPA >= 1.7)."""
    intake = request.app[INTAKE]
    _check_rate(request, intake)
    product = _repo_product(request)
    release = intake.catalog.catalog.latest(product)
    if release is None:
        raise NotFoundError("Not Found", [f"no release known for product {product!r}"])
    await intake.ingest.submit(product)
    return _json(request, _github_release(request, release))


async def get_releases(request: web.Request) -> web.StreamResponse:
    """``GET /repos/{owner}/{repo}/releases``: GitHub's release list, newest first, paginated
    (``per_page``, ``page``, a ``Link`` header) with an ``ETag``, so that another
    opa-telemetry server can sync from this one as it would from GitHub. Yanked releases are
    left out: they must never be offered."""
    intake = request.app[INTAKE]
    _check_rate(request, intake)
    product = _repo_product(request)
    per_page = _query_int(request, "per_page", DEFAULT_PER_PAGE, MAX_PER_PAGE)
    page = _query_int(request, "page", 1, 10**6)
    catalog = intake.catalog.catalog
    releases = [r for r in catalog.releases(product) if not catalog.is_yanked(product, r.tag)]
    # The product is hashed: a repo name from the URL never reaches a header as it is.
    etag = f'"{intake.catalog.generation}-{zlib.crc32(product.encode()):08x}-{per_page}-{page}"'
    if etag in request.headers.get(hdrs.IF_NONE_MATCH, ""):
        return web.Response(status=304, headers={hdrs.ETAG: etag})
    start = (page - 1) * per_page
    body = [_github_release(request, r) for r in releases[start : start + per_page]]
    response = _json(request, body)
    response.headers[hdrs.ETAG] = etag
    last = max(1, -(-len(releases) // per_page))
    links = []
    if page < last:
        links.append(f'<{request.url.update_query(page=page + 1)}>; rel="next"')
    links.append(f'<{request.url.update_query(page=last)}>; rel="last"')
    response.headers[hdrs.LINK] = ", ".join(links)
    return response


def _query_int(request: web.Request, name: str, default: int, most: int) -> int:
    text = request.query.get(name)
    if text is None:
        return default
    if not text.isascii() or not text.isdigit() or not 1 <= int(text) <= most:
        raise QueryError(
            "Bad Request", [f"{name}: expected a whole number from 1 to {most}, not {text!r}"]
        )
    return int(text)


async def get_release_assets(request: web.Request) -> web.Response:
    """``GET /repos/{owner}/{repo}/releases/{id}/assets``: the ``assets_url`` of a release."""
    _check_rate(request, request.app[INTAKE])
    product = _repo_product(request)
    release_id = int(request.match_info["release_id"])
    for release in request.app[INTAKE].catalog.catalog.releases(product):
        if release.id == release_id:
            return _json(request, _github_assets(release))
    raise NotFoundError("Not Found", [f"no release {release_id} for product {product!r}"])


async def get_health(request: web.Request) -> web.Response:
    """``GET /healthz``: the process is alive and serving."""
    return _json(request, {"status": "ok"})


async def get_readiness(request: web.Request) -> web.Response:
    """``GET /readyz``: the database answers (503 otherwise)."""
    await request.app[STORAGE].ping()
    ingest = request.app[INTAKE].ingest
    return _json(request, {"status": "ready", "pending": ingest.pending + ingest.writing})


async def get_stats(request: web.Request) -> web.Response:
    """``GET /v1/stats?product=&days=``: the statistics document (``stats --json``)."""
    settings = request.app[SETTINGS]
    view = authorize(request.headers, settings)
    query = parse_stats_query(request.query)
    if view is View.PUBLIC:
        products = await request.app[INSIGHTS].reader.products(utc_today().isoformat())
        if not publicly_listed(products, query.product, settings.min_group_size):
            raise NotFoundError(
                "Not Found", [f"no public statistics for product {query.product!r}"]
            )
    document = await stats_document(
        request.app[INSIGHTS].reader,
        request.app[INTAKE].catalog.catalog,
        query,
        min_group_size=settings.min_group_size if view is View.PUBLIC else 0,
    )
    return _json(request, document)


async def get_products(request: web.Request) -> web.Response:
    """``GET /v1/products``: every product with its release and report counts."""
    settings = request.app[SETTINGS]
    view = authorize(request.headers, settings)
    products = await request.app[INSIGHTS].reader.products(utc_today().isoformat())
    group = settings.min_group_size if view is View.PUBLIC else 0
    return _json(request, products_document(products, min_group_size=group))


async def get_metrics(request: web.Request) -> web.Response:
    """``GET /metrics``: Prometheus text for the whole server (every worker)."""
    settings = request.app[SETTINGS]
    view = authorize(request.headers, settings)
    insights, intake = request.app[INSIGHTS], request.app[INTAKE]
    reader = insights.reader
    insights.metrics.flush(request.app[REQUESTS], intake.ingest)
    catalog = intake.catalog
    fleet = FleetState(
        version_counts=await reader.day_version_counts(utc_today().isoformat()),
        catalog_checked_at=catalog.checked_at,
        catalog_releases=await reader.release_counts(),
        retention_run_at=await reader.meta(RETENTION_RUN_KEY),
        aggregated_at=await reader.meta(AGGREGATED_AT_KEY),
        min_group_size=settings.min_group_size if view is View.PUBLIC else 0,
        syncs=await reader.sync_states(),
    )
    body = insights.metrics.render(fleet)
    return web.Response(body=body, headers={hdrs.CONTENT_TYPE: CONTENT_TYPE})


async def get_openapi(request: web.Request) -> web.Response:
    """``GET /openapi.json``: the OpenAPI 3.1 description of every route (open, no auth)."""
    body = openapi_json(request.app[SETTINGS].prefix)
    return web.Response(body=body, content_type="application/json")


async def get_dashboard(request: web.Request) -> web.Response:
    """``GET /dashboard``: the page (it holds no data; its script reads the stats API)."""
    page = dashboard.page(dashboard.access_mode(request.app[SETTINGS]))
    return dashboard.answer(request, page, dashboard.PAGE_CACHE)


async def get_dashboard_slash(request: web.Request) -> web.Response:
    """``GET /dashboard/``: to the page's one address (its links are relative to it)."""
    raise web.HTTPMovedPermanently("../dashboard")


async def get_dashboard_asset(request: web.Request) -> web.Response:
    """``GET /dashboard/assets/{name}``: a script, style sheet or image of the page."""
    return dashboard.asset_answer(request, request.match_info["name"])


def _check_rate(request: web.Request, intake: Intake) -> None:
    """Raise :class:`RateLimitedError` when this client's address is over its rate."""
    limiter = intake.limiter
    if limiter is None:
        return
    header = intake.trusted_proxy_header
    address = None
    if header:  # only when the operator said a proxy in front sets it
        forwarded = request.headers.get(header, "")
        # The proxy appends the address it saw: the rightmost entry is the one to trust.
        address = forwarded.rsplit(",", 1)[-1].strip() or None
    wait = limiter.acquire(address or request.remote or "")
    if wait:
        raise RateLimitedError("too many requests from this address", math.ceil(wait))


def _body_if_complete(request: web.Request, limit: int) -> bytes | None:
    """Check the body's type and size; return it if it has fully arrived, else ``None``.

    The usual case (the body came in the same packets as the headers) is answered without
    a coroutine: the bytes are already buffered.
    """
    # The exact header OPA sends skips aiohttp's general Content-Type parser.
    raw_type = request.headers.get(hdrs.CONTENT_TYPE)
    if raw_type != "application/json" and request.content_type != "application/json":
        raise UnsupportedMediaTypeError(
            "Content-Type must be application/json", [f"got {request.content_type!r}"]
        )
    length = request.content_length
    if length is not None and length > limit:
        # Refuse before reading a byte; a chunked body is capped as it is read.
        raise BodyTooLargeError(f"body is larger than {limit} bytes")
    if not request.content.is_eof():
        return None
    body = request.content.read_nowait()
    if len(body) > limit:
        raise BodyTooLargeError(f"body is larger than {limit} bytes")
    return body


async def _read_body(request: web.Request, limit: int, timeout: float) -> bytes:
    """The rest of a body still arriving: within ``timeout`` and at most ``limit`` bytes
    (``client_max_size`` is the same limit)."""
    try:
        async with asyncio.timeout(timeout):
            return await request.read()
    except TimeoutError:
        raise SlowRequestError(f"body not received within {timeout:g}s") from None


def _json(request: web.Request, payload: Any) -> web.Response:
    return web.Response(body=request.app[CODEC].dumps(payload), content_type="application/json")


def _repo_product(request: web.Request) -> str:
    owner, repo = request.match_info["owner"], request.match_info["repo"]
    mapped = request.app[REPOS].get(f"{owner}/{repo}".lower())
    return mapped or product_slug(repo) or repo.lower()


def _github_release(request: web.Request, release: Release) -> dict[str, Any]:
    owner, repo = request.match_info["owner"], request.match_info["repo"]
    base = f"{request.url.origin()}{request.app[SETTINGS].prefix}"
    published = f"{release.published.isoformat()}T00:00:00Z" if release.published else None
    return {
        "id": release.id,
        "tag_name": release.tag,
        "name": release.tag,
        "html_url": release.release_notes,
        "assets_url": f"{base}/repos/{owner}/{repo}/releases/{release.id}/assets",
        "published_at": published,
        "prerelease": release.prerelease,
        "draft": False,
        "assets": _github_assets(release),
    }


def _github_assets(release: Release) -> list[dict[str, str]]:
    return [{"name": a.name, "browser_download_url": a.url} for a in release.assets]
