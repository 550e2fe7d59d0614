"""The forwarder's routing, one layer at a time: a fake pool, a real gate
on a task.Clock, the command table from a recorded ``COMMAND`` reply.

What the end-to-end tests (test_forwarding.py) can only hit by luck of
timing -- a command waiting at the gate while its pin's state ends, a pin
racing a pool connection, a GETKEYS answer coming late -- is made to
happen here in a fixed order.
"""

from __future__ import annotations

from collections import deque
from dataclasses import replace

from twisted.internet.defer import succeed
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport

from redisp.backing.connection import BackingUnavailable
from redisp.backing.relay import RelayProtocol
from redisp.commands.session import Session
from redisp.config import Config
from redisp.core.gate import Gate
from redisp.metrics import Metrics
from redisp.protocol.codec import RESP3
from redisp.protocol.frames import decode
from redisp.routing.command_table import CommandTable
from redisp.routing.forwarding import MAX_CLIENTS_ERROR, Forwarder
from tests.raw_redis import COMMAND_REPLY_FILE, encode

TABLE = CommandTable.from_command_reply(decode(COMMAND_REPLY_FILE.read_bytes()))


class FakeConnection:
    """A pinned connection: what was sent, in order; replies given by the test."""

    def __init__(self, on_push, on_lost) -> None:
        self.wire: list[bytes] = []
        self.waiting: deque = deque()
        self.closed = False
        self.subscribed = False
        self.monitoring = False
        self.lost = False
        self.on_lost = on_lost

    def call(self, request, done, timeout=None, confirms=None, expect=1) -> None:
        self.wire.append(request)
        self.waiting.append(done)

    def send(self, request) -> None:
        self.wire.append(request)

    def close(self) -> None:
        self.closed = True

    def reply(self, frame: bytes) -> None:
        self.waiting.popleft()(frame)


class FakePool:
    def __init__(self) -> None:
        self.wire: list[bytes] = []
        self.waiting: deque = deque()
        self.pins: list[FakeConnection] = []
        self.protocols: list[int] = []

    def lane(self) -> int:
        return 0

    def call(self, lane, request, done, resp3=False, timeout=None) -> None:
        self.wire.append(request)
        self.waiting.append(done)
        self.protocols.append(3 if resp3 else 2)

    def pinned(self, resp3=False, db=None, on_push=None, on_lost=None) -> FakeConnection:
        pin = FakeConnection(on_push, on_lost)
        self.pins.append(pin)
        return pin

    def reply(self, frame: bytes) -> None:
        self.waiting.popleft()(frame)

    def stop(self):
        return succeed(None)


class FakeReader:
    def __init__(self) -> None:
        self.invalidated: list = []

    def invalidate(self, key: bytes) -> None:
        self.invalidated.append(key)

    def invalidate_all(self) -> int:
        self.invalidated.append("ALL")
        return 0


class Setup:
    def __init__(self, concurrency: int = 1, table: CommandTable | None = TABLE, **config):
        self.clock = Clock()
        self.config = replace(Config(), concurrency=concurrency, **config)
        self.metrics = Metrics(0.0)
        self.gate = Gate(concurrency, self.clock)
        self.reader = FakeReader()
        self.pool = FakePool()
        self.forwarder = Forwarder(self.config, self.clock, self.reader, self.gate,
                                   self.metrics, pool=self.pool)
        self.forwarder.table = table
        self.results: list = []

    def session(self) -> Session:
        s = Session(1, self.reader, self.metrics, self.config, self.clock)
        s.forwarder = self.forwarder
        return s

    def forward(self, session: Session, *argv: str) -> list:
        """Forward ``argv``; the list its (reply, outcome) lands in."""
        got: list = []
        self.forwarder.forward(session, [a.encode() for a in argv]).when(got.append)
        return got

    def turn(self) -> None:
        self.clock.advance(0)  # the gate hands tokens over on the next turn

    def hold_gate(self) -> None:
        """Another client's request holds the only token until ``free_gate``."""
        self.gate.enter(lambda: None)

    def free_gate(self) -> None:
        self.gate.leave()
        self.turn()


