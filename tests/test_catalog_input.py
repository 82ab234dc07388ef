"""Catalog input is checked as strictly as a package index checks an upload (issue 8 §2, §3)."""

from __future__ import annotations

import asyncio
import io
import json
from pathlib import Path
from typing import Any

import pytest

from opa_telemetry_server.cli import main
from opa_telemetry_server.domain.releases import (
    download_url,
    platform_of,
    release_from_mapping,
    releases_from_json,
)
from opa_telemetry_server.errors import CatalogError
from opa_telemetry_server.web.app import create_app

from .conftest import AiohttpClient, make_settings, report_body
from .test_cli import make_db, run

NOTES = "https://example.org/myapp/releases/2.0.0"


@pytest.mark.parametrize(
    ("name", "platform"),
    [
        ("myapp_linux_amd64", ("linux", "amd64", False)),
        ("myapp-2.0.0_linux_amd64.tar.gz", ("linux", "amd64", False)),
        ("tool_v2_darwin_arm64.zip", ("darwin", "arm64", False)),
        ("opa_windows_amd64.exe", ("windows", "amd64", False)),
        ("opa_linux_arm64_static", ("linux", "arm64", True)),
        ("opa_linux_amd64.sha256", None),
        ("checksums_sha256.txt", None),
        ("_linux_amd64", None),
        ("myapp_plan10_amd64", None),
    ],
)
def test_platform_is_read_from_the_file_name_suffix_whatever_the_prefix(
    name: str, platform: tuple[str, str, bool] | None
) -> None:
    assert platform_of(name) == platform


def test_another_product_never_gets_opas_urls() -> None:
    with pytest.raises(CatalogError, match="release_notes: required"):
        release_from_mapping({"tag": "2.0.0"}, "myapp")
    with pytest.raises(CatalogError, match="only OPA's assets may be bare names"):
        release_from_mapping(
            {"tag": "2.0.0", "release_notes": NOTES, "assets": ["myapp_linux_amd64"]}, "myapp"
        )
    release = release_from_mapping(
        {
            "tag": "2.0.0",
            "release_notes": NOTES,
            "assets": [
                "https://dl.example.org/2.0.0/myapp-2.0.0_linux_amd64.tar.gz",
                {"url": "https://dl.example.org/2.0.0/myapp.pkg", "os": "darwin", "arch": "arm64"},
            ],
        },
        "myapp",
    )
    assert release.release_notes == NOTES
    assert download_url(release, "linux", "amd64") == (
        "https://dl.example.org/2.0.0/myapp-2.0.0_linux_amd64.tar.gz"
    )
    assert download_url(release, "darwin", "arm64") == "https://dl.example.org/2.0.0/myapp.pkg"
    assert download_url(release, "windows", "amd64") == NOTES
    assert release.to_json()["assets"][1] == {
        "url": "https://dl.example.org/2.0.0/myapp.pkg",
        "os": "darwin",
        "arch": "arm64",
    }


