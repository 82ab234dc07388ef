"""Backups of a live database (every worker shard), restore, and upgrades."""

from __future__ import annotations

import asyncio
import json
import shutil
import signal
import sqlite3
import subprocess
import sys
from pathlib import Path

import aiohttp
import pytest

from opa_telemetry_server.cli import main
from opa_telemetry_server.storage.sqlite import backup_pairs, existing_shards, shard_path
from opa_telemetry_server.storage.sqlite.migrations import MIGRATIONS, SCHEMA_V1

from .conftest import OPA_UA, report_body, serve_argv, serving

ACKED_BEFORE_BACKUP = 300
MAX_REPORTS = 20_000  # per loader: the load stops when the backup is done, or here at the latest
LOADERS = 4


def server_cli(*argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "opa_telemetry_server", *argv],
        capture_output=True,
        text=True,
        timeout=120,
    )


def instance_ids(path: Path) -> set[str]:
    with sqlite3.connect(path) as conn:
        return {row[0] for row in conn.execute("SELECT instance_id FROM reports")}


def integrity(path: Path) -> list[tuple[str]]:
    with sqlite3.connect(path) as conn:
        return conn.execute("PRAGMA integrity_check").fetchall()


async def test_a_backup_under_load_holds_every_report_acknowledged_before_it(
    tmp_path: Path,
) -> None:
    db, dest = tmp_path / "live" / "telemetry.db", tmp_path / "backups" / "copy.db"
    db.parent.mkdir()
    dest.parent.mkdir()
    acked: list[str] = []
    enough, done = asyncio.Event(), asyncio.Event()

    async def load(loader: int) -> None:
        # A connection per report, as a fleet does: the kernel spreads them over both workers.
        connector = aiohttp.TCPConnector(force_close=True)
        async with aiohttp.ClientSession(connector=connector) as session:
            for n in range(MAX_REPORTS):
                if done.is_set():
                    return
                instance = f"{loader:08d}-0000-4000-8000-{n:012d}"
                async with session.post(
                    f"{url}/v1/version",
                    json=report_body(id=instance),
                    headers={"User-Agent": OPA_UA},
                ) as response:
                    if response.status == 200:
                        acked.append(instance)
                if len(acked) >= ACKED_BEFORE_BACKUP:
                    enough.set()

    with serving(serve_argv(db, "--workers", "2")) as (url, server):
        loaders = [asyncio.create_task(load(i)) for i in range(LOADERS)]
        await asyncio.wait_for(enough.wait(), 120)
        before = set(acked)
        backup = await asyncio.create_subprocess_exec(
            *(sys.executable, "-m", "opa_telemetry_server", "backup", "--db", str(db), str(dest)),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )
        output = (await asyncio.wait_for(backup.communicate(), 120))[0].decode()
        done.set()
        await asyncio.gather(*loaders)
        assert backup.returncode == 0, output
        server.send_signal(signal.SIGTERM)
        assert server.wait(60) == 0

    copies = [dest, shard_path(dest, 1)]
    assert [copy for _, copy in backup_pairs(db, dest)] == copies
    for copy in copies:
        assert f"wrote {copy} (" in output
        assert integrity(copy) == [("ok",)]
    backed_up = instance_ids(dest) | instance_ids(shard_path(dest, 1))
    assert before <= backed_up
    assert instance_ids(shard_path(dest, 1)) & before, "the shard's reports are in the backup"
    assert backed_up <= set(acked)  # and nothing that was never acknowledged

    # Restore, as the README says: the server is stopped; copy each file back, no old WAL.
    for live, copy in backup_pairs(db, dest):
        for sidecar in (live.with_name(live.name + "-wal"), live.with_name(live.name + "-shm")):
            sidecar.unlink(missing_ok=True)
        shutil.copyfile(copy, live)
    # --refresh: no server ran on the restored files, so their statistics aggregates are
    # brought up to date from the restored raw rows first.
    stats = server_cli("stats", "--db", str(db), "--json", "--refresh")
    assert stats.returncode == 0, stats.stderr
    assert json.loads(stats.stdout)["instances"]["latest_day"] == len(backed_up)
    with serving(serve_argv(db, "--workers", "2")) as (url, server):
        async with aiohttp.ClientSession() as session, session.get(f"{url}/readyz") as response:
            assert response.status == 200
        server.send_signal(signal.SIGTERM)
        assert server.wait(60) == 0
    assert instance_ids(db) | instance_ids(shard_path(db, 1)) == backed_up


def make_database(path: Path, shards: int = 0) -> None:
    """A database (and ``shards`` worker shards) as ``serve`` leaves them, without serving."""
    for worker in range(shards + 1):
        with sqlite3.connect(shard_path(path, worker), isolation_level=None) as conn:
            for number, statements in enumerate(MIGRATIONS, start=1):
                for statement in statements:
                    conn.execute(statement)
                conn.execute(f"PRAGMA user_version = {number}")
            conn.execute(
                "INSERT INTO reports (product, day, instance_id, first_seen_at, last_seen_at,"
                " report_count, version) VALUES ('opa', '2026-01-01', ?, 1, 2, 3, '1.5.1')",
                (f"instance-{worker}",),
            )


