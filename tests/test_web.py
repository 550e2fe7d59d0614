"""The HTTP front door (SPEC §2), driven through a real Site and HTTPChannel.

Bytes go in through ``dataReceived`` on an in-memory transport and the raw
response bytes are parsed back, so every test covers what a client sees:
status line, headers, Content-Length, HEAD, persistence.  Under the door are
the real reader, gate and cache; only Redis is scripted (``ScriptedRedis``),
and the health check's ping; the clock is a ``task.Clock``.
"""

from __future__ import annotations

import gc
from dataclasses import dataclass, field
from urllib.parse import urlencode

import pytest
from hypothesis import given
from hypothesis import strategies as st
from prometheus_client import CONTENT_TYPE_LATEST
from twisted.internet.address import IPv4Address
from twisted.internet.defer import Deferred
from twisted.internet.error import ConnectionDone
from twisted.internet.interfaces import ISSLTransport
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.logger import globalLogPublisher
from twisted.python.failure import Failure
from twisted.web.server import NOT_DONE_YET
from twisted.web.test.requesthelper import DummyRequest
from zope.interface import implementer

from redisp.backing import BackingReplyError, BackingTimeout, BackingUnavailable
from redisp.cache import Cache
from redisp.clients import ClientSlots
from redisp.config import Config
from redisp.gate import Gate
from redisp.metrics import Metrics
from redisp.reader import CachedReader
from redisp.web import BadKey, build_site, key_from_query
from tests.door_support import ScriptedRedis

ADDR = IPv4Address("TCP", "127.0.0.1", 40000)


# fakes and plumbing


class Pings:
    """The backing as ``/healthz`` sees it: ``ping()`` hands out Deferreds
    the test fires."""

    def __init__(self):
        self.pings: list[Deferred] = []

    def ping(self):
        self.pings.append(Deferred())
        return self.pings[-1]


@dataclass
class Response:
    status: int
    reason: bytes
    headers: dict[bytes, list[bytes]]
    body: bytes

    def header(self, name: bytes) -> bytes | None:
        values = self.headers.get(name.lower())
        assert values is None or len(values) == 1, values
        return values[0] if values else None


def parse(data: bytes, head: bool = False) -> list[Response]:
    """Every complete response in ``data`` (Content-Length framing only)."""
    responses = []
    while data:
        head_block, sep, data = data.partition(b"\r\n\r\n")
        assert sep, f"incomplete headers: {head_block!r}"
        status_line, *lines = head_block.split(b"\r\n")
        version, code, reason = status_line.split(b" ", 2)
        assert version in (b"HTTP/1.1", b"HTTP/1.0")
        headers: dict[bytes, list[bytes]] = {}
        for line in lines:
            name, _, value = line.partition(b": ")
            headers.setdefault(name.lower(), []).append(value)
        assert b"transfer-encoding" not in headers
        length = 0 if head else int(headers[b"content-length"][0])
        body, data = data[:length], data[length:]
        assert len(body) == length, "truncated body"
        responses.append(Response(int(code), reason, headers, body))
    return responses


@dataclass
class Proxy:
    site: object
    reader: CachedReader
    redis: ScriptedRedis
    backing: Pings
    metrics: Metrics
    slots: ClientSlots
    clock: Clock
    cache: Cache
    connections: list = field(default_factory=list)

    def connect(self):
        protocol = self.site.buildProtocol(ADDR)
        transport = StringTransport(peerAddress=ADDR)
        protocol.makeConnection(transport)
        self.connections.append(protocol)
        return protocol, transport

    def send(self, raw: bytes, head: bool = False) -> list[Response]:
        """Send ``raw`` on a new connection; the responses written so far."""
        protocol, transport = self.connect()
        protocol.dataReceived(raw)
        return parse(transport.value(), head)

    def get(self, target: bytes, method: bytes = b"GET") -> Response:
        (response,) = self.send(request(target, method), head=method == b"HEAD")
        return response

    def counted(self, outcome: str) -> int:
        return self.metrics.requests["http", outcome]

    def cached(self, key: bytes, value: bytes) -> None:
        """``key`` is in Redis and in the cache already: a GET of it is a hit."""
        self.redis.values[key] = value
        self.cache.put(key, value)

    def lookups(self) -> int:
        """How often the door asked below it: cache hits, misses, and Redis."""
        return self.metrics.cache_hits + self.metrics.cache_misses + len(self.redis.calls)


def request(target: bytes, method: bytes = b"GET", body: bytes = b"") -> bytes:
    length = b"Content-Length: %d\r\n" % len(body) if body else b""
    return method + b" " + target + b" HTTP/1.1\r\nHost: x\r\n" + length + b"\r\n" + body


@pytest.fixture
def proxy():
    return make_proxy()


def make_proxy(max_clients: int = 100, access_log: bool = False, **settings) -> Proxy:
    clock = Clock()
    clock.advance(1_700_000_000)
    metrics = Metrics(started=clock.seconds())
    slots = ClientSlots(max_clients, metrics)
    redis = ScriptedRedis({}, clock)
    cache = Cache(1000, 60.0, clock, metrics)
    reader = CachedReader(cache, Gate(1, clock), redis, metrics)
    backing = Pings()
    config = Config(access_log=access_log, **settings)
    site = build_site(reader, backing, metrics, slots, config, reactor=clock)
    return Proxy(site, reader, redis, backing, metrics, slots, clock, cache)


@pytest.fixture
def logged():
    """Every log event emitted during the test (failures, access log lines)."""
    events: list[dict] = []
    globalLogPublisher.addObserver(events.append)
    yield events
    globalLogPublisher.removeObserver(events.append)


def failures(events: list[dict]) -> list[Failure]:
    gc.collect()  # an unhandled error in a Deferred is logged when it is collected
    return [e["log_failure"] for e in events if "log_failure" in e]


def lose(protocol) -> None:
    protocol.connectionLost(Failure(ConnectionDone()))


# /get: 200, 404


def test_hit_is_answered_synchronously_with_the_raw_value(proxy):
    """A hit comes straight back from the reader: 200, octet-stream, X-Cache: HIT."""
    proxy.cached(b"k", b"value")
    r = proxy.get(b"/get?key=k")
    assert (r.status, r.body) == (200, b"value")
    assert r.header(b"Content-Type") == b"application/octet-stream"
    assert r.header(b"X-Cache") == b"HIT"
    assert r.header(b"Content-Length") == b"5"
    assert r.header(b"Server") is None
    assert proxy.counted("hit") == 1


