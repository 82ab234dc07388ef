"""Where a server's CPU goes per request: run one load, read each thread's CPU time.

    python bench/cpu.py real --connections 64 --duration 5 --instances 20000
    python bench/cpu.py real --server-arg=--wal-checkpoint-pages=1000
    python bench/cpu.py bare
    python bench/cpu.py real --postgres

Starts the chosen server on 127.0.0.1 (``real``: the project's server on a fresh database,
``--no-access-log --rate-limit 0``; ``bare``: ``bench/bare_server.py``), drives it with the load
tester for ``--duration`` seconds, and prints the throughput and the CPU microseconds per
answered request for each of the server's threads (the event loop, SQLite's writer thread) and
for the load generator, so the whole budget of the machine's cores is on one screen. Linux
only: it reads /proc. Every process started is stopped.

``--postgres`` (``real`` only) runs the server on a private PostgreSQL cluster instead
(``tests/pgcluster.py``: ``initdb`` in a temporary directory, a free loopback port, as the
``postgres`` user when run as root, ``fsync=off``), and adds the CPU of every process of that
cluster over the load: the postmaster's children (the backends serving the server's pool, and
the WAL writer, checkpointer and other background processes), read from /proc, and the total
per durable report (a 200: its transaction committed) of the server and PostgreSQL together.
A backend that exits during the load is not counted (the server's pool keeps its connections).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

from run import bare_command, free_port, real_command, running  # bench/ is on sys.path

TICKS = os.sysconf("SC_CLK_TCK")


def thread_cpu(pid: int) -> dict[str, float]:
    """CPU seconds per thread of ``pid``, keyed by thread id and name."""
    result = {}
    for task in Path(f"/proc/{pid}/task").iterdir():
        fields = (task / "stat").read_text().rsplit(")", 1)[1].split()
        name = (task / "comm").read_text().strip()
        result[f"{task.name} {name}"] = (int(fields[11]) + int(fields[12])) / TICKS
    return result


def process_cpu(pid: int) -> tuple[int, float]:
    """The parent pid and the CPU seconds of process ``pid``."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return int(fields[1]), (int(fields[11]) + int(fields[12])) / TICKS


def cluster_cpu(postmaster: int, database: str) -> dict[str, float]:
    """CPU seconds of the postmaster and of each child, keyed by pid and role ("backend" for
    a connection to ``database``, else the process title, e.g. "walwriter")."""
    result = {f"{postmaster} postmaster": process_cpu(postmaster)[1]}
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            parent, seconds = process_cpu(int(proc.name))
            title = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode().strip()
        except (OSError, ValueError):
            continue  # exited meanwhile
        if parent == postmaster:
            role = title.removeprefix("postgres: ").split(" ")
            name = "backend" if database in role else " ".join(role)
            result[f"{proc.name} {name}"] = seconds
    return result


