"""The embedded client against a local fake service that answers, hangs, fails or lies."""

from __future__ import annotations

import asyncio
import itertools
import json
import logging
import subprocess
import sys
import time
import uuid
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any

import pytest

from opa_telemetry import (
    AnswerError,
    LatestRelease,
    Reporter,
    RequestTimeoutError,
    Schedule,
    ServiceError,
    TransportError,
    check_latest,
)
from opa_telemetry.answer import parse_answer
from opa_telemetry.config import do_not_track, service_base_url, version_url
from opa_telemetry.payload import build_body, go_arch, go_os, user_agent

from .conftest import FakeService

FAST = Schedule(first_delay=0.0, interval=0.01, interval_count=2, long_interval=0.02, jitter=0.5)


def test_version_url_trims_slashes_and_keeps_prefix() -> None:
    assert version_url("http://h:9/") == "http://h:9/v1/version"
    assert version_url("http://h:9/custom/") == "http://h:9/custom/v1/version"
    assert version_url("http://h:9/custom") == "http://h:9/custom/v1/version"


def test_base_url_comes_from_argument_then_env_then_default() -> None:
    env = {"OPA_TELEMETRY_SERVICE_URL": "http://env:1"}
    assert service_base_url("http://arg:1", env) == "http://arg:1"
    assert service_base_url(None, env) == "http://env:1"
    assert service_base_url(None, {}) == "http://127.0.0.1:9181"


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("1", True),
        ("true", True),
        ("yes", True),
        ("", False),
        ("0", False),
        ("false", False),
        ("FALSE", False),
        (None, False),
    ],
)
def test_do_not_track_convention(value: str | None, expected: bool) -> None:
    assert do_not_track({} if value is None else {"DO_NOT_TRACK": value}) is expected


def test_body_is_sorted_compact_with_trailing_newline() -> None:
    body = build_body(
        "a72dc36a-72db-458d-9208-9be4189e4ab7", "1.6.0", 2106336, {"zeta": 1, "id": "spoofed"}
    )
    assert body == (
        b'{"heap_usage_bytes":"2106336","id":"a72dc36a-72db-458d-9208-9be4189e4ab7",'
        b'"version":"1.6.0","zeta":1}\n'
    )


def test_user_agent_uses_go_platform_names() -> None:
    assert user_agent("Open Policy Agent", "1.6.0", "linux", "amd64") == (
        "Open Policy Agent/1.6.0 (linux, amd64)"
    )
    assert (go_os("win32"), go_os("darwin"), go_arch("x86_64"), go_arch("aarch64")) == (
        "windows",
        "darwin",
        "amd64",
        "arm64",
    )


def test_reporter_rejects_a_product_name_that_breaks_the_user_agent() -> None:
    for bad in ("", "a/b", "App (beta)", "1app"):
        with pytest.raises(ValueError, match="product name"):
            Reporter(bad, "1.0.0")


async def test_start_reports_at_once_with_opas_wire_format(fake_service: FakeService) -> None:
    answers: list[LatestRelease] = []
    async with Reporter(
        "Open Policy Agent", "1.6.0", url=fake_service.url + "/", on_latest=answers.append
    ) as reporter:
        await fake_service.wait_for_requests(1)
        async with asyncio.timeout(5):
            while not answers:
                await asyncio.sleep(0.01)
    headers, body, path = fake_service.requests[0]
    assert path == "/v1/version"
    assert headers["User-Agent"] == f"Open Policy Agent/1.6.0 ({go_os()}, {go_arch()})"
    assert headers["Content-Type"] == "application/json"
    document = json.loads(body)
    assert body.endswith(b"}\n") and list(document) == sorted(document)
    assert document["id"] == reporter.instance_id and uuid.UUID(document["id"]).version == 4
    assert document["version"] == "1.6.0" and document["heap_usage_bytes"].isdigit()
    assert answers[0].latest_release == "v1.20.2" and answers[0].up_to_date is False


