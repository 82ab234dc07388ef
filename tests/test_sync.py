"""Release sync against local fake GitHub servers, and a chain of two opa-telemetry servers."""

from __future__ import annotations

import asyncio
import json
import logging
import sqlite3
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from opa_telemetry_server.cli import main as cli_main
from opa_telemetry_server.errors import SchemaError, SyncError
from opa_telemetry_server.services.catalog import load_catalog
from opa_telemetry_server.services.sync import SyncTarget, _sync_once, sync_product, sync_target
from opa_telemetry_server.storage.sqlite import SqliteStorage
from opa_telemetry_server.web.app import create_app, prepare_database
from opa_telemetry_server.web.appkeys import INTAKE

from .conftest import AiohttpClient, make_settings

TOKEN = "ghp_not-a-real-token-0123456789"  # noqa: S105 - a made-up value for the fake


def github_release(tag: str, *, draft: bool = False, prerelease: bool = False) -> dict[str, Any]:
    base = f"https://github.com/open-policy-agent/opa/releases/download/{tag}"
    return {
        "id": abs(hash(tag)) % 10**9,
        "tag_name": tag,
        "name": tag,
        "html_url": f"https://github.com/open-policy-agent/opa/releases/tag/{tag}",
        "draft": draft,
        "prerelease": prerelease,
        "published_at": "2026-11-26T12:00:00Z",
        "body": "x" * 200,
        "assets": [
            {"name": n, "browser_download_url": f"{base}/{n}"}
            for n in ("opa_linux_amd64", "opa_linux_amd64.sha256", "opa_windows_amd64.exe")
        ],
    }


@dataclass
class FakeGitHub:
    """GitHub's release list: paginated by ``per_page``/``page`` with ``Link``, an ``ETag``
    honoured by ``If-None-Match``, and a scripted failure mode."""

    releases: list[dict[str, Any]] = field(default_factory=list)
    mode: str = "ok"  # ok, ratelimit, retry-after, error, garbage, hang
    requests: list[web.Request] = field(default_factory=list)
    hanging: asyncio.Event = field(default_factory=asyncio.Event)

    @property
    def etag(self) -> str:
        return f'"{len(self.releases)}-{self.releases[0]["tag_name"] if self.releases else ""}"'

    async def handle(self, request: web.Request) -> web.StreamResponse:
        self.requests.append(request)
        if self.mode == "ratelimit":
            reset = str(int(time.time()) + 600)
            return web.json_response(
                {"message": "API rate limit exceeded"},
                status=403,
                headers={"X-RateLimit-Remaining": "0", "X-RateLimit-Reset": reset},
            )
        if self.mode == "retry-after":
            return web.json_response({"message": "slow down"}, status=429,
                                     headers={"Retry-After": "120"})  # fmt: skip
        if self.mode == "error":
            return web.Response(status=500, text="boom")
        if self.mode == "garbage":
            return web.Response(text="[{not json", content_type="application/json")
        if self.mode == "hang":
            await self.hanging.wait()
        if request.headers.get("If-None-Match") == self.etag:
            return web.Response(status=304, headers={"ETag": self.etag})
        per_page = int(request.query.get("per_page", "30"))
        page = int(request.query.get("page", "1"))
        chunk = self.releases[(page - 1) * per_page : page * per_page]
        headers = {"ETag": self.etag, "X-RateLimit-Remaining": "59"}
        if page * per_page < len(self.releases):
            headers["Link"] = f'<{request.url.update_query(page=page + 1)}>; rel="next"'
        return web.json_response(chunk, headers=headers)


@pytest.fixture
async def github() -> AsyncIterator[tuple[FakeGitHub, str]]:
    fake = FakeGitHub()
    app = web.Application()
    app.router.add_get("/repos/{owner}/{repo}/releases", fake.handle)
    server = TestServer(app, host="127.0.0.1")
    await server.start_server()
    try:
        yield fake, str(server.make_url("")).rstrip("/")
    finally:
        fake.hanging.set()
        await server.close()


@pytest.fixture
async def storage(tmp_path: Path) -> AsyncIterator[SqliteStorage]:
    opened = await SqliteStorage.open(tmp_path / "t.db")
    try:
        yield opened
    finally:
        await opened.close()


def target(api: str, **options: Any) -> SyncTarget:
    return SyncTarget("opa", "open-policy-agent/opa", api, **options)


