"""SPEC §9's limits on the HTTP door, and ``max_item_bytes`` on both doors,
end to end: an in-process proxy in front of a real redis-server, raw sockets
in threads.  Nothing here asserts a time; waits have deadlines."""

from __future__ import annotations

import select
import socket
import ssl
import subprocess
import sys
from pathlib import Path

import pytest_twisted
from twisted.internet import threads

import twisted
from redisp.protocol.sending import buffered
from tests.support import STARTUP_LIMIT, until

inline = pytest_twisted.inlineCallbacks

ROOT = str(Path(__file__).parent.parent)
VALUE = b"v" * 100
GET = b"GET /get?key=hot HTTP/1.1\r\nHost: x\r\n\r\n"


def in_thread(f, *args, **kwargs):
    return threads.deferToThread(f, *args, **kwargs)


def connect(port: int, rcvbuf: int | None = None) -> socket.socket:
    s = socket.socket()
    if rcvbuf is not None:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, rcvbuf)
    s.settimeout(STARTUP_LIMIT)
    s.connect(("127.0.0.1", port))
    return s


def read_to_close(s: socket.socket) -> bytes:
    """Everything the server sends until it closes (or resets) the connection."""
    data = b""
    while True:
        try:
            chunk = s.recv(1 << 20)
        except ConnectionResetError:
            return data
        if not chunk:
            return data
        data += chunk


