"""The relay: forwarded requests out, reply frames back as Redis sent them.

Unit tests drive one RelayProtocol on a StringTransport with a task.Clock;
the end-to-end tests run against real redis-servers and compare every reply
byte for byte with what a raw socket to the same server gets.
"""

from __future__ import annotations

import math

import pytest
import pytest_twisted
from twisted.internet import defer, reactor
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure

from redisp.backing.connection import BackingError, BackingTimeout, BackingUnavailable
from redisp.backing.relay import RelayPool, RelayProtocol
from redisp.config import RedisURL, parse_redis_url
from redisp.protocol.codec import encode_command
from tests.raw_redis import encode, replies
from tests.support import RedisServer, free_port, until

inline = pytest_twisted.inlineCallbacks


class Calls:
    """Collects what each call's ``done`` got, by call number."""

    def __init__(self) -> None:
        self.got: dict[int, bytes | BackingError] = {}
        self.count = 0
        self.pushes: list[bytes] = []

    def done(self, n: int):
        def done(result: bytes | BackingError) -> None:
            assert n not in self.got, f"call {n} answered twice"
            self.got[n] = result
        return done

    def call(self, relay: RelayProtocol, *argv: bytes | str, **kw) -> int:
        n = self.count
        self.count += 1
        relay.call(encode(*argv), self.done(n), **kw)
        return n


def connected(clock: Clock | None = None, **kw) -> tuple[RelayProtocol, StringTransport, Calls]:
    calls = Calls()
    relay = RelayProtocol(clock or Clock(), 2.0, on_push=calls.pushes.append, **kw)
    transport = StringTransport()
    relay.makeConnection(transport)
    return relay, transport, calls


# -- matching replies to calls ------------------------------------------------------------


def test_pipelined_calls_get_their_own_frames_in_order_in_any_chunking():
    stream = b"+OK\r\n$3\r\nabc\r\n*2\r\n:1\r\n$-1\r\n-ERR wrong\r\n"
    for size in range(1, len(stream) + 1):
        relay, transport, calls = connected()
        for argv in (["SET", "k", "v"], ["GET", "k"], ["MGET", "a", "b"], ["X"]):
            calls.call(relay, *argv)
        assert transport.value() == b"".join(
            encode(*a) for a in (["SET", "k", "v"], ["GET", "k"], ["MGET", "a", "b"], ["X"]))
        for i in range(0, len(stream), size):
            relay.dataReceived(stream[i:i + size])
        assert calls.got == {0: b"+OK\r\n", 1: b"$3\r\nabc\r\n", 2: b"*2\r\n:1\r\n$-1\r\n",
                             3: b"-ERR wrong\r\n"}, f"chunk size {size}"


def test_calls_before_the_connection_wait_and_follow_the_setup():
    """AUTH and SELECT go first, their replies are not anyone's call's."""
    calls = Calls()
    relay = RelayProtocol(Clock(), 2.0, parse_redis_url("redis://:secret@h:1/3"))
    calls.call(relay, "GET", "k")
    transport = StringTransport()
    relay.makeConnection(transport)
    assert transport.value() == (encode("AUTH", "secret") + encode("SELECT", "3")
                                 + encode("GET", "k"))
    assert not relay.ready
    relay.dataReceived(b"+OK\r\n+OK\r\n$1\r\nv\r\n")
    assert relay.ready
    assert calls.got == {0: b"$1\r\nv\r\n"}


def test_resp3_setup_is_hello_3_with_auth():
    relay = RelayProtocol(Clock(), 2.0, parse_redis_url("redis://user:pw@h:1/0"), resp3=True)
    transport = StringTransport()
    relay.makeConnection(transport)
    assert transport.value() == encode("HELLO", "3", "AUTH", "user", "pw")
    relay.dataReceived(b"%1\r\n+proto\r\n:3\r\n")
    assert relay.ready and relay.hello == {b"proto": 3}