async def tags(storage: SqliteStorage) -> list[str]:
    return [r.tag for r in (await load_catalog(storage)).releases("opa")]


async def test_sync_reads_every_page_skips_drafts_and_then_costs_a_304(
    github: tuple[FakeGitHub, str], storage: SqliteStorage
) -> None:
    fake, api = github
    fake.releases = [github_release(f"v1.{n}.0") for n in range(250, 0, -1)]
    fake.releases.insert(0, github_release("v2.0.0", draft=True))
    fake.releases.insert(1, github_release("v1.251.0-rc.1", prerelease=True))
    result = await sync_product(storage, target(api, token=TOKEN))
    assert (result.changed, result.pages, result.added, result.drafts_skipped) == (
        True, 3, 250, 1,
    )  # fmt: skip
    found = await tags(storage)
    assert len(found) == 250 and found[0] == "v1.250.0"  # no draft, no pre-release
    latest = (await load_catalog(storage)).latest("opa")
    assert latest is not None
    assert [a.name for a in latest.assets] == ["opa_linux_amd64", "opa_windows_amd64.exe"]
    assert latest.assets[0].url == (
        "https://openpolicyagent.org/downloads/v1.250.0/opa_linux_amd64"
    )  # OPA's binaries are linked on OPA's download site, as the bundled catalog does
    assert [r.query.get("per_page") for r in fake.requests] == ["100"] * 3
    assert all(r.headers["Authorization"] == f"Bearer {TOKEN}" for r in fake.requests)

    fake.requests.clear()
    again = await sync_product(storage, target(api, token=TOKEN))
    assert not again.changed and len(fake.requests) == 1
    assert fake.requests[0].headers["If-None-Match"] == fake.etag
    state = await storage.sync_state("opa")
    assert state is not None and state.etag == fake.etag and state.last_error is None
    with sqlite3.connect(storage.path) as conn:
        dump = "\n".join(conn.iterdump())
    assert TOKEN not in dump  # the token is never stored


async def test_releases_missing_upstream_are_removed_only_with_prune(
    github: tuple[FakeGitHub, str], storage: SqliteStorage
) -> None:
    fake, api = github
    fake.releases = [github_release("v1.1.0"), github_release("v1.0.0")]
    await sync_product(storage, target(api))
    fake.releases = [github_release("v1.2.0"), github_release("v1.1.0")]
    await sync_product(storage, target(api))
    assert await tags(storage) == ["v1.2.0", "v1.1.0", "v1.0.0"]
    fake.releases = [github_release("v1.3.0"), github_release("v1.2.0")]
    result = await sync_product(storage, target(api, prune=True))
    assert (result.added, result.removed) == (1, 2)
    assert await tags(storage) == ["v1.3.0", "v1.2.0"]


@pytest.mark.parametrize(
    ("mode", "message", "retry"),
    [
        ("ratelimit", "rate limited (403)", True),
        ("retry-after", "rate limited (429); retry in 120s", True),
        ("error", "HTTP 500", False),
        ("garbage", "answer is not JSON", False),
        ("hang", "no answer in time", False),
    ],
)
async def test_a_failed_sync_is_recorded_and_changes_nothing(
    github: tuple[FakeGitHub, str],
    storage: SqliteStorage,
    mode: str,
    message: str,
    retry: bool,
    caplog: pytest.LogCaptureFixture,
) -> None:
    fake, api = github
    fake.releases = [github_release("v1.0.0")]
    fake.mode = mode
    timeout = aiohttp.ClientTimeout(total=5, sock_read=0.3)
    caplog.set_level(logging.DEBUG)
    async with aiohttp.ClientSession(timeout=timeout) as session:
        with pytest.raises(SyncError, match=message.replace("(", r"\(").replace(")", r"\)")):
            await sync_product(storage, target(api, token=TOKEN), session)
    assert await tags(storage) == []
    state = await storage.sync_state("opa")
    assert state is not None and state.last_error and message.split(" (")[0] in state.last_error
    assert state.last_success_at is None
    assert (state.retry_after_at is not None) == retry
    if mode == "retry-after":
        assert state.retry_after_at is not None and state.last_error_at is not None
        assert state.retry_after_at - state.last_error_at == 120
    assert TOKEN not in caplog.text


