"""Both CLIs end to end: the server CLI's commands, a served process, and ``make run``."""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import socket
import sqlite3
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from opa_telemetry.cli import main as client_main
from opa_telemetry_server.cli import build_parser, main
from opa_telemetry_server.cli.arguments import settings_from_args
from opa_telemetry_server.domain.releases import bundled_releases
from opa_telemetry_server.storage.sqlite import SqliteStorage

from .conftest import RECORDED_REQUEST, REPO, ready_url, serve_argv, serving


def make_db(path: Path, seed: bool = True) -> str:
    async def create() -> None:
        storage = await SqliteStorage.open(path)
        if seed:
            await storage.seed_catalog("opa", bundled_releases())
        await storage.close()

    asyncio.run(create())
    return str(path)


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_releases_list_latest_add_remove(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    db = make_db(tmp_path / "t.db")
    code, out, _ = run(capsys, "releases", "latest", "--db", db)
    assert (code, out) == (0, "v1.20.2\n")
    code, out, _ = run(capsys, "releases", "list", "--db", db)
    assert code == 0 and out.splitlines()[1].startswith("v1.20.2") and "139 releases" in out
    code, out, _ = run(
        capsys,
        "releases",
        "add",
        "v1.21.0",
        "--db",
        db,
        "--asset",
        "opa_linux_amd64",
        "--published",
        "2026-11-01",
    )
    assert code == 0
    code, out, _ = run(capsys, "releases", "latest", "--db", db, "--json")
    assert json.loads(out) == {
        "tag": "v1.21.0",
        "published": "2026-11-01",
        "assets": ["opa_linux_amd64"],
        "release_notes": "https://github.com/open-policy-agent/opa/releases/tag/v1.21.0",
        "prerelease": False,
    }
    code, _, err = run(capsys, "releases", "add", "v1.21.0", "--db", db)
    assert code == 1 and "already in the catalog" in err
    code, _, _ = run(capsys, "releases", "add", "v1.22.0-rc.1", "--db", db)
    code, out, _ = run(capsys, "releases", "latest", "--db", db)
    assert out == "v1.21.0\n"  # a pre-release is never offered as latest
    assert run(capsys, "releases", "remove", "v1.21.0", "--db", db)[0] == 0
    code, _, err = run(capsys, "releases", "remove", "v1.21.0", "--db", db)
    assert code == 1 and "not in the catalog" in err


def test_releases_import_and_bad_files(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    db = make_db(tmp_path / "t.db", seed=False)
    source = tmp_path / "mine.json"
    source.write_text(
        json.dumps(
            [
                {
                    "tag": "2.0.0",
                    "release_notes": "https://dl.example/notes/2.0.0",
                    "assets": ["https://dl.example/app-2.0.0_linux_amd64.tar.gz"],
                },
                {"tag": "1.0.0", "release_notes": "https://dl.example/notes/1.0.0"},
            ]
        )
    )
    code, out, _ = run(capsys, "releases", "import", str(source), "--db", db, "--product", "myapp")
    assert (code, out) == (0, "myapp: 2 added, 0 replaced, 2 read\n")
    assert run(capsys, "releases", "latest", "--db", db, "--product", "myapp")[1] == "2.0.0\n"
    source.write_text('[{"tag": "not-a-version"}]')
    code, _, err = run(capsys, "releases", "import", str(source), "--db", db)
    assert code == 1 and "not a version" in err
    code, _, err = run(capsys, "releases", "list", "--db", str(tmp_path / "missing.db"))
    assert code == 1 and "no such database" in err


def test_stats_table_and_json(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    db = make_db(tmp_path / "t.db")
    with sqlite3.connect(db) as conn:
        today = time.strftime("%Y-%m-%d", time.gmtime())
        conn.execute(
            "INSERT INTO reports (product, day, instance_id, first_seen_at, last_seen_at,"
            " report_count, version, os, arch) VALUES ('opa', ?, 'id-1', 0, 0, 3, '1.5.1',"
            " 'linux', 'amd64')",
            (today,),
        )
    code, out, _ = run(capsys, "stats", "--db", db, "--json")
    assert (code, json.loads(out)["reports"]) == (0, 0)  # not aggregated yet
    code, out, _ = run(capsys, "stats", "--db", db, "--json", "--refresh")
    stats = json.loads(out)
    assert (code, stats["instances"]["latest_day"], stats["reports"]) == (0, 1, 3)
    assert stats["by_version"] == [{"version": "1.5.1", "instances": 1.0, "reports": 3}]
    code, out, _ = run(capsys, "stats", "--db", db, "--days", "1")
    assert code == 0 and "1 average, 1 peak" in out and "3 reports" in out and "linux" in out


def test_serve_flags_come_from_env_and_flags_win() -> None:
    env = {
        "OPA_TELEMETRY_SERVER_PORT": "9999",
        "OPA_TELEMETRY_SERVER_PREFIX": "/p",
        "OPA_TELEMETRY_SERVER_ACCESS_LOG": "false",
    }
    args = build_parser(env).parse_args(["serve", "--port", "7000"])
    settings = settings_from_args(args)
    assert (settings.port, settings.prefix, settings.access_log) == (7000, "/p", False)


def test_serve_rejects_invalid_settings(capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run(capsys, "serve", "--prefix", "no-slash", "--queue-size", "0")
    assert code == 2 and "prefix must start with '/'" in err and "queue_size" in err


@pytest.fixture
def served(tmp_path: Path) -> Iterator[tuple[str, subprocess.Popen[str]]]:
    """A real ``python -m opa_telemetry_server serve`` process on a free port."""
    with serving(serve_argv(tmp_path / "served.db")) as started:
        yield started


def test_served_process_answers_client_cli_and_exits_cleanly_on_sigterm(
    served: tuple[str, subprocess.Popen[str]], tmp_path: Path
) -> None:
    url, process = served
    check = subprocess.run(
        [sys.executable, "-m", "opa_telemetry", "check", "--url", url, "--version", "1.6.0"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert check.returncode == 0, check.stderr
    assert check.stdout.splitlines() == [
        "Latest Upstream Version: 1.20.2",
        f"Download: https://openpolicyagent.org/downloads/v1.20.2/{download_asset()}",
        "Release Notes: https://github.com/open-policy-agent/opa/releases/tag/v1.20.2",
    ]
    # The recorded OPA request, replayed with curl-like raw bytes, is accepted too.
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        sock.sendall(RECORDED_REQUEST.read_bytes())
        assert sock.recv(4096).startswith(b"HTTP/1.1 200 OK\r\n")
    process.send_signal(signal.SIGTERM)
    assert process.wait(15) == 0
    with sqlite3.connect(tmp_path / "served.db") as conn:
        assert conn.execute("SELECT count(*) FROM reports").fetchone() == (2,)


def download_asset() -> str:
    from opa_telemetry.payload import go_arch, go_os

    return {"windows": f"opa_windows_{go_arch()}.exe"}.get(go_os(), f"opa_{go_os()}_{go_arch()}")


def test_client_check_prints_error_and_exits_1_when_unreachable(
    unused_tcp_port: int, capsys: pytest.CaptureFixture[str]
) -> None:
    code = client_main(["check", "--url", f"http://127.0.0.1:{unused_tcp_port}", "--timeout", "2"])
    out, err = capsys.readouterr()
    assert code == 1 and out == "" and err.startswith("error: cannot connect to ")


def test_client_report_dry_run_prints_and_sends_nothing(
    unused_tcp_port: int, capsys: pytest.CaptureFixture[str]
) -> None:
    url = f"http://127.0.0.1:{unused_tcp_port}/prefix/"
    code = client_main(
        ["report", "--dry-run", "--url", url, "--product", "MyApp", "--version", "1.2.3"]
    )
    lines = capsys.readouterr().out.splitlines()
    assert code == 0
    assert lines[0] == f"POST http://127.0.0.1:{unused_tcp_port}/prefix/v1/version"
    assert re.fullmatch(r"User-Agent: MyApp/1\.2\.3 \(\w+, \w+\)", lines[1])
    assert lines[2:4] == ["Content-Type: application/json", ""]
    assert json.loads(lines[4])["version"] == "1.2.3"


def test_make_run_starts_a_server_that_answers_a_report(
    tmp_path: Path, unused_tcp_port: int
) -> None:
    process = subprocess.Popen(
        ["make", "-s", "run", f"PORT={unused_tcp_port}", f"DB={tmp_path / 'make.db'}"],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
        env={**os.environ, "PYTHON": sys.executable},
    )
    try:
        assert process.stdout is not None
        deadline = time.monotonic() + 300
        line = ""
        while time.monotonic() < deadline and "listening on" not in line:
            line = process.stdout.readline()
            assert line or process.poll() is None, "make run exited early"
        url = ready_url(line)
        code = client_main(["check", "--url", url, "--version", "1.20.2"])
        assert code == 0
    finally:
        os.killpg(process.pid, signal.SIGTERM)
        process.wait(30)
        if process.stdout:
            process.stdout.close()
    with sqlite3.connect(tmp_path / "make.db") as conn:
        assert conn.execute("SELECT version FROM reports").fetchall() == [("1.20.2",)]


def test_sigterm_right_after_ready_still_drains_and_exits_0(tmp_path: Path) -> None:
    # The ready line is a promise: from then on SIGTERM means a graceful stop, never death.
    for attempt in range(5):
        process = subprocess.Popen(
            serve_argv(tmp_path / f"r{attempt}.db"), stdout=subprocess.PIPE, text=True
        )
        try:
            assert process.stdout is not None
            ready_url(process.stdout.readline())
            process.send_signal(signal.SIGTERM)
            assert process.wait(30) == 0
        finally:
            if process.poll() is None:
                process.kill()
                process.wait()
            if process.stdout:
                process.stdout.close()
