"""Pure: the service's answer to a report, parsed into :class:`LatestRelease`."""

from __future__ import annotations

import json
from typing import NamedTuple

from .errors import AnswerError

SERIOUS_SEVERITIES = frozenset({"HIGH", "CRITICAL"})


class Advisory(NamedTuple):
    """A security advisory the service says affects the running version (immutable).

    ``severity`` is the advisory database's word (``LOW``, ``MODERATE``, ``HIGH``,
    ``CRITICAL``) or ``None``; ``fixed`` is the first version that fixes it, if known.
    """

    id: str
    aliases: tuple[str, ...] = ()
    severity: str | None = None
    summary: str = ""
    url: str | None = None
    fixed: str | None = None

    @property
    def serious(self) -> bool:
        """HIGH or CRITICAL: worth a WARNING."""
        return self.severity in SERIOUS_SEVERITIES


class Support(NamedTuple):
    """The service's word on the running version: ``status`` is ``supported``,
    ``unsupported`` (below ``min_version``) or ``yanked`` (withdrawn, with ``reason``)."""

    status: str = "supported"
    min_version: str | None = None
    notice: str | None = None
    reason: str | None = None


class LatestRelease(NamedTuple):
    """What the service said about the newest release (immutable).

    ``latest_release`` is the tag (``v1.5.1``); ``download`` and ``release_notes`` are URLs;
    all three are ``None`` when the service knows no release. ``up_to_date`` is the service's
    verdict (OPA trusts it rather than comparing versions itself).

    A NamedTuple rather than a dataclass: building a dataclass costs about a millisecond at
    import (it compiles generated code), and importing this package must stay cheap.
    """

    latest_release: str | None
    download: str | None
    release_notes: str | None
    up_to_date: bool
    advisories: tuple[Advisory, ...] = ()
    support: Support | None = None  # None when the service said nothing about support

    @property
    def version(self) -> str | None:
        """The tag without its ``v``, as ``opa version --check`` prints it."""
        tag = self.latest_release
        return tag[1:] if tag and tag[:1] in ("v", "V") else tag

    @property
    def complete(self) -> bool:
        """True when all three strings are present (OPA prints them only then)."""
        return bool(self.latest_release and self.download and self.release_notes)


def parse_answer(body: bytes) -> LatestRelease:
    """Parse a ``{"latest": {...}}`` body; raises :class:`AnswerError` for anything else.

    Unknown keys are ignored (as Go does); a missing ``opa_up_to_date`` means out of date.
    ``advisories`` and ``support`` are read when present and well formed, and otherwise left
    empty: an older or OPA-only service sends neither.
    """
    try:
        document = json.loads(body)
    except (ValueError, RecursionError) as exc:
        raise AnswerError(f"answer is not JSON: {str(exc)[:100]}") from None
    latest = document.get("latest") if isinstance(document, dict) else None
    if not isinstance(latest, dict):
        raise AnswerError('answer has no "latest" object')

    def text(key: str) -> str | None:
        value = latest.get(key)
        return value if isinstance(value, str) and value else None

    return LatestRelease(
        latest_release=text("latest_release"),
        download=text("download"),
        release_notes=text("release_notes"),
        up_to_date=latest.get("opa_up_to_date") is True,
        advisories=_advisories(document.get("advisories")),
        support=_support(document.get("support")),
    )


def _text(value: object) -> str | None:
    return value if isinstance(value, str) and value else None


def _advisories(value: object) -> tuple[Advisory, ...]:
    if not isinstance(value, list):
        return ()
    found = []
    for item in value[:100]:
        if not isinstance(item, dict) or not _text(item.get("id")):
            continue
        aliases = item.get("aliases")
        severity = _text(item.get("severity"))
        found.append(
            Advisory(
                id=item["id"],
                aliases=tuple(a for a in aliases if isinstance(a, str))
                if isinstance(aliases, list)
                else (),
                severity=severity.upper() if severity else None,
                summary=_text(item.get("summary")) or "",
                url=_text(item.get("url")),
                fixed=_text(item.get("fixed")),
            )
        )
    return tuple(found)


def _support(value: object) -> Support | None:
    if not isinstance(value, dict) or not _text(value.get("status")):
        return None
    return Support(
        status=value["status"],
        min_version=_text(value.get("min_version")),
        notice=_text(value.get("notice")),
        reason=_text(value.get("reason")),
    )
