"""The dashboard: its page and packaged assets over HTTP, then the page itself in a real browser.

The browser tests drive Debian's Chromium through Playwright against a real ``serve`` process
holding known reports (today's written through ``POST /v1/version``, earlier days through the
storage layer's own write path). Without Chromium they are skipped with the reason, unless
``OPA_TELEMETRY_REQUIRE_BROWSER=1`` (set by ``.ci/run``): then they fail.
"""

from __future__ import annotations

import asyncio
import configparser
import fnmatch
import json
import os
import shutil
import time
import urllib.parse
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from html.parser import HTMLParser
from http.client import HTTPConnection
from pathlib import Path
from typing import Any

import pytest
from aiohttp.test_utils import TestClient
from playwright.sync_api import Browser, ConsoleMessage, Page, Request, Route, sync_playwright

from opa_telemetry_server.domain.protocol import Report, parse_report, parse_user_agent
from opa_telemetry_server.domain.releases import bundled_releases
from opa_telemetry_server.services.catalog import Catalog
from opa_telemetry_server.storage.sqlite import SqliteStorage
from opa_telemetry_server.web.app import create_app
from opa_telemetry_server.web.dashboard import CONTENT_SECURITY_POLICY, assets

from .conftest import REPO, AiohttpClient, make_settings, serve_argv, serving

STATIC = REPO / "server" / "static"
REQUIRE_BROWSER = "OPA_TELEMETRY_REQUIRE_BROWSER"
SCREENSHOT_DIR = REPO / "build"
TOKEN = "dashboard-test-token-0123456789"  # noqa: S105 (a test server's token)


# -- the page and its assets over HTTP ------------------------------------------------------


class PageParser(HTMLParser):
    """Collects what a CSP-strict page may and may not contain."""

    def __init__(self) -> None:
        super().__init__()
        self.urls: list[str] = []
        self.inline_scripts: list[str] = []
        self.inline_styles: list[str] = []
        self.handlers: list[str] = []
        self.meta: dict[str, str] = {}
        self._in_script = False

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        values = {name: value or "" for name, value in attrs}
        self.handlers += [name for name in values if name.startswith("on")]
        if "style" in values:
            self.inline_styles.append(values["style"])
        if tag == "style":
            self.inline_styles.append("<style>")
        for name in ("src", "href"):
            if name in values:
                self.urls.append(values[name])
        if tag == "meta" and "name" in values:
            self.meta[values["name"]] = values.get("content", "")
        self._in_script = tag == "script"

    def handle_endtag(self, tag: str) -> None:
        self._in_script = False

    def handle_data(self, data: str) -> None:
        if self._in_script and data.strip():
            self.inline_scripts.append(data)


def parse_page(html: str) -> PageParser:
    parser = PageParser()
    parser.feed(html)
    return parser


async def test_dashboard_page_is_served_with_a_strict_csp_and_no_inline_code(
    client: TestClient[Any, Any],
) -> None:
    response = await client.get("/dashboard")
    assert response.status == 200
    assert response.content_type == "text/html"
    csp = response.headers["Content-Security-Policy"]
    assert csp == CONTENT_SECURITY_POLICY
    assert "default-src 'none'" in csp and "script-src 'self'" in csp
    assert "unsafe" not in csp
    assert response.headers["X-Content-Type-Options"] == "nosniff"
    assert response.headers["Referrer-Policy"] == "no-referrer"
    assert response.headers["Cache-Control"] == "no-cache"
    page = parse_page(await response.text())
    assert page.inline_scripts == [] and page.handlers == [] and page.inline_styles == []
    assert page.urls, "the page loads its script and styles"


@pytest.mark.parametrize(
    ("overrides", "mode"),
    [
        ({}, "closed"),
        ({"admin_token": TOKEN}, "token"),
        ({"public_stats": True}, "public"),
        ({"public_stats": True, "admin_token": TOKEN}, "public"),
    ],
)
async def test_dashboard_page_says_how_the_stats_are_opened_and_holds_no_data(
    aiohttp_client: AiohttpClient, tmp_path: Path, overrides: dict[str, Any], mode: str
) -> None:
    client = await aiohttp_client(create_app(make_settings(tmp_path, **overrides)))
    response = await client.get("/dashboard")  # no token needed: the page holds no data
    assert response.status == 200
    html = await response.text()
    assert parse_page(html).meta["opa-telemetry-access"] == mode
    assert TOKEN not in html


