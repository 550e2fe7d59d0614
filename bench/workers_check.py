"""Coherence across redisp workers sharing one port: a SET through one worker
must not be served stale by another (``invalidation: tracking``).

    python bench/workers_check.py HOST RESP_PORT HTTP_PORT WORKERS ROUNDS

The kernel, not the client, picks the worker of a connection (SO_REUSEPORT),
so connections are grouped by worker first: each names itself (CLIENT
SETNAME) and CLIENT LIST, which each worker answers about its own clients
alone, tells which names share a process. Then, ROUNDS times for each
ordered pair of workers (A, B): B reads the key (now cached in B, a hit from
the second round on), A writes a new value, B reads again at once and must
get it. The HTTP door is checked alike with keep-alive connections (which
worker each landed on is not known; with 8 of them every worker gets some
almost surely). Prints one line; exits 1 on any stale or wrong read, 2 when
the connections did not reach WORKERS distinct workers.
"""

from __future__ import annotations

import http.client
import sys
import time

import redis

CONNECTIONS = 16
HTTP_CONNECTIONS = 8
#: bound of the whole check, seconds
DEADLINE_S = 60.0


def grouped(host: str, port: int) -> list[list[redis.Redis]]:
    """CONNECTIONS connections to ``port``, grouped by the worker that took each."""
    conns = []
    for i in range(CONNECTIONS):
        c = redis.Redis(host=host, port=port, single_connection_client=True,
                        socket_timeout=10, protocol=2)
        c.client_setname(f"check{i}")
        conns.append(c)
    by_name = {f"check{i}": c for i, c in enumerate(conns)}
    groups, seen = [], set()
    for i, c in enumerate(conns):
        if f"check{i}" in seen:
            continue
        names = {entry["name"] for entry in c.client_list() if entry["name"] in by_name}
        seen |= names
        groups.append([by_name[n] for n in sorted(names)])
    return groups


def http_get(conn: http.client.HTTPConnection, key: str) -> tuple[int, bytes, str]:
    conn.request("GET", f"/get?key={key}")
    r = conn.getresponse()
    return r.status, r.read(), r.getheader("X-Cache", "")


def main(argv: list[str]) -> int:
    host, resp_port, http_port, workers, rounds = (
        argv[0], int(argv[1]), int(argv[2]), int(argv[3]), int(argv[4]))
    end = time.monotonic() + DEADLINE_S
    groups = grouped(host, resp_port)
    if len(groups) != workers:
        print(f"coherence: {CONNECTIONS} connections reached {len(groups)} workers, "
              f"expected {workers}: {[len(g) for g in groups]}")
        return 2
    leaders = [g[0] for g in groups]
    hits0 = sum(int(c.info("proxy")["cache_hits"]) for c in leaders)
    reads = stale = 0
    examples = []
    for r in range(rounds):
        if time.monotonic() > end:
            break
        for a, writer in enumerate(leaders):
            for b, reader in enumerate(leaders):
                if a == b:
                    continue
                key = f"workers:check:{a}:{b}:{r % 8}"
                reader.get(key)  # cached in B (a hit once the key exists and was read)
                value = f"{r}:{a}:{b}".encode()
                writer.set(key, value)
                got = reader.get(key)
                reads += 1
                if got != value:
                    stale += 1
                    if len(examples) < 5:
                        examples.append(f"{key}: set {value!r} through worker {a}, "
                                        f"worker {b} answered {got!r}")
    hits = sum(int(c.info("proxy")["cache_hits"]) for c in leaders) - hits0
    # HTTP: reads through keep-alive connections spread over the workers
    https = [http.client.HTTPConnection(host, http_port, timeout=10)
             for _ in range(HTTP_CONNECTIONS)]
    writer = leaders[0]
    http_reads = http_stale = http_hits = 0
    for r in range(max(1, rounds // 4)):
        if time.monotonic() > end:
            break
        key = f"workers:check:http:{r % 8}"
        for h in https:
            http_get(h, key)
        value = f"http:{r}".encode()
        writer.set(key, value)
        for h in https:
            status, body, cache = http_get(h, key)
            http_reads += 1
            http_hits += cache == "HIT"
            if status != 200 or body != value:
                http_stale += 1
                if len(examples) < 10:
                    examples.append(f"HTTP {key}: set {value!r}, answered {status} {body!r}")
    print(f"coherence: {workers} workers ({'+'.join(str(len(g)) for g in groups)} of "
          f"{CONNECTIONS} connections); RESP {reads} reads after a write through "
          f"another worker: {stale} stale ({hits} cache hits on the readers' workers); "
          f"HTTP {http_reads} reads after a write: {http_stale} stale ({http_hits} hits)")
    for e in examples:
        print(f"  {e}")
    return 1 if stale or http_stale or reads == 0 else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
