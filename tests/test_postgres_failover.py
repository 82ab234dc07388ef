"""A PostgreSQL failover, end to end: a real ``serve`` process whose ``--db`` names a primary
and its streaming standby (``postgresql://u:p@host1:port1,host2:port2/db``), a real pair of
private clusters (``tests/pgcluster.py``).

The primary stops at once under load and the standby is promoted: the node answers 503 with
``Retry-After`` meanwhile and finds the new primary by itself. With synchronous replication no
acknowledged report is lost; with asynchronous replication a standby that lags loses what the
primary acknowledged, shown here with a standby that was away.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import Any

import aiohttp
import asyncpg
import pytest

from opa_telemetry.loadtest import LoadConfig, parse_target, run_load
from opa_telemetry_server.errors import StorageUnavailableError
from opa_telemetry_server.services.retention import purge_expired
from opa_telemetry_server.settings import Settings
from opa_telemetry_server.storage import RETENTION_RUN_KEY, SyncState, open_storage
from opa_telemetry_server.storage.records import AGGREGATED_AT_KEY

from .conftest import INSTANCE_ID, OPA_UA, report_body
from .pgcluster import PASSWORD, multi_host_dsn
from .test_postgres_serve import (
    post_report,
    recovered,
    server_cli,
    start_node,
    stop_node,
    stored_reports,
)

# The node's background jobs run often, so that they meet the failover too.
BUSY = ("--retry-after", "1", "--stats-interval", "0.3", "--purge-interval", "0.3")


async def refused(url: str) -> None:
    """One report, answered 503 with ``Retry-After`` (nothing can take writes right now)."""
    async with (
        aiohttp.ClientSession() as session,
        asyncio.timeout(60),
        session.post(
            f"{url}/v1/version", json=report_body(), headers={"User-Agent": OPA_UA}
        ) as response,
    ):
        assert response.status == 503, await response.text()
        assert response.headers["Retry-After"] == "1"


async def until_refused(url: str) -> int:
    """Post reports until one is answered 503 with ``Retry-After``; how many were taken before.
    A server's sessions see a reload between two statements, and a transaction begun before
    keeps the mode it began with, so a few reports may still be taken meanwhile."""
    taken = 0
    async with aiohttp.ClientSession() as session, asyncio.timeout(30):
        while True:
            async with session.post(
                f"{url}/v1/version", json=report_body(), headers={"User-Agent": OPA_UA}
            ) as response:
                if response.status == 503:
                    assert response.headers["Retry-After"] == "1"
                    return taken
                assert response.status == 200, await response.text()
                taken += 1


async def probe_reports(dsn: str) -> int:
    """Reports of the probes' instance (``INSTANCE_ID``) stored at ``dsn``."""
    conn = await asyncpg.connect(dsn)
    try:
        return int(
            await conn.fetchval(
                "SELECT coalesce(sum(report_count), 0) FROM reports WHERE instance_id = $1",
                INSTANCE_ID,
            )
        )
    finally:
        await conn.close()


async def aggregated_at(dsn: str) -> int:
    conn = await asyncpg.connect(dsn)
    try:
        value = await conn.fetchval("SELECT value FROM meta WHERE key = $1", AGGREGATED_AT_KEY)
        return int(value or 0)
    finally:
        await conn.close()


def one_line_warnings(logs: str) -> None:
    """The node's log through a failover: warnings of one line, no traceback, no password."""
    assert PASSWORD not in logs
    assert "Traceback" not in logs, logs
    assert not [line for line in logs.splitlines() if " ERROR " in line and "opa_telemetry" in line]


async def test_a_failover_under_load_loses_no_acknowledged_report(postgres_pair: Any) -> None:
    primary, standby, database = postgres_pair  # synchronous replication
    dsn = multi_host_dsn([primary, standby], database, target_session_attrs="read-write")
    promoted = standby.dsn(database)
    node, url = await start_node(dsn, *BUSY)
    try:
        config = LoadConfig(
            parse_target(url), concurrency=32, duration=6.0, instances=5000, seed=11, timeout=3.0
        )
        load = asyncio.create_task(run_load(config))
        await asyncio.sleep(1.5)
        await asyncio.to_thread(primary.stop, "immediate")
        await refused(url)  # no primary yet: the standby is read-only
        await asyncio.to_thread(standby.promote)
        promoted_at = time.time()
        result = await load
        await recovered(url)  # the same process: no restart
        # The catalog refresh and the aggregator went on: both work on the new primary.
        added = server_cli("releases", "add", "v1.99.0", "--db", promoted)
        assert added.returncode == 0, added.stderr
        async with aiohttp.ClientSession() as session, asyncio.timeout(30):
            while (await post_report(session, url))["latest"]["latest_release"] != "v1.99.0":
                await asyncio.sleep(0.1)
            while await aggregated_at(promoted) < promoted_at:
                await asyncio.sleep(0.1)
        assert node.returncode is None
    finally:
        logs = await stop_node(node)
    stored = await stored_reports(promoted) - await probe_reports(promoted)
    assert result.statuses[503] > 0 and result.reports_ok > 500, result
    assert result.reports_ok <= stored <= result.sent, (result.reports_ok, stored, result.sent)
    one_line_warnings(logs)


