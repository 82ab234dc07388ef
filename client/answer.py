"""Pure: the service's answer to a report, parsed into :class:`LatestRelease`."""

from __future__ import annotations

import json
from typing import NamedTuple

from .errors import AnswerError


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
    )
