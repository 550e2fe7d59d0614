"""Backing.call_many, which carries one master's misses of a reactor turn
(backing/cluster_fetch.py), on task.Clock over in-memory connections.

The commands leave in one write; the replies come back as one list in
order, an error reply in its place; the timeout, the fail-fast states and
the connection's failures are the batch's as they are a single call's.
"""

from __future__ import annotations

from twisted.internet.defer import Deferred

from redisp.backing.connection import (
    BackingInternalError,
    BackingReplyError,
    BackingTimeout,
    BackingUnavailable,
)
from redisp.backing.relay import encode_command
from tests.test_backing_timeouts import (
    PONG,
    RETRY_AT_MOST,
    TIMEOUT,
    bulk,
    command,
    make,
    outcome,
    up,
)

WRONGTYPE = b"-WRONGTYPE Operation against a key holding the wrong kind of value\r\n"


def gets(*keys: bytes) -> list[bytes]:
    return [encode_command((b"GET", key)) for key in keys]


class Observed:
    """Stands for the backing latency histogram: what was observed."""

    def __init__(self) -> None:
        self.seen: list[float] = []

    def observe(self, value: float) -> None:
        self.seen.append(value)


def test_every_command_leaves_in_one_write_and_the_replies_come_back_in_order():
    backing, endpoint, clock, metrics = up()
    metrics.backing_latency = Observed()
    conn = endpoint.last
    writes: list[bytes] = []
    write = conn.write
    conn.write = lambda data: (writes.append(data), write(data))
    d = backing.call_many([*gets(b"a", b"b"), encode_command((b"MGET", b"c", b"d")),
                           *gets(b"list")])
    assert writes == [command(b"GET", b"a") + command(b"GET", b"b")
                      + command(b"MGET", b"c", b"d") + command(b"GET", b"list")]
    conn.reply(bulk(b"1") + b"$-1\r\n")
    assert outcome(d) is None, "one answer for the lot, once every reply is in"
    clock.advance(0.5)
    conn.reply(b"*2\r\n" + bulk(b"x") + b"$-1\r\n" + WRONGTYPE)
    replies = outcome(d)
    assert replies[:3] == [b"1", None, [b"x", None]]
    assert isinstance(replies[3], BackingReplyError)
    assert str(replies[3]).startswith("WRONGTYPE Operation")
    assert metrics.backing_errors == {}, "an error reply is the caller's to count"
    assert metrics.backing_latency.seen == [0.5]
    assert backing.up


def test_a_batch_times_out_as_a_whole_its_late_replies_are_swallowed():
    backing, endpoint, clock, metrics = up()
    conn = endpoint.last
    d = backing.call_many(gets(b"a", b"b", b"c"))
    conn.reply(bulk(b"1"))
    clock.advance(TIMEOUT)
    error = outcome(d).value
    assert isinstance(error, BackingTimeout) and "timed out after 2s" in str(error)
    assert backing.state == "stalled" and metrics.backing_errors == {"timeout": 1}
    assert isinstance(outcome(backing.call_many(gets(b"x"))).value, BackingTimeout)
    assert conn.sent().endswith(b"\r\n" + command(b"PING"))
    conn.reply(bulk(b"2") + bulk(b"3"))  # the late replies, then the probe's
    conn.reply(PONG)
    assert backing.up
    after = backing.call_many(gets(b"d", b"e"))
    conn.reply(bulk(b"4") + bulk(b"5"))
    assert outcome(after) == [b"4", b"5"], "later calls get their own replies"


def test_a_connection_lost_mid_batch_fails_the_lot_as_unavailable():
    backing, endpoint, clock, metrics = up()
    d = backing.call_many(gets(b"a", b"b"))
    endpoint.last.reply(bulk(b"1"))
    endpoint.last.lose()
    error = outcome(d).value
    assert isinstance(error, BackingUnavailable) and "Lost connection" in str(error)
    assert metrics.backing_errors == {"unavailable": 1}
    waiting = backing.call_many(gets(b"c", b"d"))
    assert outcome(waiting) is None
    clock.advance(RETRY_AT_MOST)
    endpoint.last.sent()
    endpoint.last.reply(PONG)
    assert endpoint.last.sent() == command(b"GET", b"c") + command(b"GET", b"d")
    endpoint.last.reply(bulk(b"3") + bulk(b"4"))
    assert outcome(waiting) == [b"3", b"4"]


def test_a_batch_made_before_the_connection_is_ready_waits_for_it():
    backing, endpoint, clock, _ = make()
    backing.start()
    endpoint.last.sent()
    d = backing.call_many(gets(b"a", b"b"))
    assert endpoint.last.value() == b""
    endpoint.last.reply(PONG)
    assert endpoint.last.sent() == command(b"GET", b"a") + command(b"GET", b"b")
    endpoint.last.reply(bulk(b"1") + bulk(b"2"))
    assert outcome(d) == [b"1", b"2"]


def test_a_backing_refusing_connections_fails_a_batch_at_once():
    backing, endpoint, clock, metrics = make()
    endpoint.refuse = True
    backing.start()
    error = outcome(backing.call_many(gets(b"a", b"b"))).value
    assert isinstance(error, BackingUnavailable) and "refused" in str(error)
    assert metrics.backing_errors == {"unavailable": 1}


def test_a_batch_that_never_connects_times_out():
    backing, endpoint, clock, metrics = make()
    backing.start()
    d = backing.call_many(gets(b"a", b"b"))
    clock.advance(TIMEOUT)
    assert isinstance(outcome(d).value, BackingTimeout)


def test_running_out_of_memory_while_writing_a_batch_drops_the_connection():
    backing, endpoint, clock, metrics = up()
    conn = endpoint.last
    other = backing.call(b"GET", b"a")

    def no_memory(data):
        raise MemoryError()

    conn.write = no_memory
    error = outcome(backing.call_many(gets(b"b", b"c"))).value
    assert isinstance(error, BackingInternalError)
    assert conn.closed, "the byte stream is in an unknown state"
    clock.advance(0)
    assert isinstance(outcome(other).value, BackingUnavailable)


def test_single_calls_and_batches_share_the_connection_in_order():
    backing, endpoint, clock, _ = up()
    a = backing.call(b"GET", b"a")
    many = backing.call_many(gets(b"b", b"c"))
    d = backing.call(b"GET", b"d")
    assert isinstance(many, Deferred)
    endpoint.last.reply(bulk(b"1") + bulk(b"2") + bulk(b"3") + bulk(b"4"))
    assert (outcome(a), outcome(many), outcome(d)) == (b"1", [b"2", b"3"], b"4")
