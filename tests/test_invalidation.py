"""invalidation: tracking, against a real redis-server (SPEC §5).

Every wait here is for an event (an invalidation message counted, tracking
re-established), never for a time.
"""

from __future__ import annotations

import pytest
import pytest_twisted
from twisted.internet import defer, threads
from twisted.internet.task import Clock

from redisp.config import parse_redis_url
from redisp.invalidation import tracking_support_problem
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
        forwarder.hold()  # the data connection's replies wait; invalidations flow
        fetch = in_thread(p.redis_py().get, "k")
        # Redis has answered the GET (the reply is held): the write comes after it
        yield until(lambda: bool(forwarder.held))
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

    from redisp.cache import Cache
    from redisp.gate import Gate
    from redisp.invalidation import Invalidator
    from redisp.metrics import Metrics
    from redisp.reader import CachedReader

    clock = MemoryReactorClock()
    metrics = Metrics(started=0)
    reader = CachedReader(Cache(10, 10, clock, metrics), Gate(1, clock), None, metrics)
    invalidator = Invalidator(parse_redis_url("redis://127.0.0.1:1/0"), 1.0, clock, reader,
                              metrics)
    failure = Failure(TimeoutError(""))
    assert invalidator._failed(failure) is failure
    assert invalidator._problem == "unknown error"