def test_a_pin_stays_while_a_command_routed_to_it_waits_at_the_gate():
    """WATCH, UNWATCH, GET pipelined under concurrency 1: the GET waits at
    the gate while UNWATCH ends the state; it must still go to the pin
    (not to a connection just closed), and the pin goes after it."""
    t = Setup()
    s = t.session()
    watch = t.forward(s, "WATCH", "k")
    unwatch = t.forward(s, "UNWATCH")
    get = t.forward(s, "GET", "k")
    [pin] = t.pool.pins
    assert pin.wire == [encode("WATCH", "k")]
    pin.reply(b"+OK\r\n")
    t.turn()
    assert pin.wire[1:] == [encode("UNWATCH")]
    pin.reply(b"+OK\r\n")
    assert not pin.closed and s.pin is not None
    t.turn()
    assert pin.wire[2:] == [encode("GET", "k")]
    pin.reply(b"$1\r\nv\r\n")
    assert pin.closed and s.pin is None
    assert [watch[0][0], unwatch[0][0], get[0][0]] == [b"+OK\r\n", b"+OK\r\n", b"$1\r\nv\r\n"]
    assert t.metrics.pinned_clients == 0


def test_a_pinned_send_waits_for_the_clients_commands_on_the_pool():
    t = Setup(concurrency=64)
    s = t.session()
    t.forward(s, "SET", "k", "1")
    assert t.pool.wire == [encode("SET", "k", "1")]
    watch = t.forward(s, "WATCH", "k")
    [pin] = t.pool.pins
    assert pin.wire == []  # parked: the SET must run first
    t.pool.reply(b"+OK\r\n")
    assert pin.wire == [encode("WATCH", "k")]
    pin.reply(b"+OK\r\n")
    assert watch[0][0] == b"+OK\r\n"


def test_a_get_behind_a_write_waiting_for_the_table_is_not_served_from_the_cache():
    t = Setup(table=None)
    s = t.session()
    assert s.plain
    t.forward(s, "SET", "k", "1")
    assert not s.plain  # a GET now follows the SET to the backing
    assert t.pool.wire == [encode("COMMAND")]
    t.pool.reply(COMMAND_REPLY_FILE.read_bytes())
    assert t.pool.wire[1:] == [encode("SET", "k", "1")]
    t.pool.reply(b"+OK\r\n")
    assert t.reader.invalidated == [b"k"]
    assert s.plain


def test_movable_key_writes_go_at_once_and_answer_after_their_keys():
    t = Setup(concurrency=64)
    s = t.session()
    sort = t.forward(s, "SORT", "l", "STORE", "dst")
    get = t.forward(s, "GET", "dst")
    assert t.pool.wire == [encode("COMMAND", "GETKEYSANDFLAGS", "SORT", "l", "STORE", "dst"),
                           encode("SORT", "l", "STORE", "dst"), encode("GET", "dst")]
    getkeys, sort_done, get_done = t.pool.waiting
    sort_done(b":3\r\n")  # the SORT's reply first: it waits for the keys
    assert sort == [] and t.reader.invalidated == []
    getkeys(b"*2\r\n*2\r\n$1\r\nl\r\n*2\r\n+RO\r\n+access\r\n"
            b"*2\r\n$3\r\ndst\r\n*2\r\n+OW\r\n+update\r\n")
    assert t.reader.invalidated == [b"dst"]
    assert sort[0][0] == b":3\r\n"
    get_done(b"*3\r\n$1\r\n1\r\n$1\r\n2\r\n$1\r\n3\r\n")
    assert get[0][0].startswith(b"*3")


def test_a_movable_key_write_whose_keys_cannot_be_asked_flushes():
    t = Setup(concurrency=64)
    s = t.session()
    sort = t.forward(s, "SORT", "l", "STORE", "dst")
    getkeys, sort_done = t.pool.waiting
    getkeys(BackingUnavailable("backing redis unavailable (x)"))
    sort_done(b":3\r\n")
    assert t.reader.invalidated == ["ALL"] and sort[0][0] == b":3\r\n"


