"""Pure: releases and their assets, checked as strictly as a package index checks an upload.

A catalog change reaches the whole fleet within seconds, so every entry is validated before it
is stored: tags are versions, URLs are absolute http(s), asset names match a strict pattern,
booleans are booleans, unknown keys and duplicates are errors, and each error names the entry
and the field. Two input shapes are read: the bundled catalog's (``tag``, ``release_notes``,
``assets``...) and GitHub's release JSON (``tag_name``, ``html_url``, ``assets[].name``...).

OPA's assets changed over time (linux/amd64 static from v0.29.4, darwin/arm64 static from
v0.36.1, linux/arm64 static from v0.37.0, non-static arm64 from v1.10.0, windows only amd64),
so the download link is chosen from the assets each release actually has, never guessed.
Only OPA gets OPA's URLs: its assets may be bare names under OPA's download site and its
release notes default to its GitHub release page. Every other product gives full URLs, and
each asset's platform either explicitly or by an ``_<os>_<arch>`` suffix of its file name.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import date, datetime
from importlib import resources
from typing import Any
from urllib.parse import urlsplit

from opa_telemetry_server.domain.protocol import DEFAULT_PRODUCT
from opa_telemetry_server.domain.versions import Version, VersionError, is_up_to_date, parse_version
from opa_telemetry_server.errors import CatalogError

OPA_DOWNLOAD_BASE = "https://openpolicyagent.org/downloads"
OPA_RELEASES_BASE = "https://github.com/open-policy-agent/opa/releases/tag"
BUNDLED_CATALOG = "opa-releases.json"
MAX_ASSETS = 64
MAX_URL_LENGTH = 2048

# Go's GOOS and GOARCH values: a file name's platform suffix is read only from these, so that
# ``checksums_sha256.txt`` or ``opa_linux_amd64.sha256`` never pass for a binary.
GOOS = frozenset(
    [
        "aix",
        "android",
        "darwin",
        "dragonfly",
        "freebsd",
        "illumos",
        "ios",
        "js",
        "linux",
        "netbsd",
        "openbsd",
        "plan9",
        "solaris",
        "wasip1",
        "windows",
    ]
)
GOARCH = frozenset(
    [
        "386",
        "amd64",
        "arm",
        "arm64",
        "loong64",
        "mips",
        "mips64",
        "mips64le",
        "mipsle",
        "ppc64",
        "ppc64le",
        "riscv64",
        "s390x",
        "wasm",
    ]
)
_ARCHIVES = (".tar.gz", ".tar.xz", ".tar.bz2", ".tgz", ".zip", ".exe")
_ASSET_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+-]{0,127}")
# A tag is a full version (three numbers), optionally with a "v": "v1" is refused as ambiguous.
_TAG = re.compile(r"[vV]?\d+\.\d+\.\d+[A-Za-z0-9._+-]{0,48}")
_PLATFORM_WORD = re.compile(r"[a-z0-9]{1,32}")
_OWN_KEYS = frozenset({"tag", "published", "release_notes", "assets", "prerelease"})
_ASSET_KEYS = frozenset({"url", "os", "arch"})


@dataclass(frozen=True, slots=True)
class Asset:
    """One downloadable file of a release, with the platform it is for.

    ``given`` is how the catalog names it: a bare name (OPA only), a URL, or ``None`` when the
    platform was given explicitly (then :meth:`to_json` writes an object).
    """

    name: str
    url: str
    os: str
    arch: str
    static: bool = False
    given: str | None = None

    def to_json(self) -> str | dict[str, str]:
        if self.given is not None:
            return self.given
        return {"url": self.url, "os": self.os, "arch": self.arch}


@dataclass(frozen=True, slots=True)
class Release:
    """One published release of one product."""

    tag: str
    version: Version
    release_notes: str
    assets: tuple[Asset, ...] = ()
    published: date | None = None
    prerelease: bool = False
    id: int = 0

    def to_json(self) -> dict[str, Any]:
        """The bundled catalog's shape (what ``releases import`` reads back)."""
        return {
            "tag": self.tag,
            "published": self.published.isoformat() if self.published else None,
            "release_notes": self.release_notes,
            "assets": [asset.to_json() for asset in self.assets],
            "prerelease": self.prerelease,
        }


def platform_of(name: str) -> tuple[str, str, bool] | None:
    """``(os, arch, static)`` from a file name's ``_<os>_<arch>[_static]`` suffix, whatever
    the prefix (``myapp-2.0.0_linux_amd64.tar.gz``); ``None`` if it names no platform."""
    stem = name
    for suffix in _ARCHIVES:
        if stem.lower().endswith(suffix):
            stem = stem[: -len(suffix)]
            break
    static = stem.endswith("_static")
    if static:
        stem = stem[: -len("_static")]
    parts = stem.rsplit("_", 2)
    if len(parts) == 3 and parts[0] and parts[1] in GOOS and parts[2] in GOARCH:
        return parts[1], parts[2], static
    return None


