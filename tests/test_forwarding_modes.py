"""Forwarding options, metrics, limits and backing faults, end to end.

``forward: read|none``, ``deny_commands``, the forwarding metrics in
/metrics, pinned connections counting toward ``max_clients``, and what a
forwarded command gets when the backing is down or slow (SPEC §3, §7, §9):
an error of its own, never a hang, and recovery by itself.
"""

from __future__ import annotations

import pytest
import pytest_twisted
from twisted.internet import defer, threads
from twisted.logger import formatEvent, globalLogPublisher

from tests.support import HoldingForwarder, RedisServer, until

inline = pytest_twisted.inlineCallbacks


def metrics_text(p) -> defer.Deferred:
    return threads.deferToThread(p.http_path, "/metrics").addCallback(
        lambda r: r[2].decode())


def sample(text: str, name: str) -> float | None:
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[-1])
    return None


# -- forward and deny_commands -------------------------------------------------------------


@inline
def test_forward_read_refuses_writes(start_proxy, redis_db, clients):
    redis_db.set("ro:k", "v")
    redis_db.hset("ro:h", "f", "1")
    p = start_proxy(forward="read")
    c = yield clients(p.resp_port)
    assert (yield c.call("SET", "ro:k", "w")) == (
        b"-ERR redisp forwards read-only commands only: 'set'\r\n")
    assert (yield c.call("multi")) == b"-ERR redisp forwards read-only commands only: 'multi'\r\n"
    assert (yield c.call("GET", "ro:k")) == b"$1\r\nv\r\n"
    assert (yield c.call("HGET", "ro:h", "f")) == b"$1\r\n1\r\n"
    assert (yield c.call("EXISTS", "ro:k", "ro:h")) == b":2\r\n"
    assert (yield c.call("EVAL_RO", "return 1", "0")) == b":1\r\n"
    assert (yield c.call("COMMAND", "COUNT")).startswith(b":")  # the table itself
    assert redis_db.get("ro:k") == b"v"
    assert p.proxy.metrics.forwarded["set", "refused"] == 1


@inline
def test_forward_none_answers_unknown_command_as_redis(start_proxy, redis_db, redis_server,
                                                       clients):
    redis_db.set("no:k", "v")
    p = start_proxy(forward="none")
    c = yield clients(p.resp_port)
    direct = yield clients(redis_server.port)
    got = yield c.call("SET", "no:k", "w")
    assert got == b"-ERR unknown command 'SET', with args beginning with: 'no:k' 'w' \r\n"
    # the same wording Redis uses for a command it does not know
    assert (yield direct.call("NOSUCH", "no:k", "w")) == got.replace(b"SET", b"NOSUCH")
    assert (yield c.call("GET", "no:k")) == b"$1\r\nv\r\n"
    assert (yield c.call("SELECT", "1")).startswith(b"-ERR DB index is out of range")
    assert redis_db.get("no:k") == b"v"
    assert p.proxy.forwarder is None


@inline
def test_deny_commands(start_proxy, redis_db, clients):
    redis_db.set("dn:k", "v")
    p = start_proxy(deny_commands=("FLUSHALL", "keys"))
    c = yield clients(p.resp_port)
    denied = b"-ERR command '%s' is not allowed through redisp\r\n"
    assert (yield c.call("flushall")) == denied % b"flushall"
    assert (yield c.call("KEYS", "*")) == denied % b"keys"
    assert redis_db.get("dn:k") == b"v"
    # DEBUG is no longer in the list: Redis itself answers it
    assert (yield c.call("DEBUG", "SLEEP", "0")).startswith(b"-ERR DEBUG command not allowed")
    default = start_proxy()
    d = yield clients(default.resp_port)
    assert (yield d.call("SHUTDOWN")) == denied % b"shutdown"
    assert (yield d.call("debug", "sleep", "0")) == denied % b"debug"
    assert (yield d.call("REPLICAOF", "no", "one")).startswith(b"-ERR command 'replicaof'")


# -- metrics -------------------------------------------------------------------------------


