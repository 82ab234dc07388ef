"""The dashboard's page and assets: files of the package (``static/``), served read-only.

The page holds no data: its script fetches the stats API with the admin token. Every answer
carries a strict Content-Security-Policy (scripts, styles and requests only from this server;
no inline script), and assets are cached for good under URLs that name their content
(``?v=<hash>``), while the page itself is revalidated on every load so an upgrade shows at once.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Mapping
from dataclasses import dataclass
from functools import cache
from importlib import resources

from aiohttp import hdrs, web

from opa_telemetry_server.errors import NotFoundError
from opa_telemetry_server.settings import Settings

PAGE = "dashboard.html"
ASSET_PATH = "dashboard/assets/"  # relative to the page, so that any mount prefix works
CONTENT_TYPES: Mapping[str, str] = {
    ".css": "text/css; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".svg": "image/svg+xml",
    ".html": "text/html; charset=utf-8",
}
CONTENT_SECURITY_POLICY = "; ".join((
    "default-src 'none'",
    "script-src 'self'",
    "style-src 'self'",
    "img-src 'self'",
    "connect-src 'self'",
    "base-uri 'none'",
    "form-action 'none'",
    "frame-ancestors 'none'",
))  # fmt: skip
SECURITY_HEADERS: Mapping[str, str] = {
    "Content-Security-Policy": CONTENT_SECURITY_POLICY,
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "X-Frame-Options": "DENY",
    "Cross-Origin-Opener-Policy": "same-origin",
    "Cross-Origin-Resource-Policy": "same-origin",
}
PAGE_CACHE = "no-cache"  # revalidate (cheap: ETag) so that a new version shows at once
VERSIONED_CACHE = "public, max-age=31536000, immutable"
UNVERSIONED_CACHE = "no-cache"
ACCESS_MODES = ("public", "token", "closed")
_ASSET_REFERENCE = re.compile(re.escape(ASSET_PATH) + r"([A-Za-z0-9._/-]+)")


@dataclass(frozen=True, slots=True)
class Asset:
    body: bytes
    content_type: str
    digest: str  # hex prefix of the body's SHA-256: the ``v`` of versioned URLs and the ETag

    @property
    def etag(self) -> str:
        return f'"{self.digest}"'


def _asset(name: str, body: bytes) -> Asset:
    suffix = name[name.rfind(".") :]
    return Asset(body, CONTENT_TYPES[suffix], hashlib.sha256(body).hexdigest()[:16])


@cache
def assets() -> Mapping[str, Asset]:
    """Every servable file under ``static/`` by its path there (``vendor/uPlot.min.css``),
    read once per process. The page itself is not an asset."""
    root = resources.files("opa_telemetry_server").joinpath("static")
    found: dict[str, Asset] = {}
    pending = [(root, "")]
    while pending:
        folder, prefix = pending.pop()
        for entry in folder.iterdir():
            name = prefix + entry.name
            if entry.is_dir():
                pending.append((entry, name + "/"))
            elif name != PAGE and entry.name[entry.name.rfind(".") :] in CONTENT_TYPES:
                found[name] = _asset(name, entry.read_bytes())
    return found


@cache
def page(access: str) -> Asset:
    """The page with its access mode filled in and every asset URL versioned by content.

    Raises ``KeyError`` when the page names an asset that does not exist (a packaging bug).
    """
    if access not in ACCESS_MODES:
        raise ValueError(f"access must be one of {ACCESS_MODES}")
    template = resources.files("opa_telemetry_server").joinpath("static", PAGE).read_text("utf-8")
    files = assets()

    def versioned(match: re.Match[str]) -> str:
        name = match.group(1)
        return f"{ASSET_PATH}{name}?v={files[name].digest}"

    html = _ASSET_REFERENCE.sub(versioned, template).replace("{{access}}", access)
    return _asset(PAGE, html.encode())


def access_mode(settings: Settings) -> str:
    """How the stats routes are opened, for the page to know whether to ask for a token."""
    if settings.public_stats:
        return "public"
    if settings.admin_token:
        return "token"
    return "closed"


def answer(request: web.Request, asset: Asset, cache_control: str) -> web.Response:
    """``asset`` with the security and cache headers; 304 when the client holds it already."""
    headers = {**SECURITY_HEADERS, hdrs.CACHE_CONTROL: cache_control, hdrs.ETAG: asset.etag}
    if asset.etag in request.headers.get(hdrs.IF_NONE_MATCH, ""):
        return web.Response(status=304, headers=headers)
    headers[hdrs.CONTENT_TYPE] = asset.content_type
    return web.Response(body=asset.body, headers=headers)


def asset_answer(request: web.Request, name: str) -> web.Response:
    """The asset ``name``; cached for good when asked for by its current version.

    Raises :class:`NotFoundError` for any name that is not a packaged asset (names are looked
    up, never joined to a filesystem path).
    """
    asset = assets().get(name)
    if asset is None:
        raise NotFoundError("Not Found", [f"no dashboard asset {name!r}"])
    versioned = request.query.get("v") == asset.digest
    return answer(request, asset, VERSIONED_CACHE if versioned else UNVERSIONED_CACHE)