@pytest.mark.parametrize("hit, x_cache, outcome", [(False, b"MISS", "miss"), (True, b"HIT", "hit")])
def test_deferred_lookup_answers_when_it_fires(proxy, hit, x_cache, outcome):
    """A miss (or a hit queued behind the gate) is answered when its Deferred fires."""
    proxy.redis.later.update([b"k", b"slow"])
    if hit:  # a miss of another client holds the gate; the hit waits behind it
        proxy.cached(b"k", b"fetched")
        proxy.connect()[0].dataReceived(request(b"/get?key=slow"))
    else:
        proxy.redis.values[b"k"] = b"fetched"
    protocol, transport = proxy.connect()
    protocol.dataReceived(request(b"/get?key=k"))
    assert transport.value() == b""
    proxy.redis.answer(b"slow" if hit else b"k", b"fetched")
    (r,) = parse(transport.value())
    assert (r.status, r.body, r.header(b"X-Cache")) == (200, b"fetched", x_cache)
    assert r.header(b"Content-Type") == b"application/octet-stream"
    assert proxy.counted(outcome) == 1


def test_binary_value_comes_back_byte_for_byte(proxy):
    value = bytes(range(256)) + b"\r\n\r\nHTTP/1.1 200 OK\r\n"
    proxy.cached(b"bin", value)
    assert proxy.get(b"/get?key=bin").body == value


def test_empty_value_is_a_200_with_empty_body(proxy):
    """An empty string is a value, not an absence."""
    proxy.cached(b"e", b"")
    r = proxy.get(b"/get?key=e")
    assert (r.status, r.body, r.header(b"Content-Length")) == (200, b"", b"0")


@pytest.mark.parametrize("deferred", [False, True])
def test_absent_key_is_404(proxy, deferred):
    if deferred:
        proxy.redis.later.add(b"gone")
    protocol, transport = proxy.connect()
    protocol.dataReceived(request(b"/get?key=gone"))
    if deferred:
        assert transport.value() == b""
        proxy.redis.answer(b"gone", None)
    (r,) = parse(transport.value())
    assert (r.status, r.body) == (404, b"not found\n")
    assert r.header(b"X-Cache") is None
    assert proxy.counted("absent") == 1


# /get: HEAD


@pytest.mark.parametrize("deferred", [False, True])
def test_head_sends_the_get_headers_without_a_body(proxy, deferred):
    value = b"twelve bytes"
    if deferred:
        proxy.redis.later.add(b"k")
        proxy.redis.values[b"k"] = value
    else:
        proxy.cached(b"k", value)
    protocol, transport = proxy.connect()
    protocol.dataReceived(request(b"/get?key=k", b"HEAD"))
    if deferred:
        proxy.redis.answer(b"k", value)
    (r,) = parse(transport.value(), head=True)
    assert transport.value().endswith(b"\r\n\r\n")  # nothing after the headers
    assert r.status == 200
    assert r.header(b"Content-Length") == b"12"
    assert r.header(b"Content-Type") == b"application/octet-stream"
    assert r.header(b"X-Cache") == (b"MISS" if deferred else b"HIT")
    assert proxy.counted("miss" if deferred else "hit") == 1


# /get: 400 and 405


@pytest.mark.parametrize("target, reason", [
    (b"/get", b"missing key parameter"),
    (b"/get?", b"missing key parameter"),
    (b"/get?other=1", b"missing key parameter"),
    (b"/get?KEY=a", b"missing key parameter"),
    (b"/get?key=", b"empty key"),
    (b"/get?key", b"empty key"),
    (b"/get?x=1&key=", b"empty key"),
    (b"/get?key=a&key=b", b"key given more than once"),
    (b"/get?key=a&key=a", b"key given more than once"),
    (b"/get?key=a&k%65y=b", b"key given more than once"),
])
def test_bad_key_parameter_is_400_with_one_line_reason(proxy, target, reason):
    r = proxy.get(target)
    assert r.status == 400
    assert r.body.startswith(reason) and r.body.endswith(b"\n") and r.body.count(b"\n") == 1
    assert r.header(b"Content-Type").startswith(b"text/plain")
    assert proxy.lookups() == 0
    assert proxy.counted("bad_request") == 1


@pytest.mark.parametrize("method", [b"POST", b"PUT", b"DELETE", b"PATCH", b"OPTIONS", b"FOO"])
def test_other_methods_on_get_are_405_with_allow_never_501(proxy, method):
    proxy.cached(b"k", b"v")
    r = proxy.get(b"/get?key=k", method)
    assert r.status == 405
    assert r.header(b"Allow") == b"GET, HEAD"
    assert proxy.lookups() == 0
    assert proxy.counted("bad_request") == 1


def test_post_body_is_not_parsed_or_used(proxy):
    """A form body naming a key must not be read as the key: POST is simply 405."""
    form = b"key=k"
    raw = (b"POST /get HTTP/1.1\r\nHost: x\r\nContent-Type: application/x-www-form-urlencoded"
           b"\r\nContent-Length: %d\r\n\r\n" % len(form)) + form
    (r,) = proxy.send(raw)
    assert r.status == 405 and proxy.lookups() == 0


def test_large_request_body_is_discarded_and_the_connection_goes_on(proxy):
    """Bodies are dropped as they arrive (never buffered); the next request is served."""
    proxy.cached(b"k", b"v")
    body = b"x" * 300_000
    protocol, transport = proxy.connect()
    raw = request(b"/get?key=k", b"POST", body) + request(b"/get?key=k")
    for i in range(0, len(raw), 65536):
        protocol.dataReceived(raw[i:i + 65536])
    assert [r.status for r in parse(transport.value())] == [405, 200]
    chunked = (b"PUT /get?key=k HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
               b"5\r\nhello\r\n0\r\n\r\n")
    assert proxy.send(chunked)[0].status == 405


# /get: the key on the wire


