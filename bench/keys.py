"""Deterministic key sets for the memory and scale benchmarks.

Key i is ``key:%012d`` (the form redis-benchmark's ``key:__rand_int__`` expands to,
so ``-r N`` draws from exactly these keys) and its value is 100 bytes that name i.

    python bench/keys.py load N          RESP MSET batches of keys 0..N-1 on stdout,
                                         for ``redis-cli --pipe``
    python bench/keys.py value I         the value of key I on stdout (no newline)
    python bench/keys.py unlink PREFIX N RESP UNLINK batches of PREFIX%012d, 0..N-1, on
                                         stdout, for ``redis-cli --pipe`` (whatever
                                         ``-r N`` may have written under PREFIX)
    python bench/keys.py get PORT N      GET keys 0..N-1 through 127.0.0.1:PORT, pipelined
                                         in batches, checking every reply byte for byte

Loopback only: the host is fixed to 127.0.0.1.
"""

from __future__ import annotations

import socket
import sys
import time

HOST = "127.0.0.1"
VALUE_LEN = 100
BATCH = 1000


def key(i: int) -> bytes:
    return b"key:%012d" % i


def value(i: int) -> bytes:
    return (b"v%011d" % i).ljust(VALUE_LEN, b"x")


def bulk(b: bytes) -> bytes:
    return b"$%d\r\n%s\r\n" % (len(b), b)


def load(n: int) -> None:
    out = sys.stdout.buffer
    for start in range(0, n, BATCH):
        stop = min(n, start + BATCH)
        parts = [b"*%d\r\n$4\r\nMSET\r\n" % (1 + 2 * (stop - start))]
        for i in range(start, stop):
            parts.append(bulk(key(i)))
            parts.append(bulk(value(i)))
        out.write(b"".join(parts))
    out.flush()


def unlink(prefix: bytes, n: int) -> None:
    out = sys.stdout.buffer
    for start in range(0, n, BATCH):
        stop = min(n, start + BATCH)
        parts = [b"*%d\r\n$6\r\nUNLINK\r\n" % (1 + stop - start)]
        parts.extend(bulk(b"%s%012d" % (prefix, i)) for i in range(start, stop))
        out.write(b"".join(parts))
    out.flush()


def get(port: int, n: int, timeout: float = 60.0) -> None:
    """GET every key once, BATCH requests in flight; stop at the first wrong byte."""
    sock = socket.create_connection((HOST, port), timeout=timeout)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    t0 = time.monotonic()
    for start in range(0, n, BATCH):
        stop = min(n, start + BATCH)
        request = b"".join(b"*2\r\n$3\r\nGET\r\n" + bulk(key(i)) for i in range(start, stop))
        expected = b"".join(bulk(value(i)) for i in range(start, stop))
        sock.sendall(request)
        got = bytearray()
        while len(got) < len(expected):
            try:
                chunk = sock.recv(1 << 20)
            except TimeoutError:
                sys.exit(f"keys.py: no reply within {timeout}s in batch {start}..{stop - 1} "
                         f"after {len(got)}/{len(expected)} bytes: {bytes(got[-200:])!r}")
            if not chunk:
                sys.exit(f"keys.py: connection closed in batch {start}..{stop - 1} "
                         f"after {len(got)}/{len(expected)} bytes: {bytes(got[-200:])!r}")
            if chunk != expected[len(got):len(got) + len(chunk)]:
                at = len(got)
                sys.exit(f"keys.py: wrong reply in batch {start}..{stop - 1} at byte {at}: "
                         f"got {chunk[:120]!r}, expected {expected[at:at + 120]!r}")
            got += chunk
    sock.close()
    dt = time.monotonic() - t0
    print(f"{n} GETs verified in {dt:.2f}s ({n / dt:.0f}/s)", file=sys.stderr)


def main(argv: list[str]) -> None:
    if len(argv) == 2 and argv[0] == "load":
        load(int(argv[1]))
    elif len(argv) == 2 and argv[0] == "value":
        sys.stdout.buffer.write(value(int(argv[1])))
    elif len(argv) == 3 and argv[0] == "unlink":
        unlink(argv[1].encode(), int(argv[2]))
    elif len(argv) == 3 and argv[0] == "get":
        get(int(argv[1]), int(argv[2]))
    else:
        sys.exit(__doc__)


if __name__ == "__main__":
    main(sys.argv[1:])
