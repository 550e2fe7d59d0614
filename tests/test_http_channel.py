"""The HTTP door's protocol (doors/http.py, SPEC §2, §9): connections and
client slots, persistence and pipelining, the Date header, the access log,
the plain-GET hand-off, limits on the head (414, 431), request and client
timeouts, and clients that do not read.  Driven like tests/test_web.py:
bytes in through ``dataReceived``, the raw response bytes parsed back.
"""

from __future__ import annotations

import re
from urllib.parse import urlencode

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.internet.error import ConnectionDone
from twisted.internet.interfaces import ISSLTransport
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure
from twisted.web.http import HTTPChannel
from zope.interface import implementer

from redisp.config import Secret
from redisp.doors.http import _PLAIN_MAX, plain_get
from tests.http_support import (
    ADDR,
    PLAIN,
    Proxy,
    Response,
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


def test_http_1_0_is_answered_and_closed(proxy):
    proxy.cached(b"k", b"v")
    protocol, transport = proxy.connect()
    protocol.dataReceived(b"GET /get?key=k HTTP/1.0\r\n\r\n")
    (r,) = parse(transport.value())
    assert (r.status, r.body) == (200, b"v")
    assert transport.disconnecting


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


@settings(max_examples=100, deadline=None)
@given(
    key=st.binary(min_size=1, max_size=20),
    value=st.binary(max_size=200),
    extra=st.sampled_from([b"", b"Accept: */*\r\n", b"If-None-Match: *\r\n",
                           b"Connection: keep-alive\r\n"]),
    cuts=st.lists(st.integers(1, 10_000), min_size=1, max_size=6),
)
def test_a_plain_get_cut_anywhere_is_answered_as_it_is_whole(key, value, extra, cuts):
    """The plain-GET path's promise, on every chunking: a request that
    arrives in pieces is not plain (twisted.web parses it) and gets the same
    bytes, and the same count, as the same request whole (the fast path)."""
    proxy = make_proxy()
    proxy.cached(key, value)
    raw = (b"GET /get?" + urlencode({"key": key}).encode() + b" HTTP/1.1\r\n"
           b"Host: h\r\n" + extra + b"\r\n")
    seen = routed(proxy)
    protocol, whole = proxy.connect()
    protocol.dataReceived(raw)
    assert seen == []
    protocol, pieces = proxy.connect()
    at = sorted({cut % (len(raw) - 1) + 1 for cut in cuts})
    for start, end in zip([0, *at], [*at, len(raw)], strict=True):
        protocol.dataReceived(raw[start:end])
    assert len(seen) == 1
    assert pieces.value() == whole.value()
    assert proxy.counted("hit") == 2
    assert not whole.disconnecting and not pieces.disconnecting


# plain_get's regex passes over harmless lines: the same reading as line by line


_REFERENCE_HEAD = re.compile(
    rb"GET (/get\?[\x21-\x7e]*) HTTP/1\.1\r\n"
    rb"((?:[!#$%&'*+.^_`|~0-9A-Za-z-]+:[\t\x20-\x7e]*\r\n)*)\r\n"
)


def reference_plain_get(data: bytes):
    """``plain_get`` as it read every header line in a Python loop (before
    branch w-http): what the regex that skips harmless lines must agree with."""
    if len(data) > _PLAIN_MAX:
        return None
    match = _REFERENCE_HEAD.fullmatch(data)
    if match is None:
        return None
    lines = match[2].split(b"\r\n")[:-1]
    if len(lines) > HTTPChannel.maxHeaders:
        return None
    authorization = if_none_match = None
    for line in lines:
        name, _, value = line.partition(b":")
        name = name.lower()
        if name in (b"host", b"user-agent", b"accept", b"accept-encoding", b"accept-language"):
            continue
        if name == b"authorization" and authorization is None:
            authorization = value.strip()
        elif name == b"if-none-match" and if_none_match is None:
            if_none_match = value.strip()
        elif name != b"connection" or value.strip().lower() != b"keep-alive":
            return None
    return match[1], authorization, if_none_match


_NAMES = [
    b"Host", b"host", b"HOST", b"User-Agent", b"user-agent", b"Accept", b"ACCEPT",
    b"Accept-Encoding", b"accept-language", b"Accept-Languages", b"Accepts", b"Hostname",
    b"Connection", b"CONNECTION", b"Authorization", b"authorization", b"If-None-Match",
    b"if-none-match", b"X-Other", b"Content-Length", b"Expect", b"Upgrade",
    b"Transfer-Encoding", b"Cookie",
]
_VALUES = [
    b" 127.0.0.1:9997", b" keep-alive", b"keep-alive", b"\tKeep-Alive \t", b" keep-alive,",
    b" keep-alive x", b" close", b" Upgrade", b"", b" ", b" *", b' "x"', b' W/"x", "y"',
    b" Bearer door-pw", b" bearer  door-pw ", b" Bearer wrong", b" 2", b" 100-continue",
    b" chunked", b" \x00", b" caf\xc3\xa9", b" a\x0bb",
]
_TOKEN = st.from_regex(rb"\A[!#$%&'*+.^_`|~0-9A-Za-z-]{1,12}\Z")


def header_lines(values: st.SearchStrategy[bytes]) -> st.SearchStrategy[list[bytes]]:
    names = st.sampled_from(_NAMES)
    line = st.builds(
        lambda name, sep, value: name + sep + value + b"\r\n",
        st.one_of(names, names, names, _TOKEN),
        st.sampled_from([b":"] * 9 + [b" :"]),
        st.one_of(st.sampled_from(_VALUES), st.sampled_from(_VALUES), values),
    )
    return st.lists(line, max_size=5)


_TARGETS = st.sampled_from([b"/get?key=k", b"/get?key=a+b%2B", b"/get?key=k&x=1", b"/get?"]) | (
    st.binary(min_size=1, max_size=10).map(lambda key: b"/get?" + urlencode({"key": key}).encode()))


def heads(values: st.SearchStrategy[bytes], tails: bool) -> st.SearchStrategy[bytes]:
    return st.builds(
        lambda method, target, version, lines, tail: (
            method + b" " + target + b" " + version + b"\r\n" + b"".join(lines) + b"\r\n" + tail),
        st.sampled_from([b"GET"] * 9 + [b"HEAD", b"get"]),
        _TARGETS,
        st.sampled_from([b"HTTP/1.1"] * 9 + [b"HTTP/1.0"]),
        header_lines(values),
        st.sampled_from([b""] * 9 + [b"x", b"\r\n"]) if tails else st.just(b""),
    )


@settings(max_examples=2000, deadline=None)
@given(head=heads(st.binary(max_size=8), tails=True))
def test_plain_get_reads_a_head_as_the_line_by_line_reading_does(head):
    assert plain_get(head) == reference_plain_get(head)


@pytest.mark.parametrize("line", [
    b"Host: h", b"hOsT:h", b"Hostname: h", b"Accept: */*", b"Accepts: x", b"Accept-: x",
    b"Accept-Encoding: gzip", b"Accept-Languages: x", b"accept-language:", b"User-Agent: wrk",
    b"User-Agents: x", b"Connection: keep-alive", b"connection:\tKEEP-ALIVE\t ",
    b"Connection: keep-alive x", b"Connection: keep-alive,", b"Connection: close",
    b"Connection:", b"Connection : keep-alive", b"Host : h", b"Authorization: Bearer x",
    b"If-None-Match: *",
])
@pytest.mark.parametrize("before", [b"", b"Host: h\r\n", b"X-Other: y\r\n"])
def test_plain_get_reads_each_near_miss_as_the_line_by_line_reading_does(line, before):
    head = b"GET /get?key=k HTTP/1.1\r\n" + before + line + b"\r\nAccept: x\r\n\r\n"
    assert plain_get(head) == reference_plain_get(head)


@pytest.mark.parametrize("count", [499, 500, 501])
@pytest.mark.parametrize("last", [b"", b"Authorization: x\r\n", b"X-Other: y\r\n"])
def test_plain_get_counts_harmless_lines_against_max_headers(count, last):
    head = b"GET /get?key=k HTTP/1.1\r\n" + b"Accept: x\r\n" * count + last + b"\r\n"
    assert plain_get(head) == reference_plain_get(head)
    assert (plain_get(head) is None) == (count + bool(last) > HTTPChannel.maxHeaders or
                                           last.startswith(b"X-"))


_PRINTABLE_VALUES = st.binary(max_size=8).map(
    lambda v: bytes(c for c in v if c not in b"\r\n"))


@settings(max_examples=150, deadline=None)
@given(
    head=heads(_PRINTABLE_VALUES, tails=False),
    variant=st.sampled_from(["open", "password", "lifetimes"]),
    value=st.binary(max_size=50),
    cuts=st.lists(st.integers(1, 10_000), min_size=1, max_size=4),
)
def test_any_head_whole_is_answered_as_it_is_in_pieces(head, variant, value, cuts):
    """The fast path's promise on any head, plain or not, with credentials
    or cache lifetimes or neither: whole (the fast path when it is plain) or
    in pieces (twisted.web, always), the same bytes and the same counts."""
    proxies = []
    for _ in range(2):
        if variant == "password":
            proxy = make_proxy(password=Secret("door-pw"))
        else:
            proxy = make_proxy(lifetimes=variant == "lifetimes")
        for key in (b"k", b"a b+", b""):
            proxy.cached(key, value)
        proxies.append(proxy)
    whole_proxy, pieces_proxy = proxies
    protocol, whole = whole_proxy.connect()
    protocol.dataReceived(head)
    protocol, pieces = pieces_proxy.connect()
    at = sorted({cut % (len(head) - 1) + 1 for cut in cuts})
    for start, end in zip([0, *at], [*at, len(head)], strict=True):
        if pieces.disconnecting:
            break
        protocol.dataReceived(head[start:end])
    assert pieces.value() == whole.value()
    assert pieces.disconnecting == whole.disconnecting
    assert pieces_proxy.metrics.requests == whole_proxy.metrics.requests
    assert pieces_proxy.metrics.auth_failures == whole_proxy.metrics.auth_failures


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

