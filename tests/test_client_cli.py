"""The client CLI as a script sees it (``python -m opa_telemetry``, a real process): standard
output byte for byte what ``opa version --check`` prints for an answer, and every failure one
line on standard error with exit status 1 (at run time) or 2 (usage)."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys

import pytest

from .conftest import FakeService

# What OPA's `opa version --check` prints for the fake service's answer (cmd/version.go prints
# report.DataResponse.Pretty() with Fprintln: three lines, the tag without its "v").
OPA_CHECK_OUTPUT = (
    b"Latest Upstream Version: 1.20.2\n"
    b"Download: https://openpolicyagent.org/downloads/v1.20.2/opa_linux_amd64\n"
    b"Release Notes: https://github.com/open-policy-agent/opa/releases/tag/v1.20.2\n"
)


async def run_cli(*argv: str, env: dict[str, str] | None = None) -> tuple[int, bytes, bytes]:
    """``python -m opa_telemetry ARGV`` in a process of its own: (status, stdout, stderr)."""
    environ = {k: v for k, v in os.environ.items() if not k.upper().endswith("_PROXY")}
    for name in ("OPA_TELEMETRY_SERVICE_URL", "DO_NOT_TRACK"):
        environ.pop(name, None)
    process = await asyncio.create_subprocess_exec(
        *(sys.executable, "-m", "opa_telemetry", *argv),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env={**environ, **(env or {})},
    )
    out, err = await asyncio.wait_for(process.communicate(), 60)
    assert process.returncode is not None
    return process.returncode, out, err


async def test_check_prints_exactly_what_opa_prints(fake_service: FakeService) -> None:
    assert await run_cli("check", "--url", fake_service.url) == (0, OPA_CHECK_OUTPUT, b"")


async def test_check_trims_only_a_lower_case_v_as_opa_does(fake_service: FakeService) -> None:
    fake_service.answer["latest"]["latest_release"] = "V2.0.0"  # Go's TrimPrefix(tag, "v")
    code, out, _ = await run_cli("check", "--url", fake_service.url)
    assert code == 0
    assert out.splitlines()[0] == b"Latest Upstream Version: V2.0.0"


async def test_an_answer_without_a_release_prints_opas_empty_line(
    fake_service: FakeService,
) -> None:
    """OPA prints its empty banner (no release known) as an empty line and exits 0; the
    explanation goes to standard error."""
    fake_service.answer = {"latest": {"opa_up_to_date": True}}
    code, out, err = await run_cli("check", "--url", fake_service.url)
    assert (code, out) == (0, b"\n")
    assert err == b"The service knows no release of this product.\n"


@pytest.mark.parametrize(
    ("mode", "message"),
    [
        ("status", "service answered HTTP 503: nope"),
        ("garbage", "answer is not JSON"),
    ],
)
async def test_a_failed_check_is_one_line_on_stderr_and_exit_1(
    fake_service: FakeService, mode: str, message: str
) -> None:
    fake_service.mode, fake_service.status = mode, 503
    code, out, err = await run_cli("check", "--url", fake_service.url)
    assert (code, out) == (1, b"")
    assert err.startswith(f"error: {message}".encode()), err
    assert err.count(b"\n") == 1 and err.endswith(b"\n")


async def test_an_unreachable_service_is_one_line_on_stderr_and_exit_1(
    unused_tcp_port: int,
) -> None:
    for command in ("check", "report"):
        code, out, err = await run_cli(command, "--url", f"http://127.0.0.1:{unused_tcp_port}")
        assert (code, out) == (1, b"")
        assert err == (
            f"error: cannot connect to 127.0.0.1:{unused_tcp_port}: connection refused\n".encode()
        )


async def test_a_host_name_no_resolver_takes_is_one_line_on_stderr_and_exit_1() -> None:
    label = "a" * 64  # one over DNS's limit: Python's IDNA codec raises before any lookup
    code, out, err = await run_cli("check", "--url", f"http://{label}.example")
    assert (code, out) == (1, b"")
    assert err == f"error: cannot resolve {label}.example: not a host name\n".encode()


async def test_a_timeout_is_one_line_on_stderr_and_exit_1(fake_service: FakeService) -> None:
    fake_service.mode = "hang"
    code, out, err = await run_cli("check", "--url", fake_service.url, "--timeout", "0.3")
    assert (code, out) == (1, b"")
    assert err == f"error: no answer from {fake_service.url}/v1/version within 0.3s\n".encode()


@pytest.mark.parametrize(
    ("argv", "env", "message"),
    [
        (["check", "--timeout", "0"], {}, "--timeout: expected a positive number of seconds"),
        (["check", "--timeout", "soon"], {}, "--timeout: expected a positive number of seconds"),
        (["check", "--product", "a/b"], {}, "--product: product name 'a/b' must start with"),
        (["report", "--dry-run", "--version", ""], {}, "--version: expected a version on one"),
        (["check", "--url", "ftp://example.test"], {}, "--url: not an http:// or https:// URL"),
        (
            ["report", "--dry-run"],
            {"OPA_TELEMETRY_SERVICE_URL": "example.test"},
            "$OPA_TELEMETRY_SERVICE_URL: not an http:// or https:// URL",
        ),
        (["check", "--bogus"], {}, "unrecognized arguments: --bogus"),
        (["nope"], {}, "COMMAND: invalid choice: 'nope'"),
        ([], {}, "the following arguments are required: COMMAND"),
    ],
)
async def test_a_usage_error_is_one_line_on_stderr_and_exit_2(
    argv: list[str], env: dict[str, str], message: str
) -> None:
    code, out, err = await run_cli(*argv, env=env)
    assert (code, out) == (2, b""), err
    assert err.startswith(f"error: {message}".encode()), err
    assert err.count(b"\n") == 1 and err.endswith(b"\n")


async def test_a_closed_pipe_ends_check_quietly(fake_service: FakeService) -> None:
    """``opa-telemetry check | head -0``: the reader is gone before the answer is written."""
    read, write = os.pipe()
    os.close(read)
    try:
        process = await asyncio.create_subprocess_exec(
            *(sys.executable, "-m", "opa_telemetry", "check", "--url", fake_service.url),
            stdout=write,
            stderr=subprocess.PIPE,
        )
    finally:
        os.close(write)
    _, err = await asyncio.wait_for(process.communicate(), 60)
    assert (process.returncode, err) == (0, b"")
