"""Python time of one forwarded RESP command through redisp, in-process, without Redis.

The RESP door, the forwarder, the gate, the relay pool and its connections
are the real ones (concurrency 64, as ``bench/run``'s set row), the command
table the recorded 7.0 ``COMMAND`` reply; sockets are StringTransports and
"Redis" answers every pending call with ``+OK`` at once.  So the figure is
redisp's own CPU per forwarded SET (and, for comparison, per cached GET hit),
excluding the kernel: the A/B figure behind the forwarding path's changes
(bench/NOTES-perf.md).
Run: .venv/bin/python bench/forward_micro.py
(``ONLY=set`` skips the GET hits; ``REPEAT=1`` times one repeat instead of
the best of 15: for instruction counts under callgrind, the difference
between two ``ROUNDS`` values.)
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

from twisted.internet.address import IPv4Address
from twisted.internet.defer import succeed
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from redisp.backing.relay import RelayPool  # noqa: E402
from redisp.clients import ClientSlots  # noqa: E402
from redisp.config import Config  # noqa: E402
from redisp.core.cache import Cache  # noqa: E402
from redisp.core.gate import Gate  # noqa: E402
from redisp.core.reader import CachedReader  # noqa: E402
from redisp.doors.resp import RespFactory  # noqa: E402
from redisp.metrics import Metrics  # noqa: E402
from redisp.protocol.frames import decode  # noqa: E402
from redisp.routing.command_table import CommandTable  # noqa: E402
from redisp.routing.forwarding import Forwarder  # noqa: E402

PEER = IPv4Address("TCP", "127.0.0.1", 40000)  # loopback: let in by protected mode
REPLY_FILE = Path(__file__).resolve().parent.parent / "tests/data/command-reply-7.0.resp"

CLIENTS, PIPELINE, ROUNDS = 50, 16, int(os.environ.get("ROUNDS", 20))
REPEAT = int(os.environ.get("REPEAT", 15))
ONLY = os.environ.get("ONLY", "")
VALUE = b"v" * 3


def main() -> None:
    clock = Clock()
    metrics = Metrics(started=0)
    config = Config(capacity=10000, concurrency=64)
    gate = Gate(config.concurrency, clock)

    class NoBacking:
        def fetch(self, key: bytes):
            return succeed(VALUE)

    cache = Cache(10000, 60.0, clock, metrics)
    reader = CachedReader(cache, gate, NoBacking(), metrics)
    relays = []

    def connect(protocol):
        protocol.makeConnection(StringTransport())
        relays.append(protocol)
        return succeed(protocol)

    pool = RelayPool(config.redis, config.redis_timeout, clock, connect=connect, clock=clock)
    forwarder = Forwarder(config, clock, reader, gate, metrics, pool=pool)
    forwarder.table = CommandTable.from_command_reply(decode(REPLY_FILE.read_bytes()))
    slots = ClientSlots(1000, metrics)
    factory = RespFactory(reader, metrics, slots, config, clock, forwarder=forwarder)
    clients = []
    for _ in range(CLIENTS):
        protocol, transport = factory.buildProtocol(PEER), StringTransport(peerAddress=PEER)
        protocol.makeConnection(transport)
        clients.append((protocol, transport))

    def run(packets: list[bytes], expected: bytes, answer: bool) -> float:
        best = float("inf")
        for _ in range(REPEAT):
            started = time.process_time()
            for _ in range(ROUNDS):
                for (protocol, _), packet in zip(clients, packets):
                    protocol.dataReceived(packet)
                    if answer:
                        # "Redis" answers each connection's pipeline in one read
                        for relay in relays:
                            waiting = relay.waiting
                            if waiting:
                                relay.transport.clear()
                                relay.dataReceived(b"+OK\r\n" * waiting)
                    while any(c.getTime() <= clock.seconds() for c in clock.getDelayedCalls()):
                        clock.advance(0)  # (the relays' timeout timers stay armed)
                for _, transport in clients:
                    assert transport.value() == expected, transport.value()[:200]
                    transport.clear()
            best = min(best, (time.process_time() - started) / (ROUNDS * CLIENTS * PIPELINE))
        return best

    sets = [
        b"".join(b"*3\r\n$3\r\nSET\r\n$16\r\nkey:%012d\r\n$3\r\n%b\r\n" % (c * PIPELINE + i, VALUE)
                 for i in range(PIPELINE))
        for c in range(CLIENTS)
    ]
    gets = [
        b"".join(b"*2\r\n$3\r\nGET\r\n$16\r\nkey:%012d\r\n" % (c * PIPELINE + i)
                 for i in range(PIPELINE))
        for c in range(CLIENTS)
    ]
    set_us = run(sets, b"+OK\r\n" * PIPELINE, True) * 1e6
    if ONLY == "set":
        print(f"forwarded SET: {set_us:.2f} us of Python a request")
        return
    # warm the cache, then time hits (forwarding on: the same session state as above)
    for key in range(CLIENTS * PIPELINE):
        cache.put(b"key:%012d" % key, VALUE)
    get_us = run(gets, b"$3\r\nvvv\r\n" * PIPELINE, False) * 1e6
    print(f"forwarded SET, {CLIENTS} clients x {PIPELINE} pipelined, concurrency 64:"
          f" {set_us:.2f} us of Python a request (best of 15)")
    print(f"GET hit, same set-up: {get_us:.2f} us of Python a request (best of 15)")


if __name__ == "__main__":
    main()
