"""Contract: what real OPA sends and what our client sends both pass through the real server."""

from __future__ import annotations

import asyncio
import json
import sqlite3
from pathlib import Path
from typing import Any

from opa_telemetry import Reporter, check_latest
from opa_telemetry.payload import build_payload
from opa_telemetry_server.domain.protocol import parse_report, parse_user_agent
from opa_telemetry_server.settings import Settings
from opa_telemetry_server.web.app import create_app

from .conftest import RECORDED_REQUEST, AiohttpServer, make_settings


async def raw_exchange(host: str, port: int, request: bytes) -> tuple[int, dict[str, Any]]:
    """Send ``request`` byte for byte and read one HTTP/1.1 response."""
    reader, writer = await asyncio.open_connection(host, port)
    try:
        writer.write(request)
        await writer.drain()
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
        status_line, *header_lines = head.decode("latin-1").split("\r\n")
        headers = dict(line.split(": ", 1) for line in header_lines if line)
        body = await asyncio.wait_for(reader.readexactly(int(headers["Content-Length"])), 10)
    finally:
        writer.close()
        await writer.wait_closed()
    return int(status_line.split()[1]), json.loads(body)


async def test_recorded_opa_request_is_stored_and_answered(
    aiohttp_server: AiohttpServer, tmp_path: Path
) -> None:
    settings = make_settings(tmp_path)
    server = await aiohttp_server(create_app(settings), host="127.0.0.1")
    recorded = RECORDED_REQUEST.read_bytes()
    assert recorded.startswith(b"POST /v1/version HTTP/1.1\r\n") and recorded.endswith(b"}\n")
    assert server.port is not None
    status, body = await raw_exchange(server.host, server.port, recorded)
    assert status == 200
    assert body == {
        "latest": {
            "download": "https://openpolicyagent.org/downloads/v1.20.2/opa_linux_amd64",
            "release_notes": "https://github.com/open-policy-agent/opa/releases/tag/v1.20.2",
            "latest_release": "v1.20.2",
            "opa_up_to_date": False,
        },
        "advisories": [],  # 1.6.0 is past every bundled advisory's fix
        "support": {"status": "supported"},
    }
    with sqlite3.connect(settings.db) as conn:
        rows = conn.execute(
            "SELECT product, instance_id, version, os, arch, heap_usage_bytes,"
            " report_count FROM reports"
        ).fetchall()
    assert rows == [
        ("opa", "a72dc36a-72db-458d-9208-9be4189e4ab7", "1.6.0", "linux", "amd64", 2106336, 1)
    ]


def test_client_payload_passes_the_server_parser() -> None:
    for product, expected in (("Open Policy Agent", "opa"), ("MyApp", "myapp")):
        payload = build_payload(
            product,
            "1.6.0",
            "a72dc36a-72db-458d-9208-9be4189e4ab7",
            gatherers={"plugins": lambda: ["bundle"]},
        )
        client = parse_user_agent(payload.user_agent)
        report = parse_report(payload.body, client, json.loads)
        assert client.product == expected and client.os and client.arch
        assert str(report.version) == "1.6.0"
        assert report.heap_usage_bytes is not None and report.heap_usage_bytes > 0


def stored_rows(settings: Settings) -> list[tuple[Any, ...]]:
    with sqlite3.connect(settings.db) as conn:
        return conn.execute("SELECT product, version FROM reports").fetchall()


async def test_reporter_reports_to_the_real_server_under_a_prefix(
    aiohttp_server: AiohttpServer, tmp_path: Path
) -> None:
    settings = make_settings(tmp_path, prefix="/custom")
    server = await aiohttp_server(create_app(settings), host="127.0.0.1")
    answered = asyncio.Event()
    base = str(server.make_url("/custom/"))
    async with Reporter(
        "Open Policy Agent", "1.20.2", url=base, on_latest=lambda latest: answered.set()
    ):
        await asyncio.wait_for(answered.wait(), 10)
    assert stored_rows(settings) == [("opa", "1.20.2")]
    latest = await check_latest("Open Policy Agent", "1.19.0", url=base)
    assert (latest.version, latest.up_to_date) == ("1.20.2", False)


async def test_recorded_opa_0_70_request_gets_latest_unchanged_and_its_advisories(
    aiohttp_server: AiohttpServer, tmp_path: Path
) -> None:
    """OPA 0.70.0's own bytes: ``latest`` is exactly OPA's object (Go ignores the extra
    top-level keys), and the advisories fixed after 0.70.0 come with it."""
    settings = make_settings(tmp_path)
    server = await aiohttp_server(create_app(settings), host="127.0.0.1")
    recorded = (Path(__file__).parent / "data" / "opa-0.70.0-version-check.http").read_bytes()
    assert server.port is not None
    status, body = await raw_exchange(server.host, server.port, recorded)
    assert status == 200
    assert list(body) == ["latest", "advisories", "support"]
    assert body["latest"] == {
        "download": "https://openpolicyagent.org/downloads/v1.20.2/opa_linux_amd64",
        "release_notes": "https://github.com/open-policy-agent/opa/releases/tag/v1.20.2",
        "latest_release": "v1.20.2",
        "opa_up_to_date": False,
    }
    ids = {advisory["id"]: advisory for advisory in body["advisories"]}
    # Fixed in 1.0.1 and 1.4.0/1.4.1: 0.70.0 is affected. Windows-only ones are left out for
    # this linux caller; everything fixed before 0.70.0 is left out.
    assert set(ids) == {
        "GHSA-6m8w-jc87-6cr7",
        "CVE-2024-45341",
        "CVE-2024-45336",
        "CVE-2025-22870",
        "CVE-2025-22871",
    }
    assert ids["GHSA-6m8w-jc87-6cr7"] == {
        "id": "GHSA-6m8w-jc87-6cr7",
        "aliases": ["CVE-2025-46569"],
        "severity": "HIGH",
        "summary": ids["GHSA-6m8w-jc87-6cr7"]["summary"],
        "url": "https://github.com/open-policy-agent/opa/security/advisories/GHSA-6m8w-jc87-6cr7",
        "fixed": "1.4.0",
    }
    assert ids["CVE-2024-45341"]["fixed"] == "1.0.1" and ids["CVE-2024-45341"]["severity"] is None
    assert body["support"] == {"status": "supported"}
