"""One contract, two backends: everything the SQLite storage promises, PostgreSQL promises too.

Each test runs against a fresh SQLite file and a fresh database on the session's private
PostgreSQL cluster (``tests/pgcluster.py``).
"""

from __future__ import annotations

import asyncio
import calendar
import dataclasses
import re
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from opa_telemetry_server.domain.advisories import bundled_advisories
from opa_telemetry_server.domain.protocol import Report
from opa_telemetry_server.domain.releases import Release, release_from_mapping
from opa_telemetry_server.domain.versions import parse_version
from opa_telemetry_server.errors import CatalogError, SchemaError
from opa_telemetry_server.services.catalog import load_catalog
from opa_telemetry_server.storage import SyncState
from opa_telemetry_server.storage.postgres import PostgresStorage, redact_dsn
from opa_telemetry_server.storage.sqlite import SqliteStorage

from .pgcluster import PASSWORD

IDS = [f"00000000-0000-4000-8000-{n:012d}" for n in range(10)]


def at(day: str, hour: int = 12) -> float:
    """A Unix time on ``day`` (UTC): the storage takes the report's day from it."""
    y, m, d = map(int, day.split("-"))
    return float(calendar.timegm((y, m, d, hour, 0, 0)))


def report(instance: str, version: str = "1.5.1", heap: int | None = 1000, **kw: Any) -> Report:
    values: dict[str, Any] = {"os": "linux", "arch": "amd64", "product": "opa", **kw}
    return Report(
        values["product"], instance, parse_version(version), values["os"], values["arch"],
        heap, None, None,
    )  # fmt: skip


def release(tag: str, **kw: Any) -> Release:
    return release_from_mapping({"tag": tag, "assets": ["opa_linux_amd64"], **kw}, "opa")


TARGETS: dict[int, str] = {}


@pytest.fixture(params=["sqlite", "postgres"])
async def backend(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Any]:
    if request.param == "sqlite":
        target = str(tmp_path / "t.db")
        storage: Any = await SqliteStorage.open(target)
    else:
        target = request.getfixturevalue("postgres_dsn")
        storage = await PostgresStorage.open(target)
    TARGETS[id(storage)] = target  # for tests that reopen it
    yield storage
    await storage.close()


async def reopen(storage: Any, **kw: Any) -> Any:
    if isinstance(storage, PostgresStorage):
        return await PostgresStorage.open(TARGETS[id(storage)], **kw)
    return await SqliteStorage.open(TARGETS[id(storage)], **kw)


async def aggregated(backend: Any, product: str, since: str, until: str) -> Any:
    """The window of aggregates after an aggregation that re-reads every day."""
    await backend.set_meta("stats_watermark", 0)
    await backend.aggregate(now=at(until, 23))
    return await backend.window(product, since, until)


async def test_reports_are_upserted_per_product_day_and_instance(backend: Any) -> None:
    day = "2026-11-30"
    # The same instance twice in one batch and again in the next: one row, three reports,
    # the latest version.
    await backend.write_batch(
        [report(IDS[0], "1.5.0"), report(IDS[0], "1.5.1"), report(IDS[1])], [], at(day, 1)
    )
    await backend.write_batch([report(IDS[0], "1.6.0")], [], at(day, 2))
    await backend.write_batch([report(IDS[0], "1.6.0")], [], at("2026-12-01", 2))
    window = await aggregated(backend, "opa", day, "2026-12-01")
    assert window.days == [(day, 2, 4, 0), ("2026-12-01", 1, 1, 0)]
    assert sorted(window.versions) == [
        (day, "1.5.1", 1, 1),
        (day, "1.6.0", 1, 3),
        ("2026-12-01", "1.6.0", 1, 1),
    ]


async def test_version_checks_are_counted_per_product_and_day(backend: Any) -> None:
    await backend.write_batch([], ["opa", "opa", "other"], at("2026-11-30"))
    await backend.write_batch([report(IDS[0])], ["opa"], at("2026-11-30"))
    assert (await aggregated(backend, "opa", "2026-11-30", "2026-11-30")).days == [
        ("2026-11-30", 1, 1, 3)
    ]
    assert (await backend.window("other", "2026-11-30", "2026-11-30")).days == [
        ("2026-11-30", 0, 0, 1)
    ]


