"""Schema step 2: allow-listed extra keys, and retention that keeps daily rollups."""

from __future__ import annotations

import asyncio
import json
import sqlite3
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from opa_telemetry_server.cli import main
from opa_telemetry_server.domain.protocol import ClientInfo, parse_report
from opa_telemetry_server.services.retention import purge_expired
from opa_telemetry_server.storage.sqlite import SqliteStorage, shard_path
from opa_telemetry_server.storage.sqlite.migrations import MIGRATIONS, SCHEMA_V1
from opa_telemetry_server.web.app import create_app

from .conftest import INSTANCE_ID, OPA_UA, AiohttpClient, make_settings, report_body

OPA = ClientInfo("opa", "linux", "amd64")


def parse(body: dict[str, Any], keys: set[str], limit: int = 1024) -> Any:
    return parse_report(json.dumps(body).encode(), OPA, json.loads, frozenset(keys), limit)


def test_extra_keys_are_dropped_unless_allow_listed_and_then_capped() -> None:
    body = report_body(bundles={"authz": {"rev": "7"}}, license="key-123", big="x" * 2000)
    assert parse(body, set()).extra is None
    assert json.loads(parse(body, {"bundles"}).extra) == {"bundles": {"authz": {"rev": "7"}}}
    kept = json.loads(parse(body, {"bundles", "license", "big"}, limit=200).extra)
    assert kept == {"bundles": {"authz": {"rev": "7"}}, "license": "key-123"}  # big is too big
    assert len(parse(body, {"bundles", "license"}, limit=40).extra or "") <= 40


async def test_allow_listed_keys_are_stored_and_others_are_not(
    aiohttp_client: AiohttpClient, tmp_path: Path
) -> None:
    settings = make_settings(tmp_path, extra_keys="bundles, plugins")
    client = await aiohttp_client(create_app(settings))
    body = report_body(bundles=["authz"], license="key-123")
    response = await client.post("/v1/version", json=body, headers={"User-Agent": OPA_UA})
    assert response.status == 200
    with sqlite3.connect(settings.db) as conn:
        assert conn.execute("SELECT extra FROM reports").fetchall() == [('{"bundles":["authz"]}',)]
        assert "key-123" not in "\n".join(conn.iterdump())


async def test_a_version_1_database_with_data_migrates_to_the_latest(tmp_path: Path) -> None:
    path = tmp_path / "v1.db"
    with sqlite3.connect(path, isolation_level=None) as conn:
        for statement in SCHEMA_V1:
            conn.execute(statement)
        conn.execute("PRAGMA user_version = 1")
        conn.execute(
            "INSERT INTO reports (product, day, instance_id, first_seen_at, last_seen_at,"
            " report_count, version) VALUES ('opa', '2026-01-01', 'i', 1, 2, 3, '1.5.1')"
        )
    storage = await SqliteStorage.open(path)
    try:
        assert await storage.schema_version() == len(MIGRATIONS)
    finally:
        await storage.close()
    with sqlite3.connect(path) as conn:
        assert conn.execute("SELECT report_count, extra FROM reports").fetchall() == [(3, None)]
        assert conn.execute("SELECT count(*) FROM daily_rollups").fetchone() == (0,)


def add_raw(
    path: Path,
    day: str,
    instance: str,
    version: str,
    reports: int,
    heap: int | None,
    last_seen: int = 100,
) -> None:
    with sqlite3.connect(path) as conn:
        conn.execute(
            "INSERT INTO reports (product, day, instance_id, first_seen_at, last_seen_at,"
            " report_count, version, os, arch, heap_usage_bytes) VALUES"
            " ('opa', ?, ?, 0, ?, ?, ?, 'linux', 'amd64', ?)",
            (day, instance, last_seen, reports, version, heap),
        )


async def make_db(path: Path) -> None:
    await (await SqliteStorage.open(path)).close()


