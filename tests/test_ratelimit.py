"""Per-address rate limiting: token buckets in memory, 429 with Retry-After, bounded memory."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from aiohttp.test_utils import TestClient

from opa_telemetry_server.web.app import create_app
from opa_telemetry_server.web.ratelimit import RateLimiter

from .conftest import OPA_UA, AiohttpClient, make_settings, report_body


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_bucket_allows_a_burst_then_the_rate() -> None:
    clock = Clock()
    limiter = RateLimiter(rate=2.0, burst=3, clock=clock)
    assert [limiter.acquire("a") for _ in range(3)] == [0.0, 0.0, 0.0]
    assert limiter.acquire("a") == pytest.approx(0.5)  # one token every 0.5 s
    assert limiter.acquire("b") == 0.0  # other clients have their own bucket
    clock.now += 0.5
    assert limiter.acquire("a") == 0.0
    clock.now += 100
    assert [limiter.acquire("a") for _ in range(4)][-1] > 0  # refills only up to the burst


def test_memory_is_bounded_and_idle_clients_go_first() -> None:
    clock = Clock()
    limiter = RateLimiter(rate=1.0, burst=2, max_clients=100, clock=clock)
    for i in range(100):
        limiter.acquire(f"old-{i}")
    clock.now += 10  # every old bucket is full again: idle
    limiter.acquire("busy")
    limiter.acquire("busy")
    for i in range(60):
        limiter.acquire(f"new-{i}")
    assert len(limiter) <= 100
    assert limiter.acquire("busy") > 0  # the busy client kept its (empty) bucket
    for i in range(10_000):
        limiter.acquire(f"flood-{i}")  # all busy: the oldest are dropped, never unbounded
    assert len(limiter) <= 100


async def rate_limited_client(
    aiohttp_client: AiohttpClient, tmp_path: Path, **overrides: Any
) -> TestClient[Any, Any]:
    settings = make_settings(tmp_path, rate_limit=1.0, rate_burst=2, **overrides)
    return await aiohttp_client(create_app(settings))


async def test_over_the_limit_gets_429_with_retry_after(
    aiohttp_client: AiohttpClient, tmp_path: Path
) -> None:
    client = await rate_limited_client(aiohttp_client, tmp_path)
    headers = {"User-Agent": OPA_UA}
    statuses = [
        (await client.post("/v1/version", json=report_body(), headers=headers)).status
        for _ in range(3)
    ]
    assert statuses == [200, 200, 429]
    limited = await client.get("/repos/open-policy-agent/opa/releases/latest")
    assert limited.status == 429 and int(limited.headers["Retry-After"]) >= 1
    body = await limited.json()
    assert set(body) == {"error", "details"} and "127.0.0.1" not in str(body)
    assert (await client.get("/healthz")).status == 200  # health checks are never limited


async def test_forwarded_header_is_ignored_unless_trusted(
    aiohttp_client: AiohttpClient, tmp_path: Path
) -> None:
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    untrusted = await rate_limited_client(aiohttp_client, tmp_path / "a")
    statuses = []
    for i in range(3):  # a client cannot escape its bucket by inventing addresses
        headers = {"User-Agent": OPA_UA, "X-Forwarded-For": f"10.0.0.{i}"}
        response = await untrusted.post("/v1/version", json=report_body(), headers=headers)
        statuses.append(response.status)
    assert statuses == [200, 200, 429]

    trusted = await rate_limited_client(
        aiohttp_client, tmp_path / "b", trusted_proxy_header="X-Forwarded-For"
    )
    statuses = []
    for i in range(3):  # behind the named proxy, each real client has its own bucket
        headers = {"User-Agent": OPA_UA, "X-Forwarded-For": f"203.0.113.9, 10.0.0.{i}"}
        response = await trusted.post("/v1/version", json=report_body(), headers=headers)
        statuses.append(response.status)
    assert statuses == [200, 200, 200]
