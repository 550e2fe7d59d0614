"""The RESP door's limits end to end: clients that leave, never read, trickle
or sit idle, and huge replies, against a real redis-server over real sockets.

The proxy runs in-process on the real reactor; blocking clients run in
threads.  Nothing here asserts a time: tests wait for an event (a socket
closed, a reply) with a deadline.
"""

from __future__ import annotations

import socket
import ssl
import tracemalloc

import pytest
import pytest_twisted
from twisted.internet import reactor, task, threads

from tests.support import STARTUP_LIMIT, HoldingForwarder, until
from tests.test_resp import encode

inline = pytest_twisted.inlineCallbacks


def in_thread(f, *args, **kwargs):
    return threads.deferToThread(f, *args, **kwargs)


def backing_reads(redis_db) -> int:
    """GET and MGET calls the backing redis-server has run since CONFIG RESETSTAT."""
    stats = redis_db.info("commandstats")
    return sum(stats.get(f"cmdstat_{name}", {}).get("calls", 0) for name in ("get", "mget"))


def wait_closed(sock: socket.socket) -> bytes:
    """Read until the server closes the connection; what it sent before.
    Fails if the connection is still open after STARTUP_LIMIT seconds."""
    sock.settimeout(STARTUP_LIMIT)
    received = b""
    try:
        while chunk := sock.recv(65536):
            received += chunk
    except ConnectionResetError:
        pass
    return received


@inline
def test_a_client_that_pipelines_misses_and_leaves_costs_no_more_backing_calls(
    redis_server, redis_db, start_proxy
):
    """SPEC §4: 200 pipelined misses at concurrency 1, then the client goes:
    only the one already sent reaches Redis, and the next client is next."""
    forwarder = HoldingForwarder(redis_server.port)
    try:
        p = start_proxy(redis_url=forwarder.url, concurrency=1, redis_timeout=30.0)
        yield until(lambda: p.proxy.backing.up)
        redis_db.set("after", "v")
        redis_db.config_resetstat()
        forwarder.hold()
        leaving = socket.create_connection(("127.0.0.1", p.resp_port))
        leaving.sendall(b"".join(encode(b"GET", b"miss:%d" % i) for i in range(200)))
        yield until(lambda: p.proxy.gate.waiting == 199)
        leaving.close()
        yield until(lambda: p.proxy.metrics.connected_clients == 0)
        forwarder.release()
        assert (yield in_thread(p.redis_py().get, "after")) == b"v"
        assert backing_reads(redis_db) == 2, "the GET already sent, and the other client's"
    finally:
        yield forwarder.stop()


def flood(port: int, request: bytes, rounds: int) -> str:
    """Pipeline ``request`` over and over without reading a byte: "closed" if
    the server hangs up on us, "blocked" if it stops reading instead."""
    sock = socket.create_connection(("127.0.0.1", port))
    sock.settimeout(STARTUP_LIMIT)
    try:
        for _ in range(rounds):
            sock.sendall(request)
    except (BrokenPipeError, ConnectionResetError):
        return "closed"
    except TimeoutError:
        return "blocked"
    finally:
        sock.close()
    return "all sent"


@inline
def test_a_client_that_never_reads_is_disconnected_past_max_client_buffer(
    redis_db, start_proxy
):
    """SPEC §9, as Redis's output buffer limits: the flooding client is cut
    off, another client is served meanwhile and after.  (64 KiB: below what
    a client held by backpressure costs, Twisted's send buffer being full.)"""
    value = b"x" * 4096
    redis_db.set("k", value)
    p = start_proxy(max_client_buffer=64 * 1024)
    yield until(lambda: p.proxy.backing.up)
    client = p.redis_py()
    assert (yield in_thread(client.get, "k")) == value  # cached now
    flooding = in_thread(flood, p.resp_port, encode(b"GET", b"k") * 2000, 1000)
    yield until(lambda: p.proxy.metrics.connected_clients == 2 or flooding.called)
    assert (yield in_thread(client.get, "k")) == value
    assert (yield flooding) == "closed"
    assert (yield in_thread(client.get, "k")) == value
    yield until(lambda: p.proxy.metrics.connected_clients == 1)


@inline
def test_a_client_that_never_reads_below_the_limit_costs_about_a_high_water_mark(
    redis_db, start_proxy
):
    """Below max_client_buffer backpressure holds it: redisp stops running
    and reading its requests (its sends block) and keeps serving others; what
    it holds for that client is about a high-water mark, not the replies of
    everything it read (issue 8 item 10)."""
    value = b"x" * 4096
    redis_db.set("k", value)
    p = start_proxy()
    yield until(lambda: p.proxy.backing.up)
    client = p.redis_py()
    assert (yield in_thread(client.get, "k")) == value
    sock = socket.create_connection(("127.0.0.1", p.resp_port))
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 16 * 1024)
    sock.setblocking(False)
    packet = encode(b"GET", b"k") * 2000  # 44 KB of requests, 8 MB of replies
    tracemalloc.start()
    try:
        sent = refused = 0
        while refused < 20:  # refused 20 times in a row, a reactor turn apart
            yield task.deferLater(reactor, 0.01, lambda: None)
            try:
                sent += sock.send(packet)
                refused = 0
            except BlockingIOError:
                refused += 1
            assert sent < 100_000_000, "redisp never stopped reading"
        held = tracemalloc.get_traced_memory()[0]
        assert p.proxy.metrics.cache_hits > 1, "it was served until it stopped reading"
        assert held < 4_000_000, f"{held} bytes held for a client that does not read"
        assert (yield in_thread(client.get, "k")) == value
    finally:
        tracemalloc.stop()
        sock.close()


