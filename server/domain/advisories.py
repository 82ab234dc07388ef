"""Pure: security advisories in OSV form, and which of them affect a version.

Records follow the OSV schema (https://ossf.github.io/osv-schema/), as OSV.dev and GitHub's
advisory database publish them. Only what can be evaluated here is used: ``SEMVER`` ranges of
``introduced`` / ``fixed`` / ``last_affected`` events, compared by the project's SemVer
precedence (``versions``), and explicit ``versions`` lists. ``database_specific.goos`` (used by
the bundled OPA records) limits a record to callers on those operating systems.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from importlib import resources
from typing import Any

from opa_telemetry_server.domain.releases import check_url
from opa_telemetry_server.domain.versions import Version, VersionError, parse_version
from opa_telemetry_server.errors import CatalogError

BUNDLED_ADVISORIES = "opa-advisories.osv.json"
MAX_RECORD_BYTES = 64 * 1024
SEVERITIES = ("LOW", "MODERATE", "MEDIUM", "HIGH", "CRITICAL")
_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:-]{0,63}")
_EVENT_KINDS = ("introduced", "fixed", "last_affected")

# An event's place in a range: its version's precedence, the lowest for introduced "0".
Precedence = tuple[Any, ...]
_ZERO: Precedence = (-1,)


@dataclass(frozen=True, slots=True)
class Range:
    """One ``SEMVER`` range: its events in order of version."""

    events: tuple[tuple[str, Precedence, str], ...]  # (kind, precedence, version text)

    def fixed_for(self, version: Version) -> tuple[bool, str | None]:
        """Whether ``version`` is in the range, and the version that fixes it (if any)."""
        key = version.precedence
        affected = False
        for kind, at, _ in self.events:
            if kind == "introduced" and at <= key:
                affected = True
            elif (kind == "fixed" and at <= key) or (kind == "last_affected" and at < key):
                affected = False
        if not affected:
            return False, None
        fixed = next((text for kind, at, text in self.events if kind == "fixed" and at > key), None)
        return True, fixed


@dataclass(frozen=True, slots=True)
class Advisory:
    """One OSV record, with what the answer needs precomputed."""

    id: str
    aliases: tuple[str, ...]
    summary: str
    severity: str | None
    url: str | None
    ranges: tuple[Range, ...]
    versions: frozenset[Precedence]
    goos: frozenset[str] | None
    record: Mapping[str, Any] = field(repr=False, compare=False)

    def affects(self, version: Version, os_name: str | None) -> tuple[bool, str | None]:
        """Whether a caller at ``version`` on ``os_name`` is affected, and the fixing version.

        A record limited to some operating systems affects a caller of unknown platform.
        """
        if self.goos is not None and os_name is not None and os_name not in self.goos:
            return False, None
        if version.precedence in self.versions:
            return True, None
        for span in self.ranges:
            hit, fixed = span.fixed_for(version)
            if hit:
                return True, fixed
        return False, None

    def answer(self, fixed: str | None) -> dict[str, Any]:
        """The advisory as the ``/v1/version`` answer lists it."""
        return {
            "id": self.id,
            "aliases": list(self.aliases),
            "severity": self.severity,
            "summary": self.summary,
            "url": self.url,
            "fixed": fixed,
        }


def affecting(
    advisories: Iterable[Advisory], version: Version, os_name: str | None
) -> list[dict[str, Any]]:
    """The answer entries of the ``advisories`` that affect ``version`` on ``os_name``."""
    found = []
    for advisory in advisories:
        hit, fixed = advisory.affects(version, os_name)
        if hit:
            found.append(advisory.answer(fixed))
    return found


def advisory_from_osv(record: Any) -> Advisory:
    """Validate one OSV record; raises CatalogError naming the record and the field."""
    if not isinstance(record, dict):
        raise CatalogError("an advisory must be a JSON object (an OSV record)")
    ident = record.get("id")
    if not isinstance(ident, str) or not _ID.fullmatch(ident):
        raise CatalogError(f"advisory {str(ident)[:80]!r}: id: required, letters, digits, . _ : -")
    problems: list[str] = []
    aliases = record.get("aliases", [])
    if not isinstance(aliases, list) or not all(
        isinstance(a, str) and _ID.fullmatch(a) for a in aliases
    ):
        problems.append("aliases: must be an array of ids")
        aliases = []
    summary = record.get("summary", record.get("details", ""))
    if not isinstance(summary, str):
        problems.append("summary: must be a string")
        summary = ""
    specific = record.get("database_specific") or {}
    if not isinstance(specific, dict):
        problems.append("database_specific: must be an object")
        specific = {}
    severity = specific.get("severity")
    if severity is not None and (
        not isinstance(severity, str) or severity.upper() not in SEVERITIES
    ):
        problems.append(f"database_specific.severity: one of {', '.join(SEVERITIES)}")
        severity = None
    goos = specific.get("goos")
    if goos is not None and (
        not isinstance(goos, list) or not all(isinstance(g, str) for g in goos)
    ):
        problems.append("database_specific.goos: must be an array of GOOS names")
        goos = None
    ranges, versions = _affected(record.get("affected"), problems)
    url = _reference(record.get("references", []), problems)
    if not ranges and not versions and not problems:
        problems.append("affected: no SEMVER range or versions list to evaluate")
    if len(json.dumps(record)) > MAX_RECORD_BYTES:
        problems.append(f"larger than {MAX_RECORD_BYTES} bytes")
    if problems:
        raise CatalogError(f"advisory {ident}: {'; '.join(problems)}")
    return Advisory(
        id=ident,
        aliases=tuple(aliases),
        summary=summary[:300],
        severity=severity.upper() if isinstance(severity, str) else None,
        url=url,
        ranges=tuple(ranges),
        versions=frozenset(versions),
        goos=frozenset(goos) if goos is not None else None,
        record=record,
    )


def advisories_from_json(text: str | bytes) -> list[Advisory]:
    """Parse a JSON array of OSV records (or one record); refuses duplicate ids."""
    try:
        document = json.loads(text)
    except (ValueError, RecursionError) as exc:
        raise CatalogError(f"not valid JSON: {str(exc)[:200]}") from None
    records = document if isinstance(document, list) else [document]
    advisories = [advisory_from_osv(record) for record in records]
    ids = [a.id for a in advisories]
    duplicates = sorted({i for i in ids if ids.count(i) > 1})
    if duplicates:
        raise CatalogError(f"duplicate advisory ids: {', '.join(duplicates)}")
    return advisories


def bundled_advisories() -> list[Advisory]:
    """OPA's advisories as shipped inside the package (the default set)."""
    data = resources.files("opa_telemetry_server").joinpath("data", BUNDLED_ADVISORIES).read_bytes()
    return advisories_from_json(data)