async def test_dashboard_page_loads_only_packaged_assets_by_versioned_url(
    client: TestClient[Any, Any],
) -> None:
    page = parse_page(await (await client.get("/dashboard")).text())
    for url in page.urls:
        assert url.startswith("dashboard/assets/") and "?v=" in url, url  # relative: no CDN
        response = await client.get(f"/{url}")
        assert response.status == 200, url
        assert response.headers["Cache-Control"] == "public, max-age=31536000, immutable"
        assert response.headers["Content-Security-Policy"] == CONTENT_SECURITY_POLICY
        assert response.headers["X-Content-Type-Options"] == "nosniff"
    loaded = {url.split("?")[0].removeprefix("dashboard/assets/") for url in page.urls}
    assert {"dashboard.js", "dashboard.css", "vendor/uPlot.iife.min.js"} <= loaded


async def test_dashboard_assets_have_their_content_types(client: TestClient[Any, Any]) -> None:
    expected = {
        "dashboard.js": "text/javascript",
        "dashboard.css": "text/css",
        "vendor/uPlot.min.css": "text/css",
        "favicon.svg": "image/svg+xml",
    }
    for name, content_type in expected.items():
        response = await client.get(f"/dashboard/assets/{name}")
        assert response.status == 200
        assert response.content_type == content_type
        assert await response.read() == (STATIC / name).read_bytes()


async def test_dashboard_asset_by_an_old_version_is_revalidated_not_cached_for_good(
    client: TestClient[Any, Any],
) -> None:
    response = await client.get("/dashboard/assets/dashboard.js?v=0123456789abcdef")
    assert response.status == 200
    assert response.headers["Cache-Control"] == "no-cache"
    etag = response.headers["ETag"]
    again = await client.get("/dashboard/assets/dashboard.js", headers={"If-None-Match": etag})
    assert again.status == 304
    assert await again.read() == b""
    page = await client.get("/dashboard")
    unchanged = await client.get("/dashboard", headers={"If-None-Match": page.headers["ETag"]})
    assert unchanged.status == 304


@pytest.mark.parametrize(
    "path",
    [
        "/dashboard/assets/nope.js",
        "/dashboard/assets/dashboard.html",
        "/dashboard/assets/vendor/README.md",
        "/dashboard/assets/../dashboard.py",
        "/dashboard/assets/%2e%2e/%2e%2e/dashboard.py",
        "/dashboard/assets/vendor/../../../setup.cfg",
    ],
)
async def test_dashboard_serves_nothing_but_its_assets(
    client: TestClient[Any, Any], path: str
) -> None:
    response = await client.get(path)
    assert response.status == 404
    assert "error" in await response.json()


async def test_dashboard_is_served_under_the_mount_prefix(
    aiohttp_client: AiohttpClient, tmp_path: Path
) -> None:
    client = await aiohttp_client(create_app(make_settings(tmp_path, prefix="/custom")))
    assert (await client.get("/dashboard")).status == 404
    page = parse_page(await (await client.get("/custom/dashboard")).text())
    for url in page.urls:  # relative URLs resolve under the prefix
        assert (await client.get(f"/custom/{url}")).status == 200


async def test_dashboard_with_a_trailing_slash_redirects_to_the_page(
    aiohttp_client: AiohttpClient, tmp_path: Path
) -> None:
    client = await aiohttp_client(create_app(make_settings(tmp_path, prefix="/custom")))
    response = await client.get("/custom/dashboard/", allow_redirects=False)
    assert response.status == 301
    assert response.headers["Location"] == "../dashboard"
    followed = await client.get("/custom/dashboard/")
    assert followed.status == 200 and str(followed.url).endswith("/custom/dashboard")


