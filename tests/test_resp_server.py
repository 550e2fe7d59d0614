"""The RESP door's connections on in-memory transports: pipelining and reply
order, protocol errors, the client cap, QUIT, flow control, lost clients."""

from __future__ import annotations

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

from redisp.backing import BackingReplyError, BackingUnavailable
from redisp.clients import ClientSlots
from redisp.config import Config
from redisp.metrics import Metrics
from redisp.resp_server import MAX_PENDING, RESUME_PENDING, RespFactory, RespProtocol
from tests.test_commands import FakeReader
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


class TurnEndingReader(FakeReader):
    """Each answer the test gives ends the reactor turn it arrived in, as a
    reply from the backing does: late replies are flushed at a turn's end."""

    def __init__(self, values: dict[bytes, bytes], clock: task.Clock) -> None:
        super().__init__(values)
        self.clock = clock

    def answer(self, key: bytes, value: bytes | None = None, hit: bool = False) -> None:
        super().answer(key, value, hit)
        self.clock.advance(0)

    def fail(self, key: bytes, error: BaseException) -> None:
        super().fail(key, error)
        self.clock.advance(0)


class Door:
    """One factory and its shared parts, and connections made to it."""

    def __init__(
        self, values: dict[bytes, bytes] | None = None, max_clients: int = 100,
        concurrency: int = 1,
    ) -> None:
        self.clock = task.Clock()
        self.metrics = Metrics(started=self.clock.seconds())
        self.slots = ClientSlots(max_clients, self.metrics)
        self.reader = TurnEndingReader(values if values is not None else {b"k": b"v"}, self.clock)
        self.factory = RespFactory(
            self.reader, self.metrics, self.slots, Config(concurrency=concurrency), self.clock
        )

    def connect(self) -> tuple[RespProtocol, RecordingTransport]:
        proto = self.factory.buildProtocol(PEER)
        transport = RecordingTransport()
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
    door.reader.later.add(b"slow")
    proto, transport = door.connect()
    proto.dataReceived(encode(b"GET", b"slow") + encode(b"GET", b"k") + b"PING\r\n")
    assert transport.value() == b""
    door.reader.answer(b"slow", b"late")
    assert transport.writes == [b"$4\r\nlate\r\n$1\r\nv\r\n+PONG\r\n"]


def test_deferred_replies_completing_out_of_order(door):
    door.reader.later.update({b"a", b"b"})
    proto, transport = door.connect()
    proto.dataReceived(encode(b"GET", b"a") + encode(b"GET", b"b"))
    door.reader.answer(b"b", b"B")
    assert transport.value() == b""
    door.reader.answer(b"a", b"A")
    assert transport.value() == b"$1\r\nA\r\n$1\r\nB\r\n"


def test_later_packets_queue_behind_pending_replies(door):
    door.reader.later.add(b"slow")
    proto, transport = door.connect()
    proto.dataReceived(encode(b"GET", b"slow"))
    proto.dataReceived(b"PING\r\n")
    assert transport.value() == b""
    door.reader.answer(b"slow", None)
    assert transport.value() == b"$-1\r\n+PONG\r\n"
    proto.dataReceived(b"PING\r\n")
    assert transport.value() == b"$-1\r\n+PONG\r\n+PONG\r\n"


def test_reply_already_settled_keeps_its_place(door):
    """A Deferred that has fired already (a backing known to be down) is
    written in order, in the same single write as its neighbours."""
    door.reader.failures[b"bad"] = BackingUnavailable("backing redis unavailable (refused)")
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
    door.reader.later.add(b"slow")
    proto, transport = door.connect()
    proto.dataReceived(encode(b"GET", b"slow") + b"HELLO 3\r\n" + encode(b"GET", b"nope"))
    door.reader.answer(b"slow", None)
    data = transport.value()
    assert data.startswith(b"$-1\r\n%7\r\n")
    assert data.endswith(b"_\r\n")


def test_backing_error_keeps_redis_text(door):
    door.reader.later.add(b"list")
    proto, transport = door.connect()
    proto.dataReceived(encode(b"GET", b"list"))
    door.reader.fail(b"list", BackingReplyError("WRONGTYPE Operation against a key holding "
                                                "the wrong kind of value"))
    assert transport.value() == (
        b"-WRONGTYPE Operation against a key holding the wrong kind of value\r\n"
    )
    assert door.outcomes() == {"backing_error": 1}


def test_unexpected_failure_answers_internal_error_and_is_logged(door, logged_failures):
    door.reader.later.add(b"bug")
    proto, transport = door.connect()
    proto.dataReceived(encode(b"GET", b"bug") + b"PING\r\n")
    door.reader.fail(b"bug", RuntimeError("boom"))
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
    door.reader.later.add(b"slow")
    proto, transport = door.connect()
    proto.dataReceived(
        encode(b"GET", b"k") + encode(b"GET", b"nope") + encode(b"GET", b"slow")
        + b"PING\r\nFOO\r\nGET\r\n"
    )
    door.reader.answer(b"slow", b"x", hit=False)
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
    door.reader.later.add(b"slow")
    proto, transport = door.connect()
    proto.dataReceived(encode(b"GET", b"slow") + b"*1\r\n$x\r\n")
    assert transport.value() == b""
    assert not transport.disconnecting
    door.reader.answer(b"slow", b"v")
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
    door.reader.later.add(b"slow")
    proto, transport = door.connect()
    proto.dataReceived(encode(b"GET", b"slow") + b"QUIT\r\n")
    assert not transport.disconnecting
    door.reader.answer(b"slow", b"v")
    assert transport.value() == b"$1\r\nv\r\n+OK\r\n"
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