@pytest.mark.parametrize("target, key", [
    (b"/get?key=abc", b"abc"),
    (b"/get?key=%00%FF", b"\x00\xff"),
    (b"/get?key=%00%ff%0D%0A", b"\x00\xff\r\n"),
    (b"/get?key=a+b", b"a b"),
    (b"/get?key=a%2Bb", b"a+b"),
    (b"/get?key=a%20b", b"a b"),
    (b"/get?key=a;b", b"a;b"),
    (b"/get?key=a=b", b"a=b"),
    (b"/get?key=%E2%82%AC", "€".encode()),
    (b"/get?key=%zz", b"%zz"),
    (b"/get?a=1&key=k&b=2", b"k"),
    (b"/get?k%65y=k", b"k"),
])
def test_key_is_percent_decoded_to_bytes(proxy, target, key):
    proxy.redis.values[key] = b"v"
    assert proxy.get(target).status == 200
    assert proxy.redis.calls == [(b"GET", key)]


@given(st.binary(min_size=1, max_size=64))
def test_any_key_survives_urlencode(key):
    """What ``urllib.parse.urlencode`` (quote_plus) writes decodes to the same bytes."""
    assert key_from_query(b"/get?" + urlencode({"key": key}).encode()) == key
    assert key_from_query(b"/get?x=1&" + urlencode({"key": key}).encode()) == key


def test_key_from_query_reasons():
    for uri in (b"/get", b"/get?key=", b"/get?key=1&key=2"):
        with pytest.raises(BadKey):
            key_from_query(uri)


# /get: backing errors and 500


@pytest.mark.parametrize("error, status, text", [
    (BackingReplyError("WRONGTYPE Operation against a key holding the wrong kind of value"),
     502, b"WRONGTYPE Operation against a key holding the wrong kind of value\n"),
    (BackingUnavailable("backing redis unavailable (Connection refused)"),
     503, b"backing redis unavailable (Connection refused)\n"),
    (BackingTimeout("backing redis timed out after 2s"),
     504, b"backing redis timed out after 2s\n"),
    (BackingUnavailable(), 503, b"backing redis unavailable\n"),
    (BackingTimeout(), 504, b"backing redis timed out\n"),
])
def test_backing_errors_map_to_502_503_504(proxy, logged, error, status, text):
    proxy.redis.later.add(b"k")
    protocol, transport = proxy.connect()
    protocol.dataReceived(request(b"/get?key=k"))
    proxy.redis.fail(b"k", error)
    (r,) = parse(transport.value())
    assert (r.status, r.body) == (status, text)
    assert r.header(b"X-Cache") is None
    assert proxy.counted("backing_error") == 1
    assert failures(logged) == []


def test_multi_line_redis_error_is_one_line(proxy):
    proxy.redis.failures[b"k"] = BackingReplyError("ERR one\r\ntwo")
    assert proxy.get(b"/get?key=k").body == b"ERR one two\n"


def test_unexpected_failure_is_500_and_logged(proxy, logged):
    proxy.redis.later.add(b"k")
    protocol, transport = proxy.connect()
    protocol.dataReceived(request(b"/get?key=k"))
    proxy.redis.fail(b"k", ZeroDivisionError("bug"))
    (r,) = parse(transport.value())
    assert (r.status, r.body) == (500, b"internal error\n")
    assert [f.type for f in failures(logged)] == [ZeroDivisionError]
    assert proxy.counted("other") == 1


def broken_below(proxy, monkeypatch, answer) -> None:
    """A bug in the layers under the door: the reader's ``get`` raises
    ``answer`` (an exception) or hands back ``answer`` instead of a Lookup."""

    def get(key, owner=None):
        if isinstance(answer, Exception):
            raise answer
        return answer

    monkeypatch.setattr(proxy.reader, "get", get)


def test_reader_raising_synchronously_is_500_and_logged(proxy, logged, monkeypatch):
    broken_below(proxy, monkeypatch, RuntimeError("bug"))
    r = proxy.get(b"/get?key=k")
    assert r.status == 500
    assert [f.type for f in failures(logged)] == [RuntimeError]
    # the connection is still usable
    monkeypatch.undo()
    proxy.cached(b"k", b"v")
    assert proxy.get(b"/get?key=k").status == 200


def test_bad_lookup_shape_is_500_not_a_hang(proxy, logged, monkeypatch):
    """Even a broken reader result ends the request (here: not a tuple)."""
    d = Deferred()
    broken_below(proxy, monkeypatch, d)
    protocol, transport = proxy.connect()
    protocol.dataReceived(request(b"/get?key=k"))
    d.callback(b"not a lookup")
    (r,) = parse(transport.value())
    assert r.status == 500
    assert len(failures(logged)) == 1


def test_a_response_that_fails_to_compose_is_a_clean_500(proxy, logged, monkeypatch):
    """A response goes out whole or not at all, so a failure while building
    it (a bug: a str value) still gets a proper 500, not a cut 200."""
    broken_below(proxy, monkeypatch, ("text, not bytes", True))
    protocol, transport = proxy.connect()
    protocol.dataReceived(request(b"/get?key=k"))
    (r,) = parse(transport.value())
    assert (r.status, r.body) == (500, b"internal error\n")
    assert "X-Cache" not in r.headers
    assert len(failures(logged)) == 1


def test_http_1_0_is_answered_and_closed(proxy):
    proxy.cached(b"k", b"v")
    protocol, transport = proxy.connect()
    protocol.dataReceived(b"GET /get?key=k HTTP/1.0\r\n\r\n")
    (r,) = parse(transport.value())
    assert (r.status, r.body) == (200, b"v")
    assert transport.disconnecting


def test_front_door_renders_as_a_plain_resource(proxy):
    """FrontDoor is a usable IResource (e.g. under a stock Site): it never returns bytes."""
    proxy.cached(b"k", b"v")
    dummy = DummyRequest([b"get"])
    dummy.path, dummy.uri = b"/get", b"/get?key=k"
    dummy.startedWriting = False
    assert proxy.site.resource.render(dummy) is NOT_DONE_YET
    assert (dummy.responseCode, b"".join(dummy.written), dummy.finished) == (200, b"v", 1)
    assert dummy.responseHeaders.getRawHeaders(b"X-Cache") == [b"HIT"]


# client disconnects while waiting