@pytest.mark.parametrize(
    ("entry", "message"),
    [
        (
            {"tag": "v1.0.0", "release_notes": "javascript:alert(1)"},
            "release_notes: must be an absolute http(s) URL",
        ),
        (
            {"tag": "v1.0.0", "release_notes": "/relative/page"},
            "release_notes: must be an absolute",
        ),
        ({"tag": "v1.0.0", "assets": ["../../etc/passwd"]}, "assets[0]: must be an absolute"),
        ({"tag": "v1.0.0", "assets": ["javascript:alert(1)"]}, "assets[0]: must be an absolute"),
        (
            {"tag": "v1.0.0", "assets": ["opa linux"]},
            "assets[0]: 'opa linux' is not a plain file name",
        ),
        (
            {"tag": "v1.0.0", "assets": ["ftp://h/opa_linux_amd64"]},
            "assets[0]: must be an absolute",
        ),
        (
            {"tag": "v1.0.0", "assets": ["https://h/../opa_linux_amd64"]},
            "assets[0]: has a '.' or '..' path segment",
        ),
        (
            {"tag": "v1.0.0", "assets": ["opa_linux_amd64", "opa_linux_amd64"]},
            "assets[1]: duplicate",
        ),
        (
            {"tag": "v1.0.0", "assets": ["opa_checksums.txt"]},
            "assets[0]: 'opa_checksums.txt' names no platform",
        ),
        ({"tag": "v1.0.0", "prerelease": "no"}, "v1.0.0: prerelease: must be true or false"),
        ({"tag": "v1.0.0", "prerelease": 0}, "prerelease: must be true or false"),
        ({"tag": "v1.0.0", "notes": "x", "draft": False}, "unknown keys 'draft', 'notes'"),
        ({"tag": "v1/../2.0.0"}, "tag: 'v1/../2.0.0' is not a version tag"),
        ({"tag": "v1"}, "tag: 'v1' is not a version tag"),
        (
            {"tag": "v1.0.0", "assets": [{"url": "https://h/x", "os": "Linux!", "arch": "amd64"}]},
            "assets[0]: os: must be",
        ),
    ],
)
def test_bad_entries_are_refused_naming_the_field(entry: dict[str, Any], message: str) -> None:
    with pytest.raises(CatalogError) as caught:
        release_from_mapping(entry)
    assert message in str(caught.value)


def test_a_file_error_names_the_entry_and_duplicates_are_refused() -> None:
    text = json.dumps([{"tag": "v1.0.0"}, {"tag": "v1.1.0", "prerelease": "yes"}])
    with pytest.raises(
        CatalogError, match=r"^entry 2 \(v1.1.0: prerelease: must be true or false\)"
    ):
        releases_from_json(text)
    with pytest.raises(CatalogError, match=r"entry 2 \(v1.0.0\): duplicate of v1.0.0"):
        releases_from_json(json.dumps([{"tag": "v1.0.0"}, {"tag": "v1.0.0"}]))
    with pytest.raises(CatalogError, match=r"entry 2 \(1.0.0\): duplicate of v1.0.0"):
        releases_from_json(json.dumps([{"tag": "v1.0.0"}, {"tag": "1.0.0"}]))


def github_release(tag: str, **extra: Any) -> dict[str, Any]:
    """One release as GitHub's REST API returns it (trimmed, with some of its other keys)."""
    return {
        "url": f"https://api.github.com/repos/o/r/releases/{len(tag)}",
        "id": 1,
        "node_id": "RE_x",
        "tag_name": tag,
        "name": tag,
        "html_url": f"https://github.com/o/r/releases/tag/{tag}",
        "draft": False,
        "prerelease": False,
        "published_at": "2026-11-05T10:11:12Z",
        "body": "notes",
        "author": {"login": "someone"},
        "assets": [
            {
                "name": "myapp_linux_amd64.tar.gz",
                "browser_download_url": f"https://github.com/o/r/releases/download/{tag}/myapp_linux_amd64.tar.gz",
                "size": 1,
            },
            {
                "name": "checksums.txt",
                "browser_download_url": f"https://github.com/o/r/releases/download/{tag}/checksums.txt",
            },
        ],
        **extra,
    }


def test_github_release_json_is_read_as_an_object_or_an_array() -> None:
    parsed = releases_from_json(json.dumps(github_release("v2.0.0")), "myapp")
    (release,) = parsed.releases
    assert release.tag == "v2.0.0" and release.published is not None
    assert release.published.isoformat() == "2026-11-05"
    assert release.release_notes == "https://github.com/o/r/releases/tag/v2.0.0"
    assert [a.name for a in release.assets] == ["myapp_linux_amd64.tar.gz"]  # checksums left out
    parsed = releases_from_json(
        json.dumps(
            [
                github_release("v2.0.0"),
                github_release("v2.1.0", draft=True),
                github_release("v2.1.0-rc.1", prerelease=True),
            ]
        ),
        "myapp",
    )
    assert [r.tag for r in parsed.releases] == ["v2.0.0", "v2.1.0-rc.1"]
    assert parsed.drafts_skipped == 1 and parsed.releases[1].prerelease
    with pytest.raises(CatalogError, match="prerelease: must be true or false"):
        releases_from_json(json.dumps(github_release("v2.0.0", prerelease="false")), "myapp")
    with pytest.raises(CatalogError, match="html_url: must be an absolute"):
        releases_from_json(json.dumps(github_release("v2.0.0", html_url="javascript:x")), "myapp")


