"""The cluster map: key slots, SlotMap parsing, and ClusterTopology keeping
the map fresh.

Key slots are checked against Redis's own CLUSTER KEYSLOT; SlotMaps are
built from replies recorded from redis-server 7.0 (tests/data) and from the
session's live cluster; ClusterTopology is driven on a task.Clock with fake
nodes (each connection a StringTransport the test answers), then once
against the real cluster.
"""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import pytest_twisted
from hypothesis import given
from hypothesis import strategies as st
from twisted.internet import reactor
from twisted.internet.defer import fail, succeed
from twisted.internet.error import ConnectionRefusedError
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure

from redisp.backing.cluster_map import (
    REFRESH_SECONDS,
    RETRY_FIRST,
    SLOTS,
    UNSETTLED_SECONDS,
    ClusterMapError,
    ClusterTopology,
    SlotMap,
    key_slot,
)
from redisp.backing.connection import BackingUnavailable
from redisp.config import parse_redis_url
from redisp.metrics import Metrics
from redisp.protocol.frames import ErrorReply, FrameScanner, decode
from tests.raw_redis import encode, replies
from tests.support import free_port

DATA = Path(__file__).parent / "data"

A, B, C = ("10.0.0.1", 7000), ("10.0.0.2", 7001), ("10.0.0.3", 7002)
RA, RB, RC = ("10.0.0.4", 7003), ("10.0.0.5", 7004), ("10.0.0.6", 7005)
THIRDS = {A: [(0, 5460)], B: [(5461, 10922)], C: [(10923, 16383)]}


def recorded(name: str):
    return decode((DATA / name).read_bytes())


# -- key slots ----------------------------------------------------------------------


@pytest.mark.parametrize(("key", "slot"), [
    (b"", 0),
    (b"123456789", 0x31C3),  # the CRC16/XMODEM check value
    (b"foo", 12182),
    (b"bar", 5061),
    (b"{user1000}.following", key_slot(b"user1000")),
    (b"{user1000}.followers", key_slot(b"user1000")),
    (b"foo{}{bar}", key_slot(b"foo{}{bar}")),  # empty tag: the whole key
    (b"foo{{bar}}zap", key_slot(b"{bar")),  # first '{', first '}' after it
    (b"foo{bar}{zap}", key_slot(b"bar")),  # the first tag only
    (b"{", key_slot(b"{")),
    (b"}{", key_slot(b"}{")),
    (b"a}b{c}", key_slot(b"c")),
])
def test_key_slot_follows_keyHashSlot(key, slot):
    """CRC16/XMODEM of the hashtag (first '{', first '}' after it,
    non-empty between) or of the whole key, modulo 16384."""
    assert key_slot(key) == slot


def test_key_slot_is_redis_cluster_keyslot(redis_cluster):
    """Random keys, many with braces in odd places, against CLUSTER KEYSLOT."""
    rng = random.Random(11)
    alphabet = b"ab{}{}x\x00\xff"
    keys = [bytes(rng.choice(alphabet) for _ in range(rng.randrange(0, 12)))
            for _ in range(1500)]
    keys += [b"user:%d" % i for i in range(500)]
    frames = replies(redis_cluster.running_ports[0], [["CLUSTER", "KEYSLOT", k] for k in keys])
    assert [key_slot(k) for k in keys] == [decode(f) for f in frames]


def _crc16_xmodem(data: bytes) -> int:
    """Redis's crc16.c, bit by bit (polynomial 0x1021, initial 0)."""
    crc = 0
    for byte in data:
        crc ^= byte << 8
        for _ in range(8):
            crc = ((crc << 1) ^ 0x1021) if crc & 0x8000 else crc << 1
            crc &= 0xFFFF
    return crc


def _key_hash_slot(key: bytes) -> int:
    """cluster.c keyHashSlot, transcribed loop for loop."""
    keylen = len(key)
    s = 0
    while s < keylen and key[s] != ord("{"):
        s += 1
    if s == keylen:
        return _crc16_xmodem(key) & 0x3FFF
    e = s + 1
    while e < keylen and key[e] != ord("}"):
        e += 1
    if e == keylen or e == s + 1:
        return _crc16_xmodem(key) & 0x3FFF
    return _crc16_xmodem(key[s + 1:e]) & 0x3FFF


@given(st.binary(max_size=40) | st.lists(st.sampled_from([b"{", b"}", b"a", b"\x00", b"xy"]),
                                          max_size=12).map(b"".join))
def test_key_slot_is_keyHashSlot_for_any_bytes(key):
    assert key_slot(key) == _key_hash_slot(key)


