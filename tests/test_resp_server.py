"""The RESP door's connections on in-memory transports, over the real reader,
gate and cache with a scripted backing below them: pipelining and reply
order, protocol errors, the client cap, QUIT, flow control, lost clients."""

from __future__ import annotations

import functools
import gc
import tracemalloc

import pytest
import pytest_twisted
from twisted.internet import protocol, task
from twisted.internet.address import IPv4Address
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import TCP4ClientEndpoint, TCP4ServerEndpoint
from twisted.internet.error import ConnectionDone
from twisted.internet.testing import StringTransport
from twisted.logger import globalLogPublisher
from twisted.python.failure import Failure

from redisp.backing.connection import BackingReplyError, BackingUnavailable
from redisp.clients import ClientSlots
from redisp.commands.replies import CHUNK
from redisp.config import Config
from redisp.core.cache import Cache
from redisp.core.gate import Gate
from redisp.core.reader import CachedReader
from redisp.doors import resp as resp_server
from redisp.doors.resp import (
    GET_BATCH,
    HIGH_WATER,
    IDLE_CHECKS,
    MAX_PENDING,
    OVERFLOW_LOG_INTERVAL,
    RESUME_PENDING,
    RespFactory,
    RespProtocol,
)
from redisp.metrics import Metrics
from redisp.protocol.codec import bulk
from tests.door_support import ScriptedRedis
from tests.test_reader import FakeBacking
from tests.test_resp import encode

PEER = IPv4Address("TCP", "127.0.0.1", 40000)


class RecordingTransport(StringTransport):
    """A StringTransport that also keeps each write, to count them."""

    def __init__(self) -> None:
        super().__init__()
        self.writes: list[bytes] = []

    def write(self, data: bytes) -> None:
        self.writes.append(data)
        super().write(data)


class Door:
    """One factory over the real reader, gate and cache, and connections made
    to it; ``redis`` is the backing, ``values`` what the cache holds already."""

    def __init__(
        self, values: dict[bytes, bytes] | None = None, max_clients: int = 100,
        concurrency: int = 1, reader=None, clock: task.Clock | None = None, **config,
    ) -> None:
        self.clock = clock or task.Clock()
        self.metrics = Metrics(started=self.clock.seconds())
        self.slots = ClientSlots(max_clients, self.metrics)
        values = values if values is not None else {b"k": b"v"}
        self.redis = ScriptedRedis(values, self.clock)
        self.cache = Cache(1000, 60.0, self.clock, self.metrics)
        for key, value in values.items():
            self.cache.put(key, value)
        self.reader = reader or CachedReader(
            self.cache, Gate(concurrency, self.clock), self.redis, self.metrics)
        # StringTransport's peer is 10.0.0.1: not refused in protected mode
        # unless a test asks for it (tests/test_auth_resp.py)
        config.setdefault("protected_mode", False)
        self.config = Config(concurrency=concurrency, **config)
        self.factory = RespFactory(self.reader, self.metrics, self.slots, self.config, self.clock)

    def cached(self, key: bytes, value: bytes) -> None:
        """``key`` is in Redis and in the cache already: a GET of it is a hit."""
        self.redis.values[key] = value
        self.cache.put(key, value)

    def connect(self, transport=None) -> tuple[RespProtocol, RecordingTransport]:
        proto = self.factory.buildProtocol(PEER)
        transport = transport or RecordingTransport()
        proto.makeConnection(transport)
        return proto, transport

    def outcomes(self) -> dict[str, int]:
        return {outcome: n for (door, outcome), n in self.metrics.requests.items()
                if door == "resp"}


@pytest.fixture
def door() -> Door:
    return Door()


@pytest.fixture
def logged_failures():
    """Failures logged while the test runs."""
    failures: list = []

    def observe(event: dict) -> None:
        if "log_failure" in event:
            failures.append(event["log_failure"])

    globalLogPublisher.addObserver(observe)
    yield failures
    globalLogPublisher.removeObserver(observe)


# -- pipelining and order ----------------------------------------------------------


def test_connection_registers_as_a_streaming_producer(door):
    proto, transport = door.connect()
    assert transport.producer is proto
    assert transport.streaming


def test_pipelined_hits_leave_in_one_write(door):
    """The fast path: every reply of a packet is ready, so one write."""
    proto, transport = door.connect()
    proto.dataReceived(encode(b"GET", b"k") + encode(b"GET", b"nope") + b"PING\r\n")
    assert transport.writes == [b"$1\r\nv\r\n$-1\r\n+PONG\r\n"]


def test_request_across_many_packets(door):
    proto, transport = door.connect()
    data = encode(b"ECHO", b"hello") * 2
    for i in range(len(data)):
        proto.dataReceived(data[i:i + 1])
    assert transport.value() == b"$5\r\nhello\r\n" * 2


def test_hit_waits_behind_an_earlier_slow_get(door):
    """A reply ready at once leaves only after the replies owed before it."""
    door.redis.later.add(b"slow")
    proto, transport = door.connect()
    proto.dataReceived(encode(b"GET", b"slow") + encode(b"GET", b"k") + b"PING\r\n")
    assert transport.value() == b""
    door.redis.answer(b"slow", b"late")
    assert transport.writes == [b"$4\r\nlate\r\n$1\r\nv\r\n+PONG\r\n"]


