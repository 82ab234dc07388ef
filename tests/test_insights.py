"""The read side on real servers and SQLite files: the stats API and ``stats --json`` (one
document), who may read it, products, and the aggregates behind them."""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal
import sqlite3
import time
import urllib.error
import urllib.request
import uuid
from datetime import date, timedelta
from pathlib import Path
from typing import Any

import pytest
from aiohttp.test_utils import TestClient

from opa_telemetry.loadtest import LoadConfig, parse_target, run_load
from opa_telemetry_server.cli import main
from opa_telemetry_server.domain.advisories import advisory_from_osv
from opa_telemetry_server.domain.releases import release_from_mapping
from opa_telemetry_server.services.catalog import Catalog
from opa_telemetry_server.services.insights import (
    MAX_DAYS,
    StatsQuery,
    build_document,
    heap_bucket_value,
    parse_stats_query,
)
from opa_telemetry_server.services.metrics import top_versions
from opa_telemetry_server.services.retention import purge_expired
from opa_telemetry_server.storage import RETENTION_RUN_KEY, SyncState, Window
from opa_telemetry_server.storage.sqlite import SqliteStorage, shard_path
from opa_telemetry_server.web.app import create_app, prepare_database
from opa_telemetry_server.web.appkeys import INSIGHTS

from .conftest import AiohttpClient, make_settings, serve_argv, serving

TOKEN = "s3cret-token-for-tests"  # noqa: S105 - a test token
AUTH = {"Authorization": f"Bearer {TOKEN}"}


def uid(n: int) -> str:
    return f"00000000-0000-4000-8000-{n:012d}"


async def post(
    client: TestClient[Any, Any], n: int, version: str, agent: str | None = None, **fields: Any
) -> None:
    body = {"id": uid(n), "version": version, **fields}
    agent = agent or f"Open Policy Agent/{version} (linux, amd64)"
    response = await client.post("/v1/version", json=body, headers={"User-Agent": agent})
    assert response.status == 200, await response.text()


async def serve(aiohttp_client: AiohttpClient, tmp_path: Path, **settings: Any) -> Any:
    values: dict[str, Any] = {"admin_token": TOKEN, "stats_interval": 3600.0}
    values.update(settings)
    return await aiohttp_client(create_app(make_settings(tmp_path, **values)))


async def aggregate(client: TestClient[Any, Any]) -> None:
    aggregator = client.app[INSIGHTS].aggregator
    assert aggregator is not None
    await aggregator.run_once()


async def fleet(client: TestClient[Any, Any]) -> None:
    """Seven instances on 1.20.2 (one of them on darwin), two on 1.19.0, one on 0.70.0."""
    for n in range(7):
        agent = "Open Policy Agent/1.20.2 (darwin, arm64)" if n == 0 else None
        await post(client, n, "1.20.2", agent, heap_usage_bytes=str(1_000_000 * (n + 1)))
    await post(client, 7, "1.19.0", heap_usage_bytes="50000000", min_compatible_version="1.0.0")
    await post(client, 8, "1.19.0", heap_usage_bytes="60000000")
    await post(client, 8, "1.19.0", heap_usage_bytes="61000000")  # same instance, 2nd report
    await post(client, 9, "0.70.0")
    await aggregate(client)


