"""TLS to PostgreSQL when the URL asks for it (``sslmode``), on the session's private cluster.

The cluster gets a certificate for 127.0.0.1 from a CA made here (trustme) and ``ssl=on`` by
``ALTER SYSTEM`` and a reload, undone at the end. The server's own view (``pg_stat_ssl``) says
whether our connections are encrypted; a server certificate from another CA is refused in one
line that shows no password.
"""

from __future__ import annotations

import asyncio
import os
import pwd
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import trustme

from opa_telemetry_server.errors import SchemaError
from opa_telemetry_server.settings import Settings
from opa_telemetry_server.storage import open_storage

from .pgcluster import PASSWORD


def _own(path: Path, mode: int) -> None:
    path.chmod(mode)
    if os.geteuid() == 0:
        owner = pwd.getpwnam("postgres")
        os.chown(path, owner.pw_uid, owner.pw_gid)


@pytest.fixture(scope="module")
def tls_cluster(postgres_cluster: Any) -> Iterator[tuple[Any, Path]]:
    """The session's cluster with TLS on; yields it and the path of the CA that signed it."""
    ca = trustme.CA()
    folder = postgres_cluster.directory
    cert, key, root = folder / "server.crt", folder / "server.key", folder / "root.crt"
    leaf = ca.issue_cert("127.0.0.1")
    leaf.cert_chain_pems[0].write_to_path(str(cert))
    leaf.private_key_pem.write_to_path(str(key))
    ca.cert_pem.write_to_path(str(root))
    _own(cert, 0o644)
    _own(key, 0o600)
    postgres_cluster.psql(f"ALTER SYSTEM SET ssl_cert_file = '{cert}'")
    postgres_cluster.psql(f"ALTER SYSTEM SET ssl_key_file = '{key}'")
    postgres_cluster.psql("ALTER SYSTEM SET ssl = on")
    postgres_cluster.psql("SELECT pg_reload_conf()")
    try:
        yield postgres_cluster, root
    finally:
        for name in ("ssl", "ssl_cert_file", "ssl_key_file"):
            postgres_cluster.psql(f"ALTER SYSTEM RESET {name}")
        postgres_cluster.psql("SELECT pg_reload_conf()")


def encrypted_connections(cluster: Any, database: str) -> list[str]:
    """``pg_stat_ssl.ssl`` of every client connection to ``database``, as the server sees it."""
    rows = cluster.psql(
        "SELECT s.ssl FROM pg_stat_ssl s JOIN pg_stat_activity a USING (pid)"  # noqa: S608 - a name we made
        f" WHERE a.datname = '{database}' AND a.application_name = 'opa-telemetry'"
    )
    return str(rows).split()


async def test_sslmode_verify_full_encrypts_every_connection(
    tls_cluster: tuple[Any, Path],
) -> None:
    cluster, root = tls_cluster
    dsn = cluster.create_database()
    database = dsn.rsplit("/", 1)[1]
    storage = await open_storage(
        Settings(db=f"{dsn}?sslmode=verify-full&sslrootcert={root}"), migrate=True
    )
    try:
        assert await storage.catalog_generation() >= 0
        assert encrypted_connections(cluster, database) == ["t"]
    finally:
        await storage.close()
    plain = await open_storage(Settings(db=f"{dsn}?sslmode=disable"), migrate=False)
    try:
        assert encrypted_connections(cluster, database) == ["f"]
    finally:
        await plain.close()


def test_every_command_takes_the_same_tls_url(
    tls_cluster: tuple[Any, Path], tmp_path: Path
) -> None:
    """``products`` over verify-full TLS; the same command against another CA fails in one
    line on stderr, exit 1."""
    cluster, root = tls_cluster
    url = f"{cluster.create_database()}?sslmode=verify-full&sslrootcert={root}"

    async def create_schema() -> None:  # only serve creates one; the storage layer does it here
        await (await open_storage(Settings(db=url), migrate=True)).close()

    asyncio.run(create_schema())
    command = [sys.executable, "-m", "opa_telemetry_server", "products", "--db"]
    done = subprocess.run([*command, url], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("PRODUCT")

    other = tmp_path / "other-ca.pem"
    trustme.CA().cert_pem.write_to_path(str(other))
    refused = url.replace(str(root), str(other))
    done = subprocess.run([*command, refused], capture_output=True, text=True, timeout=60)
    assert done.returncode == 1
    assert done.stderr.count("\n") == 1 and "certificate verify failed" in done.stderr
    assert PASSWORD not in done.stderr and "***" in done.stderr, done.stderr


async def test_a_certificate_not_trusted_is_not_waited_for(
    tls_cluster: tuple[Any, Path], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A server started before its database retries an unreachable one for
    ``--db-connect-wait`` seconds; a certificate from another CA will not change meanwhile."""
    cluster, _ = tls_cluster
    other = tmp_path / "other-ca.pem"
    trustme.CA().cert_pem.write_to_path(str(other))
    url = f"{cluster.create_database()}?sslmode=verify-full&sslrootcert={other}"
    with pytest.raises(SchemaError, match="certificate verify failed"):
        await open_storage(Settings(db=url), migrate=True, wait=60)
    assert "not reachable" not in caplog.text
