"""The local cache: global TTL from insertion, LRU eviction, capacity in keys.

One mapping in least- to most-recently-used order holds ``key -> entry``:
``redisp.core._lru.LruDict``, a C table that keeps OrderedDict's order and
interface in a fraction of its memory per entry, or, where that was not
built (no C compiler at install), an ``OrderedDict`` with the same
behaviour.  Nothing in pure Python keeps an exact LRU order in less: a
plain dict has no O(1) way to find its oldest key once keys are moved
(bench/NOTES-perf.md, issue 12).  A read is a lookup plus ``move_to_end``
(C code, no scan), and expiry is checked on the entry being read.

An entry is one ``bytes`` object: the 8-byte *stamp* of its expiry time
followed by the value, rather than a ``(value, expires_at)`` tuple and its
float: one object instead of three.  The stamp is the big-endian IEEE 754
double, and for times >= 0 (epoch time, or ``task.Clock`` from 0) that byte
order is the numeric order, so an entry is alive exactly when ``entry >=
_stamp(next double after now)``: one C comparison, no unpacking, and the
same exact ``expires_at <= now`` rule as before.

Expired entries go before live ones (SPEC §4): with a global TTL, store order
is expiry order, so the oldest store is the first to expire.  Each store is
also recorded, in store order, as its key (a reference to the key object the
mapping holds anyway) and its expiry time (a double in an ``array``): 16 bytes,
never the value, so a record cannot keep a dropped value alive.  A record
whose key has since been stored again or dropped is *stale*; it is told from
the current one by its expiry time, which differs from the entry's (two
stores of one key at one instant share a record, see ``put``).

When a full cache needs room, the oldest record's expiry time is compared
with now: if it is alive, so is every later store and every entry (each has
a current record), and the LRU entry is evicted, with no lookup.  If it has
expired, records are popped from the head until one is current and expired
(its entry goes instead of a live one) or alive.  Each record is popped once,
so this is amortised O(1).  Stale records behind a live head (keys evicted or
stored again within one ttl) would pile up: the record of an evicted key is
popped at once when it is the head (every eviction, when keys are not read
again before they go), and the rest by a compaction each time the records
have doubled since the last one, skipped while fewer than half can be stale:
one pass in C, amortised O(1) a store, which keeps the records within about
four times the entry count.  ``sweep`` walks the records from the head on a
timer, so expired entries nobody reads again give their memory back.

This assumes the clock does not step backwards: if it does, stores made
after the step may be evicted as if live while an older expired entry is
kept, until the clock has caught up; nothing is ever served past its expiry.

Time comes from the clock passed in (the reactor, or ``task.Clock`` in tests).
"""

from __future__ import annotations

from array import array
from collections import OrderedDict, deque
from collections.abc import Callable
from functools import partial
from itertools import compress, repeat
from math import inf, nextafter
from operator import itemgetter
from struct import Struct

from twisted.internet.interfaces import IReactorTime

from redisp.metrics import Metrics

try:
    from redisp.core._lru import LruDict as _Entries
except ImportError:  # built without a C compiler: the same order, more memory
    _Entries = OrderedDict  # type: ignore[assignment,misc]

_stamp = Struct(">d").pack
_unstamp = Struct(">d").unpack_from

#: bytes of the expiry stamp before the value in an entry
STAMP = 8

#: ``get_all`` copies every value of a batch of at most this many keys
COPIED = 16
#: in a larger batch, values over this many bytes are handed out uncopied
BY_REFERENCE = 256 * 1024

#: records below which the store record is never compacted
_COMPACT_MIN = 1024


def touch_all(entries: OrderedDict[bytes, bytes], keys: list[bytes], floor: bytes
              ) -> list[bytes] | None:
    """The entries of ``keys`` if each is present and ``>= floor`` (alive),
    each then made the most recently used; else None and nothing changed.

    ``LruDict.touch_all`` in Python, for the ``OrderedDict`` fallback, and the
    reference the C one is tested against (tests/test_cache_lru.py).  The C
    one reads the whole batch in phases so that, in a table larger than the
    CPU caches, the memory reads of different keys overlap
    (bench/NOTES-perf.md, "touch_all").
    """
    found = list(map(entries.get, keys))
    if None in found or (found and min(found) < floor):
        return None
    _consume(map(entries.move_to_end, keys))
    return found


def alive_after(now: float) -> bytes:
    """The smallest entry alive at ``now``: entries below it have expired."""
    return _stamp(nextafter(now, inf))


