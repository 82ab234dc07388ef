"""The database schema, as numbered steps applied in order by ``PRAGMA user_version``.

Step N brings a database from version N-1 to N. Steps are append-only: a released step is
never edited, a change is a new step. Times are Unix seconds (``*_at``), days are UTC
``YYYY-MM-DD`` text so that statistics read naturally in the ``sqlite3`` shell.
"""

from __future__ import annotations

SCHEMA_V1 = (
    # The release catalog, per product. ``assets`` is a JSON array of asset names or URLs.
    """
    CREATE TABLE releases (
        id INTEGER PRIMARY KEY,
        product TEXT NOT NULL,
        tag TEXT NOT NULL,
        release_notes TEXT NOT NULL,
        assets TEXT NOT NULL DEFAULT '[]',
        published_on TEXT,
        prerelease INTEGER NOT NULL DEFAULT 0,
        added_at INTEGER NOT NULL,
        UNIQUE (product, tag)
    )
    """,
    # One row per (product, UTC day, instance id): an instance reporting hourly is one row a
    # day with a count. The id is OPA's random per-start UUID, never a machine identifier.
    """
    CREATE TABLE reports (
        product TEXT NOT NULL,
        day TEXT NOT NULL,
        instance_id TEXT NOT NULL,
        first_seen_at INTEGER NOT NULL,
        last_seen_at INTEGER NOT NULL,
        report_count INTEGER NOT NULL,
        version TEXT NOT NULL,
        os TEXT,
        arch TEXT,
        heap_usage_bytes INTEGER,
        min_compatible_version TEXT,
        PRIMARY KEY (product, day, instance_id)
    ) WITHOUT ROWID
    """,
    # Anonymous GitHub-style release checks (OPA >= 1.7): a count per product and day, nothing else.
    """
    CREATE TABLE version_checks (
        product TEXT NOT NULL,
        day TEXT NOT NULL,
        check_count INTEGER NOT NULL,
        PRIMARY KEY (product, day)
    ) WITHOUT ROWID
    """,
    "CREATE TABLE meta (key TEXT PRIMARY KEY, value INTEGER NOT NULL) WITHOUT ROWID",
    "INSERT INTO meta (key, value) VALUES ('catalog_generation', 0)",
    # Any change to the catalog, from this server, the CLI or a sqlite3 shell, bumps the
    # generation, which the server polls to refresh its in-memory copy.
    """
    CREATE TRIGGER releases_inserted AFTER INSERT ON releases BEGIN
        UPDATE meta SET value = value + 1 WHERE key = 'catalog_generation';
    END
    """,
    """
    CREATE TRIGGER releases_updated AFTER UPDATE ON releases BEGIN
        UPDATE meta SET value = value + 1 WHERE key = 'catalog_generation';
    END
    """,
    """
    CREATE TRIGGER releases_deleted AFTER DELETE ON releases BEGIN
        UPDATE meta SET value = value + 1 WHERE key = 'catalog_generation';
    END
    """,
)

SCHEMA_V2 = (
    # Body keys the operator allow-listed by name (--extra-keys), as one size-capped JSON object.
    "ALTER TABLE reports ADD COLUMN extra TEXT",
    # What survives retention: per product, UTC day, version and platform, the number of
    # instances and reports and heap usage percentiles. No instance ids.
    """
    CREATE TABLE daily_rollups (
        product TEXT NOT NULL,
        day TEXT NOT NULL,
        version TEXT NOT NULL,
        os TEXT NOT NULL,
        arch TEXT NOT NULL,
        instances INTEGER NOT NULL,
        reports INTEGER NOT NULL,
        heap_p50 INTEGER,
        heap_p90 INTEGER,
        heap_p99 INTEGER,
        PRIMARY KEY (product, day, version, os, arch)
    ) WITHOUT ROWID
    """,
)


def _bumps_generation(table: str) -> tuple[str, ...]:
    """Triggers that bump the catalog generation on any change to ``table``."""
    # ``table`` is one of this module's own table names, never input.
    return tuple(
        f"""
        CREATE TRIGGER {table}_{done} AFTER {event} ON {table} BEGIN
            UPDATE meta SET value = value + 1 WHERE key = 'catalog_generation';
        END
        """  # noqa: S608
        for event, done in (("INSERT", "inserted"), ("UPDATE", "updated"), ("DELETE", "deleted"))
    )


