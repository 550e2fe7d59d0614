"""A packet of forwarded commands (``Forwarder.forward_packet``) answers
exactly as the same commands forwarded one by one.

Two proxies side by side -- the real RESP door, forwarder, gate, cache,
relay pool and relay connections on StringTransports -- one with the packet
path, one with it turned off, each in front of its own small fake Redis
(answers computed from what each relay connection was sent).  Hypothesis
drives both with the same client streams cut at the same places; at the
end the bytes every client got, the bytes every backing connection was
sent, the metrics and the cache must be the same.  The gate never holds a
request back in these runs (a packet waits for all its tokens at once where
single commands may start one by one: a difference of timing, not of
answers), so the two see the same events in the same order.
"""

from __future__ import annotations

from dataclasses import replace

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.internet.address import IPv4Address
from twisted.internet.defer import succeed
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport

from redisp.backing.relay import RelayPool, RelayProtocol, encode_command
from redisp.clients import ClientSlots
from redisp.config import Config, Secret
from redisp.core.cache import Cache
from redisp.core.gate import Gate
from redisp.core.reader import CachedReader
from redisp.doors.resp import RespFactory
from redisp.metrics import COUNTERS, Metrics
from redisp.protocol.codec import RequestParser
from redisp.protocol.frames import decode
from redisp.routing.command_table import CommandTable
from redisp.routing.forwarding import Forwarder
from tests.raw_redis import COMMAND_REPLY_FILE

TABLE = CommandTable.from_command_reply(decode(COMMAND_REPLY_FILE.read_bytes()))
PEER = IPv4Address("TCP", "127.0.0.1", 40000)
KEYS = [b"k%d:%d" % (c, i) for c in range(2) for i in range(3)]
_ARITY = {b"set": -3, b"get": 2, b"del": -2, b"incr": 2, b"mget": -2, b"expire": -3,
          b"select": 2, b"multi": 1, b"exec": 1, b"discard": 1}


class FakeRedis:
    """Just enough of Redis for the commands below, per db, with MULTI."""

    def __init__(self) -> None:
        self.dbs: dict[int, dict[bytes, bytes]] = {0: {k: b"1" for k in KEYS}, 1: {}}
        self.connections: dict[int, tuple[RequestParser, list]] = {}  # id -> (parser, [db, queue])

    def run(self, state: list, argv: list[bytes]) -> bytes:
        name = argv[0].lower()
        arity = _ARITY.get(name)
        if arity is None:
            return b"-ERR unknown command '%b'\r\n" % argv[0]
        if (arity > 0 and len(argv) != arity) or len(argv) < -arity:
            return b"-ERR wrong number of arguments for '%b' command\r\n" % name
        if state[1] is not None and name not in (b"exec", b"discard", b"multi"):
            state[1].append(argv)
            return b"+QUEUED\r\n"
        if name == b"multi":
            if state[1] is not None:
                return b"-ERR MULTI calls can not be nested\r\n"
            state[1] = []
            return b"+OK\r\n"
        if name in (b"exec", b"discard"):
            if state[1] is None:
                return b"-ERR %b without MULTI\r\n" % name.upper()
            queued, state[1] = state[1], None
            if name == b"discard":
                return b"+OK\r\n"
            return b"*%d\r\n" % len(queued) + b"".join(self.run(state, a) for a in queued)
        store = self.dbs[state[0]]
        if name == b"select":
            if argv[1] not in (b"0", b"1"):
                return b"-ERR DB index is out of range\r\n"
            state[0] = int(argv[1])
            return b"+OK\r\n"
        if name == b"set":
            store[argv[1]] = argv[2]
            return b"+OK\r\n"
        if name == b"get":
            value = store.get(argv[1])
            return b"$-1\r\n" if value is None else b"$%d\r\n%b\r\n" % (len(value), value)
        if name == b"mget":
            return b"*%d\r\n" % (len(argv) - 1) + b"".join(
                self.run(state, [b"get", k]) for k in argv[1:])
        if name == b"del":
            return b":%d\r\n" % sum(store.pop(k, None) is not None for k in argv[1:])
        if name == b"expire":
            return b":%d\r\n" % (argv[1] in store)
        value = store.get(argv[1], b"0")  # incr
        if not value.isdigit():
            return b"-ERR value is not an integer or out of range\r\n"
        store[argv[1]] = b"%d" % (int(value) + 1)
        return b":%b\r\n" % store[argv[1]]

    def answer(self, relay) -> bool:
        """Answer what ``relay`` was sent since last time; True if anything."""
        parser, state = self.connections.setdefault(id(relay), (RequestParser(), [0, None]))
        sent = relay.transport.value()
        relay.transport.clear()
        if not sent:
            return False
        replies = b"".join(self.run(state, argv) for argv in parser.feed(sent))
        relay.wire.append(sent)
        if replies:
            relay.dataReceived(replies)
        return True


