"""SqliteStorage on real SQLite files: migrations, per-day upserts, the catalog, statistics."""

from __future__ import annotations

import asyncio
import sqlite3
import threading
from collections.abc import AsyncIterator
from pathlib import Path

import aiosqlite
import pytest

from opa_telemetry_server.domain.protocol import Report
from opa_telemetry_server.domain.releases import bundled_releases, release_from_mapping
from opa_telemetry_server.domain.versions import parse_version
from opa_telemetry_server.errors import CatalogError, SchemaError
from opa_telemetry_server.services.catalog import load_catalog
from opa_telemetry_server.storage.sqlite import SqliteStorage
from opa_telemetry_server.storage.sqlite.backend import _migrate
from opa_telemetry_server.storage.sqlite.migrations import MIGRATIONS

from .conftest import INSTANCE_ID

DAY1 = 1_790_000_000.0  # 2026-09-21 UTC
DAY2 = DAY1 + 86_400


def report(
    instance: str = INSTANCE_ID,
    version: str = "1.5.1",
    product: str = "opa",
    heap: int | None = 1000,
) -> Report:
    return Report(product, instance, parse_version(version), "linux", "amd64", heap, None)


def rows(path: Path, sql: str) -> list[tuple[object, ...]]:
    with sqlite3.connect(path) as conn:
        return conn.execute(sql).fetchall()


@pytest.fixture
async def storage(tmp_path: Path) -> AsyncIterator[SqliteStorage]:
    opened = await SqliteStorage.open(tmp_path / "t.db")
    yield opened
    await opened.close()


async def test_open_creates_schema_in_wal_mode(tmp_path: Path) -> None:
    storage = await SqliteStorage.open(tmp_path / "t.db")
    assert await storage.schema_version() == len(MIGRATIONS)
    await storage.close()
    await storage.close()  # idempotent
    assert rows(tmp_path / "t.db", "PRAGMA journal_mode") == [("wal",)]


async def test_reports_upsert_per_product_day_and_instance(storage: SqliteStorage) -> None:
    await storage.write_batch([report(heap=1), report(heap=2)], [], DAY1)
    await storage.write_batch([report(version="1.6.0", heap=3)], [], DAY1 + 60)
    await storage.write_batch([report(heap=4)], [], DAY2)
    await storage.write_batch([report(product="myapp")], [], DAY2)
    got = rows(
        Path(storage.path),
        "SELECT product, day, report_count, version, heap_usage_bytes,"
        " first_seen_at, last_seen_at FROM reports ORDER BY product, day",
    )
    assert got == [
        ("myapp", "2026-09-22", 1, "1.5.1", 1000, int(DAY2), int(DAY2)),
        ("opa", "2026-09-21", 3, "1.6.0", 3, int(DAY1), int(DAY1) + 60),
        ("opa", "2026-09-22", 1, "1.5.1", 4, int(DAY2), int(DAY2)),
    ]


async def test_checks_are_counted_per_product_and_day(storage: SqliteStorage) -> None:
    await storage.write_batch([], ["opa", "opa", "app"], DAY1)
    await storage.write_batch([], ["opa"], DAY1)
    got = rows(Path(storage.path), "SELECT * FROM version_checks ORDER BY product")
    assert got == [("app", "2026-09-21", 1), ("opa", "2026-09-21", 3)]


async def test_hostile_strings_are_stored_verbatim_not_executed(storage: SqliteStorage) -> None:
    hostile = "x'); DROP TABLE reports; --"
    await storage.write_batch(
        [Report(hostile, INSTANCE_ID, parse_version("1.0.0"), hostile, hostile, None, hostile)],
        [hostile],
        DAY1,
    )
    got = rows(Path(storage.path), "SELECT product, os, min_compatible_version FROM reports")
    assert got == [(hostile, hostile, hostile)]
    assert rows(Path(storage.path), "SELECT product FROM version_checks") == [(hostile,)]


async def test_seed_catalog_runs_once_even_after_removals(storage: SqliteStorage) -> None:
    assert await storage.seed_catalog("opa", bundled_releases()) == 139
    assert await storage.remove_release("opa", "v1.20.2")
    assert await storage.seed_catalog("opa", bundled_releases()) == 0
    catalog = await load_catalog(storage)
    assert catalog.latest("opa").tag == "v1.20.1"  # type: ignore[union-attr]


async def test_catalog_generation_changes_on_every_catalog_edit(storage: SqliteStorage) -> None:
    first = await storage.catalog_generation()
    await storage.add_release("opa", release_from_mapping({"tag": "v9.0.0"}))
    second = await storage.catalog_generation()
    # An edit from another process (here the sqlite3 module) is seen too.
    with sqlite3.connect(storage.path) as conn:
        conn.execute("UPDATE releases SET prerelease = 1")
    assert first < second < await storage.catalog_generation()