def test_deferred_replies_completing_out_of_order():
    door = Door(concurrency=2)  # both fetches in flight at once
    door.redis.later.update({b"a", b"b"})
    proto, transport = door.connect()
    proto.dataReceived(encode(b"GET", b"a") + encode(b"GET", b"b"))
    door.redis.answer(b"b", b"B")
    assert transport.value() == b""
    door.redis.answer(b"a", b"A")
    assert transport.value() == b"$1\r\nA\r\n$1\r\nB\r\n"


def test_later_packets_queue_behind_pending_replies(door):
    door.redis.later.add(b"slow")
    proto, transport = door.connect()
    proto.dataReceived(encode(b"GET", b"slow"))
    proto.dataReceived(b"PING\r\n")
    assert transport.value() == b""
    door.redis.answer(b"slow", None)
    assert transport.value() == b"$-1\r\n+PONG\r\n"
    proto.dataReceived(b"PING\r\n")
    assert transport.value() == b"$-1\r\n+PONG\r\n+PONG\r\n"


def test_reply_already_settled_keeps_its_place(door):
    """A Deferred that has fired already (a backing known to be down) is
    written in order, in the same single write as its neighbours."""
    door.redis.failures[b"bad"] = BackingUnavailable("backing redis unavailable (refused)")
    proto, transport = door.connect()
    proto.dataReceived(b"PING\r\n" + encode(b"GET", b"bad") + b"PING\r\n")
    assert transport.writes == [
        b"+PONG\r\n-ERR backing redis unavailable (refused)\r\n+PONG\r\n",
    ]


def test_hello_3_then_get_absent_is_resp3_null(door):
    proto, transport = door.connect()
    proto.dataReceived(b"HELLO 3\r\n")
    transport.clear()
    proto.dataReceived(encode(b"GET", b"nope"))
    assert transport.value() == b"_\r\n"


def test_hello_3_behind_a_slow_get_does_not_change_its_reply(door):
    door.redis.later.add(b"slow")
    proto, transport = door.connect()
    proto.dataReceived(encode(b"GET", b"slow") + b"HELLO 3\r\n" + encode(b"GET", b"nope"))
    door.redis.answer(b"slow", None)
    data = transport.value()
    assert data.startswith(b"$-1\r\n%7\r\n")
    assert data.endswith(b"_\r\n")


def test_backing_error_keeps_redis_text(door):
    door.redis.later.add(b"list")
    proto, transport = door.connect()
    proto.dataReceived(encode(b"GET", b"list"))
    door.redis.fail(b"list", BackingReplyError("WRONGTYPE Operation against a key holding "
                                                "the wrong kind of value"))
    assert transport.value() == (
        b"-WRONGTYPE Operation against a key holding the wrong kind of value\r\n"
    )
    assert door.outcomes() == {"backing_error": 1}


def test_unexpected_failure_answers_internal_error_and_is_logged(door, logged_failures):
    door.redis.later.add(b"bug")
    proto, transport = door.connect()
    proto.dataReceived(encode(b"GET", b"bug") + b"PING\r\n")
    door.redis.fail(b"bug", RuntimeError("boom"))
    assert transport.value() == b"-ERR internal error\r\n+PONG\r\n"
    assert [f.type for f in logged_failures] == [RuntimeError]
    assert not transport.disconnecting


def test_exception_in_a_command_answers_internal_error(door, logged_failures):
    def broken(key, owner=None):
        raise KeyError(key)

    door.reader.get = broken
    proto, transport = door.connect()
    proto.dataReceived(encode(b"GET", b"x") + b"PING\r\n")
    assert transport.value() == b"-ERR internal error\r\n+PONG\r\n"
    assert [f.type for f in logged_failures] == [KeyError]


def test_outcomes_are_counted_once_per_request(door):
    door.redis.later.add(b"slow")
    proto, transport = door.connect()
    proto.dataReceived(
        encode(b"GET", b"k") + encode(b"GET", b"nope") + encode(b"GET", b"slow")
        + b"PING\r\nFOO\r\nGET\r\n"
    )
    door.clock.advance(0)  # the gate hands the token on to GET slow
    door.redis.answer(b"slow", b"x")
    proto.dataReceived(b"*x\r\n")
    assert door.outcomes() == {
        "hit": 1, "absent": 1, "miss": 1, "other": 1, "bad_request": 2, "protocol_error": 1,
    }


def test_client_ids_are_unique(door):
    first, t1 = door.connect()
    second, t2 = door.connect()
    first.dataReceived(b"CLIENT ID\r\n")
    second.dataReceived(b"CLIENT ID\r\n")
    assert (t1.value(), t2.value()) == (b":1\r\n", b":2\r\n")


# -- closing ----------------------------------------------------------------------


def test_protocol_error_answers_after_earlier_replies_then_closes(door):
    proto, transport = door.connect()
    proto.dataReceived(b"PING\r\n*x\r\nPING\r\n")
    assert transport.value() == b"+PONG\r\n-ERR Protocol error: invalid multibulk length\r\n"
    assert transport.disconnecting
    assert transport.producer is None, "a registered producer would keep the socket open"


def test_protocol_error_waits_for_pending_replies(door):
    door.redis.later.add(b"slow")
    proto, transport = door.connect()
    proto.dataReceived(encode(b"GET", b"slow") + b"*1\r\n$x\r\n")
    assert transport.value() == b""
    assert not transport.disconnecting
    door.redis.answer(b"slow", b"v")
    assert transport.value() == b"$1\r\nv\r\n-ERR Protocol error: invalid bulk length\r\n"
    assert transport.disconnecting