# -- SlotMap ------------------------------------------------------------------------


@given(st.lists(st.sampled_from([A, B, C, None]), min_size=1, max_size=12),
       st.lists(st.integers(0, SLOTS - 1), max_size=11, unique=True))
def test_slot_map_ranges_describe_every_slot(owners, cuts):
    """Any assignment of slots: ``ranges()`` gives it back exactly, and a map
    built from those ranges is equal."""
    bounds = sorted({0, *cuts})[:len(owners)]
    owner = [None] * SLOTS
    for i, start in enumerate(bounds):
        end = bounds[i + 1] if i + 1 < len(bounds) else SLOTS
        owner[start:end] = [owners[i]] * (end - start)
    m = SlotMap(owner)
    rebuilt = [None] * SLOTS
    for address, spans in m.ranges().items():
        for first, last in spans:
            rebuilt[first:last + 1] = [address] * (last - first + 1)
    assert rebuilt == owner
    assert SlotMap.from_ranges(m.ranges()) == m
    assert m.masters == tuple(sorted({o for o in owner if o is not None}))
    assert m.covered == sum(o is not None for o in owner)
    assert all(m.master(slot) == owner[slot] for slot in (0, SLOTS - 1, *cuts))


def test_slot_map_lookup_and_ranges():
    m = SlotMap.from_ranges({A: [(0, 99), (200, 299)], B: [(100, 199)]}, {A: [RA]})
    assert m.master(0) == A and m.master(150) == B and m.master(250) == A
    assert m.master(300) is None and m.master(SLOTS - 1) is None
    assert m.masters == (A, B)
    assert m.ranges() == {A: [(0, 99), (200, 299)], B: [(100, 199)]}
    assert m.covered == 300 and not m.settled
    assert m.replicas == {A: (RA,), B: ()}
    assert m.nodes() == [A, B, RA]
    assert m.master_for_key(b"foo") is None and m.master_for_key(b"{x}a") == m.master(
        key_slot(b"x"))


def test_slot_map_masters_order_does_not_depend_on_slots():
    """``masters`` is sorted: the same masters in the same order after slots move."""
    one = SlotMap.from_ranges({C: [(0, 10)], A: [(11, SLOTS - 1)]})
    two = SlotMap.from_ranges({A: [(0, 10)], C: [(11, SLOTS - 1)]})
    assert one.masters == two.masters == (A, C)


def test_slot_map_equality_moved_slots_and_with_slot():
    m = SlotMap.from_ranges(THIRDS)
    assert m == SlotMap.from_ranges(THIRDS) and m.settled
    moved = m.with_slot(5, C)
    assert moved.master(5) == C and m.master(5) == A  # a copy; the old map unchanged
    assert moved != m
    assert moved.moved_slots(m) == [5]
    assert moved.ranges()[A] == [(0, 4), (6, 5460)]
    assert m.moved_slots(None) == []
    # a slot that had no master is not moving away
    partial = SlotMap.from_ranges({A: [(0, 10)]})
    assert SlotMap.from_ranges({A: [(0, 20)]}).moved_slots(partial) == []


@pytest.mark.parametrize("bad", [
    {A: [(0, SLOTS)]}, {A: [(-1, 3)]}, {A: [(5, 4)]}, {A: [(b"0", 4)]}])
def test_slot_map_rejects_bad_ranges(bad):
    with pytest.raises(ClusterMapError):
        SlotMap.from_ranges(bad)


@pytest.mark.parametrize("name", ["cluster-shards-7.0.resp", "cluster-shards-7.0-resp3.resp"])
def test_from_shards_reads_redis_7_replies(name):
    """The RESP2 (flat key/value arrays) and RESP3 (maps) shapes alike."""
    m = SlotMap.from_shards(recorded(name))
    assert len(m.masters) == 3 and m.settled
    spans = sorted(r for ranges in m.ranges().values() for r in ranges)
    assert spans == [(0, 5460), (5461, 10922), (10923, 16383)]
    assert all(len(m.replicas[master]) == 1 for master in m.masters)
    assert all(host == "127.0.0.1" for host, _ in m.nodes())


def test_from_slots_and_from_shards_agree():
    shards = SlotMap.from_shards(recorded("cluster-shards-7.0.resp"))
    slots = SlotMap.from_slots(recorded("cluster-slots-7.0.resp"))
    assert slots.ranges() == shards.ranges()


