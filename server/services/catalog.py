"""The release catalog held in memory for the hot path, kept in step with the database.

:class:`Catalog` is an immutable view of every product's releases, policy and advisories with
each product's offer precomputed; :class:`CatalogCache` holds the current one and the encoded
``/v1/version`` answers, one per distinct (product, version, platform, offered release).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

from opa_telemetry_server.domain.advisories import Advisory, affecting, group_advisories
from opa_telemetry_server.domain.policy import Offer, Policy, offer, rollout_bucket, support_status
from opa_telemetry_server.domain.releases import Release, group_by_product, latest_answer
from opa_telemetry_server.domain.versions import Version
from opa_telemetry_server.errors import StorageUnavailableError
from opa_telemetry_server.storage import Storage

logger = logging.getLogger(__name__)

MAX_CACHED_ANSWERS = 4096
_NO_POLICY = Policy()


class Catalog:
    """An immutable, in-memory view of every product's releases (newest first), policy and
    advisories. Product names are slugs (``protocol.product_slug``)."""

    __slots__ = ("_advisories", "_offers", "_policies", "_releases", "_yanked", "rollouts")

    def __init__(
        self,
        releases: Iterable[tuple[str, Release]] = (),
        policies: Mapping[str, Policy] | None = None,
        advisories: Iterable[tuple[str, Advisory]] = (),
    ) -> None:
        self._releases = group_by_product(releases)
        self._policies = dict(policies or {})
        self._advisories = group_advisories(advisories)
        self._offers: dict[str, Offer] = {
            product: offer(items, self.policy(product)) for product, items in self._releases.items()
        }
        # Only products with a partial rollout under way: the hot path hashes the instance id
        # for these alone.
        self.rollouts: dict[str, tuple[Release | None, ...]] = {
            product: o.by_bucket for product, o in self._offers.items() if o.by_bucket is not None
        }
        self._yanked: dict[str, dict[Any, str]] = {}
        for product, policy in self._policies.items():
            by_tag = {r.tag: r for r in self._releases.get(product, ())}
            self._yanked[product] = {
                by_tag[tag].version.precedence: reason
                for tag, reason in policy.yanked.items()
                if tag in by_tag
            }

    def latest(self, product: str) -> Release | None:
        """The release offered to callers without an instance id: the newest that is neither
        a pre-release nor yanked, within the pin, and fully rolled out."""
        found = self._offers.get(product)
        return found.latest if found else None

    def offered(self, product: str, bucket: int | None) -> Release | None:
        """The release offered to an instance in rollout ``bucket`` (``None``: no id)."""
        found = self._offers.get(product)
        return found.for_bucket(bucket) if found else None

    def products(self) -> list[str]:
        """The products with at least one release."""
        return sorted(self._releases)

    def releases(self, product: str) -> Sequence[Release]:
        return self._releases.get(product, ())

    def policy(self, product: str) -> Policy:
        return self._policies.get(product, _NO_POLICY)

    def advisories(self, product: str) -> Sequence[Advisory]:
        return self._advisories.get(product, ())

    def is_yanked(self, product: str, tag: str) -> bool:
        return tag in self.policy(product).yanked

    def answer(
        self,
        product: str,
        version: Version,
        os_name: str | None,
        arch: str | None,
        release: Release | None,
    ) -> dict[str, Any]:
        """The whole ``/v1/version`` answer for a caller offered ``release``.

        ``latest`` is exactly OPA's object; ``advisories`` and ``support`` are extra top-level
        keys, which OPA's JSON decoder ignores.
        """
        yanked = self._yanked.get(product, {})
        return {
            "latest": latest_answer(
                release, version, os_name, arch, yanked=version.precedence in yanked
            ),
            "advisories": affecting(self.advisories(product), version, os_name),
            "support": support_status(version, self.policy(product), yanked),
        }


async def load_catalog(storage: Storage) -> Catalog:
    """Read every product's releases, policy and advisories into a :class:`Catalog`."""
    parts = await storage.load_catalog_parts()
    return Catalog(parts.releases, parts.policies, parts.advisories)


class CatalogCache:
    """The catalog held in memory for the hot path, reloaded when the database's catalog
    generation changes (the CLI, a sync or another process edited it)."""

    def __init__(self, storage: Storage, interval: float, dumps: Callable[[Any], bytes]) -> None:
        self._storage = storage
        self._interval = interval
        self._dumps = dumps
        self._generation = -1
        self.checked_at: float | None = None  # when the database last confirmed this copy
        self._answers: dict[tuple[Any, ...], bytes] = {}
        self._rollouts: dict[str, tuple[Release | None, ...]] = {}
        self.catalog = Catalog()

    @property
    def generation(self) -> int:
        """The database's catalog generation this copy was loaded at."""
        return self._generation

    def answer(self, product: str, version: Version, os_name: str | None,
               arch: str | None, instance_id: str = "") -> bytes:  # fmt: skip
        """The encoded ``/v1/version`` answer, computed once per distinct caller.

        A fleet has few distinct (product, version, platform) combinations, so the answers are
        cached until the catalog changes; the cache is cleared if it ever reaches its bound.
        While a rollout is under way for ``product`` the offered release is part of the key,
        chosen by the instance's rollout bucket.
        """
        if self._rollouts and product in self._rollouts:
            return self._rollout_answer(product, version, os_name, arch, instance_id)
        key = (product, version, os_name, arch)
        answer = self._answers.get(key)
        if answer is None:
            answer = self._encode(key, self.catalog.latest(product))
        return answer

    def _rollout_answer(self, product: str, version: Version, os_name: str | None,
                        arch: str | None, instance_id: str) -> bytes:  # fmt: skip
        """While a rollout is under way: the offered release (by the instance's bucket) is
        part of the key."""
        release = self._rollouts[product][rollout_bucket(instance_id)]
        key = (product, version, os_name, arch, release.tag if release else None)
        answer = self._answers.get(key)
        if answer is None:
            answer = self._encode(key, release)
        return answer

    def _encode(self, key: tuple[Any, ...], release: Release | None) -> bytes:
        if len(self._answers) >= MAX_CACHED_ANSWERS:
            self._answers = {}
        product, version, os_name, arch = key[:4]
        document = self.catalog.answer(product, version, os_name, arch, release)
        answer: bytes = self._dumps(document)
        self._answers[key] = answer
        return answer

    async def refresh(self) -> bool:
        """Reload if the catalog changed since the last load; returns whether it did."""
        generation = await self._storage.catalog_generation()
        if generation == self._generation:
            self.checked_at = time.time()
            return False
        catalog = await load_catalog(self._storage)
        self.catalog = catalog
        self._rollouts = catalog.rollouts
        self._answers = {}
        self._generation = generation
        self.checked_at = time.time()
        return True

    async def run(self) -> None:
        """Poll for changes forever; a failed poll is retried at the next interval."""
        while True:
            await asyncio.sleep(self._interval)
            try:
                if await self.refresh():
                    logger.info("release catalog reloaded")
            except StorageUnavailableError as exc:  # a fault that passes: one line, no traceback
                logger.warning("release catalog refresh failed: %s", exc)
            except Exception:
                logger.warning("release catalog refresh failed", exc_info=True)