class Cache:
    """LRU cache with a global time-to-live; counts into ``metrics``.

    ``max_item_bytes`` (0: no limit): a larger value is never stored.
    """

    def __init__(
        self,
        capacity: int,
        ttl: float,
        clock: IReactorTime,
        metrics: Metrics,
        max_item_bytes: int = 0,
    ) -> None:
        self.capacity = capacity
        self.ttl = ttl
        self.max_item_bytes = max_item_bytes
        self._clock = clock
        self._metrics = metrics
        # key -> stamp of its expiry time + value (see the module docstring)
        self._entries: OrderedDict[bytes, bytes] = _Entries()  # or an LruDict
        # get_all's lookups: LruDict's own in C, or the same in Python
        self._touch_all: Callable[[list[bytes], bytes], list[bytes] | None] = getattr(
            self._entries, "touch_all", partial(touch_all, self._entries))
        # the store record: keys in store order, and from index _first on,
        # _expiries[_first + i] is the expiry time of the store of _stored[i]
        self._stored: deque[bytes] = deque()
        self._expiries = array("d")
        self._first = 0
        self._compact_at = _COMPACT_MIN

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

    def lifetime(self, key: bytes) -> tuple[float, float] | None:
        """(seconds since ``key`` was stored, seconds it has left) while its
        entry is alive, else None.  Not a use: the LRU order is untouched.
        For the HTTP door's Age and Cache-Control headers."""
        entry = self._entries.get(key)
        if entry is None:
            return None
        left = _unstamp(entry)[0] - self._clock.seconds()
        if left <= 0:
            return None
        age = self.ttl - left
        return (age if age > 0 else 0.0), left

    def get_all(self, keys: list[bytes]) -> list[bytes] | None:
        """The values of ``keys`` if every one is cached and alive, else None
        and nothing changed; when found, each is marked used.

        For a batch of reads at one instant (the RESP door's pipelined GETs,
        MGET): one clock reading, and every step a ``map`` or builtin running
        in C with no Python code per key (a Python loop here showed in the
        profile of pipelined GET hits).  A value is copied out of its entry,
        except in a batch of more than ``COPIED`` keys: there a value over
        ``BY_REFERENCE`` bytes is a ``memoryview`` into the entry, so a huge
        MGET neither copies all its values in one turn nor holds them twice.
        """
        if not keys:
            return None
        found = self._touch_all(keys, alive_after(self._clock.seconds()))
        if found is None:
            return None
        if len(found) > COPIED and max(map(len, found)) > BY_REFERENCE + STAMP:
            return [_view_of(e) if len(e) > BY_REFERENCE + STAMP else e[STAMP:] for e in found]
        return list(map(_value_of, found))

    def put(self, key: bytes, value: bytes) -> None:
        """Store ``value``; its ttl starts now.  When full, an expired entry
        makes room if there is one, else the LRU entry is evicted.

        A value over ``max_item_bytes`` is not stored, and any older value of
        ``key`` is dropped with it: it is older than what was just read.
        """
        if self.capacity == 0:
            return
        entries = self._entries
        if self.max_item_bytes and len(value) > self.max_item_bytes:
            entries.pop(key, None)
            return
        now = self._clock.seconds()
        expires = now + self.ttl
        stamp = _stamp(expires)
        old = entries.get(key)
        stored = self._stored
        if old is not None:
            entries.move_to_end(key)
            if old.startswith(stamp):  # stored again at the same instant:
                entries[key] = stamp + value  # its record stands for this store too
                return
        elif len(entries) >= self.capacity and not (
            self._expiries[self._first] <= now and self._drop_expired(now)
        ):
            # no store has expired, so no entry has: evict the LRU one
            # (a cache with entries has records: stored[0] exists)
            evicted, _ = entries.popitem(False)
            self._metrics.cache_evictions += 1
            if stored[0] == evicted:
                # its record is stale now, and it is cheapest to drop at the
                # head: every time, when no key is read again before it goes
                stored.popleft()
                self._first += 1
        entries[key] = stamp + value
        stored.append(key)
        expiries = self._expiries
        expiries.append(expires)
        if len(expiries) > self._compact_at:
            self._compact()

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
        self._stored.clear()
        self._expiries = array("d")
        self._first = 0
        self._compact_at = _COMPACT_MIN
        return dropped

    def sweep(self, limit: int = 1000) -> int:
        """Drop expired entries from the oldest store on, looking at no more
        than ``limit`` records: bounded, so it can run on a timer without a
        pause proportional to the cache size; returns how many were dropped.
        """
        now = self._clock.seconds()
        dropped = 0
        for _ in range(limit):
            found = self._expired_record(now)
            if found is None:
                break
            if found:
                dropped += 1
        self._metrics.cache_expirations += dropped
        return dropped

    def _drop_expired(self, now: float) -> bool:
        """Drop the entry of the oldest store if it expired by ``now``,
        popping stale records on the way; True when one was dropped."""
        while True:
            found = self._expired_record(now)
            if found is None:
                return False
            if found:
                self._metrics.cache_expirations += 1
                return True

    def _expired_record(self, now: float) -> bool | None:
        """Pop the oldest record if it expired by ``now``: True when it was
        current (its entry is dropped), False when stale, None (nothing
        popped) when it is alive or there is none.

        An alive oldest record, stale or not, means every record is alive,
        and so is every entry (each has a current record): that is one float
        comparison, no lookup.  Each record is popped once (amortised O(1)).
        """
        if not self._stored:
            return None
        expires = self._expiries[self._first]
        if expires > now:
            return None
        key = self._pop_record()
        entry = self._entries.get(key)
        if entry is not None and entry.startswith(_stamp(expires)):
            del self._entries[key]
            return True
        return False

    def _pop_record(self) -> bytes:
        """Pop the head of the store record (its expiry stays in the array's
        dead prefix until ``_compact`` cuts it)."""
        self._first += 1
        return self._stored.popleft()

    def _compact(self) -> None:
        """Cut the expiry array's dead prefix, and drop every stale record if
        at least half the records may be stale (not while a cache fills up):
        in C, each record's key is looked up and its entry's stamp compared
        with the record's.  Called each time the array has doubled since the
        last call, so each step is amortised O(1)."""
        stored = self._stored
        expiries = self._expiries[self._first:]
        self._first = 0
        if (len(stored) - len(self._entries)) * 2 >= len(stored):
            entries = map(self._entries.get, stored, repeat(b""))
            current = list(map(bytes.startswith, entries, map(_stamp, expiries)))
            self._stored = deque(compress(stored, current))
            expiries = array("d", compress(expiries, current))
        self._expiries = expiries
        self._compact_at = max(_COMPACT_MIN, 2 * len(expiries))


#: runs an iterator to its end in C, keeping nothing
_consume = deque(maxlen=0).extend

#: the value in an entry, copied
_value_of = itemgetter(slice(STAMP, None))


def _view_of(entry: bytes) -> memoryview:
    """The value in an entry, uncopied (it keeps the entry alive)."""
    return memoryview(entry)[STAMP:]
