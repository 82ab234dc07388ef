"""``make bench``: the real server against a bare aiohttp baseline, side by side, in one run.

For 1 and 2 worker processes and 16, 64 and 256 connections, the same load (the project's load
tester and, when installed, ``wrk``) is driven at (a) ``bench/bare_server.py`` and (b) the real
server on a fresh database, and the table prints throughput, p50/p99 and the real/bare ratios.
The servers run at the same time and each row's loads alternate between them, so that drift
in a shared machine's speed hits both sides of a ratio alike; ``--repeat N`` measures each
row N times per server (rotating which goes first) and shows the medians.
Every real run is checked: the reports stored (the sum of per-instance report counts over every
database shard) must equal the 200s the load received. The load tester waits for its last
answers, so there the two are equal; ``wrk`` stops with one request per connection in flight,
which the server may have committed uncounted, so there 200s <= stored <= 200s + connections.
The "new-conn" rows send every request on a fresh TCP connection that the server closes after
answering (the load tester's ``--new-connection``; ``wrk`` with ``Connection: close``), as a
real fleet reports: each OPA once an hour, on a new connection. A last pair of rows shows
per-request commit (``--batch-size 1``) against group commit, and
the "skeleton" rows show the bare handler plus only a durable acknowledgement's waiting (no
validation, no storage; ``bare_server.py --await-batch``) against the plain bare handler: the
ceiling any server that answers after a commit reaches on this loop, before doing any work.

With ``--postgres`` (the default where PostgreSQL's server binaries are installed) the run also
starts a private PostgreSQL cluster (``tests/pgcluster.py``: ``initdb`` in a temporary
directory, on a free loopback port, as the ``postgres`` user when run as root; ``fsync=off``,
as in the tests) and adds the load tester's rows for one node (one ``serve`` process) and two
nodes (two ``serve`` processes on two ports, one database, each node driven by its own load
tester with half the connections; and, to tell the second node from the second load
generator, one node driven by two load testers), printed beside the real server on SQLite
with 1 and 2 workers. Their stored count is read from the database. The cluster is removed
at the end.
Everything listens on 127.0.0.1 only, every load is bounded by ``--duration``, and every
process started here is stopped here.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import re
import shutil
import signal
import socket
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))  # tests/pgcluster.py: the private PostgreSQL cluster
HOST = "127.0.0.1"
CONNECTIONS = (16, 64, 256)
NEW_CONNECTION_CONNECTIONS = 64  # concurrent connect-send-close loops in the "new-conn" rows


@dataclass
class Measure:
    rps: float
    p50: float
    p99: float
    ok: int  # 200 answers to reports
    in_flight_at_end: int = 0  # requests the tool abandoned uncounted when it stopped


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        return int(sock.getsockname()[1])


def wait_listening(port: int, process: subprocess.Popen[bytes], timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"server exited with {process.returncode} before listening")
        with contextlib.suppress(OSError), socket.create_connection((HOST, port), timeout=1):
            return
        time.sleep(0.1)
    raise RuntimeError(f"nothing listens on {HOST}:{port} after {timeout}s")


@contextlib.contextmanager
def running(command: Sequence[str], port: int) -> Iterator[None]:
    """Start a server process, wait until it listens, and always stop it (SIGTERM, then kill)."""
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, start_new_session=True)
    try:
        wait_listening(port, process)
        yield
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()


def bare_command(port: int, workers: int, *extra: str) -> list[str]:
    return [sys.executable, str(HERE / "bare_server.py"), "--port", str(port),
            "--workers", str(workers), *extra]  # fmt: skip


def real_command(port: int, workers: int, db: Path | str, *extra: str) -> list[str]:
    return [sys.executable, "-m", "opa_telemetry_server", "serve", "--host", HOST,
            "--port", str(port), "--db", str(db), "--workers", str(workers),
            "--no-access-log", "--log-level", "warning", "--rate-limit", "0",
            *extra]  # fmt: skip


def loadtest_command(port: int, connections: int, duration: float, new_connection: bool = False,
                     seed: int = 7) -> list[str]:  # fmt: skip
    """One load tester run; failures are counted, not fatal (exit 1 only if none succeeded)."""
    return [sys.executable, "-m", "opa_telemetry.loadtest", f"http://{HOST}:{port}",
            "--concurrency", str(connections), "--duration", str(duration),
            "--instances", "20000", "--seed", str(seed), "--max-failure-ratio", "1",
            "--json", "-", *(["--new-connection"] if new_connection else [])]  # fmt: skip


def parse_loadtest(out: str) -> Measure:
    result = json.loads(out)  # stdout holds only the JSON
    latency = result["latency_ms"]
    return Measure(result["throughput_rps"], latency["p50"], latency["p99"],
                   result["reports_acknowledged"])  # fmt: skip


def loadtest(port: int, connections: int, duration: float, new_connection: bool = False) -> Measure:
    out = subprocess.run(
        loadtest_command(port, connections, duration, new_connection),
        capture_output=True, text=True, check=True, timeout=duration + 120,
    ).stdout  # fmt: skip
    return parse_loadtest(out)


def split_loadtest(ports: Sequence[int], connections: int, duration: float) -> Measure:
    """One load tester per port, all at once, the connections split evenly between them (each
    with its own seed: different instances). Throughputs and 200s add up; the p50 is the
    load-weighted mean of theirs and the p99 the worst of theirs."""
    share = max(1, connections // len(ports))
    commands = [loadtest_command(port, share, duration, seed=7 + i) for i, port in enumerate(ports)]
    processes = [subprocess.Popen(c, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
                 for c in commands]  # fmt: skip
    measures = []
    for process in processes:
        out, err = process.communicate(timeout=duration + 120)
        if process.returncode != 0:
            raise RuntimeError(f"load tester exited with {process.returncode}: {err[-500:]}")
        measures.append(parse_loadtest(out))
    ok = sum(m.ok for m in measures)
    return Measure(
        sum(m.rps for m in measures),
        sum(m.p50 * m.ok for m in measures) / ok if ok else float("nan"),
        max(m.p99 for m in measures),
        ok,
    )


_WRK_UNITS = {"us": 0.001, "ms": 1.0, "s": 1000.0}


def wrk(port: int, connections: int, duration: float, new_connection: bool = False) -> Measure:
    out = subprocess.run(
        ["wrk", "-t1", f"-c{connections}", f"-d{max(1, round(duration))}s", "--latency",
         *(["-H", "Connection: close"] if new_connection else []),
         "-s", str(HERE / "wrk_report.lua"), f"http://{HOST}:{port}"],
        capture_output=True, text=True, check=True, timeout=duration + 60,
    ).stdout  # fmt: skip

    def latency(label: str) -> float:
        match = re.search(rf"^\s+{label}%\s+([\d.]+)(us|ms|s)\s*$", out, re.M)
        return float(match.group(1)) * _WRK_UNITS[match.group(2)] if match else float("nan")

    total = int(re.search(r"(\d+) requests in", out).group(1))  # type: ignore[union-attr]
    non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    errors = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
    failed = (int(non2xx.group(1)) if non2xx else 0) + (
        sum(int(n) for n in errors.groups()) if errors else 0
    )
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))  # type: ignore[union-attr]
    return Measure(rps, latency("50"), latency("99"), total - failed, connections)


def measure_row(
    ports: dict[str, int],
    names: list[str],
    drive: Callable[[int, int, float], Measure],
    connections: int,
    args: argparse.Namespace,
    db: Path,
    label: str,
    problems: list[str],
) -> tuple[dict[str, Measure], int]:
    """Load each named server ``args.repeat`` times, alternating; the medians per server and
    the reports the real server stored. Appends to ``problems`` if stored != acknowledged."""
    samples: dict[str, list[Measure]] = {name: [] for name in names}
    stored = 0
    for repeat in range(args.repeat):
        turn = repeat % len(names)  # rotated, so that no server always goes first
        for name in names[turn:] + names[:turn]:
            before = stored_reports(db) if name == "real" else 0
            measure = drive(ports[name], connections, args.duration)
            samples[name].append(measure)
            if name == "real":
                time.sleep(0.2)  # let the answers' transactions be visible to a reader
                got = stored_reports(db) - before
                stored += got
                if not measure.ok <= got <= measure.ok + measure.in_flight_at_end:
                    problems.append(f"{label}: stored {got}, acknowledged {measure.ok}")
    return {name: median(runs) for name, runs in samples.items()}, stored


def median(measures: Sequence[Measure]) -> Measure:
    """Medians of the rates and latencies of repeated loads; totals of their counts."""
    return Measure(
        statistics.median(m.rps for m in measures),
        statistics.median(m.p50 for m in measures),
        statistics.median(m.p99 for m in measures),
        sum(m.ok for m in measures),
        sum(m.in_flight_at_end for m in measures),
    )


def stored_reports(db: Path) -> int:
    """The sum of report counts over the main database and every worker shard."""
    total = 0
    for path in [db, *sorted(db.parent.glob(f"{db.stem}.worker*{db.suffix}"))]:
        if path.exists():
            with contextlib.closing(sqlite3.connect(path)) as conn:
                total += conn.execute(
                    "SELECT coalesce(sum(report_count), 0) FROM reports"
                ).fetchone()[0]
    return total


def machine() -> str:
    model = "unknown CPU"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    fast = []
    for name in ("uvloop", "orjson"):
        with contextlib.suppress(ImportError):
            module = __import__(name)
            fast.append(f"{name} {getattr(module, '__version__', '')}".strip())
    return (f"{os.cpu_count()} cores ({model}), Python {platform.python_version()}, "
            f"{', '.join(fast) or 'stdlib asyncio and json'}")  # fmt: skip


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--duration", type=float, default=5.0, help="seconds per load (5)")
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--connections", type=int, nargs="+", default=list(CONNECTIONS))
    parser.add_argument(
        "--server-arg",
        action="append",
        default=[],
        metavar="ARG",
        help="extra flag for the real server, e.g. --server-arg=--synchronous=normal",
    )
    parser.add_argument(
        "--repeat",
        type=int,
        default=1,
        help="loads per row and server, alternated; medians are shown (1)",
    )
    parser.add_argument(
        "--new-connection-conns",
        type=int,
        default=NEW_CONNECTION_CONNECTIONS,
        metavar="N",
        help=f"concurrent loops in the new-conn rows ({NEW_CONNECTION_CONNECTIONS})",
    )
    parser.add_argument(
        "--postgres",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="add PostgreSQL rows (1 and 2 nodes) on a private cluster; default: on where"
        " PostgreSQL's server binaries are installed",
    )
    parser.add_argument("--json", metavar="PATH", help="also write every measurement as JSON")
    args = parser.parse_args()
    from tests.pgcluster import unavailable_reason

    postgres_missing = unavailable_reason()
    if args.postgres and postgres_missing:
        parser.error(f"--postgres: {postgres_missing}")
    if args.postgres is None:
        args.postgres = postgres_missing is None
    if not 0 < args.duration <= 120:
        parser.error("--duration must be in (0, 120]")
    if not 1 <= args.repeat <= 9:
        parser.error("--repeat must be in [1, 9]")
    tools: list[tuple[str, Callable[..., Measure]]] = [("loadtest", loadtest)]
    if shutil.which("wrk"):
        tools.append(("wrk", wrk))
    # Each tool again, a new connection per request: (label, drive, connection counts).
    loads = [(tool, drive, args.connections) for tool, drive in tools] + [
        (f"{tool} new-conn", partial(drive, new_connection=True), [args.new_connection_conns])
        for tool, drive in tools
    ]
    print(f"machine: {machine()}")
    if args.server_arg:
        print(f"real server flags added: {' '.join(args.server_arg)}")
    if not shutil.which("wrk"):
        print("wrk not found: only the load tester drives the load (apt-get install wrk)")
    if not args.postgres:
        print(f"no PostgreSQL rows: {postgres_missing or '--no-postgres'}")
    rows: list[dict[str, Any]] = []
    problems: list[str] = []
    skeleton: dict[tuple[str, int], Measure] = {}
    with tempfile.TemporaryDirectory(prefix="opa-telemetry-bench-") as tmp:
        for workers in args.workers:
            db = Path(tmp) / f"real-{workers}.db"
            ports = {"bare": free_port(), "real": free_port(), "skeleton": free_port()}
            real = real_command(ports["real"], workers, db, *args.server_arg)
            commands = {"bare": bare_command(ports["bare"], workers), "real": real}
            if workers == 1:
                commands["skeleton"] = bare_command(ports["skeleton"], 1, "--await-batch")
            with contextlib.ExitStack() as servers:
                for name, command in commands.items():  # all up at once; an idle one costs nothing
                    servers.enter_context(running(command, ports[name]))
                for tool, drive, connection_counts in loads:
                    for connections in connection_counts:
                        label = f"{tool} w{workers} c{connections}"
                        medians, stored = measure_row(ports, list(commands), drive, connections,
                                                      args, db, label, problems)  # fmt: skip
                        rows.append(row(tool, workers, connections, medians["bare"],
                                        medians["real"], stored))  # fmt: skip
                        if "skeleton" in medians:
                            skeleton[tool, connections] = medians["skeleton"]
        per_request: dict[str, Measure] = {}
        for label, extra in (("group commit", ()), ("per-request commit", ("--batch-size", "1"))):
            db, port = Path(tmp) / f"commit-{len(per_request)}.db", free_port()
            with running(real_command(port, 1, db, *args.server_arg, *extra), port):
                per_request[label] = loadtest(port, 64, args.duration)
    postgres = postgres_rows(args, problems) if args.postgres else []
    print_table(rows, tools)
    print_summary(rows, per_request, args)
    print_skeleton(rows, skeleton)
    if postgres:
        print_backends(rows, postgres, args)
    for problem in problems:
        print(f"STORED CHECK FAILED: {problem}")
    if args.json:
        Path(args.json).write_text(json.dumps(
            {"machine": machine(), "rows": rows,
             "commit": {k: vars(v) for k, v in per_request.items()}, "postgres": postgres,
             "skeleton": [{"tool": tool, "connections": connections, **vars(measure)}
                          for (tool, connections), measure in skeleton.items()]},
            indent=1) + "\n")  # fmt: skip
    return 1 if problems else 0


def postgres_rows(args: argparse.Namespace, problems: list[str]) -> list[dict[str, Any]]:
    """The load tester against 1 and 2 ``serve`` nodes on one private PostgreSQL database."""
    from tests.pgcluster import running_cluster

    result = []
    with running_cluster() as cluster:
        # (nodes, load testers): one node is driven by one load tester, and by two (each with
        # half the connections) to tell apart what a second node and a second load
        # generator process each add on this machine.
        for nodes, loaders in ((1, 1), (1, 2), (2, 2)):
            dsn = cluster.create_database()
            database = dsn.rsplit("/", 1)[1]

            def stored(database: str = database) -> int:
                sql = "SELECT coalesce(sum(report_count), 0) FROM reports"
                return int(cluster.psql(sql, database))

            ports = [free_port() for _ in range(nodes)]
            with contextlib.ExitStack() as servers:
                for port in ports:  # one after the other: the first creates the schema
                    servers.enter_context(running(real_command(port, 1, dsn, *args.server_arg),
                                                  port))  # fmt: skip
                for connections in args.connections:
                    label = f"postgres n{nodes} l{loaders} c{connections}"
                    samples, total = [], 0
                    for _ in range(args.repeat):
                        before = stored()
                        targets = [ports[i % nodes] for i in range(loaders)]
                        measure = split_loadtest(targets, connections, args.duration)
                        time.sleep(0.2)
                        got = stored() - before
                        total += got
                        samples.append(measure)
                        if got != measure.ok:
                            problems.append(f"{label}: stored {got}, acknowledged {measure.ok}")
                    result.append({"nodes": nodes, "loaders": loaders, "connections": connections,
                                   "real": vars(median(samples)), "stored": total})  # fmt: skip
    return result


def print_backends(rows: list[dict[str, Any]], postgres: list[dict[str, Any]],
                   args: argparse.Namespace) -> None:  # fmt: skip
    print(
        "\nbackends, the load tester (PostgreSQL: private cluster, fsync=off; 2 nodes = 2 serve"
        " processes, 1 database, the load split between them, one load tester process per"
        " node; '2 loaders': 2 load tester processes on one node; SQLite: 1 load tester):"
    )
    print(f"{'backend':<34}{'conns':>6}{'req/s':>10}{'p50/p99 ms':>18}{'stored vs 200s':>16}")
    sqlite = {(r["workers"], r["connections"]): r for r in rows if r["tool"] == "loadtest"}
    pg = {(r["nodes"], r["loaders"], r["connections"]): r for r in postgres}
    for connections in args.connections:
        lines = [
            (f"SQLite, {w} worker{'s' * (w > 1)}", sqlite.get((w, connections))) for w in (1, 2)
        ] + [
            (f"PostgreSQL, {n} node{'s' * (n > 1)}{', 2 loaders' * (loaders > n)}",
             pg.get((n, loaders, connections)))
            for n, loaders in ((1, 1), (1, 2), (2, 2))
        ]  # fmt: skip
        for name, r in lines:
            if r is None:
                continue
            x = r["real"]
            check = "yes" if r["stored"] == x["ok"] else f"NO ({r['stored']} vs {x['ok']})"
            p = f"{x['p50']:.2f}/{x['p99']:.2f}"
            print(f"{name:<34}{connections:>6}{x['rps']:>10,.0f}{p:>18}{check:>16}")


def row(tool: str, workers: int, connections: int, bare: Measure, real: Measure,
        stored: int) -> dict[str, Any]:  # fmt: skip
    return {"tool": tool, "workers": workers, "connections": connections,
            "bare": vars(bare), "real": vars(real), "stored": stored,
            "ratio": real.rps / bare.rps if bare.rps else 0.0,
            "p99_ratio": real.p99 / bare.p99 if bare.p99 else float("nan")}  # fmt: skip


def print_table(rows: list[dict[str, Any]], tools: Sequence[tuple[str, Any]]) -> None:
    print(f"\n{'load':<18}{'workers':>7}{'conns':>6}{'bare req/s':>12}{'real req/s':>12}"
          f"{'real/bare':>10}{'bare p50/p99 ms':>17}{'real p50/p99 ms':>17}{'p99 ratio':>10}"
          f"{'stored vs 200s':>17}")  # fmt: skip
    for r in rows:
        b, x = r["bare"], r["real"]
        extra = r["stored"] - x["ok"]
        check = ("yes" if extra == 0 else f"+{extra} in flight"
                 if 0 < extra <= x["in_flight_at_end"] else f"NO ({r['stored']})")  # fmt: skip
        print(f"{r['tool']:<18}{r['workers']:>7}{r['connections']:>6}{b['rps']:>12,.0f}"
              f"{x['rps']:>12,.0f}{r['ratio']:>10.2f}{b['p50']:>9.2f}/{b['p99']:<7.2f}"
              f"{x['p50']:>9.2f}/{x['p99']:<7.2f}{r['p99_ratio']:>10.2f}{check:>17}")  # fmt: skip


def print_summary(rows: list[dict[str, Any]], commit: dict[str, Measure],
                  args: argparse.Namespace) -> None:  # fmt: skip
    print()
    by = {(r["tool"], r["workers"], r["connections"]): r for r in rows}
    for tool in sorted({r["tool"] for r in rows}):
        for connections in args.connections:
            one, two = by.get((tool, 1, connections)), by.get((tool, 2, connections))
            if one and two:
                print(f"{tool:<18} c{connections:<4} 2 workers / 1 worker: "
                      f"bare {two['bare']['rps'] / one['bare']['rps']:.2f}x, "
                      f"real {two['real']['rps'] / one['real']['rps']:.2f}x")  # fmt: skip
    group, single = commit["group commit"], commit["per-request commit"]
    print(
        f"\ncommit mode, 1 worker, 64 connections (load tester): group commit "
        f"{group.rps:,.0f} req/s (p99 {group.p99:.2f} ms), per-request commit "
        f"{single.rps:,.0f} req/s (p99 {single.p99:.2f} ms): {group.rps / single.rps:.2f}x"
    )
    print("\ntargets (same run): real/bare >= 0.9 at 64 and 256 connections, p99 <= 2x bare,"
          " 2 workers >= 1.5x 1 worker")  # fmt: skip


def print_skeleton(rows: list[dict[str, Any]], skeleton: dict[tuple[str, int], Measure]) -> None:
    print("\nskeleton of a durable answer (bare handler + batch wait, no validation, no storage),"
          " 1 worker:")  # fmt: skip
    by = {(r["tool"], r["connections"]): r for r in rows if r["workers"] == 1}
    for (tool, connections), measure in skeleton.items():
        r = by.get((tool, connections))
        if r:
            print(f"{tool:<18} c{connections:<4} skeleton {measure.rps:,.0f} req/s"
                  f" ({measure.rps / r['bare']['rps']:.2f} of bare, p99 {measure.p99:.2f} ms),"
                  f" real {r['ratio']:.2f} of bare")  # fmt: skip


if __name__ == "__main__":
    sys.exit(main())