@pytest.mark.parametrize("outcome", ["value", "absent", "backing_error", "bug"])
def test_client_gone_while_pending_gets_no_write_and_no_error(proxy, logged, outcome):
    proxy.redis.later.add(b"k")
    protocol, transport = proxy.connect()
    protocol.dataReceived(request(b"/get?key=k"))
    lose(protocol)
    if outcome == "value":
        proxy.redis.answer(b"k", b"v")
    elif outcome == "absent":
        proxy.redis.answer(b"k", None)
    elif outcome == "backing_error":
        proxy.redis.fail(b"k", BackingTimeout("timed out"))
    else:
        proxy.redis.fail(b"k", ZeroDivisionError("bug"))
    assert transport.value() == b""
    logged_types = [f.type for f in failures(logged)]
    assert logged_types == ([ZeroDivisionError] if outcome == "bug" else [])
    assert sum(proxy.metrics.requests.values()) == 1  # still counted once


def test_client_gone_while_health_check_pending(proxy, logged):
    protocol, transport = proxy.connect()
    protocol.dataReceived(request(b"/healthz"))
    lose(protocol)
    proxy.backing.pings[0].callback(b"PONG")
    assert transport.value() == b""
    assert failures(logged) == []


# /healthz, /metrics, unknown paths


def test_healthz_ok_when_ping_answers(proxy):
    protocol, transport = proxy.connect()
    protocol.dataReceived(request(b"/healthz"))
    assert transport.value() == b""  # waits for the ping
    proxy.backing.pings[0].callback(b"PONG")
    (r,) = parse(transport.value())
    assert (r.status, r.body) == (200, b"ok\n")


@pytest.mark.parametrize("error, text", [
    (BackingUnavailable("backing redis unavailable (Connection refused)"),
     b"backing redis unavailable (Connection refused)\n"),
    (BackingTimeout("backing redis timed out after 2s"), b"backing redis timed out after 2s\n"),
])
def test_healthz_503_with_the_reason(proxy, logged, error, text):
    protocol, transport = proxy.connect()
    protocol.dataReceived(request(b"/healthz"))
    proxy.backing.pings[0].errback(error)
    (r,) = parse(transport.value())
    assert (r.status, r.body) == (503, text)
    assert failures(logged) == []


def test_healthz_503_when_ping_raises(proxy, logged):
    def broken():
        raise RuntimeError("no ping for you")
    proxy.backing.ping = broken
    r = proxy.get(b"/healthz")
    assert (r.status, r.body) == (503, b"no ping for you\n")
    assert len(failures(logged)) == 1


def test_healthz_head(proxy):
    protocol, transport = proxy.connect()
    protocol.dataReceived(request(b"/healthz", b"HEAD"))
    proxy.backing.pings[0].callback(b"PONG")
    (r,) = parse(transport.value(), head=True)
    assert (r.status, r.header(b"Content-Length")) == (200, b"3")


def test_metrics_is_prometheus_text(proxy):
    proxy.cached(b"k", b"v")
    proxy.get(b"/get?key=k")
    proxy.get(b"/get")
    r = proxy.get(b"/metrics")
    assert r.status == 200
    assert r.header(b"Content-Type") == CONTENT_TYPE_LATEST.encode()
    assert b'redisp_requests_total{door="http",outcome="hit"} 1.0' in r.body
    assert b'redisp_requests_total{door="http",outcome="bad_request"} 1.0' in r.body
    assert b"redisp_connected_clients 3.0" in r.body  # none of the three closed yet


@pytest.mark.parametrize("path", [b"/healthz", b"/metrics"])
def test_other_methods_on_healthz_and_metrics_are_405(proxy, path):
    r = proxy.get(path, b"DELETE")
    assert (r.status, r.header(b"Allow")) == (405, b"GET, HEAD")
    assert proxy.backing.pings == []


@pytest.mark.parametrize("target", [
    b"/", b"/nope", b"/get/", b"/get/x", b"/get/?key=k", b"/healthz/", b"/metrics/x",
    b"/GET?key=k", b"//get?key=k", b"/%67et?key=k", b"*",
])
@pytest.mark.parametrize("method", [b"GET", b"POST"])
def test_unknown_paths_are_404(proxy, target, method):
    proxy.cached(b"k", b"v")
    r = proxy.get(target, method)
    assert (r.status, r.body) == (404, b"not found\n")
    assert proxy.lookups() == 0
    assert sum(proxy.metrics.requests.values()) == 0


# the connection: persistence, pipelining, Date


def test_pipelined_requests_answer_in_order(proxy):
    proxy.redis.later.add(b"slow")
    proxy.cached(b"fast", b"F")
    protocol, transport = proxy.connect()
    protocol.dataReceived(request(b"/get?key=slow") + request(b"/get?key=fast"))
    assert transport.value() == b""
    proxy.redis.answer(b"slow", b"S")
    bodies = [r.body for r in parse(transport.value())]
    assert bodies == [b"S", b"F"]


def test_connection_is_persistent(proxy):
    proxy.cached(b"k", b"v")
    protocol, transport = proxy.connect()
    for _ in range(3):
        protocol.dataReceived(request(b"/get?key=k"))
    assert [r.status for r in parse(transport.value())] == [200, 200, 200]
    assert not transport.disconnecting


def test_date_header_follows_the_clock(proxy):
    proxy.cached(b"k", b"v")
    first = proxy.get(b"/get?key=k").header(b"Date")
    assert first == b"Tue, 14 Nov 2023 22:13:20 GMT"
    assert proxy.get(b"/get?key=k").header(b"Date") == first
    proxy.clock.advance(1)
    assert proxy.get(b"/get?key=k").header(b"Date") == b"Tue, 14 Nov 2023 22:13:21 GMT"


# max clients


def test_past_max_clients_the_connection_gets_503_and_is_closed():
    proxy = make_proxy(max_clients=1)
    proxy.cached(b"k", b"v")
    first, first_transport = proxy.connect()
    refused, refused_transport = proxy.connect()
    (r,) = parse(refused_transport.value())
    assert (r.status, r.reason) == (503, b"Service Unavailable")
    assert r.body == b"max number of clients reached\n"
    assert r.header(b"Connection") == b"close"
    assert refused_transport.disconnecting
    refused.dataReceived(request(b"/get?key=k"))  # ignored
    lose(refused)
    assert proxy.lookups() == 0
    assert proxy.metrics.connected_clients == 1

    first.dataReceived(request(b"/get?key=k"))
    assert parse(first_transport.value())[0].status == 200


