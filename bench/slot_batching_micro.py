"""Python time per miss of redisp's cluster read path (redisp/backing/cluster_fetch.py):
one MGET per slot vs pipelined GETs, and the single-server batcher beside it.

In-process: each master is a real ``Backing`` whose live connection is
redisp's ``BinaryRedisProtocol`` on a ``StringTransport`` (no sockets, no
Redis); timeouts are scheduled on the real (not running) reactor, whose
heap of delayed calls costs what it costs in production (``task.Clock``
sorts its list on every call; ``runUntilCurrent`` after each turn clears the
cancelled ones out, as a running reactor does), and the end of the reactor
turn is played by calling the batcher's flush.  The figure is redisp's own CPU per key (slot
hashing, grouping, ``Backing.call_many`` or a ``Backing.call`` per command,
reply parsing), which is what bounds the miss rate.

The last rows are a whole RESP miss, door to backing and back, as
bench/miss_micro.py's (50 clients x 16 pipelined GETs of distinct random
keys, capacity 0, concurrency 64), but with the real ``Backing`` (txredisapi
and its parsing included) in front of one server, and ``ClusterBacking`` in
front of 3 masters; Redis is played by answering whatever was written, at
the end of each reactor turn (that answering is timed too, the same for
both, a small part).
Run: .venv/bin/python bench/slot_batching_micro.py
"""

import time

from twisted.internet import reactor
from twisted.internet.address import IPv4Address
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport

from redisp.backing.cluster_fetch import ClusterBacking
from redisp.backing.cluster_map import SLOTS, SlotMap, key_slot
from redisp.backing.connection import Backing, BinaryRedisProtocol
from redisp.clients import ClientSlots
from redisp.config import Config, parse_redis_url
from redisp.core.cache import Cache
from redisp.core.gate import Gate
from redisp.core.reader import CachedReader
from redisp.doors.resp import RespFactory
from redisp.metrics import Metrics

ROUNDS = 500
REPEATS = 7  # best of: the machine is shared
BATCH = 16
REPLY = b"$100\r\n" + b"v" * 100 + b"\r\n"
NODE = ("127.0.0.1", 7000)
TAGGED = [b"{user:42}:%d" % i for i in range(BATCH)]  # one slot
SPREAD = []  # BATCH keys in BATCH different slots
for _i in range(10000):
    _key = b"key:%012d" % _i
    if key_slot(_key) not in {key_slot(k) for k in SPREAD}:
        SPREAD.append(_key)
    if len(SPREAD) == BATCH:
        break


class Topology:
    def __init__(self, ranges=None) -> None:
        self.url = parse_redis_url("redis+cluster://127.0.0.1:7000")
        self.map = SlotMap.from_ranges(ranges or {NODE: [(0, SLOTS - 1)]})

    def on_change(self, listener) -> None:
        pass

    def node_url(self, address):
        return self.url.at(*address)


def live_backing(clock, metrics: Metrics, transport=None) -> tuple[Backing, BinaryRedisProtocol]:
    backing = Backing(parse_redis_url("redis://127.0.0.1:7000/0"), 5.0, clock, metrics)
    protocol = BinaryRedisProtocol()
    protocol.makeConnection(transport or StringTransport())
    backing._live = backing._protocol = protocol
    return backing, protocol


def per_key_us(run_round) -> float:
    best = float("inf")
    for _ in range(REPEATS):
        started = time.perf_counter()
        for _ in range(ROUNDS):
            run_round()
            reactor.runUntilCurrent()  # as each turn of a running reactor: cancelled timeouts go
        best = min(best, time.perf_counter() - started)
    return best / (ROUNDS * BATCH) * 1e6


def end_of_turn(batcher) -> None:
    """What the reactor would do at the end of the turn: the batcher's flush."""
    batcher._flush_call.cancel()
    batcher._flush()


def cluster_round(keys, replies: bytes, force_gets: bool = False):
    clock = reactor
    metrics = Metrics(started=0.0)
    node, protocol = live_backing(clock, metrics)
    backing = ClusterBacking(Topology(), 5.0, clock, metrics, clock=clock,
                             make_node=lambda address: node)
    backing.start()
    got = []
    done = got.append

    def one_round() -> None:
        if force_gets:  # what pipelined GETs would cost: one command a key
            for key in keys:
                backing._send(key_slot(key), [key], [done], False, NODE, 0, False)
        else:
            for key in keys:
                backing.fetch(key, done)
            end_of_turn(backing)
        protocol.dataReceived(replies)
        assert len(got) == BATCH
        got.clear()

    return one_round


def single_round():
    backing, protocol = live_backing(reactor, Metrics(started=0.0))
    batcher = backing.fetch.__self__
    got = []
    done = got.append

    def one_round() -> None:
        for key in SPREAD:
            backing.fetch(key, done)
        end_of_turn(batcher)
        protocol.dataReceived(b"*%d\r\n" % BATCH + REPLY * BATCH)
        assert len(got) == BATCH
        got.clear()

    return one_round


