"""The server CLI as a first-week operator meets it: one path from env to every subcommand's
settings, nothing deleted that a setting says to keep, and every failure one readable line."""

from __future__ import annotations

import asyncio
import os
import socket
import sqlite3
import subprocess
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from opa_telemetry_server import errors
from opa_telemetry_server.domain.releases import bundled_releases
from opa_telemetry_server.services.retention import purge_expired
from opa_telemetry_server.storage.sqlite import SqliteStorage

from .conftest import INSTANCE_ID, make_settings

SERVER = [sys.executable, "-m", "opa_telemetry_server"]


def make_db(path: Path) -> Path:
    async def create() -> None:
        storage = await SqliteStorage.open(path)
        await storage.seed_catalog("opa", bundled_releases())
        await storage.close()

    asyncio.run(create())
    return path


def add_raw_rows(db: Path, days_ago: int, count: int) -> None:
    day = (datetime.now(UTC).date() - timedelta(days=days_ago)).isoformat()
    with sqlite3.connect(db) as conn:
        conn.executemany(
            "INSERT INTO reports (product, day, instance_id, first_seen_at, last_seen_at,"
            " report_count, version) VALUES ('opa', ?, ?, 0, 0, 1, '1.5.1')",
            [(day, f"{INSTANCE_ID[:-4]}{n:04d}") for n in range(count)],
        )


def raw_rows(db: Path) -> int:
    with sqlite3.connect(db) as conn:
        (count,) = conn.execute("SELECT count(*) FROM reports").fetchone()
    return int(count)


def run_server_cli(
    *argv: str, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*SERVER, *argv],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, **(env or {})},
    )


def assert_one_line_error(result: subprocess.CompletedProcess[str], code: int, *words: str) -> None:
    assert result.returncode == code, result.stderr
    assert len(result.stderr.splitlines()) == 1, result.stderr
    assert result.stderr.startswith("error: ") and "Traceback" not in result.stderr
    for word in words:
        assert word in result.stderr


# -- 1. a documented setting never deletes data -----------------------------------------------