@contextlib.contextmanager
def postgres_database() -> Iterator[tuple[str, int, str]]:
    """A private cluster for the block: a new database's DSN, the postmaster's pid, its name."""
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from tests.pgcluster import running_cluster, unavailable_reason

    if reason := unavailable_reason():
        raise SystemExit(f"error: --postgres: {reason}")
    with running_cluster() as cluster:
        dsn = cluster.create_database()
        yield dsn, server_pid(cluster.port), dsn.rsplit("/", 1)[1]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("server", choices=["real", "bare"])
    parser.add_argument("--connections", type=int, default=64)
    parser.add_argument("--duration", type=float, default=5.0)
    parser.add_argument("--instances", type=int, default=20000)
    parser.add_argument(
        "--server-arg",
        action="append",
        default=[],
        metavar="ARG",
        help="extra flag for the real server, e.g. --server-arg=--batch-size=64",
    )
    parser.add_argument(
        "--postgres",
        action="store_true",
        help="real only: the server on a private PostgreSQL cluster; its processes' CPU too",
    )
    args = parser.parse_args()
    if not 0 < args.duration <= 120:
        parser.error("--duration must be in (0, 120]")
    if args.postgres and args.server != "real":
        parser.error("--postgres goes with real")
    cluster_before: dict[str, float] = {}
    cluster_after: dict[str, float] = {}
    with contextlib.ExitStack() as stack:
        tmp = stack.enter_context(tempfile.TemporaryDirectory(prefix="opa-telemetry-cpu-"))
        db, postmaster, database = str(Path(tmp) / "cpu.db"), 0, ""
        if args.postgres:
            db, postmaster, database = stack.enter_context(postgres_database())
        port = free_port()
        command = (bare_command(port, 1) if args.server == "bare"
                   else real_command(port, 1, db, *args.server_arg))  # fmt: skip
        with running(command, port):
            pid = server_pid(port)
            if postmaster:
                cluster_before = cluster_cpu(postmaster, database)
            before, started = thread_cpu(pid), time.monotonic()
            children = resource.getrusage(resource.RUSAGE_CHILDREN)
            load = subprocess.run(
                [sys.executable, "-m", "opa_telemetry.loadtest", f"http://127.0.0.1:{port}",
                 "--concurrency", str(args.connections), "--duration", str(args.duration),
                 "--instances", str(args.instances), "--json", "-"],
                capture_output=True, text=True, check=True, timeout=args.duration + 120,
            )  # fmt: skip
            after, elapsed = thread_cpu(pid), time.monotonic() - started
            finished = resource.getrusage(resource.RUSAGE_CHILDREN)
            if postmaster:
                cluster_after = cluster_cpu(postmaster, database)
    load_cpu = (finished.ru_utime + finished.ru_stime) - (children.ru_utime + children.ru_stime)
    out = load.stdout
    result = json.loads(out[out.index("{") :])
    answered = result["completed"]
    rps = result["throughput_rps"]
    durable = result["reports_acknowledged"]
    backend = "PostgreSQL" if args.postgres else "SQLite" if args.server == "real" else "none"
    print(f"{args.server} ({backend}): {rps:,.0f} req/s, {answered:,} answered"
          f" ({durable:,} durable reports) in {elapsed:.1f} s, {args.connections} connections,"
          f" {args.instances} instances")  # fmt: skip
    server_total = 0.0
    for thread, seconds in sorted(after.items()):
        used = seconds - before.get(thread, 0.0)
        server_total += used
        if used > 0.01:
            per_request = used / answered * 1e6
            print(f"  server thread {thread:<28} {used:6.2f} s  {per_request:6.1f} µs/request")
    cluster_total = 0.0
    for process, seconds in sorted(cluster_after.items(), key=lambda item: item[0].split(" ")[1]):
        used = seconds - cluster_before.get(process, 0.0)
        cluster_total += used
        if used > 0.01:
            per_request = used / answered * 1e6
            print(f"  postgres {process:<33} {used:6.2f} s  {per_request:6.1f} µs/request")
    print(f"  load generator (all its threads)     {load_cpu:6.2f} s"
          f"  {load_cpu / answered * 1e6:6.1f} µs/request")  # fmt: skip
    if args.server == "real" and durable:
        total = server_total + cluster_total
        where = " + PostgreSQL" if args.postgres else ""
        print(
            f"  CPU per durable report (server{where}): {total / durable * 1e6:.1f} µs"
            f" (server {server_total / durable * 1e6:.1f}"
            + (f", PostgreSQL {cluster_total / durable * 1e6:.1f})" if args.postgres else ")")
        )
    return 0


def server_pid(port: int) -> int:
    """The pid of the process listening on ``port`` (found through /proc/net/tcp)."""
    inodes = set()
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        parts = line.split()
        if parts[3] == "0A" and int(parts[1].split(":")[1], 16) == port:  # LISTEN
            inodes.add(parts[9])
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            links = {os.readlink(fd) for fd in (proc / "fd").iterdir()}
        except OSError:
            continue
        if any(f"socket:[{inode}]" in links for inode in inodes):
            return int(proc.name)
    raise RuntimeError(f"no process listens on port {port}")


if __name__ == "__main__":
    sys.exit(main())
