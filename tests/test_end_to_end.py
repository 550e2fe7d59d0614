"""redisp in front of a real redis-server, through real clients.

The proxy runs in-process on the real reactor (pytest-twisted); blocking
clients (redis-py, redis-cli, http.client) run in threads so the reactor
keeps serving.  Nothing here asserts a time.
"""

from __future__ import annotations

import shutil
import subprocess

import pytest
import pytest_twisted
import redis
from twisted.internet import threads
from twisted.internet.task import Clock

import redisp
from tests.support import HoldingForwarder, RedisServer, free_port, until

inline = pytest_twisted.inlineCallbacks


def in_thread(f, *args, **kwargs):
    return threads.deferToThread(f, *args, **kwargs)


@inline
def test_resp_get_miss_then_hit_and_absent(redis_db, start_proxy):
    redis_db.set("abc", "007")
    p = start_proxy()
    yield until(lambda: p.proxy.backing.up)
    client = p.redis_py()
    assert (yield in_thread(client.get, "abc")) == b"007"
    assert (yield in_thread(client.get, "abc")) == b"007"
    assert (yield in_thread(client.get, "nope")) is None
    m = p.proxy.metrics
    assert (m.cache_misses, m.cache_hits) == (2, 1)
    client.close()


@inline
def test_http_get_reports_miss_then_hit_and_404(redis_db, start_proxy):
    redis_db.set("k", b"\x00\xffbinary")
    p = start_proxy()
    yield until(lambda: p.proxy.backing.up)
    status, headers, body = yield in_thread(p.http_get, "k")
    assert (status, headers["X-Cache"], body) == (200, "MISS", b"\x00\xffbinary")
    assert headers["Content-Type"] == "application/octet-stream"
    status, headers, body = yield in_thread(p.http_get, "k")
    assert (status, headers["X-Cache"]) == (200, "HIT")
    status, _, _ = yield in_thread(p.http_get, "absent")
    assert status == 404


@inline
def test_one_cache_serves_both_doors(redis_db, start_proxy):
    redis_db.set("shared", "v1")
    p = start_proxy()
    yield until(lambda: p.proxy.backing.up)
    _, headers, _ = yield in_thread(p.http_get, "shared")
    assert headers["X-Cache"] == "MISS"
    redis_db.set("shared", "v2")  # the cache still holds v1: proof the RESP GET hit it
    assert (yield in_thread(p.redis_py().get, "shared")) == b"v1"
    assert p.proxy.metrics.cache_hits == 1


@inline
def test_binary_keys_and_values_round_trip(redis_db, start_proxy):
    key, value = b"k\x00\r\n\xff ey", bytes(range(256)) * 10
    redis_db.set(key, value)
    p = start_proxy()
    yield until(lambda: p.proxy.backing.up)
    assert (yield in_thread(p.redis_py().get, key)) == value
    status, _, body = yield in_thread(p.http_get, key.decode("latin-1"))
    # http_get percent-encodes the str as UTF-8; ask with the raw bytes instead
    from urllib.parse import quote_from_bytes

    status, _, body = yield in_thread(p.http_path, "/get?key=" + quote_from_bytes(key, safe=""))
    assert (status, body) == (200, value)


@inline
def test_ttl_expires_entries_on_the_cache_clock(redis_db, start_proxy):
    redis_db.set("k", "old")
    clock = Clock()
    p = start_proxy(cache_clock=clock, ttl=5.0)
    yield until(lambda: p.proxy.backing.up)
    client = p.redis_py()
    assert (yield in_thread(client.get, "k")) == b"old"
    redis_db.set("k", "new")
    clock.advance(4.9)
    assert (yield in_thread(client.get, "k")) == b"old"
    clock.advance(0.1)
    assert (yield in_thread(client.get, "k")) == b"new"
    assert p.proxy.metrics.cache_expirations == 1


