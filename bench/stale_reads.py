"""Stale reads through redisp with ``invalidation: tracking`` under concurrent writes.

A writer process SETs keys directly on Redis, each to a version number one
higher than the last, and publishes the version of each key as soon as Redis
has acknowledged it (shared memory).  Reader processes GET the same keys
through redisp, one request at a time: before sending each GET a reader notes
the acknowledged version of its key; a reply carrying an older version is a
**stale read** (a write Redis had acknowledged before the read began is not
seen).  The writer also reads each key through redisp right after Redis
acknowledged its write: the sharpest case (read-after-write).

    python bench/stale_reads.py REDIS_PORT REDISP_PORT [--reads N] [--readers R]
        [--keys K] [--door resp|http] [--kill-every S] [--max-seconds S]

``--kill-every S``: CLIENT KILL TYPE pubsub on Redis every S seconds (redisp's
tracking connection; caching is off until it is back).  Prints one line of
counts and exits 1 when a read was stale or wrong, 2 when fewer than N reads
were done within ``--max-seconds``.  Loopback only, bounded in reads and time.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import queue
import random
import socket
import sys
import threading
import time

HOST = "127.0.0.1"


def key_name(i: int) -> bytes:
    return b"stale:%03d" % i


def command(*args: bytes) -> bytes:
    return b"*%d\r\n" % len(args) + b"".join(b"$%d\r\n%s\r\n" % (len(a), a) for a in args)


class RespConnection:
    """A blocking RESP connection that reads one reply at a time."""

    def __init__(self, port: int) -> None:
        self.sock = socket.create_connection((HOST, port))
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.file = self.sock.makefile("rb")

    def ask(self, request: bytes) -> bytes | None:
        """Send a request; a bulk reply's bytes, None for nil; raises on an error."""
        self.sock.sendall(request)
        line = self.file.readline()
        if line[:1] == b"$":
            size = int(line[1:])
            return None if size < 0 else self.file.read(size + 2)[:-2]
        if line[:1] in (b"+", b":"):
            return line[1:-2]
        raise RuntimeError(line.decode("utf-8", "replace").strip() or "connection closed")


class HttpConnection:
    """Keep-alive HTTP/1.1 GETs of /get?key=K, reading each answer whole."""

    def __init__(self, port: int) -> None:
        import http.client

        self.conn = http.client.HTTPConnection(HOST, port, timeout=30)

    def get(self, key: bytes) -> bytes | None:
        self.conn.request("GET", "/get?key=" + key.decode())
        response = self.conn.getresponse()
        body = response.read()
        if response.status == 404:
            return None
        if response.status != 200:
            raise RuntimeError(f"HTTP {response.status}: {body[:200]!r}")
        return body


def reader(proxy_port: int, door: str, keys: int, acked, reads: int, seed: int,
           stop, out) -> None:
    rnd = random.Random(seed)
    names = [key_name(i) for i in range(keys)]
    if door == "http":
        get = HttpConnection(proxy_port).get
    else:
        conn = RespConnection(proxy_port)
        ask = conn.ask
        by_name = {name: command(b"GET", name) for name in names}

        def get(name: bytes) -> bytes | None:
            return ask(by_name[name])

    done = stale = errors = fresh_after_write = 0
    examples: list[str] = []
    seen = [0] * keys
    for _ in range(reads):
        if stop.is_set():
            break
        i = rnd.randrange(keys)
        want = acked[i]  # acknowledged before this read began
        try:
            value = get(names[i])
        except Exception as e:  # counted, not fatal: the run goes on
            errors += 1
            if len(examples) < 5:
                examples.append(f"error: {e}")
            continue
        done += 1
        version = int(value) if value is not None else -1
        if version < want:
            stale += 1
            if len(examples) < 5:
                examples.append(f"stale: {names[i].decode()} read {version}, acknowledged {want}")
        elif want > seen[i]:
            fresh_after_write += 1
        seen[i] = max(seen[i], want)
    out.put(("reader", done, stale, errors, fresh_after_write, examples))


def writer(redis_port: int, proxy_port: int, door: str, keys: int, acked, stop, out) -> None:
    direct = RespConnection(redis_port)
    if door == "http":
        get = HttpConnection(proxy_port).get
    else:
        conn = RespConnection(proxy_port)

        def get(name: bytes) -> bytes | None:
            return conn.ask(command(b"GET", name))

    names = [key_name(i) for i in range(keys)]
    writes = reads = stale = errors = 0
    examples: list[str] = []
    version = acked[0]
    while not stop.is_set():
        i = writes % keys
        version += 1
        direct.ask(command(b"SET", names[i], b"%d" % version))
        acked[i] = version  # Redis acknowledged it
        writes += 1
        try:
            value = get(names[i])  # read-after-write, through redisp
        except Exception as e:
            errors += 1
            if len(examples) < 5:
                examples.append(f"error: {e}")
            continue
        reads += 1
        if value is None or int(value) < version:
            stale += 1
            if len(examples) < 5:
                examples.append(f"stale right after the write: {names[i].decode()} "
                                f"read {value!r}, acknowledged {version}")
    out.put(("writer", writes, reads, stale, errors, examples))


