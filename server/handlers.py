"""Thin request handlers: parse, store, answer. No SQL and no HTTP status decisions here."""

from __future__ import annotations

import asyncio
import math
from typing import Any

from aiohttp import hdrs, web

from .appkeys import CATALOG, CODEC, EXTRA_KEYS, INGEST, LIMITER, REPOS, SETTINGS, STORAGE
from .errors import (
    BodyTooLargeError,
    NotFoundError,
    RateLimitedError,
    SlowRequestError,
    UnsupportedMediaTypeError,
)
from .protocol import parse_report, parse_user_agent, product_slug
from .releases import Release, asset_url


async def post_version(request: web.Request) -> web.Response:
    """``POST /v1/version``: store the report, then answer with the latest release."""
    app = request.app
    _check_rate(request)
    settings = app[SETTINGS]
    body = await _read_json_body(request, settings.max_body_bytes, settings.read_timeout)
    client = parse_user_agent(request.headers.get(hdrs.USER_AGENT))
    report = parse_report(body, client, app[CODEC].loads, app[EXTRA_KEYS], settings.extra_max_bytes)
    await app[INGEST].submit(report)
    answer = app[CATALOG].answer(report.product, report.version, report.os, report.arch)
    return web.Response(body=answer, content_type="application/json")


async def get_latest_release(request: web.Request) -> web.Response:
    """``GET /repos/{owner}/{repo}/releases/latest`` in GitHub's shape (OPA >= 1.7)."""
    _check_rate(request)
    product = _repo_product(request)
    release = request.app[CATALOG].catalog.latest(product)
    if release is None:
        raise NotFoundError("Not Found", [f"no release known for product {product!r}"])
    await request.app[INGEST].submit(product)
    return _json(request, _github_release(request, release))


async def get_release_assets(request: web.Request) -> web.Response:
    """``GET /repos/{owner}/{repo}/releases/{id}/assets``: the ``assets_url`` of a release."""
    product = _repo_product(request)
    release_id = int(request.match_info["release_id"])
    for release in request.app[CATALOG].catalog.releases(product):
        if release.id == release_id:
            return _json(request, _github_assets(release))
    raise NotFoundError("Not Found", [f"no release {release_id} for product {product!r}"])


async def get_health(request: web.Request) -> web.Response:
    """``GET /healthz``: the process is alive and serving."""
    return _json(request, {"status": "ok"})


async def get_readiness(request: web.Request) -> web.Response:
    """``GET /readyz``: the database answers (503 otherwise)."""
    await request.app[STORAGE].ping()
    ingest = request.app[INGEST]
    return _json(request, {"status": "ready", "pending": ingest.pending + ingest.writing})


def _check_rate(request: web.Request) -> None:
    """Raise :class:`RateLimitedError` when this client's address is over its rate."""
    limiter = request.app.get(LIMITER)
    if limiter is None:
        return
    header = request.app[SETTINGS].trusted_proxy_header
    address = None
    if header:  # only when the operator said a proxy in front sets it
        forwarded = request.headers.get(header, "")
        # The proxy appends the address it saw: the rightmost entry is the one to trust.
        address = forwarded.rsplit(",", 1)[-1].strip() or None
    wait = limiter.acquire(address or request.remote or "")
    if wait:
        raise RateLimitedError("too many requests from this address", math.ceil(wait))


async def _read_json_body(request: web.Request, limit: int, timeout: float) -> bytes:
    # The exact header OPA sends skips aiohttp's general Content-Type parser.
    raw_type = request.headers.get(hdrs.CONTENT_TYPE)
    if raw_type != "application/json" and request.content_type != "application/json":
        raise UnsupportedMediaTypeError(
            "Content-Type must be application/json", [f"got {request.content_type!r}"]
        )
    if request.content_length is not None and request.content_length > limit:
        # Refuse before reading a byte; a chunked body is capped by client_max_size instead.
        raise BodyTooLargeError(f"body is larger than {limit} bytes")
    if request.content.is_eof():  # the usual case: the body came with the headers
        return await request.read()
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
    return [
        {"name": asset.rsplit("/", 1)[-1], "browser_download_url": asset_url(release, asset)}
        for asset in release.assets
    ]