@inline
def test_lru_evicts_the_least_recently_used_key(redis_db, start_proxy):
    for k in "abc":
        redis_db.set(k, k)
    p = start_proxy(capacity=2)
    yield until(lambda: p.proxy.backing.up)
    client = p.redis_py()
    for k in "aba":
        yield in_thread(client.get, k)
    yield in_thread(client.get, "c")  # evicts b, the least recently used
    before = p.proxy.metrics.cache_misses
    assert (yield in_thread(client.get, "a")) == b"a"
    assert p.proxy.metrics.cache_misses == before
    assert (yield in_thread(client.get, "b")) == b"b"
    assert p.proxy.metrics.cache_misses == before + 1
    assert p.proxy.metrics.cache_evictions >= 1


@inline
def test_capacity_zero_passes_every_get_through(redis_db, start_proxy):
    redis_db.set("k", "v")
    p = start_proxy(capacity=0)
    yield until(lambda: p.proxy.backing.up)
    for _ in range(3):
        assert (yield in_thread(p.redis_py().get, "k")) == b"v"
    assert p.proxy.metrics.cache_misses == 3


@inline
def test_single_client_rule_queues_a_hit_behind_a_slow_miss(redis_server, redis_db, start_proxy):
    """concurrency 1: a cached key asked for on the other door waits for the miss."""
    redis_db.set("slow", "s")
    redis_db.set("cached", "c")
    forwarder = HoldingForwarder(redis_server.port)
    try:
        p = start_proxy(redis_url=forwarder.url, concurrency=1, redis_timeout=30.0)
        yield until(lambda: p.proxy.backing.up)
        yield in_thread(p.http_get, "cached")  # now cached
        yield until(p.proxy.gate.idle)  # its gate token back (released on the next turn)
        client = yield in_thread(p.connected_redis_py)
        forwarder.hold()
        slow = in_thread(client.get, "slow")
        # the miss holds the gate (not idle() alone: the first request's token
        # comes back a reactor turn after its reply)
        yield until(lambda: p.proxy.metrics.cache_misses == 2 and not p.proxy.gate.idle())
        hit = in_thread(p.http_get, "cached")
        yield until(lambda: p.proxy.gate.waiting == 1)
        assert not hit.called, "the hit overtook the miss in flight"
        forwarder.release()
        assert (yield slow) == b"s"
        status, headers, body = yield hit
        assert (status, headers["X-Cache"], body) == (200, "HIT", b"c")
    finally:
        yield forwarder.stop()


@inline
def test_concurrent_misses_of_one_key_share_one_backing_get(redis_server, redis_db, start_proxy):
    redis_db.set("k", "v")
    forwarder = HoldingForwarder(redis_server.port)
    try:
        p = start_proxy(redis_url=forwarder.url, concurrency=8, redis_timeout=30.0)
        yield until(lambda: p.proxy.backing.up)
        redis_db.config_resetstat()
        connected = []
        for _ in range(5):
            connected.append((yield in_thread(p.connected_redis_py)))
        forwarder.hold()
        clients = [in_thread(c.get, "k") for c in connected]
        yield until(lambda: p.proxy.metrics.cache_misses == 5)
        forwarder.release()
        for d in clients:
            assert (yield d) == b"v"
        assert redis_db.info("commandstats")["cmdstat_get"]["calls"] == 1
    finally:
        yield forwarder.stop()


@inline
def test_slow_backing_times_out_with_504_and_err(redis_server, redis_db, start_proxy):
    redis_db.set("k", "v")
    forwarder = HoldingForwarder(redis_server.port)
    try:
        p = start_proxy(redis_url=forwarder.url, redis_timeout=0.3)
        yield until(lambda: p.proxy.backing.up)
        forwarder.hold()
        status, _, body = yield in_thread(p.http_get, "k")
        assert status == 504 and b"timed out" in body
        forwarder.release()
        yield until(lambda: p.proxy.backing.up)
        client = yield in_thread(p.connected_redis_py)
        with pytest.raises(redis.ResponseError, match="timed out|unavailable") as e:
            forwarder.hold()
            yield in_thread(client.get, "k2")
        forwarder.release()
        assert "backing redis" in str(e.value)
        yield until(lambda: p.proxy.backing.up)
        assert (yield in_thread(p.redis_py().get, "k")) == b"v"
    finally:
        yield forwarder.stop()