class Redis(StringTransport):
    """A backing connection answering every GET and MGET written to it
    with 100-byte values, when ``answer`` is called (end of the turn)."""

    def answer(self, protocol: BinaryRedisProtocol) -> None:
        data = self.value()
        if not data:
            return
        self.clear()
        if b"MGET" not in data:  # GETs only: counted in C, so this costs next to nothing
            protocol.dataReceived(REPLY * data.count(b"\r\n$3\r\nGET\r\n"))
            return
        parts = data.split(b"\r\n")
        replies = []
        i = 0
        while i < len(parts) - 1:
            argc = int(parts[i][1:])
            if parts[i + 2] == b"MGET":
                replies.append(b"*%d\r\n" % (argc - 1) + REPLY * (argc - 1))
            else:
                replies.append(REPLY)
            i += 1 + 2 * argc
        protocol.dataReceived(b"".join(replies))


CLIENTS, PIPELINE, DOOR_ROUNDS = 50, 16, 20
PEER = IPv4Address("TCP", "127.0.0.1", 40000)
THIRDS = {("127.0.0.1", 7000): [(0, 5460)], ("127.0.0.1", 7001): [(5461, 10922)],
          ("127.0.0.1", 7002): [(10923, SLOTS - 1)]}


def door_us(cluster: bool) -> float:
    """us of CPU a RESP miss, door to backing and back."""
    clock = Clock()
    metrics = Metrics(started=0)
    answering: list[tuple[Redis, BinaryRedisProtocol]] = []

    def node(_address=None) -> Backing:
        transport = Redis()
        backing, protocol = live_backing(reactor, metrics, transport)
        answering.append((transport, protocol))
        return backing

    if cluster:
        backing = ClusterBacking(Topology(THIRDS), 5.0, clock, metrics, clock=clock,
                                 make_node=node)
        backing.start()
    else:
        backing = node()
        backing.fetch = type(backing.fetch.__self__)(backing.call, clock).fetch
    config = Config(capacity=0, concurrency=64)
    reader = CachedReader(Cache(0, 60.0, clock, metrics), Gate(config.concurrency, clock),
                          backing, metrics)
    factory = RespFactory(reader, metrics, ClientSlots(1000, metrics), config, clock)
    clients = []
    for _ in range(CLIENTS):
        protocol, transport = factory.buildProtocol(PEER), StringTransport(peerAddress=PEER)
        protocol.makeConnection(transport)
        clients.append((protocol, transport))
    expected = len(REPLY) * PIPELINE
    best = float("inf")
    for repeat in range(REPEATS):
        started = time.process_time()
        for r in range(DOOR_ROUNDS):
            for c, (protocol, _) in enumerate(clients):
                base = ((repeat * DOOR_ROUNDS + r) * CLIENTS + c) * PIPELINE
                protocol.dataReceived(b"".join(
                    b"*2\r\n$3\r\nGET\r\n$16\r\nkey:%012d\r\n" % (base + i)
                    for i in range(PIPELINE)))
            while True:
                while clock.getDelayedCalls():
                    clock.advance(0)
                pending = [t for t, _ in answering if t.value()]
                if not pending:
                    break
                for transport, protocol in answering:
                    transport.answer(protocol)
            for _, transport in clients:
                assert len(transport.value()) == expected, transport.value()[:200]
                transport.clear()
            reactor.runUntilCurrent()
        best = min(best, (time.process_time() - started) / (DOOR_ROUNDS * CLIENTS * PIPELINE))
    return best * 1e6


if __name__ == "__main__":
    mget_reply = b"*%d\r\n" % BATCH + REPLY * BATCH
    print(f"{BATCH} misses in one reactor turn, 100-byte values, us of Python a key:")
    print(f"  one server, GetBatcher (one MGET):            {per_key_us(single_round()):5.1f}")
    print(f"  cluster, {BATCH} keys of one slot, one MGET:       "
          f"{per_key_us(cluster_round(TAGGED, mget_reply)):5.1f}")
    print(f"  cluster, {BATCH} keys of one slot, pipelined GETs: "
          f"{per_key_us(cluster_round(TAGGED, REPLY * BATCH, force_gets=True)):5.1f}")
    print(f"  cluster, {BATCH} keys in {BATCH} slots (GETs):        "
          f"{per_key_us(cluster_round(SPREAD, REPLY * BATCH)):5.1f}")
    print(f"A RESP miss, door to backing and back ({CLIENTS} clients x {PIPELINE} pipelined, "
          "capacity 0, concurrency 64), us of CPU a request:")
    print(f"  one server (GetBatcher, MGETs):                {door_us(False):5.1f}")
    print(f"  3-master cluster (ClusterBacking):             {door_us(True):5.1f}")
