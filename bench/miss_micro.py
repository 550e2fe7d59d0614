"""Python time of one RESP miss through redisp, in-process and without Redis.

The RESP door, reader, gate and GET batcher are the real ones (capacity 0,
concurrency 64, as ``bench/run``'s miss row); only ``Backing.call`` is
replaced by a stand-in answering each MGET/GET at once with 100-byte values,
and sockets by StringTransports.  So the figure is redisp's own CPU per miss,
free of the VM noise that makes socket benchmarks swing by +-30%, and
excluding txredisapi and the kernel.  It is the A/B figure behind the miss
path's changes (bench/NOTES-perf.md).
Run: .venv/bin/python bench/miss_micro.py
(``REPEAT=1`` times one repeat instead of the best of 25, for callgrind:
instructions a request are the difference between two ``ROUNDS`` values.)
"""

import os
import time

from twisted.internet.address import IPv4Address
from twisted.internet.defer import succeed
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport

from redisp.backing.batching import GetBatcher
from redisp.clients import ClientSlots
from redisp.config import Config
from redisp.core.cache import Cache
from redisp.core.gate import Gate
from redisp.core.reader import CachedReader
from redisp.doors.resp import RespFactory
from redisp.metrics import Metrics

PEER = IPv4Address("TCP", "127.0.0.1", 40000)  # loopback: let in by protected mode

CLIENTS, PIPELINE, ROUNDS = 50, 16, int(os.environ.get("ROUNDS", 40))
REPEAT = int(os.environ.get("REPEAT", 25))
VALUE = b"v" * 100


class InstantBacking:
    """Backing.fetch through the real GetBatcher; Redis answers at once."""

    def __init__(self, clock: Clock) -> None:
        self.fetch = GetBatcher(self.call, clock).fetch

    def call(self, command: bytes, *keys: bytes):
        return succeed(VALUE if command == b"GET" else [VALUE] * len(keys))


def main() -> None:
    clock = Clock()
    metrics = Metrics(started=0)
    config = Config(capacity=0, concurrency=64)
    reader = CachedReader(Cache(0, 60.0, clock, metrics), Gate(config.concurrency, clock),
                          InstantBacking(clock), metrics)
    factory = RespFactory(reader, metrics, ClientSlots(1000, metrics), config, clock)
    clients = []
    for _ in range(CLIENTS):
        protocol, transport = factory.buildProtocol(PEER), StringTransport(peerAddress=PEER)
        protocol.makeConnection(transport)
        clients.append((protocol, transport))
    packets = [
        b"".join(b"*2\r\n$3\r\nGET\r\n$16\r\nkey:%012d\r\n" % (c * PIPELINE + i)
                 for i in range(PIPELINE))
        for c in range(CLIENTS)
    ]
    expected = len(b"$100\r\n" + VALUE + b"\r\n") * PIPELINE
    best = float("inf")
    for _ in range(REPEAT):
        started = time.process_time()
        for _ in range(ROUNDS):
            for (protocol, _), packet in zip(clients, packets):
                protocol.dataReceived(packet)
            while clock.getDelayedCalls():
                clock.advance(0)
            for _, transport in clients:
                assert len(transport.value()) == expected
                transport.clear()
        best = min(best, (time.process_time() - started) / (ROUNDS * CLIENTS * PIPELINE))
    print(f"RESP miss, {CLIENTS} clients x {PIPELINE} pipelined, capacity 0, concurrency 64:"
          f" {best * 1e6:.2f} us of Python a request (best of {REPEAT})")


if __name__ == "__main__":
    main()