@inline
def test_misses_of_one_turn_share_an_mget_and_keep_gets_answers(redis_db, start_proxy):
    """Batched as one MGET, each GET still gets its own answer: value, nil, WRONGTYPE."""
    redis_db.set("str", "v")
    redis_db.lpush("list", "x")
    p = start_proxy(capacity=0, concurrency=64)
    yield until(lambda: p.proxy.backing.up)
    redis_db.config_resetstat()

    def pipelined():
        pipe = p.redis_py().pipeline(transaction=False)  # one packet, one reactor turn
        for key in ("str", "absent", "list", "str"):
            pipe.get(key)
        return pipe.execute(raise_on_error=False)

    value, absent, wrongtype, again = yield in_thread(pipelined)
    assert (value, absent, again) == (b"v", None, b"v")
    assert isinstance(wrongtype, redis.ResponseError) and "WRONGTYPE" in str(wrongtype)
    stats = redis_db.info("commandstats")
    assert stats["cmdstat_mget"]["calls"] == 1
    assert stats["cmdstat_get"]["calls"] == 2, "only the two nils are asked again"


@inline
def test_wrongtype_is_reported_with_redis_text(redis_db, start_proxy):
    redis_db.lpush("list", "x")
    p = start_proxy()
    yield until(lambda: p.proxy.backing.up)
    status, _, body = yield in_thread(p.http_get, "list")
    assert status == 502 and b"WRONGTYPE" in body
    with pytest.raises(redis.ResponseError, match="WRONGTYPE"):
        yield in_thread(p.redis_py().get, "list")
    assert (yield in_thread(p.redis_py().mget, "list", "none")) == [None, None]


@inline
def test_batched_misses_fail_cleanly_while_redis_is_down_and_recover(start_proxy):
    """A packet of misses (one gate entry, one MGET) while Redis is down: every
    GET gets the unavailable error, the process stays up, and the same
    packet reads every value once Redis is back."""
    server = RedisServer().start()
    try:
        server.client().mset({"a": "1", "b": "2", "c": "3"})
        p = start_proxy(redis_url=server.url, capacity=0, concurrency=64)
        yield until(lambda: p.proxy.backing.up)

        def pipelined():
            pipe = p.redis_py().pipeline(transaction=False)
            for key in ("a", "b", "c", "a"):
                pipe.get(key)
            return pipe.execute(raise_on_error=False)

        assert (yield in_thread(pipelined)) == [b"1", b"2", b"3", b"1"]
        server.stop()
        yield until(lambda: not p.proxy.backing.up)
        answers = yield in_thread(pipelined)
        assert all(isinstance(a, redis.ResponseError) for a in answers), answers
        assert all("backing redis unavailable" in str(a) for a in answers)
        server.start()
        server.client().mset({"a": "1", "b": "2", "c": "3"})
        yield until(lambda: p.proxy.backing.up)
        assert (yield in_thread(pipelined)) == [b"1", b"2", b"3", b"1"]
    finally:
        server.stop()


@inline
def test_a_batched_mget_that_times_out_fails_each_get_and_recovers(redis_server, redis_db,
                                                                   start_proxy):
    redis_db.mset({"a": "1", "b": "2"})
    forwarder = HoldingForwarder(redis_server.port)
    try:
        p = start_proxy(redis_url=forwarder.url, capacity=0, concurrency=64, redis_timeout=0.3)
        yield until(lambda: p.proxy.backing.up)

        client = yield in_thread(p.connected_redis_py)

        def pipelined():
            pipe = client.pipeline(transaction=False)
            pipe.get("a")
            pipe.get("b")
            return pipe.execute(raise_on_error=False)

        forwarder.hold()
        answers = yield in_thread(pipelined)
        forwarder.release()
        assert all(isinstance(a, redis.ResponseError) for a in answers), answers
        assert all("timed out" in str(a) for a in answers)
        yield until(lambda: p.proxy.backing.up)
        assert (yield in_thread(pipelined)) == [b"1", b"2"]
    finally:
        yield forwarder.stop()


