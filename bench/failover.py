"""How long a PostgreSQL failover keeps a node from taking reports, and what it loses.

Each run starts a private primary and a streaming standby (``tests/pgcluster.py``), one
``serve`` process whose ``--db`` names both (``host1:port1,host2:port2``), and a bounded load
from the load tester. Meanwhile a probe of ``--probes`` concurrent posters (4 by default) each
posts one report every 10 ms, every report with an instance id of its own, and notes each
answer's time and status. Then the primary stops at once (``pg_ctl stop -m immediate``), the
standby is promoted after ``--promote-after`` seconds, and the load runs to its end. Printed
per run:

- stop: how long ``pg_ctl stop -m immediate`` took (the primary dies somewhere in it);
- gap: the longest time between two probe reports taken (200), the outage a client sees;
- outage: from ``pg_ctl stop``'s return to the first probe report sent after it and taken;
- vs promote: from ``pg_ctl promote``'s return to that first report (what the node adds;
  negative when the node found the new primary before the command returned);
- the probe, exactly (each report's id looked up on the promoted server): reports in flight
  during the stop, answered 503, without an answer (cut, timeout), acknowledged (200),
  acknowledged but missing (a real loss: should be 0 with synchronous replication), and
  stored without a 200 (committed although the client never heard so);
- the load, as a bound: acknowledged (200s), other answers and errors, stored (every report
  in the table but the probe's), and acknowledged - stored: only a lower bound of the load's
  losses, since a report committed whose 200 never arrived counts as stored and can hide one
  acknowledged and lost.

    python bench/failover.py                       # 3 synchronous and 3 asynchronous runs
    python bench/failover.py --runs 1 --no-async   # one synchronous run
    python bench/failover.py --runs 6 --no-sync    # six asynchronous runs

Everything listens on 127.0.0.1, every loop is bounded, the clusters are removed at the end.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import re
import statistics
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import asyncpg

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))  # tests/pgcluster.py: the private PostgreSQL clusters

from opa_telemetry.loadtest import LoadConfig, parse_target, run_load  # noqa: E402

LISTENING = re.compile(r"listening on (https?://\S+)")
USER_AGENT = "Open Policy Agent/1.5.1 (linux, amd64)"
PROBE_INTERVAL = 0.01  # seconds between one poster's answer and its next report
PROBE_LIMIT = 50_000  # reports per run at most, whatever the duration


def probe_ids() -> Iterator[str]:
    """One instance id per probe report, from a counter (lower case, as the server stores
    it; the load's ids are random version-4 UUIDs, this prefix is none of them in practice)."""
    return (f"5b0d3c1e-f0f0-4000-8000-{n:012x}" for n in itertools.count(1))


@dataclass(frozen=True, order=True)
class Answer:
    sent: float  # monotonic
    answered: float
    status: int  # 0: no answer (cut, timeout)


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


async def probe(url: str, posters: int, until: float, answers: dict[str, Answer]) -> None:
    """``posters`` loops each posting one report every 10 ms until ``until`` (monotonic), or
    until :data:`PROBE_LIMIT` reports in all; ``answers`` maps each report's id to its answer."""
    ids = probe_ids()
    headers = {"User-Agent": USER_AGENT}

    async def poster(session: aiohttp.ClientSession) -> None:
        while time.monotonic() < until and len(answers) < PROBE_LIMIT:
            instance = next(ids)
            body = {"id": instance, "version": "1.5.1", "heap_usage_bytes": "2106336"}
            sent = time.monotonic()
            try:
                async with session.post(f"{url}/v1/version", json=body, headers=headers) as r:
                    await r.read()
                    status = r.status
            except (aiohttp.ClientError, TimeoutError):
                status = 0
            answers[instance] = Answer(sent, time.monotonic(), status)
            await asyncio.sleep(PROBE_INTERVAL)

    timeout = aiohttp.ClientTimeout(total=10)
    async with aiohttp.ClientSession(timeout=timeout) as session:
        await asyncio.gather(*(poster(session) for _ in range(posters)))


async def stored(dsn: str, probed: list[str]) -> tuple[set[str], int]:
    """Which of the probe's ids the server at ``dsn`` holds, and the reports it holds besides
    (the load's)."""
    conn = await asyncpg.connect(dsn)
    try:
        rows = await conn.fetch(
            "SELECT instance_id FROM reports WHERE instance_id = ANY($1::text[])", probed
        )
        others = await conn.fetchval(
            "SELECT coalesce(sum(report_count), 0) FROM reports"
            " WHERE NOT (instance_id = ANY($1::text[]))",
            probed,
        )
        return {row["instance_id"] for row in rows}, int(others)
    finally:
        await conn.close()


async def one_run(
    synchronous: bool, args: argparse.Namespace
) -> tuple[dict[str, float], list[Answer]]:
    """The run's row (see :data:`COLUMNS`), and each probe report acknowledged but missing
    (its times counted from the stop's start)."""
    from tests.pgcluster import multi_host_dsn, running_pair

    with running_pair(synchronous=synchronous) as (primary, standby, database):
        node, url = await start_node(multi_host_dsn([primary, standby], database))
        try:
            answers: dict[str, Answer] = {}
            config = LoadConfig(
                parse_target(url), concurrency=args.concurrency, duration=args.duration,
                instances=5000, timeout=3.0,
            )  # fmt: skip
            load = asyncio.create_task(run_load(config))
            until = time.monotonic() + args.duration + 5
            probing = asyncio.create_task(probe(url, args.probes, until, answers))
            await asyncio.sleep(args.duration / 4)
            stopping = time.monotonic()
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
        after = [a.answered for a in answers.values() if a.sent > stopped and a.status == 200]
        if not after:
            raise RuntimeError("the node never took a report after the failover")
        back = min(after)
        taken = sorted(a.answered for a in answers.values() if a.status == 200)
        acknowledged = {i for i, a in answers.items() if a.status == 200}
        kept, load_stored = await stored(standby.dsn(database), list(answers))
        missing = sorted(
            Answer(a.sent - stopping, a.answered - stopping, a.status)
            for a in (answers[i] for i in acknowledged - kept)
        )
        return {
            "outage": back - stopped,
            "after_promotion": back - promoted,
            "refused": sum(1 for a in answers.values() if a.status == 503),
            "unanswered": sum(1 for a in answers.values() if a.status == 0),
            "stop": stopped - stopping,
            "gap": max(b - a for a, b in itertools.pairwise(taken)),
            "in_flight": sum(
                1 for a in answers.values() if a.sent < stopped and a.answered > stopping
            ),
            "probe_acknowledged": len(acknowledged),
            "probe_missing": len(acknowledged - kept),
            "probe_stored_without_200": len(kept - acknowledged),
            "load_acknowledged": result.reports_ok,
            "load_other": result.sent - result.reports_ok,
            "load_stored": load_stored,
            "load_lost_bound": max(0, result.reports_ok - load_stored),
        }, missing


# Printed after the replication and the run: groups (timings, the probe, the load) of
# (title, key in one_run's row, format) columns.
COLUMNS = [
    [("stop s", "stop", ".3f"), ("gap s", "gap", ".2f"), ("outage s", "outage", ".2f"),
     ("vs promote s", "after_promotion", "+.3f")],
    [("in flight", "in_flight", "d"), ("503s", "refused", "d"), ("no answer", "unanswered", "d"),
     ("probe 200", "probe_acknowledged", "d"), ("200 missing", "probe_missing", "d"),
     ("stored w/o 200", "probe_stored_without_200", "d")],
    [("load 200", "load_acknowledged", "d"), ("not 200", "load_other", "d"),
     ("stored", "load_stored", "d"), ("lost >=", "load_lost_bound", "d")],
]  # fmt: skip


def header() -> str:
    groups = (" ".join(title for title, *_ in group) for group in COLUMNS)
    return f"{'replication':<12} {'run':>3} " + " | ".join(groups)


def row_line(kind: str, run: int, row: dict[str, float]) -> str:
    groups = (
        " ".join(f"{int(row[key]) if spec == 'd' else row[key]:{spec}}".rjust(len(title))
                 for title, key, spec in group)
        for group in COLUMNS
    )  # fmt: skip
    return f"{kind:<12} {run:>3} " + " | ".join(groups)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=3, help="runs of each kind (default 3)")
    parser.add_argument("--concurrency", type=int, default=32, help="load connections (32)")
    parser.add_argument("--duration", type=float, default=6.0, help="load seconds (6)")
    parser.add_argument("--probes", type=int, default=4, help="concurrent probe posters (4)")
    parser.add_argument(
        "--promote-after", type=float, default=0.0,
        help="seconds between the primary's stop and the promotion (default 0)",
    )  # fmt: skip
    parser.add_argument(
        "--async", dest="asynchronous", action=argparse.BooleanOptionalAction, default=True,
        help="also run with asynchronous replication (default: yes)",
    )  # fmt: skip
    parser.add_argument(
        "--sync", dest="synchronous", action=argparse.BooleanOptionalAction, default=True,
        help="run with synchronous replication (default: yes)",
    )  # fmt: skip
    args = parser.parse_args()
    if not 1 <= args.runs <= 20 or not 0 < args.duration <= 120 or not 1 <= args.probes <= 16:
        parser.error("--runs must be 1-20, --duration 0-120 seconds and --probes 1-16")
    if not 0 <= args.promote_after <= 60:
        parser.error("--promote-after must be 0-60 seconds")
    from tests.pgcluster import unavailable_reason

    if reason := unavailable_reason():
        parser.error(reason)
    kinds = [
        kind for kind, wanted in ((True, args.synchronous), (False, args.asynchronous)) if wanted
    ]
    if not kinds:
        parser.error("--no-sync and --no-async leave nothing to run")
    print(header())
    for synchronous in kinds:
        kind = "synchronous" if synchronous else "asynchronous"
        outages, missing = [], 0
        for run in range(1, args.runs + 1):
            row, lost_at = asyncio.run(one_run(synchronous, args))
            outages.append(row["outage"])
            missing += int(row["probe_missing"])
            print(row_line(kind, run, row), flush=True)
            if lost_at:
                print("    acknowledged but missing (sent..answered, ms from the stop's start): "
                      + ", ".join(f"{a.sent * 1000:+.0f}..{a.answered * 1000:+.0f}"
                                  for a in lost_at), flush=True)  # fmt: skip
        print(f"  {kind}: median outage {statistics.median(outages):.2f} s (promotion"
              f" {args.promote_after:g} s after the stop); probe reports acknowledged but"
              f" missing: {missing}")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