def test_purge_with_retention_zero_from_the_env_deletes_nothing_and_says_so(
    tmp_path: Path,
) -> None:
    db = make_db(tmp_path / "t.db")
    add_raw_rows(db, days_ago=40, count=3)
    add_raw_rows(db, days_ago=1, count=2)
    result = run_server_cli(
        "purge", "--db", str(db), env={"OPA_TELEMETRY_SERVER_RETENTION_DAYS": "0"}
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout == "retention_days is 0 (keep forever): nothing to purge\n"
    assert raw_rows(db) == 5


def test_the_purge_function_itself_keeps_everything_at_retention_zero(tmp_path: Path) -> None:
    # The server's own retention job goes through the same function as the CLI.
    db = make_db(tmp_path / "telemetry.db")
    add_raw_rows(db, days_ago=400, count=2)
    result = asyncio.run(purge_expired(make_settings(tmp_path, retention_days=0)))
    assert (result.days, result.rows_deleted, raw_rows(db)) == (0, 0, 2)


def test_purge_reads_its_retention_from_the_env_and_announces_before_deleting(
    tmp_path: Path,
) -> None:
    db = make_db(tmp_path / "t.db")
    add_raw_rows(db, days_ago=40, count=3)
    add_raw_rows(db, days_ago=1, count=2)
    env = {"OPA_TELEMETRY_SERVER_RETENTION_DAYS": "30", "OPA_TELEMETRY_SERVER_DB": str(db)}
    dry = run_server_cli("purge", "--dry-run", env=env)
    assert dry.returncode == 0 and dry.stdout.startswith("would roll up 1 days before ")
    assert raw_rows(db) == 5
    real = run_server_cli("purge", env=env)
    lines = real.stdout.splitlines()
    assert real.returncode == 0 and lines[0].startswith("rolling up 1 days before ")
    assert "delete their 3 raw rows (retention 30 days)" in lines[0]
    assert lines[1:] == ["1 days rolled up, 3 raw rows deleted"]
    assert raw_rows(db) == 2
    again = run_server_cli("purge", env=env)
    assert again.stdout.startswith("nothing to purge: no raw rows before ")


def test_a_bad_env_var_breaks_only_the_commands_that_read_it(tmp_path: Path) -> None:
    db = make_db(tmp_path / "t.db")
    env = {"OPA_TELEMETRY_SERVER_PORT": "not-a-port", "OPA_TELEMETRY_SERVER_RATE_BURST": "x"}
    listed = run_server_cli("releases", "latest", "--db", str(db), env=env)
    assert (listed.returncode, listed.stdout, listed.stderr) == (0, "v1.20.2\n", "")
    served = run_server_cli("serve", "--db", str(db), env=env)
    assert_one_line_error(
        served, 2, "OPA_TELEMETRY_SERVER_PORT='not-a-port': expected a whole number",
        "OPA_TELEMETRY_SERVER_RATE_BURST='x'",
    )  # fmt: skip
    bad_days = run_server_cli(
        "purge", "--db", str(db), env={"OPA_TELEMETRY_SERVER_RETENTION_DAYS": "ninety"}
    )
    assert_one_line_error(bad_days, 2, "OPA_TELEMETRY_SERVER_RETENTION_DAYS='ninety'")


def test_the_db_env_var_reaches_every_subcommand(tmp_path: Path) -> None:
    db = make_db(tmp_path / "from-env.db")
    env = {"OPA_TELEMETRY_SERVER_DB": str(db)}
    for argv in (["releases", "latest"], ["stats", "--json"], ["purge", "--dry-run"]):
        result = run_server_cli(*argv, env=env)
        assert result.returncode == 0, (argv, result.stderr)


# -- 4. errors a person can act on ---------------------------------------------------------


def test_serve_explains_a_database_path_it_cannot_use_in_one_line(tmp_path: Path) -> None:
    missing = tmp_path / "no" / "such" / "dir" / "db.sqlite"
    assert_one_line_error(
        run_server_cli("serve", "--port", "0", "--db", str(missing)),
        1, f"the directory {missing.parent} does not exist",
    )  # fmt: skip
    assert_one_line_error(
        run_server_cli("serve", "--port", "0", "--db", str(tmp_path)), 1, "is a directory"
    )
    junk = tmp_path / "junk.db"
    junk.write_text("this is not a database, it is a note\n" * 200)
    assert_one_line_error(
        run_server_cli("serve", "--port", "0", "--db", str(junk)), 1, "file is not a database"
    )


def test_serve_explains_an_unwritable_directory() -> None:
    # /proc/1 refuses new files to every user, root included (as the CI runs).
    result = run_server_cli("serve", "--port", "0", "--db", "/proc/1/opa-telemetry.db")
    assert_one_line_error(result, 1, "cannot create the database")


def test_stats_and_releases_never_migrate_or_create_a_database(tmp_path: Path) -> None:
    foreign = tmp_path / "someone-elses.db"
    with sqlite3.connect(foreign) as conn:
        conn.execute("CREATE TABLE notes (body TEXT)")
    for argv in (["stats"], ["stats", "--daily"], ["releases", "list"], ["purge"]):
        result = run_server_cli(*argv, "--db", str(foreign))
        assert_one_line_error(result, 1, "is not an opa-telemetry database")
    with sqlite3.connect(foreign) as conn:
        tables = conn.execute("SELECT name FROM sqlite_master").fetchall()
        assert (tables, conn.execute("PRAGMA user_version").fetchone()) == ([("notes",)], (0,))
    absent = tmp_path / "absent.db"
    assert_one_line_error(run_server_cli("stats", "--db", str(absent)), 1, "no such database")
    assert not absent.exists()


def test_an_older_schema_is_upgraded_only_by_serve(tmp_path: Path) -> None:
    db = make_db(tmp_path / "t.db")
    with sqlite3.connect(db) as conn:
        conn.execute("PRAGMA user_version = 1")
    result = run_server_cli("releases", "list", "--db", str(db))
    assert_one_line_error(result, 1, "older than this version's", "start the server once")


def test_usage_errors_read_naturally_on_one_line() -> None:
    for argv, words in (
        (["stats", "--days", "x"], "--days: expected a positive whole number, not 'x'"),
        (["stats", "--days", "0"], "--days: expected a positive whole number, not '0'"),
        (["serve", "--port", "eighty"], "--port: expected a whole number, not 'eighty'"),
        (["serve", "--rate-limit", "fast"], "--rate-limit: expected a number, not 'fast'"),
        (["serve", "--workers", "99"], "workers must be 1-8"),
    ):
        result = run_server_cli(*argv)
        assert_one_line_error(result, 2, words)
        assert "invalid" not in result.stderr and "_positive_int" not in result.stderr


def test_releases_list_into_a_pipe_that_closes_early_exits_quietly(tmp_path: Path) -> None:
    db = make_db(tmp_path / "t.db")
    command = f"{sys.executable} -m opa_telemetry_server releases list --db {db} | head -n 1"
    result = subprocess.run(
        ["bash", "-o", "pipefail", "-c", command], capture_output=True, text=True, timeout=60
    )
    assert (result.returncode, result.stderr) == (0, "")
    assert result.stdout.startswith("TAG")


def test_debug_adds_the_traceback(tmp_path: Path) -> None:
    junk = tmp_path / "junk.db"
    junk.write_text("not sqlite\n" * 100)
    quiet = run_server_cli("releases", "list", "--db", str(junk))
    loud = run_server_cli("--debug", "releases", "list", "--db", str(junk))
    assert_one_line_error(quiet, 1, "file is not a database")
    assert loud.returncode == 1 and "Traceback" in loud.stderr
    assert loud.stderr.splitlines()[-1] == quiet.stderr.strip()


def test_the_server_errors_form_the_documented_tree() -> None:
    tree = {
        errors.RequestError: errors.TelemetryError,
        errors.ReportError: errors.RequestError,
        errors.QueryError: errors.RequestError,
        errors.UnauthorizedError: errors.RequestError,
        errors.ForbiddenError: errors.RequestError,
        errors.NotFoundError: errors.RequestError,
        errors.SlowRequestError: errors.RequestError,
        errors.UnsupportedMediaTypeError: errors.RequestError,
        errors.RateLimitedError: errors.RequestError,
        errors.BodyTooLargeError: errors.RequestError,
        errors.UnavailableError: errors.TelemetryError,
        errors.OverloadedError: errors.UnavailableError,
        errors.ShuttingDownError: errors.UnavailableError,
        errors.StorageUnavailableError: errors.UnavailableError,
        errors.BackupError: errors.TelemetryError,
        errors.CatalogError: errors.TelemetryError,
        errors.SyncError: errors.TelemetryError,
        errors.SchemaError: errors.TelemetryError,
        errors.TlsError: errors.TelemetryError,
        errors.UsageError: errors.TelemetryError,
    }
    for error, parent in tree.items():
        assert error.__bases__ == (parent,), error
        assert error.__name__ in (errors.__doc__ or ""), f"{error.__name__} is not drawn"
    defined = {
        value
        for value in vars(errors).values()
        if isinstance(value, type) and issubclass(value, errors.TelemetryError)
    }
    assert defined == {*tree, errors.TelemetryError}, "an error is missing from the tree"


@pytest.mark.parametrize("workers", ["1", "2"])
def test_a_port_in_use_is_one_line_from_serve_and_from_its_workers(
    tmp_path: Path, workers: str
) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = str(taken.getsockname()[1])
        result = run_server_cli(
            "serve", "--port", port, "--db", str(tmp_path / "t.db"), "--workers", workers,
            "--log-level", "warning",
        )  # fmt: skip
    assert_one_line_error(result, 1, "address already in use")