async def test_stats_answer_the_documented_document(
    aiohttp_client: AiohttpClient, tmp_path: Path
) -> None:
    client = await serve(aiohttp_client, tmp_path)
    await fleet(client)
    response = await client.get("/v1/stats", params={"days": "3"}, headers=AUTH)
    assert response.status == 200
    stats = await response.json()
    today = date.fromisoformat(stats["until"])
    assert (stats["product"], stats["days"], stats["since"]) == (
        "opa",
        3,
        (today - timedelta(days=2)).isoformat(),
    )
    assert stats["latest_release"] == "v1.20.2"
    assert stats["instances"] == {
        "latest_day": 10,
        "average_daily": 10.0,
        "peak_daily": 10,
        "active_days": 1,
    }
    assert (stats["reports"], stats["version_checks"]) == (11, 0)
    assert stats["by_version"] == [
        {"version": "1.20.2", "instances": 7.0, "reports": 7},
        {"version": "1.19.0", "instances": 2.0, "reports": 3},
        {"version": "0.70.0", "instances": 1.0, "reports": 1},
    ]
    assert stats["by_platform"] == [
        {"os": "linux", "arch": "amd64", "instances": 9.0},
        {"os": "darwin", "arch": "arm64", "instances": 1.0},
    ]
    assert [d["day"] for d in stats["daily"]] == [
        (today - timedelta(days=i)).isoformat() for i in (2, 1, 0)
    ]
    assert stats["daily"][0]["instances"] == 0 and stats["daily"][0]["by_version"]["other"] == 0
    last = stats["daily"][-1]
    assert last["by_version"] == {"1.20.2": 7, "1.19.0": 2, "0.70.0": 1, "other": 0}
    assert (last["instances"], last["reports"], last["out_of_date"]) == (10, 11, 3)
    assert last["out_of_date_share"] == 0.3 and last["latest_release"] == "v1.20.2"
    assert stats["daily_versions"] == ["1.20.2", "1.19.0", "0.70.0", "other"]
    heaps = {h["version"]: h for h in stats["heap_by_version"]}
    assert list(heaps) == ["1.20.2", "1.19.0"]  # 0.70.0 sent no heap
    # Nearest rank over 1..7 MB: p50 is 4 MB, p90 and p99 7 MB, each within its bucket (~9%).
    for percent, expected in (("p50", 4e6), ("p90", 7e6), ("p99", 7e6)):
        assert abs(heaps["1.20.2"][percent] / expected - 1) < 0.09, (percent, heaps)
    assert abs(heaps["1.19.0"]["p99"] / 61e6 - 1) < 0.09  # its latest heap of the day
    assert stats["min_compatible_versions"] == [
        {"min_compatible_version": "", "instances": 9.0},
        {"min_compatible_version": "1.0.0", "instances": 1.0},
    ]
    # Advisories (the bundled OSV records) count the instances on the versions they affect.
    by_name = {v["version"]: v["instances"] for v in stats["by_version"]}
    for advisory in stats["advisories"]:
        assert set(advisory["versions"]) <= set(by_name) and advisory["id"]
        assert advisory["instances"] == sum(by_name[v] for v in advisory["versions"])


