"""Keep a product's releases in step with GitHub (or with another opa-telemetry server).

Reads ``GET {api_url}/repos/{owner}/{repo}/releases`` page by page (``per_page=100``,
following ``Link: rel="next"``), with ``If-None-Match`` on the first page so that an unchanged
list costs one 304 (free against GitHub's rate limit). Rate limits are honoured: a 403 or 429
with ``Retry-After`` or ``X-RateLimit-Remaining: 0`` stops the sync and records when to try
again. Every request has a timeout and every page a size cap. Drafts are skipped; releases
missing upstream are removed only with ``prune``. The token is sent only to ``api_url`` and
is never logged or stored.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field, replace
from typing import Any

import aiohttp
from yarl import URL

from opa_telemetry_server import __version__
from opa_telemetry_server.domain.protocol import product_slug
from opa_telemetry_server.domain.releases import Release, release_from_github
from opa_telemetry_server.errors import CatalogError, SyncError, TelemetryError
from opa_telemetry_server.settings import Settings
from opa_telemetry_server.storage import Storage, SyncState

logger = logging.getLogger(__name__)

GITHUB_API = "https://api.github.com"
PER_PAGE = 100
MAX_PAGES = 50  # 5000 releases: OPA has a few hundred
MAX_PAGE_BYTES = 8 * 1024 * 1024  # a page of 100 releases with their notes is about 1 MiB
CONNECT_TIMEOUT = 10.0
READ_TIMEOUT = 30.0
TOTAL_TIMEOUT = 120.0
MAX_ERROR_LENGTH = 300


@dataclass(frozen=True)
class SyncTarget:
    """Where one product's releases come from."""

    product: str
    repo: str  # owner/name
    api_url: str = GITHUB_API
    include_prereleases: bool = False
    prune: bool = False
    token: str = field(default="", repr=False)

    @property
    def source(self) -> str:
        """What the stored ETag is valid for: a different source starts afresh."""
        flags = "+prereleases" if self.include_prereleases else ""
        return f"{self.api_url.rstrip('/')}/repos/{self.repo}{flags}"

    def first_page(self) -> URL:
        return URL(f"{self.api_url.rstrip('/')}/repos/{self.repo}/releases").with_query(
            per_page=PER_PAGE
        )


def sync_target(settings: Settings) -> SyncTarget:
    """The sync the settings describe (the token travels in memory only)."""
    return SyncTarget(
        product=product_slug(settings.sync_product),
        repo=settings.sync_repo,
        api_url=settings.sync_api_url,
        include_prereleases=settings.sync_include_prereleases,
        prune=settings.sync_prune,
        token=settings.sync_token,
    )


@dataclass(frozen=True, slots=True)
class SyncResult:
    """What one sync did."""

    changed: bool  # False when the first page answered 304 Not Modified
    read: int = 0
    added: int = 0
    updated: int = 0
    removed: int = 0
    pages: int = 0
    drafts_skipped: int = 0
    invalid_skipped: int = 0

    def describe(self, product: str) -> str:
        if not self.changed:
            return f"{product}: not modified since the last sync"
        return (
            f"{product}: {self.added} added, {self.updated} updated, {self.removed} removed,"
            f" {self.read} read from {self.pages} page(s), {self.drafts_skipped} drafts skipped"
            + (f", {self.invalid_skipped} invalid skipped" if self.invalid_skipped else "")
        )


async def sync_product(
    storage: Storage,
    target: SyncTarget,
    session: aiohttp.ClientSession | None = None,
    now: float | None = None,
) -> SyncResult:
    """Sync ``target.product`` once and record the outcome in the sync state.

    Raises :class:`SyncError` (after recording it) when GitHub cannot be read or its answer
    is unusable; the catalog is then left as it was.
    """
    started = int(now if now is not None else time.time())
    previous = await storage.sync_state(target.product)
    etag = previous.etag if previous and previous.source == target.source else None
    state = SyncState(target.product, target.source, etag, last_attempt_at=started)
    if previous and previous.source == target.source:
        state = replace(previous, last_attempt_at=started)
    try:
        async with _session(session) as client:
            pages, new_etag = await _fetch(client, target, etag)
        if pages is None:
            result = SyncResult(changed=False, pages=1)
        else:
            result = await _apply(storage, target, pages)
            state = replace(state, etag=new_etag)
    except SyncError as exc:
        await storage.save_sync_state(
            replace(state, last_error=str(exc)[:MAX_ERROR_LENGTH], last_error_at=started,
                    retry_after_at=started + exc.retry_after if exc.retry_after else None)
        )  # fmt: skip
        raise
    await storage.save_sync_state(
        replace(state, last_success_at=started, last_error=None, last_error_at=None,
                retry_after_at=None)
    )  # fmt: skip
    return result


