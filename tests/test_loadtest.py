"""The load tester: real load against the real server, honest latencies, bounded, loopback only."""

from __future__ import annotations

import asyncio
import json
import sqlite3
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web

from opa_telemetry.cli import loadtest_main
from opa_telemetry.loadtest import (
    LoadConfig,
    LoadTestError,
    build_parser,
    build_requests,
    check_loopback,
    config_from_args,
    main,
    parse_target,
    run_load,
)
from opa_telemetry.loadtest.fleet import OPA_VERSIONS
from opa_telemetry_server.domain.protocol import parse_report, parse_user_agent
from opa_telemetry_server.domain.releases import bundled_releases
from opa_telemetry_server.domain.versions import parse_version
from opa_telemetry_server.web.app import create_app

from .conftest import REPO, AiohttpServer, make_settings


def target_of(server: Any) -> Any:
    return parse_target(str(server.make_url("")))


async def test_load_against_the_real_server_stores_every_acknowledged_report(
    aiohttp_server: AiohttpServer, tmp_path: Path
) -> None:
    settings = make_settings(tmp_path)
    server = await aiohttp_server(create_app(settings), host="127.0.0.1")
    config = LoadConfig(
        target_of(server),
        concurrency=8,
        requests=400,
        duration=None,
        check_ratio=0.25,
        seed=3,
        instances=50,
    )
    result = await run_load(config)
    summary = result.summary()
    assert summary["requests"] == summary["completed"] == 400
    assert summary["statuses"] == {"200": 400} and summary["errors"] == {}
    checks = 400 - result.reports_ok
    assert 50 < checks < 150  # about a quarter are OPA >= 1.7 release checks
    with sqlite3.connect(settings.db) as conn:
        stored, instances = conn.execute(
            "SELECT sum(report_count), count(DISTINCT instance_id) FROM reports"
        ).fetchone()
        (counted,) = conn.execute("SELECT sum(check_count) FROM version_checks").fetchone()
    assert (stored, counted) == (result.reports_ok, checks)
    assert 1 < instances <= 50
    assert summary["latency_ms"]["p50"] > 0


def test_simulated_fleet_speaks_opas_wire_format() -> None:
    requests = build_requests(parse_target("http://127.0.0.1:9181/p"), 300, seed=1)
    user_agents, versions = set(), set()
    for raw in requests:
        head, body = raw.split(b"\r\n\r\n", 1)
        lines = head.decode().split("\r\n")
        assert lines[0] == "POST /p/v1/version HTTP/1.1"
        headers = dict(line.split(": ", 1) for line in lines[1:])
        assert int(headers["Content-Length"]) == len(body)
        client = parse_user_agent(headers["User-Agent"])
        report = parse_report(body, client, json.loads)
        assert client.product == "opa" and client.os and client.arch
        user_agents.add(headers["User-Agent"].split("/")[0])
        versions.add(str(report.version))
    assert {"Open Policy Agent", "Open-Policy-Agent"} <= user_agents
    assert any(v.endswith("-dev") for v in versions) and len(versions) > 10


async def test_open_loop_latency_counts_time_waiting_behind_a_slow_server(
    aiohttp_server: AiohttpServer,
) -> None:
    async def slow(request: web.Request) -> web.Response:
        await asyncio.sleep(0.02)  # the server under test is slow: 50 answers/s at most
        return web.json_response({"latest": {"opa_up_to_date": True}})

    app = web.Application()
    app.router.add_post("/v1/version", slow)
    server = await aiohttp_server(app, host="127.0.0.1")
    # 200/s scheduled over one connection: request k waits behind k-1 slow answers. A closed
    # loop would report ~20 ms for all; measured from the schedule the backlog shows.
    config = LoadConfig(target_of(server), concurrency=1, rate=200, requests=40, duration=None)
    result = await run_load(config)
    assert result.summary()["completed"] == 40
    assert result.histogram.get_max_value() > 300_000  # microseconds