def test_every_static_file_ships_in_the_package() -> None:
    config = configparser.ConfigParser()
    config.read(REPO / "setup.cfg")
    packages = config["options"]["packages"].split()
    package_data = config["options.package_data"]
    for path in STATIC.rglob("*"):
        if path.is_file():
            folder = path.parent.relative_to(REPO / "server").as_posix().replace("/", ".")
            package = f"opa_telemetry_server.{folder}"
            assert package in packages, f"{package} is not a package in setup.cfg"
            patterns = [p.strip() for p in package_data.get(package, "").split(",")]
            assert any(fnmatch.fnmatch(path.name, p) for p in patterns), f"{path} not shipped"
    assert (STATIC / "vendor" / "uPlot.LICENSE").read_text().startswith("The MIT License")
    assert "vendor/uPlot.iife.min.js" in assets()


def test_dashboard_code_fetches_nothing_from_another_origin() -> None:
    for name in ("dashboard.html", "dashboard.js", "dashboard.css"):
        text = (STATIC / name).read_text()
        assert "http://" not in text and "https://" not in text and "//cdn" not in text, name


# -- the page in a real browser -------------------------------------------------------------


@dataclass
class Fleet:
    """The reports a test server holds, and what the dashboard must show for them."""

    latest: str  # the catalog's latest release, e.g. "1.20.2"
    previous: str
    old: str
    today: str
    daily_instances: dict[str, int] = field(default_factory=dict)
    daily_versions: dict[str, dict[str, int]] = field(default_factory=dict)
    daily_checks: dict[str, int] = field(default_factory=dict)
    platforms: set[str] = field(default_factory=set)


def catalog_versions() -> tuple[str, str, str]:
    """The latest bundled release, the one before it, and an old one (without the ``v``)."""
    catalog = Catalog(("opa", release) for release in bundled_releases())
    stable = [r.version.text.lstrip("v") for r in catalog.releases("opa") if not r.prerelease]
    latest = catalog.latest("opa")
    assert latest is not None
    return latest.version.text.lstrip("v"), stable[1], stable[-1]


def opa_report(version: str, os_name: str, arch: str, heap: int) -> Report:
    body = {"id": str(uuid.uuid4()), "version": version, "heap_usage_bytes": str(heap)}
    client = parse_user_agent(f"Open Policy Agent/{version} ({os_name}, {arch})")
    return parse_report(json.dumps(body).encode(), client, json.loads)


# The six days before today, oldest first: (instances per (version, os, arch, heap), checks).
# The latest release rolls out on arm64 while the previous and an old one fade.
EARLIER_DAYS: tuple[tuple[dict[tuple[str, str, str, int], int], int], ...] = (
    ({("old", "darwin", "arm64", 30_000_000): 2, ("previous", "linux", "amd64", 9_000_000): 4}, 1),
    ({("old", "darwin", "arm64", 31_000_000): 2, ("previous", "linux", "amd64", 9_500_000): 5}, 2),
    ({("old", "darwin", "arm64", 29_000_000): 1, ("previous", "linux", "amd64", 10_000_000): 5,
      ("latest", "linux", "arm64", 19_000_000): 1}, 1),
    ({("old", "darwin", "arm64", 30_000_000): 1, ("previous", "linux", "amd64", 11_000_000): 4,
      ("latest", "linux", "arm64", 20_000_000): 2}, 3),
    ({("old", "darwin", "arm64", 30_000_000): 1, ("previous", "linux", "amd64", 10_000_000): 3,
      ("latest", "linux", "arm64", 21_000_000): 3}, 2),
    ({("previous", "linux", "amd64", 12_000_000): 2, ("latest", "linux", "arm64", 20_000_000): 4},
     1),
)  # fmt: skip