def test_backup_refuses_to_overwrite_unless_forced(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    db, dest = tmp_path / "t.db", tmp_path / "b.db"
    make_database(db, shards=1)
    assert main(["backup", "--db", str(db), str(dest)]) == 0
    assert instance_ids(shard_path(dest, 1)) == {"instance-1"}
    capsys.readouterr()

    assert main(["backup", "--db", str(db), str(dest)]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "already exist" in err and "--force" in err

    # A stale shard copy from a backup taken with more workers would mix into a restore.
    stale = shard_path(dest, 2)
    shutil.copyfile(shard_path(dest, 1), stale)
    shard_path(db, 1).unlink()
    assert main(["backup", "--db", str(db), str(dest)]) == 1
    assert str(stale) in capsys.readouterr().err
    assert main(["backup", "--db", str(db), str(dest), "--force"]) == 0
    out = capsys.readouterr().out
    assert f"wrote {dest} (" in out and "backup complete: 1 file." in out
    assert not stale.exists() and not shard_path(dest, 1).exists()
    assert instance_ids(dest) == {"instance-0"}
    assert not list(tmp_path.glob(".*partial"))

    # A folder as DEST: the copy takes the database's name in it.
    folder = tmp_path / "backups"
    folder.mkdir()
    assert main(["backup", "--db", str(db), str(folder)]) == 0
    assert f"wrote {folder / 't.db'} (" in capsys.readouterr().out
    assert instance_ids(folder / "t.db") == {"instance-0"}


def test_backup_neither_creates_nor_migrates_nor_overwrites_the_database(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    absent = tmp_path / "absent.db"
    assert main(["backup", "--db", str(absent), str(tmp_path / "b.db")]) == 1
    assert "no such database" in capsys.readouterr().err
    assert not absent.exists() and not (tmp_path / "b.db").exists()

    db = tmp_path / "t.db"
    make_database(db)
    for dest in (db, tmp_path / "." / "t.db"):
        assert main(["backup", "--db", str(db), str(dest), "--force"]) == 1
        assert "is the database itself" in capsys.readouterr().err
    assert main(["backup", "--db", str(db), str(tmp_path / "missing" / "b.db")]) == 1
    assert "does not exist" in capsys.readouterr().err
    with sqlite3.connect(db) as conn:
        conn.execute("PRAGMA user_version = 1")
    assert main(["backup", "--db", str(db), str(tmp_path / "b.db")]) == 1
    assert "older than this version's" in capsys.readouterr().err
    assert instance_ids(db) == {"instance-0"} and existing_shards(tmp_path / "b.db") == []


# -- upgrades ----------------------------------------------------------------------------------


def test_serve_applies_the_schema_steps_a_database_lacks(tmp_path: Path) -> None:
    db = tmp_path / "v1.db"
    with sqlite3.connect(db, isolation_level=None) as conn:
        for statement in SCHEMA_V1:
            conn.execute(statement)
        conn.execute("PRAGMA user_version = 1")
        conn.execute(
            "INSERT INTO reports (product, day, instance_id, first_seen_at, last_seen_at,"
            " report_count, version) VALUES ('opa', '2026-01-01', 'old', 1, 2, 3, '1.5.1')"
        )
    # Retention off: the row's day is older than the default 90 days it keeps.
    with serving(serve_argv(db, "--retention-days", "0")) as (_, server):
        server.send_signal(signal.SIGTERM)
        assert server.wait(60) == 0
    with sqlite3.connect(db) as conn:
        assert conn.execute("PRAGMA user_version").fetchone() == (len(MIGRATIONS),)
        assert conn.execute("SELECT instance_id, report_count FROM reports").fetchall() == [
            ("old", 3)
        ]


def test_serve_refuses_a_database_from_a_newer_version(tmp_path: Path) -> None:
    db = tmp_path / "new.db"
    make_database(db)
    with sqlite3.connect(db) as conn:
        conn.execute(f"PRAGMA user_version = {len(MIGRATIONS) + 1}")
        conn.execute("PRAGMA journal_mode = DELETE")  # a newer version's choice, say
    result = server_cli("serve", "--db", str(db), "--port", "0")
    assert result.returncode == 1
    assert result.stderr.count("\n") == 1 and result.stderr.startswith("error: "), result.stderr
    assert "newer than this version's" in result.stderr and "upgrade" in result.stderr
    with sqlite3.connect(db) as conn:
        assert conn.execute("PRAGMA user_version").fetchone() == (len(MIGRATIONS) + 1,)
        assert conn.execute("PRAGMA journal_mode").fetchone() == ("delete",)  # left as it was
    assert instance_ids(db) == {"instance-0"}