def pipeline_without_reading(port: int, bound: int) -> int:
    """Send whole GETs without reading a reply until the socket stays
    unwritable for half a second (the server stopped reading) or ``bound`` bytes
    are sent; then finish the last request while reading every reply.
    Returns how many bytes were sent before the client had to stop."""
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 32768)  # the receiving side stays
    s.connect(("127.0.0.1", port))  # as it comes: tiny windows stall on window probes
    s.setblocking(False)
    batch = GET * 100
    sent = 0
    while sent < bound and select.select([], [s], [], 0.5)[1]:
        try:
            sent += s.send(batch[sent % len(batch):])
        except BlockingIOError:
            pass
    stopped_at = sent
    tail = GET[sent % len(GET):] if sent % len(GET) else b""
    requests = -(-sent // len(GET))
    reply = parse_replies()
    next(reply)
    answered = 0
    while answered < requests:
        readable, writable, _ = select.select([s], [s] if tail else [], [], STARTUP_LIMIT)
        assert readable or writable, "no progress"
        if writable:
            tail = tail[s.send(tail):]
        if readable:
            chunk = s.recv(1 << 20)
            assert chunk, f"closed after {answered} of {requests} replies"
            answered = reply.send(chunk)
    s.close()
    return stopped_at


def parse_replies():
    """A generator fed chunks, answering how many whole 200 replies of VALUE
    it has seen so far (incrementally: no rescans of what came before)."""
    head = b"HTTP/1.1 200 OK\r\n"
    buffer, count = b"", 0
    chunk = yield
    while True:
        buffer += chunk
        at = 0
        while True:
            end = buffer.find(b"\r\n\r\n", at)
            if end < 0 or len(buffer) < end + 4 + len(VALUE):
                break
            assert buffer.startswith(head, at), buffer[at:at + 200]
            assert buffer[end + 4:end + 4 + len(VALUE)] == VALUE
            at = end + 4 + len(VALUE)
            count += 1
        buffer = buffer[at:]
        chunk = yield count


def record_channels(p) -> list:
    """The HTTP door's connections from now on."""
    site = p.proxy.service.getServiceNamed("http")._factory
    channels: list = []
    build = site.buildProtocol

    def recording(addr):
        channel = build(addr)
        channels.append(channel)
        return channel

    site.buildProtocol = recording
    return channels


@inline
def test_a_client_pipelining_without_reading_is_held_not_buffered(redis_db, start_proxy):
    """The server stops reading once its buffer for the client is full, so the
    client's sends block long before the bound, redisp's buffer for it stays
    near the transport's 64 KiB, and every reply still comes, in order."""
    from twisted.internet import reactor

    redis_db.set("hot", VALUE)
    p = start_proxy()
    yield until(lambda: p.proxy.backing.up)
    status, headers, _ = yield in_thread(p.http_get, "hot")
    assert headers["X-Cache"] == "MISS"
    channels = record_channels(p)
    peak = [0]

    def watch():
        for channel in channels:
            if channel.transport is not None:
                peak[0] = max(peak[0], buffered(channel.transport))
        watcher[0] = reactor.callLater(0.01, watch)

    watcher = [reactor.callLater(0, watch)]
    bound = 64 << 20
    # the client in a process of its own: sharing this one's GIL with the
    # reactor would slow both to a crawl
    code = ("import sys; from tests.test_http_limits import pipeline_without_reading; "
            f"print(pipeline_without_reading({p.http_port}, {bound}))")
    try:
        out = yield in_thread(subprocess.run, [sys.executable, "-c", code], cwd=ROOT,
                              capture_output=True, timeout=120)
    finally:
        watcher[0].cancel()
    assert out.returncode == 0, out.stderr.decode()
    sent = int(out.stdout)
    assert sent < bound // 4, "the server kept reading a client that never reads"
    assert 0 < peak[0] < 1 << 20


@inline
def test_a_response_past_max_client_buffer_to_a_client_not_reading_is_cut(redis_db,
                                                                         start_proxy):
    big = b"b" * (8 << 20)
    redis_db.set("big", big)
    p = start_proxy(max_client_buffer=1 << 20, max_item_bytes=0)
    yield until(lambda: p.proxy.backing.up)

    def ask() -> socket.socket:
        s = connect(p.http_port, rcvbuf=4096)
        s.sendall(b"GET /get?key=big HTTP/1.1\r\nHost: x\r\n\r\n")
        return s

    s = yield in_thread(ask)
    yield until(lambda: p.proxy.metrics.connected_clients == 0)  # cut, not served
    got = yield in_thread(read_to_close, s)
    s.close()
    assert len(got) < len(big)


@inline
def test_a_request_not_finished_within_request_timeout_is_closed(redis_db, start_proxy):
    p = start_proxy(request_timeout=0.2)
    yield until(lambda: p.proxy.backing.up)

    def trickle() -> bytes:
        s = connect(p.http_port)
        s.sendall(b"GET /get?ke")
        data = read_to_close(s)  # the server closes it, without a reply
        s.close()
        return data

    assert (yield in_thread(trickle)) == b""
    yield until(lambda: p.proxy.metrics.connected_clients == 0)


@inline
def test_a_tls_handshake_not_finished_within_request_timeout_is_closed(redis_db,
                                                                       start_proxy):
    pem = Path(twisted.__file__).parent / "test" / "server.pem"
    p = start_proxy(request_timeout=0.2,
                    http=f"ssl:0:interface=127.0.0.1:privateKey={pem}:certKey={pem}")
    yield until(lambda: p.proxy.backing.up)

    def silent() -> bytes:
        s = connect(p.http_port)
        data = read_to_close(s)  # no ClientHello: closed at request_timeout
        s.close()
        return data

    def proper() -> bytes:
        context = ssl.create_default_context()
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
        with context.wrap_socket(connect(p.http_port)) as s:
            s.sendall(GET)
            return s.recv(65536)

    assert (yield in_thread(silent)) == b""
    redis_db.set("hot", VALUE)
    assert (yield in_thread(proper)).startswith(b"HTTP/1.1 200 OK")


@inline
def test_values_over_max_item_bytes_are_served_by_both_doors_never_stored(redis_db,
                                                                         start_proxy):
    redis_db.set("big", "x" * 11)
    redis_db.set("small", "x" * 10)
    p = start_proxy(max_item_bytes=10)
    yield until(lambda: p.proxy.backing.up)
    client = p.redis_py()
    for _ in range(2):
        status, headers, body = yield in_thread(p.http_get, "big")
        assert (status, headers["X-Cache"], body) == (200, "MISS", b"x" * 11)
        assert (yield in_thread(client.get, "big")) == b"x" * 11
    assert p.proxy.metrics.cache_misses == 4 and p.proxy.metrics.cache_hits == 0
    assert (yield in_thread(client.get, "small")) == b"x" * 10
    status, headers, body = yield in_thread(p.http_get, "small")
    assert (headers["X-Cache"], body) == ("HIT", b"x" * 10)
    assert len(p.proxy.cache) == 1
    client.close()