class World:
    """One proxy (``packets``: with the packet path or not) and its fake Redis."""

    def __init__(self, packets: bool, clients: int, **config) -> None:
        self.clock = clock = Clock()
        self.metrics = metrics = Metrics(started=0)
        self.config = config = replace(Config(), **config)
        self.redis = redis = FakeRedis()
        gate = Gate(config.concurrency, clock)

        class Backing:
            def fetch(self, key: bytes, done) -> None:
                done(redis.dbs[0].get(key))

            def mget(self, keys: list[bytes]) -> list:
                return [redis.dbs[0].get(key) for key in keys]

        self.cache = Cache(100, 1000.0, clock, metrics)
        for key in KEYS:
            self.cache.put(key, b"1")
        reader = CachedReader(self.cache, gate, Backing(), metrics)
        self.relays: list = []

        def connect(protocol):
            protocol.wire = []
            protocol.makeConnection(StringTransport())
            self.relays.append(protocol)
            return succeed(protocol)

        pool = RelayPool(config.redis, config.redis_timeout, clock, connect=connect, clock=clock)
        forwarder = Forwarder(config, clock, reader, gate, metrics, pool=pool)
        forwarder.table = TABLE
        factory = RespFactory(reader, metrics, ClientSlots(100, metrics), config, clock,
                              forwarder=forwarder)
        self.clients = []
        for _ in range(clients):
            protocol = factory.buildProtocol(PEER)
            transport = StringTransport(peerAddress=PEER)
            protocol.makeConnection(transport)
            if not packets:
                protocol._forward_packet = lambda requests, data: False
            self.clients.append((protocol, transport))

    def turn(self) -> None:
        while any(c.getTime() <= self.clock.seconds() for c in self.clock.getDelayedCalls()):
            self.clock.advance(0)

    def send(self, client: int, data: bytes) -> None:
        self.clients[client][0].dataReceived(data)
        self.turn()

    def answer(self) -> None:
        """Redis answers everything sent to it, until nothing more comes."""
        while any([self.redis.answer(relay) for relay in list(self.relays)]):
            self.turn()

    def outcome(self) -> tuple:
        m = self.metrics
        counters = {name: getattr(m, name) for name in COUNTERS}
        return (
            [t.value() for _, t in self.clients],
            [b"".join(r.wire) for r in self.relays],
            dict(m.requests), dict(m.forwarded), dict(m.backing_errors), counters,
            {key: self.cache.get(key) for key in KEYS},
            self.redis.dbs,
        )


