"""Time every statistics route, and ``stats --days 90``, against a fleet database.

    python bench/fleet.py --instances 100000 --days 90 --db /tmp/fleet.db
    python bench/stats.py --db /tmp/fleet.db
    python bench/stats.py --db postgresql://user:pw@127.0.0.1/fleet

Starts the real server on the database (``--admin-token``, ``--public-stats``; a fresh
process, so its first answers are cold), asks each route once the moment it listens (cold),
then ``--repeat`` more times (warm), and prints each route's cold time and warm median and
maximum, in milliseconds, client side (request sent to body read, one kept-alive connection).
Then runs ``opa-telemetry-server stats --days 90 --json`` ``--cli-runs`` times and prints its
wall time (a whole process: interpreter start, imports, the query), beside the time of
``opa-telemetry-server --version`` (interpreter start and imports alone). Every process
started is stopped. ``--db`` may name a PostgreSQL database (``postgresql://...``): the server
process is fresh, so its pool and caches are cold, but PostgreSQL's own buffer cache is whatever
the database's recent use left in it.
"""

from __future__ import annotations

import argparse
import http.client
import statistics
import subprocess
import sys
import time
from pathlib import Path

from run import HOST, free_port, real_command, running  # bench/ is on sys.path

from opa_telemetry_server.storage import is_postgres_url

TOKEN = "bench-token-0123456789"  # noqa: S105 - a local benchmark's token
ROUTES = (
    ("/v1/stats?days=90", True),
    ("/v1/stats?days=30", True),
    ("/v1/stats?days=7", True),
    ("/v1/stats?days=1", True),
    ("/v1/stats?days=400", True),
    ("/v1/stats?days=90 (public)", False),
    ("/v1/products", True),
    ("/metrics", True),
)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--db", required=True, help="a SQLite file or a PostgreSQL URL")
    parser.add_argument("--repeat", type=int, default=20)
    parser.add_argument("--cli-runs", type=int, default=5)
    args = parser.parse_args()
    postgres = is_postgres_url(args.db)
    if not postgres and not Path(args.db).exists():
        parser.error(f"{args.db}: no such database (make one with bench/fleet.py)")
    if not 1 <= args.repeat <= 1000 or not 1 <= args.cli_runs <= 50:
        parser.error("--repeat must be 1..1000 and --cli-runs 1..50")
    port = free_port()
    command = real_command(port, 1, args.db, "--admin-token", TOKEN, "--public-stats")
    cold: dict[str, float] = {}
    warm: dict[str, list[float]] = {route: [] for route, _ in ROUTES}
    sizes: dict[str, int] = {}
    with running(command, port):
        connection = http.client.HTTPConnection(HOST, port, timeout=30)
        for route, auth in ROUTES:
            cold[route], sizes[route] = timed(connection, route, auth)
        for _ in range(args.repeat):
            for route, auth in ROUTES:
                warm[route].append(timed(connection, route, auth)[0])
        connection.close()
    where = (redact(args.db) if postgres
             else f"{args.db} ({Path(args.db).stat().st_size / 2**20:,.0f} MiB)")  # fmt: skip
    print(f"{where}, {args.repeat} warm requests")
    print(f"{'route':<30} {'bytes':>9} {'cold ms':>8} {'warm median':>12} {'warm max':>9}")
    for route, _ in ROUTES:
        times = warm[route]
        print(f"{route:<30} {sizes[route]:>9,} {cold[route]:>8.1f}"
              f" {statistics.median(times):>12.1f} {max(times):>9.1f}")  # fmt: skip
    server = [sys.executable, "-m", "opa_telemetry_server"]
    cli = [*server, "stats", "--db", str(args.db), "--days", "90", "--json"]
    runs = [wall(cli) for _ in range(args.cli_runs)]
    baseline = [wall([*server, "--version"]) for _ in range(args.cli_runs)]
    print(f"stats --days 90 --json: median {statistics.median(runs) * 1000:.0f} ms,"
          f" min {min(runs) * 1000:.0f} ms ({args.cli_runs} runs);"
          f" --version alone: median {statistics.median(baseline) * 1000:.0f} ms")  # fmt: skip
    return 0


def redact(dsn: str) -> str:
    """The URL without its password, for the printed table."""
    head, sep, tail = dsn.rpartition("@")
    scheme, _, credentials = head.partition("://")
    return f"{scheme}://{credentials.split(':')[0]}:***@{tail}" if sep else dsn


def timed(connection: http.client.HTTPConnection, route: str, auth: bool) -> tuple[float, int]:
    """Milliseconds from sending the request to reading the whole body, and its size."""
    path = route.split(" ")[0]
    headers = {"Authorization": f"Bearer {TOKEN}"} if auth else {}
    started = time.perf_counter()
    connection.request("GET", path, headers=headers)
    response = connection.getresponse()
    body = response.read()
    elapsed = (time.perf_counter() - started) * 1000
    if response.status != 200:
        raise RuntimeError(f"{route}: {response.status} {body[:200]!r}")
    return elapsed, len(body)


def wall(command: list[str]) -> float:
    started = time.perf_counter()
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL, timeout=60)
    return time.perf_counter() - started


if __name__ == "__main__":
    sys.exit(main())