async def test_reports_follow_the_schedule_with_one_id(fake_service: FakeService) -> None:
    async with Reporter("MyApp", "1.0.0", url=fake_service.url, schedule=FAST):
        await fake_service.wait_for_requests(4)
    ids = {json.loads(body)["id"] for _, body, _ in fake_service.requests}
    assert len(ids) == 1


def test_schedule_is_opas_with_real_jitter() -> None:
    import random

    delays = Schedule().delays(random.Random(7))
    first, *hourly = [next(delays) for _ in range(7)]
    later = [next(delays) for _ in range(3)]
    assert first == 0.0
    assert all(3240 <= d <= 3960 for d in hourly) and len(set(hourly)) == 6
    assert all(19440 <= d <= 23760 for d in later)


async def test_async_on_latest_callback_is_awaited(fake_service: FakeService) -> None:
    seen = asyncio.Event()

    async def on_latest(latest: LatestRelease) -> None:
        seen.set()

    async with Reporter("MyApp", "1.0.0", url=fake_service.url, on_latest=on_latest):
        await asyncio.wait_for(seen.wait(), 5)


async def test_out_of_date_is_logged_at_info_with_opas_fields(
    fake_service: FakeService, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="opa_telemetry")
    done = asyncio.Event()
    async with Reporter("MyApp", "1.0.0", url=fake_service.url, on_latest=lambda _: done.set()):
        await asyncio.wait_for(done.wait(), 5)
    [record] = [r for r in caplog.records if r.levelno == logging.INFO]
    assert record.current_version == "1.0.0" and record.latest_version == "1.20.2"  # type: ignore[attr-defined]
    assert "download=https://openpolicyagent.org" in record.getMessage()


async def lag_while(work: Callable[[], Coroutine[Any, Any, None]]) -> float:
    """Run ``work`` while a ticker measures the event loop's worst lag, in seconds."""
    worst = 0.0
    stop = asyncio.Event()

    async def ticker() -> None:
        nonlocal worst
        while not stop.is_set():
            before = time.perf_counter()
            await asyncio.sleep(0.005)
            worst = max(worst, time.perf_counter() - before - 0.005)

    task = asyncio.create_task(ticker())
    try:
        await work()
    finally:
        stop.set()
        await task
    return worst


async def test_start_never_waits_on_a_server_that_hangs(fake_service: FakeService) -> None:
    fake_service.mode = "hang"
    reporter = Reporter("MyApp", "1.0.0", url=fake_service.url, timeout=30.0, close_timeout=1.0)

    async def scenario() -> None:
        began = time.perf_counter()
        reporter.start()
        assert time.perf_counter() - began < 0.05  # start() only schedules
        await fake_service.wait_for_requests(1)  # the request is out and hanging
        closing = time.perf_counter()
        await reporter.aclose()
        assert time.perf_counter() - closing < 1.5

    lag = await lag_while(scenario)
    # Generous bound for a shared CI machine: a blocking call (DNS, import) would cost more.
    assert lag < 0.5, f"event loop stalled for {lag:.3f}s"


async def test_server_errors_and_garbage_never_reach_the_host(
    fake_service: FakeService, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="opa_telemetry")

    def failures() -> int:
        return sum("failed" in r.getMessage() for r in caplog.records)

    for attempt, mode in enumerate(("status", "garbage", "huge"), start=1):
        fake_service.mode = mode
        async with Reporter("MyApp", "1.0.0", url=fake_service.url):
            async with asyncio.timeout(10):  # hang guard
                while failures() < attempt:
                    await asyncio.sleep(0.01)
    assert [r for r in caplog.records if r.levelno > logging.DEBUG] == []
    assert len(fake_service.requests) == 3


async def test_refused_connection_is_silent(
    unused_tcp_port: int, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="opa_telemetry")
    reporter = Reporter("MyApp", "1.0.0", url=f"http://127.0.0.1:{unused_tcp_port}")
    reporter.start()
    async with asyncio.timeout(10):
        while not any("failed" in r.getMessage() for r in caplog.records):
            await asyncio.sleep(0.01)
    await reporter.aclose()
    assert [r for r in caplog.records if r.levelno > logging.DEBUG] == []


