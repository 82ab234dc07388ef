"""Pure: parse version strings and order them by SemVer 2.0 precedence.

OPA reports versions without a ``v`` (``1.5.1``, ``0.26.0-dev``); its docs show ``v0.12.3``;
apps embedding our Python client may report PEP 440 versions (``2.0.0rc1``). All three parse
to one :class:`Version` whose ``precedence`` orders them as SemVer 2.0 says: a pre-release is
lower than its release, pre-release identifiers compare numerically or lexically, and build
metadata is ignored.
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass, field

from packaging.version import InvalidVersion
from packaging.version import Version as Pep440Version

MAX_VERSION_LENGTH = 64

# The grammar from semver.org, anchored; the leading "v" is stripped before matching.
_SEMVER = re.compile(
    r"(?P<major>0|[1-9]\d*)\.(?P<minor>0|[1-9]\d*)\.(?P<patch>0|[1-9]\d*)"
    r"(?:-(?P<pre>(?:0|[1-9]\d*|\d*[a-zA-Z-][0-9a-zA-Z-]*)"
    r"(?:\.(?:0|[1-9]\d*|\d*[a-zA-Z-][0-9a-zA-Z-]*))*))?"
    r"(?:\+(?P<build>[0-9a-zA-Z-]+(?:\.[0-9a-zA-Z-]+)*))?"
)

Identifier = tuple[int, int, str]


class VersionError(ValueError):
    """The text is not a SemVer 2.0 (or plain PEP 440) version."""


@dataclass(frozen=True, slots=True)
class Version:
    """A parsed version. ``str()`` gives the canonical form, without a leading ``v``."""

    major: int
    minor: int
    patch: int
    prerelease: tuple[str, ...] = ()
    build: tuple[str, ...] = ()
    precedence: tuple[int, int, int, int, tuple[Identifier, ...]] = field(
        init=False, repr=False, compare=False
    )
    text: str = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        # A release (no pre-release) outranks every pre-release of the same numbers; within
        # pre-releases numeric identifiers rank below alphanumeric ones (SemVer 2.0 §11).
        identifiers = tuple(
            (0, int(part), "") if part.isdigit() else (1, 0, part) for part in self.prerelease
        )
        key = (self.major, self.minor, self.patch, 0 if self.prerelease else 1, identifiers)
        object.__setattr__(self, "precedence", key)
        text = f"{self.major}.{self.minor}.{self.patch}"
        if self.prerelease:
            text += "-" + ".".join(self.prerelease)
        if self.build:
            text += "+" + ".".join(self.build)
        object.__setattr__(self, "text", text)

    @property
    def is_prerelease(self) -> bool:
        return bool(self.prerelease)

    def __str__(self) -> str:
        return self.text


@functools.lru_cache(maxsize=4096)  # a fleet reports few distinct versions
def parse_version(text: str) -> Version:
    """Parse ``text`` (optionally ``v``-prefixed) into a :class:`Version`.

    Raises :class:`VersionError` when it is neither SemVer 2.0 nor a PEP 440 version without
    an epoch and with at most three release numbers.
    """
    if len(text) > MAX_VERSION_LENGTH:
        raise VersionError(f"longer than {MAX_VERSION_LENGTH} characters")
    bare = text[1:] if text[:1] in ("v", "V") else text
    if not bare.isprintable() or bare != bare.strip():
        raise VersionError("contains whitespace or control characters")
    match = _SEMVER.fullmatch(bare)
    if match:
        pre, build = match["pre"], match["build"]
        return Version(
            int(match["major"]),
            int(match["minor"]),
            int(match["patch"]),
            tuple(pre.split(".")) if pre else (),
            tuple(build.split(".")) if build else (),
        )
    return _from_pep440(bare)


def _from_pep440(text: str) -> Version:
    """Map a PEP 440 version (``2.0.0rc1``, ``1.2.dev3``, ``1.0.post1``) onto SemVer terms.

    Pre-release ``a1``/``b1``/``rc1`` becomes ``-a.1``/``-b.1``/``-rc.1`` and ``.devN``
    becomes ``-dev.N``; post and local parts become build metadata (ignored for precedence).
    """
    try:
        parsed = Pep440Version(text)
    except InvalidVersion:
        raise VersionError("not a SemVer 2.0 or PEP 440 version") from None
    if parsed.epoch or len(parsed.release) > 3:
        raise VersionError("epochs and more than three release numbers are not supported")
    major, minor, patch = (*parsed.release, 0, 0)[:3]
    prerelease: list[str] = []
    if parsed.pre:
        prerelease += [parsed.pre[0], str(parsed.pre[1])]
    if parsed.dev is not None:
        prerelease += ["dev", str(parsed.dev)]
    build: list[str] = []
    if parsed.post is not None:
        build += ["post", str(parsed.post)]
    if parsed.local:
        build += parsed.local.split(".")
    return Version(major, minor, patch, tuple(prerelease), tuple(build))


def is_up_to_date(current: Version, latest: Version) -> bool:
    """True when ``current`` has at least ``latest``'s precedence (build metadata ignored)."""
    return current.precedence >= latest.precedence