def test_a_refused_setup_fails_every_call_and_closes():
    """A wrong password is "unavailable", with Redis's reason and never the password."""
    calls = Calls()
    relay = RelayProtocol(Clock(), 2.0, parse_redis_url("redis://:hunter2@h:1/0"))
    calls.call(relay, "GET", "k")
    transport = StringTransport()
    relay.makeConnection(transport)
    relay.dataReceived(b"-WRONGPASS invalid username-password pair or user is disabled.\r\n"
                       b"-NOAUTH Authentication required.\r\n")
    error = calls.got[0]
    assert isinstance(error, BackingUnavailable)
    assert "WRONGPASS" in str(error) and "hunter2" not in str(error)
    assert transport.disconnecting or transport.disconnected
    assert relay.lost


def test_a_lost_connection_fails_what_waits_and_what_comes():
    relay, transport, calls = connected()
    calls.call(relay, "GET", "a")
    relay.connectionLost(Failure(ConnectionError("gone")))
    assert isinstance(calls.got[0], BackingUnavailable)
    calls.call(relay, "GET", "b")
    assert isinstance(calls.got[1], BackingUnavailable)
    assert "unavailable" in str(calls.got[1])


def test_garbage_from_the_backing_drops_the_connection():
    """Framing lost is lost for good: calls fail as unavailable, the socket closes."""
    relay, transport, calls = connected()
    calls.call(relay, "GET", "a")
    calls.call(relay, "GET", "b")
    relay.dataReceived(b"+OK\r\n@garbage\r\n")
    assert calls.got[0] == b"+OK\r\n"
    assert isinstance(calls.got[1], BackingUnavailable)
    assert "protocol error" in str(calls.got[1])
    assert transport.disconnecting or transport.disconnected


def test_a_reply_nobody_asked_for_drops_the_connection():
    relay, transport, calls = connected()
    relay.dataReceived(b"+OK\r\n")
    assert relay.lost


def test_send_expects_no_reply():
    """For commands Redis does not answer (CLIENT REPLY OFF/SKIP)."""
    relay, transport, calls = connected()
    relay.send(encode("SET", "k", "v"))
    calls.call(relay, "GET", "k")
    relay.dataReceived(b"$1\r\nv\r\n")
    assert calls.got == {0: b"$1\r\nv\r\n"}


# -- timeouts ---------------------------------------------------------------------------


def test_each_call_times_out_on_its_own_and_late_replies_are_dropped():
    """A timed-out call gets BackingTimeout; its late reply goes nowhere, later
    calls keep their own deadline and reply, and the connection stays up."""
    clock = Clock()
    relay, transport, calls = connected(clock)
    calls.call(relay, "GET", "slow")
    clock.advance(1.5)
    calls.call(relay, "GET", "later")
    clock.advance(0.5)
    assert isinstance(calls.got[0], BackingTimeout)
    assert "timed out" in str(calls.got[0])
    assert 1 not in calls.got
    assert relay.stalled
    relay.dataReceived(b"$4\r\nlate\r\n")  # the first call's reply, late
    assert not relay.stalled
    assert 1 not in calls.got
    relay.dataReceived(b"$2\r\nok\r\n")
    assert calls.got[1] == b"$2\r\nok\r\n"
    assert not transport.disconnecting and not relay.lost


def test_a_longer_timeout_ahead_does_not_delay_a_shorter_one_behind():
    """A blocking command's timeout is its own: the call after it still fails on time."""
    clock = Clock()
    relay, transport, calls = connected(clock)
    calls.call(relay, "BLPOP", "q", "10", timeout=12.0)
    calls.call(relay, "GET", "k")
    clock.advance(2.0)
    assert 0 not in calls.got and isinstance(calls.got[1], BackingTimeout)
    clock.advance(10.0)
    assert isinstance(calls.got[0], BackingTimeout)
    calls.call(relay, "BLPOP", "q", "0", timeout=math.inf)
    clock.advance(1e9)
    assert 2 not in calls.got


def test_one_lazy_timer_whatever_the_number_of_calls():
    """Replies do not touch the timer; one pending timer per connection."""
    clock = Clock()
    relay, transport, calls = connected(clock)
    for i in range(100):
        calls.call(relay, "GET", str(i))
        clock.advance(0.01)
    assert len(clock.getDelayedCalls()) == 1
    relay.dataReceived(b"$-1\r\n" * 100)
    assert len(calls.got) == 100
    clock.advance(5)
    assert not clock.getDelayedCalls()  # nothing waits: the timer is not re-armed