def test_input_after_a_protocol_error_is_ignored(door):
    proto, transport = door.connect()
    proto.dataReceived(b"*1\r\nx\r\n")
    proto.dataReceived(b"PING\r\n")
    assert transport.value() == b"-ERR Protocol error: expected '$', got 'x'\r\n"


def test_oversized_bulk_is_refused_before_its_body(door):
    """512 MiB + 1 (Redis's proto-max-bulk-len) is refused on its header:
    the body never has to arrive."""
    proto, transport = door.connect()
    proto.dataReceived(b"*2\r\n$4\r\nECHO\r\n$%d\r\n" % (512 * 1024 * 1024 + 1))
    assert transport.value() == b"-ERR Protocol error: invalid bulk length\r\n"
    assert transport.disconnecting


def test_quit_answers_ok_then_closes(door):
    proto, transport = door.connect()
    proto.dataReceived(b"PING\r\nQUIT\r\nPING\r\n")
    assert transport.value() == b"+PONG\r\n+OK\r\n"
    assert transport.disconnecting
    proto.dataReceived(b"PING\r\n")
    assert transport.value() == b"+PONG\r\n+OK\r\n"


def test_quit_waits_for_pending_replies(door):
    door.redis.later.add(b"slow")
    proto, transport = door.connect()
    proto.dataReceived(encode(b"GET", b"slow") + b"QUIT\r\n")
    assert not transport.disconnecting
    door.redis.answer(b"slow", b"v")
    assert transport.value() == b"$1\r\nv\r\n+OK\r\n"
    assert transport.disconnecting


def test_after_hang_up_later_requests_are_not_run_and_the_owed_reply_still_leaves(door):
    """hang_up (the client's pinned connection lost, CLIENT KILL of itself):
    no request read afterwards runs, even a cache hit on the GET fast path,
    while the reply already owed is written before the close."""
    door.redis.later.add(b"slow")
    proto, transport = door.connect()
    proto.dataReceived(encode(b"GET", b"slow"))
    proto.hang_up()
    assert not transport.disconnecting
    proto.dataReceived(encode(b"GET", b"k") + encode(b"GET", b"k"))
    proto.dataReceived(b"PING\r\n")
    door.redis.answer(b"slow", b"v")
    assert transport.value() == b"$1\r\nv\r\n"
    assert transport.disconnecting


def test_max_clients_reached():
    """Over the cap: the error, then the connection closes; the slot that
    was never taken is never given back."""
    door = Door(max_clients=1)
    first, _ = door.connect()
    second, transport = door.connect()
    assert transport.value() == b"-ERR max number of clients reached\r\n"
    assert transport.disconnecting
    second.dataReceived(b"PING\r\n")
    assert transport.value() == b"-ERR max number of clients reached\r\n"
    second.connectionLost()
    assert door.metrics.connected_clients == 1
    first.connectionLost()
    assert door.metrics.connected_clients == 0
    third, transport = door.connect()
    assert not transport.disconnecting


def test_slot_is_released_exactly_once(door):
    proto, _ = door.connect()
    assert door.metrics.connected_clients == 1
    proto.connectionLost()
    proto.connectionLost()
    assert door.metrics.connected_clients == 0


@pytest.mark.parametrize("request_", [
    encode(b"GET", b"a") + encode(b"GET", b"b") + encode(b"GET", b"c"),  # the GET packet
    encode(b"GET", b"a") + b"PING\r\n" + encode(b"GET", b"b") + encode(b"GET", b"c")
    + b"PING\r\n",  # the general path, a Deferred each
], ids=["GET packet", "general"])
def test_connection_lost_with_pending_replies(request_, logged_failures):
    """Owed replies are dropped quietly: no write to a closed transport, no
    error left in a Deferred (it would be logged when collected), whatever
    they settle with."""
    door = Door(concurrency=3)  # all three fetches in flight
    door.redis.later.update({b"a", b"b", b"c"})
    proto, transport = door.connect()
    proto.dataReceived(request_)
    assert sorted(door.redis.waiting) == [b"a", b"b", b"c"]
    proto.connectionLost()
    door.redis.answer(b"a", b"v")
    door.redis.fail(b"b", BackingUnavailable("backing redis unavailable (x)"))
    door.redis.fail(b"c", RuntimeError("boom"))
    gc.collect()
    assert transport.writes == []
    assert [f.type for f in logged_failures] == [RuntimeError]
    assert door.metrics.connected_clients == 0


# -- flow control ---------------------------------------------------------------------


def test_deep_queue_pauses_reading_until_drained(door):
    """Each GET a miss of its own (a key each): at ``concurrency: 1`` each is
    fetched once the one before it is answered."""
    keys = [b"slow:%d" % i for i in range(MAX_PENDING + 1)]
    door.redis.later.update(keys)
    proto, transport = door.connect()
    proto.dataReceived(b"".join(encode(b"GET", key) for key in keys[:-1]))
    assert transport.producerState == "producing", "at the limit: still reading"
    proto.dataReceived(encode(b"GET", keys[-1]))
    assert transport.producerState == "paused"
    answered = iter(keys)
    for _ in range(MAX_PENDING + 1 - RESUME_PENDING - 1):
        door.redis.answer(next(answered), b"v")
    assert transport.producerState == "paused"
    door.redis.answer(next(answered), b"v")
    assert transport.producerState == "producing"
    for key in answered:
        door.redis.answer(key, b"v")
    assert transport.value() == b"$1\r\nv\r\n" * (MAX_PENDING + 1)
    assert door.redis.calls == [(b"GET", key) for key in keys]