def seed_fleet(db: Path) -> Fleet:
    """:data:`EARLIER_DAYS` written through the storage layer's write path (a write's time is
    its day); today's reports are posted to the running server by :func:`post_today`."""
    latest, previous, old = catalog_versions()
    names = {"latest": latest, "previous": previous, "old": old}
    now = time.time()
    today = datetime.fromtimestamp(now, UTC).date()
    fleet = Fleet(latest, previous, old, today.isoformat())
    batches = []
    for days_ago, (groups, checks) in zip(
        range(len(EARLIER_DAYS), 0, -1), EARLIER_DAYS, strict=True
    ):
        key = (today - timedelta(days=days_ago)).isoformat()
        reports = []
        versions: dict[str, int] = {}
        for (name, os_name, arch, heap), count in groups.items():
            reports += [opa_report(names[name], os_name, arch, heap) for _ in range(count)]
            versions[names[name]] = versions.get(names[name], 0) + count
            fleet.platforms.add(f"{os_name}/{arch}")
        batches.append((now - days_ago * 86400, reports, checks))
        fleet.daily_instances[key] = len(reports)
        fleet.daily_checks[key] = checks
        fleet.daily_versions[key] = versions

    async def write() -> None:
        storage = await SqliteStorage.open(db)
        try:
            for at, reports, checks in batches:
                await storage.write_batch(reports, ["opa"] * checks, at)
        finally:
            await storage.close()

    # Playwright's sync API runs an event loop in this thread: the storage gets one of its own.
    with ThreadPoolExecutor(1) as pool:
        pool.submit(asyncio.run, write()).result()
    return fleet


def post_today(base_url: str, fleet: Fleet) -> None:
    """Today's reports and one release check, through the server's own routes."""
    reports = [(fleet.latest, "linux", "amd64", 15_000_000)] * 4 + [
        (fleet.previous, "windows", "amd64", 18_000_000)
    ]
    for version, os_name, arch, heap in reports:
        body = {"id": str(uuid.uuid4()), "version": version, "heap_usage_bytes": str(heap)}
        agent = f"Open Policy Agent/{version} ({os_name}, {arch})"
        headers = {"Content-Type": "application/json", "User-Agent": agent}
        status, _ = fetch(f"{base_url}/v1/version", method="POST", body=body, headers=headers)
        assert status == 200
        fleet.platforms.add(f"{os_name}/{arch}")
    checked = f"{base_url}/repos/open-policy-agent/opa/releases/latest"
    assert fetch(checked, headers={"User-Agent": "OPA-Version-Checker"})[0] == 200
    fleet.daily_instances[fleet.today] = len(reports)
    fleet.daily_checks[fleet.today] = 1
    fleet.daily_versions[fleet.today] = {fleet.latest: 4, fleet.previous: 1}


def wait_for_aggregates(url: str, fleet: Fleet) -> None:
    """Until the stats API counts every report written (its aggregates follow the reports
    every ``--stats-interval``); a hang guard, not a timing."""
    expected = sum(fleet.daily_instances.values())  # one report per instance here
    deadline = time.monotonic() + 30
    while True:
        status, document = fetch(
            f"{url}/v1/stats?days=7", headers={"Authorization": f"Bearer {TOKEN}"}
        )
        assert status == 200, document
        if document["reports"] == expected:
            return
        assert time.monotonic() < deadline, f"stats never counted {expected}: {document}"
        time.sleep(0.05)


def fetch(
    url: str, *, method: str = "GET", body: Any = None, headers: dict[str, str] | None = None
) -> tuple[int, Any]:
    """One request to a local test server: the status and the JSON answer."""
    parts = urllib.parse.urlsplit(url)
    connection = HTTPConnection(parts.netloc, timeout=10)
    try:
        data = None if body is None else json.dumps(body).encode()
        connection.request(method, parts.path, body=data, headers=headers or {})
        response = connection.getresponse()
        return response.status, json.loads(response.read())
    finally:
        connection.close()


def browser_or_skip() -> str:
    """The Chromium to drive; skips (or fails, when CI requires the browser) without it."""
    executable = shutil.which("chromium")
    if executable:
        return executable
    reason = "Chromium is not installed (apt-get install -y chromium): browser tests not run"
    if os.environ.get(REQUIRE_BROWSER) == "1":
        pytest.fail(f"{reason}, but {REQUIRE_BROWSER}=1 requires them")
    pytest.skip(reason)


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    executable = browser_or_skip()
    with sync_playwright() as playwright:
        launched = playwright.chromium.launch(
            executable_path=executable,
            headless=True,
            args=["--no-sandbox", "--disable-gpu", "--disable-background-networking"],
        )
        try:
            yield launched
        finally:
            launched.close()


