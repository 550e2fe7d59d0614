"""Backing on task.Clock over in-memory connections: timeouts, stalls, probes (SPEC §9).

Every call has its own outcome (its reply, or its own timeout redis_timeout
after it was sent); a timeout never drops the connection nor fails other
calls; after one, calls fail fast until the backing answers a probe PING.
"""

from __future__ import annotations

import pytest
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.error import ConnectionAborted, ConnectionDone, ConnectionRefusedError
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.logger import globalLogPublisher
from twisted.python.failure import Failure

from redisp.backing.connection import (
    PROBE_INTERVAL,
    Backing,
    BackingInternalError,
    BackingReplyError,
    BackingTimeout,
    BackingUnavailable,
)
from redisp.config import parse_redis_url
from redisp.metrics import Metrics

TIMEOUT = 2.0
RETRY_AT_MOST = 0.6  # backing.RETRY_POLICY: 0.5 s plus up to 0.1 s of jitter
PING = b"*1\r\n$4\r\nPING\r\n"
PONG = b"+PONG\r\n"


def command(*args: bytes) -> bytes:
    return b"*%d\r\n" % len(args) + b"".join(b"$%d\r\n%s\r\n" % (len(a), a) for a in args)


def bulk(value: bytes) -> bytes:
    return b"$%d\r\n%s\r\n" % (len(value), value)


class FakeTransport(StringTransport):
    """A connection whose close is delivered on the next turn, as a reactor does."""

    def __init__(self, clock: Clock) -> None:
        super().__init__()
        self.clock = clock
        self.protocol = None
        self.closed = False

    def abortConnection(self) -> None:
        if not self.closed:
            self.closed = True
            self.clock.callLater(0, self.protocol.connectionLost, Failure(ConnectionAborted()))

    loseConnection = abortConnection

    def lose(self, why=ConnectionDone) -> None:
        """The peer closed it."""
        self.closed = True
        self.protocol.connectionLost(Failure(why()))

    def reply(self, data: bytes) -> None:
        self.protocol.dataReceived(data)

    def sent(self) -> bytes:
        data = self.value()
        self.clear()
        return data


class FakeEndpoint:
    """Each connect is one FakeTransport, connected at once (or refused)."""

    def __init__(self, clock: Clock) -> None:
        self.clock = clock
        self.transports: list[FakeTransport] = []
        self.refuse = False

    def connect(self, factory):
        if self.refuse:
            return fail(ConnectionRefusedError("Connection refused"))
        protocol = factory.buildProtocol(None)
        transport = FakeTransport(self.clock)
        transport.protocol = protocol
        protocol.makeConnection(transport)
        self.transports.append(transport)
        return succeed(protocol)

    @property
    def last(self) -> FakeTransport:
        return self.transports[-1]


def make(url="redis://127.0.0.1:6379/0", timeout=TIMEOUT):
    clock = Clock()
    metrics = Metrics(started=0)
    endpoint = FakeEndpoint(clock)
    backing = Backing(parse_redis_url(url), timeout, clock, metrics, endpoint=endpoint)
    return backing, endpoint, clock, metrics


def up(url="redis://127.0.0.1:6379/0"):
    """A started Backing whose first connection answered its setup PING."""
    backing, endpoint, clock, metrics = make(url)
    backing.start()
    assert endpoint.last.sent() == PING
    endpoint.last.reply(PONG)
    assert backing.up and backing.state == "up"
    return backing, endpoint, clock, metrics


_outcomes: dict[int, tuple[Deferred, list]] = {}  # the Deferred too: its id stays its own


def outcome(d: Deferred):
    """What ``d`` fired with (a value or a Failure), or None while it has not."""
    if id(d) not in _outcomes:
        _outcomes[id(d)] = (d, [])
        d.addBoth(_outcomes[id(d)][1].append)
    got = _outcomes[id(d)][1]
    return got[0] if got else None


@pytest.fixture
def logged():
    events: list[dict] = []
    globalLogPublisher.addObserver(events.append)
    yield events
    globalLogPublisher.removeObserver(events.append)