@inline
def test_forwarding_metrics(start_proxy, redis_db, clients):
    p = start_proxy()
    c = yield clients(p.resp_port)
    yield c.pipeline(["SET", "mt:k", "1"], ["SET", "mt:j", "2"], ["GET", "mt:k"],
                     ["HSET", "mt:h", "f", "v"], ["INCR", "mt:h"], ["FOOBAR"], ["DEBUG", "x"],
                     ["DEL", "mt:k", "mt:j"])
    text = yield metrics_text(p)
    for name, value in [
        ('redisp_forwarded_commands_total{command="set",outcome="ok"}', 2),
        ('redisp_forwarded_commands_total{command="hset",outcome="ok"}', 1),
        ('redisp_forwarded_commands_total{command="incr",outcome="error"}', 1),
        ('redisp_forwarded_commands_total{command="unknown",outcome="error"}', 1),
        ('redisp_forwarded_commands_total{command="debug",outcome="refused"}', 1),
        # k, j, h, h (a write answered with an error is dropped too: a
        # script may fail after writing), k, j; FOOBAR, unknown, flushes nothing
        ('redisp_invalidations_total{cause="write"}', 6),
        ('redisp_invalidations_total{cause="flush"}', 0),
        ('redisp_pinned_clients', 0),
    ]:
        assert sample(text, name) == value, name
    yield c.call("MULTI")
    text = yield metrics_text(p)
    assert sample(text, "redisp_pinned_clients") == 1
    yield c.pipeline(["FLUSHDB"], ["EXEC"])
    yield until(lambda: p.proxy.metrics.pinned_clients == 0)
    text = yield metrics_text(p)
    assert sample(text, "redisp_pinned_clients") == 0
    assert sample(text, 'redisp_invalidations_total{cause="flush"}') == 1
    assert sample(text, 'redisp_forwarded_commands_total{command="exec",outcome="ok"}') == 1


# -- max_clients and logging ---------------------------------------------------------------


@inline
def test_pinned_connections_count_toward_max_clients(start_proxy, redis_db, clients):
    p = start_proxy(max_clients=3)
    a = yield clients(p.resp_port)
    b = yield clients(p.resp_port)
    assert (yield a.call("MULTI")) == b"+OK\r\n"  # a's pin: the third slot
    full = yield clients(p.resp_port)
    assert (yield full.read()) == [b"-ERR max number of clients reached\r\n"]
    yield full.hung_up()
    assert (yield b.call("WATCH", "mc:k")) == b"-ERR max number of clients reached\r\n"
    assert (yield b.call("SET", "mc:k", "1")) == b"+OK\r\n"  # unpinned commands still work
    assert (yield a.call("EXEC")) == b"*0\r\n"
    yield until(lambda: p.proxy.metrics.pinned_clients == 0)
    assert (yield b.call("WATCH", "mc:k")) == b"+OK\r\n"
    assert p.proxy.metrics.connected_clients == 2 and p.proxy.metrics.pinned_clients == 1


@inline
def test_pinned_connections_log_nothing_each(start_proxy, redis_db, clients):
    lines: list[str] = []

    def observe(event):
        lines.append(formatEvent(event) or "")

    p = start_proxy()
    c = yield clients(p.resp_port)
    yield c.call("PING")
    globalLogPublisher.addObserver(observe)
    try:
        for _ in range(3):
            yield c.pipeline(["MULTI"], ["EXEC"])
            yield until(lambda: p.proxy.metrics.pinned_clients == 0)
    finally:
        globalLogPublisher.removeObserver(observe)
    # (the observer is global: other proxies of the test process log too,
    # so only the pinned connections' own factory is looked for)
    assert not [line for line in lines
                if "OneShotFactory" in line or "OneProtocol" in line], lines


# -- backing down or slow ------------------------------------------------------------------


@pytest.fixture
def own_redis():
    """A redis-server the test may stop and start again on the same port."""
    server = RedisServer().start()
    yield server
    server.stop()