def asset_for_platform(
    assets: Iterable[Asset], os_name: str | None, arch: str | None
) -> Asset | None:
    """The asset for ``os_name``/``arch``; ``None`` if there is none.

    The plain build is preferred over the ``_static`` one (it is what OPA's own download page
    offers first).
    """
    if not os_name or not arch:
        return None
    static = None
    for asset in assets:
        if asset.os == os_name and asset.arch == arch:
            if not asset.static:
                return asset
            static = static or asset
    return static


def download_url(release: Release, os_name: str | None, arch: str | None) -> str:
    """The link for this platform's binary, or the release page when none was published."""
    asset = asset_for_platform(release.assets, os_name, arch)
    return release.release_notes if asset is None else asset.url


def latest_answer(
    release: Release | None,
    current: Version,
    os_name: str | None,
    arch: str | None,
    *,
    yanked: bool = False,
) -> dict[str, Any]:
    """The ``latest`` object of a ``/v1/version`` answer (DESIGN.md §1.1).

    All three strings are always present when a release is known, because ``opa version
    --check`` prints them only when none is empty; ``opa_up_to_date`` follows SemVer
    precedence, and is false for a caller running a yanked release.
    """
    if release is None:
        return {"opa_up_to_date": not yanked}
    return {
        "download": download_url(release, os_name, arch),
        "release_notes": release.release_notes,
        "latest_release": release.tag,
        "opa_up_to_date": not yanked and is_up_to_date(current, release.version),
    }


# -- reading catalog input ----------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ParsedReleases:
    """What a catalog file held: its releases, and how many GitHub drafts were skipped."""

    releases: list[Release]
    drafts_skipped: int = 0


def check_url(value: object) -> str:
    """``value`` if it is an absolute http(s) URL without spaces; raises ValueError."""
    if not isinstance(value, str):
        raise ValueError("must be a URL string")
    if len(value) > MAX_URL_LENGTH or not value.isprintable() or any(c.isspace() for c in value):
        raise ValueError(f"not a usable URL: {value[:100]!r}")
    try:
        parts = urlsplit(value)
        parts.port  # noqa: B018 - raises ValueError for a bad port
    except ValueError:
        raise ValueError(f"not a URL: {value[:100]!r}") from None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"must be an absolute http(s) URL, not {value[:100]!r}")
    if any(segment in ("..", ".") for segment in parts.path.split("/")):
        raise ValueError(f"has a '.' or '..' path segment: {value[:100]!r}")
    return value


def release_from_mapping(entry: Mapping[str, Any], product: str = DEFAULT_PRODUCT) -> Release:
    """Build a :class:`Release` from the bundled catalog's shape; raises CatalogError.

    Shape: ``{"tag": "v1.5.1", "published": "2025-05-30", "release_notes": "https://...",
    "assets": ["opa_linux_amd64", "https://.../x_linux_arm64", {"url": ..., "os": ...,
    "arch": ...}], "prerelease": false}``. Only ``tag`` is required for OPA; every other
    product also needs ``release_notes`` (its own page: OPA's is never assumed for it).
    """
    problems: list[str] = []
    unknown = sorted(set(entry) - _OWN_KEYS)
    if unknown:
        problems.append(f"unknown keys {', '.join(map(repr, unknown))}"
                        f" (expected {', '.join(sorted(_OWN_KEYS))})")  # fmt: skip
    tag, version = _tag(entry.get("tag"), problems)
    label = tag or "release"
    notes = entry.get("release_notes")
    if notes is None and product == DEFAULT_PRODUCT and tag:
        notes = f"{OPA_RELEASES_BASE}/{tag}"
    if notes is None:
        problems.append("release_notes: required (the release page of this product)")
    else:
        _checked(problems, "release_notes", check_url, notes)
    assets = _own_assets(entry.get("assets", []), product, tag, problems)
    published = _published(entry.get("published"), problems)
    prerelease = entry.get("prerelease", False)
    if not isinstance(prerelease, bool):
        problems.append("prerelease: must be true or false")
    if problems:
        raise CatalogError(f"{label}: {'; '.join(problems)}")
    assert tag is not None and version is not None and isinstance(notes, str)
    return Release(
        tag=tag,
        version=version,
        release_notes=notes,
        assets=assets,
        published=published,
        prerelease=prerelease is True or version.is_prerelease,
    )