SCHEMA_V3 = (
    # The operator's policy per product: the pinned tag (nothing newer is announced) and the
    # minimum supported version with its notice URL.
    """
    CREATE TABLE product_policies (
        product TEXT PRIMARY KEY,
        pinned_tag TEXT,
        min_version TEXT,
        support_notice TEXT,
        updated_at INTEGER NOT NULL
    ) WITHOUT ROWID
    """,
    # Per release: yanked (never offered; its instances are told to move) and partial
    # rollouts (offered to rollout_percent % of instances). Kept apart from ``releases`` so
    # that a sync or an import never clears them.
    """
    CREATE TABLE release_policies (
        product TEXT NOT NULL,
        tag TEXT NOT NULL,
        yanked INTEGER NOT NULL DEFAULT 0,
        yank_reason TEXT NOT NULL DEFAULT '',
        rollout_percent INTEGER,
        updated_at INTEGER NOT NULL,
        PRIMARY KEY (product, tag)
    ) WITHOUT ROWID
    """,
    # Security advisories per product, each the OSV record as imported (JSON text).
    """
    CREATE TABLE advisories (
        product TEXT NOT NULL,
        id TEXT NOT NULL,
        record TEXT NOT NULL,
        added_at INTEGER NOT NULL,
        PRIMARY KEY (product, id)
    ) WITHOUT ROWID
    """,
    # What the last GitHub sync of a product saw: the source it read, the ETag of its first
    # page (for If-None-Match), the last success and the last error. Never the token.
    """
    CREATE TABLE sync_state (
        product TEXT PRIMARY KEY,
        source TEXT NOT NULL,
        etag TEXT,
        last_attempt_at INTEGER,
        last_success_at INTEGER,
        last_error TEXT,
        last_error_at INTEGER,
        retry_after_at INTEGER
    ) WITHOUT ROWID
    """,
    *_bumps_generation("product_policies"),
    *_bumps_generation("release_policies"),
    *_bumps_generation("advisories"),
)

SCHEMA_V4 = (
    # Statistics read from these aggregates, never from raw rows. A background task (see
    # ``insights.Aggregator``) rewrites the aggregates of each UTC day that changed since its
    # watermark, from the raw rows of every worker shard (an instance seen by two workers on
    # one day counts once). They hold no instance ids and outlive retention.
    # Per product and day: distinct instance ids, reports, GitHub-style release checks.
    """
    CREATE TABLE stats_days (
        product TEXT NOT NULL,
        day TEXT NOT NULL,
        instances INTEGER NOT NULL,
        reports INTEGER NOT NULL,
        version_checks INTEGER NOT NULL,
        PRIMARY KEY (product, day)
    ) WITHOUT ROWID
    """,
    """
    CREATE TABLE stats_versions (
        product TEXT NOT NULL,
        day TEXT NOT NULL,
        version TEXT NOT NULL,
        instances INTEGER NOT NULL,
        reports INTEGER NOT NULL,
        PRIMARY KEY (product, day, version)
    ) WITHOUT ROWID
    """,
    # os/arch '' when the User-Agent did not say.
    """
    CREATE TABLE stats_platforms (
        product TEXT NOT NULL,
        day TEXT NOT NULL,
        os TEXT NOT NULL,
        arch TEXT NOT NULL,
        instances INTEGER NOT NULL,
        PRIMARY KEY (product, day, os, arch)
    ) WITHOUT ROWID
    """,
    # min_compatible_version '' when the report did not carry one.
    """
    CREATE TABLE stats_min_compatible (
        product TEXT NOT NULL,
        day TEXT NOT NULL,
        min_compatible_version TEXT NOT NULL,
        instances INTEGER NOT NULL,
        PRIMARY KEY (product, day, min_compatible_version)
    ) WITHOUT ROWID
    """,
    # Heap usage as a log histogram per version: bucket b holds heaps in [2^(b/8), 2^((b+1)/8))
    # bytes (about 9% wide), so percentiles over any window merge exactly up to that width.
    """
    CREATE TABLE stats_heaps (
        product TEXT NOT NULL,
        day TEXT NOT NULL,
        version TEXT NOT NULL,
        bucket INTEGER NOT NULL,
        instances INTEGER NOT NULL,
        PRIMARY KEY (product, day, version, bucket)
    ) WITHOUT ROWID
    """,
    # The same histograms summed over every day up to and including ``day`` (written for each
    # day that has heaps), so that a window's histogram is two lookups and a subtraction
    # (``until`` minus the day before ``since``) whatever its length.
    """
    CREATE TABLE stats_heap_totals (
        product TEXT NOT NULL,
        day TEXT NOT NULL,
        version TEXT NOT NULL,
        bucket INTEGER NOT NULL,
        instances INTEGER NOT NULL,
        PRIMARY KEY (product, day, version, bucket)
    ) WITHOUT ROWID
    """,
    # Days that retention already rolled up (before this step) keep their counts.
    """
    INSERT INTO stats_days (product, day, instances, reports, version_checks)
    SELECT product, day, sum(instances), sum(reports), 0 FROM daily_rollups GROUP BY 1, 2
    """,
    """
    INSERT INTO stats_versions (product, day, version, instances, reports)
    SELECT product, day, version, sum(instances), sum(reports) FROM daily_rollups
    GROUP BY 1, 2, 3
    """,
    """
    INSERT INTO stats_platforms (product, day, os, arch, instances)
    SELECT product, day, os, arch, sum(instances) FROM daily_rollups GROUP BY 1, 2, 3, 4
    """,
    """
    UPDATE stats_days SET version_checks = (
        SELECT check_count FROM version_checks AS v
        WHERE v.product = stats_days.product AND v.day = stats_days.day
    ) WHERE EXISTS (
        SELECT 1 FROM version_checks AS v
        WHERE v.product = stats_days.product AND v.day = stats_days.day
    )
    """,
)

MIGRATIONS: tuple[tuple[str, ...], ...] = (SCHEMA_V1, SCHEMA_V2, SCHEMA_V3, SCHEMA_V4)