def test_a_setup_that_times_out_drops_the_connection():
    clock = Clock()
    calls = Calls()
    relay = RelayProtocol(clock, 2.0, parse_redis_url("redis://:pw@h:1/0"))
    calls.call(relay, "GET", "k")
    transport = StringTransport()
    relay.makeConnection(transport)
    clock.advance(2.0)
    assert relay.lost and isinstance(calls.got[0], BackingError)


# -- push frames --------------------------------------------------------------------------


def test_resp3_pushes_go_to_on_push_not_to_calls():
    relay, transport, calls = connected(resp3=True)
    relay.dataReceived(b"%0\r\n")  # HELLO's reply
    calls.call(relay, "GET", "k")
    relay.dataReceived(b">2\r\n$10\r\ninvalidate\r\n*1\r\n$1\r\nk\r\n"
                       b"|1\r\n+a\r\n+b\r\n>1\r\n+p\r\n"
                       b"_\r\n")
    assert calls.got == {0: b"_\r\n"}
    assert calls.pushes == [b">2\r\n$10\r\ninvalidate\r\n*1\r\n$1\r\nk\r\n",
                            b"|1\r\n+a\r\n+b\r\n>1\r\n+p\r\n"]


def test_resp2_subscribe_confirmations_settle_the_call_then_messages_are_pushes():
    relay, transport, calls = connected()
    calls.call(relay, "SUBSCRIBE", "a", "b", confirms=b"subscribe")
    sub_a = b"*3\r\n$9\r\nsubscribe\r\n$1\r\na\r\n:1\r\n"
    sub_b = b"*3\r\n$9\r\nsubscribe\r\n$1\r\nb\r\n:2\r\n"
    message = b"*3\r\n$7\r\nmessage\r\n$1\r\na\r\n$2\r\nhi\r\n"
    relay.dataReceived(sub_a + sub_b + message)
    assert calls.got == {0: sub_a}
    assert calls.pushes == [sub_b, message]
    assert relay.subscribed and relay.channels == 2
    # in pub/sub mode, PING's reply is an array too, and still a reply
    calls.call(relay, "PING")
    relay.dataReceived(b"*2\r\n$4\r\npong\r\n$0\r\n\r\n")
    assert calls.got[1] == b"*2\r\n$4\r\npong\r\n$0\r\n\r\n"
    calls.call(relay, "UNSUBSCRIBE", confirms=b"unsubscribe")
    unsub_a = b"*3\r\n$11\r\nunsubscribe\r\n$1\r\na\r\n:1\r\n"
    unsub_b = b"*3\r\n$11\r\nunsubscribe\r\n$1\r\nb\r\n:0\r\n"
    relay.dataReceived(unsub_a + unsub_b)
    assert calls.got[2] == unsub_a and calls.pushes[-1] == unsub_b
    assert not relay.subscribed
    # out of pub/sub mode, an array that looks like a message is a reply
    calls.call(relay, "LRANGE", "l", "0", "-1")
    relay.dataReceived(message)
    assert calls.got[3] == message


def test_a_subscribe_refused_is_answered_by_its_error():
    relay, transport, calls = connected()
    calls.call(relay, "SUBSCRIBE", confirms=b"subscribe")
    relay.dataReceived(b"-ERR wrong number of arguments for 'subscribe' command\r\n")
    assert calls.got[0].startswith(b"-ERR wrong number")
    assert not relay.subscribed


def test_shard_and_plain_subscriptions_are_counted_apart():
    relay, transport, calls = connected()
    calls.call(relay, "SUBSCRIBE", "a", confirms=b"subscribe")
    calls.call(relay, "SSUBSCRIBE", "s", confirms=b"ssubscribe")
    calls.call(relay, "UNSUBSCRIBE", confirms=b"unsubscribe")
    relay.dataReceived(b"*3\r\n$9\r\nsubscribe\r\n$1\r\na\r\n:1\r\n"
                       b"*3\r\n$10\r\nssubscribe\r\n$1\r\ns\r\n:1\r\n"
                       b"*3\r\n$11\r\nunsubscribe\r\n$1\r\na\r\n:0\r\n")
    assert len(calls.got) == 3
    assert relay.subscribed and (relay.channels, relay.shard_channels) == (0, 1)