def test_client_not_reading_pauses_reading(door):
    """The transport pauses us when its send buffer is full."""
    proto, transport = door.connect()
    proto.pauseProducing()
    assert transport.producerState == "paused"
    proto.resumeProducing()
    assert transport.producerState == "producing"


def test_both_reasons_to_pause_must_clear(door):
    door.redis.later.add(b"slow")
    proto, transport = door.connect()
    proto.dataReceived(encode(b"GET", b"slow") * (MAX_PENDING + 1))
    proto.pauseProducing()
    while door.redis.waiting[b"slow"]:
        door.redis.answer(b"slow", b"v")
    assert transport.producerState == "paused", "the client still is not reading"
    proto.resumeProducing()
    assert transport.producerState == "producing"
    assert transport.value() == b"$1\r\nv\r\n" * (MAX_PENDING + 1)


# -- a real socket ------------------------------------------------------------------


class _Client(protocol.Protocol):
    def __init__(self) -> None:
        self.data = b""
        self.closed: Deferred = Deferred()

    def dataReceived(self, data: bytes) -> None:
        self.data += data

    def connectionLost(self, reason=None) -> None:
        self.closed.callback(self.data)


@pytest_twisted.inlineCallbacks
def test_quit_really_closes_the_socket():
    """Over loopback TCP: after QUIT, and after a protocol error, every reply
    reaches the client and then the server closes the connection."""
    from twisted.internet import reactor

    door = Door()
    door.factory.clock = reactor
    port = yield TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(door.factory)
    try:
        for request, expected in [
            (encode(b"GET", b"k") + b"QUIT\r\n", b"$1\r\nv\r\n+OK\r\n"),
            (b"PING\r\n*x\r\n", b"+PONG\r\n-ERR Protocol error: invalid multibulk length\r\n"),
        ]:
            endpoint = TCP4ClientEndpoint(reactor, "127.0.0.1", port.getHost().port)
            client = yield endpoint.connect(protocol.Factory.forProtocol(_Client))
            client.transport.write(request)
            assert (yield client.closed) == expected
    finally:
        yield port.stopListening()


@pytest.mark.parametrize("concurrency", [1, 64], ids=["groups of one", "one gate entry"])
def test_a_packet_of_gets_mixing_hits_misses_and_errors_answers_in_order(
    concurrency, logged_failures
):
    """The GET-packet path (no general dispatch) keeps order, outcomes and
    errors, whether its keys pass the gate in groups of one (a packet larger
    than ``concurrency``) or as one entry (``CachedReader.read_packet``)."""
    door = Door(concurrency=concurrency)
    door.cached(b"hot", b"H")
    door.redis.later.update({b"slow", b"list", b"bug"})
    proto, transport = door.connect()
    keys = [b"slow", b"hot", b"absent", b"list", b"bug", b"hot"]
    proto.dataReceived(b"".join(encode(b"GET", key) for key in keys))
    assert transport.value() == b""
    if concurrency == 1:  # one at a time: nothing else is even asked yet
        door.clock.advance(0)
        assert door.redis.calls == [(b"GET", b"slow")]
        door.redis.answer(b"slow", b"S")
        door.redis.fail(b"list", BackingReplyError("WRONGTYPE Operation against a key"))
        door.redis.fail(b"bug", RuntimeError("boom"))
    else:
        door.redis.fail(b"bug", RuntimeError("boom"))
        door.redis.fail(b"list", BackingReplyError("WRONGTYPE Operation against a key"))
        assert transport.value() == b"", "every reply waits for the first"
        door.redis.answer(b"slow", b"S")
    assert transport.value() == (
        b"$1\r\nS\r\n$1\r\nH\r\n$-1\r\n-WRONGTYPE Operation against a key\r\n"
        b"-ERR internal error\r\n$1\r\nH\r\n"
    )
    assert door.outcomes() == {"miss": 1, "hit": 2, "absent": 1, "backing_error": 1, "other": 1}
    assert [f.type for f in logged_failures] == [RuntimeError]


def test_a_packet_of_gets_answers_the_same_as_the_general_path(door):
    """``GET k`` alone (the GET-packet path) and ``GET k`` + ``PING`` (general
    dispatch) give the same GET reply, for every kind of answer."""
    door.cached(b"hot", b"H")
    door.redis.failures[b"down"] = BackingUnavailable("backing redis unavailable (refused)")
    for key in (b"hot", b"absent", b"down"):
        alone, t1 = door.connect()
        alone.dataReceived(encode(b"GET", key))
        door.clock.advance(0)  # a miss gives its gate token back at the turn's end
        mixed, t2 = door.connect()
        mixed.dataReceived(encode(b"GET", key) + b"PING\r\n")
        door.clock.advance(0)
        assert t2.value() == t1.value() + b"+PONG\r\n"


