"""A private PostgreSQL cluster for the tests: ``initdb`` and ``pg_ctl`` in a temporary
directory, listening on a free loopback port and a Unix socket in that directory, removed at
the end.

PostgreSQL refuses to run as root, so when the tests run as root (as CI does) its binaries run
as the ``postgres`` system user (``runuser -u postgres --``) over a directory it owns. Where the
binaries are missing the tests that need them are skipped with the reason, unless
``OPA_TELEMETRY_REQUIRE_POSTGRES=1`` (set by ``.ci/run``) makes that a failure.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

REQUIRE_ENV = "OPA_TELEMETRY_REQUIRE_POSTGRES"
USER = "opa"
PASSWORD = "s3cret-" + uuid.uuid4().hex[:12]  # per run; tests check it never shows up


def bindir() -> Path | None:
    """Where ``initdb``/``pg_ctl`` live (``pg_config --bindir``, then Debian's usual place)."""
    candidates = []
    if pg_config := shutil.which("pg_config"):
        with contextlib.suppress(OSError, subprocess.CalledProcessError):
            out = subprocess.run(
                [pg_config, "--bindir"], capture_output=True, text=True, check=True, timeout=30
            )
            candidates.append(Path(out.stdout.strip()))
    candidates += sorted(Path("/usr/lib/postgresql").glob("*/bin"), reverse=True)
    return next((c for c in candidates if (c / "initdb").exists()), None)


def unavailable_reason() -> str | None:
    """Why a cluster cannot start here, or ``None`` when it can."""
    if bindir() is None:
        return "PostgreSQL server binaries not found (apt-get install -y postgresql)"
    if os.geteuid() == 0:
        try:
            pwd.getpwnam("postgres")
        except KeyError:
            return "running as root and there is no 'postgres' user to run PostgreSQL as"
    return None


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@dataclass
class Cluster:
    """A running private cluster; :meth:`dsn` names a database on it."""

    directory: Path
    port: int
    bin: Path

    @property
    def data(self) -> Path:
        return self.directory / "data"

    def dsn(self, database: str = "postgres", *, password: bool = True) -> str:
        secret = f":{PASSWORD}" if password else ""
        return f"postgresql://{USER}{secret}@127.0.0.1:{self.port}/{database}"

    def run(self, tool: str, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        """Run one of PostgreSQL's binaries as the cluster's owner."""
        argv = [str(self.bin / tool), *args]
        if os.geteuid() == 0:
            argv = ["runuser", "-u", "postgres", "--", *argv]
        return subprocess.run(argv, capture_output=True, text=True, check=check, timeout=120)

    def psql(self, sql: str, database: str = "postgres") -> str:
        out = self.run(
            "psql", "-h", str(self.directory), "-p", str(self.port), "-U", USER, "-d", database,
            "-v", "ON_ERROR_STOP=1", "-At", "-c", sql,
        )  # fmt: skip
        return out.stdout.strip()

    def create_database(self) -> str:
        """A new empty database owned by the test user; returns its DSN."""
        name = "t_" + uuid.uuid4().hex[:16]
        self.psql(f"CREATE DATABASE {name} OWNER {USER}")
        return self.dsn(name)

    def stop(self, mode: str = "fast") -> None:
        self.run("pg_ctl", "-D", str(self.data), "-m", mode, "-w", "stop", check=False)

    def start(self) -> None:
        options = (
            f"-c listen_addresses=127.0.0.1 -c port={self.port}"
            f" -c unix_socket_directories={self.directory}"
            " -c fsync=off -c full_page_writes=off -c max_connections=200"
            " -c log_min_messages=warning"
        )
        self.run(
            "pg_ctl", "-D", str(self.data), "-l", str(self.directory / "log"), "-o", options,
            "-w", "-t", "60", "start",
        )  # fmt: skip

    def restart(self, mode: str = "fast") -> None:
        self.stop(mode)
        self.start()


@contextlib.contextmanager
def running_cluster() -> Iterator[Cluster]:
    """Start a cluster for the duration of the block (``fsync=off``: the tests stop it
    cleanly, and a test of a crash uses an immediate stop, which keeps the WAL)."""
    binaries = bindir()
    assert binaries is not None, unavailable_reason()
    directory = Path(tempfile.mkdtemp(prefix="opa-telemetry-pg-"))
    cluster = Cluster(directory, free_port(), binaries)
    try:
        if os.geteuid() == 0:
            owner = pwd.getpwnam("postgres")
            os.chown(directory, owner.pw_uid, owner.pw_gid)
        password_file = directory / "pw"
        password_file.write_text(PASSWORD + "\n")
        if os.geteuid() == 0:
            os.chown(password_file, owner.pw_uid, owner.pw_gid)
        cluster.run(
            "initdb", "-D", str(cluster.data), "-U", USER, "--pwfile", str(password_file),
            "--auth-local=trust", "--auth-host=scram-sha-256", "-E", "UTF8", "--no-sync",
            "--locale=C",
        )  # fmt: skip
        password_file.unlink()
        cluster.start()
        yield cluster
    finally:
        cluster.stop("immediate")
        shutil.rmtree(directory, ignore_errors=True)