def test_monitor_lines_are_pushes_after_monitor_is_answered():
    relay, transport, calls = connected()
    calls.call(relay, "MONITOR", confirms=b"monitor")
    calls.call(relay, "PING")
    relay.dataReceived(b"+OK\r\n+1700000000.000001 [0 127.0.0.1:1] \"GET\" \"k\"\r\n+PONG\r\n")
    assert calls.got == {0: b"+OK\r\n", 1: b"+PONG\r\n"}
    assert calls.pushes == [b"+1700000000.000001 [0 127.0.0.1:1] \"GET\" \"k\"\r\n"]


def test_reset_ends_pubsub_and_monitor_modes():
    relay, transport, calls = connected()
    calls.call(relay, "SUBSCRIBE", "a", confirms=b"subscribe")
    relay.dataReceived(b"*3\r\n$9\r\nsubscribe\r\n$1\r\na\r\n:1\r\n")
    calls.call(relay, "RESET")
    relay.dataReceived(b"+RESET\r\n")
    assert calls.got[1] == b"+RESET\r\n" and not relay.subscribed


def test_close_before_connecting():
    calls = Calls()
    relay = RelayProtocol(Clock(), 2.0)
    calls.call(relay, "GET", "k")
    relay.close()
    assert isinstance(calls.got[0], BackingUnavailable)
    transport = StringTransport()
    relay.makeConnection(transport)  # the connection came anyway: it is closed
    assert transport.value() == b"" and transport.disconnecting


# -- against a real redis-server ------------------------------------------------------------


@pytest.fixture(scope="module")
def debug_redis():
    """A redis-server with DEBUG enabled: DEBUG PROTOCOL sends every RESP3 type."""
    server = RedisServer(None, "--enable-debug-command", "yes").start()
    yield server
    server.stop()


@defer.inlineCallbacks
def relay_to(port: int, resp3: bool = False, clock=None, url: RedisURL | None = None,
             on_push=None):
    """A connected RelayProtocol on the real reactor, ready."""
    from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol

    relay = RelayProtocol(clock or reactor, 5.0, url, resp3, on_push=on_push)
    yield connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", port), relay)
    yield until(lambda: relay.ready or relay.lost)
    return relay


def call(relay: RelayProtocol, *argv, **kw) -> defer.Deferred:
    d: defer.Deferred = defer.Deferred()
    relay.call(encode(*argv), d.callback, **kw)
    return d


PARITY = [
    ["SET", "s", "v"],
    ["GET", "s"],
    ["GET", "absent"],
    ["INCRBYFLOAT", "f", "1.5"],
    ["HSET", "h", "a", "1", "b", "2"],
    ["HGETALL", "h"],
    ["SADD", "set", "x"],
    ["SMEMBERS", "set"],
    ["ZADD", "z", "1.5", "m"],
    ["ZSCORE", "z", "m"],
    ["ZRANGE", "z", "0", "-1", "WITHSCORES"],
    ["RPUSH", "l", "a", "b"],
    ["LRANGE", "l", "0", "-1"],
    ["LPOS", "l", "zz"],
    ["GET", "h"],  # WRONGTYPE: errors relayed unchanged
    ["NOSUCHCOMMAND", "x"],
    ["XADD", "st", "1-1", "f", "v"],
    ["XRANGE", "st", "-", "+"],
    ["XINFO", "STREAM", "st"],
    ["CONFIG", "GET", "maxmemory"],
    ["COMMAND", "INFO", "get", "set"],
    ["COMMAND", "DOCS", "get"],
    ["EVAL", "return {1, 'two', {3}}", "0"],
    ["EVAL", "return redis.status_reply('fine')", "0"],
    ["MEMORY", "DOCTOR"],
    ["DEBUG", "PROTOCOL", "string"],
    ["DEBUG", "PROTOCOL", "integer"],
    ["DEBUG", "PROTOCOL", "double"],
    ["DEBUG", "PROTOCOL", "bignum"],
    ["DEBUG", "PROTOCOL", "null"],
    ["DEBUG", "PROTOCOL", "array"],
    ["DEBUG", "PROTOCOL", "set"],
    ["DEBUG", "PROTOCOL", "map"],
    ["DEBUG", "PROTOCOL", "attrib"],
    ["DEBUG", "PROTOCOL", "true"],
    ["DEBUG", "PROTOCOL", "false"],
    ["DEBUG", "PROTOCOL", "verbatim"],
]