def test_from_slots_reads_replicas_and_split_ranges():
    reply = [
        [0, 99, [b"10.0.0.1", 7000, b"id-a"], [b"10.0.0.4", 7003, b"id-ra"]],
        [100, 199, [b"10.0.0.2", 7001, b"id-b", [b"hostname", b"b"]]],
        [200, 299, [b"?", 7000, b"id-a"], [b"10.0.0.4", 7003, b"id-ra"]],
        [300, 16383, [b"10.0.0.2", 7001, b"id-b"]],
    ]
    m = SlotMap.from_slots(reply, queried=("10.0.0.1", 7000))  # '?': the node asked
    assert m.master(250) == A and m.master(150) == B and m.settled
    assert m.ranges() == {A: [(0, 99), (200, 299)], B: [(100, 199), (300, 16383)]}
    assert m.replicas == {A: (RA,), B: ()}


def _shard(slots, *nodes):
    return [b"slots", list(slots), b"nodes", [list(n) for n in nodes]]


def _node(host, port, role=b"master", health=b"online", endpoint=None, **extra):
    fields = [b"id", b"x" * 40, b"port", port, b"ip", host,
              b"endpoint", host if endpoint is None else endpoint,
              b"role", role, b"replication-offset", 1, b"health", health]
    for key, value in extra.items():
        fields += [key.replace("_", "-").encode(), value]
    return fields


def test_from_shards_unknown_endpoint_is_the_queried_host():
    reply = [_shard([0, 16383], _node(b"", 7000, endpoint=b"?"))]
    assert SlotMap.from_shards(reply, queried=("db.example", 7000)).masters == (
        ("db.example", 7000),)


def test_from_shards_uses_tls_port_for_rediss():
    reply = [_shard([0, 16383], _node(b"10.0.0.1", 7000, tls_port=17000))]
    assert SlotMap.from_shards(reply, tls=True).masters == (("10.0.0.1", 17000),)
    assert SlotMap.from_shards(reply).masters == (("10.0.0.1", 7000),)


def test_from_shards_failed_master_beside_promoted_one():
    """Mid-failover a shard may list the old master (failing) and the new one."""
    reply = [
        _shard([0, 8191], _node(b"10.0.0.1", 7000, health=b"fail"),
               _node(b"10.0.0.4", 7003)),
        _shard([8192, 16383], _node(b"10.0.0.2", 7001, health=b"fail"),
               _node(b"10.0.0.5", 7004, role=b"replica")),
        _shard([], _node(b"10.0.0.9", 7009)),  # a master with no slots: not a master here
    ]
    m = SlotMap.from_shards(reply)
    assert m.master(0) == RA and m.master(9000) == B
    assert m.failing == {B} and not m.settled
    assert m.masters == (B, RA)


@pytest.mark.parametrize("reply", [
    ErrorReply(b"ERR This instance has cluster support disabled"),
    b"OK", None,
    [[b"slots", [0], b"nodes", []]],  # slots not in pairs
    [[b"slots", [0, 5], b"nodes", [[b"role", b"replica", b"port", 1, b"ip", b"h"]]]],
    [[b"slots", [0, 5], b"nodes", [[b"role", b"master", b"ip", b"h"]]]],  # no port
    [[b"slots"]],
])
def test_from_shards_refuses_what_is_not_a_map(reply):
    with pytest.raises(ClusterMapError):
        SlotMap.from_shards(reply)


@pytest.mark.parametrize("reply", [
    ErrorReply(b"ERR unknown"), [[0, 5]], [[0, 5, [b"h"]]], [[0, 5, [b"?", 1]]], [b"x"]])
def test_from_slots_refuses_what_is_not_a_map(reply):
    with pytest.raises(ClusterMapError):
        SlotMap.from_slots(reply)


def test_slot_map_from_the_live_cluster(redis_cluster):
    """Every node's CLUSTER SHARDS and CLUSTER SLOTS give the same map."""
    redis_cluster.wait_healthy()  # whatever earlier tests did to it
    port = redis_cluster.running_ports[0]
    shards = redis_cluster.slot_map(port)
    slots = SlotMap.from_slots(redis_cluster.command(port, "CLUSTER", "SLOTS"),
                               ("127.0.0.1", port))
    assert shards.settled and len(shards.masters) == 3
    assert slots.ranges() == shards.ranges()
    assert sorted(shards.nodes()) == sorted(("127.0.0.1", p) for p in redis_cluster.running_ports)
    for key in (b"a", b"b", b"{tag}x"):
        address = shards.master_for_key(key)
        client = redis_cluster.client(address[1])
        client.set(key, b"v")  # the master for the key takes it: no MOVED
        assert client.get(key) == b"v"
        client.close()


# -- ClusterTopology on fakes -----------------------------------------------------------


