"""Several server processes on one port: each commits to its own shard, statistics read all."""

from __future__ import annotations

import asyncio
import json
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from opa_telemetry.loadtest import LoadConfig, parse_target, run_load
from opa_telemetry_server.cli import main
from opa_telemetry_server.domain.protocol import Report
from opa_telemetry_server.domain.versions import parse_version
from opa_telemetry_server.storage.sqlite import SqliteStorage, existing_shards, shard_path
from opa_telemetry_server.web.app import create_app

from .conftest import INSTANCE_ID, AiohttpClient, make_settings, report_body, serve_argv, serving

DAY = 1_790_000_000.0  # 2026-09-21 UTC


def test_shard_paths_sit_beside_the_database(tmp_path: Path) -> None:
    db = tmp_path / "telemetry.db"
    assert shard_path(db, 0) == db
    assert shard_path(db, 3) == tmp_path / "telemetry.worker3.db"
    for name in (
        "telemetry.worker1.db",
        "telemetry.worker2.db",
        "telemetry.worker1.db-wal",
        "telemetry.db",
        "other.worker1.db",
    ):
        (tmp_path / name).touch()
    assert [p.name for p in existing_shards(db)] == ["telemetry.worker1.db", "telemetry.worker2.db"]


async def test_stats_read_the_main_database_and_every_shard(tmp_path: Path) -> None:
    main_db, shard = tmp_path / "t.db", shard_path(tmp_path / "t.db", 1)
    storages = [await SqliteStorage.open(main_db), await SqliteStorage.open(shard)]
    other = "00000000-0000-4000-8000-000000000001"

    def report(instance: str, version: str) -> Report:
        return Report("opa", instance, parse_version(version), "linux", "amd64", None, None)

    try:
        # The same instance reached both workers (two connections): one instance, three reports.
        await storages[0].write_batch([report(INSTANCE_ID, "1.5.1")], ["opa"], DAY)
        await storages[1].write_batch([report(INSTANCE_ID, "1.5.1")] * 2, ["opa"], DAY)
        await storages[1].write_batch([report(other, "1.6.0")], [], DAY)
        await storages[0].aggregate(now=DAY)
        stats = await storages[0].window("opa", "2026-09-21", "2026-09-21")
        await storages[0].set_meta("stats_watermark", 0)
        await storages[0].aggregate(now=DAY)  # re-read whole: every shard, every time
        again = await storages[0].window("opa", "2026-09-21", "2026-09-21")
    finally:
        for storage in storages:
            await storage.close()
    assert stats.days == [("2026-09-21", 2, 4, 2)]
    assert sorted(stats.versions) == [("2026-09-21", "1.5.1", 1, 3), ("2026-09-21", "1.6.0", 1, 1)]
    assert again.days == stats.days


async def test_worker_commits_to_its_shard_and_reads_the_main_catalog(
    aiohttp_client: AiohttpClient, tmp_path: Path
) -> None:
    settings = make_settings(tmp_path)
    first = await aiohttp_client(create_app(settings, worker=0))  # seeds the main catalog
    second = await aiohttp_client(create_app(settings, worker=1))
    response = await second.post(
        "/v1/version",
        json=report_body(),
        headers={"User-Agent": "Open Policy Agent/1.5.1 (linux, amd64)"},
    )
    assert (await response.json())["latest"]["latest_release"] == "v1.20.2"
    await first.close()
    await second.close()
    stats = await _stats(settings.db)
    assert (stats["instances"], stats["reports"]) == (1, 1)
    assert shard_path(settings.db, 1).exists()


async def _stats(db: str) -> dict[str, object]:
    storage = await SqliteStorage.open(db)
    try:
        await storage.aggregate()
        window = await storage.window("opa", "2000-01-01", "2999-12-31")
    finally:
        await storage.close()
    return {"instances": sum(d[1] for d in window.days), "reports": sum(d[2] for d in window.days)}


@pytest.fixture
def two_workers(tmp_path: Path) -> Iterator[tuple[str, subprocess.Popen[str], Path]]:
    db = tmp_path / "w.db"
    with serving(serve_argv(db, "--workers", "2")) as (url, process):
        yield url, process, db


def worker_pids(pid: int) -> list[int]:
    """The supervisor's worker processes (not multiprocessing's resource tracker)."""
    text = Path(f"/proc/{pid}/task/{pid}/children").read_text()
    return [
        int(child)
        for child in text.split()
        if b"spawn_main" in Path(f"/proc/{child}/cmdline").read_bytes()
    ]


