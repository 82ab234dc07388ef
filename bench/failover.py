"""How long a PostgreSQL failover keeps a node from taking reports, and what it loses.

Each run starts a private primary and a streaming standby (``tests/pgcluster.py``), one
``serve`` process whose ``--db`` names both (``host1:port1,host2:port2``), and a bounded load
from the load tester. Meanwhile a probe posts one report every 10 ms and notes each answer's
time. Then the primary stops at once (``pg_ctl stop -m immediate``), the standby is promoted
after ``--promote-after`` seconds, and the load runs to its end. Printed per run:

- outage: from the primary's end (``pg_ctl stop`` returned) to the first report sent after it
  and taken (the probe's view);
- after promotion: from ``pg_ctl promote``'s return to that first report (what the node adds;
  negative when the node found the new primary before the command returned);
- acknowledged (200s of the load and the probe), stored on the promoted server, and lost
  (acknowledged but not stored: should be 0 with synchronous replication).

    python bench/failover.py                       # 3 synchronous and 3 asynchronous runs
    python bench/failover.py --runs 1 --no-async   # one synchronous run

Everything listens on 127.0.0.1, every loop is bounded, the clusters are removed at the end.
"""

from __future__ import annotations

import argparse
import asyncio
import re
import statistics
import sys
import time
from pathlib import Path

import aiohttp
import asyncpg

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))  # tests/pgcluster.py: the private PostgreSQL clusters

from opa_telemetry.loadtest import LoadConfig, parse_target, run_load  # noqa: E402

LISTENING = re.compile(r"listening on (https?://\S+)")
PROBE_ID = "5b0d3c1e-0000-4000-8000-00000000f0f0"
PROBE_BODY = {"id": PROBE_ID, "version": "1.5.1", "heap_usage_bytes": "2106336"}
USER_AGENT = "Open Policy Agent/1.5.1 (linux, amd64)"


async def start_node(dsn: str) -> tuple[asyncio.subprocess.Process, str]:
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "opa_telemetry_server", "serve", "--port", "0", "--db", dsn,
        "--no-access-log", "--rate-limit", "0", "--retry-after", "1",
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.DEVNULL,
    )  # fmt: skip
    assert process.stdout is not None
    line = (await asyncio.wait_for(process.stdout.readline(), 90)).decode()
    match = LISTENING.search(line)
    if not match:
        raise RuntimeError(f"serve did not start: {line!r}")
    return process, match.group(1)


async def probe(url: str, until: float, answers: list[tuple[float, float, int]]) -> None:
    """One report every 10 ms until ``until`` (monotonic): (sent, answered, status) of each
    (status 0: no answer)."""
    timeout = aiohttp.ClientTimeout(total=10)
    async with aiohttp.ClientSession(timeout=timeout) as session:
        while time.monotonic() < until:
            sent = time.monotonic()
            try:
                async with session.post(
                    f"{url}/v1/version", json=PROBE_BODY, headers={"User-Agent": USER_AGENT}
                ) as response:
                    await response.read()
                    answers.append((sent, time.monotonic(), response.status))
            except (aiohttp.ClientError, TimeoutError):
                answers.append((sent, time.monotonic(), 0))
            await asyncio.sleep(0.01)


async def stored(dsn: str) -> int:
    conn = await asyncpg.connect(dsn)
    try:
        return int(await conn.fetchval("SELECT coalesce(sum(report_count), 0) FROM reports"))
    finally:
        await conn.close()


async def one_run(synchronous: bool, args: argparse.Namespace) -> dict[str, float]:
    from tests.pgcluster import multi_host_dsn, running_pair

    with running_pair(synchronous=synchronous) as (primary, standby, database):
        node, url = await start_node(multi_host_dsn([primary, standby], database))
        try:
            answers: list[tuple[float, float, int]] = []
            config = LoadConfig(
                parse_target(url), concurrency=args.concurrency, duration=args.duration,
                instances=5000, timeout=3.0,
            )  # fmt: skip
            load = asyncio.create_task(run_load(config))
            probing = asyncio.create_task(probe(url, time.monotonic() + args.duration + 5, answers))
            await asyncio.sleep(args.duration / 4)
            await asyncio.to_thread(primary.stop, "immediate")
            stopped = time.monotonic()  # the primary is gone (pg_ctl waited for it)
            await asyncio.sleep(args.promote_after)
            await asyncio.to_thread(standby.promote)
            promoted = time.monotonic()
            result = await load
            await probing
        finally:
            node.terminate()
            await asyncio.wait_for(node.wait(), 60)
        # The first report sent after the stop and taken (one in flight at the stop may have
        # been committed before it).
        back = next((done for sent, done, s in answers if sent > stopped and s == 200), None)
        if back is None:
            raise RuntimeError("the node never took a report after the failover")
        acknowledged = result.reports_ok + sum(1 for *_, status in answers if status == 200)
        kept = await stored(standby.dsn(database))
        return {
            "outage": back - stopped,
            "after_promotion": back - promoted,
            "acknowledged": acknowledged,
            "stored": kept,
            "lost": max(0, acknowledged - kept),
            "refused": sum(1 for sent, _, s in answers if sent > stopped and s == 503),
        }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=3, help="runs of each kind (default 3)")
    parser.add_argument("--concurrency", type=int, default=32, help="load connections (32)")
    parser.add_argument("--duration", type=float, default=6.0, help="load seconds (6)")
    parser.add_argument(
        "--promote-after", type=float, default=0.0,
        help="seconds between the primary's stop and the promotion (default 0)",
    )  # fmt: skip
    parser.add_argument(
        "--async", dest="asynchronous", action=argparse.BooleanOptionalAction, default=True,
        help="also run with asynchronous replication (default: yes)",
    )  # fmt: skip
    args = parser.parse_args()
    if not 1 <= args.runs <= 20 or not 0 < args.duration <= 120:
        parser.error("--runs must be 1-20 and --duration 0-120 seconds")
    from tests.pgcluster import unavailable_reason

    if reason := unavailable_reason():
        parser.error(reason)
    kinds = [True, False] if args.asynchronous else [True]
    print(f"{'replication':<12} {'run':>3} {'outage s':>9} {'after promotion s':>18}"
          f" {'503s':>5} {'acknowledged':>12} {'stored':>7} {'lost':>5}")  # fmt: skip
    for synchronous in kinds:
        outages = []
        for run in range(1, args.runs + 1):
            row = asyncio.run(one_run(synchronous, args))
            outages.append(row["outage"])
            print(f"{'synchronous' if synchronous else 'asynchronous':<12} {run:>3}"
                  f" {row['outage']:>9.2f} {row['after_promotion']:>+18.3f} {row['refused']:>5}"
                  f" {row['acknowledged']:>12} {row['stored']:>7} {row['lost']:>5}",
                  flush=True)  # fmt: skip
        print(f"  median outage {statistics.median(outages):.2f} s"
              f" (promotion {args.promote_after:g} s after the stop)")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
