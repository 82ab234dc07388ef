"""Hostile and broken input, and database faults: clear 4xx/503 answers, never a 500."""

from __future__ import annotations

import asyncio
import gzip
import json
import re
import sqlite3
from pathlib import Path
from typing import Any

import pytest
from aiohttp.test_utils import TestClient, TestServer
from hypothesis import HealthCheck, given
from hypothesis import settings as hypothesis_settings
from hypothesis import strategies as st

from opa_telemetry_server.cli import main
from opa_telemetry_server.web.app import create_app, runner_options
from opa_telemetry_server.web.appkeys import STORAGE

from .conftest import INSTANCE_ID, OPA_UA, AiohttpServer, make_settings, report_body

JSON = {"Content-Type": "application/json", "User-Agent": OPA_UA}


async def start(aiohttp_server: AiohttpServer, tmp_path: Path, **overrides: Any) -> Any:
    settings = make_settings(tmp_path, **overrides)
    return await aiohttp_server(create_app(settings), host="127.0.0.1", **runner_options(settings))


async def test_client_trickling_headers_is_disconnected(
    aiohttp_server: AiohttpServer, tmp_path: Path
) -> None:
    server = await start(aiohttp_server, tmp_path, read_timeout=0.5)
    reader, writer = await asyncio.open_connection(server.host, server.port)
    writer.write(b"POST /v1/version HTTP/1.1\r\nHost: x\r\n")  # and never the rest
    await writer.drain()
    async with asyncio.timeout(5):  # hang guard: the server must cut us off after ~0.5 s
        assert await reader.read() == b""
    writer.close()
    await writer.wait_closed()


