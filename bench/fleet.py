"""Build a fleet database for the statistics benchmarks, through the server's own write path.

    python bench/fleet.py --instances 100000 --days 90 --db /tmp/fleet.db
    python bench/fleet.py --instances 100000 --days 90 --db postgresql://user:pw@127.0.0.1/fleet

Simulates ``--instances`` OPA processes reporting every day for ``--days`` UTC days ending
today: one raw row per instance and day (``instances * days`` rows), written with
``Storage.write_batch`` (the ingest writer's own statement) at backdated times, then brings the
statistics aggregates up to date with ``Storage.aggregate`` as a running server would. Each day
about 8% of the processes restart with a new random id (OPA makes one at every start), and a
restart upgrades to the newest release published by then with probability 0.3; platforms,
heap usage and ``min_compatible_version`` follow fixed shares. Deterministic for a ``--seed``.
The database is opened with ``open_storage`` (the backend the ``--db`` value names: a new SQLite
file, with ``synchronous=off`` while it is built, or an empty PostgreSQL database, whose schema
is created) and written only through the ``Storage`` interface. The result is served as is:
``opa-telemetry-server serve --db PATH``.
"""

from __future__ import annotations

import argparse
import asyncio
import math
import random
import sys
import time
import uuid
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import TypeVar

from opa_telemetry_server.domain.protocol import Report
from opa_telemetry_server.domain.releases import Release, bundled_releases
from opa_telemetry_server.domain.versions import parse_version
from opa_telemetry_server.settings import Settings
from opa_telemetry_server.storage import is_postgres_url, open_storage

T = TypeVar("T")
BATCH = 5000
PLATFORMS = (
    (("linux", "amd64"), 0.70),
    (("linux", "arm64"), 0.15),
    (("darwin", "arm64"), 0.07),
    (("darwin", "amd64"), 0.03),
    (("windows", "amd64"), 0.05),
)
MIN_COMPATIBLE = ((None, 0.75), ("1.0.0", 0.20), ("0.60.0", 0.05))
RESTART_SHARE = 0.08
UPGRADE_SHARE = 0.3
CHECKS_PER_DAY = 500  # GitHub-style release checks (OPA >= 1.7) per day


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--instances", type=int, default=100_000)
    parser.add_argument("--days", type=int, default=90)
    parser.add_argument("--db", required=True, help="a new SQLite file or an empty PostgreSQL URL")
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args()
    if not 1 <= args.instances <= 1_000_000 or not 1 <= args.days <= 400:
        parser.error("--instances must be 1..1000000 and --days 1..400")
    postgres = is_postgres_url(args.db)
    if not postgres and Path(args.db).exists():
        parser.error(f"{args.db} exists: give a new path")
    asyncio.run(build(args.db, args.instances, args.days, random.Random(args.seed)))
    if not postgres:
        print(f"{args.db}: {Path(args.db).stat().st_size / 2**20:,.0f} MiB")
    return 0


async def build(db: str, instances: int, days: int, rng: random.Random) -> None:
    started = time.monotonic()
    # A long busy_timeout: on PostgreSQL it is the statement timeout, and the first
    # aggregation of a large fleet takes longer than a request would be allowed to.
    settings = Settings(db=db, synchronous="off", busy_timeout=600.0)
    storage = await open_storage(settings)
    try:
        if is_postgres_url(db) and await storage.release_counts():
            raise SystemExit(f"error: {storage.path} already holds data: give an empty database")
        releases = bundled_releases()
        await storage.seed_catalog("opa", releases)
        today = datetime.now(UTC).date()
        first = today - timedelta(days=days - 1)
        published = sorted(
            (r for r in releases if not r.prerelease and r.published),
            key=lambda r: r.version.precedence,
        )
        fleet = [_new_instance(rng, published, first, None) for _ in range(instances)]
        rows = 0
        for offset in range(days):
            day = first + timedelta(days=offset)
            # A moment of that day that has passed (today's reports are from earlier today).
            at = datetime(day.year, day.month, day.day, tzinfo=UTC).timestamp() + 60
            batch: list[Report] = []
            for index, instance in enumerate(fleet):
                if offset and rng.random() < RESTART_SHARE:
                    instance = fleet[index] = _new_instance(rng, published, day, instance)
                batch.append(instance._replace(heap_usage_bytes=_heap(rng, instance)))
                if len(batch) == BATCH:
                    await storage.write_batch(batch, [], at)
                    rows += len(batch)
                    batch = []
            await storage.write_batch(batch, ["opa"] * CHECKS_PER_DAY, at)
            rows += len(batch)
            print(f"\r{day} {rows:,} rows, {time.monotonic() - started:.0f} s", end="", flush=True)
        print()
        aggregating = time.monotonic()
        result = await storage.aggregate()
        print(
            f"aggregated {result.days} product-days in {time.monotonic() - aggregating:.1f} s;"
            f" {rows:,} raw rows, {time.monotonic() - started:.0f} s in all"
        )
    finally:
        await storage.close()


def _new_instance(
    rng: random.Random, published: list[Release], day: date, previous: Report | None
) -> Report:
    """A process started on ``day``: a new id; the previous one's version or, sometimes, the
    newest release published by then."""
    available = [r for r in published if r.published and r.published <= day] or published[:1]
    if previous is not None and rng.random() >= UPGRADE_SHARE:
        version = previous.version
    elif previous is not None:
        version = available[-1].version
    else:  # the starting fleet: mostly recent releases, a long tail of old ones
        position = len(available) - 1 - min(int(rng.expovariate(0.25)), len(available) - 1)
        version = available[position].version
    os_name, arch = _pick(rng, PLATFORMS)
    return Report(
        product="opa",
        instance_id=str(uuid.UUID(int=rng.getrandbits(128), version=4)),
        version=parse_version(version.text),
        os=os_name,
        arch=arch,
        heap_usage_bytes=None,
        min_compatible_version=_pick(rng, MIN_COMPATIBLE),
    )


def _heap(rng: random.Random, instance: Report) -> int:
    # Log-normal around 40 MiB, a little larger for newer minor versions.
    return int(math.exp(rng.gauss(math.log(40 * 2**20), 0.6)) * (1 + instance.version.minor / 100))


def _pick(rng: random.Random, shares: tuple[tuple[T, float], ...]) -> T:
    point = rng.random()
    for value, share in shares:
        point -= share
        if point < 0:
            return value
    return shares[-1][0]


if __name__ == "__main__":
    sys.exit(main())