async def test_aggregates_by_version_platform_heap_and_product(backend: Any) -> None:
    await backend.write_batch(
        [
            report(IDS[0], "1.10.0", heap=1024),
            report(IDS[1], "1.9.0", os="darwin", arch="arm64", heap=1100),
            report(IDS[2], "1.10.0-rc.1", heap=None),
            report(IDS[3], "1.10.0", os=None, arch=None, heap=2048),
            report(IDS[4], "2.0.0", product="myapp"),
        ],
        [],
        at("2026-11-30"),
    )
    window = await aggregated(backend, "opa", "2026-11-01", "2026-11-30")
    assert sorted(window.versions) == [
        ("2026-11-30", "1.10.0", 2, 2),
        ("2026-11-30", "1.10.0-rc.1", 1, 1),
        ("2026-11-30", "1.9.0", 1, 1),
    ]
    assert sorted(window.platforms) == [("", "", 1), ("darwin", "arm64", 1), ("linux", "amd64", 2)]
    # Heap buckets are an eighth of a doubling: 1024 and 1100 share one, 2048 is 8 above.
    assert sorted(window.heaps) == [("1.10.0", 80, 1), ("1.10.0", 88, 1), ("1.9.0", 80, 1)]
    assert window.min_compatible == [("", 4)]
    assert window.aggregated_at is not None
    products = await backend.products("2026-11-30")
    assert [(p.product, p.reports, p.instances_today) for p in products] == [
        ("myapp", 1, 1),
        ("opa", 4, 4),
    ]
    assert sorted(await backend.day_version_counts("2026-11-30")) == [
        ("myapp", "2.0.0", 1),
        ("opa", "1.10.0", 2),
        ("opa", "1.10.0-rc.1", 1),
        ("opa", "1.9.0", 1),
    ]


async def test_heap_buckets_are_exact_at_every_edge(backend: Any) -> None:
    # Bucket b holds [2^(b/8), 2^((b+1)/8)) bytes, i.e. 2^b <= heap^8 < 2^(b+1): exact in
    # integers. Heaps on and beside every power of two and every bucket edge up to 2^40 land
    # where that says (PostgreSQL computes the bucket in float8 and falls back to numeric
    # only on an edge; a float rounding either way would move a heap by one bucket).
    heaps = {0, 1}
    for k in range(1, 41):
        heaps |= {2**k - 1, 2**k, 2**k + 1}
    for b in range(321):
        near = round(2 ** (b / 8))  # the integers around the edge 2^(b/8)
        heaps |= {n for n in range(near - 1, near + 3) if n >= 1}
    heaps_sorted = sorted(heaps)
    expected: dict[int, int] = {}
    for heap in heaps_sorted:
        bucket = (max(heap, 1) ** 8).bit_length() - 1
        expected[bucket] = expected.get(bucket, 0) + 1
    reports = [
        report(f"00000000-0000-4000-8000-{n:012d}", "1.0.0", heap=heap)
        for n, heap in enumerate(heaps_sorted)
    ]
    await backend.write_batch(reports, [], at("2026-11-30"))
    window = await aggregated(backend, "opa", "2026-11-30", "2026-11-30")
    assert sorted((bucket, n) for _, bucket, n in window.heaps) == sorted(expected.items())


async def test_aggregation_rereads_only_days_seen_since_its_watermark(backend: Any) -> None:
    await backend.write_batch([report(IDS[0])], [], at("2026-11-29"))
    first = await backend.aggregate(now=at("2026-11-30", 12), lag=60)
    assert first.days == 1
    await backend.write_batch([report(IDS[1])], [], at("2026-11-30", 13))
    second = await backend.aggregate(now=at("2026-11-30", 14), lag=60)
    assert (second.days, second.instances) == (1, 1)  # only the day with new rows
    assert (await backend.aggregate(now=at("2026-11-30", 15), lag=60)).days == 0


