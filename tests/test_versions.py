"""SemVer 2.0 precedence and the version forms OPA and Python apps send."""

from __future__ import annotations

from typing import Any

import pytest

from opa_telemetry_server.domain.versions import Version, VersionError, is_up_to_date, parse_version


def key(text: str) -> tuple[Any, ...]:
    return parse_version(text).precedence


def test_parse_version_strips_v_and_keeps_parts() -> None:
    version = parse_version("v1.5.1")
    assert (version.major, version.minor, version.patch) == (1, 5, 1)
    assert str(version) == "1.5.1"
    assert str(parse_version("0.26.0-dev")) == "0.26.0-dev"


def test_semver_spec_ordering_example_holds() -> None:
    # The ordering example of semver.org §11, shuffled, must sort back into place.
    ordered = [
        "1.0.0-alpha",
        "1.0.0-alpha.1",
        "1.0.0-alpha.beta",
        "1.0.0-beta",
        "1.0.0-beta.2",
        "1.0.0-beta.11",
        "1.0.0-rc.1",
        "1.0.0",
    ]
    shuffled = ordered[3:] + ordered[:3]
    assert sorted(shuffled, key=key) == ordered


def test_prerelease_and_dev_builds_are_older_than_their_release() -> None:
    assert key("0.26.0-dev") < key("0.26.0")
    assert key("1.7.0-rc1") < key("1.7.0")
    assert key("1.7.0-rc1") > key("1.6.9")


def test_build_metadata_is_ignored_for_precedence() -> None:
    assert key("1.5.1+abc") == key("1.5.1") == key("v1.5.1+build.7")
    assert is_up_to_date(parse_version("1.5.1+local"), parse_version("v1.5.1"))


def test_numeric_identifiers_compare_numerically_not_lexically() -> None:
    assert key("1.0.0-rc.2") < key("1.0.0-rc.10")
    assert key("1.10.0") > key("1.9.0")


@pytest.mark.parametrize(
    ("current", "latest", "expected"),
    [
        ("1.5.1", "v1.5.1", True),
        ("1.5.0", "v1.5.1", False),
        ("1.6.0", "v1.5.1", True),
        ("1.5.1-dev", "v1.5.1", False),
        ("2.0.0-rc.1", "v1.20.2", True),
    ],
)
def test_is_up_to_date_follows_precedence(current: str, latest: str, expected: bool) -> None:
    assert is_up_to_date(parse_version(current), parse_version(latest)) is expected


@pytest.mark.parametrize(
    ("pep440", "semver"),
    [
        ("2.0.0rc1", "2.0.0-rc.1"),
        ("1.2", "1.2.0"),
        ("1.2.3.dev4", "1.2.3-dev.4"),
        ("1.0.post1", "1.0.0+post.1"),
    ],
)
def test_pep440_versions_map_onto_semver(pep440: str, semver: str) -> None:
    assert str(parse_version(pep440)) == semver
    assert key("2.0.0rc1") < key("2.0.0")


@pytest.mark.parametrize(
    "bad", ["", "v", "latest", "1.2.3.4.5", "01.2.3-", "1.2.3-+", "1!2.0", "1" * 70, "1.2.3 "]
)
def test_parse_version_rejects_non_versions(bad: str) -> None:
    with pytest.raises(VersionError):
        parse_version(bad)


def test_versions_equal_by_fields_not_precedence_key() -> None:
    assert Version(1, 2, 3) == parse_version("1.2.3")