def _command(client: int, simple: bool):
    """A command; ``simple``: one of those a packet may take."""
    key = st.sampled_from(KEYS[3 * client:3 * client + 3])
    value = st.sampled_from([b"1", b"7", b"x", b"a\r\nb"])
    name = st.sampled_from
    simple_ones = st.one_of(
        st.tuples(name([b"SET", b"set", b"Set"]), key, value),
        st.tuples(name([b"GET", b"get"]), key),
        st.tuples(st.just(b"DEL"), key, key),
        st.tuples(st.just(b"INCR"), key),
        st.tuples(st.just(b"MGET"), key, key),
        st.tuples(st.just(b"EXPIRE"), key, st.just(b"100")),
        st.tuples(st.just(b"SET"), key),  # wrong arity
    )
    if simple:
        return simple_ones.map(list)
    return st.one_of(
        simple_ones,
        st.tuples(st.just(b"FOO"), key),  # unknown to the table: flushes the cache
        st.tuples(st.just(b"KEYS"), st.just(b"*")),  # denied
        st.just((b"PING",)),
        st.tuples(st.just(b"ECHO"), value),
        st.just((b"MULTI",)),
        st.just((b"EXEC",)),
        st.just((b"DISCARD",)),
        st.tuples(st.just(b"SELECT"), st.sampled_from([b"0", b"1"])),
    ).map(list)


@st.composite
def _script(draw, clients: int):
    """Steps: (client, packet bytes) sends and None (Redis answers all)."""
    steps = []
    for _ in range(draw(st.integers(1, 8))):
        if draw(st.booleans()):
            steps.append(None)
            continue
        client = draw(st.integers(0, clients - 1))
        commands = draw(st.lists(_command(client, draw(st.booleans())), min_size=1,
                                 max_size=20))
        data = b"".join(
            b" ".join(argv) + b"\r\n" if b"\r" not in b"".join(argv) and draw(st.booleans())
            and len(commands) < 3 else encode_command(argv)
            for argv in commands)
        cuts = sorted(draw(st.lists(st.integers(1, max(1, len(data) - 1)), max_size=2)))
        for start, end in zip([0, *cuts], [*cuts, len(data)]):
            if start < end:
                steps.append((client, data[start:end]))
    return steps


def _run(script, clients: int, **config) -> None:
    worlds = [World(packets, clients, **config) for packets in (True, False)]
    for step in script:
        for world in worlds:
            if step is None:
                world.answer()
            else:
                world.send(*step)
    for world in worlds:
        world.answer()
    fast, general = (world.outcome() for world in worlds)
    assert fast == general


@settings(max_examples=300, deadline=None)
@given(st.data())
def test_packets_answer_as_commands_one_by_one(data):
    clients = data.draw(st.integers(1, 2))
    mode = data.draw(st.sampled_from(["all", "all", "read"]))
    _run(data.draw(_script(clients)), clients, concurrency=1000, forward=mode,
         deny_commands=("keys",))


@settings(max_examples=100, deadline=None)
@given(st.data())
def test_packets_under_a_small_gate_answer_as_commands_one_by_one(data):
    """Concurrency below a packet's size, or at it: Redis answers between sends."""
    script = [step for step in data.draw(_script(1)) if step is not None]
    script = [s for step in script for s in (step, None)]
    _run(script, 1, concurrency=data.draw(st.sampled_from([1, 2, 4, 16])),
         deny_commands=("keys",))


# -- the packet path's own cases, each against the general path ----------------------

SETS = b"".join(encode_command([b"SET", k, b"9"]) for k in KEYS[:3])


def _both(**config) -> list[World]:
    return [World(packets, 1, concurrency=64, **config) for packets in (True, False)]


def _same(worlds: list[World]) -> tuple:
    fast, general = (world.outcome() for world in worlds)
    assert fast == general
    return fast


def test_a_packet_is_relayed_as_sent_in_one_write_and_answered_in_one():
    world = World(True, 1, concurrency=64)
    world.send(0, SETS)
    (relay,) = world.relays
    assert relay.transport.value() == SETS  # the client's bytes, one write
    world.answer()
    protocol, transport = world.clients[0]
    assert transport.value() == b"+OK\r\n" * 3
    assert [world.cache.get(k) for k in KEYS[:3]] == [None] * 3  # dropped on the replies
    assert world.metrics.write_invalidations == 3
    assert world.metrics.forwarded["set", "ok"] == 3
    assert protocol._session.forwarding == 0