def texts(events):
    from twisted.logger import formatEvent

    return [formatEvent(e) for e in events if e.get("log_namespace") == "redisp.backing.connection"]


# -- connection setup -------------------------------------------------------------------


def test_a_new_connection_is_used_only_once_it_answers_ping():
    backing, endpoint, clock, _ = make("redis://:pw@127.0.0.1:6379/3")
    backing.start()
    assert endpoint.last.sent() == command(b"AUTH", b"pw")
    assert not backing.up
    endpoint.last.reply(b"+OK\r\n")
    assert endpoint.last.sent() == command(b"SELECT", b"3")
    endpoint.last.reply(b"+OK\r\n")
    assert endpoint.last.sent() == PING
    assert not backing.up
    endpoint.last.reply(PONG)
    assert backing.up


def test_calls_made_before_the_connection_is_ready_wait_for_it():
    backing, endpoint, clock, _ = make()
    backing.start()
    endpoint.last.sent()
    d = backing.call(b"GET", b"k")
    assert outcome(d) is None and endpoint.last.value() == b""
    endpoint.last.reply(PONG)
    assert endpoint.last.sent() == command(b"GET", b"k")
    endpoint.last.reply(bulk(b"v"))
    assert outcome(d) == b"v"


@pytest.mark.parametrize("answer", [b"-NOAUTH Authentication required.\r\n",
                                    b"-WRONGPASS invalid username-password pair\r\n"])
def test_a_backing_that_refuses_us_is_not_up_and_each_refused_connection_is_closed(answer):
    backing, endpoint, clock, metrics = make()
    backing.start()
    endpoint.last.reply(answer)
    assert not backing.up and backing.state == "down"
    assert endpoint.last.closed, "a rejected connection is closed, not left open"
    error = outcome(backing.call(b"GET", b"k")).value
    assert isinstance(error, BackingUnavailable)
    assert answer[1:9].decode() in str(error)
    assert metrics.backing_errors == {"unavailable": 1}
    clock.advance(0)  # the close arrives: ClientService must not hear of it (no exception)
    clock.advance(RETRY_AT_MOST)
    assert len(endpoint.transports) == 2, "and retried"
    endpoint.last.reply(answer)
    clock.advance(0)
    assert all(t.closed for t in endpoint.transports)


def test_a_new_connection_that_does_not_answer_ping_is_given_up_as_a_timeout(logged):
    backing, endpoint, clock, metrics = make()
    backing.start()
    clock.advance(TIMEOUT)
    assert any("did not answer PING within 2s" in line for line in texts(logged))
    assert endpoint.last.closed and not backing.up
    assert backing.state == "stalled"
    error = outcome(backing.call(b"GET", b"k")).value
    assert isinstance(error, BackingTimeout)
    assert metrics.backing_errors == {"timeout": 1}


def test_a_refused_connect_fails_fast_as_unavailable():
    backing, endpoint, clock, metrics = make()
    endpoint.refuse = True
    backing.start()
    error = outcome(backing.call(b"GET", b"k")).value
    assert isinstance(error, BackingUnavailable) and "refused" in str(error)
    endpoint.refuse = False
    clock.advance(RETRY_AT_MOST)
    endpoint.last.sent()
    endpoint.last.reply(PONG)
    assert backing.up


# -- each call its own outcome ------------------------------------------------------------


def test_a_timed_out_call_fails_alone_and_its_late_reply_is_discarded():
    backing, endpoint, clock, metrics = up()
    conn = endpoint.last
    a = backing.call(b"GET", b"a")
    clock.advance(1.0)
    b = backing.call(b"GET", b"b")
    clock.advance(1.0)  # a's own timeout; b has one more second
    assert isinstance(outcome(a).value, BackingTimeout)
    assert "timed out after 2s" in str(outcome(a).value)
    assert outcome(b) is None, "another call in flight is not failed by a's timeout"
    assert not conn.closed, "the connection is kept"
    assert conn.sent() == command(b"GET", b"a") + command(b"GET", b"b") + PING
    conn.reply(bulk(b"1") + bulk(b"2"))  # a's late reply, then b's
    assert outcome(b) == b"2", "b gets its own reply, not a's"
    conn.reply(PONG)  # the probe
    assert backing.up
    c = backing.call(b"GET", b"c")
    conn.reply(bulk(b"3"))
    assert outcome(c) == b"3"
    assert metrics.backing_errors == {"timeout": 1}