async def test_error_kinds_are_told_apart(unused_tcp_port: int) -> None:
    release = asyncio.Event()
    handlers: set[asyncio.Task[None]] = set()

    async def garbage(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read(1024)
        writer.write(b"SPLAT\r\n\r\n")
        await release.wait()
        writer.close()

    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await release.wait()
        writer.close()

    refused = await run_load(
        LoadConfig(
            parse_target(f"http://127.0.0.1:{unused_tcp_port}"),
            concurrency=2,
            requests=4,
            duration=None,
        )
    )
    assert refused.errors == {"refused": 4}
    for handler, kind in ((garbage, "bad answer"), (silent, "timeout")):
        release.clear()

        async def tracked(
            r: asyncio.StreamReader, w: asyncio.StreamWriter, h: Any = handler
        ) -> None:
            task = asyncio.current_task()
            assert task is not None
            handlers.add(task)
            await h(r, w)

        server = await asyncio.start_server(tracked, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        async with server:
            config = LoadConfig(
                parse_target(f"http://127.0.0.1:{port}"),
                concurrency=2,
                requests=2,
                duration=None,
                timeout=0.3,
            )
            result = await run_load(config)
            release.set()
            await asyncio.gather(*handlers)  # the stub closes its sockets before we go on
            handlers.clear()
        assert result.errors == {kind: 2}, result.errors


@pytest.mark.parametrize("host", ["127.0.0.1", "127.0.0.77", "localhost", "::1"])
def test_loopback_targets_are_allowed(host: str) -> None:
    check_loopback(host)


def test_remote_targets_are_refused_unless_allowed() -> None:
    # Address literals from the documentation ranges: nothing is resolved or sent.
    for url in ("http://192.0.2.10:9181", "http://[2001:db8::1]:9181"):
        with pytest.raises(LoadTestError, match="--allow-remote"):
            config_from_args(build_parser().parse_args([url]), live=False)
    config = config_from_args(
        build_parser().parse_args(["http://192.0.2.10:9181", "--allow-remote"]), live=False
    )
    assert config.target.host == "192.0.2.10"


@pytest.mark.parametrize(
    "argv",
    [
        ["--duration", "0"],
        ["--duration", "99999"],
        ["--requests", "0"],
        ["--rate", "-1"],
        ["--concurrency", "0"],
        ["--check-ratio", "2"],
        ["--instances", "0"],
    ],
)
def test_bad_arguments_are_refused(argv: list[str]) -> None:
    with pytest.raises(LoadTestError):
        config_from_args(build_parser().parse_args(["http://127.0.0.1:1", *argv]), live=False)


def test_https_targets_are_refused_clearly() -> None:
    with pytest.raises(LoadTestError, match="http://"):
        parse_target("https://127.0.0.1:9181")


async def test_processes_merge_their_histograms_and_write_json(
    aiohttp_server: AiohttpServer, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    settings = make_settings(tmp_path)
    server = await aiohttp_server(create_app(settings), host="127.0.0.1")
    out = tmp_path / "result.json"
    argv = [
        str(server.make_url("")),
        "--concurrency",
        "4",
        "--requests",
        "200",
        "--processes",
        "2",
        "--json",
        str(out),
    ]
    assert await asyncio.to_thread(main, argv) == 0
    result = json.loads(out.read_text())
    assert result["completed"] == 200 and result["statuses"] == {"200": 200}
    assert result["config"]["processes"] == 2
    assert "reports acknowledged" in capsys.readouterr().out
    with sqlite3.connect(settings.db) as conn:
        assert conn.execute("SELECT sum(report_count) FROM reports").fetchone() == (200,)


def test_fleet_runs_real_opa_releases_newest_first() -> None:
    known = {release.tag.lstrip("v") for release in bundled_releases()}
    assert set(OPA_VERSIONS) <= known
    precedence = [parse_version(v).precedence for v in OPA_VERSIONS]
    assert precedence == sorted(precedence, reverse=True)
    assert len(OPA_VERSIONS) > 100


def test_load_tester_never_reads_the_server_package_files(tmp_path: Path) -> None:
    # An audit hook sees every file the process opens while it builds a fleet and loads its
    # modules; none may be under the server package's folder.
    script = textwrap.dedent(f"""
        import sys
        from pathlib import Path
        server = Path({str(REPO / "server")!r}).resolve()
        opened = []
        def hook(event, args):
            if event == "open" and isinstance(args[0], (str, bytes, Path)):
                path = Path(args[0].decode() if isinstance(args[0], bytes) else args[0])
                if path.resolve().is_relative_to(server):
                    opened.append(str(path))
        sys.addaudithook(hook)
        from opa_telemetry.loadtest import build_requests, parse_target
        from opa_telemetry.loadtest.cli import main
        assert len(build_requests(parse_target("http://127.0.0.1:1"), 500, seed=1)) == 500
        print(sorted(opened), "opa_telemetry_server" in sys.modules)
    """)
    out = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, check=True, timeout=60
    ).stdout
    assert out.strip() == "[] False"


def _counting_app(
    fail_every: int = 0,
) -> tuple[web.Application, list[tuple[Any, str]]]:
    """An app answering reports like the server; records (peer, Connection header) per
    request; with ``fail_every`` N, every Nth answer is a 500."""
    seen: list[tuple[Any, str]] = []

    async def answer(request: web.Request) -> web.Response:
        await request.read()
        assert request.transport is not None
        seen.append((request.transport.get_extra_info("peername"),
                     request.headers.get("Connection", "")))  # fmt: skip
        if fail_every and len(seen) % fail_every == 0:
            return web.json_response({"error": "boom", "details": []}, status=500)
        return web.json_response({"latest": {"opa_up_to_date": True}})

    app = web.Application()
    app.router.add_post("/v1/version", answer)
    app.router.add_get("/repos/{owner}/{repo}/releases/latest", answer)
    return app, seen


async def test_new_connection_sends_each_request_on_its_own_connection(
    aiohttp_server: AiohttpServer,
) -> None:
    app, seen = _counting_app()
    server = await aiohttp_server(app, host="127.0.0.1")
    kept = await run_load(LoadConfig(target_of(server), concurrency=3, requests=30,
                                     duration=None, check_ratio=0.2, seed=5))  # fmt: skip
    assert kept.succeeded == 30 and len({peer for peer, _ in seen}) == 3
    assert {header for _, header in seen} == {""}
    seen.clear()
    fresh = await run_load(LoadConfig(target_of(server), concurrency=3, requests=30,
                                      duration=None, check_ratio=0.2, seed=5,
                                      new_connection=True))  # fmt: skip
    assert fresh.succeeded == 30 and fresh.errors == {}
    assert len({peer for peer, _ in seen}) == 30
    assert {header for _, header in seen} == {"close"}
    seen.clear()
    open_loop = LoadConfig(target_of(server), concurrency=3, rate=500, requests=20,
                           duration=None, new_connection=True)  # fmt: skip
    scheduled = await run_load(open_loop)
    assert scheduled.succeeded == 20 and len({peer for peer, _ in seen}) == 20


async def test_new_connection_load_on_the_real_server_stores_every_acknowledged_report(
    aiohttp_server: AiohttpServer, tmp_path: Path
) -> None:
    settings = make_settings(tmp_path)
    server = await aiohttp_server(create_app(settings), host="127.0.0.1")
    config = LoadConfig(target_of(server), concurrency=4, requests=200, duration=None,
                        seed=11, new_connection=True)  # fmt: skip
    result = await run_load(config)
    assert result.summary()["statuses"] == {"200": 200} and result.reports_ok == 200
    with sqlite3.connect(settings.db) as conn:
        assert conn.execute("SELECT sum(report_count) FROM reports").fetchone() == (200,)


async def run_cli(*argv: str) -> subprocess.CompletedProcess[str]:
    """``python -m opa_telemetry.loadtest`` in a subprocess, while this loop serves."""
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "opa_telemetry.loadtest", *argv,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    async with asyncio.timeout(60):
        out, err = await process.communicate()
    assert process.returncode is not None
    return subprocess.CompletedProcess(argv, process.returncode, out.decode(), err.decode())


async def test_json_to_stdout_is_only_json_and_the_summary_goes_to_stderr(
    aiohttp_server: AiohttpServer, tmp_path: Path
) -> None:
    server = await aiohttp_server(create_app(make_settings(tmp_path)), host="127.0.0.1")
    done = await run_cli(str(server.make_url("")), "--requests", "60", "--concurrency", "3",
                         "--json", "-")  # fmt: skip
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)  # the whole of stdout is one JSON document
    assert result["completed"] == 60 and result["passed"] is True
    assert result["failures"] == 0 and result["config"]["max_failure_ratio"] == 0.01
    assert "reports acknowledged" in done.stderr and "result      ok" in done.stderr


@pytest.mark.parametrize("where", ["missing/result.json", "."])
async def test_unwritable_json_path_fails_before_any_request(
    aiohttp_server: AiohttpServer, tmp_path: Path, where: str
) -> None:
    app, seen = _counting_app()
    server = await aiohttp_server(app, host="127.0.0.1")
    done = await run_cli(str(server.make_url("")), "--requests", "10",
                         "--json", str(tmp_path / where))  # fmt: skip
    assert done.returncode == 1
    assert done.stderr.startswith("error: cannot write --json ") and done.stderr.count("\n") == 1
    assert seen == [] and done.stdout == ""


async def test_existing_json_file_is_replaced_not_appended(
    aiohttp_server: AiohttpServer, tmp_path: Path
) -> None:
    app, _ = _counting_app()
    server = await aiohttp_server(app, host="127.0.0.1")
    out = tmp_path / "result.json"
    out.write_text('{"old": "result, longer than nothing"}\n' * 100)
    argv = [str(server.make_url("")), "--requests", "5", "--json", str(out)]
    assert await asyncio.to_thread(main, argv) == 0
    assert json.loads(out.read_text())["completed"] == 5


async def test_exit_status_follows_the_failure_ratio(
    aiohttp_server: AiohttpServer, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    app, _ = _counting_app(fail_every=10)
    server = await aiohttp_server(app, host="127.0.0.1")
    url = str(server.make_url(""))
    out = tmp_path / "result.json"
    argv = [url, "--requests", "100", "--concurrency", "2", "--json", str(out)]
    assert await asyncio.to_thread(main, argv) == 1  # 10% of 500s against the default 1%
    result = json.loads(out.read_text())
    assert result["statuses"] == {"200": 90, "500": 10} and result["failure_ratio"] == 0.1
    assert result["passed"] is False
    assert "FAILED: 10.00% of requests failed" in capsys.readouterr().out
    assert await asyncio.to_thread(main, [*argv, "--max-failure-ratio", "0.2"]) == 0
    assert "result      ok: 10.00% failed" in capsys.readouterr().out


def test_exit_status_is_1_when_no_request_succeeded(
    unused_tcp_port: int, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = [f"http://127.0.0.1:{unused_tcp_port}", "--requests", "3", "--max-failure-ratio", "1"]
    assert main(argv) == 1
    out = capsys.readouterr().out
    assert "refused: 3" in out and "FAILED: no request succeeded" in out


async def test_mostly_rate_limited_load_says_to_turn_the_limit_off(
    aiohttp_server: AiohttpServer, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    settings = make_settings(tmp_path, rate_limit=1.0, rate_burst=5)
    server = await aiohttp_server(create_app(settings), host="127.0.0.1")
    out_json = tmp_path / "result.json"
    argv = [str(server.make_url("")), "--requests", "40", "--concurrency", "2",
            "--json", str(out_json)]  # fmt: skip
    assert await asyncio.to_thread(main, argv) == 1
    statuses = json.loads(out_json.read_text())["statuses"]
    assert statuses["429"] > statuses["200"]  # the burst of 5 (and a refill) let through
    out = capsys.readouterr().out
    assert "start the server with --rate-limit 0" in out
    assert 'make run ARGS="--rate-limit 0"' in out


def test_console_script_entry_point_runs_the_load_tester(
    capsys: pytest.CaptureFixture[str],
) -> None:
    with pytest.raises(SystemExit) as exited:
        loadtest_main(["--help"])
    assert exited.value.code == 0
    assert "--new-connection" in capsys.readouterr().out


def test_readme_load_testing_section_names_every_option() -> None:
    readme = (REPO / "README.md").read_text()
    section = readme[readme.index("## Load testing") : readme.index("## Performance")]
    for action in build_parser()._actions:
        for option in action.option_strings:
            if option.startswith("--") and option != "--help":
                assert f"`{option}" in section, f"{option} is not in the README's Load testing"