@pytest.mark.parametrize("resp3", [False, True], ids=["resp2", "resp3"])
@inline
def test_replies_are_relayed_byte_for_byte_as_redis_sends_them(debug_redis, resp3):
    """Every reply through the relay is the bytes a raw socket to Redis gets,
    in RESP2 and in RESP3 (maps, sets, doubles, big numbers, verbatim
    strings, attributes …); pipelined, all sent at once."""
    client = debug_redis.client()
    client.flushall()
    direct = replies(debug_redis.port, PARITY, resp3=resp3)
    client.flushall()
    relay = yield relay_to(debug_redis.port, resp3=resp3)
    assert relay.ready
    relayed = yield defer.gatherResults([call(relay, *argv) for argv in PARITY])
    for argv, ours, theirs in zip(PARITY, relayed, direct):
        assert ours == theirs, argv
    if resp3:
        assert relayed[PARITY.index(["HGETALL", "h"])].startswith(b"%")
        assert relayed[PARITY.index(["DEBUG", "PROTOCOL", "attrib"])].startswith(b"|")
    relay.close()
    client.close()


@inline
def test_a_big_value_relayed_whole(redis_server, redis_db):
    value = bytes(range(256)) * 20000  # 5 MB: many reads
    redis_db.set("big", value)
    relay = yield relay_to(redis_server.port)
    reply = yield call(relay, "GET", "big")
    assert reply == b"$%d\r\n%b\r\n" % (len(value), value)
    relay.close()


@inline
def test_a_real_late_reply_is_dropped_and_the_connection_kept(redis_server, redis_db):
    """CLIENT PAUSE WRITE holds a SET in Redis past its timeout (on a
    task.Clock); after UNPAUSE its late +OK is dropped, the next call gets
    its own reply, on the same connection."""
    clock = Clock()
    relay = yield relay_to(redis_server.port, clock=clock)
    assert replies(redis_server.port, [["CLIENT", "PAUSE", "20000", "WRITE"]]) == [b"+OK\r\n"]
    try:
        late = call(relay, "SET", "paused", "1")
        clock.advance(5.0)
        error = yield late
        assert isinstance(error, BackingTimeout)
        assert relay.stalled
        after = call(relay, "GET", "paused")  # queued behind the paused SET in Redis
    finally:
        replies(redis_server.port, [["CLIENT", "UNPAUSE"]])
    assert (yield after) == b"$1\r\n1\r\n"  # the SET ran; its +OK went nowhere
    assert not relay.lost and not relay.stalled
    relay.close()


@pytest.mark.parametrize("resp3", [False, True], ids=["resp2", "resp3"])
@inline
def test_pubsub_on_a_pinned_connection(redis_server, redis_db, resp3):
    """Confirmations and messages arrive as Redis sends them; closing the
    pinned connection makes Redis drop the subscription."""
    pool = RelayPool(parse_redis_url(redis_server.url), 5.0, reactor)
    pushes: list[bytes] = []
    pinned = pool.pinned(resp3=resp3, on_push=pushes.append)
    assert pool.pinned_count == 1
    d: defer.Deferred = defer.Deferred()
    pinned.call(encode("SUBSCRIBE", "c1", "c2"), d.callback, confirms=b"subscribe")
    first = yield d
    expected = replies(redis_server.port, [["SUBSCRIBE", "c1", "c2"]], expect=2, resp3=resp3)
    assert first == expected[0]
    yield until(lambda: len(pushes) == 1)
    assert pushes == expected[1:]
    assert pinned.subscribed
    redis_db.publish("c2", "hello")
    yield until(lambda: len(pushes) == 2)
    kind = b">" if resp3 else b"*"
    assert pushes[1] == kind + b"3\r\n$7\r\nmessage\r\n$2\r\nc2\r\n$5\r\nhello\r\n"
    assert redis_db.pubsub_numsub("c1") == [(b"c1", 1)]
    yield pool.stop()
    yield until(lambda: redis_db.pubsub_numsub("c1") == [(b"c1", 0)])
    assert pool.pinned_count == 0