async def test_add_release_refuses_duplicates_unless_replacing(storage: SqliteStorage) -> None:
    await storage.add_release("opa", release_from_mapping({"tag": "v9.0.0"}))
    with pytest.raises(CatalogError):
        await storage.add_release("opa", release_from_mapping({"tag": "v9.0.0"}))
    changed = release_from_mapping({"tag": "v9.0.0", "assets": ["opa_linux_amd64"]})
    await storage.add_release("opa", changed, replace=True)
    latest = (await load_catalog(storage)).latest("opa")
    assert latest is not None and latest.id > 0
    assert [a.to_json() for a in latest.assets] == ["opa_linux_amd64"]


async def test_import_counts_added_and_updated(storage: SqliteStorage) -> None:
    first = [release_from_mapping({"tag": "v1.0.0"}), release_from_mapping({"tag": "v1.1.0"})]
    assert await storage.import_releases("opa", first) == (2, 0)
    again = [
        release_from_mapping({"tag": "v1.0.0"}),
        release_from_mapping({"tag": "v1.1.0", "published": "2026-01-01"}),
        release_from_mapping({"tag": "v1.2.0"}),
    ]
    assert await storage.import_releases("opa", again) == (1, 1)


async def test_aggregates_count_instances_per_day_version_and_platform(
    storage: SqliteStorage,
) -> None:
    ids = [f"00000000-0000-4000-8000-00000000000{i}" for i in range(4)]
    await storage.write_batch(
        [
            report(ids[0], "1.5.1"),
            report(ids[1], "1.5.1"),
            report(ids[2], "1.20.2"),
            report(ids[0], "1.5.1"),
        ],
        ["opa"],
        DAY1,
    )
    await storage.write_batch(
        [Report("opa", ids[3], parse_version("0.26.0-dev"), None, None, None, None)], [], DAY2
    )
    assert (await storage.window("opa", "2026-09-21", "2026-09-22")).days == []  # not yet
    result = await storage.aggregate(now=DAY2 + 60)
    assert (result.days, result.instances) == (2, 4)
    window = await storage.window("opa", "2026-09-21", "2026-09-22")
    assert window.days == [("2026-09-21", 3, 4, 1), ("2026-09-22", 1, 1, 0)]
    assert sorted(window.versions) == [
        ("2026-09-21", "1.20.2", 1, 1),
        ("2026-09-21", "1.5.1", 2, 3),
        ("2026-09-22", "0.26.0-dev", 1, 1),
    ]
    assert sorted(window.platforms) == [("", "", 1), ("linux", "amd64", 3)]
    assert window.min_compatible == [("", 4)]
    assert window.aggregated_at == int(DAY2 + 60)
    assert (await storage.window("opa", "2026-09-22", "2026-09-22")).days == [
        ("2026-09-22", 1, 1, 0)
    ]


async def test_aggregation_rereads_only_days_since_its_watermark(storage: SqliteStorage) -> None:
    await storage.write_batch([report(heap=1000)], [], DAY1)
    await storage.aggregate(now=DAY2 + 3600)  # the watermark moves past DAY1
    with sqlite3.connect(storage.path) as conn:  # a change to an old day is not re-read
        conn.execute("UPDATE reports SET report_count = 50")
    await storage.write_batch([report("00000000-0000-4000-8000-000000000009")], [], DAY2 + 3700)
    result = await storage.aggregate(now=DAY2 + 7200)
    assert result.days == 1
    assert (await storage.aggregate(now=DAY2 + 7300)).days == 0  # nothing new: no day re-read
    window = await storage.window("opa", "2026-09-21", "2026-09-22")
    assert window.days == [("2026-09-21", 1, 1, 0), ("2026-09-22", 1, 1, 0)]


async def test_heap_histogram_buckets_are_an_eighth_of_a_doubling(storage: SqliteStorage) -> None:
    ids = [f"00000000-0000-4000-8000-00000000000{i}" for i in range(4)]
    heaps = [0, 1024, 1100, 2048]  # 1024 and 1100 share a bucket (1100 < 1024 * 2^(1/8))
    reports = [report(i, heap=h) for i, h in zip(ids, heaps, strict=True)]
    await storage.write_batch(reports, [], DAY1)
    await storage.aggregate(now=DAY1)
    window = await storage.window("opa", "2026-09-21", "2026-09-21")
    assert sorted(window.heaps) == [("1.5.1", 0, 1), ("1.5.1", 80, 2), ("1.5.1", 88, 1)]


