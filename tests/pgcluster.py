"""A private PostgreSQL cluster for the tests: ``initdb`` and ``pg_ctl`` in a temporary
directory, listening on a free loopback port and a Unix socket in that directory, removed at
the end. A test of a failover makes a streaming-replication standby of one
(:func:`running_pair`): ``pg_basebackup -R`` into a directory of its own, its own port and
socket, synchronous or not, promoted with ``pg_ctl promote``.

PostgreSQL refuses to run as root, so when the tests run as root (as CI does) its binaries run
as the ``postgres`` system user (``runuser -u postgres --``) over a directory it owns. Where the
binaries are missing the tests that need them are skipped with the reason, unless
``OPA_TELEMETRY_REQUIRE_POSTGRES=1`` (set by ``.ci/run``) makes that a failure.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import shlex
import shutil
import socket
import subprocess
import tempfile
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
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
    settings: dict[str, str] = field(default_factory=dict)  # more ``-c`` options at start

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
        settings = {
            "listen_addresses": "127.0.0.1",
            "port": str(self.port),
            "unix_socket_directories": str(self.directory),
            "fsync": "off",
            "full_page_writes": "off",
            "max_connections": "200",
            "log_min_messages": "warning",
            **self.settings,
        }
        # pg_ctl hands the options to a shell: quote each one.
        options = " ".join(f"-c {shlex.quote(f'{k}={v}')}" for k, v in settings.items())
        self.run(
            "pg_ctl", "-D", str(self.data), "-l", str(self.directory / "log"), "-o", options,
            "-w", "-t", "60", "start",
        )  # fmt: skip

    def restart(self, mode: str = "fast") -> None:
        self.stop(mode)
        self.start()

    def is_running(self) -> bool:
        return self.run("pg_ctl", "-D", str(self.data), "status", check=False).returncode == 0

    def promote(self) -> None:
        """Make this standby a primary (``pg_ctl promote``), waiting until it takes writes."""
        self.run("pg_ctl", "-D", str(self.data), "-w", "-t", "60", "promote")

    def wait_for_standby(self, state: str = "streaming", timeout: float = 60.0) -> None:
        """Wait until a standby replicates from this primary: ``streaming``, or ``sync`` for
        one that every commit waits for."""
        query = {
            "streaming": "SELECT count(*) FROM pg_stat_replication WHERE state = 'streaming'",
            "sync": "SELECT count(*) FROM pg_stat_replication WHERE sync_state = 'sync'",
        }[state]
        deadline = time.monotonic() + timeout
        while self.psql(query) in ("", "0"):
            assert time.monotonic() < deadline, f"no {state} standby after {timeout:.0f}s"
            time.sleep(0.1)


def _own(path: Path) -> None:
    """Give ``path`` to the user PostgreSQL runs as."""
    if os.geteuid() == 0:
        owner = pwd.getpwnam("postgres")
        os.chown(path, owner.pw_uid, owner.pw_gid)


@contextlib.contextmanager
def running_cluster() -> Iterator[Cluster]:
    """Start a cluster for the duration of the block (``fsync=off``: the tests stop it
    cleanly, and a test of a crash uses an immediate stop, which keeps the WAL)."""
    binaries = bindir()
    assert binaries is not None, unavailable_reason()
    directory = Path(tempfile.mkdtemp(prefix="opa-telemetry-pg-"))
    cluster = Cluster(directory, free_port(), binaries)
    try:
        _own(directory)
        password_file = directory / "pw"
        password_file.write_text(PASSWORD + "\n")
        _own(password_file)
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


@contextlib.contextmanager
def running_standby(primary: Cluster) -> Iterator[Cluster]:
    """A hot standby of ``primary`` for the duration of the block: ``pg_basebackup -R`` (the
    bootstrap user may replicate over the local socket: initdb's pg_hba trusts it), then
    streaming from it. Stopped immediately and removed at the end."""
    directory = Path(tempfile.mkdtemp(prefix="opa-telemetry-pg-standby-"))
    standby = Cluster(directory, free_port(), primary.bin)
    try:
        _own(directory)
        primary.run(
            "pg_basebackup", "-h", str(primary.directory), "-p", str(primary.port), "-U", USER,
            "-D", str(standby.data), "-R", "-X", "stream", "--checkpoint=fast", "--no-sync",
        )  # fmt: skip
        standby.start()
        primary.wait_for_standby()
        yield standby
    finally:
        standby.stop("immediate")
        shutil.rmtree(directory, ignore_errors=True)


@contextlib.contextmanager
def running_pair(*, synchronous: bool) -> Iterator[tuple[Cluster, Cluster, str]]:
    """A primary, a streaming standby of it and a database on both: ``(primary, standby,
    database name)``. With ``synchronous``, every commit on the primary waits until the
    standby has it (``synchronous_standby_names = '*'``, ``synchronous_commit = on``); the
    standby's own settings leave it without a standby of its own once promoted."""
    with running_cluster() as primary:
        database = primary.create_database().rsplit("/", 1)[1]
        with running_standby(primary) as standby:
            if synchronous:
                # Set on the primary alone, after the base backup copied its configuration.
                primary.psql("ALTER SYSTEM SET synchronous_standby_names = '*'")
                primary.psql("ALTER SYSTEM SET synchronous_commit = on")
                primary.psql("SELECT pg_reload_conf()")
                primary.wait_for_standby("sync")
            yield primary, standby, database


def multi_host_dsn(clusters: list[Cluster], database: str, **query: str) -> str:
    """One DSN naming every cluster's host and port, in order (``host1:port1,host2:port2``),
    with ``query`` parameters such as ``target_session_attrs``."""
    hosts = ",".join(f"127.0.0.1:{cluster.port}" for cluster in clusters)
    params = "&".join(f"{key}={value}" for key, value in query.items())
    return f"postgresql://{USER}:{PASSWORD}@{hosts}/{database}" + (f"?{params}" if params else "")
