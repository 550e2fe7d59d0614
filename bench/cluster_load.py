"""redis-py load for bench/cluster: what an application using redis-py sees,
through redisp, on a single server, and with redis-py's own RedisCluster.

Keys and values are bench/keys.py's (``key:%012d``, 100 bytes naming the key),
so every reply is checked byte for byte.

    python bench/cluster_load.py load-cluster PORT N
        SET keys 0..N-1 on the cluster that PORT belongs to (RedisCluster pipelines)
    python bench/cluster_load.py check PORT N [cluster]
        GET 200 keys spread over 0..N-1 (every slot range), each checked; exit 1 with
        the first wrong answer (a MOVED through redisp, a missing key …)
    python bench/cluster_load.py measure PORT KIND KEYS SECONDS PROCS PIPELINE
        KIND: redis (redis.Redis: a server, or redisp) or cluster (redis.cluster.RedisCluster).
        PROCS processes, each one client sending pipelines of PIPELINE GETs of random
        keys in 0..KEYS-1 for SECONDS; prints "ops_per_second errors" on stdout

Loopback only: the host is fixed to 127.0.0.1.  Bounded: every run has a duration,
every client a socket timeout.
"""

from __future__ import annotations

import multiprocessing
import random
import sys
import time

sys.path.insert(0, __file__.rsplit("/", 1)[0])
from keys import key, value  # noqa: E402  (bench/keys.py, beside this file)

HOST = "127.0.0.1"
TIMEOUT = 10.0


def client(port: int, kind: str):
    import redis
    from redis.cluster import RedisCluster

    if kind == "cluster":
        return RedisCluster(host=HOST, port=port, protocol=2, socket_timeout=TIMEOUT)
    return redis.Redis(host=HOST, port=port, protocol=2, socket_timeout=TIMEOUT)


def load_cluster(port: int, n: int) -> None:
    rc = client(port, "cluster")
    batch = 2000
    for start in range(0, n, batch):
        pipe = rc.pipeline(transaction=False)
        for i in range(start, min(n, start + batch)):
            pipe.set(key(i), value(i))
        pipe.execute()
    rc.close()


def check(port: int, n: int, kind: str) -> None:
    c = client(port, kind)
    for i in sorted(set(range(0, n, max(1, n // 200)))):
        try:
            got = c.get(key(i))
        except Exception as e:  # a redirection or error reply: say which, stop
            sys.exit(f"cluster_load.py: GET {key(i)!r} on :{port}: {type(e).__name__}: {e}")
        if got != value(i):
            sys.exit(f"cluster_load.py: GET {key(i)!r} on :{port}: {got!r:.80}")
    c.close()


def _worker(port: int, kind: str, keys: int, seconds: float, pipeline: int, seed: int,
            start, out) -> None:
    c = client(port, kind)
    rng = random.Random(seed)
    c.ping()
    done = errors = 0
    start.wait(TIMEOUT)
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        picks = [rng.randrange(keys) for _ in range(pipeline)]
        pipe = c.pipeline(transaction=False)
        for i in picks:
            pipe.get(key(i))
        try:
            got = pipe.execute(raise_on_error=False)
        except Exception:
            errors += pipeline
            continue
        for i, v in zip(picks, got, strict=True):
            if v != value(i):
                errors += 1
        done += pipeline
    out.put((done, errors))
    c.close()


def measure(port: int, kind: str, keys: int, seconds: float, procs: int, pipeline: int) -> None:
    ctx = multiprocessing.get_context("fork")
    start, out = ctx.Event(), ctx.Queue()
    workers = [ctx.Process(target=_worker, args=(port, kind, keys, seconds, pipeline, seed,
                                                  start, out))
               for seed in range(procs)]
    for w in workers:
        w.start()
    start.set()
    results = [out.get(timeout=seconds + TIMEOUT * 3) for _ in workers]
    for w in workers:
        w.join(TIMEOUT)
    done = sum(r[0] for r in results)
    errors = sum(r[1] for r in results)
    print(f"{done / seconds:.0f} {errors}")


def main(argv: list[str]) -> None:
    if len(argv) == 3 and argv[0] == "load-cluster":
        load_cluster(int(argv[1]), int(argv[2]))
    elif len(argv) in (3, 4) and argv[0] == "check":
        check(int(argv[1]), int(argv[2]), argv[3] if len(argv) == 4 else "redis")
    elif len(argv) == 7 and argv[0] == "measure":
        measure(int(argv[1]), argv[2], int(argv[3]), float(argv[4]), int(argv[5]),
                int(argv[6]))
    else:
        sys.exit(__doc__)


if __name__ == "__main__":
    main(sys.argv[1:])