@dataclass
class Session:
    """One browser tab on the dashboard, with everything it logged and asked for."""

    page: Page
    errors: list[str] = field(default_factory=list)
    requests: list[Request] = field(default_factory=list)
    foreign: list[str] = field(default_factory=list)


@pytest.fixture
def open_dashboard(browser: Browser) -> Iterator[Callable[[str], Session]]:
    contexts = []

    def open_(url: str) -> Session:
        context = browser.new_context(viewport={"width": 1280, "height": 1200})
        contexts.append(context)
        page = context.new_page()
        session = Session(page)
        origin = url.split("/dashboard")[0]

        def route(route: Route) -> None:
            if route.request.url.startswith(origin + "/"):
                route.continue_()
            else:  # air-gapped: nothing may be fetched from anywhere else
                session.foreign.append(route.request.url)
                route.abort()

        def console(message: ConsoleMessage) -> None:
            if message.type in ("error", "warning"):
                session.errors.append(f"{message.type}: {message.text}")

        context.route("**/*", route)
        page.on("console", console)
        page.on("pageerror", lambda error: session.errors.append(f"pageerror: {error}"))
        page.on("request", lambda request: session.requests.append(request))
        page.goto(url)
        return session

    yield open_
    for context in contexts:
        context.close()


@pytest.fixture(scope="module")
def token_server(
    browser: Browser, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[str, Fleet]]:
    """A server with the admin token and the known fleet (after the browser: no browser, no
    server to start)."""
    db = tmp_path_factory.mktemp("dashboard") / "fleet.db"
    fleet = seed_fleet(db)
    argv = serve_argv(db, "--admin-token", TOKEN, "--stats-interval", "0.1")
    with serving(argv) as (url, _process):
        post_today(url, fleet)
        wait_for_aggregates(url, fleet)
        yield url, fleet


def sign_in(session: Session, token: str) -> None:
    page = session.page
    page.wait_for_selector("#token-form", state="visible")
    page.fill("#token", token)
    page.click("#token-form button[type=submit]")


def wait_ready(page: Page) -> None:
    # Selectors, not wait_for_function: the page's CSP forbids evaluating strings.
    page.wait_for_selector("body[data-state='ready']", state="attached", timeout=15_000)


def table(page: Page, table_id: str) -> list[list[str]]:
    rows: list[list[str]] = page.eval_on_selector_all(
        f"#{table_id} tbody tr",
        "rows => rows.map(r => [...r.children].map(c => c.textContent.trim()))",
    )
    return rows


def header(page: Page, table_id: str) -> list[str]:
    cells: list[str] = page.eval_on_selector_all(
        f"#{table_id} thead th", "cells => cells.map(c => c.textContent.trim())"
    )
    return cells


def data_attribute(page: Page, selector: str, name: str) -> Any:
    return json.loads(page.get_attribute(selector, f"data-{name}") or "null")


