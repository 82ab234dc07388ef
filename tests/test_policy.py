"""Operator policy (pin, yank, rollout, support) and advisories, from the CLI to the answer."""

from __future__ import annotations

import asyncio
import json
import uuid
from pathlib import Path
from typing import Any

import pytest

from opa_telemetry_server.cli import main
from opa_telemetry_server.domain.advisories import advisories_from_json, advisory_from_osv
from opa_telemetry_server.domain.policy import Policy, rollout_bucket
from opa_telemetry_server.domain.releases import release_from_mapping
from opa_telemetry_server.domain.versions import parse_version
from opa_telemetry_server.errors import CatalogError
from opa_telemetry_server.services.catalog import Catalog
from opa_telemetry_server.web.app import create_app, prepare_database
from opa_telemetry_server.web.appkeys import INTAKE

from .conftest import AiohttpClient, make_settings, report_body
from .test_cli import run


def catalog(policy: Policy, *tags: str) -> Catalog:
    return Catalog([("opa", release_from_mapping({"tag": t})) for t in tags], {"opa": policy})


def test_pin_caps_the_offer_and_yank_skips_a_release() -> None:
    tags = ("v1.0.0", "v1.1.0", "v1.2.0")
    assert catalog(Policy(pinned="v1.1.0"), *tags).latest("opa").tag == "v1.1.0"  # type: ignore[union-attr]
    yanked = catalog(Policy(yanked={"v1.2.0": "breaks bundles"}), *tags)
    assert yanked.latest("opa").tag == "v1.1.0"  # type: ignore[union-attr]
    answer = yanked.answer("opa", parse_version("1.2.0"), "linux", "amd64", yanked.latest("opa"))
    assert answer["latest"]["opa_up_to_date"] is False  # newer than latest, but yanked
    assert answer["support"] == {"status": "yanked", "reason": "breaks bundles"}


def test_a_pin_holds_after_the_pinned_release_is_removed() -> None:
    # A removed pinned tag (by hand, or a pruning sync) must not let newer releases out.
    assert catalog(Policy(pinned="v1.1.0"), "v1.0.0", "v1.2.0").latest("opa").tag == "v1.0.0"  # type: ignore[union-attr]


def test_rollout_offers_a_release_to_a_stable_share_of_instances() -> None:
    view = catalog(Policy(rollouts={"v1.2.0": 30}), "v1.1.0", "v1.2.0")
    ids = [str(uuid.UUID(int=n * 7919)) for n in range(2000)]
    offered = [view.offered("opa", rollout_bucket(i)).tag for i in ids]  # type: ignore[union-attr]
    share = offered.count("v1.2.0") / len(ids)
    assert 0.25 < share < 0.35
    # The same instance always gets the same answer; a caller without an id waits for 100%.
    assert [view.offered("opa", rollout_bucket(i)).tag for i in ids] == offered  # type: ignore[union-attr]
    assert view.latest("opa").tag == "v1.1.0"  # type: ignore[union-attr]
    assert rollout_bucket("a72dc36a-72db-458d-9208-9be4189e4ab7") == rollout_bucket(
        "a72dc36a-72db-458d-9208-9be4189e4ab7"
    )


def test_support_status_below_the_minimum_version() -> None:
    policy = Policy(min_version=parse_version("1.0.0"), notice="https://example.org/eol")
    view = catalog(policy, "v0.9.0", "v1.0.0")
    old = view.answer("opa", parse_version("0.9.0"), None, None, view.latest("opa"))
    assert old["support"] == {
        "status": "unsupported",
        "min_version": "1.0.0",
        "notice": "https://example.org/eol",
    }
    new = view.answer("opa", parse_version("1.0.0"), None, None, view.latest("opa"))
    assert new["support"]["status"] == "supported"


def osv(ident: str, events: list[dict[str, str]], **extra: Any) -> dict[str, Any]:
    return {
        "id": ident,
        "summary": f"summary of {ident}",
        "affected": [{"package": {"name": "x"}, "ranges": [{"type": "SEMVER", "events": events}]}],
        "references": [{"type": "WEB", "url": f"https://example.org/{ident}"}],
        **extra,
    }