async def test_migrate_applies_missing_steps_in_order_and_keeps_data(tmp_path: Path) -> None:
    steps = (("CREATE TABLE a (x)", "INSERT INTO a VALUES (1)"), ("ALTER TABLE a ADD y",))
    async with aiosqlite.connect(tmp_path / "m.db", isolation_level=None) as conn:
        await _migrate(conn, steps[:1])
        await conn.execute("INSERT INTO a (x) VALUES (2)")
        await _migrate(conn, steps)  # an existing database at version 1 gets step 2 only
        await _migrate(conn, steps)  # and migrating again changes nothing
        async with conn.execute("SELECT x, y FROM a ORDER BY x") as cursor:
            assert list(await cursor.fetchall()) == [(1, None), (2, None)]
        async with conn.execute("PRAGMA user_version") as cursor:
            assert await cursor.fetchone() == (2,)


async def test_failed_migration_step_leaves_database_unchanged(tmp_path: Path) -> None:
    steps = (("CREATE TABLE a (x)",), ("CREATE TABLE b (x)", "THIS IS NOT SQL"))
    async with aiosqlite.connect(tmp_path / "m.db", isolation_level=None) as conn:
        with pytest.raises(sqlite3.OperationalError):
            await _migrate(conn, steps)
        async with conn.execute("SELECT name FROM sqlite_master ORDER BY name") as cursor:
            assert list(await cursor.fetchall()) == [("a",)]
        async with conn.execute("PRAGMA user_version") as cursor:
            assert await cursor.fetchone() == (1,)


async def test_open_refuses_a_database_from_a_newer_version(tmp_path: Path) -> None:
    with sqlite3.connect(tmp_path / "new.db") as conn:
        conn.execute(f"PRAGMA user_version = {len(MIGRATIONS) + 1}")
    with pytest.raises(SchemaError, match="newer"):
        await SqliteStorage.open(tmp_path / "new.db")


async def test_open_refuses_a_file_that_is_not_a_database(tmp_path: Path) -> None:
    (tmp_path / "junk.db").write_bytes(b"this is not sqlite" * 100)
    with pytest.raises(SchemaError, match="cannot use"):
        await SqliteStorage.open(tmp_path / "junk.db")


async def test_a_window_of_heaps_is_the_running_totals_difference(storage: SqliteStorage) -> None:
    day3 = DAY2 + 86_400
    await storage.write_batch([report(heap=1024)], [], DAY1)
    await storage.write_batch([report(heap=2048)], [], DAY2)
    await storage.write_batch([report(heap=4096), report("x" * 36, heap=4096)], [], day3)
    await storage.aggregate(now=day3)

    async def heaps(since: str, until: str) -> list[tuple[str, int, int]]:
        return sorted((await storage.window("opa", since, until)).heaps)

    assert await heaps("2026-09-21", "2026-09-23") == [
        ("1.5.1", 80, 1),
        ("1.5.1", 88, 1),
        ("1.5.1", 96, 2),
    ]
    assert await heaps("2026-09-22", "2026-09-22") == [("1.5.1", 88, 1)]
    assert await heaps("2026-09-23", "2026-09-30") == [("1.5.1", 96, 2)]
    assert await heaps("2026-09-01", "2026-09-20") == []
    # A re-read day (here the middle one, rewritten) carries into the later totals.
    with sqlite3.connect(storage.path) as conn:
        conn.execute("UPDATE reports SET heap_usage_bytes = 1024 WHERE day = '2026-09-22'")
        conn.execute("DELETE FROM meta WHERE key = 'stats_watermark'")
    await storage.aggregate(now=day3)
    assert await heaps("2026-09-21", "2026-09-23") == [("1.5.1", 80, 2), ("1.5.1", 96, 2)]


def test_a_cancelled_open_never_calls_back_into_a_closed_loop(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A background task stopped while it opens the database (retention, sync) as the server
    shuts down: when the task is done, aiosqlite's thread has nothing left to deliver, so
    closing the loop right away cannot make that thread fail."""
    failures: list[BaseException | None] = []
    monkeypatch.setattr(threading, "excepthook", lambda args: failures.append(args.exc_value))
    before = set(threading.enumerate())

    async def open_then_stop() -> None:
        opening = asyncio.create_task(SqliteStorage.open(tmp_path / "t.db"))
        await asyncio.sleep(0)  # it now waits for the connection in aiosqlite's thread
        opening.cancel()
        with pytest.raises(asyncio.CancelledError):
            await opening

    loop = asyncio.new_event_loop()
    try:
        loop.run_until_complete(open_then_stop())
    finally:
        loop.close()  # at once, as a server's loop closes after its cleanup
    for thread in set(threading.enumerate()) - before:
        thread.join(5)  # a hang guard
    assert failures == []
