"""The server on PostgreSQL, end to end: real ``serve`` processes, a real private cluster.

Several nodes on one database, the database restarted under load (acknowledged <= stored <=
sent), a server started before its database, and a password that never reaches a log.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time
from typing import Any

import aiohttp
import asyncpg
import pytest

from opa_telemetry.loadtest import LoadConfig, parse_target, run_load

from .conftest import INSTANCE_ID, OPA_UA, ready_url, report_body
from .pgcluster import PASSWORD

SERVER = [sys.executable, "-m", "opa_telemetry_server"]


async def start_node(dsn: str, *extra: str) -> tuple[asyncio.subprocess.Process, str]:
    """A ``serve`` process on a free port; returns it and its base URL once it listens."""
    process = await asyncio.create_subprocess_exec(
        *SERVER, "serve", "--port", "0", "--db", dsn, "--log-level", "info",
        "--no-access-log", "--rate-limit", "0", "--catalog-refresh", "0.2", *extra,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    assert process.stdout is not None
    line = await asyncio.wait_for(process.stdout.readline(), 90)
    if not line:
        assert process.stderr is not None
        raise AssertionError((await process.stderr.read()).decode())
    return process, ready_url(line)


async def stop_node(process: asyncio.subprocess.Process) -> str:
    """SIGTERM, wait for a clean exit, and return everything it logged."""
    if process.returncode is None:
        process.terminate()
    assert await asyncio.wait_for(process.wait(), 60) == 0
    assert process.stderr is not None
    return (await process.stderr.read()).decode()


async def stored_reports(dsn: str) -> int:
    conn = await asyncpg.connect(dsn)
    try:
        return int(await conn.fetchval("SELECT coalesce(sum(report_count), 0) FROM reports"))
    finally:
        await conn.close()


def server_cli(*argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*SERVER, *argv], capture_output=True, text=True, timeout=90)


async def post_report(session: aiohttp.ClientSession, url: str, **fields: Any) -> Any:
    async with session.post(
        f"{url}/v1/version", json=report_body(**fields), headers={"User-Agent": OPA_UA}
    ) as response:
        assert response.status == 200, await response.text()
        return await response.json()


async def recovered(url: str) -> None:
    """Post one report until it is taken (the pool reconnects by itself): meanwhile only 503s
    with ``Retry-After``. It adds one report to the database."""
    async with aiohttp.ClientSession() as session, asyncio.timeout(30):
        while True:
            async with session.post(
                f"{url}/v1/version", json=report_body(), headers={"User-Agent": OPA_UA}
            ) as response:
                if response.status == 200:
                    return
                assert response.status == 503 and "Retry-After" in response.headers
            await asyncio.sleep(0.2)


async def test_two_nodes_share_reports_and_catalog_changes(postgres_dsn: str) -> None:
    first, first_url = await start_node(postgres_dsn)
    second, second_url = await start_node(postgres_dsn)
    try:
        async with aiohttp.ClientSession() as session:
            answer = await post_report(session, first_url, version="1.5.1")
            assert answer["latest"]["latest_release"] == "v1.20.2"  # seeded once, shared
            await post_report(session, second_url, id=INSTANCE_ID.replace("a", "b"))
            added = server_cli(
                "releases", "add", "v1.99.0", "--db", postgres_dsn, "--published", "2026-11-30",
                "--asset", "opa_linux_amd64",
            )  # fmt: skip
            assert added.returncode == 0, added.stderr
            for url in (first_url, second_url):  # both nodes pick the change up by themselves
                async with asyncio.timeout(30):
                    while True:
                        answer = await post_report(session, url)
                        if answer["latest"]["latest_release"] == "v1.99.0":
                            break
                        await asyncio.sleep(0.1)
        stats = server_cli("stats", "--refresh", "--db", postgres_dsn, "--json")
        assert stats.returncode == 0, stats.stderr
        assert json.loads(stats.stdout)["instances"]["latest_day"] == 2
    finally:
        logs = await stop_node(first) + await stop_node(second)
    assert PASSWORD not in logs


async def test_a_database_restart_under_load_loses_no_acknowledged_report(
    postgres_cluster: Any, postgres_dsn: str
) -> None:
    node, url = await start_node(postgres_dsn, "--retry-after", "1")
    try:
        config = LoadConfig(
            parse_target(url), concurrency=32, duration=6.0, instances=5000, seed=3, timeout=3.0
        )
        load = asyncio.create_task(run_load(config))
        await asyncio.sleep(1.5)
        await asyncio.to_thread(postgres_cluster.restart, "fast")
        result = await load
        await recovered(url)
    finally:
        logs = await stop_node(node)
    stored = await stored_reports(postgres_dsn) - 1  # less the recovery probe
    assert result.reports_ok > 500, result  # the restart landed mid-load
    assert result.reports_ok <= stored <= result.sent, (result.reports_ok, stored, result.sent)
    assert PASSWORD not in logs


async def test_connections_cut_under_load_lose_no_acknowledged_report(
    postgres_cluster: Any, postgres_dsn: str
) -> None:
    # What a proxy restart or a network cut does: the server's connections die mid-batch.
    node, url = await start_node(postgres_dsn)
    admin = await asyncpg.connect(postgres_dsn)
    try:
        config = LoadConfig(
            parse_target(url), concurrency=32, duration=5.0, instances=5000, seed=5, timeout=3.0
        )
        load = asyncio.create_task(run_load(config))
        cut = 0
        for _ in range(4):
            await asyncio.sleep(0.8)
            cut += len(
                await admin.fetch(
                    "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
                    " WHERE application_name = 'opa-telemetry'"
                )
            )
        result = await load
        await recovered(url)
    finally:
        await admin.close()
        logs = await stop_node(node)
    stored = await stored_reports(postgres_dsn) - 1  # less the recovery probe
    assert cut > 0 and result.reports_ok > 500, (cut, result)
    assert result.reports_ok <= stored <= result.sent, (result.reports_ok, stored, result.sent)
    assert PASSWORD not in logs
    # Our own lines are one-line warnings (asyncpg may still report its cut connections).
    assert not [line for line in logs.splitlines() if " ERROR " in line and "opa_telemetry" in line]


async def test_a_server_started_before_its_database_waits_for_it(
    postgres_cluster: Any, postgres_dsn: str
) -> None:
    await asyncio.to_thread(postgres_cluster.stop)
    try:
        process = await asyncio.create_subprocess_exec(
            *SERVER, "serve", "--port", "0", "--db", postgres_dsn, "--no-access-log",
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        )  # fmt: skip
        assert process.stderr is not None and process.stdout is not None
        waiting = await asyncio.wait_for(process.stderr.readline(), 60)
        assert b"is not reachable" in waiting and b"retrying" in waiting
        assert PASSWORD.encode() not in waiting and b"***" in waiting
    finally:
        await asyncio.to_thread(postgres_cluster.start)
    url = ready_url(await asyncio.wait_for(process.stdout.readline(), 60))
    async with aiohttp.ClientSession() as session:
        await post_report(session, url)
    assert PASSWORD not in await stop_node(process)


@pytest.mark.parametrize(
    "dsn",
    [
        f"postgresql://opa:{PASSWORD}@127.0.0.1:1/telemetry",
        f"postgresql://opa@127.0.0.1:1/telemetry?sslmode=disable&password={PASSWORD}",
        f"postgresql://opa:{PASSWORD}@127.0.0.1:1,127.0.0.1:2/telemetry",  # a failover pair
    ],
)
def test_cli_commands_explain_an_unreachable_database_without_the_password(dsn: str) -> None:
    started = time.monotonic()
    result = server_cli("stats", "--db", dsn)
    assert result.returncode == 1 and len(result.stderr.splitlines()) == 1, result.stderr
    assert "cannot connect" in result.stderr and PASSWORD not in result.stderr
    assert "***" in result.stderr
    assert time.monotonic() - started < 60  # the CLI does not wait for a database


def test_the_environment_never_needs_asyncpg_for_sqlite() -> None:
    # SQLite users need not install the postgres extra: the backend is imported on demand.
    code = (
        "import sys, opa_telemetry_server.web.app, opa_telemetry_server.cli;"
        " print('asyncpg' in sys.modules)"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
        env={**os.environ},
    )  # fmt: skip
    assert result.stdout.strip() == "False", result.stderr


@pytest.fixture(autouse=True)
def _restore_cluster(postgres_cluster: Any) -> Any:
    """Whatever a test did to the cluster, the next one finds it running."""
    yield
    if postgres_cluster.run(
        "pg_ctl", "-D", str(postgres_cluster.data), "status", check=False
    ).returncode:
        postgres_cluster.start()


async def test_a_sqlite_database_with_shards_moves_to_postgres_whole(
    tmp_path: Any, postgres_dsn: str
) -> None:
    from opa_telemetry_server.domain.protocol import Report
    from opa_telemetry_server.domain.versions import parse_version
    from opa_telemetry_server.storage.sqlite import SqliteStorage, shard_path

    db = tmp_path / "t.db"
    prepared = server_cli("releases", "list", "--db", str(db))  # no database yet: refused
    assert prepared.returncode == 1
    node = await asyncio.create_subprocess_exec(
        *SERVER, "serve", "--port", "0", "--db", str(db), "--no-access-log",
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    assert node.stdout is not None
    ready_url(await asyncio.wait_for(node.stdout.readline(), 60))  # migrated and seeded
    await stop_node(node)
    main, shard = await SqliteStorage.open(db), await SqliteStorage.open(shard_path(db, 1))
    day = time.time() - 86_400
    same = "00000000-0000-4000-8000-000000000001"
    try:
        version = parse_version
        await main.write_batch([Report("opa", same, version("1.5.1"), "linux", "amd64", 1, None)],
                               ["opa"], day)  # fmt: skip
        await shard.write_batch(
            [Report("opa", same, version("1.6.0"), "linux", "amd64", 2, None)] * 2,
            ["opa"],
            day + 60,
        )
        await main.set_release_policy("opa", "v1.20.2", yanked=True, reason="test")
    finally:
        await main.close()
        await shard.close()
    copied = server_cli("import-sqlite", str(db), "--db", postgres_dsn)
    assert copied.returncode == 0, copied.stderr
    assert "releases: 139 rows" in copied.stdout and "reports (merged): 1 rows" in copied.stdout
    assert PASSWORD not in copied.stdout + copied.stderr
    conn = await asyncpg.connect(postgres_dsn)
    try:
        row = await conn.fetchrow("SELECT report_count, version, heap_usage_bytes FROM reports")
        assert row is not None
        assert tuple(row) == (3, "1.6.0", 2)  # one instance: counts added, the latest fields
        assert await conn.fetchval("SELECT sum(check_count) FROM version_checks") == 2
        assert await conn.fetchval("SELECT yanked FROM release_policies") is True
    finally:
        await conn.close()
    # The copied release ids moved the sequence on: the catalog takes new releases.
    added = server_cli("releases", "add", "v1.99.0", "--db", postgres_dsn)
    assert added.returncode == 0, added.stderr
    again = server_cli("import-sqlite", str(db), "--db", postgres_dsn)
    assert again.returncode == 1 and "already holds reports or releases" in again.stderr
    # The PostgreSQL server takes over: no re-seeding, the yank kept.
    node, url = await start_node(postgres_dsn)
    try:
        listed = server_cli("releases", "list", "--db", postgres_dsn)
        assert "140 releases" in listed.stdout, listed.stdout
        async with aiohttp.ClientSession() as session:
            answer = await post_report(session, url, version="1.20.2")
        assert answer["latest"]["latest_release"] == "v1.99.0"
        assert answer["support"]["status"] == "yanked"
    finally:
        await stop_node(node)