def test_late_replies_of_one_turn_leave_in_one_write_at_its_end():
    door = Door(concurrency=2)  # both fetches in flight at once
    door.redis.later.update({b"a", b"b"})
    proto, transport = door.connect()
    proto.dataReceived(encode(b"GET", b"a") + encode(b"GET", b"b"))
    door.redis.answer(b"a", b"A", end_turn=False)  # both settle within one turn ...
    door.redis.answer(b"b", b"B", end_turn=False)
    assert transport.value() == b"", "... and nothing is written before the turn ends"
    door.clock.advance(0)
    assert transport.writes == [b"$1\r\nA\r\n$1\r\nB\r\n"]


def test_a_late_reply_to_a_connection_gone_meanwhile_is_dropped(door):
    door.redis.later.add(b"a")
    proto, transport = door.connect()
    proto.dataReceived(encode(b"GET", b"a"))
    door.redis.answer(b"a", b"A", end_turn=False)
    proto.connectionLost(Failure(ConnectionDone()))
    door.clock.advance(0)
    assert transport.value() == b""


# -- a client that has gone (SPEC §4) -------------------------------------------------


def real_door(concurrency: int = 1, **config) -> tuple[Door, FakeBacking]:
    """A Door whose backing is test_reader's FakeBacking: every reply, GET or
    MGET, released by the test."""
    clock = task.Clock()
    metrics = Metrics(started=0)
    backing = FakeBacking()
    reader = CachedReader(
        Cache(100, 60.0, clock, metrics), Gate(concurrency, clock), backing, metrics
    )
    return Door(reader=reader, clock=clock, concurrency=concurrency, **config), backing


@pytest.mark.parametrize("concurrency", [1, 64])
def test_a_gone_clients_requests_waiting_at_the_gate_are_never_sent(concurrency):
    """200 pipelined misses, then the client leaves: what the gate admitted
    may finish, the rest is never sent to Redis, and the next client's
    request is next."""
    door, backing = real_door(concurrency)
    leaving, t1 = door.connect()
    other, t2 = door.connect()
    leaving.dataReceived(b"".join(encode(b"GET", b"miss:%d" % i) for i in range(200)))
    admitted = len(backing.calls)
    assert admitted == concurrency
    other.dataReceived(encode(b"GET", b"after"))  # queued behind the 200
    leaving.connectionLost(Failure(ConnectionDone()))
    for fetch in list(backing.pending):
        fetch.callback(None)
    door.clock.advance(0)
    assert backing.calls[admitted:] == [(b"GET", b"after")], "nothing sent for the gone client"
    backing.pending[-1].callback(b"v")
    door.clock.advance(0)
    assert t2.value() == b"$1\r\nv\r\n"
    assert t1.value() == b""
    door.clock.advance(0)
    assert door.reader._gate.idle()


def test_a_gone_clients_mget_and_general_gets_are_dropped_too():
    door, backing = real_door(1)
    other, _ = door.connect()
    other.dataReceived(encode(b"GET", b"first"))
    leaving, _ = door.connect()
    leaving.dataReceived(encode(b"MGET", b"a", b"b") + b"PING\r\n" + encode(b"GET", b"c")
                         + b"PING\r\n")
    leaving.connectionLost(Failure(ConnectionDone()))
    backing.pending[0].callback(None)
    door.clock.advance(0)
    assert backing.calls == [(b"GET", b"first")]


# -- a client that does not read (SPEC §9) -----------------------------------------------


class ReadingTransport(RecordingTransport):
    """Pauses its producer past 64 KiB unread, as Twisted's FileDescriptor
    does with its send buffer; ``read()`` is the client reading it all, after
    which the producer is resumed, as FileDescriptor.doWrite does."""

    def __init__(self) -> None:
        super().__init__()
        self.unread = 0
        self.paused = False

    def write(self, data: bytes) -> None:
        super().write(data)
        self.unread += len(data)
        if self.unread > 65536 and self.producer is not None and not self.paused:
            self.paused = True
            self.producer.pauseProducing()

    def read(self) -> bytes:
        data = self.value()
        self.clear()
        self.unread = 0
        if self.paused and self.producer is not None:
            self.paused = False
            self.producer.resumeProducing()
        return data


def read_all(transport: ReadingTransport, size: int) -> bytes:
    got = b""
    for _ in range(10000):
        got += transport.read()
        if len(got) >= size:
            return got
    raise AssertionError(f"only {len(got)} of {size} bytes came")


VALUE_4K = b"x" * 4096


def test_requests_are_not_run_while_the_client_does_not_read():
    """One read of pipelined requests whose replies add up to megabytes: only
    about a high-water mark's worth is run and written until the client
    reads, then the rest follows in order."""
    door = Door({b"k": VALUE_4K})
    proto, transport = door.connect(ReadingTransport())
    pairs = 1000
    proto.dataReceived((encode(b"GET", b"k") + b"PING\r\n") * pairs)  # the general path
    assert len(transport.value()) <= HIGH_WATER + 2 * len(bulk(VALUE_4K))
    assert door.outcomes()["hit"] < HIGH_WATER // len(VALUE_4K) + 2, "the rest is not run yet"
    assert transport.producerState == "paused", "nor read"
    expected = (bulk(VALUE_4K) + b"+PONG\r\n") * pairs
    assert read_all(transport, len(expected)) == expected
    assert door.outcomes() == {"hit": pairs, "other": pairs}
    assert transport.producerState == "producing"


