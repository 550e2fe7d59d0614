"""The cache alone, in-process: bytes per entry and microseconds per store.

Fills a ``Cache`` with N entries shaped like bench/keys.py's (16-byte keys
``key:%012d``, 100-byte values) and reports the RSS growth per entry beyond
key and value, the same arithmetic as bench/run's memory row without Redis, a
socket or five minutes of misses; the same once the full cache has evicted
as many entries as it holds (its steady state: bench/run's row only fills);
then the time of a store that evicts (a full cache, every store a new key:
the miss path's share of the cache).
Run it with the allocator setting bench/run uses, e.g.
    MALLOC_MMAP_THRESHOLD_=131072 .venv/bin/python bench/cache_micro.py [N]
"""

import sys
import time

from twisted.internet.task import Clock

from redisp.cache import Cache
from redisp.metrics import Metrics

KEY_LEN, VALUE_LEN = 16, 100


def rss() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS")


def value(i: int) -> bytes:
    return (b"v%011d" % i).ljust(VALUE_LEN, b"x")


def memory(n: int) -> tuple[float, float]:
    """Bytes per entry beyond key and value: after filling a cache of
    capacity n with n keys, then after n more new keys (each evicting one:
    a full cache's steady state, where deleted slots have been reused)."""
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
    return filled, (rss() - before) / n - KEY_LEN - VALUE_LEN


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
    filled, churned = memory(n)
    print(f"cache memory: {filled:.0f} B/entry beyond key and value ({n} entries)")
    print(f"cache memory, full, after {n} more stores: {churned:.0f} B/entry")
    print(f"cache store with eviction: {store_time() * 1e9:.0f} ns (best of 5)")
