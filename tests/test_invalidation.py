"""invalidation: tracking, against a real redis-server (SPEC §5).

Every wait here is for an event (an invalidation message counted, tracking
re-established), never for a time.
"""

from __future__ import annotations

import pytest
import pytest_twisted
from twisted.internet import defer, threads
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport

from redisp.config import parse_redis_url
from redisp.core.tracking import tracking_support_problem
from tests.support import HoldingForwarder, RedisServer, until

inline = pytest_twisted.inlineCallbacks


def in_thread(f, *args):
    return threads.deferToThread(f, *args)


def tracking_proxy(start_proxy, **kw):
    return start_proxy(invalidation="tracking", **kw)


@defer.inlineCallbacks
def ready(p):
    yield until(lambda: p.proxy.backing.up and p.proxy.invalidator.active)


@defer.inlineCallbacks
def read(p, key):
    value = yield in_thread(p.redis_py().get, key)
    return value


@pytest.mark.parametrize("write", [
    pytest.param(lambda r: r.set("k", "new"), id="SET"),
    pytest.param(lambda r: r.delete("k"), id="DEL"),
    pytest.param(lambda r: r.pexpire("k", 1), id="EXPIRE"),
    pytest.param(lambda r: r.rename("k", "k2"), id="RENAME"),
    pytest.param(lambda r: r.flushdb(), id="FLUSHDB"),
    pytest.param(lambda r: r.append("k", "!"), id="APPEND"),
])
@inline
def test_a_write_in_redis_drops_the_cached_key(redis_db, start_proxy, write):
    redis_db.set("k", "old")
    p = tracking_proxy(start_proxy)
    yield ready(p)
    assert (yield read(p, "k")) == b"old"
    assert (yield read(p, "k")) == b"old"
    assert p.proxy.metrics.cache_hits == 1
    write(redis_db)
    yield until(lambda: len(p.proxy.cache) == 0)
    assert (yield read(p, "k")) == redis_db.get("k")


@inline
def test_a_write_during_a_fetch_never_leaves_the_old_value_cached(
        redis_server, redis_db, start_proxy):
    """Read, invalidate, then store: the fetched (old) value is served, not stored."""
    redis_db.set("k", "old")
    forwarder = HoldingForwarder(redis_server.port)
    try:
        p = tracking_proxy(start_proxy, redis_url=forwarder.url, redis_timeout=30.0)
        yield ready(p)
        client = yield in_thread(p.connected_redis_py)
        forwarder.hold()  # the data connection's replies wait; invalidations flow
        fetch = in_thread(client.get, "k")
        # Redis has answered the GET (the reply is held): the write comes after it.
        # Wait for that reply itself: a reply to something else redisp sent
        # (its COMMAND table read, under load) may be held first
        yield until(lambda: any(b"old" in data for _, data in forwarder.held))
        seen = p.proxy.metrics.invalidation_messages
        redis_db.set("k", "new")
        yield until(lambda: p.proxy.metrics.invalidation_messages > seen)
        forwarder.release()
        assert (yield fetch) == b"old"  # read before the write: a fair answer
        assert len(p.proxy.cache) == 0
        assert (yield read(p, "k")) == b"new"
        assert (yield read(p, "k")) == b"new"
    finally:
        yield forwarder.stop()


@inline
def test_killing_the_tracking_connection_flushes_and_recovers(redis_db, start_proxy):
    redis_db.set("k", "v1")
    p = tracking_proxy(start_proxy)
    yield ready(p)
    assert (yield read(p, "k")) == b"v1"
    flushes = p.proxy.metrics.invalidation_flushes
    redis_db.client_kill_filter(_type="pubsub")
    yield until(lambda: p.proxy.metrics.invalidation_flushes > flushes)
    assert len(p.proxy.cache) == 0
    redis_db.set("k", "v2")  # nobody is watching if tracking is not back yet
    assert (yield read(p, "k")) == b"v2"
    yield ready(p)
    assert (yield read(p, "k")) == b"v2"
    redis_db.set("k", "v3")
    yield until(lambda: len(p.proxy.cache) == 0)
    assert (yield read(p, "k")) == b"v3"