def test_a_reply_is_in_the_protocol_of_when_the_command_was_sent():
    """HGETALL waits at the gate, then the client's HELLO 3 runs (at once,
    locally): the HGETALL is still a RESP2 request, answered as an array."""
    t = Setup()
    s = t.session()
    t.hold_gate()
    t.forward(s, "HGETALL", "h")
    s.encoder = RESP3
    t.forward(s, "HGETALL", "h")
    t.free_gate()
    assert t.pool.protocols == [2]
    t.pool.reply(b"*0\r\n")
    t.turn()
    assert t.pool.protocols == [2, 3]


def test_a_blocking_command_does_not_wait_at_the_gate():
    t = Setup()
    s = t.session()
    t.hold_gate()
    t.forward(s, "BLPOP", "q", "0")
    [pin] = t.pool.pins
    assert pin.wire == [encode("BLPOP", "q", "0")]
    get = t.forward(s, "GET", "k")  # behind the BLPOP on its connection: no token either
    assert pin.wire[1:] == [encode("GET", "k")]
    pin.reply(b"*2\r\n$1\r\nq\r\n$1\r\nx\r\n")
    pin.reply(b"$-1\r\n")
    assert get[0][0] == b"$-1\r\n" and pin.closed


def test_xread_pins_only_with_block():
    t = Setup(concurrency=64)
    s = t.session()
    t.forward(s, "XREAD", "COUNT", "1", "STREAMS", "x", "0")
    assert t.pool.pins == [] and len(t.pool.wire) == 1
    t.pool.reply(b"*-1\r\n")
    t.forward(s, "XREAD", "BLOCK", "0", "STREAMS", "x", "$")
    assert len(t.pool.pins) == 1 and t.pool.pins[0].wire


def test_work_of_a_client_that_left_is_dropped_at_the_gate():
    t = Setup()
    s = t.session()
    t.hold_gate()
    got = t.forward(s, "SET", "k", "v")
    t.forwarder.release(s)
    t.free_gate()
    assert t.pool.wire == [] and got == [(b"", "other")]
    assert not t.gate.waiting


def test_a_client_that_left_while_the_table_was_read_gets_no_pin():
    t = Setup(table=None)
    s = t.session()
    got = t.forward(s, "MULTI")
    t.forwarder.release(s)
    t.pool.reply(COMMAND_REPLY_FILE.read_bytes())
    assert t.pool.pins == [] and t.metrics.pinned_clients == 0
    assert got == [(b"", "other")]


def test_a_client_leaving_fails_its_parked_pinned_commands():
    t = Setup(concurrency=64)
    s = t.session()
    t.forward(s, "SET", "k", "1")
    watch = t.forward(s, "WATCH", "k")
    [pin] = t.pool.pins
    t.forwarder.release(s)
    assert pin.closed and t.metrics.pinned_clients == 0
    # the parked WATCH went to the closed connection: a real one fails it at once
    assert pin.wire == [encode("WATCH", "k")]
    pin.reply(b"-ERR closed\r\n")
    assert watch


def test_pinned_connections_take_a_max_clients_slot():
    t = Setup(max_clients=2)
    t.metrics.connected_clients = 1
    a, b = t.session(), t.session()
    t.forward(a, "MULTI")
    assert t.metrics.pinned_clients == 1
    refused = t.forward(b, "WATCH", "k")
    assert refused[0][0] == MAX_CLIENTS_ERROR
    assert b.pin is None and t.metrics.pinned_clients == 1
    assert t.metrics.forwarded["watch", "refused"] == 1
    [pin] = t.pool.pins
    pin.reply(b"+OK\r\n")
    exec_ = t.forward(a, "EXEC")
    t.turn()
    pin.reply(b"*0\r\n")
    assert exec_[0][0] == b"*0\r\n" and t.metrics.pinned_clients == 0
    t.turn()
    t.forward(b, "WATCH", "k")
    assert t.metrics.pinned_clients == 1


