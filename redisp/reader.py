"""Where both front doors meet: gate -> cache -> one shared fetch -> backing.

The single-client rule, the shared cache and the coalescing of concurrent
misses live here and nowhere else, so HTTP and RESP cannot drift apart.
"""

from __future__ import annotations

from typing import Optional, Union

from twisted.internet.defer import Deferred
from twisted.python.failure import Failure

from redisp.backing import Backing
from redisp.cache import Cache
from redisp.gate import Gate
from redisp.metrics import Metrics

#: (value or None when absent, True when answered from the cache)
Lookup = tuple[Optional[bytes], bool]


class CachedReader:
    """Reads keys through the cache, in the order the gate admits them."""

    def __init__(self, cache: Cache, gate: Gate, backing: Backing, metrics: Metrics) -> None:
        self._cache = cache
        self._gate = gate
        self._backing = backing
        self._metrics = metrics
        # key -> the Deferreds of every caller waiting on its one fetch
        self._inflight: dict[bytes, list[Deferred]] = {}

    def get(self, key: bytes) -> Union[Lookup, Deferred]:
        """A Lookup at once for a hit while the gate is idle, else a Deferred.

        Skipping the gate for an immediate hit is unobservable: nothing is
        running or queued, so the request would be admitted and finished
        before anything else could happen anyway.  It saves a Deferred and
        a lock round trip on the path that matters most for speed.
        """
        if self._gate.idle():
            value = self._cache.get(key)
            if value is not None:
                self._metrics.cache_hits += 1
                return value, True
        return self._gate.run(self._lookup, key)

    def get_many(self, keys: list[bytes]) -> Union[list, Deferred]:
        """Values (or None) for ``keys``, as one request through the gate.

        Misses are fetched with one backing MGET, so a non-string key reads
        as None, exactly as Redis's own MGET answers.
        """
        if self._gate.idle():
            values = [self._cache.get(key) for key in keys]
            if None not in values:
                self._metrics.cache_hits += len(values)
                return values
        return self._gate.run(self._lookup_many, keys)

    def _lookup(self, key: bytes) -> Union[Lookup, Deferred]:
        value = self._cache.get(key)
        if value is not None:
            self._metrics.cache_hits += 1
            return value, True
        self._metrics.cache_misses += 1
        return self._fetch(key).addCallback(lambda fetched: (fetched, False))

    def _fetch(self, key: bytes) -> Deferred:
        """Join the fetch of ``key`` in flight, or start one (singleflight)."""
        waiter: Deferred = Deferred()
        waiters = self._inflight.get(key)
        if waiters is not None:
            waiters.append(waiter)
            return waiter
        self._inflight[key] = [waiter]
        self._backing.get(key).addBoth(self._settle, key)
        return waiter

    def _settle(self, result: Union[Optional[bytes], Failure], key: bytes) -> None:
        waiters = self._inflight.pop(key)
        if isinstance(result, Failure):
            for waiter in waiters:
                waiter.errback(result)
            return
        if result is not None:
            self._cache.put(key, result)
        for waiter in waiters:
            waiter.callback(result)

    def _lookup_many(self, keys: list[bytes]) -> Union[list, Deferred]:
        values = [self._cache.get(key) for key in keys]
        missing = [key for key, value in zip(keys, values) if value is None]
        self._metrics.cache_hits += len(keys) - len(missing)
        if not missing:
            return values
        self._metrics.cache_misses += len(missing)
        unique = list(dict.fromkeys(missing))
        return self._backing.mget(unique).addCallback(self._merge, keys, values, unique)

    def _merge(self, fetched: list, keys: list[bytes], values: list, unique: list[bytes]) -> list:
        found = dict(zip(unique, fetched))
        for key, value in found.items():
            if value is not None:
                self._cache.put(key, value)
        return [found[key] if value is None else value for key, value in zip(keys, values)]