async def test_a_node_leaves_a_primary_turned_read_only_for_the_promoted_standby(
    postgres_pair: Any,
) -> None:
    # A demoted primary still answers, read-only: the node's open connections to it cannot
    # write, so the pool makes them anew, and the host list leads them to the new primary.
    primary, standby, database = postgres_pair
    dsn = multi_host_dsn([primary, standby], database)  # read-write is the default
    node, url = await start_node(dsn, *BUSY)
    try:
        async with aiohttp.ClientSession() as session:
            await post_report(session, url)
        primary.psql("ALTER SYSTEM SET default_transaction_read_only = on")
        primary.psql("SELECT pg_reload_conf()")
        taken = await until_refused(url)  # replicated synchronously, like the first one
        await refused(url)  # the read-only primary is passed over, the standby not promoted
        await asyncio.to_thread(standby.promote)
        await recovered(url)
        assert node.returncode is None
    finally:
        logs = await stop_node(node)
    assert await probe_reports(standby.dsn(database)) == 1 + taken + 1
    one_line_warnings(logs)


async def test_a_read_only_database_answers_503_until_it_takes_writes_again(
    postgres_cluster: Any, postgres_dsn: str
) -> None:
    node, url = await start_node(postgres_dsn, *BUSY)
    try:
        async with aiohttp.ClientSession() as session:
            await post_report(session, url)
        postgres_cluster.psql("ALTER SYSTEM SET default_transaction_read_only = on")
        try:
            postgres_cluster.psql("SELECT pg_reload_conf()")
            await until_refused(url)
            await refused(url)  # and it stays so, connections made anew or not
        finally:
            postgres_cluster.psql("ALTER SYSTEM RESET default_transaction_read_only")
            postgres_cluster.psql("SELECT pg_reload_conf()")
        await recovered(url)
    finally:
        logs = await stop_node(node)
    assert "read-only transaction" in logs  # the warning names the cause
    one_line_warnings(logs)


@pytest.mark.parametrize("postgres_pair", [False, True], indirect=True, ids=["async", "sync"])
async def test_what_a_failover_to_a_standby_that_was_away_loses(postgres_pair: Any) -> None:
    # The standby stops; the node goes on; then the primary dies and the stale standby is
    # promoted. Asynchronous replication acknowledged reports the standby never received:
    # they are gone. Synchronous replication made each commit wait for the standby, so the
    # node answered 503 (after its command timeout) instead: nothing acknowledged is lost.
    primary, standby, database = postgres_pair
    synchronous = primary.psql("SHOW synchronous_standby_names") == "*"
    dsn = multi_host_dsn([primary, standby], database)
    node, url = await start_node(dsn, "--retry-after", "1", "--busy-timeout", "0.5")
    ids = [f"00000000-0000-4000-8000-{n:012d}" for n in range(5)]
    try:
        await asyncio.to_thread(standby.stop, "fast")
        async with aiohttp.ClientSession() as session:

            async def post(instance: str) -> int:
                async with session.post(
                    f"{url}/v1/version",
                    json=report_body(id=instance),
                    headers={"User-Agent": OPA_UA},
                ) as response:
                    assert response.status in (200, 503), await response.text()
                    return response.status

            statuses = await asyncio.gather(*(post(i) for i in ids))
        await asyncio.to_thread(primary.stop, "immediate")
        await asyncio.to_thread(standby.start)
        await asyncio.to_thread(standby.promote)
        await recovered(url)
    finally:
        await stop_node(node)
    acknowledged = statuses.count(200)
    stored = await stored_reports(standby.dsn(database)) - await probe_reports(
        standby.dsn(database)
    )
    if synchronous:
        assert acknowledged == 0 and stored == 0, (statuses, stored)
    else:
        assert acknowledged == len(ids) and stored == 0, (statuses, stored)  # all five lost


async def test_every_write_of_the_background_jobs_meets_a_read_only_database_as_unavailable(
    postgres_cluster: Any, postgres_dsn: str
) -> None:
    # What sync and retention write, as well as reports: StorageUnavailableError (a 503, one
    # log line), never the driver's own exception with a traceback in the job's log.
    settings = Settings(db=postgres_dsn, retention_days=1)
    await (await open_storage(settings, migrate=True)).close()
    database = postgres_dsn.rsplit("/", 1)[1]
    postgres_cluster.psql(f"ALTER DATABASE {database} SET default_transaction_read_only = on")
    storage = await open_storage(settings, migrate=False)
    try:
        writes: list[Callable[[], Awaitable[object]]] = [
            lambda: storage.set_meta(RETENTION_RUN_KEY, 1),
            lambda: storage.save_sync_state(SyncState("opa", "test")),
            lambda: storage.sync_releases("opa", [], prune=True),
            lambda: storage.remove_release("opa", "v1.0.0"),
            lambda: storage.write_batch([], ["opa"], now=0.0),
            lambda: purge_expired(settings),
        ]
        for write in writes:
            with pytest.raises(StorageUnavailableError, match="read-only transaction"):
                await write()
    finally:
        await storage.close()
