"""Pure: per-client token buckets, held in memory only.

Keys are client addresses. They live in this process's memory for as long as a bucket is not
full, and are never written, logged or put in an error message: the privacy promise covers the
rate limiter too. Memory is bounded: past ``max_clients`` buckets, the idle ones (already full
again) are dropped first, then the oldest.
"""

from __future__ import annotations

import time
from collections.abc import Callable


class RateLimiter:
    """``rate`` requests per second per client, with bursts of up to ``burst``."""

    def __init__(
        self,
        rate: float,
        burst: float,
        *,
        max_clients: int = 100_000,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if rate <= 0 or burst < 1:
            raise ValueError("rate must be positive and burst at least 1")
        self.rate = rate
        self.burst = burst
        self.max_clients = max_clients
        self._clock = clock
        self._buckets: dict[str, tuple[float, float]] = {}  # key -> (tokens, updated at)

    def __len__(self) -> int:
        return len(self._buckets)

    def acquire(self, key: str) -> float:
        """Take one token for ``key``: 0.0 if allowed, else the seconds until one is free."""
        now = self._clock()
        tokens, updated = self._buckets.get(key, (self.burst, now))
        tokens = min(self.burst, tokens + (now - updated) * self.rate)
        if tokens >= 1.0:
            self._store(key, tokens - 1.0, now)
            return 0.0
        self._store(key, tokens, now)
        return (1.0 - tokens) / self.rate

    def _store(self, key: str, tokens: float, now: float) -> None:
        buckets = self._buckets
        buckets.pop(key, None)  # re-insert: dict order is then least recently used first
        buckets[key] = (tokens, now)
        if len(buckets) > self.max_clients:
            self._evict(now)

    def _evict(self, now: float) -> None:
        refill = self.burst / self.rate  # seconds for an empty bucket to be full again
        idle = [k for k, (_, updated) in self._buckets.items() if now - updated >= refill]
        for key in idle:
            del self._buckets[key]
        excess = len(self._buckets) - self.max_clients // 2
        if excess > 0 and not idle:
            for key in list(self._buckets)[:excess]:
                del self._buckets[key]