def release_from_github(entry: Mapping[str, Any], product: str) -> Release | None:
    """Build a :class:`Release` from one object of GitHub's release JSON; ``None`` for a draft.

    Reads ``tag_name``, ``html_url``, ``published_at``, ``prerelease``, ``draft`` and
    ``assets[].name``/``browser_download_url``, ignoring GitHub's other keys. Assets whose name
    has no platform suffix (checksums, signatures, SBOMs) are left out. Raises CatalogError.
    """
    problems: list[str] = []
    draft = entry.get("draft", False)
    if not isinstance(draft, bool):
        problems.append("draft: must be true or false")
    tag, version = _tag(entry.get("tag_name"), problems, key="tag_name")
    label = tag or "release"
    notes = _checked(problems, "html_url", check_url, entry.get("html_url"))
    published = _published(entry.get("published_at"), problems, key="published_at")
    prerelease = entry.get("prerelease", False)
    if not isinstance(prerelease, bool):
        problems.append("prerelease: must be true or false")
    assets = _github_assets(entry.get("assets", []), problems, product, tag)
    if problems:
        raise CatalogError(f"{label}: {'; '.join(problems)}")
    if draft:
        return None
    assert tag is not None and version is not None and notes is not None
    return Release(
        tag, version, notes, assets, published, prerelease is True or version.is_prerelease
    )


def parse_releases(document: Any, product: str = DEFAULT_PRODUCT) -> ParsedReleases:
    """Read a parsed JSON document: one release object or an array of them, in either shape.

    Refuses duplicate tags (and two tags of one version); raises CatalogError whose message
    names the entry (its position and tag) and the field.
    """
    entries = document if isinstance(document, list) else [document]
    releases: list[Release] = []
    drafts = 0
    seen: dict[tuple[Any, ...], str] = {}
    for number, entry in enumerate(entries, start=1):
        if not isinstance(entry, dict):
            raise CatalogError(f"entry {number}: expected a release object, got {_kind(entry)}")
        try:
            if "tag_name" in entry:
                release = release_from_github(entry, product)
            else:
                release = release_from_mapping(entry, product)
        except CatalogError as exc:
            raise CatalogError(
                f"entry {number} ({exc})" if len(entries) > 1 else str(exc)
            ) from None
        if release is None:
            drafts += 1
            continue
        key = release.version.precedence
        if release.tag in seen.values() or key in seen:
            other = seen.get(key, release.tag)
            raise CatalogError(f"entry {number} ({release.tag}): duplicate of {other}")
        seen[key] = release.tag
        releases.append(release)
    return ParsedReleases(releases, drafts)


def releases_from_json(text: str | bytes, product: str = DEFAULT_PRODUCT) -> ParsedReleases:
    """Parse JSON text (see :func:`parse_releases`); raises CatalogError."""
    try:
        document = json.loads(text)
    except (ValueError, RecursionError) as exc:
        raise CatalogError(f"not valid JSON: {str(exc)[:200]}") from None
    if not isinstance(document, list | dict):
        raise CatalogError(f"expected a release object or an array of them, got {_kind(document)}")
    return parse_releases(document, product)


def bundled_releases() -> list[Release]:
    """OPA's release history as shipped inside the package (the default catalog)."""
    data = resources.files("opa_telemetry_server").joinpath("data", BUNDLED_CATALOG).read_bytes()
    return releases_from_json(data).releases


def _kind(value: object) -> str:
    names: dict[type, str] = {dict: "an object", list: "an array", str: "a string"}
    return names.get(type(value), type(value).__name__)


def _checked(problems: list[str], key: str, check: Any, value: object) -> Any:
    try:
        return check(value)
    except ValueError as exc:
        problems.append(f"{key}: {exc}")
        return None


def _tag(value: object, problems: list[str], key: str = "tag") -> tuple[str | None, Version | None]:
    if not isinstance(value, str) or not value:
        problems.append(f"{key}: required, a version such as v1.2.3")
        return None, None
    if not _TAG.fullmatch(value):
        problems.append(f"{key}: {value[:80]!r} is not a version tag such as v1.2.3")
        return None, None
    try:
        return value, parse_version(value)
    except VersionError as exc:
        problems.append(f"{key}: {value!r} is not a version ({exc})")
        return None, None


def _published(value: object, problems: list[str], key: str = "published") -> date | None:
    if value is None:
        return None
    if isinstance(value, str):
        try:
            if len(value) == 10:
                return date.fromisoformat(value)
            return datetime.fromisoformat(value.replace("Z", "+00:00")).date()
        except ValueError:
            pass
    problems.append(f"{key}: must be a YYYY-MM-DD date (or an ISO 8601 time)")
    return None