def test_connection_lost_with_pending_replies(door, logged_failures):
    """Owed replies are dropped quietly: no write to a closed transport, no
    error left in a Deferred, whatever they settle with."""
    door.reader.later.update({b"a", b"b", b"c"})
    proto, transport = door.connect()
    proto.dataReceived(encode(b"GET", b"a") + encode(b"GET", b"b") + encode(b"GET", b"c"))
    waiting = [door.reader.waiting[key][0] for key in (b"a", b"b", b"c")]
    proto.connectionLost()
    door.reader.answer(b"a", b"v")
    door.reader.fail(b"b", BackingUnavailable("backing redis unavailable (x)"))
    door.reader.fail(b"c", RuntimeError("boom"))
    assert transport.writes == []
    assert all(d.called and d.result is None for d in waiting)
    assert [f.type for f in logged_failures] == [RuntimeError]
    assert door.metrics.connected_clients == 0


# -- flow control ---------------------------------------------------------------------


def test_deep_queue_pauses_reading_until_drained(door):
    door.reader.later.add(b"slow")
    proto, transport = door.connect()
    proto.dataReceived(encode(b"GET", b"slow") * MAX_PENDING)
    assert transport.producerState == "producing", "at the limit: still reading"
    proto.dataReceived(encode(b"GET", b"slow"))
    assert transport.producerState == "paused"
    for _ in range(MAX_PENDING + 1 - RESUME_PENDING - 1):
        door.reader.answer(b"slow", b"v")
    assert transport.producerState == "paused"
    door.reader.answer(b"slow", b"v")
    assert transport.producerState == "producing"
    while door.reader.waiting[b"slow"]:
        door.reader.answer(b"slow", b"v")
    assert transport.value() == b"$1\r\nv\r\n" * (MAX_PENDING + 1)


def test_client_not_reading_pauses_reading(door):
    """The transport pauses us when its send buffer is full."""
    proto, transport = door.connect()
    proto.pauseProducing()
    assert transport.producerState == "paused"
    proto.resumeProducing()
    assert transport.producerState == "producing"


def test_both_reasons_to_pause_must_clear(door):
    door.reader.later.add(b"slow")
    proto, transport = door.connect()
    proto.dataReceived(encode(b"GET", b"slow") * (MAX_PENDING + 1))
    proto.pauseProducing()
    while door.reader.waiting[b"slow"]:
        door.reader.answer(b"slow", b"v")
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
    door.reader.values[b"hot"] = b"H"
    door.reader.later.update({b"slow", b"list", b"bug"})
    proto, transport = door.connect()
    keys = [b"slow", b"hot", b"absent", b"list", b"bug", b"hot"]
    proto.dataReceived(b"".join(encode(b"GET", key) for key in keys))
    assert transport.value() == b""
    door.reader.fail(b"bug", RuntimeError("boom"))
    door.reader.fail(b"list", BackingReplyError("WRONGTYPE Operation against a key"))
    assert transport.value() == b"", "every reply waits for the first"
    door.reader.answer(b"slow", b"S")
    assert transport.value() == (
        b"$1\r\nS\r\n$1\r\nH\r\n$-1\r\n-WRONGTYPE Operation against a key\r\n"
        b"-ERR internal error\r\n$1\r\nH\r\n"
    )
    assert door.outcomes() == {"miss": 1, "hit": 2, "absent": 1, "backing_error": 1, "other": 1}
    assert [f.type for f in logged_failures] == [RuntimeError]


def test_a_packet_of_gets_answers_the_same_as_the_general_path(door):
    """``GET k`` alone (the GET-packet path) and ``GET k`` + ``PING`` (general
    dispatch) give the same GET reply, for every kind of answer."""
    door.reader.values[b"hot"] = b"H"
    door.reader.failures[b"down"] = BackingUnavailable("backing redis unavailable (refused)")
    for key in (b"hot", b"absent", b"down"):
        alone, t1 = door.connect()
        alone.dataReceived(encode(b"GET", key))
        mixed, t2 = door.connect()
        mixed.dataReceived(encode(b"GET", key) + b"PING\r\n")
        assert t2.value() == t1.value() + b"+PONG\r\n"


def test_late_replies_of_one_turn_leave_in_one_write_at_its_end(door):
    door.reader.later.update({b"a", b"b"})
    proto, transport = door.connect()
    proto.dataReceived(encode(b"GET", b"a") + encode(b"GET", b"b"))
    FakeReader.answer(door.reader, b"a", b"A")  # both settle within one turn ...
    FakeReader.answer(door.reader, b"b", b"B")
    assert transport.value() == b"", "... and nothing is written before the turn ends"
    door.clock.advance(0)
    assert transport.writes == [b"$1\r\nA\r\n$1\r\nB\r\n"]


def test_a_late_reply_to_a_connection_gone_meanwhile_is_dropped(door):
    door.reader.later.add(b"a")
    proto, transport = door.connect()
    proto.dataReceived(encode(b"GET", b"a"))
    FakeReader.answer(door.reader, b"a", b"A")
    proto.connectionLost(Failure(ConnectionDone()))
    door.clock.advance(0)
    assert transport.value() == b""
