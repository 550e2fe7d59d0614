"""Python time txredisapi spends per key: one GET each vs one 16-key MGET,
and the same MGET with redisp's BinaryRedisProtocol (backing/connection.py).

In-process, on a StringTransport (no sockets, no Redis): the figure is the
protocol's own CPU cost, which is what bounds redisp's miss rate.  It is the
measurement behind redisp/backing/batching.py.  Run: .venv/bin/python bench/batching_micro.py
"""

import time

import txredisapi
from twisted.internet.testing import StringTransport

from redisp.backing.connection import BinaryRedisProtocol

ROUNDS = 2000
BATCH = 16
REPLY = b"$100\r\n" + b"v" * 100 + b"\r\n"
KEYS = [b"key:%012d" % i for i in range(BATCH)]


def connected_protocol(binary: bool) -> txredisapi.RedisProtocol:
    if binary:
        protocol = BinaryRedisProtocol()
    else:
        protocol = txredisapi.RedisProtocol(charset=None, convertNumbers=False)
    protocol.makeConnection(StringTransport())
    return protocol


def per_key_us(send_batch, binary: bool = False) -> float:
    protocol = connected_protocol(binary)
    started = time.perf_counter()
    for _ in range(ROUNDS):
        send_batch(protocol)
    return (time.perf_counter() - started) / (ROUNDS * BATCH) * 1e6


def one_get_each(protocol) -> None:
    for key in KEYS:
        protocol.execute_command(b"GET", key, apply_timeout=False)
    protocol.dataReceived(REPLY * BATCH)


def one_mget(protocol) -> None:
    protocol.execute_command(b"MGET", *KEYS, apply_timeout=False)
    protocol.dataReceived(b"*%d\r\n" % BATCH + REPLY * BATCH)


if __name__ == "__main__":
    print(f"txredisapi {txredisapi.__version__}, {BATCH} keys of 100-byte values:")
    print(f"  one GET each:    {per_key_us(one_get_each):5.1f} us a key")
    print(f"  one {BATCH}-key MGET: {per_key_us(one_mget):5.1f} us a key")
    print(f"  one {BATCH}-key MGET, redisp's BinaryRedisProtocol:"
          f" {per_key_us(one_mget, binary=True):5.1f} us a key")