async def test_catalog_changes_bump_the_generation_and_round_trip(backend: Any) -> None:
    generation = await backend.catalog_generation()
    assert await backend.seed_catalog("opa", [release("v1.0.0"), release("v1.1.0")]) == 2
    assert await backend.seed_catalog("opa", [release("v9.0.0")]) == 0  # once per lifetime
    seeded = await backend.catalog_generation()
    assert seeded != generation
    await backend.add_release(
        "opa",
        release("v1.2.0", published="2026-11-01", release_notes="https://example.com/n"),
    )
    with pytest.raises(CatalogError, match="already in the catalog"):
        await backend.add_release("opa", release("v1.2.0"))
    assert (
        await backend.add_release("opa", release("v1.2.0", prerelease=True), replace=True) is False
    )
    assert await backend.import_releases("opa", [release("v1.1.0"), release("v1.3.0")]) == (1, 0)
    assert await backend.catalog_generation() != seeded
    catalog = await load_catalog(backend)
    assert [r.tag for r in catalog.releases("opa")] == ["v1.3.0", "v1.2.0", "v1.1.0", "v1.0.0"]
    v120 = catalog.releases("opa")[1]
    assert (v120.prerelease, v120.published) == (True, None)
    assert [a.to_json() for a in v120.assets] == [r.to_json() for r in release("v1.0.0").assets]
    assert v120.id > 0
    assert await backend.remove_release("opa", "v1.3.0") is True
    assert await backend.remove_release("opa", "v1.3.0") is False
    assert (await load_catalog(backend)).latest("opa") == catalog.releases("opa")[2]
    before = await backend.catalog_generation()
    assert await backend.import_releases("opa", [release("v1.1.0")]) == (0, 0)
    assert await backend.catalog_generation() == before  # nothing changed, nothing bumped


async def test_retention_keeps_the_aggregates_of_the_days_it_purges(backend: Any) -> None:
    await backend.write_batch(
        [report(IDS[0], heap=100), report(IDS[1], heap=300), report(IDS[2], "1.6.0", heap=None)],
        [],
        at("2026-10-01"),
    )
    await backend.write_batch([report(IDS[0])], [], at("2026-10-01", 13))
    await backend.write_batch([report(IDS[3])], [], at("2026-11-30"))
    expired = await backend.count_expired("2026-11-01")
    assert (expired.days, expired.rows_deleted) == (1, 3)
    result = await backend.roll_up_and_purge("2026-11-01")
    assert (result.days, result.rows_deleted) == (1, 3)
    again = await backend.roll_up_and_purge("2026-11-01")
    assert (again.days, again.rows_deleted) == (0, 0)
    window = await aggregated(backend, "opa", "2026-09-01", "2026-11-30")
    assert window.days == [("2026-10-01", 3, 4, 0), ("2026-11-30", 1, 1, 0)]


async def test_only_a_migrating_open_creates_the_schema(backend: Any, tmp_path: Path) -> None:
    assert await backend.schema_version() >= 1
    again = await reopen(backend, migrate=False)  # exactly this version's schema: fine
    await again.close()
    migrated_twice = await reopen(backend)  # idempotent
    await migrated_twice.close()
    if isinstance(backend, PostgresStorage):
        empty = TARGETS[id(backend)].rsplit("/", 1)[0] + "/postgres"
        with pytest.raises(SchemaError, match="not an opa-telemetry database"):
            await PostgresStorage.open(empty, migrate=False)
    else:
        with pytest.raises(SchemaError, match="no such database"):
            await SqliteStorage.open(tmp_path / "absent.db", migrate=False)


async def test_ping_answers_while_the_database_is_there(backend: Any) -> None:
    await backend.ping()


# -- PostgreSQL only ------------------------------------------------------------------------


async def test_postgres_nodes_starting_together_migrate_once(postgres_dsn: str) -> None:
    nodes = await asyncio.gather(*(PostgresStorage.open(postgres_dsn) for _ in range(4)))
    try:
        assert {await node.schema_version() for node in nodes} == {1}
    finally:
        for node in nodes:
            await node.close()