def test_a_packet_of_hits_with_a_huge_reply_is_sent_as_the_client_reads():
    """The GET-packet fast path: 3000 GETs of a 4 KiB value (12 MB of
    replies) from one 64 KiB read cost about one chunk, not 12 MB."""
    door = Door({b"k": VALUE_4K})
    proto, transport = door.connect(ReadingTransport())
    packet = encode(b"GET", b"k") * 3000
    assert len(packet) < 65536
    tracemalloc.start()
    try:
        proto.dataReceived(packet)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    # one batch of values copied out of the cache at a time, one chunk of reply
    batch = GET_BATCH * len(VALUE_4K)
    assert peak < batch + 2 * CHUNK + len(packet) + 400_000, f"{peak} bytes for a 12 MB reply"
    assert len(transport.value()) == CHUNK
    expected = bulk(VALUE_4K) * 3000
    assert read_all(transport, len(expected)) == expected


def test_a_huge_mget_is_sent_in_chunks_as_the_client_reads():
    door = Door({b"k": VALUE_4K})
    proto, transport = door.connect(ReadingTransport())
    proto.dataReceived(encode(b"MGET", *[b"k"] * 1000) + b"PING\r\n")
    assert len(transport.value()) == CHUNK
    expected = b"*1000\r\n" + bulk(VALUE_4K) * 1000 + b"+PONG\r\n"
    assert read_all(transport, len(expected)) == expected


@pytest.mark.parametrize("request_", [
    encode(b"GET", b"big"),  # the GET-packet path
    encode(b"GET", b"big") + b"PING\r\n",  # the general path
], ids=["GET packet", "general"])
def test_a_huge_value_fetched_from_redis_is_sent_in_chunks(request_):
    big = bytes(range(256)) * 4096  # 1 MiB
    door = Door()
    door.redis.later.add(b"big")
    proto, transport = door.connect(ReadingTransport())
    proto.dataReceived(request_)
    door.redis.answer(b"big", big)
    assert len(transport.value()) == CHUNK
    expected = bulk(big) + (b"+PONG\r\n" if request_.endswith(b"PING\r\n") else b"")
    assert read_all(transport, len(expected)) == expected


def test_input_while_the_client_is_not_reading_is_held_not_run(door):
    """A TLS transport may deliver more records after pausing us: they wait."""
    door.redis.later.add(b"slow")
    proto, transport = door.connect()
    proto.pauseProducing()
    proto.dataReceived(b"PING\r\n" + encode(b"GET", b"slow"))
    assert transport.value() == b"" and b"slow" not in door.redis.waiting
    proto.resumeProducing()
    assert transport.value() == b"+PONG\r\n" and door.redis.waiting[b"slow"]
    door.redis.answer(b"slow", b"v")
    assert transport.value() == b"+PONG\r\n$1\r\nv\r\n"


def test_replies_piling_up_behind_an_owed_one_stop_the_requests():
    """With tokens to spare, hits answer at once behind a miss still owed."""
    door = Door({b"k": VALUE_4K}, concurrency=64)
    door.redis.later.add(b"slow")
    proto, transport = door.connect()
    pairs = 500
    proto.dataReceived(encode(b"GET", b"slow") + (encode(b"GET", b"k") + b"PING\r\n") * pairs)
    assert door.outcomes()["hit"] <= HIGH_WATER // len(VALUE_4K) + 1
    assert transport.producerState == "paused"
    door.redis.answer(b"slow", b"s")
    assert transport.value() == b"$1\r\ns\r\n" + (bulk(VALUE_4K) + b"+PONG\r\n") * pairs
    assert transport.producerState == "producing"


def test_quit_held_behind_a_client_not_reading_still_closes_after_its_replies():
    door = Door({b"k": VALUE_4K})
    proto, transport = door.connect(ReadingTransport())
    proto.dataReceived(encode(b"GET", b"k") * 100 + b"PING\r\n" * 100 + b"QUIT\r\nPING\r\n"
                       + encode(b"GET", b"k") * 200 + b"PING\r\n")
    proto.dataReceived(b"PING\r\n")
    assert not transport.disconnecting
    expected = bulk(VALUE_4K) * 100 + b"+PONG\r\n" * 100 + b"+OK\r\n"
    assert read_all(transport, len(expected)) == expected
    assert transport.disconnecting


@pytest.fixture
def overflow_lines():
    """Log lines about clients disconnected for max_client_buffer."""
    lines: list = []

    def observe(event: dict) -> None:
        if "max_client_buffer" in event.get("log_format", ""):
            lines.append(event)

    globalLogPublisher.addObserver(observe)
    yield lines
    globalLogPublisher.removeObserver(observe)


@pytest.mark.parametrize("request_", [
    encode(b"GET", b"k") * 3000,  # the fast path
    encode(b"MGET", *[b"k"] * 300),
    encode(b"MGET", b"slow", *[b"k"] * 300),  # answered later
], ids=["GET packet", "MGET", "MGET answered later"])
def test_a_reply_past_max_client_buffer_disconnects(request_, overflow_lines):
    door = Door({b"k": VALUE_4K}, max_client_buffer=1_000_000)
    door.redis.later.add(b"slow")
    proto, transport = door.connect()
    proto.dataReceived(request_)
    if door.redis.waiting_many:
        assert not transport.disconnected
        door.redis.waiting_many[0][1].callback([VALUE_4K] * 301)
    assert transport.disconnected, "aborted, as Redis frees a client past its limits"
    assert len(transport.value()) < 1_000_000
    assert len(overflow_lines) == 1
    proto.connectionLost(Failure(ConnectionDone()))
    assert door.metrics.connected_clients == 0