def test_slot_is_released_once_when_the_connection_closes():
    proxy = make_proxy(max_clients=1)
    proxy.cached(b"k", b"v")
    first, _ = proxy.connect()
    assert proxy.metrics.connected_clients == 1
    lose(first)
    lose(first)  # a second notice must not free a slot that is not held
    assert proxy.metrics.connected_clients == 0
    (r,) = proxy.send(request(b"/get?key=k"))
    assert r.status == 200
    assert proxy.metrics.connected_clients == 1


def test_slot_is_released_when_a_pending_request_is_cut():
    proxy = make_proxy(max_clients=1)
    proxy.redis.later.add(b"k")
    protocol, _ = proxy.connect()
    protocol.dataReceived(request(b"/get?key=k"))
    lose(protocol)
    assert proxy.metrics.connected_clients == 0


def test_client_timeout_closes_an_idle_connection_and_releases_its_slot():
    proxy = make_proxy(client_timeout=5)
    protocol, transport = proxy.connect()
    proxy.clock.advance(4.9)
    assert not transport.disconnecting
    proxy.clock.advance(0.1)
    assert transport.disconnecting
    lose(protocol)
    assert proxy.metrics.connected_clients == 0
    assert proxy.clock.getDelayedCalls() == []


# access log


def access_lines(events: list[dict]) -> list[dict]:
    return [e for e in events if "/get?key=k" in str(e.get("log_io", e.get("message", "")))]


def test_access_log_is_off_by_default(logged):
    proxy = make_proxy()
    proxy.site.doStart()
    proxy.cached(b"k", b"v")
    proxy.get(b"/get?key=k")
    lose(proxy.connections[0])
    assert proxy.clock.getDelayedCalls() == []  # no once-a-second log timestamp timer
    proxy.site.doStop()
    assert access_lines(logged) == []


def test_access_log_when_asked_for(logged):
    proxy = make_proxy(access_log=True)
    proxy.site.doStart()
    proxy.cached(b"k", b"v")
    proxy.get(b"/get?key=k")
    proxy.site.doStop()
    assert len(access_lines(logged)) == 1


class CountingTransport(StringTransport):
    def __init__(self):
        super().__init__(peerAddress=ADDR)
        self.host_asked = 0

    def getHost(self):
        self.host_asked += 1
        return super().getHost()


def test_the_local_address_is_asked_once_per_connection(proxy):
    """twisted.web wants it for every request; a TCP transport answers each
    time with a getsockname system call, for an address that never changes."""
    proxy.cached(b"k", b"v")
    protocol = proxy.site.buildProtocol(ADDR)
    transport = CountingTransport()
    protocol.makeConnection(transport)
    for _ in range(3):
        protocol.dataReceived(request(b"/get?key=k"))
    assert [r.status for r in parse(transport.value())] == [200, 200, 200]
    assert transport.host_asked == 1
    protocol.connectionLost(Failure(ConnectionDone()))


# the plain-GET path (_Channel.dataReceived): hits without twisted.web's Request

PLAIN = b"GET /get?key=k HTTP/1.1\r\nHost: 127.0.0.1:9997\r\nUser-Agent: wrk\r\n\r\n"


def routed(proxy) -> list[bytes]:
    """Targets that went through twisted.web (FrontDoor.route), recorded from now."""
    seen: list[bytes] = []
    door = proxy.site.resource
    original = door.route

    def route(request):
        seen.append(request.uri)
        original(request)

    door.route = route
    return seen


def test_a_plain_hit_skips_twisted_web_and_answers_the_same_bytes(proxy):
    proxy.cached(b"k", b"v" * 100)
    seen = routed(proxy)
    protocol, fast = proxy.connect()
    protocol.dataReceived(PLAIN)
    assert seen == [], "a plain hit must not go through twisted.web"
    protocol, slow = proxy.connect()
    protocol.dataReceived(PLAIN.replace(b"\r\n\r\n", b"\r\nX-Slow: 1\r\n\r\n"))
    assert seen == [b"/get?key=k"]
    assert fast.value() == slow.value()
    (r,) = parse(fast.value())
    assert (r.status, r.header(b"X-Cache"), r.body) == (200, b"HIT", b"v" * 100)
    assert proxy.metrics.requests["http", "hit"] == 2


def test_plain_hits_keep_the_connection_and_answer_each_in_turn(proxy):
    proxy.cached(b"k", b"v")
    protocol, transport = proxy.connect()
    for _ in range(3):
        protocol.dataReceived(PLAIN)
    assert [r.body for r in parse(transport.value())] == [b"v"] * 3
    assert not transport.disconnecting


@pytest.mark.parametrize("raw", [
    b"HEAD /get?key=k HTTP/1.1\r\nHost: h\r\n\r\n",
    b"GET /get?key=k HTTP/1.0\r\n\r\n",
    b"GET /get?key=k HTTP/1.1\r\nConnection: close\r\n\r\n",
    b"GET /get?key=k HTTP/1.1\r\nContent-Length: 2\r\n\r\nab",
    b"GET /get?key=k HTTP/1.1\r\nExpect: 100-continue\r\n\r\n",
    b"GET /get?key=k HTTP/1.1\r\nHost: h\r\n\r\nGET /get?key=k HTTP/1.1\r\nHost: h\r\n\r\n",
    b"GET /get?key=k HTTP/1.1\r\nHost: h\r\n folded\r\n\r\n",
    b"GET /get?key=k HTTP/1.1\r\nHost : h\r\n\r\n",
    b"GET /get?key=k HTTP/1.1\r\nHost: \x00\r\n\r\n",
    b"GET /get?key=%zz HTTP/1.1\r\n\r\n",
    b"GET /get?key=k&key=j HTTP/1.1\r\n\r\n",
    b"GET /getx?key=k HTTP/1.1\r\n\r\n",
    b"GET /get?key=k HTTP/1.1\n\n",
], ids=["head", "http/1.0", "close", "body", "expect", "pipelined", "folded", "bad-name",
        "nul", "bad-key", "two-keys", "other-path", "bare-lf"])
def test_anything_but_a_plain_get_goes_through_twisted_web(proxy, raw):
    proxy.cached(b"k", b"v")
    seen = routed(proxy)
    protocol, transport = proxy.connect()
    protocol.dataReceived(raw)
    # answered by twisted.web (routed, or refused by its parser), or not yet at all
    answered_here = proxy.metrics.requests["http", "hit"] and not seen
    assert not answered_here, transport.value()