def resp(value) -> bytes:
    """RESP2 bytes of a reply, for the fake nodes."""
    if isinstance(value, ErrorReply):
        return b"-" + value.message + b"\r\n"
    if isinstance(value, int):
        return b":%d\r\n" % value
    if isinstance(value, (bytes, str)):
        data = value.encode() if isinstance(value, str) else value
        return b"$%d\r\n%b\r\n" % (len(data), data)
    return b"*%d\r\n" % len(value) + b"".join(resp(v) for v in value)


def shards_reply(ranges, replicas=None, failing=()) -> list:
    replicas = replicas or {}
    out = []
    for (host, port), spans in ranges.items():
        nodes = [_node(host.encode(), port,
                       health=b"fail" if (host, port) in failing else b"online")]
        nodes += [_node(h.encode(), p, role=b"replica") for h, p in replicas.get((host, port), ())]
        out.append(_shard([s for span in spans for s in span], *nodes))
    return out


class FakeNode:
    """What one address does: answer CLUSTER SHARDS with ``shards`` (a reply
    value), refuse the connection, or keep silent."""

    def __init__(self, shards=None, slots=None, refuse=False, silent=False, auth=None):
        self.shards, self.slots, self.refuse, self.silent = shards, slots, refuse, silent
        self.auth = auth
        self.seen: list[list[bytes]] = []


class FakeCluster:
    """``connect`` for ClusterTopology: each connection on a StringTransport;
    ``pump()`` answers every request written so far."""

    def __init__(self, nodes: dict):
        self.nodes = nodes
        self.connections: list[tuple[tuple[str, int], object, StringTransport, FrameScanner]] = []
        self.attempts: list[tuple[str, int]] = []

    def connect(self, protocol, url):
        address = (url.host, url.port)
        self.attempts.append(address)
        node = self.nodes.get(address) or FakeNode(refuse=True)
        if node.refuse:
            return fail(Failure(ConnectionRefusedError(string="refused")))
        transport = StringTransport()
        protocol.makeConnection(transport)
        self.connections.append((address, protocol, transport, _RequestReader()))
        return succeed(protocol)

    def pump(self) -> None:
        for _ in range(5):  # a reply may lead to another request (SLOTS after SHARDS)
            for address, protocol, transport, reader in list(self.connections):
                data = transport.value()
                transport.clear()
                node = self.nodes[address]
                for argv in reader.feed(data):
                    node.seen.append(argv)
                    if node.silent or transport.disconnecting:
                        continue
                    protocol.dataReceived(self.answer(node, argv))

    @staticmethod
    def answer(node: FakeNode, argv: list[bytes]) -> bytes:
        name = b" ".join(argv[:2]).upper()
        if argv[0].upper() == b"AUTH":
            return b"+OK\r\n" if argv[1:] == node.auth else b"-WRONGPASS invalid\r\n"
        if name == b"CLUSTER SHARDS":
            if node.shards is None:
                return b"-ERR unknown subcommand 'SHARDS'. Try CLUSTER HELP.\r\n"
            return resp(node.shards)
        if name == b"CLUSTER SLOTS":
            return resp(node.slots)
        return b"-ERR unexpected\r\n"


class _RequestReader:
    """Multibulk requests out of the bytes a connection wrote."""

    def __init__(self):
        self._scanner = FrameScanner()

    def feed(self, data: bytes) -> list[list[bytes]]:
        return [decode(f) for f in self._scanner.feed(data)] if data else []


URL = parse_redis_url("redis+cluster://10.0.0.1:7000,10.0.0.2:7001")


def topology(nodes: dict, url=URL, timeout=2.0):
    clock = Clock()
    fake = FakeCluster(nodes)
    metrics = Metrics(started=0.0)
    topo = ClusterTopology(url, timeout, reactor=None, metrics=metrics, clock=clock,
                           connect=fake.connect)
    return topo, fake, clock, metrics


def settled(d):
    out = []
    d.addBoth(out.append)
    assert out, "the Deferred has not fired"
    return out[0]


def test_refresh_reads_the_map_from_the_first_seed():
    topo, fake, clock, metrics = topology({A: FakeNode(shards_reply(THIRDS))})
    changes = []
    topo.on_change(lambda old, new: changes.append((old, new)))
    d = topo.refresh()
    fake.pump()
    found = settled(d)
    assert found == SlotMap.from_ranges(THIRDS) == topo.map
    assert changes == [(None, found)]
    assert fake.attempts == [A]
    assert metrics.cluster_refreshes == 1
    assert all(t.disconnecting for _, _, t, _ in fake.connections)  # closed after use


