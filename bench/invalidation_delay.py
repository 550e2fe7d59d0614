"""Invalidation delay: from a SET acknowledged by Redis to the first fresh read
through redisp (``invalidation: tracking``).

For each of WRITES writes: read the key through redisp (so it is cached),
SET a new value directly on Redis, then read through redisp in a tight,
bounded loop until the new value comes back.  Prints median, p99 and max in
microseconds, and how many reads were stale.

    python bench/invalidation_delay.py REDIS_PORT REDISP_RESP_PORT [WRITES]
"""

from __future__ import annotations

import statistics
import sys
import time

import redis

MAX_READS_PER_WRITE = 100_000  # bounded: a write never seen fresh fails the run


def main(redis_port: int, proxy_port: int, writes: int) -> int:
    direct = redis.Redis(host="127.0.0.1", port=redis_port, protocol=2)
    proxy = redis.Redis(host="127.0.0.1", port=proxy_port, protocol=2)
    direct.set("inv:key", "0")
    proxy.get("inv:key")
    delays, stale_reads = [], 0
    for i in range(1, writes + 1):
        want = str(i).encode()
        assert proxy.get("inv:key") is not None  # cached (or being cached) now
        direct.set("inv:key", want)
        acked = time.perf_counter()
        for _ in range(MAX_READS_PER_WRITE):
            if proxy.get("inv:key") == want:
                delays.append(time.perf_counter() - acked)
                break
            stale_reads += 1
        else:
            print(f"write {i} never read fresh through redisp", file=sys.stderr)
            return 1
    us = sorted(d * 1e6 for d in delays)
    p99 = us[min(len(us) - 1, int(len(us) * 0.99))]
    print(f"writes={writes} median_us={statistics.median(us):.0f} p99_us={p99:.0f} "
          f"max_us={us[-1]:.0f} stale_reads={stale_reads}")
    return 0


if __name__ == "__main__":
    args = sys.argv[1:]
    sys.exit(main(int(args[0]), int(args[1]), int(args[2]) if len(args) > 2 else 1000))
