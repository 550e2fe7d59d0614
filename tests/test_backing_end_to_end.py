"""The backing against real redis-server processes that stall: CLIENT PAUSE,
SIGSTOP, a password redisp does not have (SPEC §9).

Each test starts its own redis-server (a paused or stopped one must not
hold up other tests).  Waits are for events, or polls with a deadline.
"""

from __future__ import annotations

import os
import signal
import socket

import pytest
import pytest_twisted
import redis
from twisted.internet import defer, reactor, threads
from twisted.internet.task import Clock

from redisp.backing.connection import KEEPALIVE, Backing, BackingTimeout
from redisp.config import parse_redis_url
from redisp.metrics import Metrics
from tests.support import RedisServer, until

inline = pytest_twisted.inlineCallbacks


def in_thread(f, *args):
    return threads.deferToThread(f, *args)


@pytest.fixture
def server():
    s = RedisServer().start()
    yield s
    if s.proc is not None:
        os.kill(s.proc.pid, signal.SIGCONT)  # if a test left it stopped
    s.stop()


def fired(d: defer.Deferred) -> list:
    got: list = []
    d.addBoth(got.append)
    return got


@inline
def test_under_client_pause_each_call_gets_its_own_outcome(server):
    """A times out on its own clock; B, sent later, is not failed with it and
    gets its own reply once Redis answers; A's late reply goes nowhere."""
    server.client().mset({"a": "1", "b": "2", "c": "3"})
    clock = Clock()  # the calls' timeouts, advanced by the test
    metrics = Metrics(started=0)
    backing = Backing(parse_redis_url(server.url), 1.0, reactor, metrics, clock=clock)
    backing.start()
    try:
        yield until(lambda: backing.up)
        server.client().client_pause(1000)
        a = fired(backing.call(b"GET", b"a"))
        clock.advance(0.5)
        b = fired(backing.call(b"GET", b"b"))
        clock.advance(0.5)
        assert a and a[0].check(BackingTimeout)
        assert not b, "B is within its own timeout"
        assert backing.state == "stalled"
        c = fired(backing.call(b"GET", b"c"))
        assert c and c[0].check(BackingTimeout), "fails fast while stalled"
        yield until(lambda: bool(b))  # the pause ends
        assert b == [b"2"]
        yield until(lambda: backing.up)  # the probe PING answered
        assert (yield backing.call(b"GET", b"c")) == b"3"
        assert (yield backing.call(b"GET", b"a")) == b"1"
        assert metrics.backing_errors == {"timeout": 2}
    finally:
        yield backing.stop()


@inline
def test_under_client_pause_no_call_in_flight_is_reported_unavailable(server, start_proxy):
    """Through both doors: misses sent one after another while the backing is
    paused all end as timeouts (504 / -ERR … timed out), never as unavailable."""
    server.client().mset({f"k{i}": f"v{i}" for i in range(5)})
    p = start_proxy(redis_url=server.url, capacity=0, concurrency=64, redis_timeout=0.5)
    yield until(lambda: p.proxy.backing.up)
    server.client().client_pause(3000)

    def resp_get(key):
        try:
            return p.redis_py().get(key)
        except redis.ResponseError as e:
            return str(e)

    answers = []
    for i in range(4):  # one at a time: each its own backing call
        answers.append(in_thread(resp_get, f"k{i}"))
        yield until(lambda i=i: p.proxy.metrics.cache_misses == i + 1)
    http = in_thread(p.http_get, "k4")
    replies = yield defer.gatherResults(answers)
    status, _, body = yield http
    assert all("timed out" in r for r in replies), replies
    assert status == 504 and b"timed out" in body
    assert "unavailable" not in p.proxy.metrics.backing_errors
    yield until(lambda: p.proxy.backing.up)
    for i in range(5):  # every reply went to its own call
        assert (yield in_thread(p.redis_py().get, f"k{i}")) == f"v{i}".encode()


@inline
def test_a_sigstopped_backing_fails_queued_requests_fast_and_recovers(server, start_proxy):
    """concurrency 1, backing stopped (its kernel still accepts connections):
    the first miss waits out redis_timeout, then every request queued behind
    it is answered at once -- hits from the cache, misses with the timeout
    error -- instead of each miss waiting a full timeout in turn."""
    server.client().mset({"hot": "h", **{f"m{i}": str(i) for i in range(10)}})
    p = start_proxy(redis_url=server.url, concurrency=1, redis_timeout=1.0)
    yield until(lambda: p.proxy.backing.up)
    assert (yield in_thread(p.redis_py().get, "hot")) == b"h"
    os.kill(server.proc.pid, signal.SIGSTOP)
    try:
        def get(key):
            try:
                return p.redis_py().get(key)
            except redis.ResponseError as e:
                return str(e)

        pending = [in_thread(get, f"m{i}") for i in range(10)] + \
                  [in_thread(get, "hot") for _ in range(10)]
        # ten misses waiting in turn would take ten timeouts
        yield until(lambda: all(d.called for d in pending), limit=5.0)
        answers = yield defer.gatherResults(pending)
        assert answers[10:] == [b"h"] * 10
        assert all(isinstance(a, str) and "timed out" in a for a in answers[:10]), answers
        status, _, _ = yield in_thread(p.http_path, "/healthz")
        assert status == 503
        info = yield in_thread(p.redis_py().info, "proxy")
        assert info["backing_status"] == "down"
    finally:
        os.kill(server.proc.pid, signal.SIGCONT)
    yield until(lambda: p.proxy.backing.up)
    assert (yield in_thread(p.redis_py().get, "m3")) == b"3"
    status, _, _ = yield in_thread(p.http_path, "/healthz")
    assert status == 200