async def test_client_trickling_its_body_gets_408(
    aiohttp_server: AiohttpServer, tmp_path: Path
) -> None:
    server = await start(aiohttp_server, tmp_path, read_timeout=0.5)
    reader, writer = await asyncio.open_connection(server.host, server.port)
    writer.write(
        b"POST /v1/version HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        b"Content-Length: 100\r\n\r\n{"
    )  # 99 bytes still owed
    await writer.drain()
    async with asyncio.timeout(5):  # hang guard: the answer is due after ~0.5 s
        head = await reader.readuntil(b"\r\n\r\n")
    writer.close()
    await writer.wait_closed()
    assert head.startswith(b"HTTP/1.1 408")


async def raw_exchange(server: Any, *parts: bytes, pause: float = 0.0) -> bytes:
    """Send ``parts`` over one raw connection (``pause`` seconds apart); the answer's bytes."""
    reader, writer = await asyncio.open_connection(server.host, server.port)
    for index, part in enumerate(parts):
        if index and pause:
            await asyncio.sleep(pause)
        writer.write(part)
        await writer.drain()
    async with asyncio.timeout(5):  # hang guard
        head = await reader.readuntil(b"\r\n\r\n")
        length = int(re.search(rb"Content-Length: (\d+)", head, re.I).group(1))  # type: ignore[union-attr]
        body = await reader.readexactly(length)
    writer.close()
    await writer.wait_closed()
    return head + body


def chunked(payload: bytes) -> bytes:
    return f"{len(payload):x}\r\n".encode() + payload + b"\r\n0\r\n\r\n"


POST_HEAD = (
    b"POST /v1/version HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
    b"User-Agent: " + OPA_UA.encode() + b"\r\n"
)


async def test_bodies_are_read_whether_they_come_with_the_headers_or_later(
    aiohttp_server: AiohttpServer, tmp_path: Path
) -> None:
    server = await start(aiohttp_server, tmp_path, read_timeout=5)
    body = json.dumps(report_body()).encode()
    sized = POST_HEAD + b"Content-Length: %d\r\n\r\n" % len(body)
    chunk_head = POST_HEAD + b"Transfer-Encoding: chunked\r\n\r\n"
    # In one write (the buffered path), and the body 0.2 s after its headers (the waiting path).
    for parts in ([sized + body], [sized, body], [chunk_head + chunked(body)],
                  [chunk_head, chunked(body)]):  # fmt: skip
        answer = await raw_exchange(server, *parts, pause=0.2)
        assert answer.startswith(b"HTTP/1.1 200"), answer
    with sqlite3.connect(tmp_path / "telemetry.db") as conn:
        assert conn.execute("SELECT report_count FROM reports").fetchall() == [(4,)]


async def test_a_chunked_body_over_the_limit_gets_413_even_when_complete(
    aiohttp_server: AiohttpServer, tmp_path: Path
) -> None:
    server = await start(aiohttp_server, tmp_path, max_body_bytes=1024)
    body = json.dumps(report_body(padding="x" * 2000)).encode()
    for parts in ([POST_HEAD + b"Transfer-Encoding: chunked\r\n\r\n" + chunked(body)],
                  [POST_HEAD + b"Transfer-Encoding: chunked\r\n\r\n", chunked(body)]):  # fmt: skip
        answer = await raw_exchange(server, *parts, pause=0.2)
        assert answer.startswith(b"HTTP/1.1 413"), answer
        assert json.loads(answer.split(b"\r\n\r\n", 1)[1])["error"]
    with sqlite3.connect(tmp_path / "telemetry.db") as conn:
        assert conn.execute("SELECT count(*) FROM reports").fetchone() == (0,)


async def test_oversized_headers_are_refused(aiohttp_server: AiohttpServer, tmp_path: Path) -> None:
    server = await start(aiohttp_server, tmp_path)
    async with TestClient(server) as client:
        response = await client.post(
            "/v1/version", json=report_body(), headers={**JSON, "User-Agent": "x" * 5000}
        )
        assert 400 <= response.status < 500
        many = {f"X-Header-{i}": "1" for i in range(40)}
        response = await client.post("/v1/version", json=report_body(), headers={**JSON, **many})
        assert 400 <= response.status < 500


async def test_too_many_keys_and_compressed_bodies_are_400(
    aiohttp_server: AiohttpServer, tmp_path: Path
) -> None:
    server = await start(aiohttp_server, tmp_path)
    async with TestClient(server) as client:
        body = report_body(**{f"k{i}": i for i in range(70)})
        response = await client.post("/v1/version", json=body, headers=JSON)
        assert response.status == 400
        assert "64" in (await response.json())["details"][0]
        packed = gzip.compress(json.dumps(report_body()).encode())
        response = await client.post(
            "/v1/version", data=packed, headers={**JSON, "Content-Encoding": "gzip"}
        )
        assert response.status == 400


async def test_full_disk_answers_503_and_recovers(
    aiohttp_server: AiohttpServer, tmp_path: Path
) -> None:
    server = await start(aiohttp_server, tmp_path)
    storage = server.app[STORAGE]
    async with TestClient(server) as client:
        # SQLite's own "database or disk is full" path: cap the file at its current size.
        # (White-box: the connection is the writer's; nothing else can inject SQLITE_FULL.)
        await storage._conn.execute("PRAGMA max_page_count = 1")
        ids = [f"00000000-0000-4000-8000-{i:012d}" for i in range(300)]
        answers = [
            await client.post("/v1/version", json=report_body(id=i), headers=JSON) for i in ids
        ]
        statuses = {r.status for r in answers}
        assert 503 in statuses and statuses <= {200, 503}
        failed = next(r for r in answers if r.status == 503)
        assert failed.headers["Retry-After"] == "1"
        assert (await client.get("/healthz")).status == 200
        await storage._conn.execute("PRAGMA max_page_count = 1073741823")
        assert (await client.post("/v1/version", json=report_body(), headers=JSON)).status == 200
    with sqlite3.connect(tmp_path / "telemetry.db") as conn:
        stored = conn.execute("SELECT sum(report_count) FROM reports").fetchone()[0]
    assert stored == sum(r.status == 200 for r in answers) + 1


def test_serve_refuses_a_corrupt_database_with_a_clear_message(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    junk = tmp_path / "junk.db"
    junk.write_bytes(b"definitely not sqlite\n" * 200)
    assert main(["serve", "--db", str(junk), "--port", "0"]) == 1
    assert "cannot use this database" in capsys.readouterr().err


# -- anything a client can send ---------------------------------------------------------------

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=10), children, max_size=4)
    ),
    max_leaves=12,
)
report_like = st.fixed_dictionaries(
    {},
    optional={
        "id": st.sampled_from([INSTANCE_ID, INSTANCE_ID.upper(), "x", ""]) | st.text(max_size=40),
        "version": st.sampled_from(["1.5.1", "v0.12.3", "0.26.0-dev", "1", ""]) | json_values,
        "heap_usage_bytes": st.sampled_from(["2106336", "-1", "9" * 25]) | json_values,
        "min_compatible_version": st.sampled_from(["", "0.60.0", "soon"]) | json_values,
        "bundles": json_values,
    },
)
bodies = (
    report_like.map(lambda d: json.dumps(d).encode())
    | json_values.map(lambda v: json.dumps(v).encode())
    | st.binary(max_size=300)
    | st.integers(1, 3000).map(lambda n: b"[" * n + b"]" * n)
)
user_agents = st.sampled_from(
    [OPA_UA, "", "MyApp/1.0.0 (linux, amd64)", '"Open Policy Agent/v0.12.3 (darwin, arm64)"']
) | st.text(max_size=60).filter(lambda s: all(32 <= ord(c) < 127 for c in s))
content_types = st.sampled_from(
    [
        "application/json",
        "application/json; charset=utf-8",
        "text/plain",
        "application/x-www-form-urlencoded",
        "",
    ]
)
methods = st.sampled_from(["POST", "POST", "POST", "GET", "PUT", "DELETE", "PATCH"])
paths = st.sampled_from(
    [
        "/v1/version",
        "/v1/version",
        "/repos/open-policy-agent/opa/releases/latest",
        "/healthz",
        "/nope",
        "/v1/version/x",
        "/repos/a/b/releases/1/assets",
    ]
)


