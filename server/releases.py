"""Pure: the release catalog — latest release per product and the download link per platform.

OPA's assets changed over time (linux/amd64 static from v0.29.4, darwin/arm64 static from
v0.36.1, linux/arm64 static from v0.37.0, non-static arm64 from v1.10.0, windows only amd64),
so the link is chosen from the assets each release actually has, never guessed from a pattern.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import date
from importlib import resources
from typing import Any

from .errors import CatalogError
from .versions import Version, VersionError, is_up_to_date, parse_version

OPA_DOWNLOAD_BASE = "https://openpolicyagent.org/downloads"
OPA_RELEASES_BASE = "https://github.com/open-policy-agent/opa/releases/tag"
BUNDLED_CATALOG = "opa-releases.json"
MAX_ASSETS = 64


@dataclass(frozen=True, slots=True)
class Release:
    """One published release of one product."""

    tag: str
    version: Version
    release_notes: str
    assets: tuple[str, ...] = ()
    published: date | None = None
    prerelease: bool = False
    id: int = 0


def asset_for_platform(assets: Iterable[str], os_name: str | None, arch: str | None) -> str | None:
    """Pick the binary for ``os_name``/``arch`` among ``assets``; ``None`` if there is none.

    The plain build is preferred over the ``_static`` one (it is what OPA's own download page
    offers first); Windows builds carry ``.exe``. Assets given as full URLs match on their last
    path segment.
    """
    if not os_name or not arch:
        return None
    by_name = {asset.rsplit("/", 1)[-1]: asset for asset in assets}
    stem = f"opa_{os_name}_{arch}"
    candidates = (f"{stem}.exe",) if os_name == "windows" else (stem, f"{stem}_static")
    for name in candidates:
        if name in by_name:
            return by_name[name]
    return None


def download_url(release: Release, os_name: str | None, arch: str | None) -> str:
    """The link for this platform's binary, or the release page when none was published."""
    asset = asset_for_platform(release.assets, os_name, arch)
    return release.release_notes if asset is None else asset_url(release, asset)


def asset_url(release: Release, asset: str) -> str:
    """An asset's download URL: itself when given as a URL, else under OPA's download site."""
    if asset.startswith(("https://", "http://")):
        return asset
    return f"{OPA_DOWNLOAD_BASE}/{release.tag}/{asset}"


def latest_answer(
    release: Release | None, current: Version, os_name: str | None, arch: str | None
) -> dict[str, Any]:
    """The ``latest`` object of a ``/v1/version`` answer (DESIGN.md §1.1).

    All three strings are always present when a release is known, because ``opa version
    --check`` prints them only when none is empty; ``opa_up_to_date`` follows SemVer precedence.
    """
    if release is None:
        return {"opa_up_to_date": True}
    return {
        "download": download_url(release, os_name, arch),
        "release_notes": release.release_notes,
        "latest_release": release.tag,
        "opa_up_to_date": is_up_to_date(current, release.version),
    }


class Catalog:
    """An immutable, in-memory view of every product's releases, newest first."""

    __slots__ = ("_latest", "_releases")

    def __init__(self, releases: Iterable[tuple[str, Release]] = ()) -> None:
        grouped: dict[str, list[Release]] = {}
        for product, release in releases:
            grouped.setdefault(product, []).append(release)
        self._releases = {
            product: tuple(sorted(items, key=lambda r: r.version.precedence, reverse=True))
            for product, items in grouped.items()
        }
        self._latest = {
            product: next((r for r in items if not r.prerelease), None)
            for product, items in self._releases.items()
        }

    def latest(self, product: str) -> Release | None:
        """The highest-precedence release of ``product`` not flagged as a pre-release."""
        return self._latest.get(product)

    def releases(self, product: str) -> Sequence[Release]:
        return self._releases.get(product, ())


def release_from_mapping(entry: Mapping[str, Any]) -> Release:
    """Build a :class:`Release` from the bundled catalog's JSON shape; raises CatalogError.

    Shape: ``{"tag": "v1.5.1", "published": "2025-05-30", "release_notes": "https://...",
    "assets": ["opa_linux_amd64", ...], "prerelease": false}``; only ``tag`` is required.
    """
    tag = entry.get("tag")
    if not isinstance(tag, str) or not tag:
        raise CatalogError(f"release without a tag: {dict(entry)!r:.200}")
    try:
        version = parse_version(tag)
    except VersionError as exc:
        raise CatalogError(f"{tag}: not a version ({exc})") from None
    notes = entry.get("release_notes") or f"{OPA_RELEASES_BASE}/{tag}"
    assets = entry.get("assets") or []
    if not isinstance(notes, str) or not isinstance(assets, list):
        raise CatalogError(f"{tag}: release_notes must be a string and assets a list")
    if len(assets) > MAX_ASSETS or not all(isinstance(a, str) and a for a in assets):
        raise CatalogError(f"{tag}: assets must be at most {MAX_ASSETS} non-empty strings")
    published = entry.get("published")
    try:
        day = date.fromisoformat(published) if published else None
    except (TypeError, ValueError):
        raise CatalogError(f"{tag}: published must be a YYYY-MM-DD date") from None
    return Release(
        tag=tag,
        version=version,
        release_notes=notes,
        assets=tuple(assets),
        published=day,
        prerelease=bool(entry.get("prerelease", False)) or version.is_prerelease,
    )


def releases_from_json(text: str | bytes) -> list[Release]:
    """Parse a JSON array in the bundled catalog's shape; raises CatalogError."""
    try:
        entries = json.loads(text)
    except ValueError as exc:
        raise CatalogError(f"not valid JSON: {exc}") from None
    if not isinstance(entries, list) or not all(isinstance(e, dict) for e in entries):
        raise CatalogError("expected a JSON array of release objects")
    return [release_from_mapping(entry) for entry in entries]


def bundled_releases() -> list[Release]:
    """OPA's release history as shipped inside the package (the default catalog)."""
    data = resources.files(__package__).joinpath("data", BUNDLED_CATALOG).read_bytes()
    return releases_from_json(data)