async def test_a_failing_callback_does_not_stop_reporting(fake_service: FakeService) -> None:
    def explode(_: LatestRelease) -> None:
        raise RuntimeError("host bug")

    async with Reporter("MyApp", "1.0.0", url=fake_service.url, schedule=FAST, on_latest=explode):
        await fake_service.wait_for_requests(3)


async def test_disabled_and_do_not_track_send_nothing(fake_service: FakeService) -> None:
    for reporter in (
        Reporter("MyApp", "1.0.0", url=fake_service.url, enabled=False),
        Reporter("MyApp", "1.0.0", url=fake_service.url, environ={"DO_NOT_TRACK": "1"}),
    ):
        reporter.start()
        await asyncio.sleep(0.1)
        await reporter.aclose()
    assert fake_service.requests == []


async def test_aclose_is_idempotent_and_start_is_idempotent(fake_service: FakeService) -> None:
    reporter = Reporter("MyApp", "1.0.0", url=fake_service.url)
    await reporter.aclose()
    reporter.start()
    reporter.start()
    await fake_service.wait_for_requests(1)
    await reporter.aclose()
    await reporter.aclose()
    assert len(fake_service.requests) == 1


async def test_check_latest_returns_the_answer(fake_service: FakeService) -> None:
    latest = await check_latest("Open Policy Agent", "1.0.0", url=fake_service.url)
    assert latest.version == "1.20.2" and latest.complete and not latest.up_to_date


async def test_check_latest_raises_documented_errors(
    fake_service: FakeService, unused_tcp_port: int
) -> None:
    fake_service.mode = "status"
    with pytest.raises(ServiceError) as caught:
        await check_latest("MyApp", "1.0.0", url=fake_service.url)
    assert (caught.value.status, caught.value.retry_after, caught.value.message) == (500, 7, "nope")
    fake_service.mode = "garbage"
    with pytest.raises(AnswerError):
        await check_latest("MyApp", "1.0.0", url=fake_service.url)
    fake_service.mode = "huge"
    with pytest.raises(AnswerError, match="larger"):
        await check_latest("MyApp", "1.0.0", url=fake_service.url)
    fake_service.mode = "hang"
    with pytest.raises(RequestTimeoutError):
        await check_latest("MyApp", "1.0.0", url=fake_service.url, timeout=0.2)
    with pytest.raises(TransportError):
        await check_latest("MyApp", "1.0.0", url=f"http://127.0.0.1:{unused_tcp_port}")


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        (b'{"latest": {"opa_up_to_date": true}}', LatestRelease(None, None, None, True)),
        (
            b'{"latest": {"latest_release": "v1.0.0", "download": "d", "release_notes": "n"},'
            b' "alerts": []}',
            LatestRelease("v1.0.0", "d", "n", False),
        ),
    ],
)
def test_parse_answer_ignores_unknown_keys(body: bytes, expected: LatestRelease) -> None:
    assert parse_answer(body) == expected


@pytest.mark.parametrize("body", [b"", b"[]", b'{"latest": 1}', b"{}", b"nope"])
def test_parse_answer_rejects_other_shapes(body: bytes) -> None:
    with pytest.raises(AnswerError):
        parse_answer(body)


def run_isolated(code: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-W", "error", "-c", code], capture_output=True, text=True, timeout=60
    )


def test_importing_the_client_does_not_import_aiohttp_or_the_server() -> None:
    result = run_isolated(
        "import sys, opa_telemetry\n"
        "assert 'aiohttp' not in sys.modules, 'aiohttp imported'\n"
        "assert not any(m.startswith('opa_telemetry_server') for m in sys.modules)\n"
    )
    assert result.returncode == 0, result.stderr