def test_a_send_buffer_filling_past_max_client_buffer_disconnects(overflow_lines, monkeypatch):
    """A single GET answered from the cache is written whole; when it fills
    the send buffer past the limit, the client goes."""
    # what sending.buffered reads from a real transport
    monkeypatch.setattr(resp_server, "buffered", lambda transport: transport.unread)
    door = Door({b"k": b"v" * 200_000}, max_client_buffer=100_000)
    proto, transport = door.connect(ReadingTransport())
    proto.dataReceived(encode(b"GET", b"k"))
    assert transport.disconnected
    assert len(overflow_lines) == 1


def test_an_unfinished_request_past_max_client_buffer_disconnects(overflow_lines):
    door = Door(max_client_buffer=1_000_000)
    proto, transport = door.connect()
    proto.dataReceived(b"*2\r\n$4\r\nECHO\r\n$2000000\r\n")
    for _ in range(15):
        proto.dataReceived(b"a" * 65536)
    assert not transport.disconnected
    proto.dataReceived(b"a" * 65536)
    assert transport.disconnected and transport.value() == b""


def test_below_max_client_buffer_a_slow_reader_is_kept():
    door = Door({b"k": VALUE_4K}, max_client_buffer=1_000_000)
    proto, transport = door.connect(ReadingTransport())
    for _ in range(20):
        proto.dataReceived((encode(b"GET", b"k") + b"PING\r\n") * 100)
    assert not transport.disconnected
    expected = (bulk(VALUE_4K) + b"+PONG\r\n") * 2000
    assert read_all(transport, len(expected)) == expected


def test_overflow_log_lines_are_rate_limited(overflow_lines):
    door = Door({b"k": VALUE_4K}, max_client_buffer=100_000)
    for _ in range(5):
        proto, _ = door.connect()
        proto.dataReceived(encode(b"MGET", *[b"k"] * 100))
    assert len(overflow_lines) == 1
    door.clock.advance(OVERFLOW_LOG_INTERVAL)
    proto, _ = door.connect()
    proto.dataReceived(encode(b"MGET", *[b"k"] * 100))
    assert len(overflow_lines) == 2
    assert overflow_lines[1]["suppressed"] == 4


# -- timeouts (SPEC §9) ----------------------------------------------------------------


def test_a_request_unfinished_within_request_timeout_closes_the_connection():
    door = Door(request_timeout=10.0)
    proto, transport = door.connect()
    proto.dataReceived(b"PING\r\n*2\r\n$3\r\nGET\r\n")
    door.clock.advance(9.9)
    assert not transport.disconnected
    door.clock.advance(0.1)
    assert transport.disconnected
    assert transport.value() == b"+PONG\r\n"


def test_trickling_a_request_does_not_restart_its_timeout():
    """Slow loris: a byte a second never completes a request in time."""
    door = Door(request_timeout=10.0)
    proto, transport = door.connect()
    for byte in encode(b"GET", b"a-long-key-name"):
        proto.dataReceived(bytes([byte]))
        door.clock.advance(1.0)
        if transport.disconnected:
            break
    assert transport.disconnected
    assert door.clock.seconds() == 10.0


def test_requests_each_completed_in_time_keep_the_connection():
    door = Door(request_timeout=10.0)
    proto, transport = door.connect()
    request = encode(b"ECHO", b"hello")
    for _ in range(5):
        proto.dataReceived(request[:5])
        door.clock.advance(9.0)
        proto.dataReceived(request[5:])
        door.clock.advance(9.0)
    assert not transport.disconnected
    assert transport.value() == bulk(b"hello") * 5


def test_timeouts_cost_no_timer_per_packet():
    """No timer while nothing is unfinished; one, never moved, while a
    request arrives in pieces."""
    door = Door(request_timeout=10.0)
    proto, transport = door.connect()
    proto.dataReceived(encode(b"GET", b"k") * 3)
    proto.dataReceived(b"PING\r\n")
    assert door.clock.getDelayedCalls() == []
    request = encode(b"ECHO", b"x" * 100)
    proto.dataReceived(request[:10])
    [timer] = door.clock.getDelayedCalls()
    for i in range(10, len(request) - 1):
        proto.dataReceived(request[i:i + 1])
        assert door.clock.getDelayedCalls() == [timer] and timer.getTime() == 10.0
    proto.dataReceived(request[-1:])
    door.clock.advance(10.0)  # fires once, finds nothing unfinished, stays off
    assert door.clock.getDelayedCalls() == [] and not transport.disconnected


def test_the_request_timeout_does_not_run_while_we_do_not_read():
    """Reading paused because the client is not reading its replies: time
    the rest of its request spends in the socket is not held against it."""
    door = Door(request_timeout=10.0)
    proto, transport = door.connect()
    proto.dataReceived(b"*2\r\n$4\r\nECHO\r\n")
    door.clock.advance(5.0)
    proto.pauseProducing()
    door.clock.advance(60.0)
    assert not transport.disconnected
    proto.resumeProducing()
    door.clock.advance(9.9)
    assert not transport.disconnected
    door.clock.advance(0.1)
    assert transport.disconnected


def test_request_timeout_zero_never_closes():
    door = Door(request_timeout=0.0)
    proto, transport = door.connect()
    proto.dataReceived(b"*2\r\n")
    assert door.clock.getDelayedCalls() == []