@inline
def test_redis_restarted_mid_run_stays_coherent(start_proxy):
    server = RedisServer().start()
    try:
        server.client().set("k", "before")
        p = tracking_proxy(start_proxy, redis_url=server.url)
        yield ready(p)
        assert (yield read(p, "k")) == b"before"
        server.stop()
        yield until(lambda: not p.proxy.invalidator.active)
        assert len(p.proxy.cache) == 0
        server.start()
        server.client().set("k", "after")
        yield ready(p)
        assert (yield read(p, "k")) == b"after"
        server.client().set("k", "later")
        yield until(lambda: len(p.proxy.cache) == 0)
        assert (yield read(p, "k")) == b"later"
    finally:
        server.stop()


@inline
def test_two_instances_in_front_of_one_redis_both_stay_coherent(redis_db, start_proxy):
    redis_db.set("k", "v1")
    a, b = tracking_proxy(start_proxy), tracking_proxy(start_proxy)
    yield ready(a)
    yield ready(b)
    for p in (a, b):
        assert (yield read(p, "k")) == b"v1"
    redis_db.set("k", "v2")
    yield until(lambda: len(a.proxy.cache) == 0 and len(b.proxy.cache) == 0)
    for p in (a, b):
        assert (yield read(p, "k")) == b"v2"


@inline
def test_ttl_and_lru_still_apply_with_tracking(redis_db, start_proxy):
    for k in "abc":
        redis_db.set(k, k)
    clock = Clock()
    p = tracking_proxy(start_proxy, capacity=2, ttl=10.0, cache_clock=clock)
    yield ready(p)
    for k in "abc":
        yield read(p, k)
    assert p.proxy.metrics.cache_evictions == 1
    clock.advance(10)
    misses = p.proxy.metrics.cache_misses
    yield read(p, "c")
    assert p.proxy.metrics.cache_misses == misses + 1


@inline
def test_nothing_is_cached_before_tracking_holds(start_proxy):
    server = RedisServer()  # not started: tracking cannot be enabled
    p = tracking_proxy(start_proxy, redis_url=server.url)
    assert p.proxy.reader.caching is False
    assert p.proxy.metrics.invalidation_state() == "down"
    server.start()
    try:
        server.client().set("k", "v")
        yield ready(p)
        assert p.proxy.reader.caching is True
        assert (yield read(p, "k")) == b"v"
        assert len(p.proxy.cache) == 1
    finally:
        server.stop()


def test_a_redis_without_client_tracking_is_named_at_start_up():
    server = RedisServer(None, "--rename-command", "CLIENT", "").start()
    try:
        problem = tracking_support_problem(parse_redis_url(server.url), 2.0)
        assert problem is not None and "unknown command" in problem
    finally:
        server.stop()


def test_a_redis_with_client_tracking_passes_the_start_up_check(redis_server):
    assert tracking_support_problem(parse_redis_url(redis_server.url), 2.0) is None


def test_an_unreachable_redis_is_not_a_start_up_problem():
    assert tracking_support_problem(parse_redis_url(RedisServer().url), 2.0) is None


@inline
def test_tracking_state_shows_in_healthz_info_and_metrics(redis_db, start_proxy):
    redis_db.set("k", "v")
    p = tracking_proxy(start_proxy)
    yield ready(p)
    status, _, body = yield in_thread(p.http_path, "/healthz")
    assert status == 200 and b"invalidation: tracking active" in body
    info = yield in_thread(p.redis_py(protocol=2).info, "proxy")
    assert info["invalidation"] == "tracking" and info["invalidation_state"] == "active"
    yield read(p, "k")
    redis_db.set("k", "v2")
    yield until(lambda: len(p.proxy.cache) == 0)
    _, _, body = yield in_thread(p.http_path, "/metrics")
    assert b"redisp_invalidation_active 1.0" in body
    assert b"redisp_invalidation_messages_total 1.0" in body
    assert b"redisp_cache_invalidations_total 1.0" in body
    redis_db.client_kill_filter(_type="pubsub")
    yield until(lambda: not p.proxy.invalidator.active)
    _, _, body = yield in_thread(p.http_path, "/metrics")
    assert b"redisp_invalidation_active 0.0" in body or p.proxy.invalidator.active