@inline
def test_backing_stopped_and_restarted_mid_run(start_proxy):
    server = RedisServer().start()
    try:
        server.client().set("k", "v")
        p = start_proxy(redis_url=server.url, capacity=0)
        yield until(lambda: p.proxy.backing.up)
        assert (yield in_thread(p.redis_py().get, "k")) == b"v"
        server.stop()
        yield until(lambda: not p.proxy.backing.up)
        status, _, body = yield in_thread(p.http_get, "k")
        assert status == 503 and b"unavailable" in body
        with pytest.raises(redis.ResponseError, match="backing redis unavailable"):
            yield in_thread(p.redis_py().get, "k")
        status, _, _ = yield in_thread(p.http_path, "/healthz")
        assert status == 503
        server.start()
        server.client().set("k", "back")
        yield until(lambda: p.proxy.backing.up)
        assert (yield in_thread(p.redis_py().get, "k")) == b"back"
        status, _, _ = yield in_thread(p.http_path, "/healthz")
        assert status == 200
    finally:
        server.stop()


@inline
def test_backing_down_at_start_up_then_recovers(start_proxy):
    server = RedisServer()
    p = start_proxy(redis_url=server.url)
    yield until(lambda: p.proxy.backing._down_reason is not None)
    status, _, body = yield in_thread(p.http_get, "k")
    assert status == 503
    server.start()
    try:
        server.client().set("k", "v")
        yield until(lambda: p.proxy.backing.up)
        assert (yield in_thread(p.http_get, "k"))[2] == b"v"
    finally:
        server.stop()


@inline
def test_password_and_db_from_the_url(start_proxy):
    server = RedisServer(None, "--requirepass", "s3cret").start()
    try:
        admin = redis.Redis(port=server.port, password="s3cret", db=2)
        admin.set("k", "in-db-2")
        p = start_proxy(redis_url=f"redis://:s3cret@127.0.0.1:{server.port}/2")
        yield until(lambda: p.proxy.backing.up)
        assert (yield in_thread(p.redis_py().get, "k")) == b"in-db-2"
    finally:
        server.stop()


@inline
def test_redis_py_resp3_and_both_parsers(redis_db, start_proxy):
    from redis._parsers import _RESP2Parser, _RESP3Parser

    redis_db.set("k", "v")
    p = start_proxy()
    yield until(lambda: p.proxy.backing.up)
    for kwargs in ({"protocol": 3}, {"protocol": 2},
                   {"protocol": 3, "parser_class": _RESP3Parser},
                   {"protocol": 2, "parser_class": _RESP2Parser}):
        pool = redis.ConnectionPool(host="127.0.0.1", port=p.resp_port, **kwargs)
        client = redis.Redis(connection_pool=pool)
        assert (yield in_thread(client.get, "k")) == b"v", kwargs
        assert (yield in_thread(client.get, "absent")) is None, kwargs
        assert (yield in_thread(client.mget, "k", "absent")) == [b"v", None], kwargs
        assert (yield in_thread(client.ping)) is True
        info = yield in_thread(client.info)
        assert "redis_version" in info
        client.close()


def redis_cli(port: int, *args: str, stdin: bytes | None = None) -> str:
    return subprocess.run(
        ["redis-cli", "-h", "127.0.0.1", "-p", str(port), *args], input=stdin,
        capture_output=True, timeout=30, check=True,
    ).stdout.decode()


needs_redis_tools = pytest.mark.skipif(
    not shutil.which("redis-cli") or not shutil.which("redis-benchmark"),
    reason="redis-cli/redis-benchmark not installed (scripts/test installs redis-tools)",
)


