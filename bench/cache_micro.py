"""The cache alone, in-process: bytes per entry and microseconds per store.

Fills a ``Cache`` with N entries shaped like bench/keys.py's (16-byte keys
``key:%012d``, 100-byte values) and reports the RSS growth per entry beyond
key and value, the same arithmetic as bench/run's memory row without Redis, a
socket or five minutes of misses; the same once the full cache has evicted
as many entries as it holds (its steady state: bench/run's row only fills);
the time of a hit on a random key of the full cache; then the time of a
store that evicts (a full cache, every store a new key: the miss path's
share of the cache).
Run it with the allocator setting bench/run uses, e.g.
    MALLOC_MMAP_THRESHOLD_=131072 .venv/bin/python bench/cache_micro.py [N]
"""

import random
import sys
import time
from collections import deque

from twisted.internet.task import Clock

from redisp.core.cache import Cache
from redisp.metrics import Metrics

KEY_LEN, VALUE_LEN = 16, 100
_consume = deque(maxlen=0).extend


def rss() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS")


def value(i: int) -> bytes:
    return (b"v%011d" % i).ljust(VALUE_LEN, b"x")


def memory(n: int) -> tuple[float, float, float]:
    """Bytes per entry beyond key and value: after filling a cache of
    capacity n with n keys, then after n more new keys (each evicting one:
    a full cache's steady state, where deleted slots have been reused);
    and then the time of a hit on a random one of the n keys it holds."""
    clock = Clock()
    clock.advance(1_800_000_000)
    cache = Cache(n, 86400.0, clock, Metrics(started=0))
    before = rss()
    for i in range(n):
        cache.put(b"key:%012d" % i, value(i))
        if i % 1000 == 0:
            clock.advance(0.001)
    filled = (rss() - before) / n - KEY_LEN - VALUE_LEN
    for i in range(n, 2 * n):
        cache.put(b"key:%012d" % i, value(i))
        if i % 1000 == 0:
            clock.advance(0.001)
    churned = (rss() - before) / n - KEY_LEN - VALUE_LEN
    return filled, churned, hit_time(cache, n)


def hit_time(cache: Cache, n: int, reads: int = 200_000) -> float:
    """Seconds a ``get`` of a random cached key (a new key object, as a
    request parses it): at 10^6 keys mostly the CPU cache misses of the
    lookup and of the LRU move (bench/run's scale row)."""
    rng = random.Random(12)
    keys = [b"key:%012d" % (n + rng.randrange(n)) for _ in range(reads)]
    for key in keys:
        hash(key)  # as the parser's key would be, by the door's first lookup
    best = float("inf")
    for _ in range(3):
        started = time.process_time()
        _consume(map(cache.get, keys))
        best = min(best, (time.process_time() - started) / reads)
    return best


def store_time(capacity: int = 10_000, stores: int = 200_000) -> float:
    clock = Clock()
    clock.advance(1_800_000_000)
    cache = Cache(capacity, 60.0, clock, Metrics(started=0))
    keys = [b"key:%012d" % i for i in range(stores)]
    v = value(0)
    best = float("inf")
    for _ in range(5):
        started = time.process_time()
        for k in keys:
            cache.put(k, v)
        best = min(best, (time.process_time() - started) / stores)
        clock.advance(0.01)
    return best


if __name__ == "__main__":
    n = int(sys.argv[1]) if sys.argv[1:] else 1_000_000
    filled, churned, hit = memory(n)
    print(f"cache memory: {filled:.0f} B/entry beyond key and value ({n} entries)")
    print(f"cache memory, full, after {n} more stores: {churned:.0f} B/entry")
    print(f"cache hit on a random one of {n} keys: {hit * 1e9:.0f} ns (best of 3)")
    print(f"cache store with eviction: {store_time() * 1e9:.0f} ns (best of 5)")