def test_dashboard_asks_for_the_token_then_shows_the_fleet(
    token_server: tuple[str, Fleet], open_dashboard: Callable[[str], Session]
) -> None:
    url, fleet = token_server
    session = open_dashboard(f"{url}/dashboard")
    page = session.page
    sign_in(session, TOKEN)
    wait_ready(page)

    # The window selector: 7 days, remembered in the page's URL (never the token).
    page.select_option("#days", "7")
    page.wait_for_selector("body[data-days='7']", state="attached")
    wait_ready(page)
    assert page.url.endswith("/dashboard?product=opa&days=7")

    # Adoption: one series per version, stacked; the total is every day's instances.
    series = data_attribute(page, "#chart-adoption", "series")
    expected_versions = {fleet.latest, fleet.previous, fleet.old}
    assert set(series) == expected_versions
    assert series[0] == fleet.latest  # newest on top
    assert data_attribute(page, "#chart-adoption", "total") == sum(fleet.daily_instances.values())
    legend = page.eval_on_selector_all(
        "#chart-adoption .u-legend .u-series th", "ths => ths.map(t => t.textContent.trim())"
    )
    assert legend == ["Day"] + [f"v{v}" for v in series]
    assert data_attribute(page, "#chart-checks", "total") == sum(fleet.daily_checks.values())
    assert set(data_attribute(page, "#chart-platforms", "series")) == fleet.platforms
    assert set(data_attribute(page, "#chart-heap", "series")) == expected_versions
    tiles = dict(
        zip(
            page.eval_on_selector_all("#tiles .label", "e => e.map(x => x.textContent)"),
            page.eval_on_selector_all("#tiles .value", "e => e.map(x => x.textContent)"),
            strict=True,
        )
    )
    assert tiles["Latest release"] == f"v{fleet.latest}"
    assert tiles["Instances, latest day"] == str(fleet.daily_instances[fleet.today])
    assert tiles["Out of date"] == "20%"  # 1 of today's 5 instances

    # Numbers on hover: the legend reads out the day under the cursor.
    two_days_ago = sorted(fleet.daily_instances)[-3]  # the window's fifth of seven days
    over = page.locator("#chart-adoption .u-over")
    box = over.bounding_box()
    assert box is not None
    over.hover(position={"x": box["width"] * 4 / 6, "y": box["height"] / 2})
    values = page.eval_on_selector_all(
        "#chart-adoption .u-legend .u-series td", "tds => tds.map(t => t.textContent.trim())"
    )
    assert values[0] == two_days_ago
    for version in series:
        shown = values[1 + series.index(version)]
        assert shown == str(fleet.daily_versions[two_days_ago].get(version, 0)), version
    page.hover(f"#chart-heap .track[data-version='{fleet.latest}']")
    tooltip = page.text_content("#tooltip") or ""
    assert page.is_visible("#tooltip") and f"v{fleet.latest}" in tooltip and "p50" in tooltip

    SCREENSHOT_DIR.mkdir(exist_ok=True)
    over.hover(position={"x": box["width"] * 5 / 6, "y": box["height"] / 3})  # for the picture
    page.screenshot(path=str(SCREENSHOT_DIR / "dashboard.png"), full_page=True)

    # Known advisories of the reported versions, most instances first, as the API lists them.
    status, document = fetch(
        f"{url}/v1/stats?product=opa&days=7", headers={"Authorization": f"Bearer {TOKEN}"}
    )
    assert status == 200
    advisories = [advisory["id"] for advisory in document["advisories"]]
    assert advisories, f"v{fleet.old} has known advisories in the bundled catalog"
    assert page.is_visible("#chart-advisories")
    assert data_attribute(page, "#chart-advisories", "series") == advisories[:6]
    assert data_attribute(page, "#chart-advisories", "total") == len(advisories)

    # The table view holds the same numbers.
    page.click("#view-table")
    assert page.is_visible("#table-daily") and not page.is_visible("#chart-adoption")
    columns = header(page, "table-daily")
    rows = {row[0]: dict(zip(columns, row, strict=True)) for row in table(page, "table-daily")}
    assert len(rows) == 7
    for day, row in rows.items():
        assert int(row["Instances"]) == fleet.daily_instances.get(day, 0), day
        assert int(row["Release checks"]) == fleet.daily_checks.get(day, 0), day
        for version, count in fleet.daily_versions.get(day, {}).items():
            assert int(row[f"v{version}"]) == count, (day, version)
    platforms = {row[0] for row in table(page, "table-platforms")}
    assert platforms == fleet.platforms
    assert [row[0] for row in table(page, "table-advisories")] == advisories
    page.screenshot(path=str(SCREENSHOT_DIR / "dashboard-table.png"), full_page=True)

    # The token travelled only as the bearer header of the page's own API requests.
    api = [r for r in session.requests if "/v1/" in r.url]
    assert api and all(r.headers.get("authorization") == f"Bearer {TOKEN}" for r in api)
    assert all(TOKEN not in r.url for r in session.requests)
    assert session.errors == [] and session.foreign == []


