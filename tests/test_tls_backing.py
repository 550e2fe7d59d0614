"""TLS to the backing (SPEC §8): redisp in front of a redis-server that speaks
only TLS (``--port 0 --tls-port N``), through ``rediss://``.

The data, forwarding and tracking connections all go through TLS; a
certificate that does not verify is "unavailable" with its reason, in the
reply and once in the log, never a traceback.  Every key and certificate
is made by the test (tests/tls_support.py).
"""

from __future__ import annotations

import pytest
import pytest_twisted
import redis
from twisted.internet import defer, threads
from twisted.logger import LogLevel, formatEvent, globalLogPublisher

from tests.support import until
from tests.tls_support import TLSRedisServer, make_tls_files

inline = pytest_twisted.inlineCallbacks


def in_thread(f, *args, **kwargs):
    return threads.deferToThread(f, *args, **kwargs)


@pytest.fixture(scope="module")
def tls_files(tmp_path_factory):
    return make_tls_files(tmp_path_factory.mktemp("tls"))


@pytest.fixture(scope="module")
def tls_redis(tls_files):
    """Client certificates optional: redisp may connect with or without one."""
    server = TLSRedisServer(tls_files, auth_clients="optional").start()
    yield server
    server.stop()


@pytest.fixture
def tls_db(tls_redis):
    client = tls_redis.client()
    client.flushall()
    yield client
    client.close()


@pytest.fixture
def logged():
    events: list[dict] = []
    globalLogPublisher.addObserver(events.append)
    yield events
    globalLogPublisher.removeObserver(events.append)


def warnings(events, about: str) -> list[str]:
    return [formatEvent(e) for e in events
            if e.get("log_level") in (LogLevel.warn, LogLevel.error)
            and about in formatEvent(e)]


def retries(events) -> int:
    """Connection attempts the data connection has made again (ClientService says each)."""
    return sum(1 for e in events if "Scheduling retry" in e.get("log_format", ""))


def assert_no_traceback(events):
    assert [e for e in events if "log_failure" in e] == []


# -- it works -----------------------------------------------------------------------------


@inline
def test_get_miss_then_hit_over_rediss(tls_files, tls_db, tls_redis, start_proxy):
    tls_db.set("k", b"\x00v")
    p = start_proxy(redis_url=tls_redis.url, redis_tls_ca=tls_files.ca)
    yield until(lambda: p.proxy.backing.up)
    client = p.redis_py()
    assert (yield in_thread(client.get, "k")) == b"\x00v"
    assert (yield in_thread(client.get, "k")) == b"\x00v"
    assert (yield in_thread(client.get, "absent")) is None
    assert (p.proxy.metrics.cache_misses, p.proxy.metrics.cache_hits) == (2, 1)
    status, headers, body = yield in_thread(p.http_get, "k")
    assert (status, headers["X-Cache"], body) == (200, "HIT", b"\x00v")
    client.close()


@inline
def test_backing_sockets_are_tuned_under_tls(tls_files, tls_db, tls_redis, start_proxy):
    """TCP_NODELAY reaches the TCP socket under the TLS layer."""
    import socket

    from redisp.backing.tls import tcp_transport

    p = start_proxy(redis_url=tls_redis.url, redis_tls_ca=tls_files.ca)
    yield until(lambda: p.proxy.backing.up)
    sock = tcp_transport(p.proxy.backing._protocol.transport).getHandle()
    assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)
    assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE)
    client = p.redis_py(protocol=2)
    assert (yield in_thread(client.set, "k", "v")) is True  # through the forwarding pool
    pool = p.proxy.forwarder.pool
    (relay,) = [c for c in (pool.connection(lane) for lane in range(pool.size)) if c is not None]
    sock = tcp_transport(relay.transport).getHandle()
    assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)
    client.close()