def test_cli_product_names_are_case_insensitive_and_replace_says_replaced(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    db = make_db(tmp_path / "t.db", seed=False)
    argv = ["releases", "add", "v3.0.0", "--db", db, "--product", "OtherApp", "--notes", NOTES]
    assert run(capsys, *argv) == (0, "added otherapp v3.0.0\n", "")
    assert run(capsys, *argv, "--replace") == (0, "replaced otherapp v3.0.0\n", "")
    code, _, err = run(capsys, *argv)
    assert code == 1 and "already in the catalog (use --replace)" in err
    assert run(capsys, "releases", "latest", "--db", db, "--product", "OTHERAPP")[1] == "v3.0.0\n"
    code, _, err = run(capsys, "releases", "add", "v3.1.0", "--db", db, "--product", "OtherApp")
    assert code == 1 and "release_notes: required" in err
    code, _, err = run(capsys, "releases", "list", "--db", db, "--product", "nothing")
    assert code == 0 and "warning: no releases of nothing (products with releases: otherapp)" in err


async def test_a_release_added_for_otherapp_is_served_to_otherapp_user_agents(
    tmp_path: Path, aiohttp_client: AiohttpClient, capsys: pytest.CaptureFixture[str]
) -> None:
    settings = make_settings(tmp_path)
    client = await aiohttp_client(create_app(settings))  # creates and seeds the database
    asset = "https://dl.example.org/v3.0.0/otherapp-3.0.0_linux_amd64.tar.gz"
    argv = ["releases", "add", "v3.0.0", "--db", settings.db, "--product", "OtherApp",
            "--notes", NOTES, "--asset", asset]  # fmt: skip
    code = await asyncio.to_thread(main, argv)
    capsys.readouterr()
    assert code == 0
    await _refresh(client)
    response = await client.post(
        "/v1/version",
        json=report_body(version="1.0.0"),
        headers={"User-Agent": "OtherApp/1.0.0 (linux, amd64)"},
    )
    assert (await response.json())["latest"] == {
        "download": asset,
        "release_notes": NOTES,
        "latest_release": "v3.0.0",
        "opa_up_to_date": False,
    }


async def _refresh(client: Any) -> None:
    from opa_telemetry_server.web.appkeys import INTAKE

    await client.app[INTAKE].catalog.refresh()


def test_releases_import_reads_standard_input(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    db = make_db(tmp_path / "t.db", seed=False)
    document = json.dumps([github_release("v2.0.0"), github_release("v2.1.0", draft=True)])
    monkeypatch.setattr("sys.stdin", io.TextIOWrapper(io.BytesIO(document.encode())))
    code, out, _ = run(capsys, "releases", "import", "-", "--db", db, "--product", "MyApp")
    assert (code, out) == (0, "myapp: 1 added, 0 replaced, 1 read, 1 drafts skipped\n")
    code, out, _ = run(capsys, "releases", "list", "--db", db, "--product", "myapp", "--json")
    assert json.loads(out)[0]["assets"] == [
        "https://github.com/o/r/releases/download/v2.0.0/myapp_linux_amd64.tar.gz"
    ]


def test_stats_warns_when_a_product_has_no_reports(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    db = make_db(tmp_path / "t.db", seed=False)
    code, out, err = run(capsys, "stats", "--db", db, "--product", "OtherApp")
    assert code == 0 and out.startswith("otherapp, ")
    assert err.splitlines() == [
        "warning: otherapp has no releases in the catalog (products: none)",
        "warning: no reports from otherapp have been aggregated (products: none)",
    ]