def test_a_packet_timing_out_halfway_answers_what_came_then_the_timeouts():
    worlds = _both()
    for world in worlds:
        world.send(0, SETS)
        (relay,) = world.relays
        relay.transport.clear()
        relay.dataReceived(b"+OK\r\n")  # the first reply only
        world.clock.advance(world.config.redis_timeout + 1)
        world.turn()
        relay.dataReceived(b"+OK\r\n+OK\r\n")  # late: dropped
        world.turn()
    clients = _same(worlds)[0]
    error = b"-ERR backing redis timed out after %gs\r\n" % worlds[0].config.redis_timeout
    assert clients == [b"+OK\r\n" + error * 2]
    # a timed-out write may have been applied: its key is dropped too
    assert [worlds[0].cache.get(k) for k in KEYS[:3]] == [None] * 3


def test_a_packet_on_a_lost_backing_connection_fails_each_command():
    worlds = _both()
    for world in worlds:
        world.send(0, SETS)
        world.relays[0].connectionLost()
        world.turn()
        world.send(0, SETS)  # on a new connection
        world.answer()
    clients = _same(worlds)[0]
    assert clients == [b"-ERR backing redis unavailable (connection lost)\r\n" * 3
                       + b"+OK\r\n" * 3]


def test_a_packet_fails_fast_while_the_backing_is_stalled():
    worlds = _both()
    for world in worlds:

        class Stalled:
            state = "stalled"

            def suspect(self) -> None:
                pass

        world.clients[0][0].factory.forwarder._backing = Stalled()
        world.send(0, SETS)
        world.answer()
    clients = _same(worlds)[0]
    assert clients == [b"-ERR backing redis timed out after %gs\r\n"
                       % worlds[0].config.redis_timeout * 3]
    assert worlds[0].relays == [] or worlds[0].relays[0].transport.value() == b""


def test_a_packet_of_a_client_that_left_is_dropped_at_the_gate():
    for world in [World(packets, 2, concurrency=3) for packets in (True, False)]:
        held = encode_command([b"SET", b"k1:0", b"1"]) * 3
        world.send(1, held)  # the other client holds every token
        world.send(0, SETS)
        world.clients[0][0].connectionLost()
        world.answer()
        wire = b"".join(b"".join(r.wire) for r in world.relays)
        assert SETS not in wire  # never sent
        assert world.clients[1][1].value() == b"+OK\r\n" * 3
        assert world.metrics.requests["resp", "other"] == 3


def test_a_multi_after_a_packet_waits_for_its_replies():
    worlds = _both()
    for world in worlds:
        world.send(0, SETS + encode_command([b"INCR", b"k0:0"]))
        world.send(0, encode_command([b"MULTI"]))
        pinned = world.relays[1:]
        assert all(r.transport.value() == b"" for r in pinned)  # parked
        world.answer()
    assert _same(worlds)[0] == [b"+OK\r\n" * 3 + b":10\r\n+OK\r\n"]


def test_a_get_behind_a_packet_of_sets_reads_the_write():
    worlds = _both()
    for world in worlds:
        world.send(0, SETS)
        world.send(0, encode_command([b"GET", KEYS[0]]))  # cached "1" is stale
        world.answer()
    assert _same(worlds)[0] == [b"+OK\r\n" * 3 + b"$1\r\n9\r\n"]


def test_a_packet_larger_than_the_gate_goes_command_by_command():
    world = World(True, 1, concurrency=2)
    world.send(0, SETS)
    assert world.relays[0].waiting == 2  # one at a time through the gate: 2 of 3 sent
    world.answer()
    assert world.clients[0][1].value() == b"+OK\r\n" * 3


def test_packets_are_not_taken_by_a_restricted_or_pinned_client():
    world = World(True, 1, concurrency=64, password=Secret("secret"))
    world.send(0, SETS)
    assert world.clients[0][1].value().count(b"-NOAUTH") == 3
    assert world.relays == []
    worlds = _both()
    for world in worlds:
        world.send(0, encode_command([b"MULTI"]))
        world.answer()
        world.send(0, SETS + encode_command([b"EXEC"]))
        assert world.relays[0].transport.value() == SETS + encode_command([b"EXEC"])  # the pin
        world.answer()
    assert _same(worlds)[0] == [b"+OK\r\n" + b"+QUEUED\r\n" * 3 + b"*3\r\n" + b"+OK\r\n" * 3]


