"""Which way to group-commit a batch of reports into PostgreSQL: measured side by side.

    python bench/pg_upsert.py --batches 200 --batch-size 1024

Starts a private PostgreSQL cluster (tests/pgcluster.py: initdb in a temporary directory, on
a free loopback port, as the ``postgres`` user when run as root), creates the ``reports``
table, and commits the same stream of batches three ways, in rotation so that drift on a
shared machine hits all three alike:

- ``unnest``: one ``INSERT ... SELECT FROM unnest($1::text[], ...) ON CONFLICT DO UPDATE``;
- ``executemany``: asyncpg's ``executemany`` of a one-row upsert (pipelined);
- ``copy``: ``COPY`` into a temporary table, then one ``INSERT ... SELECT ... ON CONFLICT``.

Half of each batch's instances are new, half reported earlier the same day (the steady state
of a fleet reporting hourly). It prints, per way, the median and p90 wall time of a batch's
transaction and the client CPU per report, then checks that two connections upserting the
same instances at once (in opposite orders) neither deadlock nor lose a count: batches are
sorted by key before they are sent, which is what keeps the row locks in one order.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import time
import uuid
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any

import asyncpg

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from tests.pgcluster import running_cluster

SCHEMA_SQL = """
CREATE TABLE reports (
    product text NOT NULL,
    day date NOT NULL,
    instance_id text NOT NULL,
    first_seen_at bigint NOT NULL,
    last_seen_at bigint NOT NULL,
    report_count integer NOT NULL,
    version text NOT NULL,
    os text,
    arch text,
    heap_usage_bytes bigint,
    min_compatible_version text,
    extra text,
    PRIMARY KEY (product, day, instance_id)
)
"""

UPSERT_SET = """
ON CONFLICT (product, day, instance_id) DO UPDATE SET
    last_seen_at = excluded.last_seen_at,
    report_count = reports.report_count + excluded.report_count,
    version = excluded.version, os = excluded.os, arch = excluded.arch,
    heap_usage_bytes = excluded.heap_usage_bytes,
    min_compatible_version = excluded.min_compatible_version, extra = excluded.extra
"""

UNNEST_SQL = (
    """
INSERT INTO reports (product, day, instance_id, first_seen_at, last_seen_at, report_count,
                     version, os, arch, heap_usage_bytes, min_compatible_version, extra)
SELECT r.product, $1, r.instance_id, $2, $2, r.n, r.version, r.os, r.arch, r.heap, r.mcv, r.extra
FROM unnest($3::text[], $4::text[], $5::int[], $6::text[], $7::text[], $8::text[],
            $9::bigint[], $10::text[], $11::text[])
     AS r(product, instance_id, n, version, os, arch, heap, mcv, extra)
"""
    + UPSERT_SET
)

ONE_ROW_SQL = (
    """
INSERT INTO reports (product, day, instance_id, first_seen_at, last_seen_at, report_count,
                     version, os, arch, heap_usage_bytes, min_compatible_version, extra)
VALUES ($3, $1, $4, $2, $2, $5, $6, $7, $8, $9, $10, $11)
"""
    + UPSERT_SET
)

MERGE_FROM_STAGE_SQL = (
    """
INSERT INTO reports (product, day, instance_id, first_seen_at, last_seen_at, report_count,
                     version, os, arch, heap_usage_bytes, min_compatible_version, extra)