def test_a_pin_lost_by_itself_frees_its_slot_once():
    t = Setup()
    s = t.session()
    t.forward(s, "SUBSCRIBE", "c")
    [pin] = t.pool.pins
    pin.lost = True
    pin.on_lost(pin)
    assert s.pin is None and t.metrics.pinned_clients == 0
    t.forwarder.release(s)
    assert t.metrics.pinned_clients == 0


def test_writes_in_another_db_leave_the_cache_but_a_flushall_does_not():
    t = Setup(concurrency=64)
    s = t.session()
    t.forward(s, "SELECT", "1")
    [pin] = t.pool.pins
    pin.reply(b"+OK\r\n")
    t.forward(s, "SET", "k", "v")
    pin.reply(b"+OK\r\n")
    assert t.reader.invalidated == []
    t.forward(s, "FLUSHALL")
    pin.reply(b"+OK\r\n")
    assert t.reader.invalidated == ["ALL"]


def test_exec_applies_the_queued_writes_and_a_nil_exec_none():
    t = Setup(concurrency=64)
    s = t.session()
    for argv, reply in ((["MULTI"], b"+OK\r\n"), (["SET", "a", "1"], b"+QUEUED\r\n"),
                        (["DEL", "b", "c"], b"+QUEUED\r\n")):
        t.forward(s, *argv)
        t.pool.pins[0].reply(reply)
    assert t.reader.invalidated == []
    t.forward(s, "EXEC")
    t.pool.pins[0].reply(b"*2\r\n+OK\r\n:0\r\n")
    assert t.reader.invalidated == [b"a", b"b", b"c"]
    t.reader.invalidated.clear()
    for argv, reply in ((["WATCH", "a"], b"+OK\r\n"), (["MULTI"], b"+OK\r\n"),
                        (["SET", "a", "2"], b"+QUEUED\r\n"), (["EXEC"], b"*-1\r\n")):
        t.forward(s, *argv)
        t.pool.pins[-1].reply(reply)
    assert t.reader.invalidated == []


def test_an_unknown_command_flushes_only_when_redis_knew_it():
    """A typo must not empty the cache; a command added since the table was
    read (MODULE LOAD) may write anything: flush, and read the table again."""
    t = Setup(concurrency=64)
    s = t.session()
    t.forward(s, "FOOBAR", "k")
    t.pool.reply(b"-ERR unknown command 'FOOBAR', with args beginning with: 'k' \r\n")
    assert t.reader.invalidated == []
    assert t.metrics.forwarded["unknown", "error"] == 1
    t.forward(s, "NEWMOD.SET", "k", "v")
    t.pool.reply(b"+OK\r\n")
    assert t.reader.invalidated == ["ALL"]
    assert t.pool.wire[-1] == encode("COMMAND")  # the table is read again


def test_metrics_labels_are_the_tables_names_whatever_the_spelling():
    """``_count`` keeps a label per spelling: the same labels as reading the
    table each time, and a name the table learns later is labelled anew."""
    t = Setup(concurrency=64)
    s = t.session()
    for name in ("SET", "set", "SeT", "SET", "NEWMOD.SET"):
        t.forward(s, name, "k", "v")
        t.pool.reply(b"+OK\r\n")
    assert t.metrics.forwarded["set", "ok"] == 4
    assert t.metrics.forwarded["unknown", "ok"] == 1
    # the table is read again (a module was loaded since): NEWMOD.SET is known now
    recorded = COMMAND_REPLY_FILE.read_bytes()
    header, rest = recorded.split(b"\r\n", 1)
    newmod = (b"*10\r\n$10\r\nnewmod.set\r\n:-3\r\n*1\r\n+write\r\n:1\r\n:1\r\n:1\r\n"
              b"*0\r\n*0\r\n*0\r\n*0\r\n")
    assert t.pool.wire[-1] == encode("COMMAND")
    t.pool.reply(b"*%d\r\n" % (int(header[1:]) + 1) + rest + newmod)
    t.forward(s, "NEWMOD.SET", "k", "v")
    t.pool.reply(b"+OK\r\n")
    assert t.metrics.forwarded["newmod.set", "ok"] == 1