def test_each_call_in_flight_times_out_on_its_own_clock():
    backing, endpoint, clock, metrics = up()
    a = backing.call(b"GET", b"a")
    clock.advance(1.5)
    b = backing.call(b"GET", b"b")
    clock.advance(0.5)
    assert isinstance(outcome(a).value, BackingTimeout)
    clock.advance(1.4)
    assert outcome(b) is None
    clock.advance(0.1)
    assert isinstance(outcome(b).value, BackingTimeout)
    assert metrics.backing_errors == {"timeout": 2}


def test_after_a_timeout_calls_fail_fast_until_the_probe_answers(logged):
    backing, endpoint, clock, metrics = up()
    conn = endpoint.last
    backing.call(b"GET", b"a")
    clock.advance(TIMEOUT)
    assert backing.state == "stalled" and not backing.up
    conn.sent()
    for _ in range(3):
        error = outcome(backing.call(b"GET", b"x")).value
        assert isinstance(error, BackingTimeout) and "timed out" in str(error)
    assert conn.value() == b"", "nothing more is sent to a backing that does not answer"
    assert metrics.backing_errors == {"timeout": 4}
    conn.reply(bulk(b"late") + PONG)
    assert backing.up and backing.state == "up"
    lines = texts(logged)
    assert sum("did not answer" in line for line in lines) == 1
    assert sum("answers again" in line for line in lines) == 1


def test_a_probe_answered_with_an_error_is_repeated():
    backing, endpoint, clock, _ = up()
    conn = endpoint.last
    backing.call(b"GET", b"a")
    clock.advance(TIMEOUT)
    conn.reply(bulk(b"late"))
    conn.sent()
    conn.reply(b"-LOADING Redis is loading the dataset in memory\r\n")
    assert not backing.up
    clock.advance(PROBE_INTERVAL)
    assert conn.sent() == PING
    conn.reply(PONG)
    assert backing.up


def test_a_probe_unanswered_for_a_whole_timeout_gives_the_connection_up():
    backing, endpoint, clock, metrics = up()
    first = endpoint.last
    a = backing.call(b"GET", b"a")
    clock.advance(1.0)
    b = backing.call(b"GET", b"b")
    clock.advance(1.0)  # a times out: probe sent
    clock.advance(1.0)  # b times out on its own
    assert isinstance(outcome(b).value, BackingTimeout)
    assert not first.closed
    clock.advance(1.0)  # the probe's own timeout
    assert first.closed
    clock.advance(0)
    assert isinstance(outcome(a).value, BackingTimeout)
    error = outcome(backing.call(b"GET", b"x")).value
    assert isinstance(error, BackingTimeout), "still the timeout error while reconnecting"
    clock.advance(RETRY_AT_MOST)
    second = endpoint.last
    assert second is not first and second.sent() == PING
    assert isinstance(outcome(backing.call(b"GET", b"x")).value, BackingTimeout)
    second.reply(PONG)
    assert backing.up
    assert "unavailable" not in metrics.backing_errors


def test_calls_in_flight_when_the_probe_gives_up_are_timeouts_not_unavailable():
    """A call sent in the same instant as the one that timed out has the probe's
    deadline; whichever fires first, that call reports a timeout."""
    backing, endpoint, clock, metrics = up()
    a = backing.call(b"GET", b"a")
    b = backing.call(b"GET", b"b")
    clock.advance(TIMEOUT)
    clock.advance(TIMEOUT)
    clock.advance(0)
    assert isinstance(outcome(a).value, BackingTimeout)
    assert isinstance(outcome(b).value, BackingTimeout)
    assert "unavailable" not in metrics.backing_errors


