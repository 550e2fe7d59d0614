"""Python time per miss of redisp's cluster read path (redisp/cluster_backing.py):
one MGET per slot vs pipelined GETs, and the single-server batcher beside it.

In-process: each master is a real ``Backing`` whose live connection is
redisp's ``BinaryRedisProtocol`` on a ``StringTransport`` (no sockets, no
Redis); timeouts are scheduled on the real (not running) reactor, whose
heap of delayed calls costs what it costs in production (``task.Clock``
sorts its list on every call), and the end of the reactor turn is played by
calling the batcher's flush.  The figure is redisp's own CPU per key (slot
hashing, grouping, one ``Backing.call`` with its timeout per command, reply
parsing), which is what bounds the miss rate.
Run: .venv/bin/python bench/slot_batching_micro.py
"""

import time

from twisted.internet import reactor
from twisted.internet.testing import StringTransport

from redisp.backing import Backing, BinaryRedisProtocol
from redisp.cluster_backing import ClusterBacking
from redisp.cluster_map import SLOTS, SlotMap, key_slot
from redisp.config import parse_redis_url
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
    def __init__(self) -> None:
        self.url = parse_redis_url("redis+cluster://127.0.0.1:7000")
        self.map = SlotMap.from_ranges({NODE: [(0, SLOTS - 1)]})

    def on_change(self, listener) -> None:
        pass

    def node_url(self, address):
        return self.url.at(*address)


def live_backing(clock, metrics: Metrics) -> tuple[Backing, BinaryRedisProtocol]:
    backing = Backing(parse_redis_url("redis://127.0.0.1:7000/0"), 5.0, clock, metrics)
    protocol = BinaryRedisProtocol()
    protocol.makeConnection(StringTransport())
    backing._live = backing._protocol = protocol
    return backing, protocol


def per_key_us(run_round) -> float:
    best = float("inf")
    for _ in range(REPEATS):
        started = time.perf_counter()
        for _ in range(ROUNDS):
            run_round()
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
