"""The catalog: latest per product and the download link across OPA's real asset history."""

from __future__ import annotations

from datetime import date

import pytest

from opa_telemetry_server.domain.releases import (
    Release,
    asset_for_platform,
    bundled_releases,
    download_url,
    latest_answer,
    release_from_mapping,
    releases_from_json,
)
from opa_telemetry_server.domain.versions import parse_version
from opa_telemetry_server.errors import CatalogError
from opa_telemetry_server.services.catalog import Catalog

BUNDLED = {release.tag: release for release in bundled_releases()}


def link(tag: str, os_name: str | None, arch: str | None) -> str:
    return download_url(BUNDLED[tag], os_name, arch)


def test_bundled_catalog_is_opas_history() -> None:
    assert len(BUNDLED) == 139
    assert Catalog(("opa", r) for r in BUNDLED.values()).latest("opa") == BUNDLED["v1.20.2"]


@pytest.mark.parametrize(
    ("tag", "os_name", "arch", "asset"),
    [
        # The plain build is preferred where it exists.
        ("v1.20.2", "linux", "amd64", "opa_linux_amd64"),
        ("v1.20.2", "linux", "arm64", "opa_linux_arm64"),
        ("v1.20.2", "darwin", "arm64", "opa_darwin_arm64"),
        ("v1.20.2", "windows", "amd64", "opa_windows_amd64.exe"),
        # Before v1.10.0 arm64 had only static builds.
        ("v1.9.0", "linux", "arm64", "opa_linux_arm64_static"),
        ("v1.9.0", "darwin", "arm64", "opa_darwin_arm64_static"),
        ("v0.37.0", "linux", "arm64", "opa_linux_arm64_static"),
        ("v0.36.1", "darwin", "arm64", "opa_darwin_arm64_static"),
    ],
)
def test_download_link_is_an_asset_that_exists(
    tag: str, os_name: str, arch: str, asset: str
) -> None:
    assert link(tag, os_name, arch) == f"https://openpolicyagent.org/downloads/{tag}/{asset}"
    assert asset in [a.name for a in BUNDLED[tag].assets]


@pytest.mark.parametrize(
    ("tag", "os_name", "arch"),
    [
        ("v0.36.0", "linux", "arm64"),  # linux/arm64 static only from v0.37.0
        ("v0.36.0", "darwin", "arm64"),  # darwin/arm64 static only from v0.36.1
        ("v1.20.2", "windows", "arm64"),  # windows is amd64 only
        ("v1.20.2", "freebsd", "amd64"),
        ("v1.20.2", None, None),
    ],  # platform unknown
)
def test_download_link_falls_back_to_release_page(
    tag: str, os_name: str | None, arch: str | None
) -> None:
    assert link(tag, os_name, arch) == BUNDLED[tag].release_notes


def test_every_bundled_link_points_at_a_published_asset() -> None:
    platforms = [(o, a) for o in ("linux", "darwin", "windows") for a in ("amd64", "arm64")]
    for release in BUNDLED.values():
        for os_name, arch in platforms:
            asset = asset_for_platform(release.assets, os_name, arch)
            assert asset is None or asset in release.assets


def test_latest_skips_prereleases_and_orders_by_precedence() -> None:
    def rel(tag: str, pre: bool = False) -> Release:
        return release_from_mapping({"tag": tag, "prerelease": pre})

    catalog = Catalog(
        [
            ("opa", rel("v1.9.0")),
            ("opa", rel("v1.10.0")),
            ("opa", rel("v2.0.0-rc.1")),
            ("opa", rel("v1.11.0", pre=True)),
            ("app", rel("0.1.0")),
        ]
    )
    assert catalog.latest("opa").tag == "v1.10.0"  # type: ignore[union-attr]
    assert catalog.latest("app").tag == "0.1.0"  # type: ignore[union-attr]
    assert catalog.latest("nothing") is None
    assert [r.tag for r in catalog.releases("opa")][:2] == ["v2.0.0-rc.1", "v1.11.0"]


def test_latest_answer_always_carries_three_strings() -> None:
    answer = latest_answer(BUNDLED["v1.20.2"], parse_version("1.20.2"), "linux", "amd64")
    assert answer == {
        "download": "https://openpolicyagent.org/downloads/v1.20.2/opa_linux_amd64",
        "release_notes": "https://github.com/open-policy-agent/opa/releases/tag/v1.20.2",
        "latest_release": "v1.20.2",
        "opa_up_to_date": True,
    }
    assert latest_answer(None, parse_version("1.0.0"), "linux", "amd64") == {"opa_up_to_date": True}


def test_asset_given_as_url_is_used_as_is() -> None:
    release = release_from_mapping(
        {"tag": "1.0.0", "assets": ["https://example.invalid/dl/opa_linux_amd64"]}
    )
    assert download_url(release, "linux", "amd64") == "https://example.invalid/dl/opa_linux_amd64"


def test_release_from_mapping_fills_defaults() -> None:
    release = release_from_mapping({"tag": "v1.21.0", "published": "2026-10-01"})
    assert release.release_notes == "https://github.com/open-policy-agent/opa/releases/tag/v1.21.0"
    assert release.published == date(2026, 10, 1)
    assert release_from_mapping({"tag": "v2.0.0-rc.1"}).prerelease


@pytest.mark.parametrize(
    "text",
    [
        '{"tag": "v1"}',
        "[{}]",
        '[{"tag": "nope"}]',
        '[{"tag": "v1.0.0", "assets": "x"}]',
        '[{"tag": "v1.0.0", "published": "yesterday"}]',
        "not json",
    ],
)
def test_releases_from_json_rejects_bad_files(text: str) -> None:
    with pytest.raises(CatalogError):
        releases_from_json(text)