@pytest.mark.parametrize(
    ("version", "affected", "fixed"),
    [
        ("0.9.9", False, None),
        ("1.0.0", True, "1.2.0"),
        ("1.2.0-rc.1", True, "1.2.0"),  # a pre-release of the fix is still before it
        ("1.2.0", False, None),
        ("2.0.0", True, None),  # introduced again, last_affected 2.1.0 (inclusive)
        ("2.1.0", True, None),
        ("2.1.1", False, None),
    ],
)
def test_osv_semver_ranges_use_semver_precedence(
    version: str, affected: bool, fixed: str | None
) -> None:
    advisory = advisory_from_osv(
        osv(
            "TEST-1",
            [
                {"introduced": "1.0.0"},
                {"fixed": "1.2.0"},
                {"introduced": "2.0.0"},
                {"last_affected": "2.1.0"},
            ],
        )
    )
    assert advisory.affects(parse_version(version), "linux") == (affected, fixed)


def test_bundled_windows_only_advisory_skips_other_platforms() -> None:
    (advisory,) = [
        a
        for a in advisories_from_json(
            (Path(__file__).parents[1] / "server/data/opa-advisories.osv.json").read_bytes()
        )
        if a.id == "GHSA-c77r-fh37-x2px"
    ]
    assert advisory.affects(parse_version("0.67.0"), "windows") == (True, "0.68.0")
    assert advisory.affects(parse_version("0.67.0"), "linux") == (False, None)


@pytest.mark.parametrize(
    ("record", "message"),
    [
        ({"id": "../x"}, "id: required"),
        (osv("A-1", [{"fixed": "1.0.0"}]), "no introduced event"),
        (osv("A-1", [{"introduced": "banana"}]), "is not a SemVer version"),
        (osv("A-1", [{"introduced": "0"}], references=[{"type": "WEB", "url": "javascript:x"}]),
         "references: must be an absolute"),
        (osv("A-1", [{"introduced": "0"}], database_specific={"severity": "DIRE"}),
         "database_specific.severity"),
    ],
)  # fmt: skip
def test_bad_osv_records_are_refused(record: dict[str, Any], message: str) -> None:
    with pytest.raises(CatalogError, match=message):
        advisory_from_osv(record)


async def post_as(client: Any, version: str, instance: str | None = None) -> dict[str, Any]:
    body = report_body(version=version)
    if instance:
        body["id"] = instance
    response = await client.post(
        "/v1/version",
        json=body,
        headers={"User-Agent": f"Open Policy Agent/{version} (linux, amd64)"},
    )
    assert response.status == 200
    result: dict[str, Any] = await response.json()
    return result


def run_main(argv: list[str]) -> int:
    try:
        return main(argv)
    except SystemExit as exc:  # argparse's usage errors
        return int(exc.code or 0)


async def cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = await asyncio.to_thread(run_main, list(argv))
    out, err = capsys.readouterr()
    return code, out, err


