"""The HTTP server over a real database: OPA's protocol, the GitHub shape, every bad input."""

from __future__ import annotations

import asyncio
import sqlite3
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient

from opa_telemetry_server.settings import Settings
from opa_telemetry_server.web.app import create_app
from opa_telemetry_server.web.appkeys import INTAKE

from .conftest import INSTANCE_ID, OPA_UA, AiohttpClient, make_settings, report_body

Client = TestClient[Any, Any]
JSON = {"Content-Type": "application/json"}


async def post(
    client: Client, body: Any, ua: str = OPA_UA, path: str = "/v1/version", **kwargs: Any
) -> Any:
    headers = {**JSON, "User-Agent": ua, **kwargs.pop("headers", {})}
    return await client.post(path, json=body, headers=headers, **kwargs)


def stored(
    settings: Settings,
    sql: str = "SELECT product, version, os, arch, report_count FROM reports ORDER BY product",
) -> list[tuple[Any, ...]]:
    with sqlite3.connect(settings.db) as conn:
        return conn.execute(sql).fetchall()


async def test_post_version_stores_report_and_answers_latest(
    client: Client, settings: Settings
) -> None:
    response = await post(client, report_body(version="1.5.1"))
    assert response.status == 200
    assert await response.json() == {
        "latest": {
            "download": "https://openpolicyagent.org/downloads/v1.20.2/opa_linux_amd64",
            "release_notes": "https://github.com/open-policy-agent/opa/releases/tag/v1.20.2",
            "latest_release": "v1.20.2",
            "opa_up_to_date": False,
        },
        "advisories": [],
        "support": {"status": "supported"},
    }
    assert stored(settings) == [("opa", "1.5.1", "linux", "amd64", 1)]


async def test_post_version_up_to_date_and_platform_specific_link(client: Client) -> None:
    response = await post(
        client, report_body(version="1.20.2"), ua="Open-Policy-Agent/1.20.2 (darwin, arm64)"
    )
    latest = (await response.json())["latest"]
    assert latest["opa_up_to_date"] is True
    assert latest["download"].endswith("/v1.20.2/opa_darwin_arm64")


@pytest.mark.parametrize(
    "ua",
    [
        "Open Policy Agent/1.5.1 (linux, amd64)",
        "Open-Policy-Agent/1.18.0 (linux, amd64)",
        "Enterprise OPA/1.2.0 Open Policy Agent/1.5.1 (linux, amd64)",
        '"Open Policy Agent/v0.12.3 (linux, amd64)"',
    ],
)
async def test_every_opa_user_agent_is_product_opa(
    client: Client, settings: Settings, ua: str
) -> None:
    assert (await post(client, report_body(), ua=ua)).status == 200
    assert stored(settings, "SELECT product, os, arch FROM reports") == [("opa", "linux", "amd64")]


async def test_unknown_product_is_stored_and_answered_with_no_release(
    client: Client, settings: Settings
) -> None:
    response = await post(client, report_body(version="1.2.3"), ua="MyApp/1.2.3 (linux, amd64)")
    assert await response.json() == {
        "latest": {"opa_up_to_date": True},
        "advisories": [],
        "support": {"status": "supported"},
    }
    assert stored(settings) == [("myapp", "1.2.3", "linux", "amd64", 1)]


async def test_unknown_user_agent_still_accepted_with_platform_unknown(
    client: Client, settings: Settings
) -> None:
    response = await post(client, report_body(), ua="")
    assert (await response.json())["latest"]["download"].endswith("/tag/v1.20.2")
    assert stored(settings) == [("opa", "1.5.1", None, None, 1)]


async def test_unknown_body_keys_are_accepted_but_not_stored(
    client: Client, settings: Settings
) -> None:
    body = report_body(
        min_compatible_version="0.60.0", bundles={"secret-bundle": {}}, license="key-123"
    )
    assert (await post(client, body)).status == 200
    with sqlite3.connect(settings.db) as conn:
        dump = "\n".join(conn.iterdump())
    assert "secret-bundle" not in dump and "key-123" not in dump
    assert stored(settings, "SELECT min_compatible_version FROM reports") == [("0.60.0",)]


async def test_hourly_reports_of_one_instance_are_one_row_with_a_count(
    client: Client, settings: Settings
) -> None:
    for version in ("1.5.0", "1.5.1", "1.5.1"):
        assert (await post(client, report_body(version=version))).status == 200
    assert stored(settings) == [("opa", "1.5.1", "linux", "amd64", 3)]