async def _apply(storage: Storage, target: SyncTarget, pages: list[Any]) -> SyncResult:
    """Store what the pages list. Upstream is not the operator: an entry that does not pass
    validation (a tag that is not a version, a bad URL) is skipped and logged, not fatal."""
    releases: list[Release] = []
    drafts = skipped = 0
    seen: set[Any] = set()
    for entry in (entry for page in pages for entry in page):
        if not isinstance(entry, dict):
            raise SyncError("the answer is not a list of release objects")
        try:
            release = release_from_github(entry, target.product)
        except CatalogError as exc:
            skipped += 1
            logger.info("release sync of %s: skipping %s", target.product, exc)
            continue
        if release is None:
            drafts += 1
        elif release.version.precedence in seen:
            skipped += 1
        elif target.include_prereleases or not release.prerelease:
            seen.add(release.version.precedence)
            releases.append(release)
    added, updated, removed = await storage.sync_releases(
        target.product, releases, prune=target.prune
    )
    return SyncResult(True, len(releases), added, updated, removed, len(pages), drafts, skipped)


class _session:
    """The given session, or one of our own that we close (one owner per resource)."""

    def __init__(self, given: aiohttp.ClientSession | None) -> None:
        self._given = given
        self._own: aiohttp.ClientSession | None = None

    async def __aenter__(self) -> aiohttp.ClientSession:
        if self._given is not None:
            return self._given
        self._own = aiohttp.ClientSession(
            timeout=aiohttp.ClientTimeout(
                total=TOTAL_TIMEOUT, sock_connect=CONNECT_TIMEOUT, sock_read=READ_TIMEOUT
            ),
            trust_env=True,  # HTTPS_PROXY for servers that reach GitHub through a proxy
        )
        return self._own

    async def __aexit__(self, *exc: object) -> None:
        if self._own is not None:
            await self._own.close()


async def _fetch(
    client: aiohttp.ClientSession, target: SyncTarget, etag: str | None
) -> tuple[list[Any] | None, str | None]:
    """Every page of the release list, or ``None`` when the first page is not modified."""
    headers = {
        "Accept": "application/vnd.github+json",
        "X-GitHub-Api-Version": "2022-11-28",
        "User-Agent": f"opa-telemetry-server/{__version__}",
    }
    if target.token:
        headers["Authorization"] = f"Bearer {target.token}"
    origin = target.first_page().origin()
    url: URL | None = target.first_page()
    pages: list[Any] = []
    first_etag = None
    while url is not None:
        if len(pages) >= MAX_PAGES:
            raise SyncError(f"more than {MAX_PAGES} pages of releases; refusing to go on")
        if url.origin() != origin:
            # Never send the token elsewhere: a Link must stay on the API's origin.
            raise SyncError(f"next page {url.origin()} is not on {origin}")
        conditional = dict(headers)
        if not pages and etag:
            conditional["If-None-Match"] = etag
        try:
            async with asyncio.timeout(TOTAL_TIMEOUT):
                async with client.get(url, headers=conditional, allow_redirects=False) as resp:
                    if resp.status == 304 and not pages:
                        return None, etag
                    _check_status(resp)
                    body = await _read_capped(resp)
                    link = resp.links.get("next")
                    next_url = link.get("url") if link is not None else None
                    if not pages:
                        first_etag = resp.headers.get("ETag")
        except TimeoutError:
            raise SyncError(f"{url}: no answer in time (timed out)") from None
        except aiohttp.ClientError as exc:
            raise SyncError(f"{url}: {type(exc).__name__}: {str(exc)[:200]}") from None
        try:
            page = json.loads(body)
        except (ValueError, RecursionError):
            raise SyncError(f"{url}: answer is not JSON") from None
        if not isinstance(page, list):
            raise SyncError(f"{url}: expected a JSON array of releases")
        pages.append(page)
        url = URL(str(next_url)) if next_url else None
    return pages, first_etag