@inline
def test_an_unfinished_request_is_closed_after_request_timeout(redis_db, start_proxy):
    """Slow-request attacks: the rest of a request never comes."""
    p = start_proxy(request_timeout=0.3)
    yield until(lambda: p.proxy.backing.up)
    sock = socket.create_connection(("127.0.0.1", p.resp_port))
    sock.sendall(b"PING\r\n*2\r\n$3\r\nGET\r\n$1")
    assert (yield in_thread(wait_closed, sock)) == b"+PONG\r\n"
    sock.close()
    assert (yield in_thread(p.redis_py().ping))


@inline
def test_an_idle_client_is_closed_after_client_timeout(redis_db, start_proxy):
    p = start_proxy(client_timeout=0.3)
    yield until(lambda: p.proxy.backing.up)
    sock = socket.create_connection(("127.0.0.1", p.resp_port))
    sock.sendall(b"PING\r\n")
    assert (yield in_thread(wait_closed, sock)) == b"+PONG\r\n"
    sock.close()


@pytest.fixture
def tls_files(tmp_path):
    pytest.importorskip("OpenSSL")
    from tests.test_resp_server import _self_signed_pem

    pem = tmp_path / "redisp.pem"
    pem.write_bytes(_self_signed_pem())
    return pem


@inline
def test_a_tls_handshake_left_unfinished_is_closed_after_request_timeout(
    redis_db, start_proxy, tls_files
):
    endpoint = f"ssl:0:interface=127.0.0.1:privateKey={tls_files}:certKey={tls_files}"
    p = start_proxy(resp=endpoint, request_timeout=0.3)
    yield until(lambda: p.proxy.backing.up)
    stalled = socket.create_connection(("127.0.0.1", p.resp_port))
    stalled.sendall(b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03")  # a ClientHello begun
    assert (yield in_thread(wait_closed, stalled)) == b""
    stalled.close()

    def ping_over_tls() -> bytes:
        context = ssl.create_default_context(cafile=str(tls_files))
        with socket.create_connection(("127.0.0.1", p.resp_port)) as raw:
            with context.wrap_socket(raw, server_hostname="localhost") as tls:
                tls.settimeout(STARTUP_LIMIT)
                tls.sendall(b"PING\r\n")
                return tls.recv(100)

    assert (yield in_thread(ping_over_tls)) == b"+PONG\r\n"


def read_exactly(sock: socket.socket, size: int) -> bytes:
    sock.settimeout(STARTUP_LIMIT)
    data = bytearray()
    while len(data) < size:
        chunk = sock.recv(min(size - len(data), 1 << 20))
        if not chunk:
            raise AssertionError(f"closed after {len(data)} of {size} bytes")
        data += chunk
    return bytes(data)


@pytest.mark.parametrize("form", ["MGET", "pipelined GETs"])
@inline
def test_another_client_is_answered_while_a_large_reply_streams(form, redis_db, start_proxy):
    """SPEC §9: a 16 MiB reply to a client reading slowly holds nobody else."""
    keys = [f"big:{i}" for i in range(64)]
    values = {key: bytes([65 + i % 26]) * (256 * 1024) for i, key in enumerate(keys)}
    redis_db.mset(values)
    redis_db.set("small", "s")
    p = start_proxy()
    yield until(lambda: p.proxy.backing.up)
    other = p.redis_py()
    yield in_thread(other.mget, keys)  # all cached now
    if form == "MGET":
        request = encode(b"MGET", *[key.encode() for key in keys])
        expected = b"*64\r\n" + b"".join(
            b"$%d\r\n%b\r\n" % (len(values[key]), values[key]) for key in keys
        )
    else:
        request = b"".join(encode(b"GET", key.encode()) for key in keys)
        expected = b"".join(b"$%d\r\n%b\r\n" % (len(values[key]), values[key]) for key in keys)
    slow = socket.socket()
    slow.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 16 * 1024)
    slow.connect(("127.0.0.1", p.resp_port))
    try:
        hits = p.proxy.metrics.cache_hits
        slow.sendall(request)
        yield until(lambda: p.proxy.metrics.cache_hits >= hits + 64)
        assert (yield in_thread(other.get, "small")) == b"s"
        slow.setblocking(False)
        first = b""
        try:
            while chunk := slow.recv(1 << 20):
                first += chunk
        except BlockingIOError:
            pass
        assert len(first) < len(expected), "the large reply was still on its way"
        rest = yield in_thread(read_exactly, slow, len(expected) - len(first))
        assert first + rest == expected
    finally:
        slow.close()