def test_dashboard_keeps_the_token_for_the_browser_session_only(
    token_server: tuple[str, Fleet], open_dashboard: Callable[[str], Session]
) -> None:
    url, _fleet = token_server
    session = open_dashboard(f"{url}/dashboard")
    sign_in(session, TOKEN)
    wait_ready(session.page)
    session.page.reload()
    wait_ready(session.page)  # no second prompt in the same tab
    assert session.page.is_hidden("#auth")
    session.page.click("#forget-token")
    session.page.wait_for_selector("#token-form", state="visible")
    stored = session.page.evaluate("Object.keys(sessionStorage)")
    assert stored == []
    assert session.errors == []
    fresh = open_dashboard(f"{url}/dashboard")  # another browser session asks again
    fresh.page.wait_for_selector("#token-form", state="visible")


def api_refusal(url: str, token: str | None) -> tuple[int, dict[str, Any]]:
    """The status and JSON body with which the server refuses ``GET url``."""
    status, body = fetch(url, headers={"Authorization": f"Bearer {token}"} if token else {})
    assert status >= 400, f"{url} was not refused"
    return status, body


def test_dashboard_shows_the_servers_refusal_of_a_wrong_token(
    token_server: tuple[str, Fleet], open_dashboard: Callable[[str], Session]
) -> None:
    url, _fleet = token_server
    wrong = "not-the-admin-token-at-all"
    session = open_dashboard(f"{url}/dashboard")
    sign_in(session, wrong)
    page = session.page
    page.wait_for_selector("#auth-message:not(:empty)")
    status, body = api_refusal(f"{url}/v1/products", wrong)
    assert status == 403
    assert page.text_content("#auth-message") == body["error"]
    assert page.is_visible("#token-form")
    # The browser logs the refused request itself; nothing else may go wrong.
    assert session.errors and all("status of 403" in e for e in session.errors)
    sign_in(session, TOKEN)
    wait_ready(page)


@pytest.fixture(scope="module")
def empty_public_server(
    browser: Browser, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[str]:
    """A public server with no reports, mounted under a prefix (the page's URLs are relative)."""
    db = tmp_path_factory.mktemp("empty") / "empty.db"
    with serving(serve_argv(db, "--public-stats", "--prefix", "/custom")) as (url, _process):
        assert url.endswith("/custom")  # the ready line names the mounted base URL
        yield url


def test_dashboard_of_an_empty_public_fleet_is_a_friendly_empty_state(
    empty_public_server: str, open_dashboard: Callable[[str], Session]
) -> None:
    session = open_dashboard(f"{empty_public_server}/dashboard")
    page = session.page
    page.wait_for_selector("body[data-state='empty']", state="attached", timeout=15_000)
    assert page.is_visible("#empty") and page.is_hidden("#auth")
    assert "No reports yet" in (page.text_content("#empty") or "")
    assert f"OPA_TELEMETRY_SERVICE_URL={empty_public_server}" in (page.text_content("#empty") or "")
    assert all("authorization" not in r.headers for r in session.requests)
    SCREENSHOT_DIR.mkdir(exist_ok=True)
    page.screenshot(path=str(SCREENSHOT_DIR / "dashboard-empty.png"))
    assert session.errors == [] and session.foreign == []


def test_dashboard_of_a_closed_server_says_how_to_open_it(
    tmp_path: Path, open_dashboard: Callable[[str], Session]
) -> None:
    with serving(serve_argv(tmp_path / "closed.db")) as (url, _process):
        session = open_dashboard(f"{url}/dashboard")
        page = session.page
        page.wait_for_selector("#auth-message:not(:empty)")
        status, body = api_refusal(f"{url}/v1/products", None)
        assert status == 403
        assert page.text_content("#auth-message") == body["error"]
        details = page.eval_on_selector_all("#auth-details li", "e => e.map(x => x.textContent)")
        assert details == body["details"]
        assert page.is_hidden("#token-form")  # no token would be accepted
    assert session.errors and all("status of 403" in e for e in session.errors)
