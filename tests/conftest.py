"""Shared fixtures: real servers on 127.0.0.1, real SQLite files in tmp_path."""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from opa_telemetry_server.settings import Settings
from opa_telemetry_server.web.app import create_app

REPO = Path(__file__).resolve().parent.parent
SHARED_DATA = REPO.parent / "shared" / "data"
RECORDED_REQUEST = Path(__file__).parent / "data" / "opa-1.6.0-version-check.http"

OPA_UA = "Open Policy Agent/1.5.1 (linux, amd64)"
INSTANCE_ID = "a72dc36a-72db-458d-9208-9be4189e4ab7"

AiohttpClient = Callable[..., Awaitable[TestClient[Any, Any]]]
AiohttpServer = Callable[..., Awaitable[TestServer]]


LISTENING = re.compile(r"listening on (https?://\S+)")


def serve_argv(db: Path, *extra: str) -> list[str]:
    """``python -m opa_telemetry_server serve`` on a free port, quiet, without a rate limit
    (the tests that use it send load from one address)."""
    return [
        sys.executable,
        "-m",
        "opa_telemetry_server",
        "serve",
        "--port",
        "0",
        "--db",
        str(db),
        "--log-level",
        "warning",
        "--no-access-log",
        "--rate-limit",
        "0",
        *extra,
    ]


def ready_url(line: str | bytes) -> str:
    """The base URL from the ready line ``serve`` prints once it listens."""
    text = line.decode() if isinstance(line, bytes) else line
    match = LISTENING.search(text)
    assert match, f"the server did not report ready: {text!r}"
    return match.group(1)


@contextlib.contextmanager
def serving(argv: list[str]) -> Iterator[tuple[str, subprocess.Popen[str]]]:
    """Run a ``serve`` command until it prints its ready line; the base URL and the process.
    On exit the process is killed if still running, and always reaped."""
    process = subprocess.Popen(argv, stdout=subprocess.PIPE, text=True)
    try:
        assert process.stdout is not None
        yield ready_url(process.stdout.readline()), process
    finally:
        if process.poll() is None:
            process.kill()
        process.wait(30)
        if process.stdout:
            process.stdout.close()


def make_settings(tmp_path: Path, **overrides: Any) -> Settings:
    values: dict[str, Any] = {
        "db": str(tmp_path / "telemetry.db"),
        "port": 0,
        "access_log": False,
        "catalog_refresh": 0.05,
        "rate_limit": 0.0,  # load from one address; the limiter has its own tests
    }
    values.update(overrides)
    return Settings(**values)


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    return make_settings(tmp_path)


@pytest.fixture
async def client(aiohttp_client: AiohttpClient, settings: Settings) -> TestClient[Any, Any]:
    """A test client for the real app over a real database file."""
    return await aiohttp_client(create_app(settings))


def report_body(**fields: Any) -> dict[str, Any]:
    body: dict[str, Any] = {"id": INSTANCE_ID, "version": "1.5.1", "heap_usage_bytes": "2106336"}
    body.update(fields)
    return {k: v for k, v in body.items() if v is not None}


@dataclass
class FakeService:
    """A local stand-in for a telemetry service: records requests, answers as told.

    ``mode``: ``ok`` (a valid answer), ``hang`` (accept, never answer), ``status`` (answer
    ``status`` with a JSON error), ``garbage`` (200 with a non-JSON body), ``huge`` (200 with a
    body far over the client's cap).
    """

    mode: str = "ok"
    status: int = 500
    answer: dict[str, Any] = field(
        default_factory=lambda: {
            "latest": {
                "download": "https://openpolicyagent.org/downloads/v1.20.2/opa_linux_amd64",
                "release_notes": "https://github.com/open-policy-agent/opa/releases/tag/v1.20.2",
                "latest_release": "v1.20.2",
                "opa_up_to_date": False,
            }
        }
    )
    requests: list[tuple[dict[str, str], bytes, str]] = field(default_factory=list)
    times: list[float] = field(default_factory=list)
    received: asyncio.Event = field(default_factory=asyncio.Event)
    url: str = ""

    async def handle(self, request: web.Request) -> web.StreamResponse:
        self.requests.append((dict(request.headers), await request.read(), request.path))
        self.times.append(time.monotonic())
        self.received.set()
        if self.mode == "hang":
            await asyncio.Event().wait()
        if self.mode == "status":
            return web.json_response(
                {"error": "nope"}, status=self.status, headers={"Retry-After": "7"}
            )
        if self.mode == "garbage":
            return web.Response(body=b"<html>not json", content_type="text/html")
        if self.mode == "huge":
            return web.Response(body=b"[" * (1024 * 1024), content_type="application/json")
        return web.json_response(self.answer)

    async def wait_for_requests(self, count: int, timeout: float = 10.0) -> None:
        async with asyncio.timeout(timeout):
            while len(self.requests) < count:
                self.received.clear()
                await self.received.wait()


@pytest.fixture
async def fake_service(aiohttp_server: AiohttpServer) -> FakeService:
    service = FakeService()
    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", service.handle)
    server = await aiohttp_server(app, host="127.0.0.1")
    service.url = str(server.make_url("")).rstrip("/")
    return service


def require_postgres() -> None:
    """Skip with the reason where PostgreSQL is missing; fail where CI requires it."""
    from . import pgcluster

    reason = pgcluster.unavailable_reason()
    if reason:
        if os.environ.get(pgcluster.REQUIRE_ENV) == "1":
            pytest.fail(f"{pgcluster.REQUIRE_ENV}=1 but {reason}")
        pytest.skip(reason)


@pytest.fixture(scope="session")
def postgres_cluster() -> Iterator[Any]:
    """A private PostgreSQL cluster for the whole test session (see ``tests/pgcluster.py``):
    skipped with the reason where PostgreSQL is missing, a failure where CI requires it."""
    from . import pgcluster

    require_postgres()
    with pgcluster.running_cluster() as cluster:
        yield cluster


@pytest.fixture
def postgres_pair(request: pytest.FixtureRequest) -> Iterator[Any]:
    """A primary and a streaming standby of their own, for one test that fails one over:
    ``(primary, standby, database name)``. Synchronous replication unless the test is
    parametrized with ``indirect=True`` and ``False``."""
    from . import pgcluster

    require_postgres()
    with pgcluster.running_pair(synchronous=getattr(request, "param", True)) as pair:
        yield pair


@pytest.fixture
def postgres_dsn(postgres_cluster: Any) -> str:
    """A fresh, empty database on the session's cluster (with its password in the DSN)."""
    dsn: str = postgres_cluster.create_database()
    return dsn
