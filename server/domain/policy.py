"""Pure: what the operator decided a product's fleet is told (pin, yank, rollout, support).

- A **pin** caps the announced release: nothing newer than the pinned tag is offered.
- A **yanked** release is never offered, and instances running it are told they are out of
  date (``support.status`` is ``yanked``).
- A **rollout** offers a release to a percentage of instances, chosen by a stable hash of the
  instance id (:func:`rollout_bucket`), so one instance always gets the same answer. Requests
  without an id (GitHub-shaped checks) see a release only once it is at 100%.
- A **minimum supported version**: instances below it are told they run an unsupported
  version, with the operator's notice URL when one is set.
"""

from __future__ import annotations

import zlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from opa_telemetry_server.domain.releases import Release
from opa_telemetry_server.domain.versions import Version, VersionError, parse_version

BUCKETS = 100


@dataclass(frozen=True, slots=True)
class Policy:
    """One product's policy, as stored."""

    pinned: str | None = None
    min_version: Version | None = None
    notice: str | None = None
    yanked: Mapping[str, str] = field(default_factory=dict)  # tag -> reason ("" if none)
    rollouts: Mapping[str, int] = field(default_factory=dict)  # tag -> percent (0-99)

    @property
    def empty(self) -> bool:
        return not (self.pinned or self.min_version or self.yanked or self.rollouts)


def rollout_bucket(instance_id: str) -> int:
    """The instance's bucket in ``[0, 100)``: the same id always lands in the same bucket.

    CRC-32 is stable across processes and versions (unlike ``hash()``), and OPA's ids are random
    UUIDs, so buckets are evenly filled.
    """
    return zlib.crc32(instance_id.encode()) % BUCKETS


@dataclass(frozen=True, slots=True)
class Offer:
    """What a product offers after its policy: the latest release for callers without an id,
    and per bucket when a partial rollout is under way (``None`` otherwise)."""

    latest: Release | None
    by_bucket: tuple[Release | None, ...] | None = None

    def for_bucket(self, bucket: int | None) -> Release | None:
        if self.by_bucket is None or bucket is None:
            return self.latest
        return self.by_bucket[bucket]


def offer(releases: Sequence[Release], policy: Policy) -> Offer:
    """Apply ``policy`` to ``releases`` (newest first).

    Candidates are the releases that are neither pre-releases nor yanked and not newer than a
    pin. For a bucket, the newest candidate whose rollout includes it is offered; a release at
    a partial rollout is skipped by callers without an id.
    """
    cap = None
    if policy.pinned is not None:
        # The pinned tag's own version bounds the offer, even once that release is removed
        # from the catalog (by hand or a pruning sync): a pin never lets newer releases out.
        try:
            cap = parse_version(policy.pinned).precedence
        except VersionError:
            pinned = next((r for r in releases if r.tag == policy.pinned), None)
            cap = pinned.version.precedence if pinned is not None else None
    candidates = [
        r for r in releases
        if not r.prerelease and r.tag not in policy.yanked
        and (cap is None or r.version.precedence <= cap)
    ]  # fmt: skip
    latest = next((r for r in candidates if r.tag not in policy.rollouts), None)
    partial = [r for r in candidates if r.tag in policy.rollouts]
    if not partial or (
        latest is not None
        and all(r.version.precedence < latest.version.precedence for r in partial)
    ):
        return Offer(latest)
    by_bucket = tuple(
        next(
            (r for r in candidates
             if r.tag not in policy.rollouts or bucket < policy.rollouts[r.tag]),
            None,
        )
        for bucket in range(BUCKETS)
    )  # fmt: skip
    return Offer(latest, by_bucket)


def support_status(
    version: Version, policy: Policy, yanked_versions: Mapping[Any, str]
) -> dict[str, Any]:
    """The ``support`` object of an answer for a caller running ``version``.

    ``status`` is ``yanked`` (with ``reason`` when given), else ``unsupported`` below the
    minimum version, else ``supported``; ``min_version`` and ``notice`` appear when set.
    """
    support: dict[str, Any] = {"status": "supported"}
    reason = yanked_versions.get(version.precedence)
    if reason is not None:
        support["status"] = "yanked"
        if reason:
            support["reason"] = reason
    elif policy.min_version is not None and version.precedence < policy.min_version.precedence:
        support["status"] = "unsupported"
    if policy.min_version is not None:
        support["min_version"] = policy.min_version.text
    if policy.notice:
        support["notice"] = policy.notice
    return support