async def run_isolated_async(
    code: str, before_input: Awaitable[None] | None = None, *, warnings_as_errors: bool = True
) -> tuple[int, str, str]:
    """Like ``run_isolated`` but keeps this loop (and the fake service on it) running; with
    ``before_input``, the child's stdin gets a line only once that has happened."""
    flags = ["-W", "error"] if warnings_as_errors else []
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        *flags,
        "-c",
        code,
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    if before_input is not None:
        await before_input
    stdout, stderr = await asyncio.wait_for(process.communicate(b"go\n"), 60)
    return process.returncode or 0, stdout.decode(), stderr.decode()


async def test_exiting_without_aclose_while_a_request_hangs_prints_nothing(
    fake_service: FakeService,
) -> None:
    fake_service.mode = "hang"
    code = (
        "import asyncio, sys, opa_telemetry\n"
        "async def main():\n"
        f"    r = opa_telemetry.Reporter('MyApp', '1.0.0', url={fake_service.url!r})\n"
        "    r.start()\n"
        "    await asyncio.to_thread(sys.stdin.readline)\n"  # the request hangs; no aclose()
        "asyncio.run(main())\n"
        "print('ok')\n"
    )
    result = await run_isolated_async(code, fake_service.wait_for_requests(1, timeout=30))
    assert result == (0, "ok\n", "")


async def test_reporter_works_under_uvloop_without_warnings(fake_service: FakeService) -> None:
    pytest.importorskip("uvloop")
    # A fresh interpreter with warnings as errors: an unclosed session, a never-awaited
    # coroutine or a destroyed pending task would fail it.
    returncode, stdout, stderr = await run_isolated_async(
        "import asyncio, uvloop, opa_telemetry\n"
        "async def main():\n"
        "    done = asyncio.Event()\n"
        f"    r = opa_telemetry.Reporter('MyApp', '1.0.0', url={fake_service.url!r},\n"
        "                               on_latest=lambda _: done.set())\n"
        "    r.start()\n"
        "    await asyncio.wait_for(done.wait(), 10)\n"
        "    await r.aclose()\n"
        "uvloop.run(main())\n"
        "print('ok')\n"
    )
    assert (returncode, stdout, stderr) == (0, "ok\n", "")
    assert len(fake_service.requests) == 1


def test_next_delay_backs_off_and_honours_a_clamped_retry_after() -> None:
    import random

    schedule = Schedule(interval=10.0, long_interval=10.0, jitter=0.1, max_delay=100.0)
    rng = random.Random(1)
    assert schedule.next_delay(10.0, 0, None, rng) == 10.0
    assert 18.0 <= schedule.next_delay(10.0, 1, None, rng) <= 22.0
    assert 36.0 <= schedule.next_delay(10.0, 2, None, rng) <= 44.0
    assert schedule.next_delay(10.0, 50, None, rng) == 100.0  # capped, however many failures
    assert schedule.next_delay(10.0, 0, 60.0, rng) == 60.0  # Retry-After is a minimum
    assert schedule.next_delay(10.0, 0, 10**9, rng) == 100.0  # and cannot silence us forever
    with pytest.raises(ValueError, match="max_delay"):
        Schedule(interval=10.0, max_delay=5.0)


async def test_consecutive_failures_space_out_the_attempts(fake_service: FakeService) -> None:
    fake_service.mode = "status"  # every answer is a 500 (with Retry-After: 7, clamped below)
    schedule = Schedule(
        interval=0.05, interval_count=100, long_interval=0.05, jitter=0.0, max_delay=0.4
    )
    async with Reporter("MyApp", "1.0.0", url=fake_service.url, schedule=schedule):
        await fake_service.wait_for_requests(4)
    gaps = [later - earlier for earlier, later in itertools.pairwise(fake_service.times[:4])]
    # Retry-After: 7 is clamped to max_delay 0.4 s: every gap is the cap, not the 50 ms schedule.
    assert all(gap >= 0.35 for gap in gaps), gaps