def test_a_failure_without_a_message_is_logged_not_raised():
    """An error with empty text once raised IndexError while being reported."""
    from twisted.internet.testing import MemoryReactorClock
    from twisted.python.failure import Failure

    from redisp.core.cache import Cache
    from redisp.core.gate import Gate
    from redisp.core.reader import CachedReader
    from redisp.core.tracking import Invalidator
    from redisp.metrics import Metrics

    clock = MemoryReactorClock()
    metrics = Metrics(started=0)
    reader = CachedReader(Cache(10, 10, clock, metrics), Gate(1, clock), None, metrics)
    invalidator = Invalidator(parse_redis_url("redis://127.0.0.1:1/0"), 1.0, clock, reader,
                              metrics)
    failure = Failure(TimeoutError(""))
    assert invalidator._failed(failure) is failure
    assert invalidator._problem == "unknown error"


# -- a tracking connection that goes silent (SPEC §5) ---------------------------------

SUBSCRIBED = b"*3\r\n$9\r\nsubscribe\r\n$20\r\n__redis__:invalidate\r\n:1\r\n"
PONG_WHILE_SUBSCRIBED = b"*2\r\n$4\r\npong\r\n$0\r\n\r\n"
PING = b"*1\r\n$4\r\nPING\r\n"


def invalidation_message(*keys: bytes) -> bytes:
    return (b"*3\r\n$7\r\nmessage\r\n$20\r\n__redis__:invalidate\r\n*%d\r\n" % len(keys)
            + b"".join(b"$%d\r\n%s\r\n" % (len(k), k) for k in keys))


def on_clock(timeout=2.0):
    """An Invalidator on task.Clock over in-memory connections, tracking established."""
    from redisp.core.cache import Cache
    from redisp.core.gate import Gate
    from redisp.core.reader import CachedReader
    from redisp.core.tracking import Invalidator
    from redisp.metrics import Metrics
    from tests.test_backing_timeouts import FakeEndpoint

    clock = Clock()
    metrics = Metrics(started=0)
    cache = Cache(10, 100, clock, metrics)
    reader = CachedReader(cache, Gate(1, clock), None, metrics)
    endpoint = FakeEndpoint(clock)
    invalidator = Invalidator(parse_redis_url("redis://127.0.0.1:6379/0"), timeout, clock,
                              reader, metrics, endpoint=endpoint)
    invalidator.start()
    establish(endpoint.last)
    assert invalidator.active and reader.caching
    return invalidator, reader, cache, endpoint, clock, metrics


def establish(conn):
    assert b"CLIENT" in conn.sent()
    conn.reply(b":7\r\n")
    assert conn.sent().endswith(b"$8\r\nREDIRECT\r\n$1\r\n7\r\n$5\r\nBCAST\r\n")
    conn.reply(b"+OK\r\n")
    assert b"SUBSCRIBE" in conn.sent()
    conn.reply(SUBSCRIBED)


def test_the_tracking_connection_is_pinged_every_second():
    invalidator, reader, cache, endpoint, clock, metrics = on_clock()
    conn = endpoint.last
    clock.advance(0.875)  # binary fractions: the clock adds them up exactly
    assert conn.sent() == b""
    for answered_after in (0.0, 0.25, 0.5, 0.75):
        clock.advance(0.125)
        assert conn.sent() == PING  # one second after the last one was sent
        clock.advance(answered_after)
        conn.reply(PONG_WHILE_SUBSCRIBED)
        clock.advance(0.875 - answered_after)
        assert conn.sent() == b""
    assert invalidator.active and not conn.closed


