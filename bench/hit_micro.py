"""Python time of one RESP cache hit through redisp, in-process and without Redis.

The RESP door, reader, gate and cache are the real ones; the key is cached
first, sockets are StringTransports and the clock a ``task.Clock``.  Packets
of ``-P 16`` and ``-P 1`` GETs of a 100-byte value, as ``bench/run``'s hit
rows send them, from 50 connections.  The figure is redisp's own CPU per hit,
free of kernel and VM noise: the A/B figure for changes near the hit path
(bench/NOTES-perf.md).
With ``password`` the proxy has one and every connection has sent AUTH
before the timing starts: what authentication costs a hit.
Run: .venv/bin/python bench/hit_micro.py [password]
"""

import sys
import time

from twisted.internet.address import IPv4Address
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport

from redisp.clients import ClientSlots
from redisp.config import Config, Secret
from redisp.core.cache import Cache
from redisp.core.gate import Gate
from redisp.core.reader import CachedReader
from redisp.doors.resp import RespFactory
from redisp.metrics import Metrics

CLIENTS = 50
VALUE = b"v" * 100
PEER = IPv4Address("TCP", "127.0.0.1", 40000)  # loopback: let in by protected mode


class NoBacking:
    def fetch(self, key, done):
        raise AssertionError("a hit must not reach the backing")


def run(pipeline: int, rounds: int, password: str | None = None) -> float:
    clock = Clock()
    metrics = Metrics(started=0)
    config = Config(password=Secret(password) if password else None)
    cache = Cache(10000, 86400.0, clock, metrics)
    cache.put(b"hot", VALUE)
    reader = CachedReader(cache, Gate(config.concurrency, clock), NoBacking(), metrics)
    factory = RespFactory(reader, metrics, ClientSlots(1000, metrics), config, clock)
    clients = []
    for _ in range(CLIENTS):
        protocol, transport = factory.buildProtocol(PEER), StringTransport(peerAddress=PEER)
        protocol.makeConnection(transport)
        if password:
            protocol.dataReceived(b"AUTH %s\r\n" % password.encode())
            assert transport.value() == b"+OK\r\n", transport.value()
            transport.clear()
        clients.append((protocol, transport))
    packet = b"*2\r\n$3\r\nGET\r\n$3\r\nhot\r\n" * pipeline
    expected = len(b"$100\r\n" + VALUE + b"\r\n") * pipeline
    best = float("inf")
    for _ in range(25):
        started = time.process_time()
        for _ in range(rounds):
            for protocol, _ in clients:
                protocol.dataReceived(packet)
            for _, transport in clients:
                transport.clear()
        best = min(best, (time.process_time() - started) / (rounds * CLIENTS * pipeline))
    protocol.dataReceived(packet)
    assert len(transport.value()) == expected
    return best


def main() -> None:
    password = "bench-secret" if sys.argv[1:] == ["password"] else None
    for pipeline, rounds in ((16, 100), (1, 800)):
        best = run(pipeline, rounds, password)
        print(f"RESP hit, {CLIENTS} clients x -P {pipeline}"
              f"{' (password)' if password else ''}: {best * 1e6:.3f} us of Python"
              " a request (best of 25)")


if __name__ == "__main__":
    main()