@inline
def test_pool_lanes_keep_each_clients_order_and_protocol(redis_server, redis_db):
    """Two lanes, RESP2 and RESP3 apart; a client's commands run in its order."""
    pool = RelayPool(parse_redis_url(redis_server.url), 5.0, reactor, size=2)
    lanes = [pool.lane() for _ in range(4)]
    assert lanes == [0, 1, 0, 1]
    results: list = []
    ds = []
    for _ in range(50):
        d: defer.Deferred = defer.Deferred()
        pool.call(lanes[1], encode_command([b"INCR", b"n"]), d.callback)
        ds.append(d)
    for d in ds:
        results.append((yield d))
    assert results == [b":%d\r\n" % i for i in range(1, 51)]
    d = defer.Deferred()
    pool.call(lanes[1], encode("HGETALL", "none"), d.callback, resp3=True)
    assert (yield d) == b"%0\r\n"
    d = defer.Deferred()
    pool.call(lanes[1], encode("HGETALL", "none"), d.callback)
    assert (yield d) == b"*0\r\n"
    assert pool.up
    yield pool.stop()


@inline
def test_auth_and_select_with_a_password_protected_redis(redis_db):
    server = RedisServer(None, "--requirepass", "s3cret").start()
    try:
        url = parse_redis_url(f"redis://:s3cret@127.0.0.1:{server.port}/2")
        pool = RelayPool(url, 5.0, reactor)
        for resp3 in (False, True):
            d: defer.Deferred = defer.Deferred()
            pool.call(0, encode("SET", "where", "db2"), d.callback, resp3=resp3)
            assert (yield d) == b"+OK\r\n"
        client = server.client()
        client.execute_command("AUTH", "s3cret")
        client.execute_command("SELECT", "2")
        assert client.get("where") == b"db2"
        client.close()
        yield pool.stop()
        wrong = RelayPool(parse_redis_url(f"redis://:nope@127.0.0.1:{server.port}/0"),
                          5.0, reactor)
        d = defer.Deferred()
        wrong.call(0, encode("GET", "k"), d.callback)
        error = yield d
        assert isinstance(error, BackingUnavailable) and "WRONGPASS" in str(error)
        assert "nope" not in str(error)
        yield wrong.stop()
    finally:
        server.stop()


@inline
def test_pool_unavailable_fails_fast_then_recovers():
    """Nothing listening: unavailable at once; during the backoff calls fail
    without trying; once Redis is there, the next call after it connects."""
    port = free_port()
    clock = Clock()
    pool = RelayPool(parse_redis_url(f"redis://127.0.0.1:{port}/0"), 5.0, reactor,
                     clock=clock)
    d: defer.Deferred = defer.Deferred()
    pool.call(0, encode("PING"), d.callback)
    error = yield d
    assert isinstance(error, BackingUnavailable)
    got: list = []
    pool.call(0, encode("PING"), got.append)
    assert len(got) == 1 and isinstance(got[0], BackingUnavailable)  # failed fast
    server = RedisServer(port).start()
    try:
        clock.advance(1.0)
        d = defer.Deferred()
        pool.call(0, encode("PING"), d.callback)
        assert (yield d) == b"+PONG\r\n"
        assert pool.up
        yield pool.stop()
    finally:
        server.stop()


@inline
def test_redis_restart_fails_waiting_calls_then_reconnects(redis_db):
    server = RedisServer().start()
    pool = RelayPool(parse_redis_url(server.url), 5.0, reactor)
    d: defer.Deferred = defer.Deferred()
    pool.call(0, encode("PING"), d.callback)
    assert (yield d) == b"+PONG\r\n"
    blocked: defer.Deferred = defer.Deferred()
    pool.call(0, encode("BLPOP", "q", "0"), blocked.callback, timeout=math.inf)
    port = server.port
    server.stop()
    assert isinstance((yield blocked), BackingUnavailable)
    server = RedisServer(port).start()
    try:
        d = defer.Deferred()
        pool.call(0, encode("PING"), d.callback)
        assert (yield d) == b"+PONG\r\n"
        yield pool.stop()
    finally:
        server.stop()