def stored_rows(db: Path) -> int:
    with sqlite3.connect(db) as conn:
        return int(conn.execute("SELECT coalesce(sum(report_count), 0) FROM reports").fetchone()[0])


def test_nothing_any_client_sends_gets_a_5xx_or_stores_a_rejected_report(tmp_path: Path) -> None:
    settings = make_settings(tmp_path)

    async def started() -> TestClient[Any, Any]:
        client: TestClient[Any, Any] = TestClient(TestServer(create_app(settings)))
        await client.start_server()
        return client

    with asyncio.Runner() as runner:
        client = runner.run(started())
        try:

            @hypothesis_settings(
                max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow]
            )
            @given(
                method=methods,
                path=paths,
                body=bodies,
                user_agent=user_agents,
                content_type=content_types,
            )
            def check(
                method: str, path: str, body: bytes, user_agent: str, content_type: str
            ) -> None:
                headers = {"User-Agent": user_agent}
                if content_type:
                    headers["Content-Type"] = content_type
                before = stored_rows(Path(settings.db))

                async def send() -> tuple[int, bytes]:
                    response = await client.request(method, path, data=body, headers=headers)
                    return response.status, await response.read()

                status, answer = runner.run(send())
                assert status < 500, (status, answer)
                stored = stored_rows(Path(settings.db)) - before
                if status >= 400:
                    error = json.loads(answer)
                    assert set(error) == {"error", "details"}
                    assert stored == 0, "a rejected request stored a report"
                else:
                    is_report = method == "POST" and path == "/v1/version"
                    assert stored == (1 if is_report else 0)

            check()
        finally:
            runner.run(client.close())


