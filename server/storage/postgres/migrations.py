"""PostgreSQL's schema, as numbered steps: step N brings a database from version N-1 to N.

Steps are append-only: a released step is never edited, a change is a new step. The backend
applies them under an advisory lock, so nodes that start together migrate once, and records
the version in ``meta``.
"""

from __future__ import annotations

MIGRATIONS: tuple[tuple[str, ...], ...] = (
    (
        "CREATE TABLE meta (key text PRIMARY KEY, value bigint NOT NULL)",
        "INSERT INTO meta (key, value) VALUES ('catalog_generation', 0)",
        """
        CREATE TABLE releases (
            id bigserial PRIMARY KEY,
            product text NOT NULL,
            tag text NOT NULL,
            release_notes text NOT NULL,
            assets text NOT NULL DEFAULT '[]',
            published_on date,
            prerelease boolean NOT NULL DEFAULT false,
            added_at bigint NOT NULL,
            UNIQUE (product, tag)
        )
        """,
        # Any change to the catalog, from any node, the CLI or psql, bumps the generation
        # (which every node polls) and notifies listeners of channel opa_telemetry_catalog at
        # once (no node listens today: a tool may).
        """
        CREATE FUNCTION bump_catalog_generation() RETURNS trigger LANGUAGE plpgsql AS $$
        BEGIN
            UPDATE meta SET value = value + 1 WHERE key = 'catalog_generation';
            PERFORM pg_notify('opa_telemetry_catalog', '');
            RETURN NULL;
        END $$
        """,
        # Per row, not per statement: a statement that changes nothing must not bump it.
        """
        CREATE TRIGGER releases_changed AFTER INSERT OR UPDATE OR DELETE
        ON releases FOR EACH ROW EXECUTE FUNCTION bump_catalog_generation()
        """,
        """
        CREATE TRIGGER releases_truncated AFTER TRUNCATE
        ON releases FOR EACH STATEMENT EXECUTE FUNCTION bump_catalog_generation()
        """,
        """
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
        """,
        """
        CREATE TABLE version_checks (
            product text NOT NULL,
            day date NOT NULL,
            check_count bigint NOT NULL,
            PRIMARY KEY (product, day)
        )
        """,
        """
        CREATE TABLE product_policies (
            product text PRIMARY KEY,
            pinned_tag text,
            min_version text,
            support_notice text,
            updated_at bigint NOT NULL
        )
        """,
        """
        CREATE TABLE release_policies (
            product text NOT NULL,
            tag text NOT NULL,
            yanked boolean NOT NULL DEFAULT false,
            yank_reason text NOT NULL DEFAULT '',
            rollout_percent integer,
            updated_at bigint NOT NULL,
            PRIMARY KEY (product, tag)
        )
        """,
        """
        CREATE TABLE advisories (
            product text NOT NULL,
            id text NOT NULL,
            record text NOT NULL,
            added_at bigint NOT NULL,
            PRIMARY KEY (product, id)
        )
        """,
        """
        CREATE TABLE sync_state (
            product text PRIMARY KEY,
            source text NOT NULL,
            etag text,
            last_attempt_at bigint,
            last_success_at bigint,
            last_error text,
            last_error_at bigint,
            retry_after_at bigint
        )
        """,
        *(
            f"""
            CREATE TRIGGER {table}_changed AFTER INSERT OR UPDATE OR DELETE
            ON {table} FOR EACH ROW EXECUTE FUNCTION bump_catalog_generation()
            """
            for table in ("product_policies", "release_policies", "advisories")
        ),
        # Retention and the aggregator find days by this index; it never changes on an
        # upsert, so upserts stay heap-only (HOT) updates.
        "CREATE INDEX reports_by_day ON reports (day)",
        *(
            f"""
            CREATE TABLE {table} (
                product text NOT NULL,
                day date NOT NULL,
                {columns},
                instances bigint NOT NULL,
                PRIMARY KEY (product, day{key})
            )
            """
            for table, columns, key in (
                ("stats_versions", "version text NOT NULL, reports bigint NOT NULL", ", version"),
                ("stats_platforms", "os text NOT NULL, arch text NOT NULL", ", os, arch"),
                (
                    "stats_min_compatible",
                    "min_compatible_version text NOT NULL",
                    ", min_compatible_version",
                ),
                (
                    "stats_heaps",
                    "version text NOT NULL, bucket integer NOT NULL",
                    ", version, bucket",
                ),
                (
                    "stats_heap_totals",
                    "version text NOT NULL, bucket integer NOT NULL",
                    ", version, bucket",
                ),
            )
        ),
        """
        CREATE TABLE stats_days (
            product text NOT NULL,
            day date NOT NULL,
            instances bigint NOT NULL,
            reports bigint NOT NULL,
            version_checks bigint NOT NULL,
            PRIMARY KEY (product, day)
        )
        """,
        """
        CREATE TABLE daily_rollups (
            product text NOT NULL,
            day date NOT NULL,
            version text NOT NULL,
            os text NOT NULL,
            arch text NOT NULL,
            instances bigint NOT NULL,
            reports bigint NOT NULL,
            heap_p50 bigint,
            heap_p90 bigint,
            heap_p99 bigint,
            PRIMARY KEY (product, day, version, os, arch)
        )
        """,
    ),
)