def test_refresh_tries_the_next_seed_when_one_is_down():
    topo, fake, clock, metrics = topology({B: FakeNode(shards_reply(THIRDS))})
    d = topo.refresh()
    fake.pump()
    assert settled(d) == SlotMap.from_ranges(THIRDS)
    assert fake.attempts == [A, B]


def test_known_masters_are_asked_before_the_seeds():
    moved_thirds = {("10.0.0.7", 1): [(0, SLOTS - 1)]}
    topo, fake, clock, _ = topology({("10.0.0.7", 1): FakeNode(shards_reply(moved_thirds)),
                                     A: FakeNode(shards_reply(moved_thirds))})
    topo.refresh()
    fake.pump()
    fake.attempts.clear()
    topo.refresh()
    fake.pump()
    assert fake.attempts == [("10.0.0.7", 1)]


def test_cluster_slots_when_shards_is_unknown():
    """Redis < 7.0 has no CLUSTER SHARDS: CLUSTER SLOTS on the same connection."""
    slots = [[0, 16383, [b"10.0.0.1", 7000, b"id"], [b"10.0.0.4", 7003, b"id2"]]]
    topo, fake, clock, _ = topology({A: FakeNode(shards=None, slots=slots)})
    d = topo.refresh()
    fake.pump()
    assert settled(d).replicas == {A: (RA,)}
    assert fake.nodes[A].seen == [[b"CLUSTER", b"SHARDS"], [b"CLUSTER", b"SLOTS"]]
    assert len(fake.connections) == 1


def test_auth_from_the_url_comes_first():
    url = parse_redis_url("redis+cluster://u:s3cret@10.0.0.1:7000")
    topo, fake, clock, _ = topology(
        {A: FakeNode(shards_reply(THIRDS), auth=[b"u", b"s3cret"])}, url=url)
    d = topo.refresh()
    fake.pump()
    assert settled(d) == SlotMap.from_ranges(THIRDS)
    assert fake.nodes[A].seen[0] == [b"AUTH", b"u", b"s3cret"]


def test_no_node_answers_unavailable_and_no_secret_in_the_reason():
    url = parse_redis_url("redis+cluster://u:s3cret@10.0.0.1:7000,10.0.0.2:7001")
    topo, fake, clock, metrics = topology(
        {A: FakeNode(shards_reply(THIRDS), auth=[b"u", b"other"])}, url=url)
    d = topo.refresh()
    fake.pump()
    failure = settled(d)
    assert isinstance(failure, Failure) and failure.check(BackingUnavailable)
    text = str(failure.value)
    assert text.startswith("backing redis unavailable (") and "s3cret" not in text
    assert "10.0.0.2:7001" in text
    assert topo.map is None and metrics.cluster_refresh_failures == 1
    assert "s3cret" not in repr(topo.describe())


def test_a_silent_node_times_out_then_the_next_is_asked():
    topo, fake, clock, _ = topology({A: FakeNode(silent=True), B: FakeNode(shards_reply(THIRDS))},
                                    timeout=2.0)
    d = topo.refresh()
    fake.pump()
    assert not d.called
    clock.advance(2.0)
    fake.pump()
    assert settled(d) == SlotMap.from_ranges(THIRDS)
    assert fake.attempts == [A, B]


def test_a_node_that_serves_no_slots_is_skipped():
    """A node not yet joined answers an empty map: ask another."""
    topo, fake, clock, _ = topology({A: FakeNode([]), B: FakeNode(shards_reply(THIRDS))})
    d = topo.refresh()
    fake.pump()
    assert settled(d) == SlotMap.from_ranges(THIRDS)


def test_a_node_without_cluster_support_is_skipped():
    topo, fake, clock, _ = topology({
        A: FakeNode(ErrorReply(b"ERR This instance has cluster support disabled")),
        B: FakeNode(shards_reply(THIRDS))})
    d = topo.refresh()
    fake.pump()
    assert settled(d) == SlotMap.from_ranges(THIRDS)


def test_concurrent_refreshes_share_one_read():
    topo, fake, clock, metrics = topology({A: FakeNode(shards_reply(THIRDS))})
    calls = [topo.refresh() for _ in range(5)]
    assert [d is calls[0] for d in calls].count(True) == 1  # each caller its own Deferred
    fake.pump()
    assert len({id(settled(d)) for d in calls}) == 1
    assert fake.attempts == [A] and metrics.cluster_refreshes == 1