async def test_free_text_from_http_never_reaches_the_database_raw(
    aiohttp_server: AiohttpServer, tmp_path: Path
) -> None:
    # The product becomes a slug of safe characters, os/arch must be Go names, versions must
    # parse. (Storage-level hostile strings are covered in test_storage.)
    server = await start(aiohttp_server, tmp_path)
    async with TestClient(server) as client:
        for agent in (
            "Robert'); DROP TABLE reports;--/1.0.0 (linux, amd64)",
            "My App 'quoted'/1.0.0 (linux'; --, amd64)",
        ):
            response = await client.post(
                "/v1/version", json=report_body(), headers={**JSON, "User-Agent": agent}
            )
            assert response.status == 200
    with sqlite3.connect(tmp_path / "telemetry.db") as conn:
        rows = conn.execute("SELECT product, os, arch FROM reports").fetchall()
    assert rows
    for product, os_name, arch in rows:
        assert re.fullmatch(r"[a-z0-9._-]+", product), product
        assert os_name in (None, "linux") and arch in (None, "amd64")


async def test_overload_answers_503_at_once_keeps_health_and_recovers(
    aiohttp_server: AiohttpServer, tmp_path: Path
) -> None:
    import aiohttp

    from opa_telemetry.loadtest import LoadConfig, parse_target, run_load
    from opa_telemetry_server.web.appkeys import INTAKE

    server = await start(aiohttp_server, tmp_path, queue_size=50, busy_timeout=30.0)
    ingest = server.app[INTAKE].ingest
    url = str(server.make_url("")).rstrip("/")
    blocker = sqlite3.connect(tmp_path / "telemetry.db", isolation_level=None)
    blocker.execute("BEGIN IMMEDIATE")  # capacity drops to zero: nothing can commit
    health_latencies: list[float] = []
    deepest = largest_batch = 0

    async def probe_health(session: aiohttp.ClientSession) -> None:
        nonlocal deepest, largest_batch
        loop = asyncio.get_running_loop()
        for _ in range(20):
            began = loop.time()
            async with session.get(f"{url}/healthz") as response:
                assert response.status == 200
            health_latencies.append(loop.time() - began)
            deepest = max(deepest, ingest.pending)
            largest_batch = max(largest_batch, ingest.writing)
            await asyncio.sleep(0.05)

    async with aiohttp.ClientSession() as session:
        try:
            flood = LoadConfig(
                parse_target(url),
                concurrency=64,
                rate=2000,
                requests=3000,
                duration=None,
                timeout=2.0,
            )
            result, _ = await asyncio.gather(run_load(flood), probe_health(session))
        finally:
            blocker.execute("ROLLBACK")
            blocker.close()
        # 3000 requests against at most 100 places (a batch of up to 50 taken by the writer,
        # blocked on the lock, and 50 queued behind it): the rest were refused at once with
        # 503, and the queue never grew past its bound.
        assert result.statuses[503] >= 3000 - 100 - result.errors["timeout"]
        assert set(result.statuses) == {503} and set(result.errors) <= {"timeout"}
        assert deepest <= 50 and ingest.pending <= 50 and largest_batch <= 50
        assert max(health_latencies) < 1.0
        # The load is gone and the lock released: within SQLite's busy-retry interval the
        # queue drains and reports are answered 200 again.
        loop = asyncio.get_running_loop()
        released = loop.time()
        async with asyncio.timeout(5):  # hang guard
            while True:
                async with session.post(
                    f"{url}/v1/version", json=report_body(), headers=JSON
                ) as response:
                    if response.status == 200:
                        break
                    assert response.status == 503
                await asyncio.sleep(0.02)
        assert loop.time() - released < 1.0
    with sqlite3.connect(tmp_path / "telemetry.db") as conn:
        stored = conn.execute("SELECT coalesce(sum(report_count), 0) FROM reports").fetchone()[0]
    # Reports still queued (or in the blocked batch) when the load tester gave up on them may
    # commit afterwards; never more than the two bounded places held.
    assert 1 <= stored <= 1 + 100