def killer(redis_port: int, every: float, stop: threading.Event, kills: list[int]) -> None:
    conn = RespConnection(redis_port)
    while not stop.wait(every):
        conn.ask(command(b"CLIENT", b"KILL", b"TYPE", b"pubsub"))
        kills[0] += 1


def proxy_info(proxy_port: int) -> dict[str, str]:
    info = RespConnection(proxy_port).ask(command(b"INFO", b"proxy")) or b""
    pairs = (line.split(":", 1) for line in info.decode().splitlines() if ":" in line)
    return {k: v for k, v in pairs}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("redis_port", type=int)
    parser.add_argument("proxy_port", type=int, help="redisp's RESP port (or HTTP with --door)")
    parser.add_argument("--reads", type=int, default=1_000_000, help="reads by the readers")
    parser.add_argument("--readers", type=int, default=2)
    parser.add_argument("--keys", type=int, default=16)
    parser.add_argument("--door", choices=("resp", "http"), default="resp")
    parser.add_argument("--kill-every", type=float, default=0.0,
                        help="CLIENT KILL TYPE pubsub every S seconds (0: never)")
    parser.add_argument("--max-seconds", type=float, default=900.0)
    parser.add_argument("--info-port", type=int, help="redisp's RESP port for INFO (http door)")
    args = parser.parse_args()

    direct = RespConnection(args.redis_port)
    for i in range(args.keys):
        direct.ask(command(b"SET", key_name(i), b"0"))
    acked = mp.Array("q", args.keys, lock=False)  # version Redis acknowledged, per key
    stop = mp.Event()
    out: mp.Queue = mp.Queue()
    per_reader = -(-args.reads // args.readers)
    procs = [mp.Process(target=reader, args=(args.proxy_port, args.door, args.keys, acked,
                                             per_reader, seed, stop, out))
             for seed in range(args.readers)]
    procs.append(mp.Process(target=writer, args=(args.redis_port, args.proxy_port, args.door,
                                                 args.keys, acked, stop, out)))
    kill_stop, kills = threading.Event(), [0]
    started = time.monotonic()
    for p in procs:
        p.start()
    kill_thread = None
    if args.kill_every > 0:
        kill_thread = threading.Thread(target=killer, daemon=True,
                                       args=(args.redis_port, args.kill_every, kill_stop, kills))
        kill_thread.start()
    results: list[tuple] = []
    deadline = started + args.max_seconds
    while len(results) < args.readers:  # every reader done, or out of time
        left = deadline - time.monotonic()
        if left <= 0:
            break
        try:
            results.append(out.get(timeout=min(left, 1.0)))
        except queue.Empty:
            continue
    stop.set()
    kill_stop.set()
    while len(results) < len(procs):  # the writer, and readers stopped early
        results.append(out.get(timeout=60))
    for p in procs:
        p.join(timeout=30)
    seconds = time.monotonic() - started

    reads = stale = errors = fresh = 0
    examples: list[str] = []
    writes = writer_reads = writer_stale = 0
    for result in results:
        if result[0] == "reader":
            _, done, s, e, f, ex = result
            reads, stale, errors, fresh = reads + done, stale + s, errors + e, fresh + f
            examples += ex
        else:
            _, writes, writer_reads, writer_stale, e, ex = result
            errors += e
            examples += ex
    info_port = args.proxy_port if args.door == "resp" else args.info_port
    info = proxy_info(info_port) if info_port else {}
    print(f"door={args.door} readers={args.readers} keys={args.keys} "
          f"kill_every={args.kill_every:g}s seconds={seconds:.0f}")
    print(f"reads={reads} stale={stale} errors={errors} "
          f"reads_after_a_new_ack={fresh} writes={writes} "
          f"read_after_write={writer_reads} read_after_write_stale={writer_stale} "
          f"tracking_kills={kills[0]}")
    if info:
        print("redisp: " + " ".join(f"{k}={info.get(k, '?')}" for k in (
            "cache_hits", "cache_misses", "cache_invalidations", "invalidation_messages",
            "invalidation_flushes", "invalidation_state")))
    for line in examples[:10]:
        print("  " + line)
    if stale or writer_stale:
        return 1
    return 2 if reads < args.reads else 0


if __name__ == "__main__":
    sys.exit(main())
