"""Where a server's CPU goes per request: run one load, read each thread's CPU time.

    python bench/cpu.py real --connections 64 --duration 5 --instances 20000
    python bench/cpu.py real --server-arg=--wal-checkpoint-pages=1000
    python bench/cpu.py bare

Starts the chosen server on 127.0.0.1 (``real``: the project's server on a fresh database,
``--no-access-log --rate-limit 0``; ``bare``: ``bench/bare_server.py``), drives it with the load
tester for ``--duration`` seconds, and prints the throughput and the CPU microseconds per
answered request for each of the server's threads (the event loop, SQLite's writer thread) and
for the load generator, so the whole budget of the machine's cores is on one screen. Linux
only: it reads /proc. Every process started is stopped.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
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
    args = parser.parse_args()
    if not 0 < args.duration <= 120:
        parser.error("--duration must be in (0, 120]")
    with tempfile.TemporaryDirectory(prefix="opa-telemetry-cpu-") as tmp:
        port = free_port()
        command = (bare_command(port, 1) if args.server == "bare"
                   else real_command(port, 1, Path(tmp) / "cpu.db", *args.server_arg))  # fmt: skip
        with running(command, port):
            pid = server_pid(port)
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
    load_cpu = (finished.ru_utime + finished.ru_stime) - (children.ru_utime + children.ru_stime)
    out = load.stdout
    result = json.loads(out[out.index("{") :])
    answered = result["completed"]
    rps = result["throughput_rps"]
    print(f"{args.server}: {rps:,.0f} req/s, {answered:,} answered in {elapsed:.1f} s,"
          f" {args.connections} connections, {args.instances} instances")  # fmt: skip
    for thread, seconds in sorted(after.items()):
        used = seconds - before.get(thread, 0.0)
        if used > 0.01:
            per_request = used / answered * 1e6
            print(f"  server thread {thread:<28} {used:6.2f} s  {per_request:6.1f} µs/request")
    print(f"  load generator (all its threads)     {load_cpu:6.2f} s"
          f"  {load_cpu / answered * 1e6:6.1f} µs/request")  # fmt: skip
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
