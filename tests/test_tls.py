"""``serve --tls-cert --tls-key``: HTTPS served directly, verified against a CA made here."""

from __future__ import annotations

import asyncio
import os
import sqlite3
import ssl
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import pytest
import trustme

from opa_telemetry_server.cli import main

from .conftest import OPA_UA, report_body, serve_argv, serving


@dataclass(frozen=True)
class TlsFiles:
    ca: trustme.CA
    ca_pem: Path
    cert: Path
    key: Path
    other_key: Path  # a valid key of another certificate


@pytest.fixture
def tls(tmp_path: Path) -> TlsFiles:
    ca = trustme.CA()
    issued = ca.issue_cert("127.0.0.1", "localhost")
    files = TlsFiles(
        ca, tmp_path / "ca.pem", tmp_path / "cert.pem", tmp_path / "key.pem", tmp_path / "other.pem"
    )
    ca.cert_pem.write_to_path(str(files.ca_pem))
    issued.cert_chain_pems[0].write_to_path(str(files.cert))
    issued.private_key_pem.write_to_path(str(files.key))
    ca.issue_cert("127.0.0.1").private_key_pem.write_to_path(str(files.other_key))
    return files


async def post_reports(url: str, ca: trustme.CA, count: int) -> list[int]:
    """POST ``count`` reports, each on a new connection, trusting only ``ca``."""
    context = ssl.create_default_context()
    ca.configure_trust(context)
    statuses = []
    for index in range(count):
        connector = aiohttp.TCPConnector(ssl=context, force_close=True)
        async with aiohttp.ClientSession(connector=connector) as session:
            body = report_body(id=f"00000000-0000-4000-8000-{index:012d}")
            async with session.post(
                f"{url}/v1/version", json=body, headers={"User-Agent": OPA_UA}
            ) as response:
                statuses.append(response.status)
                assert "latest" in await response.json()
    return statuses


@pytest.mark.parametrize("workers", [1, 2])
async def test_serve_answers_https_that_verifies_against_its_ca(
    tmp_path: Path, tls: TlsFiles, workers: int
) -> None:
    db = tmp_path / "telemetry.db"
    argv = serve_argv(db, "--tls-cert", str(tls.cert), "--tls-key", str(tls.key))
    with serving([*argv, "--workers", str(workers)]) as (url, _):
        assert url.startswith("https://127.0.0.1:")
        assert await post_reports(url, tls.ca, 12) == [200] * 12

        # Verification is real: a client that does not trust the test CA refuses the server...
        async with aiohttp.ClientSession() as session:
            with pytest.raises(aiohttp.ClientConnectorCertificateError):
                await session.get(f"{url}/healthz")
        # ...and plain HTTP to the port gets no answer.
        async with aiohttp.ClientSession() as session:
            with pytest.raises(aiohttp.ClientError):
                await session.get(url.replace("https://", "http://") + "/healthz")

        # The project's own client (a fresh process: OpenSSL reads SSL_CERT_FILE at start).
        check = await asyncio.create_subprocess_exec(
            *(sys.executable, "-m", "opa_telemetry", "check", "--url", url, "--timeout", "20"),
            env={**os.environ, "SSL_CERT_FILE": str(tls.ca_pem)},
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )
        output = (await asyncio.wait_for(check.communicate(), 60))[0].decode()
        assert check.returncode == 0, output
        assert output.startswith("Latest Upstream Version: ")

    shards = [db, *(tmp_path / f"telemetry.worker{n}.db" for n in range(1, workers))]
    stored = 0
    for path in shards:
        if path.exists():
            with sqlite3.connect(path) as conn:
                stored += conn.execute("SELECT count(*) FROM reports").fetchone()[0]
    assert stored == 12 + 1  # and the client's own report


async def test_tls_files_can_come_from_env_vars(
    tmp_path: Path, tls: TlsFiles, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("OPA_TELEMETRY_SERVER_TLS_CERT", str(tls.cert))
    monkeypatch.setenv("OPA_TELEMETRY_SERVER_TLS_KEY", str(tls.key))
    with serving(serve_argv(tmp_path / "telemetry.db")) as (url, _):
        assert url.startswith("https://")
        assert await post_reports(url, tls.ca, 1) == [200]


@pytest.mark.parametrize("workers", ["1", "2"])
def test_unusable_tls_files_are_one_line_errors_before_anything_starts(
    tmp_path: Path, tls: TlsFiles, capsys: pytest.CaptureFixture[str], workers: str
) -> None:
    db = tmp_path / "telemetry.db"
    encrypted = tmp_path / "encrypted.pem"
    encrypted.write_text(
        "-----BEGIN ENCRYPTED PRIVATE KEY-----\nMIIB\n-----END ENCRYPTED PRIVATE KEY-----\n"
    )
    cases = {
        (tls.cert, tls.other_key): "the key does not belong to the certificate",
        (tmp_path / "missing.pem", tls.key): "missing.pem: no such file or directory",
        (tls.key, tls.cert): "not a PEM certificate",
        (tls.cert, tls.ca_pem): "not a PEM key",
        (tmp_path, tls.key): "is a directory",
    }
    for (cert, key), expected in cases.items():
        argv = ["serve", "--db", str(db), "--port", "0", "--workers", workers]
        assert main([*argv, "--tls-cert", str(cert), "--tls-key", str(key)]) == 1
        err = capsys.readouterr().err
        assert err.startswith("error: TLS ") and expected in err and err.count("\n") == 1, err
    assert not db.exists()  # refused before the database was created


def test_tls_cert_and_key_go_together(
    tmp_path: Path, tls: TlsFiles, capsys: pytest.CaptureFixture[str]
) -> None:
    db = str(tmp_path / "telemetry.db")
    assert main(["serve", "--db", db, "--tls-cert", str(tls.cert)]) == 2
    assert "tls_cert and tls_key go together" in capsys.readouterr().err
    assert main(["serve", "--db", db, "--tls-key", str(tls.key)]) == 2
    assert "tls_cert and tls_key go together" in capsys.readouterr().err
