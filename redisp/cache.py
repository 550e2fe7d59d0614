"""The local cache: global TTL from insertion, LRU eviction, capacity in keys.

One ``OrderedDict`` in least- to most-recently-used order holds
``key -> (value, expires_at)``.  Every operation is O(1): a read is a dict
lookup plus ``move_to_end`` (C code, no scan), a store that overflows pops the
head (the LRU entry), and expiry is checked on the entry being read.
Entries that expire without being read again are found by ``sweep``, which
walks from the LRU end a bounded number of steps: the entries there are the
ones not read for longest, so that is where stale ones collect.

Time comes from the clock passed in (the reactor, or ``task.Clock`` in tests).
"""

from __future__ import annotations

from collections import OrderedDict
from itertools import islice

from twisted.internet.interfaces import IReactorTime

from redisp.metrics import Metrics


class Cache:
    """LRU cache with a global time-to-live; counts into ``metrics``."""

    def __init__(self, capacity: int, ttl: float, clock: IReactorTime, metrics: Metrics) -> None:
        self.capacity = capacity
        self.ttl = ttl
        self._clock = clock
        self._metrics = metrics
        self._entries: OrderedDict[bytes, tuple[bytes, float]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, key: bytes) -> bytes | None:
        """The cached value of ``key``, or None; a read marks it recently used."""
        entry = self._entries.get(key)
        if entry is None:
            return None
        if entry[1] <= self._clock.seconds():
            del self._entries[key]
            self._metrics.cache_expirations += 1
            return None
        self._entries.move_to_end(key)
        return entry[0]

    def put(self, key: bytes, value: bytes) -> None:
        """Store ``value``; its ttl starts now. Evicts the LRU entry when full."""
        if self.capacity == 0:
            return
        entries = self._entries
        now = self._clock.seconds()
        if key in entries:
            entries.move_to_end(key)
        elif len(entries) >= self.capacity:
            _, (_, expires_at) = entries.popitem(last=False)
            if expires_at <= now:
                self._metrics.cache_expirations += 1
            else:
                self._metrics.cache_evictions += 1
        entries[key] = (value, now + self.ttl)

    def discard(self, key: bytes) -> bool:
        """Drop ``key`` because it changed in Redis; True when it was cached."""
        if self._entries.pop(key, None) is None:
            return False
        self._metrics.cache_invalidations += 1
        return True

    def clear(self) -> int:
        """Drop everything (e.g. invalidation lost); returns how many were dropped."""
        dropped = len(self._entries)
        self._entries.clear()
        return dropped

    def sweep(self, limit: int = 1000) -> int:
        """Drop expired entries found among the ``limit`` least recently used.

        Bounded, so it can run on a timer without a pause proportional to the
        cache size; returns how many were dropped.
        """
        now = self._clock.seconds()
        expired = [
            key for key, (_, expires_at) in islice(self._entries.items(), limit)
            if expires_at <= now
        ]
        for key in expired:
            del self._entries[key]
        self._metrics.cache_expirations += len(expired)
        return len(expired)