def test_a_plain_get_that_misses_goes_through_twisted_web(proxy):
    proxy.redis.later.add(b"k")
    seen = routed(proxy)
    protocol, transport = proxy.connect()
    protocol.dataReceived(PLAIN)
    assert seen == [b"/get?key=k"]
    proxy.redis.answer(b"k", b"v")
    (r,) = parse(transport.value())
    assert (r.status, r.header(b"X-Cache"), r.body) == (200, b"MISS", b"v")


def test_a_plain_hit_behind_a_request_in_progress_waits_its_turn(proxy):
    proxy.redis.later.add(b"slow")
    proxy.cached(b"k", b"v")
    protocol, transport = proxy.connect()
    protocol.dataReceived(request(b"/get?key=slow"))
    protocol.dataReceived(PLAIN)
    assert transport.value() == b""
    proxy.redis.answer(b"slow", b"s")
    assert [r.body for r in parse(transport.value())] == [b"s", b"v"]


def test_with_the_access_log_on_every_request_goes_through_twisted_web(logged):
    proxy = make_proxy(access_log=True)
    proxy.cached(b"k", b"v")
    seen = routed(proxy)
    protocol, _ = proxy.connect()
    protocol.dataReceived(PLAIN)
    assert seen == [b"/get?key=k"]


# limits on the request head (SPEC §2): 414 and 431, then the close


def refused(transport) -> Response:
    (r,) = parse(transport.value())
    assert r.header(b"Connection") == b"close"
    assert transport.disconnecting
    return r


@pytest.mark.parametrize("chunk", [None, 1000], ids=["whole", "in-pieces"])
def test_a_request_line_too_long_is_414_then_closed(proxy, chunk):
    raw = b"GET /get?key=" + b"k" * 17_000 + b" HTTP/1.1\r\nHost: h\r\n\r\n"
    protocol, transport = proxy.connect()
    for i in range(0, len(raw), chunk or len(raw)):
        if transport.disconnecting:
            break
        protocol.dataReceived(raw[i:i + (chunk or len(raw))])
    r = refused(transport)
    assert (r.status, r.reason, r.body) == (414, b"URI Too Long", b"request line too long\n")
    assert proxy.lookups() == 0
    assert proxy.counted("bad_request") == 1


@pytest.mark.parametrize("headers", [
    b"X-Long: " + b"v" * 17_000 + b"\r\n",
    b"".join(b"X-H%d: %s\r\n" % (i, b"v" * 1000) for i in range(17)),
    b"Accept: x\r\n" * 501,
], ids=["one-long-line", "total-size", "too-many"])
def test_headers_too_large_are_431_then_closed(proxy, headers):
    proxy.cached(b"k", b"v")
    protocol, transport = proxy.connect()
    protocol.dataReceived(b"GET /get?key=k HTTP/1.1\r\nHost: h\r\n" + headers + b"\r\n")
    r = refused(transport)
    assert (r.status, r.reason) == (431, b"Request Header Fields Too Large")
    assert r.body == b"request headers too large\n"
    assert proxy.lookups() == 0
    assert proxy.counted("hit") == 0


def test_headers_at_the_limits_are_accepted(proxy):
    proxy.cached(b"k", b"v")
    (r,) = proxy.send(b"GET /get?key=k HTTP/1.1\r\n" + b"Accept: x\r\n" * 500 + b"\r\n")
    assert r.status == 200


def test_a_plain_get_past_a_head_limit_is_refused_not_answered(proxy):
    """The fast path takes nothing that twisted.web would refuse: lines
    within MAX_LENGTH each but over totalHeadersSize together."""
    proxy.cached(b"k", b"v")
    raw = (b"GET /get?key=k&pad=" + b"p" * 9000 + b" HTTP/1.1\r\nHost: " + b"h" * 9000
           + b"\r\n\r\n")
    protocol, transport = proxy.connect()
    protocol.dataReceived(raw)
    assert refused(transport).status == 431
    assert proxy.counted("hit") == 0


# slow and idle clients (SPEC §9): request_timeout, client_timeout


def test_a_request_trickled_a_byte_at_a_time_is_cut_at_request_timeout():
    """Each byte used to restart twisted.web's idle timer; the deadline now
    runs from the request's first byte."""
    proxy = make_proxy(request_timeout=10)
    proxy.cached(b"k", b"v")
    protocol, transport = proxy.connect()
    raw = request(b"/get?key=k") * 2
    for i in range(10):
        protocol.dataReceived(raw[i:i + 1])
        proxy.clock.advance(0.999)
    assert not transport.disconnecting
    proxy.clock.advance(0.01)
    assert transport.disconnecting and transport.value() == b""


def test_a_body_trickled_past_request_timeout_is_cut():
    proxy = make_proxy(request_timeout=10)
    protocol, transport = proxy.connect()
    protocol.dataReceived(b"POST /get?key=k HTTP/1.1\r\nContent-Length: 100\r\n\r\n")
    for _ in range(11):
        if transport.disconnecting:
            break
        protocol.dataReceived(b"x")
        proxy.clock.advance(1)
    assert transport.disconnecting and transport.value() == b""


def test_requests_finished_in_time_each_get_their_own_request_timeout():
    proxy = make_proxy(request_timeout=10)
    proxy.cached(b"k", b"v")
    protocol, transport = proxy.connect()
    raw = request(b"/get?key=k")
    for _ in range(5):
        protocol.dataReceived(raw[:5])
        proxy.clock.advance(9)
        protocol.dataReceived(raw[5:])
        proxy.clock.advance(9)
    assert not transport.disconnecting
    assert [r.status for r in parse(transport.value())] == [200] * 5


def test_an_idle_connection_stays_open_without_client_timeout_and_costs_no_timer(proxy):
    proxy.cached(b"k", b"v")
    protocol, transport = proxy.connect()
    protocol.dataReceived(request(b"/get?key=k"))
    proxy.clock.advance(1_000_000)
    assert not transport.disconnecting
    assert proxy.clock.getDelayedCalls() == []