async def expect_error(response: Any, status: int, detail: str | None = None) -> None:
    assert response.status == status
    assert response.content_type == "application/json"
    body = await response.json()
    assert set(body) == {"error", "details"} and body["error"]
    if detail:
        assert any(detail in d for d in body["details"]), body


@pytest.mark.parametrize(
    ("raw", "status", "detail"),
    [
        (b"{not json", 400, None),
        (b"[1, 2]", 400, "list"),
        (b"", 400, None),
        (b'{"version": "1.5.1"}', 400, "id: required"),
        (b'{"id": "123", "version": "1.5.1"}', 400, "id: not a UUID"),
        (f'{{"id": "{INSTANCE_ID}"}}'.encode(), 400, "version: required"),
        (f'{{"id": "{INSTANCE_ID}", "version": "one"}}'.encode(), 400, "version: not a version"),
        (b"\xff\xfe\x00", 400, None),
    ],
)
async def test_bad_bodies_get_400_naming_the_problem(
    client: Client, settings: Settings, raw: bytes, status: int, detail: str | None
) -> None:
    response = await client.post("/v1/version", data=raw, headers={**JSON, "User-Agent": OPA_UA})
    await expect_error(response, status, detail)
    assert stored(settings) == []


@pytest.mark.parametrize("content_type", ["text/plain", "application/x-www-form-urlencoded", None])
async def test_wrong_content_type_gets_415(client: Client, content_type: str | None) -> None:
    headers = {"Content-Type": content_type} if content_type else {}
    response = await client.post("/v1/version", data=b'{"id": 1}', headers=headers)
    await expect_error(response, 415)


async def test_content_type_with_charset_is_accepted(client: Client) -> None:
    response = await post(
        client, report_body(), headers={"Content-Type": "application/json; charset=utf-8"}
    )
    assert response.status == 200