def test_pending_replies_reach_the_one_who_asks_before_or_after_settling():
    t = Setup(concurrency=64)
    s = t.session()
    settled_early = t.forwarder.forward(s, [b"SET"])
    t.pool.reply(b"-ERR wrong number of arguments for 'set' command\r\n")
    got: list = []
    settled_early.when(got.append)  # settled before anyone asked
    late = t.forwarder.forward(s, [b"SET", b"k", b"v"])
    late.when(got.append)
    assert len(got) == 1
    t.pool.reply(b"+OK\r\n")
    assert got == [(b"-ERR wrong number of arguments for 'set' command\r\n", "forwarded"),
                   (b"+OK\r\n", "forwarded")]


# -- relay: subscription confirmations and a close before connecting -----------------------


def relay_with_transport():
    pushes: list[bytes] = []
    relay = RelayProtocol(Clock(), 2.0, on_push=pushes.append)
    transport = StringTransport()
    relay.makeConnection(transport)
    return relay, pushes


def sub(kind: bytes, name: bytes | None, count: int) -> bytes:
    name_frame = b"$-1\r\n" if name is None else b"$%d\r\n%b\r\n" % (len(name), name)
    return b"*3\r\n$%d\r\n%b\r\n%b:%d\r\n" % (len(kind), kind, name_frame, count)


def test_a_subscribe_settles_with_all_its_confirmations():
    relay, pushes = relay_with_transport()
    got: list = []
    relay.call(encode("SUBSCRIBE", "a", "b"), got.append, confirms=b"subscribe", expect=2)
    relay.call(encode("PING"), got.append)
    relay.dataReceived(sub(b"subscribe", b"a", 1) + sub(b"subscribe", b"b", 2)
                       + b"*2\r\n$4\r\npong\r\n$0\r\n\r\n")
    assert got == [sub(b"subscribe", b"a", 1) + sub(b"subscribe", b"b", 2),
                   b"*2\r\n$4\r\npong\r\n$0\r\n\r\n"]
    assert pushes == []


def test_an_unsubscribe_of_everything_expects_one_confirmation_per_channel():
    relay, pushes = relay_with_transport()
    got: list = []
    relay.call(encode("SUBSCRIBE", "a", "b"), got.append, confirms=b"subscribe", expect=2)
    relay.call(encode("PSUBSCRIBE", "p*"), got.append, confirms=b"psubscribe", expect=1)
    relay.call(encode("UNSUBSCRIBE"), got.append, confirms=b"unsubscribe", expect=None)
    relay.call(encode("UNSUBSCRIBE"), got.append, confirms=b"unsubscribe", expect=None)
    relay.dataReceived(sub(b"subscribe", b"a", 1) + sub(b"subscribe", b"b", 2)
                       + sub(b"psubscribe", b"p*", 3)
                       + sub(b"unsubscribe", b"a", 2) + sub(b"unsubscribe", b"b", 1)
                       + sub(b"unsubscribe", None, 1))
    assert got[2] == sub(b"unsubscribe", b"a", 2) + sub(b"unsubscribe", b"b", 1)
    assert got[3] == sub(b"unsubscribe", None, 1)
    assert relay.subscribed and pushes == []


def test_commands_sent_blind_before_connecting_still_go_out_when_closed():
    """CLIENT REPLY OFF then SET, and the pin is let go before it connected:
    Redis must still get them; calls waiting fail at once."""
    relay = RelayProtocol(Clock(), 2.0)
    got: list = []
    relay.send(encode("CLIENT", "REPLY", "OFF"))
    relay.send(encode("SET", "k", "v"))
    relay.call(encode("GET", "k"), got.append)
    relay.close()
    assert isinstance(got[0], BackingUnavailable) and not relay.lost
    relay.call(encode("GET", "k"), got.append)
    assert isinstance(got[1], BackingUnavailable)
    transport = StringTransport()
    relay.makeConnection(transport)
    assert transport.value() == (encode("CLIENT", "REPLY", "OFF") + encode("SET", "k", "v")
                                 + encode("GET", "k"))
    assert transport.disconnecting