def test_request_timeout_zero_never_cuts():
    proxy = make_proxy(request_timeout=0)
    protocol, transport = proxy.connect()
    protocol.dataReceived(b"GET /get?ke")
    proxy.clock.advance(1_000_000)
    assert not transport.disconnecting
    assert proxy.clock.getDelayedCalls() == []


def test_requests_postpone_client_timeout_without_moving_a_timer():
    """Plain hits only note the time: the one timer is re-armed when it fires."""
    proxy = make_proxy(client_timeout=5)
    proxy.cached(b"k", b"v")
    protocol, transport = proxy.connect()
    (timer,) = proxy.clock.getDelayedCalls()
    due = timer.getTime()
    proxy.clock.advance(3)
    for _ in range(100):
        protocol.dataReceived(PLAIN)
    assert proxy.clock.getDelayedCalls() == [timer] and timer.getTime() == due
    proxy.clock.advance(2)  # fires, finds the connection used at 3: re-armed for 8
    assert not transport.disconnecting
    proxy.clock.advance(2.9)
    assert not transport.disconnecting
    proxy.clock.advance(0.1)
    assert transport.disconnecting


def test_client_timeout_does_not_cut_a_request_being_answered():
    proxy = make_proxy(client_timeout=5)
    proxy.redis.later.add(b"k")
    protocol, transport = proxy.connect()
    protocol.dataReceived(request(b"/get?key=k"))
    proxy.clock.advance(60)
    assert not transport.disconnecting
    proxy.redis.answer(b"k", b"v")
    proxy.clock.advance(4.99)
    assert not transport.disconnecting and parse(transport.value())[0].status == 200
    proxy.clock.advance(5)
    assert transport.disconnecting


@implementer(ISSLTransport)
class TLSTransport(StringTransport):
    """Stands for TLSMemoryBIOProtocol: the handshake ends when the test says."""

    def setTcpNoDelay(self, enabled: bool) -> None:
        pass


@pytest.mark.parametrize("completes", [False, True])
def test_a_tls_handshake_must_end_within_request_timeout(completes):
    proxy = make_proxy(request_timeout=10)
    protocol = proxy.site.buildProtocol(ADDR)
    transport = TLSTransport(peerAddress=ADDR)
    protocol.makeConnection(transport)
    proxy.clock.advance(5)
    if completes:
        protocol.handshakeCompleted()
    proxy.clock.advance(5)
    assert transport.disconnecting != completes


# clients that do not read (SPEC §9): backpressure and max_client_buffer


class SlowReader(StringTransport):
    """A socket whose peer reads only when the test calls ``drain``.

    Like a TCP transport, it asks its producer to pause once more than
    ``room`` bytes wait to be sent, and to resume once they are read; what
    waits is reported as ``dataBuffer``, where redisp looks for it.
    """

    offset = 0
    _tempDataLen = 0

    def __init__(self, room: int = 300):
        super().__init__(peerAddress=ADDR, lenient=True)
        self.room = room
        self.read = b""
        self.asked_to_pause = False

    @property
    def dataBuffer(self) -> bytes:
        return self.value()

    def write(self, data):
        super().write(data)
        if len(self.value()) > self.room and not self.asked_to_pause and self.producer:
            self.asked_to_pause = True
            self.producer.pauseProducing()

    def drain(self) -> None:
        self.read += self.value()
        self.clear()
        if self.asked_to_pause:
            self.asked_to_pause = False
            self.producer.resumeProducing()


def slow_reader(proxy, room: int = 300):
    protocol = proxy.site.buildProtocol(ADDR)
    transport = SlowReader(room)
    protocol.makeConnection(transport)
    return protocol, transport


def test_pipelined_requests_wait_while_the_client_does_not_read(proxy):
    """twisted.web answered every request already read whatever the client
    read; now a full transport stops both reading and answering."""
    proxy.cached(b"k", b"v" * 100)
    protocol, transport = slow_reader(proxy)
    protocol.dataReceived(request(b"/get?key=k") * 50)
    answered = len(parse(transport.value()))
    assert answered < 5
    assert transport.producerState == "paused"  # no more reading either
    for _ in range(100):
        transport.drain()
    assert transport.producerState == "producing"
    assert [r.body for r in parse(transport.read)] == [b"v" * 100] * 50


def test_plain_gets_wait_while_the_client_does_not_read(proxy):
    proxy.cached(b"k", b"v" * 100)
    seen = routed(proxy)
    protocol, transport = slow_reader(proxy)
    for _ in range(3):
        protocol.dataReceived(PLAIN)
    assert transport.producerState == "paused"
    assert len(parse(transport.value())) == 2  # the third waits
    transport.drain()
    transport.drain()
    assert [r.body for r in parse(transport.read)] == [b"v" * 100] * 3
    assert len(seen) == 1  # the one held back went the general way


def test_a_pipelining_client_past_max_client_buffer_is_disconnected(logged):
    proxy = make_proxy(max_client_buffer=1000)
    proxy.cached(b"k", b"v" * 100)
    protocol, transport = slow_reader(proxy, room=10_000)
    protocol.dataReceived(request(b"/get?key=k") * 50)
    assert transport.disconnected  # aborted: what is buffered is dropped
    assert len(parse(transport.value())) < 10
    lose(protocol)
    assert proxy.metrics.connected_clients == 0


def test_plain_gets_past_max_client_buffer_are_disconnected(logged):
    proxy = make_proxy(max_client_buffer=1000)
    proxy.cached(b"k", b"v" * 100)
    seen = routed(proxy)
    protocol, transport = slow_reader(proxy, room=10_000)
    for _ in range(50):
        if transport.disconnected:
            break
        protocol.dataReceived(PLAIN)
    assert transport.disconnected
    assert len(parse(transport.value())) < 10 and seen == []


def test_one_response_larger_than_max_client_buffer_disconnects(logged):
    proxy = make_proxy(max_client_buffer=100_000)
    proxy.cached(b"k", b"v" * 200_000)
    protocol, transport = slow_reader(proxy, room=65536)  # a TCP transport's
    protocol.dataReceived(PLAIN)
    assert transport.disconnected


def test_clients_cut_off_for_max_client_buffer_are_logged_once_a_minute(logged):
    proxy = make_proxy(max_client_buffer=1000)
    proxy.cached(b"k", b"v" * 2000)
    for _ in range(3):
        slow_reader(proxy)[0].dataReceived(PLAIN)
    proxy.clock.advance(60)
    slow_reader(proxy)[0].dataReceived(PLAIN)
    lines = [e for e in logged if "max_client_buffer" in e.get("log_format", "")]
    assert len(lines) == 2 and lines[1]["count"] == 3