def test_start_reads_then_refreshes_periodically():
    topo, fake, clock, metrics = topology({A: FakeNode(shards_reply(THIRDS))})
    topo.start()
    clock.advance(0)
    fake.pump()
    assert topo.map == SlotMap.from_ranges(THIRDS)
    clock.advance(REFRESH_SECONDS - 0.01)
    fake.pump()
    assert metrics.cluster_refreshes == 1
    clock.advance(0.01)
    fake.pump()
    assert metrics.cluster_refreshes == 2
    settled(topo.stop())
    clock.advance(REFRESH_SECONDS * 3)
    assert metrics.cluster_refreshes == 2 and not clock.getDelayedCalls()


def test_an_unsettled_cluster_is_read_again_soon():
    """A master failing (a failover under way): read every UNSETTLED_SECONDS
    until it settles, so the promoted replica is found quickly."""
    node = FakeNode(shards_reply(THIRDS, failing=[B]))
    topo, fake, clock, metrics = topology({A: node})
    topo.start()
    clock.advance(0)
    fake.pump()
    assert topo.map.failing == {B}
    node.shards = shards_reply({A: [(0, 5460)], RB: [(5461, 10922)], C: [(10923, 16383)]})
    clock.advance(UNSETTLED_SECONDS)
    fake.pump()
    assert topo.map.master(6000) == RB and topo.map.settled
    clock.advance(UNSETTLED_SECONDS)
    fake.pump()
    assert metrics.cluster_refreshes == 2  # settled: back to the slow pace
    settled(topo.stop())


def test_without_a_map_retries_with_backoff_and_recovers():
    node = FakeNode(refuse=True)
    topo, fake, clock, metrics = topology({A: node, B: FakeNode(refuse=True)})
    topo.start()
    clock.advance(0)
    assert topo.map is None and metrics.cluster_refresh_failures == 1
    clock.advance(RETRY_FIRST)
    assert metrics.cluster_refresh_failures == 2
    clock.advance(RETRY_FIRST)  # doubled: not yet
    assert metrics.cluster_refresh_failures == 2
    clock.advance(RETRY_FIRST)
    assert metrics.cluster_refresh_failures == 3
    node.refuse, node.shards = False, shards_reply(THIRDS)
    clock.advance(1.0)
    fake.pump()
    assert topo.map == SlotMap.from_ranges(THIRDS)
    settled(topo.stop())


def test_when_known_waits_for_the_first_map_and_fails_when_none_comes():
    node = FakeNode(refuse=True)
    topo, fake, clock, _ = topology({A: node})
    assert settled(topo.when_known()).check(BackingUnavailable)
    node.refuse, node.shards = False, shards_reply(THIRDS)
    d = topo.when_known()
    assert not d.called
    fake.pump()
    assert settled(d) == topo.map
    assert settled(topo.when_known()) is topo.map


def test_when_known_fails_as_unavailable_when_no_node_answers():
    topo, fake, clock, _ = topology({})
    failure = settled(topo.when_known())
    assert failure.check(BackingUnavailable)


def test_moved_moves_the_slot_at_once_then_reads_from_the_named_node_first():
    topo, fake, clock, metrics = topology({A: FakeNode(shards_reply(THIRDS)),
                                           C: FakeNode(shards_reply(THIRDS))})
    topo.refresh()
    fake.pump()
    old = topo.map
    changes = []
    topo.on_change(lambda before, after: changes.append((before, after)))
    fake.attempts.clear()
    topo.moved(5, C)
    assert topo.map.master(5) == C and topo.map.master(6) == A
    assert changes == [(old, topo.map)] and topo.map.moved_slots(old) == [5]
    assert fake.attempts == [C]  # the refresh asks the MOVED's node first
    assert metrics.cluster_moved == 1
    topo.asked()
    assert metrics.cluster_asked == 1


def test_moved_already_known_changes_nothing():
    """MOVED replies to requests sent before the map changed: counted, no
    new read, nobody told."""
    topo, fake, clock, metrics = topology({A: FakeNode(shards_reply(THIRDS))})
    topo.refresh()
    fake.pump()
    changes = []
    topo.on_change(lambda old, new: changes.append(new))
    fake.attempts.clear()
    topo.moved(6000, B)
    assert fake.attempts == [] and changes == [] and metrics.cluster_moved == 1


def test_moved_during_a_read_reads_again():
    """A read in flight may have asked a node that has not heard of the
    move: its answer would move the slot back, so it is read again."""
    stale = shards_reply(THIRDS)
    fresh_ranges = {A: [(1, 5460)], B: [(5461, 10922)], C: [(0, 0), (10923, 16383)]}
    nodes = {A: FakeNode(stale), C: FakeNode(shards_reply(fresh_ranges))}
    topo, fake, clock, _ = topology(nodes)
    topo.refresh()
    fake.pump()
    d = topo.refresh()  # in flight, asking A (a known master) first
    topo.moved(0, C)
    fake.pump()
    assert settled(d).master(0) == C
    assert topo.map.master(0) == C