def test_invalidations_still_arrive_between_pings():
    invalidator, reader, cache, endpoint, clock, metrics = on_clock()
    cache.put(b"k", b"v")
    clock.advance(1.0)
    endpoint.last.reply(invalidation_message(b"k") + PONG_WHILE_SUBSCRIBED)
    assert len(cache) == 0 and metrics.invalidation_messages == 1
    clock.advance(1.0)
    assert endpoint.last.sent().endswith(PING)


def test_a_ping_unanswered_within_redis_timeout_is_a_lost_connection():
    invalidator, reader, cache, endpoint, clock, metrics = on_clock(timeout=2.0)
    conn = endpoint.last
    cache.put(b"k", b"old")
    clock.advance(1.0)  # PING
    clock.advance(1.9)
    assert invalidator.active and len(cache) == 1
    clock.advance(0.1)
    assert not invalidator.active and not reader.caching
    assert len(cache) == 0 and metrics.invalidation_flushes == 1
    assert conn.closed, "the silent connection is closed"
    clock.advance(0)  # its close arrives: nothing more happens
    assert metrics.invalidation_flushes == 1
    clock.advance(1.0)  # ClientService reconnects
    assert endpoint.last is not conn
    establish(endpoint.last)
    assert invalidator.active and reader.caching


def test_a_ping_timeout_of_one_second_still_pings_every_second():
    invalidator, reader, cache, endpoint, clock, metrics = on_clock(timeout=0.5)
    clock.advance(1.0)
    assert endpoint.last.sent() == PING
    clock.advance(0.5)
    assert not invalidator.active


def test_drain_reads_what_waits_in_the_socket_and_reports_a_closed_one():
    import socket

    from redisp.core.tracking import _InvalidationProtocol

    class SocketTransport(StringTransport):
        def __init__(self, sock):
            super().__init__()
            self.sock = sock

        def getHandle(self):
            return self.sock

    ours, redis_end = socket.socketpair()
    ours.setblocking(False)
    try:
        protocol = _InvalidationProtocol(charset=None, convertNumbers=False)
        protocol.makeConnection(SocketTransport(ours))
        got = []
        protocol.deliver_to(got.append)
        assert protocol.can_drain()
        assert protocol.drain() is True and got == []
        redis_end.sendall(invalidation_message(b"a", b"b") + invalidation_message(b"c")[:20])
        assert protocol.drain() is True
        assert got == [[b"a", b"b"]]
        redis_end.sendall(invalidation_message(b"c")[20:])
        protocol.drain()
        assert got == [[b"a", b"b"], [b"c"]]
        redis_end.close()
        assert protocol.drain() is False
    finally:
        ours.close()


@inline
def test_a_tracking_connection_gone_silent_both_ways_is_treated_as_lost(
        redis_server, redis_db, start_proxy):
    """The forwarder stops passing bytes on the tracking connection, both ways,
    without closing it (a NAT that dropped its state): a write made directly
    on Redis must not be hidden by the cache for the rest of the ttl."""
    redis_db.set("k", "old")
    forwarder = HoldingForwarder(redis_server.port)
    try:
        p = tracking_proxy(start_proxy, redis_url=forwarder.url, redis_timeout=0.5, ttl=3600.0)
        yield ready(p)
        assert (yield read(p, "k")) == b"old"
        assert len(p.proxy.cache) == 1
        flushes = p.proxy.metrics.invalidation_flushes
        (tracking,) = [c for c in forwarder.connections if c.subscriber]
        tracking.transport.pauseProducing()  # redisp -> Redis: PINGs stay unread
        tracking.server_side.transport.pauseProducing()  # Redis -> redisp: so do messages
        redis_db.set("k", "new")
        yield until(lambda: p.proxy.metrics.invalidation_flushes > flushes)
        assert not p.proxy.reader.caching and len(p.proxy.cache) == 0
        assert (yield read(p, "k")) == b"new"
        yield ready(p)  # a new tracking connection, through the same forwarder
        assert (yield read(p, "k")) == b"new"
        redis_db.set("k", "newer")
        yield until(lambda: len(p.proxy.cache) == 0)
        assert (yield read(p, "k")) == b"newer"
    finally:
        yield forwarder.stop()


