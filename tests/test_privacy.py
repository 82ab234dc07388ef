"""Privacy by construction: no client address in the database or in any log line."""

from __future__ import annotations

import asyncio
import json
import logging
from pathlib import Path

import pytest

from opa_telemetry_server.web.app import create_app, runner_options
from opa_telemetry_server.web.http_errors import ServerLog, bad_requests

from .conftest import AiohttpServer, make_settings, report_body

DISTINCT = "127.0.0.77"  # a loopback address no other part of the suite uses


async def send_from(host: str, port: int, raw: bytes) -> bytes:
    reader, writer = await asyncio.open_connection(host, port, local_addr=(DISTINCT, 0))
    try:
        writer.write(raw)
        await writer.drain()
        return await asyncio.wait_for(reader.read(65536), 10)
    finally:
        writer.close()
        await writer.wait_closed()


async def test_no_address_in_database_or_logs(
    aiohttp_server: AiohttpServer, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    settings = make_settings(tmp_path, access_log=True, rate_limit=1.0, rate_burst=1)
    server = await aiohttp_server(
        create_app(settings), host="127.0.0.1", **runner_options(settings)
    )
    assert server.port is not None
    body = json.dumps(report_body()).encode()
    good = (
        b"POST /v1/version HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        b"User-Agent: Open Policy Agent/1.5.1 (linux, amd64)\r\n"
        b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body
    )
    assert (await send_from(server.host, server.port, good)).startswith(b"HTTP/1.1 200")
    # Over the rate limit: the per-address bucket exists only in memory.
    assert (await send_from(server.host, server.port, good)).startswith(b"HTTP/1.1 429")
    refused = bad_requests.total
    for bad in (
        b"GARBAGE\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: x\r\nBad Header\r\n\r\n",
        b"POST /v1/version HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n\r\n{]",
    ):
        await send_from(server.host, server.port, bad)
    await server.close()  # flush and close the database

    assert bad_requests.total == refused + 2  # the garbage and the bad header: counted
    assert any('"POST /v1/version HTTP/1.1" 200' in r.getMessage() for r in caplog.records)
    for record in caplog.records:
        assert DISTINCT not in record.getMessage(), record.getMessage()
        assert DISTINCT not in (caplog.text or "")
    for path in tmp_path.iterdir():
        assert DISTINCT.encode() not in path.read_bytes(), path


def test_what_aiohttp_logs_besides_bad_requests_loses_the_address(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)
    try:
        raise RuntimeError("a bug")
    except RuntimeError as exc:
        ServerLog().exception("Error handling request from %s", DISTINCT, exc_info=exc)
    (record,) = caplog.records
    assert record.levelno == logging.ERROR and record.exc_info  # a bug keeps its traceback
    assert record.getMessage() == "Error handling request"