def test_moved_before_any_map_asks_for_one():
    topo, fake, clock, metrics = topology({C: FakeNode(shards_reply(THIRDS))})
    topo.moved(5, C)
    fake.pump()
    assert topo.map == SlotMap.from_ranges(THIRDS)
    assert fake.attempts[0] == C


def test_a_listener_that_raises_does_not_stop_the_others():
    topo, fake, clock, _ = topology({A: FakeNode(shards_reply(THIRDS))})
    seen = []

    def broken(old, new):
        raise RuntimeError("boom")

    topo.on_change(broken)
    topo.on_change(lambda old, new: seen.append(new))
    topo.refresh()
    fake.pump()
    assert seen == [topo.map]


def test_same_map_again_tells_nobody():
    topo, fake, clock, _ = topology({A: FakeNode(shards_reply(THIRDS))})
    changes = []
    topo.on_change(lambda old, new: changes.append(new))
    for _ in range(3):
        topo.refresh()
        fake.pump()
    assert len(changes) == 1


def test_node_url_keeps_credentials_and_tls():
    url = parse_redis_url("redis+cluster://u:pw@h1:1,h2:2")
    topo = ClusterTopology(url, 1.0, None, Metrics(0.0), clock=Clock())
    node = topo.node_url(("10.1.1.1", 7000))
    assert (node.host, node.port, node.username, node.password, node.kind) == (
        "10.1.1.1", 7000, "u", "pw", "server")


def test_stop_closes_reads_in_flight_and_asks_no_other_node():
    topo, fake, clock, _ = topology({A: FakeNode(silent=True), B: FakeNode(shards_reply(THIRDS))})
    topo.start()
    clock.advance(0)
    waiting = topo.refresh()
    stopped = topo.stop()
    for _, protocol, _transport, _ in fake.connections:
        protocol.connectionLost(Failure(ConnectionRefusedError()))
    assert settled(stopped) is not None
    assert settled(waiting).check(BackingUnavailable)
    assert fake.attempts == [A]  # B never asked
    assert topo.map is None
    assert not any(c.active() for c in clock.getDelayedCalls())


# -- ClusterTopology against the real cluster --------------------------------------


@pytest_twisted.inlineCallbacks
def test_topology_reads_the_live_cluster(redis_cluster):
    """A dead seed first, then a real one: the map every node agrees on."""
    redis_cluster.wait_healthy()
    dead = free_port()
    url = parse_redis_url(f"redis+cluster://127.0.0.1:{dead},127.0.0.1:{redis_cluster.running_ports[0]}")
    metrics = Metrics(started=reactor.seconds())
    topo = ClusterTopology(url, 2.0, reactor, metrics)
    try:
        found = yield topo.refresh()
        assert found == redis_cluster.slot_map()
        again = yield topo.refresh()  # the known masters this time
        assert again == found and metrics.cluster_refreshes == 2
    finally:
        yield topo.stop()


@pytest_twisted.inlineCallbacks
def test_topology_without_any_node_is_unavailable():
    url = parse_redis_url(f"redis+cluster://127.0.0.1:{free_port()}")
    topo = ClusterTopology(url, 2.0, reactor, Metrics(started=reactor.seconds()))
    with pytest.raises(BackingUnavailable):
        yield topo.refresh()
    yield topo.stop()


def test_request_encoding_is_what_redis_reads():
    """The two requests ClusterTopology sends are plain multibulks."""
    from redisp.backing import cluster_map
    assert cluster_map._CLUSTER_SHARDS == encode("CLUSTER", "SHARDS")
    assert cluster_map._CLUSTER_SLOTS == encode("CLUSTER", "SLOTS")


# -- the fixture's own moves -------------------------------------------------------


def test_cluster_fixture_migrates_fails_over_and_recovers(redis_cluster):
    """What other tests rely on: a slot moved with its keys and back, a
    replica promoted, a master killed and its node back as a replica; the
    cluster healthy after each."""
    cluster = redis_cluster
    cluster.wait_healthy()
    key = b"{fixture}k"
    slot = key_slot(key)
    home = cluster.node_for(key)
    cluster.client(home[1]).set(key, b"v")
    other = next(m for m in cluster.masters() if m != home)
    cluster.migrate_slot(slot, other[1])
    assert cluster.node_for(key) == other
    assert cluster.client(other[1]).get(key) == b"v"
    cluster.migrate_slot(slot, home[1])
    assert cluster.node_for(key) == home

    replica = cluster.slot_map().replicas[home][0]
    cluster.failover(replica[1])
    assert cluster.node_for(key) == replica
    assert cluster.client(replica[1]).get(key) == b"v"

    cluster.kill(replica[1])
    cluster.wait_failover(replica[1])
    assert cluster.node_for(key) == home  # the old master, promoted back
    cluster.restart(replica[1])
    cluster.wait_healthy()
    assert replica in cluster.replicas()
    assert len(cluster.masters()) == 3


