"""No client can fill the log: malformed requests are answered and only counted."""

from __future__ import annotations

import contextlib
import logging
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from yarl import URL

from opa_telemetry_server.web.app import MAX_FIELD_SIZE, MAX_HEADERS, MAX_LINE_SIZE
from opa_telemetry_server.web.http_errors import BAD_REQUEST_LOG_INTERVAL, BadRequestCount

from .conftest import ready_url, serve_argv

DISTINCT = "127.0.0.78"  # a loopback address no other part of the suite uses

MALFORMED = {
    "request line over the limit": b"GET /" + b"a" * (2 * MAX_LINE_SIZE) + b" HTTP/1.1\r\n\r\n",
    "header value over the limit": (
        b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Big: " + b"b" * (2 * MAX_FIELD_SIZE) + b"\r\n\r\n"
    ),
    "header name over the limit": (
        b"GET /healthz HTTP/1.1\r\nHost: x\r\n" + b"N" * (2 * MAX_FIELD_SIZE) + b": 1\r\n\r\n"
    ),
    "too many headers": (
        b"GET /healthz HTTP/1.1\r\n"
        + b"".join(b"X-H%d: 1\r\n" % i for i in range(2 * MAX_HEADERS))
        + b"\r\n"
    ),
    "bad chunk": (
        b"POST /v1/version HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        b"Transfer-Encoding: chunked\r\n\r\nZZ\r\n{}\r\n0\r\n\r\n"
    ),
    "no Host header": b"GET /healthz HTTP/1.1\r\n\r\n",
    "TLS on the HTTP port": b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + b"\x00" * 64,
}
ROUNDS = 40


def exchange(port: int, raw: bytes, *, leave_after: bytes = b"") -> bytes:
    """Send ``raw`` from :data:`DISTINCT` on a fresh connection; the answer, until closed.

    With ``leave_after``: read one line of answer (``100 Continue``), send ``leave_after`` and
    close the connection without waiting for the rest.
    """
    with socket.create_connection(
        ("127.0.0.1", port), timeout=10, source_address=(DISTINCT, 0)
    ) as s:
        s.sendall(raw)
        if leave_after:
            answer = s.recv(len(b"HTTP/1.1 100 Continue\r\n\r\n"))
            s.sendall(leave_after)
            return answer
        answer = b""
        while chunk := s.recv(65536):
            answer += chunk
        return answer


@contextlib.contextmanager
def serving_with_log(tmp_path: Path, *extra: str) -> Iterator[tuple[int, Path]]:
    """A real ``serve`` process logging at INFO to a file; its port and the log file, complete
    once the block ends (the server is stopped with SIGTERM and must exit 0)."""
    log = tmp_path / "stderr.log"
    argv = serve_argv(tmp_path / "telemetry.db", "--log-level", "info", *extra)
    with log.open("w") as stderr:
        process = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=stderr, text=True)
    try:
        assert process.stdout is not None
        port = URL(ready_url(process.stdout.readline())).port
        assert port is not None
        yield port, log
        process.send_signal(signal.SIGTERM)
        assert process.wait(30) == 0
    finally:
        if process.poll() is None:
            process.kill()
        process.wait(30)
        assert process.stdout is not None
        process.stdout.close()


def flood_lines(log: Path) -> list[str]:
    """The log's lines, less what startup and shutdown say; none may be a traceback, an error
    or a warning, or name the client."""
    text = log.read_text()
    assert "Traceback" not in text and " ERROR " not in text and "WARNING" not in text, text
    assert DISTINCT not in text
    return [
        line
        for line in text.splitlines()
        if not any(
            f" opa_telemetry_server.{name}: " in line
            for name in ("storage.sqlite.backend", "web.app", "cli", "cli.runner")
        )
    ]


def test_a_flood_of_malformed_requests_logs_one_line_per_interval(tmp_path: Path) -> None:
    with serving_with_log(tmp_path, "--access-log") as (port, log):
        began = time.monotonic()
        for _ in range(ROUNDS):
            for what, raw in MALFORMED.items():
                assert exchange(port, raw).startswith(b"HTTP/1.0 400"), what
        # A good request after the flood is still served (and access-logged).
        good = b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
        assert b" 200 OK" in exchange(port, good)
        elapsed = time.monotonic() - began

    lines = flood_lines(log)
    counted = [line for line in lines if "malformed request" in line]
    assert [line for line in lines if line not in counted] == [
        next(line for line in lines if '"GET /healthz HTTP/1.1" 200' in line)
    ], lines
    assert 1 <= len(counted) <= 1 + int(elapsed // BAD_REQUEST_LOG_INTERVAL), counted
    assert all(" INFO " in line for line in counted)


def test_clients_leaving_mid_body_are_counted_not_logged_as_bugs(tmp_path: Path) -> None:
    head = (
        b"POST /v1/version HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        b"Content-Length: 100\r\nExpect: 100-continue\r\n\r\n"
    )
    with serving_with_log(tmp_path, "--no-access-log") as (port, log):
        began = time.monotonic()
        for _ in range(ROUNDS):
            # "100 Continue" is sent from within the handler: it is waiting for the body when
            # the client leaves.
            assert exchange(port, head, leave_after=b'{"id": ').startswith(b"HTTP/1.1 100")
        elapsed = time.monotonic() - began

    lines = flood_lines(log)
    assert 1 <= len(lines) <= 1 + int(elapsed // BAD_REQUEST_LOG_INTERVAL), lines
    assert "malformed request" in lines[0] and "ClosedMidRequest" in lines[0]


def test_the_count_is_logged_at_most_once_per_interval(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="opa_telemetry_server.web.http_errors")
    now = [1000.0]
    count = BadRequestCount(interval=60, clock=lambda: now[0])
    count.add("LineTooLong")  # the first one is logged at once
    for second in range(1, 60):
        now[0] = 1000.0 + second
        count.add("LineTooLong" if second % 2 else "BadHttpMessage")
    assert len(caplog.records) == 1
    now[0] = 1061.0
    count.add("LineTooLong")  # the first after the interval logs what was counted meanwhile
    assert [r.getMessage() for r in caplog.records] == [
        "refused 1 malformed request (LineTooLong 1); logged at most every 60s",
        "refused 60 malformed requests in the last 61s (LineTooLong 31, BadHttpMessage 29);"
        " logged at most every 60s",
    ]
    assert count.total == 61
    assert all(r.levelno == logging.INFO and not r.exc_info for r in caplog.records)