def _own_assets(
    value: object, product: str, tag: str | None, problems: list[str]
) -> tuple[Asset, ...]:
    if not isinstance(value, list):
        problems.append("assets: must be an array")
        return ()
    if len(value) > MAX_ASSETS:
        problems.append(f"assets: at most {MAX_ASSETS}")
        return ()
    assets: list[Asset] = []
    for index, item in enumerate(value):
        where = f"assets[{index}]"
        try:
            asset = _own_asset(item, product, tag)
        except ValueError as exc:
            problems.append(f"{where}: {exc}")
            continue
        if any(a.url == asset.url for a in assets):
            problems.append(f"{where}: duplicate of {asset.url!r}")
            continue
        assets.append(asset)
    return tuple(assets)


def _own_asset(item: object, product: str, tag: str | None) -> Asset:
    if isinstance(item, dict):
        unknown = sorted(set(item) - _ASSET_KEYS)
        if unknown:
            raise ValueError(
                f"unknown keys {', '.join(map(repr, unknown))} (expected url, os, arch)"
            )
        url = check_url(item.get("url"))
        name = _file_name(url)
        os_name, arch = item.get("os"), item.get("arch")
        for key, word in (("os", os_name), ("arch", arch)):
            if not isinstance(word, str) or not _PLATFORM_WORD.fullmatch(word):
                raise ValueError(f"{key}: must be a Go platform word such as linux or amd64")
        assert isinstance(os_name, str) and isinstance(arch, str)
        return Asset(name, url, os_name, arch)
    if not isinstance(item, str) or not item:
        raise ValueError("must be a file name, a URL or an object {url, os, arch}")
    if ":" in item or "/" in item:
        url = check_url(item)
        name = _file_name(url)
    elif product == DEFAULT_PRODUCT:
        name = _asset_name(item)
        url = f"{OPA_DOWNLOAD_BASE}/{tag}/{name}"
    else:
        raise ValueError(f"{item[:80]!r}: must be a full URL (only OPA's assets may be bare names)")
    platform = platform_of(name)
    if platform is None:
        raise ValueError(
            f"{name!r} names no platform: end the file name in _<os>_<arch> (e.g."
            " myapp_linux_amd64.tar.gz) or give an object {url, os, arch}"
        )
    return Asset(name, url, *platform, given=item)


def _github_assets(
    value: object, problems: list[str], product: str, tag: str | None
) -> tuple[Asset, ...]:
    """GitHub's assets that name a platform. OPA's own binaries (``opa_<os>_<arch>...``) are
    linked on OPA's download site, as the bundled catalog links them (DESIGN.md §1.3)."""
    if not isinstance(value, list):
        problems.append("assets: must be an array")
        return ()
    assets: list[Asset] = []
    for index, item in enumerate(value[: MAX_ASSETS * 4]):
        where = f"assets[{index}]"
        if not isinstance(item, dict):
            problems.append(f"{where}: must be an object")
            continue
        try:
            name = _asset_name(item.get("name"))
            url = check_url(item.get("browser_download_url"))
        except ValueError as exc:
            problems.append(f"{where}: {exc}")
            continue
        platform = platform_of(name)
        if platform is None or any(a.url == url for a in assets):
            continue  # checksums, signatures, SBOMs: not a binary to offer
        if product == DEFAULT_PRODUCT and name.startswith("opa_") and tag:
            assets.append(Asset(name, f"{OPA_DOWNLOAD_BASE}/{tag}/{name}", *platform, given=name))
        else:
            assets.append(Asset(name, url, *platform, given=url))
    return tuple(assets[:MAX_ASSETS])


def _asset_name(value: object) -> str:
    if not isinstance(value, str) or not _ASSET_NAME.fullmatch(value) or ".." in value:
        shown = value[:80] if isinstance(value, str) else value
        raise ValueError(f"{shown!r} is not a plain file name (letters, digits, . _ + -)")
    return value


def _file_name(url: str) -> str:
    return _asset_name(urlsplit(url).path.rsplit("/", 1)[-1])


def group_by_product(rows: Iterable[tuple[str, Release]]) -> dict[str, Sequence[Release]]:
    """Each product's releases, newest (highest precedence) first."""
    grouped: dict[str, list[Release]] = {}
    for product, release in rows:
        grouped.setdefault(product, []).append(release)
    return {
        product: tuple(sorted(items, key=lambda r: r.version.precedence, reverse=True))
        for product, items in grouped.items()
    }