async def hostile_server(aiohttp_server: Any, behaviour: str) -> str:
    from aiohttp import web

    async def handle(request: web.Request) -> web.StreamResponse:
        await request.read()
        if behaviour == "redirect-loop":
            raise web.HTTPFound(str(request.url))
        response = web.StreamResponse(
            headers={"Content-Type": "application/json", "Content-Length": "1000"}
        )
        await response.prepare(request)
        if behaviour == "trickle":
            for byte in b'{"latest": {"opa_up_to_date": true}}':
                await response.write(bytes([byte]))
                await asyncio.sleep(0.05)
        else:  # "cut": promise 1000 bytes, send a few, drop the connection
            await response.write(b'{"latest": ')
            assert request.transport is not None
            request.transport.close()
        return response

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", handle)
    server = await aiohttp_server(app, host="127.0.0.1")
    return str(server.make_url("")).rstrip("/")


@pytest.mark.parametrize("behaviour", ["trickle", "redirect-loop", "cut"])
async def test_hostile_servers_neither_stall_the_loop_nor_reach_the_host(
    aiohttp_server: Any, behaviour: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="opa_telemetry")
    url = await hostile_server(aiohttp_server, behaviour)
    expected = RequestTimeoutError if behaviour == "trickle" else TransportError
    began = time.perf_counter()
    with pytest.raises(expected):
        await check_latest("MyApp", "1.0.0", url=url, timeout=0.5)
    assert time.perf_counter() - began < 2.0  # the trickle would take ~1.9 s without a timeout

    async def scenario() -> None:
        async with Reporter("MyApp", "1.0.0", url=url, timeout=0.5):
            async with asyncio.timeout(10):
                while not any("failed" in r.getMessage() for r in caplog.records):
                    await asyncio.sleep(0.01)

    assert await lag_while(scenario) < 0.5
    assert [r for r in caplog.records if r.levelno > logging.DEBUG] == []


async def test_host_closing_its_loop_mid_request_prints_nothing(fake_service: FakeService) -> None:
    fake_service.mode = "hang"
    # Default warning filters, as a user runs: no "Task was destroyed", no "coroutine ignored
    # GeneratorExit". (With -W error aiohttp still reports the connection it could not close.)
    code = (
        "import asyncio, sys, opa_telemetry\n"
        "loop = asyncio.new_event_loop()\n"
        f"r = opa_telemetry.Reporter('MyApp', '1.0.0', url={fake_service.url!r})\n"
        "async def main():\n"
        "    r.start()\n"
        "    await asyncio.to_thread(sys.stdin.readline)\n"
        "loop.run_until_complete(main())\n"
        "loop.close()\n"  # no aclose(), no cancelling: the request is still in flight
        "print('ok')\n"
    )
    result = await run_isolated_async(
        code, fake_service.wait_for_requests(1, timeout=30), warnings_as_errors=False
    )
    assert result == (0, "ok\n", "")


async def test_a_fork_starts_a_new_instance(fake_service: FakeService) -> None:
    # A pre-fork server: the Reporter reports in the parent, then each child is a new instance.
    code = (
        "import asyncio, os, opa_telemetry\n"
        f"r = opa_telemetry.Reporter('MyApp', '1.0.0', url={fake_service.url!r})\n"
        "async def once():\n"
        "    done = asyncio.Event()\n"
        "    r._on_latest = lambda _: done.set()\n"
        "    r.start()\n"
        "    await asyncio.wait_for(done.wait(), 20)\n"
        "    await r.aclose()\n"
        "async def report_then_keep_task():\n"
        "    r.start()\n"
        "    while r.reports_sent == 0: await asyncio.sleep(0.01)\n"
        "asyncio.run(report_then_keep_task())\n"  # the parent's task is left behind
        "pid = os.fork()\n"
        "if pid == 0:\n"
        "    asyncio.run(once())\n"
        "    os._exit(0)\n"
        "os.waitpid(pid, 0)\n"
        "print(r.instance_id)\n"
    )
    returncode, stdout, stderr = await run_isolated_async(code, warnings_as_errors=False)
    assert returncode == 0, stderr
    ids = [json.loads(body)["id"] for _, body, _ in fake_service.requests]
    assert len(ids) == 2 and ids[0] == stdout.strip() and ids[1] != ids[0]
