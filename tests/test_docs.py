"""The README documents every setting and every stored column; these tests keep it honest."""

from __future__ import annotations

import asyncio
import re
import sqlite3
from pathlib import Path

from opa_telemetry_server.settings import env_name, knobs
from opa_telemetry_server.storage.sqlite import SqliteStorage

from .conftest import REPO

README = (REPO / "README.md").read_text()


def test_readme_configuration_table_lists_every_setting() -> None:
    for name, _default, _help in knobs():
        flag = name.replace("_", "-")
        rows = [line for line in README.splitlines() if line.startswith("| `--")]
        row = next((line for line in rows if f"| `{env_name(name)}` |" in line), "")
        assert row, f"{env_name(name)} has no row in the settings table"
        assert flag in row, f"the row for {env_name(name)} does not name --{flag}"


def stored_section() -> str:
    match = re.search(r"## What is stored.*?(?=\n## )", README, re.S)
    assert match, "README has no 'What is stored' section"
    return match.group(0)


def test_readme_what_is_stored_names_every_column(tmp_path: Path) -> None:
    async def create() -> None:
        await (await SqliteStorage.open(tmp_path / "t.db")).close()

    asyncio.run(create())
    section = stored_section()
    raw = {"reports", "version_checks", "daily_rollups", "meta"}
    catalog = {"releases", "product_policies", "release_policies", "advisories", "sync_state"}
    statistics = {
        "stats_days",
        "stats_versions",
        "stats_platforms",
        "stats_min_compatible",
        "stats_heaps",
        "stats_heap_totals",
    }
    with sqlite3.connect(tmp_path / "t.db") as conn:
        tables = {
            name for (name,) in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")
        }
        assert tables == {*raw, *catalog, *statistics}, "a new table: document it"
        for table in sorted(tables):
            assert f"`{table}`" in section, f"{table} is not documented"
        # What the fleet sent, raw or aggregated, is documented column by column.
        for table in sorted((raw - {"meta"}) | statistics):
            for (column,) in conn.execute("SELECT name FROM pragma_table_info(?)", (table,)):
                assert f"`{column}`" in section, f"{table}.{column} is not documented"