# -- INFO and /metrics ----------------------------------------------------------------


def _info_fields(metrics: Metrics) -> dict[str, str]:
    from redisp.commands.info import render_info
    from tests.test_commands import make_session

    text = render_info(make_session(metrics=metrics), {"proxy"})
    return dict(line.split(":", 1) for line in text.split("\r\n")[1:] if line)


def test_info_proxy_shows_the_cluster_nodes_ranges_and_redirections():
    topo, fake, clock, metrics = topology({A: FakeNode(shards_reply(
        {A: [(0, 99), (200, 5460)], B: [(100, 199), (5461, 10922)], C: [(10923, 16383)]},
        replicas={A: [RA], B: [RB, RC]}, failing=[C]))})
    topo.refresh()
    fake.pump()
    topo.moved(0, B)
    topo.asked()
    fields = _info_fields(metrics)
    assert fields["topology"] == "cluster 10.0.0.1:7000,10.0.0.2:7001,10.0.0.3:7002"
    assert fields["cluster_masters"] == "3"
    assert fields["cluster_slots_served"] == "16384"
    assert fields["cluster_master0"] == (
        "address=10.0.0.1:7000,slots=5360,ranges=1-99 200-5460,replicas=10.0.0.4:7003,state=ok")
    assert fields["cluster_master1"] == (
        "address=10.0.0.2:7001,slots=5563,ranges=0 100-199 5461-10922,"
        "replicas=10.0.0.5:7004 10.0.0.6:7005,state=ok")
    assert fields["cluster_master2"].endswith("replicas=,state=fail")
    assert fields["cluster_redirections_moved"] == "1"
    assert fields["cluster_redirections_ask"] == "1"
    assert int(fields["cluster_refreshes"]) >= 1
    assert "cluster_last_error" not in fields
    assert fields["backing_status"] in ("up", "down")  # the fields around it stay


def test_info_proxy_without_a_map_says_so_and_why():
    url = parse_redis_url("redis+cluster://u:s3cret@10.0.0.1:7000")
    topo, fake, clock, metrics = topology({}, url=url)
    topo.refresh()
    fields = _info_fields(metrics)
    assert fields["topology"] == "cluster (no slot map yet)"
    assert fields["cluster_masters"] == "0" and fields["cluster_refresh_failures"] == "1"
    assert fields["cluster_last_error"].startswith("10.0.0.1:7000: ")
    assert "s3cret" not in repr(fields)


def test_info_proxy_single_server_is_unchanged():
    assert _info_fields(Metrics(started=0.0))["topology"] == "single 127.0.0.1:6379"


def test_metrics_show_the_cluster():
    from prometheus_client.parser import text_string_to_metric_families

    topo, fake, clock, metrics = topology({A: FakeNode(shards_reply(
        {A: [(0, 5460)], B: [(5461, 10922)], C: [(10923, 16383)]}, replicas={A: [RA]}))})
    topo.refresh()
    fake.pump()
    topo.moved(1, B)
    topo.asked()
    topo.asked()
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
               for family in text_string_to_metric_families(metrics.exposition().decode())
               for s in family.samples}
    assert samples["redisp_cluster_redirections_total", (("kind", "moved"),)] == 1
    assert samples["redisp_cluster_redirections_total", (("kind", "ask"),)] == 2
    assert samples["redisp_cluster_refreshes_total", ()] >= 1
    assert samples["redisp_cluster_refresh_failures_total", ()] == 0
    assert samples["redisp_cluster_slots_served", ()] == SLOTS
    assert samples["redisp_cluster_master_slots", (("master", "10.0.0.2:7001"),)] == 5463
    assert samples["redisp_cluster_slot_range", (
        ("first", "1"), ("last", "1"), ("master", "10.0.0.2:7001"))] == 1
    assert samples["redisp_cluster_node", (
        ("address", "10.0.0.4:7003"), ("master", "10.0.0.1:7000"), ("role", "replica"),
        ("state", "ok"))] == 1
    assert sum(1 for name, _ in samples if name == "redisp_cluster_node") == 4


def test_metrics_of_a_single_server_have_no_cluster_families():
    assert b"redisp_cluster" not in Metrics(started=0.0).exposition()
