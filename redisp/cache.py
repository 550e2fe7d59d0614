"""The local cache: global TTL from insertion, LRU eviction, capacity in keys.

One ``OrderedDict`` in least- to most-recently-used order holds
``key -> entry``.  Every operation is O(1): a read is a dict lookup plus
``move_to_end`` (C code, no scan), a store that overflows pops the head (the
LRU entry), and expiry is checked on the entry being read.  Entries that
expire without being read again are found by ``sweep``, which walks from the
LRU end a bounded number of steps: the entries there are the ones not read
for longest, so that is where stale ones collect.

An entry is one ``bytes`` object: the 8-byte *stamp* of its expiry time
followed by the value.  Measured with bench/run's memory pass (1M keys,
100-byte values), the former ``(value, expires_at)`` tuple and its float cost
~100 bytes per entry on top of the OrderedDict; one blob saves the tuple, the
float and one object header.  The stamp is the big-endian IEEE 754 double, and
for times >= 0 (epoch time, or ``task.Clock`` from 0) that byte order is the
numeric order, so an entry is alive exactly when ``entry >= _stamp(next
double after now)``: one C comparison, no unpacking, and the same exact
``expires_at <= now`` rule as before.

Time comes from the clock passed in (the reactor, or ``task.Clock`` in tests).
"""

from __future__ import annotations

from collections import OrderedDict, deque
from itertools import islice
from math import inf, nextafter
from struct import Struct

from twisted.internet.interfaces import IReactorTime

from redisp.metrics import Metrics

_stamp = Struct(">d").pack

#: runs an iterator to its end in C, keeping nothing
_consume = deque(maxlen=0).extend

#: bytes of the expiry stamp before the value in an entry
STAMP = 8


def alive_after(now: float) -> bytes:
    """The smallest entry alive at ``now``: entries below it have expired."""
    return _stamp(nextafter(now, inf))


class Cache:
    """LRU cache with a global time-to-live; counts into ``metrics``."""

    def __init__(self, capacity: int, ttl: float, clock: IReactorTime, metrics: Metrics) -> None:
        self.capacity = capacity
        self.ttl = ttl
        self._clock = clock
        self._metrics = metrics
        # key -> stamp of its expiry time + value (see the module docstring)
        self._entries: OrderedDict[bytes, bytes] = OrderedDict()

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, key: bytes) -> bytes | None:
        """The cached value of ``key``, or None; a read marks it recently used."""
        entry = self._entries.get(key)
        if entry is None:
            return None
        if entry < alive_after(self._clock.seconds()):
            del self._entries[key]
            self._metrics.cache_expirations += 1
            return None
        self._entries.move_to_end(key)
        return entry[STAMP:]

    def get_all(self, keys: list[bytes]) -> list[bytes] | None:
        """The entries (stamp + value) of ``keys`` if every one is cached and
        alive, else None and nothing changed; when found, each is marked used.

        For a batch of reads at one instant (the RESP door's pipelined GETs):
        one clock reading, and every step a ``map`` or builtin running in C
        with no Python code per key (bench/profile, GET hot -P16: a Python
        loop here was ~5% of the time).
        """
        entries = self._entries
        found = list(map(entries.get, keys))
        if not found or None in found or min(found) < alive_after(self._clock.seconds()):
            return None
        _consume(map(entries.move_to_end, keys))
        return found

    def put(self, key: bytes, value: bytes) -> None:
        """Store ``value``; its ttl starts now. Evicts the LRU entry when full."""
        if self.capacity == 0:
            return
        entries = self._entries
        now = self._clock.seconds()
        if key in entries:
            entries.move_to_end(key)
        elif len(entries) >= self.capacity:
            _, entry = entries.popitem(last=False)
            if entry < alive_after(now):
                self._metrics.cache_expirations += 1
            else:
                self._metrics.cache_evictions += 1
        entries[key] = _stamp(now + self.ttl) + value

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
        alive = alive_after(self._clock.seconds())
        expired = [
            key for key, entry in islice(self._entries.items(), limit) if entry < alive
        ]
        for key in expired:
            del self._entries[key]
        self._metrics.cache_expirations += len(expired)
        return len(expired)