async def test_the_cli_prints_the_same_document_as_the_api(
    aiohttp_client: AiohttpClient, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    client = await serve(aiohttp_client, tmp_path)
    await fleet(client)
    api = await (await client.get("/v1/stats?days=7&product=opa", headers=AUTH)).json()
    db = client.app[INSIGHTS].reader.path
    assert await asyncio.to_thread(main, ["stats", "--db", db, "--days", "7", "--json"]) == 0
    captured = capsys.readouterr()
    assert json.loads(captured.out) == api
    assert captured.err == ""


async def test_window_days_are_bounded_and_bad_parameters_answer_400(
    aiohttp_client: AiohttpClient, tmp_path: Path
) -> None:
    client = await serve(aiohttp_client, tmp_path)
    for query, problem in (
        ("days=0", "days: expected a whole number from 1 to 400"),
        (f"days={MAX_DAYS + 1}", "days: expected"),
        ("days=abc", "days: expected"),
        ("days=-3", "days: expected"),
        ("product=%20%20", "product:"),
        ("since=2020-01-01", "unknown parameters: since"),
    ):
        response = await client.get(f"/v1/stats?{query}", headers=AUTH)
        assert response.status == 400, query
        body = await response.json()
        assert body["error"] == "invalid query parameters"
        assert any(problem in detail for detail in body["details"]), (query, body)
    ok = await client.get(f"/v1/stats?days={MAX_DAYS}", headers=AUTH)
    assert ok.status == 200 and len((await ok.json())["daily"]) == MAX_DAYS


def test_query_defaults_and_product_names_compare_as_slugs() -> None:
    assert parse_stats_query({}) == StatsQuery("opa", 30)
    assert parse_stats_query({"product": "My App", "days": "7"}) == StatsQuery("my-app", 7)


@pytest.mark.parametrize("route", ["/v1/stats", "/v1/products", "/metrics"])
async def test_closed_by_default_with_a_message_saying_how_to_open(
    aiohttp_client: AiohttpClient, tmp_path: Path, route: str
) -> None:
    client = await serve(aiohttp_client, tmp_path, admin_token="")
    for headers in ({}, AUTH):
        response = await client.get(route, headers=headers)
        assert response.status == 403
        body = await response.json()
        assert "not enabled" in body["error"]
        assert "--admin-token" in body["details"][0] and "--public-stats" in body["details"][0]
    assert (await client.get("/healthz")).status == 200  # other routes are unaffected
    await post(client, 1, "1.5.1")


@pytest.mark.parametrize("route", ["/v1/stats", "/v1/products", "/metrics"])
async def test_a_token_opens_the_read_routes_and_only_the_right_one(
    aiohttp_client: AiohttpClient, tmp_path: Path, route: str
) -> None:
    client = await serve(aiohttp_client, tmp_path)
    missing = await client.get(route)
    assert missing.status == 401
    assert missing.headers["WWW-Authenticate"].startswith("Bearer")
    assert "Authorization: Bearer" in (await missing.json())["details"][0]
    wrong = await client.get(route, headers={"Authorization": f"Bearer {TOKEN}x"})
    assert wrong.status == 403
    assert TOKEN not in await wrong.text()
    malformed = await client.get(route, headers={"Authorization": f"Basic {TOKEN}"})
    assert malformed.status == 401
    right = await client.get(route, headers=AUTH)
    assert right.status == 200


async def test_the_token_is_never_logged(
    aiohttp_client: AiohttpClient, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level("DEBUG")
    settings = make_settings(tmp_path, admin_token=TOKEN, access_log=True)
    client = await aiohttp_client(create_app(settings))
    for headers in (AUTH, {"Authorization": f"Bearer {TOKEN}-wrong"}, {}):
        await client.get("/v1/stats", headers=headers)
    assert caplog.records, "the access log was on"
    assert TOKEN not in caplog.text
    assert TOKEN not in repr(settings)


async def test_public_stats_fold_small_groups_into_other(
    aiohttp_client: AiohttpClient, tmp_path: Path
) -> None:
    client = await serve(aiohttp_client, tmp_path, public_stats=True, min_group_size=5)
    await fleet(client)
    public = await (await client.get("/v1/stats?days=1")).json()
    assert public["public"] is True
    assert public["by_version"] == [
        {"version": "1.20.2", "instances": 7.0, "reports": 7},
        {"version": "other", "instances": 3.0, "reports": 4},
    ]
    assert public["by_platform"] == [
        {"os": "linux", "arch": "amd64", "instances": 9.0},
        {"os": "other", "arch": "other", "instances": 1.0},
    ]
    assert public["daily"][-1]["by_version"] == {"1.20.2": 7, "other": 3}
    assert [h["version"] for h in public["heap_by_version"]] == ["1.20.2", "other"]
    assert public["min_compatible_versions"] == [
        {"min_compatible_version": "", "instances": 9.0},
        {"min_compatible_version": "other", "instances": 1.0},
    ]
    assert public["instances"]["latest_day"] == 10  # totals are not groups
    text = json.dumps(public)
    assert "0.70.0" not in text and "1.19.0" not in text and "darwin" not in text
    # The operator's token still sees everything; the report routes need nothing.
    full = await (await client.get("/v1/stats?days=1", headers=AUTH)).json()
    assert [v["version"] for v in full["by_version"]] == ["1.20.2", "1.19.0", "0.70.0"]
    assert full["public"] is False
    metrics = await client.get("/metrics")
    assert metrics.status == 200
    text = await metrics.text()
    assert metric(text, "opa_telemetry_fleet_instances", product="opa", version="1.20.2") == 7
    assert metric(text, "opa_telemetry_fleet_instances", product="opa", version="other") == 3
    assert "1.19.0" not in text and "0.70.0" not in text
    assert (await client.get("/metrics", headers={"Authorization": "Bearer nope"})).status == 403


async def test_public_statistics_do_not_reveal_a_small_product(
    aiohttp_client: AiohttpClient, tmp_path: Path
) -> None:
    # Any client names a product by its User-Agent: one deployment of an internal app must
    # not show up, by name or by count, to an anonymous caller.
    client = await serve(aiohttp_client, tmp_path, public_stats=True, min_group_size=5)
    await fleet(client)
    small = {"User-Agent": "AcmeInternalBilling/1.0.0 (linux, amd64)"}
    body = {"id": str(uuid.UUID(int=99)), "version": "1.0.0"}
    assert (await client.post("/v1/version", json=body, headers=small)).status == 200
    await aggregate(client)
    public = await (await client.get("/v1/products")).json()
    assert [p["product"] for p in public["products"]] == ["opa"]
    refused = await client.get("/v1/stats", params={"product": "acmeinternalbilling"})
    assert refused.status == 404
    full = await (await client.get("/v1/products", headers=AUTH)).json()
    assert "acmeinternalbilling" in [p["product"] for p in full["products"]]
    text = await (await client.get("/metrics")).text()
    assert "acmeinternalbilling" not in text
    assert metric(text, "opa_telemetry_fleet_instances", product="other", version="other") == 1


def test_fleet_gauge_names_at_most_twenty_products() -> None:
    counts = [(f"app{n:03d}", "1.0.0", 1000 - n) for n in range(1000)]
    top = top_versions(counts)
    assert len(top) == 21 and top[-1] == ("other", "other", sum(1000 - n for n in range(20, 1000)))


async def test_products_list_release_and_report_counts(
    aiohttp_client: AiohttpClient, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    client = await serve(aiohttp_client, tmp_path)
    await post(client, 1, "1.5.1")
    await post(client, 2, "2.0.0", agent="MyApp/2.0.0 (linux, arm64)")
    await post(client, 2, "2.0.0", agent="MyApp/2.0.0 (linux, arm64)")
    await aggregate(client)
    response = await client.get("/v1/products", headers=AUTH)
    products = (await response.json())["products"]
    opa = next(p for p in products if p["product"] == "opa")
    assert opa["releases"] > 100 and (opa["reports"], opa["instances_today"]) == (1, 1)
    assert {"product": "myapp", "releases": 0, "reports": 2, "instances_today": 1} in products
    db = client.app[INSIGHTS].reader.path
    assert await asyncio.to_thread(main, ["products", "--db", db, "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == {"products": products}
    assert await asyncio.to_thread(main, ["products", "--db", db]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["PRODUCT", "RELEASES", "REPORTS", "INSTANCES", "TODAY"]
    assert lines[2].split() == ["opa", str(opa["releases"]), "1", "1"]


async def test_stats_warn_on_stderr_about_a_product_without_releases_or_reports(
    aiohttp_client: AiohttpClient, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    client = await serve(aiohttp_client, tmp_path)
    await post(client, 2, "2.0.0", agent="MyApp/2.0.0 (linux, arm64)")
    await aggregate(client)
    db = client.app[INSIGHTS].reader.path
    assert await asyncio.to_thread(main, ["stats", "--db", db, "--product", "myapp"]) == 0
    err = capsys.readouterr().err
    assert err == "warning: myapp has no releases in the catalog (products: myapp, opa)\n"
    assert (
        await asyncio.to_thread(main, ["stats", "--db", db, "--product", "nosuch", "--json"]) == 0
    )
    captured = capsys.readouterr()
    assert json.loads(captured.out)["reports"] == 0
    assert captured.err.splitlines() == [
        "warning: nosuch has no releases in the catalog (products: myapp, opa)",
        "warning: no reports from nosuch have been aggregated (products: myapp, opa)",
    ]
    assert await asyncio.to_thread(main, ["stats", "--db", db, "--days", "401"]) == 2
    assert (
        capsys.readouterr().err
        == "error: --days: expected a whole number from 1 to 400, not '401'\n"
    )


def window(**fields: Any) -> Window:
    values: dict[str, Any] = {
        "days": [],
        "versions": [],
        "platforms": [],
        "min_compatible": [],
        "heaps": [],
        "aggregated_at": None,
    }
    values.update(fields)
    return Window(**values)


def test_a_window_reports_daily_values_never_a_sum_of_ids() -> None:
    since, until = date(2026, 3, 1), date(2026, 3, 4)
    stats = build_document(
        "opa",
        since,
        until,
        window(
            days=[("2026-03-01", 10, 20, 1), ("2026-03-02", 30, 40, 2), ("2026-03-04", 20, 20, 0)],
            versions=[
                ("2026-03-01", "1.0.0", 10, 20),
                ("2026-03-02", "1.1.0", 30, 40),
                ("2026-03-04", "1.1.0", 20, 20),
            ],
        ),
        Catalog(
            [
                ("opa", release_from_mapping({"tag": "v1.0.0", "published": "2026-01-01"})),
                ("opa", release_from_mapping({"tag": "v1.1.0", "published": "2026-03-02"})),
            ]
        ),
    )
    # 60 instance-days over 3 days with data: 20 a day on average, 30 at the peak.
    assert stats["instances"] == {
        "latest_day": 20,
        "average_daily": 20.0,
        "peak_daily": 30,
        "active_days": 3,
    }
    assert [(v["version"], v["instances"]) for v in stats["by_version"]] == [
        ("1.1.0", 16.7),
        ("1.0.0", 3.3),
    ]
    # Out of date against the latest release published by each day, not today's.
    assert [(d["latest_release"], d["out_of_date"]) for d in stats["daily"]] == [
        ("v1.0.0", 0),
        ("v1.1.0", 0),
        ("v1.1.0", 0),
        ("v1.1.0", 0),
    ]
    assert stats["daily"][2]["instances"] == 0  # a day without data is a zero, not a gap


def test_heap_percentiles_merge_histograms_across_days() -> None:
    stats = build_document(
        "opa",
        date(2026, 3, 1),
        date(2026, 3, 2),
        window(
            days=[("2026-03-01", 90, 90, 0), ("2026-03-02", 10, 10, 0)],
            heaps=[("1.0.0", 160, 90), ("1.0.0", 200, 10)],
        ),
        Catalog(),
    )
    [heap] = stats["heap_by_version"]
    assert heap["instances"] == 50.0
    assert (heap["p50"], heap["p90"], heap["p99"]) == (
        heap_bucket_value(160),
        heap_bucket_value(160),
        heap_bucket_value(200),
    )
    assert 2**20 <= heap_bucket_value(160) < 2**20 * 2 ** (1 / 8)


def metric(text: str, name: str, **labels: str) -> float:
    """The value of one sample in Prometheus text (fails if absent)."""
    wanted = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
    for line in text.splitlines():
        if line.startswith("#") or " " not in line:
            continue
        sample, value = line.rsplit(" ", 1)
        sample_name, _, rest = sample.partition("{")
        found = ",".join(sorted(rest.rstrip("}").split(","))) if rest else ""
        if sample_name == name and found == wanted:
            return float(value)
    raise AssertionError(f"no sample {name}{{{wanted}}} in:\n{text}")


async def test_metrics_count_requests_reports_batches_and_the_fleet(
    aiohttp_client: AiohttpClient, tmp_path: Path
) -> None:
    client = await serve(aiohttp_client, tmp_path)
    await fleet(client)  # 11 reports from 10 instances
    bad = await client.post("/v1/version", data=b"{", headers={"Content-Type": "application/json"})
    assert bad.status == 400
    assert (await client.get("/nowhere")).status == 404
    latest = await client.get("/repos/open-policy-agent/opa/releases/latest")
    assert latest.status == 200
    response = await client.get("/metrics", headers=AUTH)
    assert response.status == 200
    assert response.content_type == "text/plain"
    text = await response.text()
    assert metric(text, "opa_telemetry_requests_total", route="/v1/version", status="200") == 11
    assert metric(text, "opa_telemetry_requests_total", route="/v1/version", status="400") == 1
    assert metric(text, "opa_telemetry_requests_total", route="unmatched", status="404") == 1
    route = "/repos/{owner}/{repo}/releases/latest"
    assert metric(text, "opa_telemetry_requests_total", route=route, status="200") == 1
    assert metric(text, "opa_telemetry_reports_accepted_total") == 11
    assert metric(text, "opa_telemetry_version_checks_accepted_total") == 1
    assert metric(text, "opa_telemetry_ingest_queue_depth") == 0
    assert metric(text, "opa_telemetry_ingest_batch_size_count") == 12  # one request at a time
    assert metric(text, "opa_telemetry_ingest_batch_size_sum") == 12
    assert metric(text, "opa_telemetry_ingest_commit_seconds_count") == 12
    assert metric(text, "opa_telemetry_fleet_instances", product="opa", version="1.20.2") == 7
    assert metric(text, "opa_telemetry_fleet_instances", product="opa", version="0.70.0") == 1
    assert 0 <= metric(text, "opa_telemetry_catalog_age_seconds") < 60
    assert metric(text, "opa_telemetry_catalog_releases", product="opa") > 100
    assert metric(text, "opa_telemetry_stats_aggregated_timestamp_seconds") > 1.7e9
    assert metric(text, "opa_telemetry_retention_last_run_timestamp_seconds") >= 0
    assert "opa_telemetry_sync_last_success_timestamp_seconds{" not in text  # never synced
    reader = client.app[INSIGHTS].reader
    await reader.save_sync_state(
        SyncState("opa", "https://api.github.com", last_success_at=1_700_000_000,
                  last_error_at=1_700_000_100, last_error="HTTP 500")
    )  # fmt: skip
    text = await (await client.get("/metrics", headers=AUTH)).text()
    assert metric(text, "opa_telemetry_sync_last_success_timestamp_seconds", product="opa") == (
        1_700_000_000
    )
    assert metric(text, "opa_telemetry_sync_last_error_timestamp_seconds", product="opa") == (
        1_700_000_100
    )
    again = await (await client.get("/metrics", headers=AUTH)).text()
    # The scrapes themselves were counted, and counters never go back.
    assert metric(again, "opa_telemetry_requests_total", route="/metrics", status="200") == 2
    assert metric(again, "opa_telemetry_reports_accepted_total") == 11


def test_fleet_gauge_keeps_the_top_twenty_versions_and_folds_the_rest() -> None:
    counts = [("opa", f"1.{n}.0", n) for n in range(1, 31)] + [("myapp", "2.0.0", 3)]
    top = top_versions(counts)
    opa = [(v, n) for p, v, n in top if p == "opa"]
    assert len(opa) == 21
    assert opa[0] == ("1.30.0", 30) and opa[19] == ("1.11.0", 11)
    assert opa[20] == ("other", sum(range(1, 11)))
    assert ("myapp", "2.0.0", 3) in top
    public = top_versions(counts, min_group_size=5)
    # A product with fewer instances than the group size is not named at all.
    assert [v for p, v, _ in public if p == "myapp"] == []
    assert ("other", "other", 3) in public
    assert ("opa", "other", sum(range(1, 11))) in public


def get_json(url: str, headers: dict[str, str]) -> tuple[int, Any]:
    request = urllib.request.Request(url, headers=headers)  # noqa: S310 - 127.0.0.1 only
    try:
        with urllib.request.urlopen(request, timeout=10) as response:  # noqa: S310 - 127.0.0.1
            body = response.read()
            return response.status, body if url.endswith("/metrics") else json.loads(body)
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


async def test_two_workers_answer_stats_and_metrics_for_both_shards(tmp_path: Path) -> None:
    db = tmp_path / "w.db"
    argv = serve_argv(db, "--workers", "2", "--admin-token", TOKEN, "--stats-interval", "0.2")
    with serving(argv) as (url, process):
        config = LoadConfig(
            parse_target(url), concurrency=16, requests=600, duration=None, instances=40, seed=3
        )
        result = await run_load(config)
        assert result.summary()["statuses"] == {"200": 600}
        with contextlib.ExitStack() as stack:
            conns = [stack.enter_context(sqlite3.connect(p)) for p in (db, shard_path(db, 1))]
            per_shard = [c.execute("SELECT count(*) FROM reports").fetchone()[0] for c in conns]
            ids = set()
            for conn in conns:
                ids |= {i for (i,) in conn.execute("SELECT instance_id FROM reports")}
        assert all(per_shard), "both workers took reports"
        assert sum(per_shard) > len(ids), "some instances reached both workers"
        deadline = time.monotonic() + 20
        stats: dict[str, Any] = {}
        scraped = [b""] * 6
        while time.monotonic() < deadline:  # aggregation and metrics flushes are periodic
            _, stats = await asyncio.to_thread(get_json, f"{url}/v1/stats?days=1", AUTH)
            scraped = [
                (await asyncio.to_thread(get_json, f"{url}/metrics", AUTH))[1] for _ in range(6)
            ]
            if stats["reports"] == 600 and all(
                b"opa_telemetry_reports_accepted_total 600.0" in text for text in scraped
            ):
                break
            await asyncio.sleep(0.2)
        assert stats["reports"] == 600
        assert stats["instances"]["latest_day"] == len(ids)  # each instance once
        for text in scraped:  # whichever worker answered, it answered for both
            reports = metric(text.decode(), "opa_telemetry_reports_accepted_total")
            assert reports == 600
            answered = metric(
                text.decode(), "opa_telemetry_requests_total", route="/v1/version", status="200"
            )
            assert answered == 600
        process.send_signal(signal.SIGTERM)
        assert await asyncio.to_thread(process.wait, 30) == 0


async def test_cli_prints_days_and_the_public_view(
    aiohttp_client: AiohttpClient, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    client = await serve(aiohttp_client, tmp_path)
    await fleet(client)
    db = client.app[INSIGHTS].reader.path
    assert await asyncio.to_thread(main, ["stats", "--db", db, "--days", "2", "--daily"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == [
        "DAY",
        "(UTC)",
        "INSTANCES",
        "REPORTS",
        "CHECKS",
        "OUT",
        "OF",
        "DATE",
    ]
    assert lines[1].split()[1:] == ["0", "0", "0", "-"]
    assert lines[2].split()[1:] == ["10", "11", "0", "30.0%"]
    argv = ["stats", "--db", db, "--days", "1", "--json", "--public", "--min-group-size", "2"]
    assert await asyncio.to_thread(main, argv) == 0
    public = json.loads(capsys.readouterr().out)
    assert public["public"] is True
    assert [v["version"] for v in public["by_version"]] == ["1.20.2", "1.19.0", "other"]


async def test_retention_runs_are_recorded_for_the_metrics(tmp_path: Path) -> None:
    settings = make_settings(tmp_path, retention_days=30)
    await prepare_database(settings)
    before = time.time()
    await purge_expired(settings)
    storage = await SqliteStorage.open(settings.db, migrate=False)
    try:
        recorded = await storage.meta(RETENTION_RUN_KEY)
    finally:
        await storage.close()
    assert recorded is not None and int(before) <= recorded <= time.time() + 1


def test_advisories_count_the_instances_on_affected_versions() -> None:
    record = {
        "id": "GHSA-test-0000-0001",
        "summary": "a test advisory",
        "affected": [
            {
                "package": {"ecosystem": "Go", "name": "github.com/open-policy-agent/opa"},
                "ranges": [{"type": "SEMVER", "events": [{"introduced": "0"}, {"fixed": "1.1.0"}]}],
            }
        ],
    }
    catalog = Catalog(advisories=[("opa", advisory_from_osv(record))])
    days = [("2026-03-01", 12, 12, 0)]
    versions = [
        ("2026-03-01", "1.0.0", 8, 8),
        ("2026-03-01", "1.0.1", 2, 2),
        ("2026-03-01", "1.1.0", 2, 2),
    ]
    day = date(2026, 3, 1)
    full = build_document("opa", day, day, window(days=days, versions=versions), catalog)
    assert full["advisories"] == [
        {
            "id": "GHSA-test-0000-0001",
            "severity": None,
            "summary": "a test advisory",
            "instances": 10.0,
            "versions": ["1.0.1", "1.0.0"],
        }
    ]
    public = build_document("opa", day, day, window(days=days, versions=versions), catalog, 5)
    assert public["advisories"][0]["versions"] == ["1.0.0", "other"]
    small = build_document("opa", day, day, window(days=days, versions=versions), catalog, 11)
    assert small["advisories"] == []