async def test_cli_sync_uses_github_token_and_status_shows_the_state(
    github: tuple[FakeGitHub, str],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    fake, api = github
    fake.releases = [github_release("v1.21.0"), github_release("v1.20.2")]
    settings = make_settings(tmp_path)
    await prepare_database(settings)
    monkeypatch.setenv("GITHUB_TOKEN", TOKEN)

    def main(argv: list[str]) -> Any:  # in a thread: this loop serves the fake GitHub
        return asyncio.to_thread(cli_main, argv)

    db = ("--db", settings.db)
    assert await main(["releases", "sync", "--api-url", api, *db]) == 0
    out = capsys.readouterr().out
    assert out == "opa: 1 added, 1 updated, 0 removed, 2 read from 1 page(s), 0 drafts skipped\n"
    assert fake.requests[-1].headers["Authorization"] == f"Bearer {TOKEN}"
    assert await main(["releases", "status", *db]) == 0
    out = capsys.readouterr().out
    assert f"sync source:  {api}/repos/open-policy-agent/opa" in out and TOKEN not in out
    fake.mode = "error"
    assert await main(["releases", "sync", "--api-url", api, *db]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: sync of opa from") and "HTTP 500" in err and TOKEN not in err
    await main(["releases", "status", *db])
    assert "last error:" in capsys.readouterr().out


async def test_a_chain_of_two_servers_syncs_through_the_github_shaped_list(
    aiohttp_client: AiohttpClient, tmp_path: Path
) -> None:
    """The outer server serves GitHub's list shape; the inner one syncs from it as from
    GitHub, pages, ETag and all, and its own fleet gets the outer's releases."""
    (tmp_path / "outer").mkdir()
    (tmp_path / "inner").mkdir()
    outer = await aiohttp_client(create_app(make_settings(tmp_path / "outer")))
    for bad in ("per_page=0", "per_page=101", "page=x"):
        assert (await outer.get(f"/repos/open-policy-agent/opa/releases?{bad}")).status == 400
    listing = await outer.get("/repos/open-policy-agent/opa/releases?per_page=2&page=2")
    assert listing.status == 200
    assert [r["tag_name"] for r in await listing.json()] == ["v1.20.0", "v1.19.1"]
    assert 'rel="next"' in listing.headers["Link"] and listing.headers["ETag"]

    inner_settings = make_settings(
        tmp_path / "inner", seed_catalog=False, sync_api_url=str(outer.make_url("")).rstrip("/")
    )
    await prepare_database(inner_settings)
    inner = await SqliteStorage.open(inner_settings.db)
    try:
        first = await sync_product(inner, sync_target(inner_settings))
        assert (first.added, first.pages) == (139, 2)
        second = await sync_product(inner, sync_target(inner_settings))
        assert not second.changed  # the outer server's ETag: a 304
        outer_latest = outer.app[INTAKE].catalog.catalog.latest("opa")
        inner_latest = (await load_catalog(inner)).latest("opa")
        assert inner_latest is not None and outer_latest is not None
        # The same release, OPA's binaries still linked on OPA's download site.
        assert inner_latest.to_json() == outer_latest.to_json()
    finally:
        await inner.close()


async def test_the_server_syncs_on_its_interval(
    github: tuple[FakeGitHub, str], aiohttp_client: AiohttpClient, tmp_path: Path
) -> None:
    fake, api = github
    fake.releases = [github_release("v1.30.0")]
    settings = make_settings(tmp_path, sync_interval=3600, sync_api_url=api, catalog_refresh=0.05)
    client = await aiohttp_client(create_app(settings))
    cache = client.app[INTAKE].catalog
    async with asyncio.timeout(10):
        while getattr(cache.catalog.latest("opa"), "tag", None) != "v1.30.0":
            await asyncio.sleep(0.02)
    body = json.dumps({"id": "a72dc36a-72db-458d-9208-9be4189e4ab7", "version": "1.20.2"})
    response = await client.post(
        "/v1/version",
        data=body,
        headers={"Content-Type": "application/json", "User-Agent": "Open Policy Agent/1.20.2"},
    )
    answer = await response.json()
    assert answer["latest"]["latest_release"] == "v1.30.0", answer


async def test_an_invalid_upstream_entry_is_skipped_not_fatal(
    github: tuple[FakeGitHub, str], storage: SqliteStorage
) -> None:
    fake, api = github
    fake.releases = [github_release("v1.1.0"), github_release("v1.0.0")]
    fake.releases[0]["tag_name"] = "nightly"
    result = await sync_product(storage, target(api))
    assert (result.added, result.invalid_skipped) == (1, 1)
    assert await tags(storage) == ["v1.0.0"]


async def test_only_worker_0_syncs(
    github: tuple[FakeGitHub, str], aiohttp_client: AiohttpClient, tmp_path: Path
) -> None:
    fake, api = github
    fake.releases = [github_release("v1.30.0")]
    settings = make_settings(tmp_path, sync_interval=3600, sync_api_url=api, catalog_refresh=0.05)
    await prepare_database(settings)

    def syncing() -> list[str]:
        return [t.get_name() for t in asyncio.all_tasks() if t.get_name() == "opa-telemetry-sync"]

    await aiohttp_client(create_app(settings, worker=1))
    assert syncing() == []
    client = await aiohttp_client(create_app(settings, worker=0))
    assert syncing() == ["opa-telemetry-sync"]
    cache = client.app[INTAKE].catalog
    async with asyncio.timeout(10):  # let the first sync finish before the app stops
        while getattr(cache.catalog.latest("opa"), "tag", None) != "v1.30.0":
            await asyncio.sleep(0.02)


async def test_the_server_loop_waits_as_long_as_upstream_asked(
    github: tuple[FakeGitHub, str], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    fake, api = github
    fake.releases = [github_release("v1.0.0")]
    fake.mode = "retry-after"
    settings = make_settings(tmp_path)
    await prepare_database(settings)

    async def open_storage() -> SqliteStorage:
        return await SqliteStorage.open(settings.db, migrate=False)

    caplog.set_level(logging.DEBUG)
    async with aiohttp.ClientSession() as client:
        assert await _sync_once(open_storage, target(api, token=TOKEN), client) == 120
        assert len(fake.requests) == 1
        fake.mode = "ok"
        # Asked to wait 120 s: the next round does not ask again before then.
        assert await _sync_once(open_storage, target(api, token=TOKEN), client) == 0
        assert len(fake.requests) == 1
    assert "rate limited (429); retry in 120s" in caplog.text and TOKEN not in caplog.text


async def test_a_database_that_is_away_costs_the_sync_loop_one_line(
    github: tuple[FakeGitHub, str], caplog: pytest.LogCaptureFixture
) -> None:
    _, api = github

    async def open_storage() -> SqliteStorage:
        raise SchemaError("postgresql://opa:***@db:5432/t: cannot connect: connection refused")

    caplog.set_level(logging.WARNING)
    async with aiohttp.ClientSession() as client:
        assert await _sync_once(open_storage, target(api), client) == 0
    [record] = caplog.records
    assert record.getMessage() == (
        "release sync of opa: cannot open the database:"
        " postgresql://opa:***@db:5432/t: cannot connect: connection refused"
    )
    assert record.exc_info is None


async def test_a_repo_name_with_control_characters_never_reaches_a_header(
    aiohttp_client: AiohttpClient, tmp_path: Path
) -> None:
    # Found by schemathesis: the ETag carried the product taken from the URL, and a vertical
    # tab in a header made aiohttp drop the connection instead of answering.
    client = await aiohttp_client(create_app(make_settings(tmp_path)))
    response = await client.get("/repos/%08x/%0B/releases?page=2")
    assert response.status == 200 and await response.json() == []
    assert response.headers["ETag"].isprintable()


def test_the_github_token_goes_to_github_only_and_never_in_clear() -> None:
    from opa_telemetry_server.cli.arguments import with_github_token
    from opa_telemetry_server.settings import Settings

    environ = {"GITHUB_TOKEN": TOKEN}
    assert with_github_token(Settings(), environ).sync_token == TOKEN
    # A chain's outer server is not GitHub: $GITHUB_TOKEN stays home.
    outer = Settings(sync_api_url="http://outer.example:9181")
    assert with_github_token(outer, environ).sync_token == ""
    with pytest.raises(ValueError, match="never sent in clear"):
        Settings(sync_api_url="http://outer.example:9181", sync_token=TOKEN)
    # Plain HTTP to this host (a local stand-in, or a tunnel) may carry one.
    local = Settings(sync_api_url="http://127.0.0.1:9181")
    assert with_github_token(local, environ).sync_token == TOKEN