async def test_purge_rolls_up_old_days_across_shards_then_deletes_them(tmp_path: Path) -> None:
    db = tmp_path / "t.db"
    shard = shard_path(db, 1)
    await make_db(db)
    await make_db(shard)
    for i, heap in enumerate([100, 200, 300, 400]):
        add_raw(db, "2026-01-01", f"i{i}", "1.5.1", 2, heap)
    # i0 reached the second worker later that day, already upgraded: it counts once, as 1.6.0.
    add_raw(shard, "2026-01-01", "i0", "1.6.0", 5, 999, last_seen=200)
    add_raw(db, "2026-01-02", "i9", "1.5.1", 1, None)
    add_raw(db, "2026-03-01", "i9", "1.5.1", 1, None)  # inside the retention window: kept
    storage = await SqliteStorage.open(db)
    try:
        result = await storage.roll_up_and_purge("2026-02-01")
        again = await storage.roll_up_and_purge("2026-02-01")
        await storage.aggregate()
        window = await storage.window("opa", "2026-01-01", "2026-03-01")
    finally:
        await storage.close()
    assert (result.days, result.rows_deleted) == (2, 6)
    assert (again.days, again.rows_deleted) == (0, 0)  # idempotent
    with sqlite3.connect(db) as conn:
        rollups = conn.execute(
            "SELECT day, version, instances, reports, heap_p50, heap_p90,"
            " heap_p99 FROM daily_rollups ORDER BY day, version"
        ).fetchall()
        assert conn.execute("SELECT day FROM reports").fetchall() == [("2026-03-01",)]
    assert rollups == [
        ("2026-01-01", "1.5.1", 3, 6, 300, 400, 400),
        ("2026-01-01", "1.6.0", 1, 7, 999, 999, 999),
        ("2026-01-02", "1.5.1", 1, 1, None, None, None),
    ]
    # The statistics keep the purged days (aggregated before their raw rows went).
    assert window.days == [
        ("2026-01-01", 4, 13, 0),
        ("2026-01-02", 1, 1, 0),
        ("2026-03-01", 1, 1, 0),
    ]
    assert sorted(window.versions) == [
        ("2026-01-01", "1.5.1", 3, 6),
        ("2026-01-01", "1.6.0", 1, 7),
        ("2026-01-02", "1.5.1", 1, 1),
        ("2026-03-01", "1.5.1", 1, 1),
    ]


def test_purge_and_daily_stats_from_the_cli(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    db = tmp_path / "t.db"
    asyncio.run(make_db(db))
    today = datetime.now(UTC).date()
    old = (today - timedelta(days=40)).isoformat()
    add_raw(db, old, INSTANCE_ID, "1.5.1", 4, 10)
    add_raw(db, today.isoformat(), INSTANCE_ID, "1.5.1", 1, 10)
    assert main(["purge", "--db", str(db), "--days", "30"]) == 0
    cutoff = (today - timedelta(days=30)).isoformat()
    assert capsys.readouterr().out.splitlines() == [
        f"rolling up 1 days before {cutoff} and delete their 1 raw rows (retention 30 days)",
        "1 days rolled up, 1 raw rows deleted",
    ]
    assert main(["stats", "--db", str(db), "--refresh", "--days", "60", "--json"]) == 0
    days = json.loads(capsys.readouterr().out)["daily"]
    assert len(days) == 60
    assert [(d["day"], d["reports"]) for d in days if d["reports"]] == [
        (old, 4),
        (today.isoformat(), 1),
    ]


async def test_the_server_applies_retention_by_itself(
    aiohttp_client: AiohttpClient, tmp_path: Path
) -> None:
    settings = make_settings(tmp_path, retention_days=7)
    db = Path(settings.db)
    await make_db(db)
    old = (datetime.now(UTC).date() - timedelta(days=30)).isoformat()
    add_raw(db, old, INSTANCE_ID, "1.5.1", 2, 5)
    client = await aiohttp_client(create_app(settings))
    async with asyncio.timeout(10):  # hang guard: the first run starts with the server
        while True:
            with sqlite3.connect(db) as conn:
                if conn.execute("SELECT count(*) FROM daily_rollups").fetchone() == (1,):
                    break
            await asyncio.sleep(0.05)
    with sqlite3.connect(db) as conn:
        assert conn.execute("SELECT count(*) FROM reports WHERE day = ?", (old,)).fetchone() == (0,)
    assert (await client.get("/healthz")).status == 200


async def test_retention_run_does_not_disturb_acknowledged_reports(
    aiohttp_client: AiohttpClient, tmp_path: Path
) -> None:
    # The purge uses its own connection: reports committed while it runs stay committed.
    settings = make_settings(tmp_path, retention_days=1)
    client = await aiohttp_client(create_app(settings))
    ids = [f"00000000-0000-4000-8000-{i:012d}" for i in range(100)]
    posts = [
        client.post("/v1/version", json=report_body(id=i), headers={"User-Agent": OPA_UA})
        for i in ids
    ]
    responses, _ = await asyncio.gather(asyncio.gather(*posts), purge_expired(settings))
    assert {r.status for r in responses} == {200}
    with sqlite3.connect(settings.db) as conn:
        assert conn.execute("SELECT sum(report_count) FROM reports").fetchone() == (100,)