# -- read-after-write: pending invalidations are read before a hit (SPEC §5) ------------


def wait_for_bytes(sock, marker: bytes, limit: float = 5.0) -> None:
    """Block (the reactor too) until ``marker`` waits unread in ``sock``."""
    import select
    import socket
    import time

    deadline = time.monotonic() + limit
    while True:
        left = deadline - time.monotonic()
        assert left > 0, f"{marker!r} did not arrive within {limit}s"
        if select.select([sock], [], [], left)[0]:
            if marker in sock.recv(65536, socket.MSG_PEEK):
                return
            select.select([], [], [], 0.001)  # something else waits (a pong): more may come


@pytest.mark.parametrize("path", ["read", "cached", "get_many", "read_packet"])
@inline
def test_an_invalidation_already_in_the_socket_is_taken_in_before_a_hit(
        redis_db, start_proxy, path):
    """The write is acknowledged and its invalidation sits in redisp's socket
    buffer, unread (the reactor has not run since): a GET handled now must not
    be answered from the cache."""
    from twisted.internet import reactor, task

    redis_db.set("k", "old")
    p = tracking_proxy(start_proxy)
    yield ready(p)
    assert (yield read(p, "k")) == b"old"
    assert len(p.proxy.cache) == 1
    tracking_socket = p.proxy.invalidator._protocol.transport.getHandle()
    yield task.deferLater(reactor, 0.01, lambda: None)  # a reactor turn with no lookup yet
    redis_db.set("k", "new")  # blocking: the reactor does not run until the lookup
    wait_for_bytes(tracking_socket, b"__redis__:invalidate")
    reader = p.proxy.reader
    if path == "read":
        assert reader.read(b"k") is None
    elif path == "cached":
        assert reader.cached([b"k"]) is None
    elif path == "get_many":
        assert (yield reader.get_many([b"k"])) == [b"new"]
    else:
        got = []
        reader.read_packet([b"k"], lambda results, hits: got.append((results, hits)))
        yield until(lambda: bool(got))
        assert got == [([b"new"], 0)]
    assert (yield read(p, "k")) == b"new"


# -- start-up check: say what is wrong ------------------------------------------------


@pytest.mark.parametrize("url_auth, expected", [
    ("", "requires authentication"),
    (":wrong@", "refused our credentials: WRONGPASS"),
])
def test_an_auth_problem_at_start_up_is_named_as_such_not_as_an_old_redis(url_auth, expected):
    from twisted.internet.testing import MemoryReactorClock

    from redisp.tap import Options, makeService

    server = RedisServer(None, "--requirepass", "s3cret").start()
    try:
        url = server.url.replace("redis://", "redis://" + url_auth)
        problem = tracking_support_problem(parse_redis_url(url), 2.0)
        assert problem is not None and expected in problem
        assert "Redis >= 6" not in problem and "s3cret" not in problem and "wrong" not in \
            problem.replace("WRONGPASS", "")
        options = Options()
        options.parseOptions(["--invalidation", "tracking", "--redis", url,
                              "--http", "none", "--resp", "none"])
        with pytest.raises(SystemExit) as stopped:
            makeService(options, MemoryReactorClock())
        assert str(stopped.value).startswith("redisp: invalidation: tracking")
        assert expected in str(stopped.value)
    finally:
        server.stop()


def test_the_right_password_passes_the_start_up_check():
    server = RedisServer(None, "--requirepass", "s3cret").start()
    try:
        url = server.url.replace("redis://", "redis://:s3cret@")
        assert tracking_support_problem(parse_redis_url(url), 2.0) is None
    finally:
        server.stop()


def test_tracking_setup_timing_out_is_logged_in_words():
    from twisted.internet.defer import TimeoutError as DeferredTimeout
    from twisted.python.failure import Failure

    invalidator, reader, cache, endpoint, clock, metrics = on_clock()
    invalidator._failed(Failure(DeferredTimeout(2.0, "Deferred")))
    assert invalidator._problem == "no answer within 2s"