async def test_policy_from_the_cli_reaches_a_running_server(
    tmp_path: Path, aiohttp_client: AiohttpClient, capsys: pytest.CaptureFixture[str]
) -> None:
    settings = make_settings(tmp_path, catalog_refresh=0.05)
    client = await aiohttp_client(create_app(settings))
    db = ("--db", settings.db)

    async def changed() -> None:
        """Wait until the server's own refresh task has loaded the change (bounded)."""
        cache = client.app[INTAKE].catalog
        before = cache.generation
        async with asyncio.timeout(10):
            while cache.generation == before:
                await asyncio.sleep(0.02)

    assert (await cli(capsys, "releases", "pin", "v1.19.0", *db))[0] == 0
    await changed()
    assert (await post_as(client, "1.5.1"))["latest"]["latest_release"] == "v1.19.0"
    code, _, err = await cli(capsys, "releases", "pin", "v9.9.9", *db)
    assert code == 1 and "opa v9.9.9 is not in the catalog" in err
    await cli(capsys, "releases", "unpin", *db)
    await changed()

    code, out, _ = await cli(capsys, "releases", "yank", "v1.20.2", "--reason", "bad build", *db)
    assert (code, out) == (0, "yanked opa v1.20.2\n")
    await changed()
    yanked = await post_as(client, "1.20.2")
    assert yanked["latest"]["latest_release"] == "v1.20.1"
    assert yanked["latest"]["opa_up_to_date"] is False
    assert yanked["support"] == {"status": "yanked", "reason": "bad build"}
    await cli(capsys, "releases", "unyank", "v1.20.2", *db)
    await changed()

    await cli(capsys, "releases", "add", "v1.21.0", *db)
    await changed()
    await cli(capsys, "releases", "rollout", "v1.21.0", "50", *db)
    await changed()
    seen = {
        (await post_as(client, "1.5.1", str(uuid.UUID(int=n * 104729))))["latest"]["latest_release"]
        for n in range(40)
    }
    assert seen == {"v1.21.0", "v1.20.2"}
    github = await client.get("/repos/open-policy-agent/opa/releases/latest")
    assert (await github.json())["tag_name"] == "v1.20.2"  # no id: only at 100%
    await cli(capsys, "releases", "rollout", "v1.21.0", "100", *db)
    await changed()
    github = await client.get("/repos/open-policy-agent/opa/releases/latest")
    assert (await github.json())["tag_name"] == "v1.21.0"

    await cli(capsys, "releases", "support", "--min-version", "1.0.0",
              "--notice", "https://example.org/eol", *db)  # fmt: skip
    await changed()
    old = await post_as(client, "0.70.0")
    assert old["support"] == {
        "status": "unsupported",
        "min_version": "1.0.0",
        "notice": "https://example.org/eol",
    }
    code, out, _ = await cli(capsys, "releases", "status", *db)
    assert code == 0 and "min version:  1.0.0" in out and "last sync:    never" in out
    code, _, err = await cli(capsys, "releases", "support", "--min-version", "one", *db)
    assert code == 2 and err.startswith("error: --min-version: 'one' is not a version")
    code, _, err = await cli(capsys, "releases", "rollout", "v1.21.0", "101", *db)
    assert code == 2 and "expected a whole number from 0 to 100" in err
    assert (await cli(capsys, "releases", "support", "--clear", *db))[0] == 0
    await changed()
    assert (await post_as(client, "0.70.0"))["support"] == {"status": "supported"}


async def test_advisories_import_list_remove_and_the_answer(
    tmp_path: Path,
    aiohttp_client: AiohttpClient,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    settings = make_settings(tmp_path, catalog_refresh=0.05)
    client = await aiohttp_client(create_app(settings))
    db = ("--db", settings.db)
    code, out, _ = await cli(capsys, "advisories", "list", *db)
    assert code == 0 and "17 advisories of opa" in out
    record = osv(
        "TEST-2026-1",
        [{"introduced": "1.20.0"}, {"fixed": "1.20.2"}],
        aliases=["CVE-2026-0001"],
        database_specific={"severity": "CRITICAL"},
    )
    source = tmp_path / "osv.json"
    source.write_text(json.dumps([record]))
    code, out, _ = await cli(capsys, "advisories", "import", str(source), *db)
    assert (code, out) == (0, "opa: 1 advisories added, 0 replaced, 1 read\n")
    await client.app[INTAKE].catalog.refresh()
    answer = await post_as(client, "1.20.1")
    assert answer["advisories"] == [
        {
            "id": "TEST-2026-1",
            "aliases": ["CVE-2026-0001"],
            "severity": "CRITICAL",
            "summary": "summary of TEST-2026-1",
            "url": "https://example.org/TEST-2026-1",
            "fixed": "1.20.2",
        }
    ]
    assert (await cli(capsys, "advisories", "remove", "TEST-2026-1", *db))[0] == 0
    code, _, err = await cli(capsys, "advisories", "remove", "TEST-2026-1", *db)
    assert code == 1 and "not stored" in err
    source.write_text(json.dumps([record, record]))
    code, _, err = await cli(capsys, "advisories", "import", str(source), *db)
    assert code == 1 and "duplicate advisory ids: TEST-2026-1" in err


def test_advisories_are_seeded_once(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    settings = make_settings(tmp_path)
    asyncio.run(prepare_database(settings))
    assert run(capsys, "advisories", "remove", "CVE-2022-27664", "--db", settings.db)[0] == 0
    asyncio.run(prepare_database(settings))
    assert "16 advisories of opa" in run(capsys, "advisories", "list", "--db", settings.db)[1]