async def test_postgres_two_nodes_upserting_the_same_instances_count_every_report(
    postgres_dsn: str,
) -> None:
    first, second = (
        await PostgresStorage.open(postgres_dsn),
        await PostgresStorage.open(postgres_dsn),
    )
    try:
        batch = [report(i) for i in IDS]
        for _ in range(10):
            await asyncio.gather(
                first.write_batch(batch, [], at("2026-11-30")),
                second.write_batch(batch[::-1], [], at("2026-11-30")),
            )
        window = await aggregated(first, "opa", "2026-11-30", "2026-11-30")
        assert window.days == [("2026-11-30", 10, 200, 0)]
    finally:
        await first.close()
        await second.close()


async def test_postgres_errors_never_show_the_password(
    postgres_cluster: Any, caplog: pytest.LogCaptureFixture
) -> None:
    wrong = postgres_cluster.dsn().replace(PASSWORD, "not-" + PASSWORD)
    with pytest.raises(SchemaError) as raised:
        await PostgresStorage.open(wrong)
    assert "password authentication failed" in str(raised.value)
    assert PASSWORD not in str(raised.value) and "***" in str(raised.value)
    down = f"postgresql://opa:{PASSWORD}@127.0.0.1:1/postgres"
    with pytest.raises(SchemaError) as raised:
        await PostgresStorage.open(down, wait=1.2)
    assert "cannot connect" in str(raised.value)
    assert PASSWORD not in str(raised.value) + caplog.text
    assert "not reachable" in caplog.text
    assert redact_dsn(down) == "postgresql://opa:***@127.0.0.1:1/postgres"


async def test_policies_are_stored_per_product_and_release(backend: Any) -> None:
    await backend.import_releases("opa", [release("v1.0.0"), release("v1.1.0")])
    generation = await backend.catalog_generation()
    await backend.set_product_policy("opa", pinned_tag="v1.0.0", min_version="0.9.0")
    await backend.set_product_policy("opa", support_notice="https://example.com/eol")
    assert await backend.set_release_policy("opa", "v1.1.0", yanked=True, reason="broken")
    assert not await backend.set_release_policy("opa", "v1.1.0", yanked=True, reason="broken")
    assert await backend.set_release_policy("opa", "v1.0.0", rollout_percent=25)
    with pytest.raises(CatalogError, match="not in the catalog"):
        await backend.set_release_policy("opa", "v9.9.9", yanked=True)
    assert await backend.catalog_generation() != generation
    policy = (await load_catalog(backend)).policy("opa")
    assert (policy.pinned, str(policy.min_version), policy.notice) == (
        "v1.0.0", "0.9.0", "https://example.com/eol",
    )  # fmt: skip
    assert (dict(policy.yanked), dict(policy.rollouts)) == ({"v1.1.0": "broken"}, {"v1.0.0": 25})
    await backend.set_product_policy("opa", pinned_tag=None)
    assert await backend.set_release_policy("opa", "v1.1.0", yanked=False)
    policy = (await load_catalog(backend)).policy("opa")
    assert (policy.pinned, str(policy.min_version), dict(policy.yanked)) == (None, "0.9.0", {})


async def test_advisories_import_once_as_seed_then_update_and_remove(backend: Any) -> None:
    advisories = bundled_advisories()
    assert await backend.import_advisories("opa", advisories, seed=True) == (len(advisories), 0)
    assert await backend.import_advisories("opa", advisories[:1], seed=True) == (0, 0)
    assert await backend.import_advisories("opa", advisories) == (0, 0)  # nothing changed
    first = advisories[0]
    changed = dataclasses.replace(first, record={**first.record, "summary": "new"})
    assert await backend.import_advisories("opa", [changed]) == (0, 1)
    stored = (await load_catalog(backend)).advisories("opa")
    assert len(stored) == len(advisories)
    assert await backend.remove_advisory("opa", first.id) is True
    assert await backend.remove_advisory("opa", first.id) is False


