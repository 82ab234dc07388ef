"""The load tester: real load against the real server, honest latencies, bounded, loopback only."""

from __future__ import annotations

import asyncio
import json
import sqlite3
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web

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
from opa_telemetry_server.app import create_app
from opa_telemetry_server.protocol import parse_report, parse_user_agent

from .conftest import AiohttpServer, make_settings


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