@settings(max_examples=200, deadline=None)
@given(st.lists(st.lists(st.binary(max_size=5), min_size=1, max_size=4), min_size=1,
                max_size=4), st.sampled_from([b"", b"PING\r\n", b"*1\r\n$04\r\nPING\r\n",
                                              b"*2\r\n$3\r\nGET"]))
def test_whole_takes_exactly_canonical_packets(commands, tail):
    """What ``feed`` returns, for the packets it takes; None (``feed`` then
    parses) for a CRLF inside a value, or anything not whole and canonical."""
    data = b"".join(encode_command(argv) for argv in commands)
    whole = RequestParser().whole(data)
    assert whole == commands == RequestParser().feed(data) or (
        whole is None and any(b"\r" in arg for argv in commands for arg in argv))
    parser = RequestParser()
    assert parser.whole(data + tail) is None if tail else parser.whole(data) == whole
    assert parser.idle


def test_a_relay_packet_call_counts_its_commands_and_keeps_the_fifo_after_a_timeout():
    clock = Clock()
    relay = RelayProtocol(clock, 1.0)
    relay.makeConnection(StringTransport())
    got: list = []
    relay.call_many(SETS, 3, got.append)
    relay.call(b"*1\r\n$4\r\nPING\r\n", got.append)
    assert relay.waiting == 4
    relay.dataReceived(b"+OK\r\n")
    assert relay.waiting == 3 and got == []
    clock.advance(2)  # the packet's two other commands and the PING time out
    assert [type(r).__name__ for r in got[0]] == ["bytes", "BackingTimeout", "BackingTimeout"]
    assert got[1].kind == "timeout"
    relay.dataReceived(b"+OK\r\n+OK\r\n+PONG\r\n")  # late: dropped, each in its place
    assert relay.waiting == 0 and len(got) == 2
    relay.call_many(SETS, 3, got.append)
    relay.dataReceived(b"+OK\r\n:1\r\n")
    relay.connectionLost()
    assert got[2][:2] == [b"+OK\r\n", b":1\r\n"] and got[2][2].kind == "unavailable"


def test_a_packet_waiting_at_the_gate_is_relayed_as_soon_as_a_reply_frees_it():
    # the reply that frees the tokens sends the next packet from within the
    # relay's read, before the reactor turns (Gate.leave_now)
    world = World(True, 2, concurrency=3)
    world.send(0, SETS)
    world.send(1, SETS)
    (first,) = world.relays
    assert first.transport.value() == SETS  # the second waits: the gate is full
    first.transport.clear()
    first.dataReceived(b"+OK\r\n" * 3)
    # no clock.advance: sent in the same turn (on the second client's lane)
    assert [r.transport.value() for r in world.relays] == [b"", SETS]
    world.turn()
    assert world.clients[0][1].value() == b"+OK\r\n" * 3
    world.relays[1].dataReceived(b"+OK\r\n" * 3)
    world.turn()
    assert world.clients[1][1].value() == b"+OK\r\n" * 3
    assert world.metrics.forwarded["set", "ok"] == 6


def test_a_get_of_another_client_waiting_behind_a_packet_reads_its_writes():
    # admitted by the packet's reply, after its keys were dropped from the cache
    for concurrency in (3, 1):
        world = World(True, 2, concurrency=concurrency)
        world.send(0, SETS if concurrency > 1 else encode_command([b"SET", KEYS[0], b"9"]))
        world.send(1, encode_command([b"GET", KEYS[0]]))  # cached "1" is stale
        assert world.clients[1][1].value() == b""
        world.answer()
        assert world.clients[1][1].value() == b"$1\r\n9\r\n", concurrency