SELECT product, $1, instance_id, $2, $2, n, version, os, arch, heap, mcv, extra
FROM stage ORDER BY product, instance_id
"""
    + UPSERT_SET
)

Row = tuple[str, str, int, str, str, str, int, str | None, str | None]


def make_batches(count: int, size: int) -> list[list[Row]]:
    """``count`` batches; half of each batch's instances appeared in an earlier batch."""
    seen: list[str] = []
    batches = []
    for number in range(count):
        ids = [str(uuid.uuid4()) for _ in range(size // 2)]
        ids += seen[-(size - len(ids)) :] if number else [str(uuid.uuid4()) for _ in ids]
        seen.extend(ids[: size // 2])
        batch: list[Row] = [
            ("opa", i, 1, "1.20.2", "linux", "amd64", 2_106_336, None, None) for i in ids
        ]
        batches.append(sorted(batch, key=lambda row: (row[0], row[1])))
    return batches


async def by_unnest(conn: asyncpg.Connection, day: Any, at: int, rows: Sequence[Row]) -> None:
    columns = list(zip(*rows, strict=True))
    async with conn.transaction():
        await conn.execute(UNNEST_SQL, day, at, *map(list, columns))


async def by_executemany(conn: asyncpg.Connection, day: Any, at: int, rows: Sequence[Row]) -> None:
    async with conn.transaction():
        await conn.executemany(ONE_ROW_SQL, [(day, at, *row) for row in rows])


async def by_copy(conn: asyncpg.Connection, day: Any, at: int, rows: Sequence[Row]) -> None:
    async with conn.transaction():
        await conn.execute(
            "CREATE TEMP TABLE IF NOT EXISTS stage (product text, instance_id text, n int,"
            " version text, os text, arch text, heap bigint, mcv text, extra text)"
            " ON COMMIT DELETE ROWS"
        )
        await conn.copy_records_to_table("stage", records=rows)
        await conn.execute(MERGE_FROM_STAGE_SQL, day, at)


Way = Callable[[asyncpg.Connection, Any, int, Sequence[Row]], Awaitable[None]]
WAYS: dict[str, Way] = {"unnest": by_unnest, "executemany": by_executemany, "copy": by_copy}


async def measure(dsn: str, batches: list[list[Row]]) -> None:
    conn = await asyncpg.connect(dsn)
    try:
        await conn.execute(SCHEMA_SQL)
        day = time.gmtime()
        timings: dict[str, list[float]] = {name: [] for name in WAYS}
        cpu: dict[str, float] = dict.fromkeys(WAYS, 0.0)
        for number, batch in enumerate(batches):
            names = list(WAYS)
            names = names[number % 3 :] + names[: number % 3]  # rotate who goes first
            for name in names:
                # Each way writes its own day, so each sees the same new/existing mix.
                target = _day(day, list(WAYS).index(name))
                started, cpu_started = time.perf_counter(), time.process_time()
                await WAYS[name](conn, target, int(time.time()), batch)
                timings[name].append(time.perf_counter() - started)
                cpu[name] += time.process_time() - cpu_started
        reports = sum(len(b) for b in batches)
        print(f"{len(batches)} batches of {len(batches[0])} reports, rotated; per batch:")
        header = ("way", "median ms", "p90 ms", "reports/s", "client µs/report")
        print("{:<12} {:>10} {:>8} {:>10} {:>17}".format(*header))
        for name, values in timings.items():
            ordered = sorted(values)
            median = statistics.median(ordered)
            p90 = ordered[int(0.9 * (len(ordered) - 1))]
            print(
                f"{name:<12} {median * 1000:>10.2f} {p90 * 1000:>8.2f}"
                f" {len(batches[0]) / median:>10.0f} {cpu[name] / reports * 1e6:>17.2f}"
            )
        counts = await conn.fetch(
            "SELECT day, sum(report_count) FROM reports GROUP BY day ORDER BY day"
        )
        assert len({total for _, total in counts}) == 1, f"the ways disagree: {counts}"
    finally:
        await conn.close()


def _day(base: time.struct_time, offset: int) -> Any:
    import datetime

    return datetime.date(base.tm_year, base.tm_mon, base.tm_mday) - datetime.timedelta(offset)


async def concurrent_same_instances(dsn: str, size: int, rounds: int) -> None:
    """Two connections upsert the same instances at once, one batch reversed unless sorted."""
    first, second = await asyncpg.connect(dsn), await asyncpg.connect(dsn)
    try:
        await first.execute("TRUNCATE reports")
        ids = sorted(str(uuid.uuid4()) for _ in range(size))
        rows = [("opa", i, 1, "1.20.2", "linux", "amd64", 1, None, None) for i in ids]
        day = _day(time.gmtime(), 0)
        for label, other in (("sorted both", rows), ("opposite orders", rows[::-1])):
            await first.execute("TRUNCATE reports")
            deadlocks = 0
            for _ in range(rounds):
                results = await asyncio.gather(
                    by_unnest(first, day, 1, rows),
                    by_unnest(second, day, 1, other),
                    return_exceptions=True,
                )
                deadlocks += sum(isinstance(r, asyncpg.DeadlockDetectedError) for r in results)
                for result in results:
                    if isinstance(result, BaseException) and not isinstance(
                        result, asyncpg.DeadlockDetectedError
                    ):
                        raise result
            total = await first.fetchval("SELECT sum(report_count) FROM reports")
            expected = (2 * rounds - deadlocks) * size
            print(
                f"two nodes, {label}: {rounds} rounds of {size} shared instances,"
                f" {deadlocks} deadlocks, counts {'exact' if total == expected else 'WRONG'}"
                f" ({total} of {expected})"
            )
    finally:
        await first.close()
        await second.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batches", type=int, default=120)
    parser.add_argument("--batch-size", type=int, default=1024)
    parser.add_argument("--rounds", type=int, default=30, help="concurrent-upsert rounds")
    args = parser.parse_args()
    batches = make_batches(args.batches, args.batch_size)
    with running_cluster() as cluster:
        dsn = cluster.create_database()
        asyncio.run(measure(dsn, batches))
        asyncio.run(concurrent_same_instances(dsn, args.batch_size, args.rounds))


if __name__ == "__main__":
    main()