@inline
def test_a_forwarded_write_goes_through_tls_and_drops_the_key(
        tls_files, tls_db, tls_redis, start_proxy):
    tls_db.set("k", "old")
    p = start_proxy(redis_url=tls_redis.url, redis_tls_ca=tls_files.ca)
    yield until(lambda: p.proxy.backing.up)
    client = p.redis_py()
    assert (yield in_thread(client.get, "k")) == b"old"
    assert (yield in_thread(client.set, "k", "new")) is True
    assert tls_db.get("k") == b"new"
    assert (yield in_thread(client.get, "k")) == b"new"
    assert (yield in_thread(client.incr, "n")) == 1
    # a pinned connection (MULTI) is a TLS connection too
    pipe = client.pipeline(transaction=True)
    pipe.set("a", "1").get("a")
    assert (yield in_thread(pipe.execute)) == [True, b"1"]
    client.close()


@inline
def test_tracking_over_tls_drops_a_key_written_directly_in_redis(
        tls_files, tls_db, tls_redis, start_proxy):
    tls_db.set("k", "old")
    p = start_proxy(redis_url=tls_redis.url, redis_tls_ca=tls_files.ca, invalidation="tracking")
    yield until(lambda: p.proxy.backing.up and p.proxy.invalidator.active)
    client = p.redis_py()
    assert (yield in_thread(client.get, "k")) == b"old"
    assert len(p.proxy.cache) == 1
    tls_db.set("k", "new")
    yield until(lambda: len(p.proxy.cache) == 0)
    assert (yield in_thread(client.get, "k")) == b"new"
    client.close()


@inline
def test_an_invalidation_waiting_in_the_tls_socket_is_taken_in_before_a_hit(
        tls_files, tls_db, tls_redis, start_proxy):
    """Read-after-write over TLS: the invalidation's TLS record sits unread in
    redisp's socket (the reactor has not run since the write); a lookup now
    hands it to the TLS layer first, and misses."""
    import select

    from twisted.internet import reactor, task

    from redisp.backing.tls import tcp_transport

    tls_db.set("k", "old")
    p = start_proxy(redis_url=tls_redis.url, redis_tls_ca=tls_files.ca,
                    invalidation="tracking")
    yield until(lambda: p.proxy.backing.up and p.proxy.invalidator.active)
    client = p.redis_py()
    assert (yield in_thread(client.get, "k")) == b"old"
    assert len(p.proxy.cache) == 1
    invalidator = p.proxy.invalidator
    invalidator._cancel_ping()  # nothing but the invalidation may arrive on that socket
    yield task.deferLater(reactor, 0.01, lambda: None)  # a turn without a lookup: the drain re-arms
    sock = tcp_transport(invalidator._protocol.transport).getHandle()
    tls_db.set("k", "new")  # blocking: the reactor does not run until the lookup
    assert select.select([sock], [], [], 5.0)[0], "the invalidation did not arrive"
    assert p.proxy.reader.read(b"k") is None
    assert (yield in_thread(client.get, "k")) == b"new"
    client.close()


@inline
def test_tracking_start_up_check_speaks_tls(tls_files, tls_redis):
    from dataclasses import replace

    from redisp.backing.tls import ClientTLS
    from redisp.config import parse_redis_url
    from redisp.core.tracking import tracking_support_problem

    url = replace(parse_redis_url(tls_redis.url), tls_client=ClientTLS(tls_files.ca))
    assert tracking_support_problem(url, 2.0) is None
    wrong = replace(url, password="nope")
    problem = tracking_support_problem(wrong, 2.0)
    assert problem is not None and "refused our credentials" in problem and "nope" not in problem
    yield defer.succeed(None)


@inline
def test_a_client_certificate_is_presented_when_the_backing_requires_one(
        tls_files, start_proxy):
    server = TLSRedisServer(tls_files, auth_clients="yes").start()
    try:
        server.client().set("k", "v")
        p = start_proxy(redis_url=server.url, redis_tls_ca=tls_files.ca,
                        redis_tls_cert=tls_files.client_cert, redis_tls_key=tls_files.client_key,
                        invalidation="tracking")
        yield until(lambda: p.proxy.backing.up and p.proxy.invalidator.active)
        client = p.redis_py()
        assert (yield in_thread(client.get, "k")) == b"v"
        assert (yield in_thread(client.set, "k2", "w")) is True
        client.close()
    finally:
        server.stop()