def _affected(value: object, problems: list[str]) -> tuple[list[Range], list[Precedence]]:
    if not isinstance(value, list):
        problems.append("affected: must be an array")
        return [], []
    ranges: list[Range] = []
    versions: list[Precedence] = []
    for index, item in enumerate(value):
        where = f"affected[{index}]"
        if not isinstance(item, dict):
            problems.append(f"{where}: must be an object")
            continue
        for text in item.get("versions", []) or []:
            try:
                versions.append(parse_version(str(text)).precedence)
            except VersionError:
                problems.append(f"{where}.versions: {str(text)[:40]!r} is not a version")
        for number, span in enumerate(item.get("ranges", []) or []):
            if isinstance(span, dict) and span.get("type") == "SEMVER":
                parsed = _range(span.get("events"), f"{where}.ranges[{number}]", problems)
                if parsed is not None:
                    ranges.append(parsed)
    return ranges, versions


def _range(events: object, where: str, problems: list[str]) -> Range | None:
    if not isinstance(events, list) or not events:
        problems.append(f"{where}.events: must be a non-empty array")
        return None
    parsed: list[tuple[str, Precedence, str]] = []
    for event in events:
        if not isinstance(event, dict) or len(event) != 1:
            problems.append(f"{where}.events: each event has exactly one key")
            return None
        ((kind, text),) = event.items()
        if kind not in _EVENT_KINDS and kind != "limit":
            problems.append(f"{where}.events: unknown event {kind!r}")
            return None
        if kind == "limit":
            continue
        if not isinstance(text, str):
            problems.append(f"{where}.events: {kind} must be a version string")
            return None
        if kind == "introduced" and text == "0":
            parsed.append((kind, _ZERO, text))
            continue
        try:
            version = parse_version(text)
        except VersionError:
            problems.append(f"{where}.events: {kind} {text[:40]!r} is not a SemVer version")
            return None
        parsed.append((kind, version.precedence, version.text))
    if not any(kind == "introduced" for kind, _, _ in parsed):
        problems.append(f"{where}.events: no introduced event")
        return None
    # Events of one version apply introduced first, then fixed/last_affected (OSV's order).
    parsed.sort(key=lambda e: (e[1], e[0] != "introduced"))
    return Range(tuple(parsed))


def _reference(value: object, problems: list[str]) -> str | None:
    if not isinstance(value, list):
        problems.append("references: must be an array")
        return None
    urls: dict[str, str] = {}
    for item in value:
        if isinstance(item, dict) and isinstance(item.get("type"), str):
            try:
                urls.setdefault(item["type"], check_url(item.get("url")))
            except ValueError as exc:
                problems.append(f"references: {exc}")
                return None
    for kind in ("ADVISORY", "WEB", "REPORT", "FIX"):
        if kind in urls:
            return urls[kind]
    return next(iter(urls.values()), None)


def group_advisories(rows: Iterable[tuple[str, Advisory]]) -> dict[str, Sequence[Advisory]]:
    """Each product's advisories, the most severe first, then by id."""
    grouped: dict[str, list[Advisory]] = {}
    for product, advisory in rows:
        grouped.setdefault(product, []).append(advisory)
    return {p: tuple(sorted(items, key=_severity_order)) for p, items in grouped.items()}


def _severity_order(advisory: Advisory) -> tuple[int, str]:
    rank = SEVERITIES.index(advisory.severity) if advisory.severity in SEVERITIES else -1
    return -rank, advisory.id