def idle_until_closed(door: Door, transport) -> float:
    """Let the clock run in small steps, as a reactor's does, until the
    connection is closed; how long that took."""
    start = door.clock.seconds()
    for _ in range(1000):
        if transport.disconnected:
            return door.clock.seconds() - start
        door.clock.advance(0.125)
    raise AssertionError("never closed")


def test_client_timeout_closes_an_idle_connection():
    """Within an eighth of client_timeout after it (Redis: within a second)."""
    door = Door(client_timeout=8.0)
    proto, transport = door.connect()
    assert 8.0 <= idle_until_closed(door, transport) <= 8.0 * (1 + 1 / IDLE_CHECKS)


def test_client_timeout_counts_from_the_last_input():
    door = Door(client_timeout=8.0)
    proto, transport = door.connect()
    for _ in range(6):
        door.clock.advance(5.0)
        proto.dataReceived(b"PING\r\n")
    assert not transport.disconnected
    assert 8.0 <= idle_until_closed(door, transport) <= 8.0 * (1 + 1 / IDLE_CHECKS)


def test_requests_are_answered_as_usual_with_client_timeout_set():
    door = Door({b"k": b"v"}, client_timeout=8.0)
    proto, transport = door.connect()
    for _ in range(20):
        proto.dataReceived(encode(b"GET", b"k") * 3)
        proto.dataReceived(encode(b"GET", b"k"))
        door.clock.advance(0.5)
    assert transport.value() == b"$1\r\nv\r\n" * 80
    assert not transport.disconnected


def test_a_client_waiting_for_its_reply_is_not_idle(door):
    door = Door(client_timeout=8.0)
    door.redis.later.add(b"slow")
    proto, transport = door.connect()
    proto.dataReceived(encode(b"GET", b"slow"))
    door.clock.advance(30.0)
    assert not transport.disconnected
    door.redis.answer(b"slow", b"v")
    assert 8.0 <= idle_until_closed(door, transport) <= 8.0 * (1 + 1 / IDLE_CHECKS)


def test_client_timeout_zero_keeps_idle_connections(door):
    proto, transport = door.connect()
    assert door.clock.getDelayedCalls() == []


@functools.cache
def _self_signed_pem() -> bytes:
    """A throwaway key and self-signed certificate for "localhost", as PEM."""
    import datetime

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder().subject_name(name).issuer_name(name)
        .public_key(key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost")]), False)
        .sign(key, hashes.SHA256())
    )
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    ) + cert.public_bytes(serialization.Encoding.PEM)


def _tls_cert():
    pytest.importorskip("OpenSSL")
    from twisted.internet import ssl

    return ssl, ssl.PrivateCertificate.loadPEM(_self_signed_pem())


def test_a_tls_handshake_not_completed_within_request_timeout_closes():
    """Our connectionMade comes before the handshake; a client that starts
    one and stalls sends nothing the parser ever sees."""
    from twisted.protocols.tls import TLSMemoryBIOFactory

    _, cert = _tls_cert()
    door = Door(request_timeout=10.0)
    tls = TLSMemoryBIOFactory(cert.options(), False, door.factory, door.clock)
    proto = tls.buildProtocol(PEER)
    transport = StringTransport()
    transport.setTcpNoDelay = lambda enabled: None
    proto.makeConnection(transport)
    proto.dataReceived(b"\x16\x03\x01\x02\x00")  # the start of a ClientHello
    door.clock.advance(9.9)
    assert not transport.disconnecting
    door.clock.advance(0.1)
    assert transport.disconnected


def test_a_completed_tls_handshake_stops_its_timeout():
    from twisted.protocols.tls import TLSMemoryBIOFactory
    from twisted.test import iosim

    ssl, cert = _tls_cert()
    door = Door(request_timeout=10.0)
    server = TLSMemoryBIOFactory(cert.options(), False, door.factory, door.clock)
    client = TLSMemoryBIOFactory(
        ssl.optionsForClientTLS("localhost", trustRoot=cert), True,
        protocol.Factory.forProtocol(_Client), door.clock,
    )
    client_side, server_side, pump = iosim.connectedServerAndClient(
        lambda: server.buildProtocol(PEER), lambda: client.buildProtocol(PEER),
        clock=door.clock,
    )
    door.clock.advance(60.0)
    client_side.write(b"PING\r\n")
    pump.flush()
    assert client_side.wrappedProtocol.data == b"+PONG\r\n"
    assert not server_side.transport.disconnecting


def test_a_connection_keeps_few_attributes(door):
    """Past 29 instance attributes CPython 3.11 drops the shared-key dict of
    the class, and every attribute access on the hot path gets slower
    (bench/NOTES-perf.md): state of the slow paths goes in ``_w``."""
    proto, _ = door.connect()
    assert len(vars(proto)) < 30, sorted(vars(proto))


def test_a_connection_closing_after_quit_that_is_never_read_is_dropped_when_idle():
    """QUIT closes once the replies are written: a client that never reads
    them would keep the socket forever without client_timeout."""
    door = Door({b"k": VALUE_4K}, client_timeout=8.0)
    proto, transport = door.connect(ReadingTransport())
    proto.dataReceived(encode(b"GET", b"k") * 30 + b"QUIT\r\n")  # under the high-water mark
    assert transport.disconnecting and not transport.disconnected, "closing, not yet closed"
    assert 8.0 <= idle_until_closed(door, transport) <= 8.0 * (1 + 1 / IDLE_CHECKS)