# authentication (SPEC §8): Bearer or Basic, 401 with the challenge, /healthz open

SECRET = "door-pw"
BEARER = b"Authorization: Bearer door-pw"
CHALLENGE = b'Bearer realm="redisp"'


def secured_proxy() -> Proxy:
    from redisp.config import Secret, UserConfig

    return make_proxy(password=Secret(SECRET),
                      users=(UserConfig("ro", Secret("ro-pw"), "read"),))


def with_header(raw: bytes, header: bytes) -> bytes:
    return raw[:-2] + header + b"\r\n\r\n"


@pytest.mark.parametrize("raw", [
    request(b"/get?key=k"),
    with_header(request(b"/get?key=k"), b"Authorization: Bearer wrong"),
    with_header(request(b"/get?key=k"), b"Authorization: Basic " + __import__(
        "base64").b64encode(b"ro:wrong")),
    with_header(request(b"/get?key=k"), b"Authorization: Token door-pw"),
    request(b"/metrics"),
    request(b"/nowhere"),
    request(b"/get?key=k", b"POST"),
    PLAIN,
    with_header(PLAIN, b"Authorization: Bearer wrong"),
], ids=["none", "wrong-bearer", "wrong-basic", "other-scheme", "metrics", "unknown-path",
        "post", "plain", "plain-wrong"])
def test_without_valid_credentials_every_path_but_healthz_is_401(raw):
    proxy = secured_proxy()
    proxy.cached(b"k", b"secret value")
    (r,) = proxy.send(raw)
    assert r.status == 401
    assert r.header(b"WWW-Authenticate") == CHALLENGE
    assert b"secret value" not in r.body
    assert proxy.lookups() == 0
    assert proxy.counted("bad_request") == 1
    tried = b"Authorization" in raw
    assert proxy.metrics.auth_failures == (1 if tried else 0)


@pytest.mark.parametrize("header", [
    BEARER,
    b"Authorization: Basic " + __import__("base64").b64encode(b"ro:ro-pw"),
    b"Authorization: Basic " + __import__("base64").b64encode(b"default:door-pw"),
    b"authorization:   bearer door-pw",
])
@pytest.mark.parametrize("plain", [True, False], ids=["plain-path", "twisted-web"])
def test_a_password_or_a_users_credentials_let_the_request_in(header, plain):
    proxy = secured_proxy()
    proxy.cached(b"k", b"v")
    seen = routed(proxy)
    raw = with_header(PLAIN if plain else request(b"/get?key=k", b"HEAD"), header)
    (r,) = proxy.send(raw, head=not plain)
    assert r.status == 200 and r.body == (b"v" if plain else b"")
    assert seen == ([] if plain else [b"/get?key=k"])
    assert proxy.metrics.auth_failures == 0


def test_healthz_needs_no_credentials():
    proxy = secured_proxy()
    protocol, transport = proxy.connect()
    protocol.dataReceived(request(b"/healthz"))
    proxy.backing.pings[0].callback(b"PONG")
    (r,) = parse(transport.value())
    assert (r.status, r.body) == (200, b"ok\n")


def test_a_connection_let_in_once_is_checked_again_for_other_credentials():
    """The plain path remembers the Authorization value it last let in on
    this connection; anything else is checked anew."""
    proxy = secured_proxy()
    proxy.cached(b"k", b"v")
    seen = routed(proxy)
    protocol, transport = proxy.connect()
    good = with_header(PLAIN, BEARER)
    for raw in (good, good, with_header(PLAIN, b"Authorization: Bearer wrong"), good, PLAIN):
        protocol.dataReceived(raw)
    statuses = [r.status for r in parse(transport.value())]
    assert statuses == [200, 200, 401, 200, 401]
    assert len(seen) == 2 and proxy.metrics.auth_failures == 1


# protected mode (SPEC §8): no password, no users: 403 for clients not on loopback


@pytest.mark.parametrize("host", ["127.0.0.2", "10.1.2.3"])
def test_protected_mode_answers_a_remote_client_403_and_closes(host):
    proxy = make_proxy()
    proxy.cached(b"k", b"v")
    addr = IPv4Address("TCP", host, 5555)
    protocol = proxy.site.buildProtocol(addr)
    transport = StringTransport(peerAddress=addr)
    protocol.makeConnection(transport)
    assert transport.value() == b""  # answered once the request is in
    assert proxy.metrics.connected_clients == 0  # it holds no client slot
    protocol.dataReceived(PLAIN)
    (r,) = parse(transport.value())
    assert r.status == 403 and b"protected mode" in r.body
    assert r.header(b"Connection") == b"close" and transport.disconnecting
    assert proxy.lookups() == 0
    protocol.dataReceived(PLAIN)
    assert len(parse(transport.value())) == 1


def test_protected_mode_drops_a_remote_client_that_sends_nothing():
    proxy = make_proxy(request_timeout=5.0)
    addr = IPv4Address("TCP", "10.1.2.3", 5555)
    protocol = proxy.site.buildProtocol(addr)
    transport = StringTransport(peerAddress=addr)
    protocol.makeConnection(transport)
    proxy.clock.advance(4.9)
    assert not transport.disconnecting
    proxy.clock.advance(0.1)
    assert transport.disconnecting
    other = proxy.site.buildProtocol(addr)
    other.makeConnection(StringTransport(peerAddress=addr))
    other.connectionLost(Failure(ConnectionDone()))
    assert proxy.clock.getDelayedCalls() == [], "a client gone leaves no timer"


@pytest.mark.parametrize("settings", [{"protected_mode": False}, "secured"])
def test_protected_mode_off_or_a_password_serves_remote_clients(settings):
    proxy = secured_proxy() if settings == "secured" else make_proxy(**settings)
    proxy.cached(b"k", b"v")
    addr = IPv4Address("TCP", "10.1.2.3", 5555)
    protocol = proxy.site.buildProtocol(addr)
    transport = StringTransport(peerAddress=addr)
    protocol.makeConnection(transport)
    protocol.dataReceived(with_header(PLAIN, BEARER))
    assert parse(transport.value())[0].status == 200
