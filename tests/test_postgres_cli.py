"""Every ``opa-telemetry-server`` command on a PostgreSQL URL, as on a SQLite file, and the
settings that only PostgreSQL reads.

The commands run in-process through ``main`` against a fresh database on the session's private
cluster; ``serve``'s own migration creates the schema first, as a first node would.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import pytest

from opa_telemetry_server.cli import main
from opa_telemetry_server.services.retention import purge_expired
from opa_telemetry_server.settings import Settings
from opa_telemetry_server.storage import SyncState, open_storage

from .conftest import INSTANCE_ID
from .pgcluster import PASSWORD
from .test_storage_contract import report

ADVISORIES = Path(__file__).resolve().parents[1] / "server" / "data" / "opa-advisories.osv.json"


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture
def db(postgres_dsn: str) -> list[str]:
    async def create_schema() -> None:
        await (await open_storage(Settings(db=postgres_dsn), migrate=True)).close()

    asyncio.run(create_schema())
    return ["--db", postgres_dsn]


def test_the_catalog_commands(db: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    app = ["--product", "myapp"]
    notes = ["--notes", "https://example.com/myapp/v2.0.0"]
    asset = ["--asset", "https://example.com/dl/myapp_linux_amd64.tar.gz"]
    for tag in ("v1.0.0", "v2.0.0"):
        code, out, err = run(capsys, "releases", "add", tag, *app, *notes, *asset, *db)
        assert (code, out, err) == (0, f"added myapp {tag}\n", "")
    assert run(capsys, "releases", "latest", *app, *db)[:2] == (0, "v2.0.0\n")
    assert run(capsys, "releases", "pin", "v1.0.0", *app, *db)[0] == 0
    assert run(capsys, "releases", "latest", *app, *db)[1] == "v1.0.0\n"
    assert run(capsys, "releases", "unpin", *app, *db)[0] == 0
    assert run(capsys, "releases", "yank", "v2.0.0", "--reason", "broken", *app, *db)[0] == 0
    assert run(capsys, "releases", "latest", *app, *db)[1] == "v1.0.0\n"
    assert run(capsys, "releases", "rollout", "v1.0.0", "50", *app, *db)[0] == 0
    assert run(capsys, "releases", "support", "--min-version", "1.0.0", *app, *db)[0] == 0
    code, out, _ = run(capsys, "releases", "list", *app, *db)
    assert code == 0 and "v2.0.0" in out and "(yanked)" in out and "rollout 50%" in out
    code, out, _ = run(capsys, "releases", "status", *app, *db)
    assert "yanked:       v2.0.0 (broken)" in out and "min version:  1.0.0" in out
    assert run(capsys, "releases", "remove", "v2.0.0", *app, *db)[1] == "removed myapp v2.0.0\n"

    code, out, _ = run(capsys, "advisories", "import", str(ADVISORIES), *db)
    assert code == 0 and out.startswith("opa: ")
    code, out, _ = run(capsys, "advisories", "list", "--json", *db)
    records = json.loads(out)
    assert records and all("id" in r for r in records)
    removed = records[0]["id"]
    assert run(capsys, "advisories", "remove", removed, *db)[0] == 0
    code, _, err = run(capsys, "advisories", "remove", removed, *db)
    assert code == 1 and err == f"error: advisory {removed} of opa is not stored\n"


def test_the_data_commands(
    db: list[str], capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    code, out, _ = run(capsys, "stats", "--refresh", "--json", "--days", "7", *db)
    assert code == 0 and json.loads(out)["days"] == 7
    code, out, _ = run(capsys, "products", *db)
    assert code == 0 and out.startswith("PRODUCT")
    code, out, _ = run(capsys, "purge", "--dry-run", "--retention-days", "30", *db)
    assert code == 0 and out.startswith("nothing to purge")

    code, out, err = run(capsys, "backup", str(tmp_path / "copy"), *db)
    assert code == 1 and out == "" and "pg_dump" in err and err.count("\n") == 1
    assert PASSWORD not in err
    assert not (tmp_path / "copy").exists()


async def test_a_pool_opens_at_most_db_pool_size_connections(
    postgres_cluster: Any, postgres_dsn: str
) -> None:
    database = postgres_dsn.rsplit("/", 1)[1]
    storage = await open_storage(Settings(db=postgres_dsn, db_pool_size=2), migrate=True)
    try:
        await asyncio.gather(*(storage.products("2026-12-01") for _ in range(20)))
        connections = postgres_cluster.psql(
            "SELECT count(*) FROM pg_stat_activity"  # noqa: S608 - a name we made
            f" WHERE datname = '{database}' AND application_name = 'opa-telemetry'"
        )
        assert int(connections) == 2
    finally:
        await storage.close()


async def test_the_smallest_pool_holds_a_job_lock_and_writes_beside_it(postgres_dsn: str) -> None:
    # Sync holds its advisory lock's connection while it writes through another, and
    # retention its lock's while it aggregates: a pool of one would wait for itself forever.
    with pytest.raises(ValueError, match="db_pool_size must be at least 2"):
        Settings(db=postgres_dsn, db_pool_size=1)
    settings = Settings(db=postgres_dsn, db_pool_size=2, retention_days=1)
    storage = await open_storage(settings, migrate=True)
    try:
        await storage.write_batch([report(INSTANCE_ID)], [], now=86_400.0)  # 1970-01-02
        async with asyncio.timeout(60):  # a hang guard
            async with storage.exclusive("sync:opa") as mine:
                assert mine
                await storage.save_sync_state(SyncState("opa", "test"))
            purged = await purge_expired(settings)
    finally:
        await storage.close()
    assert (purged.days, purged.rows_deleted) == (1, 1)