async def test_sync_state_and_a_pruning_sync(backend: Any) -> None:
    assert await backend.sync_state("opa") is None
    state = SyncState("opa", "https://api.github.com", etag='W/"1"', last_attempt_at=5)
    await backend.save_sync_state(state)
    await backend.save_sync_state(SyncState("opa", "https://x", last_success_at=6))
    assert await backend.sync_states() == [SyncState("opa", "https://x", last_success_at=6)]
    await backend.import_releases("opa", [release("v1.0.0"), release("v1.1.0")])
    counts = await backend.sync_releases("opa", [release("v1.1.0"), release("v1.2.0")], prune=True)
    assert counts == (1, 0, 1)
    tags = [r.tag for r in (await load_catalog(backend)).releases("opa")]
    assert tags == ["v1.2.0", "v1.1.0"]


async def test_an_exclusive_job_runs_in_one_process_at_a_time(backend: Any) -> None:
    other = await reopen(backend, migrate=False)
    try:
        async with backend.exclusive("sync:opa") as mine:
            assert mine
            async with other.exclusive("sync:opa") as theirs, other.exclusive("x") as free:
                # PostgreSQL nodes share one database: the second is refused while the first
                # holds it. SQLite serves one host, where only worker 0 runs such jobs.
                assert theirs is (not isinstance(backend, PostgresStorage)) and free
        async with other.exclusive("sync:opa") as after:
            assert after  # released with the block
    finally:
        await other.close()


def test_a_dsn_is_shown_without_any_password() -> None:
    assert redact_dsn("postgresql://u:pw@db:5432/t") == "postgresql://u:***@db:5432/t"
    assert (
        redact_dsn("postgresql://u@db/t?sslmode=require&password=pw&sslpassword=k")
        == "postgresql://u@db/t?sslmode=require&password=***&sslpassword=***"
    )
    assert redact_dsn("postgresql://u@db/t") == "postgresql://u@db/t"
    # A primary and its standby in one DSN (a failover): every host kept, the password not.
    assert (
        redact_dsn("postgresql://u:p%40ss@db1:5432,db2:5433/t?target_session_attrs=read-write")
        == "postgresql://u:***@db1:5432,db2:5433/t?target_session_attrs=read-write"
    )
    assert redact_dsn("postgresql://u@[::1]:5432,db2/t?password=pw") == (
        "postgresql://u@[::1]:5432,db2/t?password=***"
    )
    # A password not percent-encoded, whose # / ? would end the URL's authority: hidden whole.
    for password in ("s3cret#pw", "s3cret/pw", "s3cret?pw", "p@ss:w#rd"):
        assert redact_dsn(f"postgresql://u:{password}@db:5432/t?sslmode=require") == (
            "postgresql://u:***@db:5432/t?sslmode=require"
        )


@pytest.mark.parametrize(
    "dsn",
    [
        "postgresql://u:s3cret#pw@127.0.0.1:1/t",  # the driver would read "s3cret" as a port
        "postgresql://u:s3cret/pw@127.0.0.1:1/t",
        "postgresql://u:s3cret?pw@127.0.0.1:1/t",  # ...or "pw@127.0.0.1:1/t" as its query
        "postgresql://u:s3c[ret@127.0.0.1:1/t",
        "postgresql://u:s3cretpw@127.0.0.1:port/t",
    ],
)
async def test_a_url_the_driver_cannot_read_is_refused_without_a_piece_of_its_password(
    dsn: str, caplog: pytest.LogCaptureFixture
) -> None:
    with pytest.raises(SchemaError) as raised:
        await PostgresStorage.open(dsn, wait=30)  # not retried: it would never do
    message = str(raised.value)
    assert message.startswith("postgresql://u:***@") and "not a valid PostgreSQL URL" in message
    assert not {"s3c", "cret", "pw"} & set(re.findall(r"\w+", message)), message
    assert caplog.text == ""


async def test_a_bad_setting_in_the_url_is_one_line_at_once(
    caplog: pytest.LogCaptureFixture,
) -> None:
    with pytest.raises(SchemaError) as raised:
        await PostgresStorage.open("postgresql://u:pw@127.0.0.1:1/t?sslmode=bogus", wait=30)
    assert str(raised.value).startswith(
        "postgresql://u:***@127.0.0.1:1/t?sslmode=bogus: `sslmode` parameter must be one of:"
    )
    assert "not reachable" not in caplog.text  # a setting is not retried