async def test_oversized_body_gets_413_and_is_not_stored(
    client: Client, settings: Settings
) -> None:
    big = report_body(padding="x" * (settings.max_body_bytes + 1))
    await expect_error(await post(client, big), 413)

    async def chunks() -> Any:  # no Content-Length: the cap is enforced while reading
        yield b'{"padding": "'
        for _ in range(settings.max_body_bytes // 1024 + 2):
            yield b"x" * 1024
        yield b'"}'

    await expect_error(await client.post("/v1/version", data=chunks(), headers=JSON), 413)
    assert stored(settings) == []


async def test_unknown_route_is_404_and_wrong_method_is_405(client: Client) -> None:
    await expect_error(await client.get("/v2/nothing"), 404)
    response = await client.get("/v1/version")
    await expect_error(response, 405)
    assert response.headers["Allow"] == "POST"
    await expect_error(await client.put("/healthz"), 405)


async def test_mount_prefix_serves_every_route_under_it(
    aiohttp_client: AiohttpClient, tmp_path: Path
) -> None:
    client = await aiohttp_client(create_app(make_settings(tmp_path, prefix="/custom")))
    assert (await post(client, report_body(), path="/custom/v1/version")).status == 200
    assert (await client.get("/custom/healthz")).status == 200
    latest = await client.get("/custom/repos/open-policy-agent/opa/releases/latest")
    assert (await latest.json())["assets_url"].split("/repos/")[0].endswith("/custom")
    await expect_error(await post(client, report_body()), 404)


async def test_health_and_readiness(client: Client) -> None:
    assert await (await client.get("/healthz")).json() == {"status": "ok"}
    ready = await client.get("/readyz")
    assert ready.status == 200 and (await ready.json())["status"] == "ready"


async def test_github_latest_release_shape_and_anonymous_count(
    client: Client, settings: Settings
) -> None:
    response = await client.get(
        "/repos/open-policy-agent/opa/releases/latest",
        headers={"User-Agent": "OPA-Version-Checker"},
    )
    assert response.status == 200
    body = await response.json()
    assert body["tag_name"] == "v1.20.2" and body["name"] == "v1.20.2"
    assert body["html_url"] == "https://github.com/open-policy-agent/opa/releases/tag/v1.20.2"
    assert body["published_at"] == "2026-09-03T00:00:00Z"
    assert body["prerelease"] is False and body["draft"] is False
    assert body["assets_url"] == str(
        client.make_url(f"/repos/open-policy-agent/opa/releases/{body['id']}/assets")
    )
    assets = await client.get(f"/repos/open-policy-agent/opa/releases/{body['id']}/assets")
    names = [a["name"] for a in await assets.json()]
    assert "opa_linux_amd64" in names and "opa_windows_amd64.exe" in names
    assert stored(settings, "SELECT product, check_count FROM version_checks") == [("opa", 1)]


async def test_github_route_for_a_repo_without_releases_is_404(
    client: Client, settings: Settings
) -> None:
    await expect_error(await client.get("/repos/acme/widget/releases/latest"), 404)
    await expect_error(await client.get("/repos/open-policy-agent/opa/releases/999999/assets"), 404)
    assert stored(settings, "SELECT * FROM version_checks") == []


async def test_catalog_changes_from_another_process_are_picked_up(
    client: Client, settings: Settings
) -> None:
    with sqlite3.connect(settings.db) as conn:
        conn.execute(
            "INSERT INTO releases (product, tag, release_notes, assets, added_at)"
            " VALUES ('opa', 'v1.21.0', 'https://notes', '[]', 0)"
        )
    async with asyncio.timeout(10):  # hang guard; the refresh interval is 50 ms here
        while True:
            latest = (await (await post(client, report_body())).json())["latest"]
            if latest["latest_release"] == "v1.21.0":
                break
            await asyncio.sleep(0.02)
    assert latest["download"] == "https://notes"


async def test_concurrent_reports_are_group_committed(
    client: Client,
    settings: Settings,
) -> None:
    ids = [f"00000000-0000-4000-8000-{i:012d}" for i in range(200)]
    responses = await asyncio.gather(*(post(client, report_body(id=i)) for i in ids))
    assert {r.status for r in responses} == {200}
    assert stored(settings, "SELECT count(*), sum(report_count) FROM reports") == [(200, 200)]
    ingest = client.app[INTAKE].ingest
    assert ingest.committed == 200 and ingest.batches < 200


async def test_full_queue_answers_503_at_once_and_recovers(
    aiohttp_client: AiohttpClient, tmp_path: Path
) -> None:
    settings = make_settings(tmp_path, queue_size=2, busy_timeout=30.0)
    client = await aiohttp_client(create_app(settings))
    ids = [f"00000000-0000-4000-8000-{i:012d}" for i in range(4)]
    blocker = sqlite3.connect(settings.db, isolation_level=None)
    blocker.execute("BEGIN IMMEDIATE")  # another process holds the write lock
    try:
        # The writer takes the first report and waits for the lock; two more fill the queue.
        ingest = client.app[INTAKE].ingest
        waiting = [asyncio.ensure_future(post(client, report_body(id=ids[0])))]
        async with asyncio.timeout(10):  # hang guard
            while ingest.writing < 1:
                await asyncio.sleep(0.01)
            waiting += [asyncio.ensure_future(post(client, report_body(id=i))) for i in ids[1:3]]
            while ingest.pending < 2:
                await asyncio.sleep(0.01)
        overflow = await post(client, report_body(id=ids[3]))
        await expect_error(overflow, 503)
        assert overflow.headers["Retry-After"] == "1"
        assert (await client.get("/healthz")).status == 200
    finally:
        blocker.execute("COMMIT")
        blocker.close()
    assert [r.status for r in await asyncio.gather(*waiting)] == [200, 200, 200]
    assert (await post(client, report_body(id=ids[3]))).status == 200


async def test_locked_database_answers_503_then_recovers(
    aiohttp_client: AiohttpClient, tmp_path: Path
) -> None:
    settings = make_settings(tmp_path, busy_timeout=0.1)
    client = await aiohttp_client(create_app(settings))
    blocker = sqlite3.connect(settings.db, isolation_level=None)
    blocker.execute("BEGIN IMMEDIATE")
    try:
        response = await post(client, report_body())
        await expect_error(response, 503)
        assert "Retry-After" in response.headers
    finally:
        blocker.execute("ROLLBACK")
        blocker.close()
    assert (await post(client, report_body())).status == 200
    assert stored(settings) == [("opa", "1.5.1", "linux", "amd64", 1)]


async def test_nothing_a_client_sends_produces_a_500(client: Client) -> None:
    odd = [
        b"{}",
        b'{"id": null, "version": null}',
        b'{"id": {"a": 1}, "version": [1]}',
        b'{"version": "1.0.0", "id": "' + INSTANCE_ID.encode() + b'", "heap_usage_bytes": 1e999}',
        b'{"' + b"k" * 4000 + b'": 1}',
        b"\x00" * 100,
    ]
    for raw in odd:
        response = await client.post("/v1/version", data=raw, headers=JSON)
        assert 400 <= response.status < 500, raw


def test_app_factory_does_no_io(tmp_path: Path) -> None:
    app: web.Application = create_app(make_settings(tmp_path))
    assert not (tmp_path / "telemetry.db").exists()
    assert app is not None
