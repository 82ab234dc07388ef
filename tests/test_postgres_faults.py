"""Every storage call on a PostgreSQL server that has gone away raises
:class:`StorageUnavailableError` (one line: what failed and why), never asyncpg's or the
socket's own exception: the web layer turns it into a 503 with ``Retry-After`` and the
background jobs (catalog refresh, aggregator, retention, sync) into one warning line.

A cluster of the test's own is stopped at once under an open storage; then each call of the
``Storage`` protocol is made in turn.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest

from opa_telemetry_server.domain.protocol import Report
from opa_telemetry_server.domain.versions import parse_version
from opa_telemetry_server.errors import StorageUnavailableError
from opa_telemetry_server.settings import Settings
from opa_telemetry_server.storage import Storage, SyncState, open_storage

from .pgcluster import PASSWORD, running_cluster, unavailable_reason

DAY = "2026-12-01"
INSTANCE = "a72dc36a-72db-458d-9208-9be4189e4ab7"


@pytest.fixture
async def orphaned_storage(postgres_cluster: Any) -> AsyncIterator[Storage]:
    """An open storage whose server has just stopped (``postgres_cluster`` only requires, or
    skips for want of, PostgreSQL; this test stops a cluster of its own)."""
    assert unavailable_reason() is None
    with running_cluster() as cluster:
        storage = await open_storage(Settings(db=cluster.create_database()), migrate=True)
        try:
            await storage.products(DAY)  # a connection in the pool, now open
            cluster.stop("immediate")
            yield storage
        finally:
            await storage.close()


CALLS: dict[str, Callable[[Storage], Awaitable[Any]]] = {
    "ping": lambda s: s.ping(),
    "write_batch": lambda s: s.write_batch(
        [Report("opa", INSTANCE, parse_version("1.5.1"), "linux", "amd64", 1, None)], [], 0.0
    ),
    "catalog_generation": lambda s: s.catalog_generation(),
    "load_catalog_parts": lambda s: s.load_catalog_parts(),
    "seed_catalog": lambda s: s.seed_catalog("opa", []),
    "remove_release": lambda s: s.remove_release("opa", "v1.0.0"),
    "set_product_policy": lambda s: s.set_product_policy("opa", pinned_tag=None),
    "remove_advisory": lambda s: s.remove_advisory("opa", "GHSA-x"),
    "sync_state": lambda s: s.sync_state("opa"),
    "sync_states": lambda s: s.sync_states(),
    "save_sync_state": lambda s: s.save_sync_state(SyncState("opa", "https://x")),
    "aggregate": lambda s: s.aggregate(),
    "window": lambda s: s.window("opa", DAY, DAY),
    "products": lambda s: s.products(DAY),
    "release_counts": lambda s: s.release_counts(),
    "day_version_counts": lambda s: s.day_version_counts(DAY),
    "meta": lambda s: s.meta("retention_run"),
    "set_meta": lambda s: s.set_meta("retention_run", 1),
    "count_expired": lambda s: s.count_expired(DAY),
    "roll_up_and_purge": lambda s: s.roll_up_and_purge(DAY),
}


async def test_every_call_on_a_vanished_server_is_storage_unavailable(
    orphaned_storage: Storage,
) -> None:
    for name, call in CALLS.items():
        with pytest.raises(StorageUnavailableError) as raised:
            await call(orphaned_storage)
        message = str(raised.value)
        assert "\n" not in message and PASSWORD not in message, (name, message)
    with pytest.raises(StorageUnavailableError):
        async with orphaned_storage.exclusive("sync:opa"):
            pass