@needs_redis_tools
@inline
def test_redis_cli_one_shot_commands(redis_db, start_proxy):
    redis_db.set("abc", "hello")
    p = start_proxy()
    yield until(lambda: p.proxy.backing.up)
    port = p.resp_port
    assert (yield in_thread(redis_cli, port, "GET", "abc")) == "hello\n"
    assert (yield in_thread(redis_cli, port, "GET", "none")) == "\n"
    assert (yield in_thread(redis_cli, port, "PING")) == "PONG\n"
    info = yield in_thread(redis_cli, port, "INFO")
    assert "# Server" in info and "# Proxy" in info
    out = yield in_thread(redis_cli, port, stdin=b"GET abc\nMGET abc none\nFOO bar\n")
    assert out.splitlines()[:3] == ["hello", "hello", ""]
    assert "ERR unknown command 'FOO'" in out


@needs_redis_tools
@inline
def test_redis_benchmark_runs_without_errors(redis_db, start_proxy):
    redis_db.set("key:__rand_int__", "x")
    p = start_proxy()
    yield until(lambda: p.proxy.backing.up)
    for pipeline in ("1", "16"):
        out = yield in_thread(subprocess.run, [
            "redis-benchmark", "-h", "127.0.0.1", "-p", str(p.resp_port), "-n", "2000",
            "-c", "10", "-P", pipeline, "-q", "-t", "get", "--csv"],
            capture_output=True, timeout=60)
        assert out.returncode == 0, out.stderr
        assert b"ERR" not in out.stdout + out.stderr
    assert p.proxy.metrics.requests["resp", "hit"] > 0


@inline
def test_max_clients_is_shared_by_both_doors(redis_db, start_proxy):
    p = start_proxy(max_clients=1)
    yield until(lambda: p.proxy.backing.up)
    holder = yield in_thread(p.redis_py, single_connection_client=True)
    assert (yield in_thread(holder.ping)) is True
    status, _, _ = yield in_thread(p.http_path, "/healthz")
    assert status == 503
    with pytest.raises(redis.ConnectionError, match="max number of clients"):
        yield in_thread(p.redis_py(protocol=2).get, "k")
    holder.close()
    yield until(lambda: p.proxy.metrics.connected_clients == 0)
    status, _, _ = yield in_thread(p.http_path, "/healthz")
    assert status == 200


@inline
def test_metrics_endpoint_reports_counters(redis_db, start_proxy):
    redis_db.set("k", "v")
    p = start_proxy()
    yield until(lambda: p.proxy.backing.up)
    yield in_thread(p.http_get, "k")
    yield in_thread(p.redis_py().get, "k")
    status, headers, body = yield in_thread(p.http_path, "/metrics")
    text = body.decode()
    assert status == 200 and headers["Content-Type"].startswith("text/plain")
    assert 'redisp_requests_total{door="http",outcome="miss"} 1.0' in text
    assert 'redisp_requests_total{door="resp",outcome="hit"} 1.0' in text
    assert "redisp_cache_hits_total 1.0" in text
    assert "redisp_backing_latency_seconds_bucket" in text
    assert "redisp_cache_size 1.0" in text


def test_free_port_is_loopback():
    assert 0 < free_port() < 65536


@inline
def test_the_backing_connection_does_not_wait_for_nagle(redis_db, start_proxy):
    import socket

    p = start_proxy()
    yield until(lambda: p.proxy.backing.up)
    handle = p.proxy.backing._protocol.transport.getHandle()
    assert handle.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) != 0


@inline
def test_info_is_the_backings_own_with_the_proxy_section(redis_db, start_proxy):
    """Clients read the backing's version, memory and keyspace; redisp adds # Proxy."""
    redis_db.set("info-key", "v")
    p = start_proxy()
    yield until(lambda: p.proxy.backing.up)
    info = yield in_thread(p.redis_py().info)
    direct = redis_db.info()
    assert info["redis_version"] == direct["redis_version"]
    assert info["arch_bits"] == direct["arch_bits"]
    assert info["db0"]["keys"] >= 1
    assert info["redisp_version"] == redisp.__version__ and info["forward"] == "all"
    server = yield in_thread(p.redis_py().info, "server")
    assert "redisp_version" not in server and server["redis_version"] == direct["redis_version"]
    proxy = yield in_thread(p.redis_py().info, "proxy")
    assert set(proxy) >= {"redisp_version", "cache_size", "pinned_clients", "backing_status"}