async def test_two_workers_share_the_port_and_store_every_acknowledged_report(
    two_workers: tuple[str, subprocess.Popen[str], Path], capsys: pytest.CaptureFixture[str]
) -> None:
    url, process, db = two_workers
    config = LoadConfig(parse_target(url), concurrency=16, requests=800, duration=None, seed=5)
    result = await run_load(config)
    assert result.summary()["statuses"] == {"200": 800}
    process.send_signal(signal.SIGTERM)
    assert await asyncio.to_thread(process.wait, 30) == 0
    assert existing_shards(db) == [shard_path(db, 1)]
    assert await asyncio.to_thread(main, ["stats", "--db", str(db), "--json", "--days", "1"]) == 0
    stats = json.loads(capsys.readouterr().out)
    assert stats["reports"] == result.reports_ok == 800


def test_a_crashed_worker_stops_the_server_with_an_error(
    two_workers: tuple[str, subprocess.Popen[str], Path],
) -> None:
    _, process, _ = two_workers
    workers = worker_pids(process.pid)
    assert len(workers) == 2
    subprocess.run(["kill", "-KILL", str(workers[0])], check=True)
    assert process.wait(30) == 1
    assert all_gone(workers, within=10)  # the other worker is stopped too


def alive(pid: int) -> bool:
    """Whether ``pid`` runs (a zombie, or no process at all, does not)."""
    try:
        return "zombie" not in Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return False


def all_gone(pids: list[int], within: float) -> bool:
    """Wait (bounded) until none of ``pids`` runs; whether that happened in time."""
    deadline = time.monotonic() + within
    while time.monotonic() < deadline and any(alive(pid) for pid in pids):
        time.sleep(0.05)
    return not any(alive(pid) for pid in pids)


def test_workers_of_a_killed_supervisor_stop_by_themselves(
    two_workers: tuple[str, subprocess.Popen[str], Path],
) -> None:
    # SIGKILL leaves the supervisor no chance to stop its workers: they notice and drain.
    _, process, _ = two_workers
    workers = worker_pids(process.pid)
    assert len(workers) == 2
    environ = Path(f"/proc/{workers[0]}/environ").read_bytes().split(b"\0")
    [metrics] = [v.split(b"=", 1)[1] for v in environ if v.startswith(b"PROMETHEUS_MULTIPROC_DIR=")]
    assert Path(metrics.decode()).is_dir()
    process.kill()
    process.wait(30)
    assert all_gone(workers, within=30)  # each worker checks once a second
    assert not Path(metrics.decode()).exists()  # nor do they leave their metrics files behind


def test_workers_setting_is_bounded(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["serve", "--workers", "9"]) == 2
    assert "workers must be 1-8" in capsys.readouterr().err


async def test_stdlib_json_path_answers_like_orjson(
    aiohttp_client: AiohttpClient, tmp_path: Path
) -> None:
    answers = []
    for fast in (False, True):
        (tmp_path / str(fast)).mkdir()
        client = await aiohttp_client(create_app(make_settings(tmp_path / str(fast), fast=fast)))
        response = await client.post(
            "/v1/version",
            json=report_body(),
            headers={"User-Agent": "Open Policy Agent/1.5.1 (linux, amd64)"},
        )
        answers.append(await response.json())
        bad = await client.post(
            "/v1/version", data=b"{nope", headers={"Content-Type": "application/json"}
        )
        assert bad.status == 400
    assert answers[0] == answers[1]


async def test_a_shard_still_being_created_is_left_out_of_reads(tmp_path: Path) -> None:
    # Worker 0's first retention run can come before worker N has migrated its shard file.
    db = tmp_path / "t.db"
    storage = await SqliteStorage.open(db)
    try:
        shard_path(db, 1).touch()  # created, not migrated: what a starting worker leaves
        result = await storage.roll_up_and_purge("2026-01-01")
        aggregated = await storage.aggregate()
        assert (result.days, aggregated.days, aggregated.instances) == (0, 0, 0)
    finally:
        await storage.close()


async def test_a_shard_left_attached_by_a_cancelled_run_does_not_stop_the_next(
    tmp_path: Path,
) -> None:
    db = tmp_path / "t.db"
    storage = await SqliteStorage.open(db)
    shard = await SqliteStorage.open(shard_path(db, 1))
    await shard.close()
    try:
        # What a run cancelled between its ATTACH and its DETACH leaves behind.
        await storage._conn.execute("ATTACH DATABASE ? AS shard1", (str(shard_path(db, 1)),))
        assert (await storage.aggregate()).days == 0
        assert (await storage.roll_up_and_purge("2026-01-01")).days == 0
    finally:
        await storage.close()
