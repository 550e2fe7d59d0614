"""The table of bench/workers, from its raw rows, and what the same CPU costs
would give on a 16-core machine.

    python bench/workers_report.py RAW.csv WORKERS CPUS

Per row: the median rate of the rounds, its ratio to the peer measured in the
same run and, for redisp xN, to redisp x1; then the median CPU time a request
cost the target's processes (every worker summed), redis-server and the load
generator, and the cpus the target kept busy (rate x its CPU a request).

The 16-core estimate assumes the clients run elsewhere and that each process
costs per request what it cost here: a single-threaded server (redis-server,
twemproxy, one redisp) gets at most one core; W redisp workers get W cores,
less the one redis-server needs for what they send it; redis-server
(single-threaded) bounds every row that reaches it. It takes the W (up to 16)
past which one more worker adds less than 1 %.
"""

from __future__ import annotations

import csv
import statistics
import sys
from collections import defaultdict
from collections.abc import Callable

REFERENCE = {"hit": "redis-server", "miss": "twemproxy", "set": "twemproxy", "http": "webdis"}
CORES = 16
COLUMNS = ("proxy_us", "redis_us", "load_us", "machine_us")


def main(argv: list[str]) -> None:
    path, workers = argv[0], int(argv[1])
    xn, x1 = f"redisp x{workers}", "redisp x1"
    rows: dict[tuple[str, str], list[dict[str, str]]] = defaultdict(list)
    order: list[tuple[str, str]] = []
    with open(path) as f:
        for row in csv.DictReader(f):
            key = (row["measurement"], row["target"])
            if key not in rows:
                order.append(key)
            rows[key].append(row)

    def med(key: tuple[str, str], column: str) -> float:
        return statistics.median(float(r[column]) for r in rows[key])

    print(f"{'measurement':<13}{'target':<14}{'median/s':>10} {'rounds':<22}{'vs peer':>9}"
          f"{'vs x1':>7}  {'us a request: proxy redis  load machine':<40}{'cpus':>5}")
    measurements = list(dict.fromkeys(m for m, _ in order))
    for m in measurements:
        ref = (m, REFERENCE[m.split("_")[0]])
        for key in [k for k in order if k[0] == m]:
            rate = med(key, "rps")
            rounds = " ".join(f"{float(r['rps']) / 1000:.0f}k" for r in rows[key])
            vs_peer = f"{rate / med(ref, 'rps'):.2f}x" if key != ref and ref in rows else ""
            one = (m, key[1].replace(xn, x1))  # "redisp x2 off" against "redisp x1 off"
            vs_x1 = ""
            if key[1].startswith(xn) and one in rows:
                vs_x1 = f"{rate / med(one, 'rps'):.2f}x"
            us = [med(key, c) for c in COLUMNS]
            cpus = rate * us[0] / 1e6
            print(f"{m:<13}{key[1]:<14}{rate:>10.0f} {rounds:<22}{vs_peer:>9}{vs_x1:>7}  "
                  f"{us[0]:>19.2f} {us[1]:>5.2f} {us[2]:>5.2f} {us[3]:>7.2f}{cpus:>5.2f}")
    print("(us a request: CPU time; proxy = the target's processes, every worker summed; "
          "machine = every cpu's busy time, other work on the machine included; "
          "cpus = rate x proxy)")

    print(f"\nestimate for {CORES} cores (clients elsewhere, CPU a request as measured here):")
    for m in measurements:
        peer = (m, REFERENCE[m.split("_")[0]])
        best, best_w, bound = 0.0, 1, ""
        for w in range(1, CORES + 1):
            proxy_us, redis_us = cost(m, w, workers, med)
            # hits never reach redis-server (what it shows there is its own cron)
            redis_cap = 1e6 / redis_us if m.startswith(("miss", "set")) else float("inf")
            spare = CORES - (1 if redis_cap != float("inf") else 0)
            if w > spare:
                break
            rate = min(w * 1e6 / proxy_us, redis_cap)
            if rate > best * 1.01:  # a worker more must pay for itself
                best, best_w = rate, w
                bound = "redis-server's one core" if rate == redis_cap else f"{w} cores"
        one = 1e6 / med((m, x1), "proxy_us")
        peer_rate = 1e6 / med(peer, "proxy_us")
        cores = "one core"
        if peer[1] == "twemproxy":
            peer_rate = min(peer_rate, 1e6 / max(med(peer, "redis_us"), 1e-9))
            cores += ", itself bounded by redis-server"
        elif peer[1] == "webdis":  # bench/workers runs it with 2 threads
            peer_rate, cores = 2 * peer_rate, "2 threads"
        print(f"  {m:<12} redisp x1 {one / 1000:>6.0f}k/s; x{best_w} workers "
              f"{best / 1000:>6.0f}k/s (bound: {bound}); {peer[1]} {peer_rate / 1000:.0f}k/s "
              f"({cores})")
    print("  (reads: each worker's CPU a request does not depend on how many there are; the "
          "dearer of x1's and xN's is used. set: with tracking every worker takes every "
          "write's invalidation, so redisp's and redis-server's CPU a write are taken as "
          "growing linearly with the workers, through x1's and xN's)")


def cost(m: str, w: int, workers: int, med: Callable[..., float]) -> tuple[float, float]:
    """redisp's (every worker summed) and redis-server's CPU time a request with
    ``w`` workers, from what x1 and x``workers`` cost here."""
    x1, xn = ("redisp x1", f"redisp x{workers}")
    p1, pn = med((m, x1), "proxy_us"), med((m, xn), "proxy_us")
    r1, rn = med((m, x1), "redis_us"), med((m, xn), "redis_us")
    if not m.startswith("set"):
        return max(p1, pn), max(r1, rn)
    p_slope = max(0.0, (pn - p1) / (workers - 1))
    r_slope = max(0.0, (rn - r1) / (workers - 1))
    return p1 + p_slope * (w - 1), r1 + r_slope * (w - 1)

if __name__ == "__main__":
    main(sys.argv[1:])