@inline
def test_a_backing_that_wants_a_password_we_lack_is_down(start_proxy):
    server = RedisServer(None, "--requirepass", "s3cret").start()
    try:
        p = start_proxy(redis_url=server.url)
        yield until(lambda: p.proxy.backing._down_reason is not None)
        assert not p.proxy.backing.up
        info = yield in_thread(p.redis_py().info, "proxy")
        assert info["backing_status"] == "down"
        with pytest.raises(redis.ResponseError, match=r"unavailable \(NOAUTH"):
            yield in_thread(p.redis_py().get, "k")
        status, _, _ = yield in_thread(p.http_path, "/healthz")
        assert status == 503
    finally:
        server.stop()


@inline
def test_every_backing_connection_has_tcp_keepalive(redis_db, start_proxy):
    p = start_proxy(invalidation="tracking")
    yield until(lambda: p.proxy.backing.up and p.proxy.invalidator.active)
    sockets = [p.proxy.backing._protocol.transport.getHandle(),
               p.proxy.invalidator._protocol.transport.getHandle()]
    for s in sockets:
        assert s.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE) == 1
        for name, value in KEEPALIVE:
            assert s.getsockopt(socket.IPPROTO_TCP, getattr(socket, name)) == value


@inline
def test_out_of_memory_sending_to_redis_is_an_internal_error_logged_once(redis_db, start_proxy):
    from twisted.logger import globalLogPublisher

    redis_db.set("k", "v")
    p = start_proxy(capacity=0)
    yield until(lambda: p.proxy.backing.up)
    protocol = p.proxy.backing._protocol

    def no_memory(*args, **kwargs):
        raise MemoryError()

    events: list[dict] = []
    globalLogPublisher.addObserver(events.append)
    protocol._build_command = no_memory
    try:
        with pytest.raises(redis.ResponseError) as e:
            yield in_thread(p.redis_py().get, "k")
        status, _, body = yield in_thread(p.http_get, "k")
    finally:
        del protocol._build_command
        globalLogPublisher.removeObserver(events.append)
    assert str(e.value) == "internal error sending to backing redis (MemoryError)"
    assert status == 500 and b"internal error" in body and b"unavailable" not in body
    failures = [ev for ev in events if "log_failure" in ev]
    assert len(failures) == 2, "once for each failed call, by the backing, not again by a door"
    assert all(ev["log_failure"].check(MemoryError) for ev in failures)
    assert p.proxy.metrics.backing_errors == {"internal": 2}
    assert p.proxy.backing.up
    assert (yield in_thread(p.redis_py().get, "k")) == b"v"


@inline
def test_a_clean_shutdown_warns_of_no_lost_connection(redis_server, redis_db):
    from twisted.logger import LogLevel, globalLogPublisher

    from tests.support import RunningProxy, proxy_config

    p = RunningProxy(proxy_config(redis_server.url, invalidation="tracking"))
    yield until(lambda: p.proxy.backing.up and p.proxy.invalidator.active)
    events: list[dict] = []
    globalLogPublisher.addObserver(events.append)
    try:
        yield p.stop()
    finally:
        globalLogPublisher.removeObserver(events.append)
    warnings = [ev for ev in events if ev.get("log_level") in (LogLevel.warn, LogLevel.error)
                and ev.get("log_namespace", "").startswith("redisp")]
    assert warnings == []


@inline
def test_forwarded_commands_behind_a_stalled_backing_fail_fast(server, start_proxy):
    """concurrency 1, backing stopped: the first forwarded command waits out
    redis_timeout, and stalls the backing for everyone: the commands queued
    behind it get the timeout error at once, not one timeout each."""
    p = start_proxy(redis_url=server.url, concurrency=1, redis_timeout=1.0)
    yield until(lambda: p.proxy.backing.up)
    clients = []
    for _ in range(8):
        clients.append((yield in_thread(p.connected_redis_py)))
    assert (yield in_thread(clients[0].incr, "n")) == 1  # the pool connection is up
    os.kill(server.proc.pid, signal.SIGSTOP)
    try:
        def incr(client):
            try:
                return client.incr("n")
            except redis.ResponseError as e:
                return str(e)

        pending = [in_thread(incr, c) for c in clients]
        # eight commands waiting in turn would take eight timeouts
        yield until(lambda: all(d.called for d in pending), limit=4.0)
        answers = yield defer.gatherResults(pending)
        assert all("timed out" in a for a in answers), answers
        assert p.proxy.backing.state == "stalled"
    finally:
        os.kill(server.proc.pid, signal.SIGCONT)
    yield until(lambda: p.proxy.backing.up)
    assert (yield in_thread(clients[1].incr, "n")) >= 2


@inline
def test_a_batch_of_misses_reaches_the_socket_in_the_turn_that_sends_it(redis_db, start_proxy):
    # a plain TCP backing connection is written past Twisted's buffer (protocol/sending.py):
    # nothing waits for the next reactor turn's doWrite
    redis_db.set("k", "v")
    p = start_proxy(capacity=0)
    yield until(lambda: p.proxy.backing.up)
    transport = p.proxy.backing._protocol.transport
    d = p.proxy.backing.call(b"MGET", b"k", b"absent")
    assert not transport.dataBuffer and not transport._tempDataLen
    assert (yield d) == [b"v", None]
