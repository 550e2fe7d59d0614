"""The HTTP door's application (doors/web.py, SPEC §2, §8): ``/get``, ``/healthz``,
``/metrics``, errors, credentials and protected mode, driven through a real
Site and HTTPChannel.

Bytes go in through ``dataReceived`` on an in-memory transport and the raw
response bytes are parsed back, so every test covers what a client sees:
status line, headers, Content-Length, HEAD, persistence.  Under the door are
the real reader, gate and cache; only Redis is scripted (``ScriptedRedis``),
and the health check's ping; the clock is a ``task.Clock``.  The protocol
under it (limits, timeouts, backpressure, the plain-GET hand-off) is tested
in tests/test_http_channel.py.
"""

from __future__ import annotations

from urllib.parse import unquote_to_bytes, urlencode

import pytest
from hypothesis import given
from hypothesis import strategies as st
from prometheus_client import CONTENT_TYPE_LATEST
from twisted.internet.address import IPv4Address
from twisted.internet.defer import Deferred
from twisted.internet.error import ConnectionDone
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure
from twisted.web.server import NOT_DONE_YET
from twisted.web.test.requesthelper import DummyRequest
from xxhash import xxh3_128_intdigest

from redisp.backing.connection import BackingReplyError, BackingTimeout, BackingUnavailable
from redisp.doors.http import compose
from redisp.doors.web import (
    _HIT_CACHED,
    _HIT_NOT_CACHED,
    BadKey,
    etag,
    key_from_query,
    validators,
)
from tests.http_support import (
    PLAIN,
    Proxy,
    failures,
    log_events,
    lose,
    make_proxy,
    parse,
    request,
    routed,
)


@pytest.fixture
def proxy() -> Proxy:
    return make_proxy()


@pytest.fixture
def logged():
    with log_events() as events:
        yield events


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


@given(st.binary(max_size=40))
def test_key_from_query_reads_any_query_as_the_form_decoding_does(query):
    """The hot path asks ``ord(c) in text``; the reading is still WHATWG
    form decoding of the one ``key`` field (none, empty or twice: BadKey)."""
    fields = [f.partition(b"=") for f in query.split(b"&")]
    keys = [unquote_to_bytes(v.replace(b"+", b" ")) for n, _, v in fields
            if unquote_to_bytes(n.replace(b"+", b" ")) == b"key"]
    if len(keys) != 1 or not keys[0]:
        with pytest.raises(BadKey):
            key_from_query(b"/get?" + query)
    else:
        assert key_from_query(b"/get?" + query) == keys[0]


@given(st.binary(max_size=300))
def test_the_etag_is_the_hash_in_32_hex_digits(value):
    """Formatted by xxhash now, as it was from the integer digest before."""
    assert etag(value) == b'"%032x"' % xxh3_128_intdigest(value)


@given(
    date=st.binary(max_size=40),
    value=st.binary(max_size=300),
    lifetime=st.none() | st.tuples(st.floats(0, 1e9), st.floats(0, 1e9)),
)
def test_the_plain_200_template_is_what_compose_makes(date, value, lifetime):
    """``answer_plain``'s one formatting sends ``compose``'s bytes."""
    tag = etag(value)
    composed = compose(b"HTTP/1.1 200 OK", [b"Date: " + date, validators(tag, lifetime)],
                       b"application/octet-stream", value, b"HIT", False)
    if lifetime is None:
        assert _HIT_NOT_CACHED % (date, tag, len(value), value) == composed
    else:
        assert _HIT_CACHED % (date, tag, lifetime[1], lifetime[0], len(value), value) == composed


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