def _check_status(resp: aiohttp.ClientResponse) -> None:
    if resp.status == 200:
        return
    retry = _retry_after(resp)
    if resp.status in (403, 429) and retry is not None:
        raise SyncError(f"{resp.url}: rate limited ({resp.status}); retry in {retry}s", retry)
    raise SyncError(f"{resp.url}: HTTP {resp.status} {resp.reason or ''}".rstrip())


def _retry_after(resp: aiohttp.ClientResponse) -> int | None:
    """Seconds to wait, from ``Retry-After`` or an exhausted ``X-RateLimit-*``."""
    header = resp.headers.get("Retry-After", "")
    if header.isdigit():
        return max(1, int(header))
    if resp.headers.get("X-RateLimit-Remaining") == "0":
        reset = resp.headers.get("X-RateLimit-Reset", "")
        if reset.isdigit():
            return max(1, int(reset) - int(time.time()))
        return 60
    return None


async def _read_capped(resp: aiohttp.ClientResponse) -> bytes:
    if resp.content_length is not None and resp.content_length > MAX_PAGE_BYTES:
        raise SyncError(f"{resp.url}: page larger than {MAX_PAGE_BYTES} bytes")
    body = await resp.content.read(MAX_PAGE_BYTES + 1)
    while len(body) <= MAX_PAGE_BYTES:
        more = await resp.content.read(MAX_PAGE_BYTES + 1 - len(body))
        if not more:
            return body
        body += more
    raise SyncError(f"{resp.url}: page larger than {MAX_PAGE_BYTES} bytes")


async def run_sync(
    open_storage: Callable[[], Awaitable[Storage]], targets: list[SyncTarget], interval: float
) -> None:
    """Sync every target now and then every ``interval`` seconds, forever (one process).

    A failure is logged (never with the token) and retried at the next interval, or later
    when the upstream asked us to wait.
    """
    async with _session(None) as client:
        while True:
            waits = [await _sync_once(open_storage, target, client) for target in targets]
            await asyncio.sleep(max([interval, *waits]))


async def _sync_once(
    open_storage: Callable[[], Awaitable[Storage]],
    target: SyncTarget,
    client: aiohttp.ClientSession,
) -> float:
    """One sync of ``target`` on a connection of its own (never the ingest writer's); never
    raises. Returns how long the upstream asked us to wait (0 if it did not)."""
    try:
        storage = await open_storage()
    except TelemetryError as exc:  # the database away (down, failing over): one line
        logger.warning("release sync of %s: cannot open the database: %s", target.product, exc)
        return 0.0
    except Exception:
        logger.warning("release sync of %s: cannot open the database", target.product,
                       exc_info=True)  # fmt: skip
        return 0.0
    try:
        async with storage.exclusive(f"sync:{target.product}") as mine:
            if not mine:  # another node of the deployment is syncing this product now
                logger.debug("release sync of %s: another node is at it", target.product)
                return 0.0
            state = await storage.sync_state(target.product)
            if state and state.retry_after_at and state.retry_after_at > time.time():
                return 0.0  # still asked to wait: try again at the next interval
            result = await sync_product(storage, target, client)
            logger.info("release sync: %s", result.describe(target.product))
    except SyncError as exc:
        logger.warning("release sync of %s failed: %s", target.product, exc)
        return float(exc.retry_after or 0)
    except TelemetryError as exc:  # the database away, a bad catalog entry...: one line
        logger.warning("release sync of %s failed: %s", target.product, exc)
    except Exception:
        logger.warning("release sync of %s failed", target.product, exc_info=True)
    finally:
        await storage.close()
    return 0.0
