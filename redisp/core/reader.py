"""Where both front doors meet: gate -> cache -> one shared fetch -> backing.

The single-client rule, the shared cache and the coalescing of concurrent
misses live here and nowhere else, so HTTP and RESP cannot drift apart.

Invalidation races are designed out here too.  The classic one: a fetch of
K is sent, K is written in Redis, the invalidation for K arrives (on another
connection) before the fetch's reply, and the old value is then stored and
served until its ttl.  So every GET fetch is a ``_Fetch`` record: an
invalidation of K *detaches* the record in flight for K (later readers start
a new fetch instead of joining one that may predate the write) and marks it
poisoned, and a poisoned fetch answers its waiters but is never stored.  An
MGET fetch is rarer; it notes the invalidation count when it starts and
stores nothing if any invalidation arrived meanwhile.  While ``caching`` is
off (tracking lost) nothing is stored at all.

Read-after-write with tracking: an invalidation may already wait in the
tracking connection's socket when a client's GET is handled in the same
reactor turn.  So every path that looks a key up in the cache first has the
tracking socket read (``drain_before_hits``), once per reactor turn: one
attribute test per lookup, one ``poll(0)`` of the socket (a ``recv`` only
when something waits) and one ``callLater(0)`` per turn that has lookups
(bench/NOTES-perf.md).

The GET path threads plain callbacks (the gate's ``enter`` and ``leave``,
``Backing.fetch``, ``read_packet``) rather than Deferreds: a queued miss used
to build two Deferred chains, the largest cost of a miss once the backing
batched them (bench/NOTES-perf.md).  ``get`` makes one Deferred for callers
that want one.  A GET fetch may travel in a batched MGET
(backing/batching.py); its record is handled the same either way.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from typing import Any

from twisted.internet.defer import Deferred, maybeDeferred
from twisted.internet.interfaces import IReactorTime
from twisted.python.failure import Failure

from redisp.backing.connection import Backing
from redisp.core.cache import Cache
from redisp.core.gate import Gate, Owner
from redisp.metrics import Metrics

#: (value or None when absent, True when answered from the cache)
Lookup = tuple[bytes | None, bool]


class CachedReader:
    """Reads keys through the cache, in the order the gate admits them."""

    def __init__(self, cache: Cache, gate: Gate, backing: Backing, metrics: Metrics) -> None:
        self._cache = cache
        self._gate = gate
        self._backing = backing
        self._metrics = metrics
        # key -> the fetch in flight that new readers of key may join
        self._inflight: dict[bytes, _Fetch] = {}
        #: False while stored values could go stale unseen (invalidation lost)
        self.caching = True
        self._invalidations = 0  # any invalidation bumps it (for MGET fetches)
        # False when invalidations may wait unread: the next lookup calls _freshen
        self._fresh = True
        self._drain: Callable[[], None] | None = None
        self._clock: IReactorTime | None = None

    def drain_before_hits(self, drain: Callable[[], None] | None,
                          clock: IReactorTime | None = None) -> None:
        """Have ``drain`` (take in the invalidations already received) run
        before the first cache lookup of every reactor turn; None: never.

        Once per turn, not per lookup: a GET handled in this turn was waiting
        in its socket when the turn began, so the invalidation Redis sent
        before acknowledging its writer's write was waiting too.  The one gap
        left is a request whose bytes arrive while a turn runs, after that
        turn's drain, and are still read in it: a window of one turn.
        """
        self._drain = drain
        self._clock = clock
        self._fresh = drain is None

    def _freshen(self) -> None:
        """The first lookup of this reactor turn: read pending invalidations."""
        self._fresh = True
        self._clock.callLater(0, self._turn_over)  # type: ignore[union-attr]
        self._drain()  # type: ignore[misc]

    def _turn_over(self) -> None:
        self._fresh = self._drain is None

    def get(self, key: bytes, owner: Owner | None = None) -> Lookup | Deferred:
        """A Lookup at once for a hit while the gate is idle, else a Deferred
        firing with one (or failing with a BackingError); never firing if
        ``owner`` is gone before the gate admits it."""
        lookup = self.read(key)
        if lookup is not None:
            return lookup
        waiter: Deferred = Deferred()
        # callback(Failure) = errback
        self._gate.enter(self._lookup, key, waiter.callback, owner=owner)
        return waiter

    def read(self, key: bytes) -> Lookup | None:
        """The Lookup of a cache hit while the gate is idle, else None.

        Skipping the gate for an immediate hit is unobservable: nothing is
        running or queued, so the request would be admitted and finished
        before anything else could happen anyway.  It saves a lock round
        trip on the path that matters most for speed.
        """
        if self._gate.idle():
            if not self._fresh:
                self._freshen()
            value = self._cache.get(key)
            if value is not None:
                self._metrics.cache_hits += 1
                return value, True
        return None

    def cached(self, keys: list[bytes]) -> list[bytes] | None:
        """The values of ``keys`` if the gate is idle and every one is a cache
        hit (each counted as one), else None and nothing counted.

        The RESP door answers a packet of pipelined GETs with this in one call:
        idle gate, so as unobservable as ``get``'s shortcut; one clock reading
        for the packet.  (bench/profile, GET hot -P16: dispatch, ``get`` and
        metrics per request were a large share of the time; bench/NOTES-perf.md.)
        """
        if not self._gate.idle():
            return None
        if not self._fresh:
            self._freshen()
        values = self._cache.get_all(keys)
        if values is not None:
            self._metrics.cache_hits += len(values)
        return values

    def get_many(self, keys: list[bytes], owner: Owner | None = None) -> list | Deferred:
        """Values (or None) for ``keys``, as one request through the gate.

        Misses are fetched with one backing MGET, so a non-string key reads
        as None, exactly as Redis's own MGET answers.
        """
        values = self.cached(keys)
        if values is not None:
            return values
        return self._gate.run(self._lookup_many, keys, owner=owner)

    def _lookup(self, key: bytes, done: Callable[[Any], None]) -> None:
        """Admitted by the gate: a hit at once, else join or start the fetch."""
        if not self._fresh:
            self._freshen()
        value = self._cache.get(key)
        if value is not None:
            self._metrics.cache_hits += 1
            self._gate.leave()
            done((value, True))
            return
        self._metrics.cache_misses += 1
        self._join(key, done)

    def _join(self, key: bytes, done: Callable[[Any], None]) -> None:
        """Wait on the fetch of ``key`` in flight, or start one (singleflight)."""
        fetch = self._inflight.get(key)
        if fetch is not None:
            fetch.append(done)
            return
        fetch = self._inflight[key] = _Fetch((done,))  # waiting before it may settle
        self._backing.fetch(key, partial(self._settle, key, fetch))

    def read_packet(
        self, keys: list[bytes], done: Callable[[list, int], None], owner: Owner | None = None
    ) -> None:
        """``get`` for a client's packet of GETs, as one gate entry, without a Deferred.

        ``done(results, hits)`` once every key is answered: ``results[i]`` is
        the value of ``keys[i]`` (None when absent) or a Failure, ``hits`` how
        many came from the cache.  Each key is still its own request: it holds
        its own token (``len(keys)`` at most ``concurrency``), which a hit
        gives back at once and a miss when its fetch settles, and it joins
        the same singleflight records as ``get``.  What the packet saves is
        the per-request plumbing: one admission, one callback per missed key,
        one answer (bench/miss_micro.py).  ``done`` must not raise, and is
        never called if ``owner`` is gone before the gate admits the packet.
        """
        self._gate.enter_many(len(keys), self._lookup_packet, keys, done, owner=owner)

    def _lookup_packet(self, keys: list[bytes], done: Callable[[list, int], None]) -> None:
        if not self._fresh:
            self._freshen()
        packet = _Packet(keys, done)
        results = packet.results
        hits = 0
        for i, value in enumerate(map(self._cache.get, keys)):
            if value is not None:
                results[i] = value
                hits += 1
            else:
                self._join(keys[i], partial(packet.got, i))
        packet.hits = hits
        self._metrics.cache_hits += hits
        self._metrics.cache_misses += len(keys) - hits
        if hits:
            self._gate.leave(hits)
        packet.left -= hits + 1  # the hits, and this lookup (see _Packet.left)
        if not packet.left:
            done(results, hits)

    def invalidate(self, key: bytes) -> None:
        """``key`` changed in Redis: drop it, and never store a fetch in flight."""
        self._invalidations += 1
        self._cache.discard(key)
        fetch = self._inflight.pop(key, None)
        if fetch is not None:
            fetch.poisoned = True

    def invalidate_all(self) -> int:
        """Anything may have changed: drop everything, poison every fetch."""
        self._invalidations += 1
        for fetch in self._inflight.values():
            fetch.poisoned = True
        self._inflight.clear()
        return self._cache.clear()

    def _settle(self, key: bytes, fetch: _Fetch, result: bytes | None | Failure) -> None:
        """The fetch is over: store its value (unless poisoned), free each
        waiter's token and answer it with ``(value, False)``, built once.

        The tokens go to the requests waiting for them first (``leave_now``):
        their misses join the batch that leaves this reactor turn, ahead of
        the answers' replies.  Under ``concurrency: 1`` the answer first: the
        next request starts once this one is answered (SPEC §4)."""
        if self._inflight.get(key) is fetch:
            del self._inflight[key]
        if result.__class__ is Failure:
            answer: Any = result
        else:
            if result is not None and self.caching and not fetch.poisoned:
                self._cache.put(key, result)
            answer = (result, False)
        gate = self._gate
        if gate.concurrency == 1:
            for done in fetch:
                done(answer)
            gate.leave_now(len(fetch))
            return
        gate.leave_now(len(fetch))
        for done in fetch:
            done(answer)

    def _lookup_many(self, keys: list[bytes]) -> list | Deferred:
        if not self._fresh:
            self._freshen()
        values = [self._cache.get(key) for key in keys]
        missing = [key for key, value in zip(keys, values) if value is None]
        self._metrics.cache_hits += len(keys) - len(missing)
        if not missing:
            return values
        self._metrics.cache_misses += len(missing)
        unique = list(dict.fromkeys(missing))
        d = maybeDeferred(self._backing.mget, unique)
        return d.addCallback(self._merge, keys, values, unique, self._invalidations)

    def _merge(
        self, fetched: list, keys: list[bytes], values: list, unique: list[bytes], seen: int
    ) -> list:
        found = dict(zip(unique, fetched))
        if self.caching and seen == self._invalidations:
            for key, value in found.items():
                if value is not None:
                    self._cache.put(key, value)
        return [found[key] if value is None else value for key, value in zip(keys, values)]


class _Packet:
    """The answers owed to one ``read_packet`` call, filled in as they come."""

    __slots__ = ("results", "left", "hits", "done")

    def __init__(self, keys: list[bytes], done: Callable[[list, int], None]) -> None:
        self.results: list = [None] * len(keys)
        # answers owed, plus one for the lookup that is filling ``results``:
        # a miss settling during it (a backing known to be down fails at
        # once) cannot finish the packet early, nor twice
        self.left = len(keys) + 1
        self.hits = 0
        self.done = done

    def got(self, index: int, answer: Any) -> None:
        """A fetch waiter: ``answer`` is ``(value, False)`` or a Failure."""
        self.results[index] = answer if answer.__class__ is Failure else answer[0]
        self.left -= 1
        if not self.left:
            self.done(self.results, self.hits)


class _Fetch(list):
    """One backing GET in flight: the list of callers waiting on it.

    A list subclass, so making one runs no Python ``__init__`` (one per miss).
    """

    #: set on the record when an invalidation lands while it is in flight
    poisoned = False