def test_a_connection_really_lost_is_unavailable_for_the_calls_on_it():
    backing, endpoint, clock, metrics = up()
    a = backing.call(b"GET", b"a")
    endpoint.last.lose()
    error = outcome(a).value
    assert isinstance(error, BackingUnavailable) and "Lost connection" in str(error)
    assert not backing.up
    waiting = backing.call(b"GET", b"b")  # waits for the connection being made again
    assert outcome(waiting) is None
    clock.advance(RETRY_AT_MOST)
    endpoint.last.sent()
    endpoint.last.reply(PONG)
    assert endpoint.last.sent() == command(b"GET", b"b")
    endpoint.last.reply(bulk(b"2"))
    assert outcome(waiting) == b"2"


def test_a_lost_connection_while_stalled_waits_for_the_next_one():
    backing, endpoint, clock, metrics = up()
    backing.call(b"GET", b"a")
    clock.advance(TIMEOUT)
    endpoint.last.lose()
    assert backing.state == "down"
    endpoint.refuse = True
    clock.advance(RETRY_AT_MOST)
    error = outcome(backing.call(b"GET", b"b")).value
    assert isinstance(error, BackingUnavailable) and "refused" in str(error)


def test_redis_error_replies_are_reply_errors_and_keep_the_backing_up():
    backing, endpoint, clock, metrics = up()
    d = backing.call(b"GET", b"list")
    endpoint.last.reply(b"-WRONGTYPE Operation against a key holding the wrong kind of value\r\n")
    assert isinstance(outcome(d).value, BackingReplyError)
    assert backing.up and metrics.backing_errors == {"reply": 1}


# -- faults of our own --------------------------------------------------------------------


def test_running_out_of_memory_building_a_command_is_an_internal_error_logged_once(logged):
    backing, endpoint, clock, metrics = up()
    protocol = backing._protocol

    def no_memory(*args, **kwargs):
        raise MemoryError()

    protocol._build_command = no_memory
    error = outcome(backing.call(b"MGET", b"a", b"b")).value
    assert isinstance(error, BackingInternalError)
    assert "internal error" in str(error) and "MemoryError" in str(error)
    assert "unavailable" not in str(error)
    assert metrics.backing_errors == {"internal": 1}
    failures = [e for e in logged if e.get("log_namespace") == "redisp.backing.connection"
                and "log_failure" in e]
    assert len(failures) == 1 and failures[0]["log_failure"].check(MemoryError)
    assert not endpoint.last.closed, "nothing was written: the connection is fine"
    del protocol._build_command
    d = backing.call(b"GET", b"k")
    endpoint.last.sent()
    endpoint.last.reply(bulk(b"v"))
    assert outcome(d) == b"v"


def test_running_out_of_memory_while_writing_drops_the_connection(logged):
    backing, endpoint, clock, metrics = up()
    conn = endpoint.last
    other = backing.call(b"GET", b"a")

    def no_memory(data):
        raise MemoryError()

    conn.write = no_memory
    error = outcome(backing.call(b"GET", b"b")).value
    assert isinstance(error, BackingInternalError)
    assert conn.closed, "the byte stream is in an unknown state"
    clock.advance(0)
    assert isinstance(outcome(other).value, BackingUnavailable)
    assert len([e for e in logged if "log_failure" in e]) == 1


def test_a_stalled_backing_reports_down_in_the_metrics():
    backing, endpoint, clock, metrics = up()
    metrics.backing_up = lambda: backing.up
    backing.call(b"GET", b"a")
    clock.advance(TIMEOUT)
    assert b"redisp_backing_up 0.0" in metrics.exposition()
    assert b'redisp_backing_errors_total{kind="timeout"} 1.0' in metrics.exposition()


def test_a_call_waiting_for_a_connection_that_never_comes_is_a_timeout():
    """A connection attempt that hangs (a TLS handshake nobody answers, a
    SYN dropped on the way): the call waiting for it times out, and says
    so; it is not "unavailable (not connected)"."""
    backing, endpoint, clock, metrics = make()
    endpoint.connect = lambda factory: Deferred()
    backing.start()
    d = backing.call(b"GET", b"k")
    clock.advance(TIMEOUT)
    error = outcome(d).value
    assert isinstance(error, BackingTimeout), error
    assert str(error) == "backing redis timed out after 2s"