@inline
def test_without_the_client_certificate_the_backing_is_unavailable_with_the_reason(
        tls_files, start_proxy, logged):
    """TLS 1.3: the server refuses the missing certificate after our side of
    the handshake is done; the reason still reaches the reply and the log."""
    server = TLSRedisServer(tls_files, auth_clients="yes").start()
    try:
        p = start_proxy(redis_url=server.url, redis_tls_ca=tls_files.ca,
                        invalidation="tracking")
        client = p.redis_py(protocol=2)
        with pytest.raises(redis.ResponseError, match="certificate required") as e:
            yield in_thread(client.get, "k")
        assert "backing redis unavailable (TLS" in str(e.value)
        yield until(lambda: retries(logged) >= 3)  # it keeps trying, and says it once
        with pytest.raises(redis.ResponseError, match="certificate required"):
            yield in_thread(client.set, "k", "v")
        client.close()
    finally:
        server.stop()
    lines = warnings(logged, "certificate required")
    assert lines and len(lines) == len(set(lines)), lines
    assert warnings(logged, "Lost connection") == [], "each connection says why"
    assert_no_traceback(logged)


# -- a certificate that does not verify ------------------------------------------------------


@inline
def test_a_backing_certificate_from_another_ca_is_unavailable_once_in_the_log(
        tls_files, tls_db, tls_redis, start_proxy, logged):
    tls_db.set("k", "v")
    p = start_proxy(redis_url=tls_redis.url, redis_tls_ca=tls_files.other_ca)
    client = p.redis_py(protocol=2)
    with pytest.raises(redis.ResponseError) as e:
        yield in_thread(client.get, "k")
    assert str(e.value) == ("backing redis unavailable (TLS handshake failed: "
                            "certificate verify failed)")
    yield until(lambda: retries(logged) >= 3)  # it keeps trying, and says it once
    with pytest.raises(redis.ResponseError, match="certificate verify failed"):
        yield in_thread(client.set, "k", "w")
    status, _, body = yield in_thread(p.http_get, "k")
    assert status == 503 and b"certificate verify failed" in body
    client.close()
    lines = warnings(logged, "certificate verify failed")
    # the data connection and the forwarding pool each say it once
    assert len(lines) == 2 and len(set(lines)) == 2, lines
    assert all("unavailable" in line and "rediss://127.0.0.1" in line for line in lines)
    assert_no_traceback(logged)
    assert tls_db.get("k") == b"v"


@inline
def test_a_certificate_for_another_host_name_is_refused(tls_files, start_proxy, logged):
    server = TLSRedisServer(tls_files, cert=tls_files.wrong_host_cert,
                            key=tls_files.wrong_host_key).start()
    try:
        p = start_proxy(redis_url=server.url, redis_tls_ca=tls_files.ca,
                        invalidation="tracking")
        client = p.redis_py(protocol=2)
        with pytest.raises(redis.ResponseError) as e:
            yield in_thread(client.get, "k")
        assert "certificate verify failed (not valid for host '127.0.0.1')" in str(e.value)
        assert not p.proxy.invalidator.active
        client.close()
    finally:
        server.stop()
    assert_no_traceback(logged)


@inline
def test_verify_false_accepts_any_certificate(tls_files, tls_db, start_proxy):
    server = TLSRedisServer(tls_files, cert=tls_files.wrong_host_cert,
                            key=tls_files.wrong_host_key).start()
    try:
        server.client(ssl_check_hostname=False).set("k", "v")
        p = start_proxy(redis_url=server.url, redis_tls_ca=tls_files.other_ca,
                        redis_tls_verify=False)
        yield until(lambda: p.proxy.backing.up)
        client = p.redis_py()
        assert (yield in_thread(client.get, "k")) == b"v"
        assert (yield in_thread(client.set, "k", "w")) is True
        client.close()
    finally:
        server.stop()


@inline
def test_rediss_to_a_plain_redis_says_it_is_not_tls(redis_server, start_proxy, logged):
    """The classic mistake: rediss:// in front of a port that speaks plain RESP."""
    p = start_proxy(redis_url=redis_server.url.replace("redis://", "rediss://"),
                    redis_timeout=0.5)
    yield until(lambda: retries(logged) >= 1)
    client = p.redis_py(protocol=2)
    with pytest.raises(redis.ResponseError, match=r"unavailable \(TLS handshake did not "
                                                  r"complete within 0.5s\)"):
        yield in_thread(client.get, "k")
    client.close()
    assert_no_traceback(logged)