@inline
def test_backing_down_then_back(start_proxy, own_redis, clients):
    p = start_proxy(own_redis.url, redis_timeout=2.0)
    c = yield clients(p.resp_port)
    assert (yield c.call("SET", "bd:k", "1")) == b"+OK\r\n"
    own_redis.stop()
    unavailable = b"-ERR backing redis unavailable ("
    for argv in (["SET", "bd:k", "2"], ["INCR", "bd:n"], ["MULTI"], ["BLPOP", "bd:q", "0"],
                 ["SUBSCRIBE", "bd:ch"], ["HGETALL", "bd:h"]):
        got = yield c.call(*argv)
        assert got.startswith(unavailable), (argv, got)
    yield until(lambda: p.proxy.metrics.pinned_clients == 0)
    assert p.proxy.metrics.forwarded["set", "backing_error"] >= 1
    own_redis.start()

    @defer.inlineCallbacks
    def recovered():
        while True:
            got = yield c.call("SET", "bd:k", "3")
            if got == b"+OK\r\n":
                return
            assert got.startswith(unavailable), got
            yield until(lambda: True)  # one reactor turn between tries

    yield recovered()
    assert (yield c.pipeline(["MULTI"], ["INCR", "bd:n"], ["EXEC"])) == [
        b"+OK\r\n", b"+QUEUED\r\n", b"*1\r\n:1\r\n"]


@inline
def test_blocked_client_gets_an_error_when_the_backing_goes(start_proxy, own_redis, clients):
    p = start_proxy(own_redis.url)
    c = yield clients(p.resp_port)
    c.send(["BLPOP", "bg:q", "0"])
    yield until(lambda: p.proxy.metrics.pinned_clients == 1)
    yield until(lambda: p.proxy.forwarder is not None and c.transport is not None
                and _backing_blocked(own_redis))
    own_redis.stop()
    [got] = yield c.read()
    assert got.startswith(b"-ERR backing redis unavailable (")
    yield until(lambda: p.proxy.metrics.pinned_clients == 0)


def _backing_blocked(server: RedisServer) -> bool:
    client = server.client()
    try:
        return any(cl["cmd"] == "blpop" for cl in client.client_list())
    finally:
        client.close()


@inline
def test_backing_timing_out_then_answering_again(start_proxy, redis_server, redis_db, clients):
    holder = HoldingForwarder(redis_server.port)
    try:
        p = start_proxy(holder.url, redis_timeout=0.3)
        c = yield clients(p.resp_port)
        pinned = yield clients(p.resp_port)
        assert (yield c.call("SET", "to:k", "1")) == b"+OK\r\n"  # pool and table ready
        assert (yield pinned.call("WATCH", "to:k")) == b"+OK\r\n"
        holder.hold()
        timed_out = b"-ERR backing redis timed out after 0.3s\r\n"
        assert (yield c.call("SET", "to:k", "2")) == timed_out
        assert (yield pinned.call("GET", "to:k")) == timed_out  # on its pinned connection
        assert p.proxy.metrics.forwarded["set", "backing_error"] == 1
        # the timed-out SET may have run: its key is not served from the cache
        assert p.proxy.cache.get(b"to:k") is None
        assert p.proxy.backing.state == "stalled"  # the timeout stalls misses too (SPEC §9)
        holder.release()
        yield until(lambda: p.proxy.backing.up)  # the probe PING answered
        assert (yield c.call("GET", "to:k")) == b"$1\r\n2\r\n"
        assert (yield c.call("SET", "to:k", "3")) == b"+OK\r\n"
        assert (yield pinned.call("UNWATCH")) == b"+OK\r\n"
        yield until(lambda: p.proxy.metrics.pinned_clients == 0)
    finally:
        yield holder.stop()


@inline
def test_a_blocking_commands_own_timeout_is_added_to_redis_timeout(start_proxy, redis_server,
                                                                   redis_db, clients):
    p = start_proxy(redis_timeout=0.2)
    c = yield clients(p.resp_port)
    # 0.5 s of BLPOP timeout is more than redis_timeout: Redis's nil, not our timeout
    assert (yield c.call("BLPOP", "bt:q", "0.5")) == b"*-1\r\n"
