"""HTTP caching headers of ``/get`` (SPEC §2): ETag, If-None-Match -> 304,
Cache-Control (max-age = whole seconds the entry has left, or no-store when
redisp does not cache the value) and Age (seconds since it was stored).

Over the real Site, reader, gate and cache on a ``task.Clock``; the backing
is the test's.  Last, the promise of the plain-GET path: whatever the
value, the age, the validators and the credentials, it sends the same bytes
as twisted.web's path.
"""

from __future__ import annotations

import base64

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.internet.address import IPv4Address
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from xxhash import xxh3_128_hexdigest

from redisp.clients import ClientSlots
from redisp.config import Config, Secret, UserConfig
from redisp.core.cache import Cache
from redisp.core.gate import Gate
from redisp.core.reader import CachedReader
from redisp.doors.web import build_site
from redisp.metrics import Metrics
from tests.http_support import Response, routed
from tests.test_reader import FakeBacking

ADDR = IPv4Address("TCP", "127.0.0.1", 40000)
TTL = 60.0
NOW = 1_700_000_000.0


def parse_one(data: bytes, body_expected: bool = True) -> Response:
    head, sep, body = data.partition(b"\r\n\r\n")
    assert sep, data
    status_line, *lines = head.split(b"\r\n")
    _, code, reason = status_line.split(b" ", 2)
    headers: dict[bytes, list[bytes]] = {}
    for line in lines:
        name, _, value = line.partition(b": ")
        headers.setdefault(name.lower(), []).append(value)
    if body_expected:
        assert len(body) == int(headers[b"content-length"][0])
    return Response(int(code), reason, headers, body)


class Door:
    """An HTTP door over a real cache whose backing the test answers."""

    def __init__(self, capacity: int = 100, max_item_bytes: int = 0, **settings) -> None:
        self.clock = Clock()
        self.clock.advance(NOW)
        self.metrics = Metrics(started=NOW)
        self.cache = Cache(capacity, TTL, self.clock, self.metrics, max_item_bytes)
        self.backing = FakeBacking()
        self.reader = CachedReader(self.cache, Gate(1, self.clock), self.backing, self.metrics)
        config = Config(ttl=TTL, capacity=capacity, max_item_bytes=max_item_bytes, **settings)
        self.site = build_site(self.reader, self.backing, self.metrics,
                               ClientSlots(100, self.metrics), config, self.clock,
                               cache=self.cache)

    def send(self, raw: bytes) -> bytes:
        channel = self.site.buildProtocol(ADDR)
        transport = StringTransport(peerAddress=ADDR)
        channel.makeConnection(transport)
        channel.dataReceived(raw)
        return transport.value()

    def store(self, key: bytes, value: bytes) -> None:
        """``key`` fetched through the door (a miss), so the cache holds it."""
        self.send(get(key))
        self.backing.pending.pop().callback(value)
        self.clock.advance(0)


def get(key: bytes, *headers: bytes, method: bytes = b"GET") -> bytes:
    return (method + b" /get?key=" + key + b" HTTP/1.1\r\nHost: h\r\n"
            + b"".join(h + b"\r\n" for h in headers) + b"\r\n")


def tag(value: bytes) -> bytes:
    return b'"' + xxh3_128_hexdigest(value).encode() + b'"'


@pytest.fixture
def door() -> Door:
    return Door()


# -- ETag, Cache-Control, Age ------------------------------------------------------------


def test_a_miss_carries_the_full_ttl_and_age_zero(door):
    channel = door.site.buildProtocol(ADDR)
    transport = StringTransport(peerAddress=ADDR)
    channel.makeConnection(transport)
    channel.dataReceived(get(b"k"))
    assert transport.value() == b""  # written when the fetch settles
    door.backing.pending.pop().callback(b"value")
    r = parse_one(transport.value())
    assert (r.status, r.body, r.header(b"X-Cache")) == (200, b"value", b"MISS")
    assert r.header(b"ETag") == tag(b"value")
    assert r.header(b"Cache-Control") == b"max-age=60"
    assert r.header(b"Age") == b"0"


def test_a_hit_says_how_long_the_entry_has_left_and_how_old_it_is(door):
    door.store(b"k", b"value")
    door.clock.advance(7.5)
    r = parse_one(door.send(get(b"k")))
    assert (r.status, r.header(b"X-Cache")) == (200, b"HIT")
    assert r.header(b"Cache-Control") == b"max-age=52"  # 52.5 left: rounded down
    assert r.header(b"Age") == b"7"
    assert r.header(b"ETag") == tag(b"value")


def test_max_age_never_outlives_the_entry(door):
    door.store(b"k", b"v")
    door.clock.advance(TTL - 0.25)
    r = parse_one(door.send(get(b"k")))
    assert r.header(b"Cache-Control") == b"max-age=0"
    assert r.header(b"Age") == b"59"
    door.clock.advance(0.25)
    assert door.send(get(b"k")) == b""  # expired: a miss, fetched again


def test_the_etag_follows_the_bytes_of_the_value(door):
    door.store(b"a", b"same")
    door.store(b"b", b"same")
    door.store(b"c", b"other")
    tags = [parse_one(door.send(get(k))).header(b"ETag") for k in (b"a", b"b", b"c")]
    assert tags[0] == tags[1] != tags[2]
    assert tags[0].startswith(b'"') and tags[0].endswith(b'"') and len(tags[0]) == 34


@pytest.mark.parametrize("settings, why", [
    ({"capacity": 0}, "capacity 0"),
    ({"max_item_bytes": 3}, "over max_item_bytes"),
])
def test_a_value_redisp_does_not_cache_is_no_store(settings, why):
    door = Door(**settings)
    channel = door.site.buildProtocol(ADDR)
    transport = StringTransport(peerAddress=ADDR)
    channel.makeConnection(transport)
    channel.dataReceived(get(b"k"))
    door.backing.pending.pop().callback(b"value")
    r = parse_one(transport.value())
    assert (r.status, r.body) == (200, b"value"), why
    assert r.header(b"Cache-Control") == b"no-store"
    assert r.header(b"Age") is None
    assert r.header(b"ETag") == tag(b"value")


def test_while_tracking_is_down_values_are_no_store(door):
    door.reader.caching = False
    channel = door.site.buildProtocol(ADDR)
    transport = StringTransport(peerAddress=ADDR)
    channel.makeConnection(transport)
    channel.dataReceived(get(b"k"))
    door.backing.pending.pop().callback(b"value")
    assert parse_one(transport.value()).header(b"Cache-Control") == b"no-store"


def test_a_value_invalidated_while_fetched_is_no_store(door):
    """The fetch is poisoned: not stored, so not to be kept downstream either."""
    channel = door.site.buildProtocol(ADDR)
    transport = StringTransport(peerAddress=ADDR)
    channel.makeConnection(transport)
    channel.dataReceived(get(b"k"))
    door.reader.invalidate(b"k")
    door.backing.pending.pop().callback(b"old")
    assert parse_one(transport.value()).header(b"Cache-Control") == b"no-store"


def test_absent_keys_metrics_and_health_are_no_store(door):
    channel = door.site.buildProtocol(ADDR)
    transport = StringTransport(peerAddress=ADDR)
    channel.makeConnection(transport)
    channel.dataReceived(get(b"absent"))
    door.backing.pending.pop().callback(None)
    r = parse_one(transport.value())
    assert r.status == 404 and r.header(b"Cache-Control") == b"no-store"
    r = parse_one(door.send(b"GET /metrics HTTP/1.1\r\n\r\n"))
    assert r.status == 200 and r.header(b"Cache-Control") == b"no-store"


# -- If-None-Match -> 304 ------------------------------------------------------------------


@pytest.mark.parametrize("header", [
    None, b"*", b"W/{tag}", b'"nope", {tag}', b'"nope",W/{tag} ,"x"',
])
def test_if_none_match_with_the_etag_is_304_without_a_body(door, header):
    door.store(b"k", b"value")
    door.clock.advance(3)
    value = (header or b"{tag}").replace(b"{tag}", tag(b"value"))
    raw = door.send(get(b"k", b"If-None-Match: " + value))
    r = parse_one(raw, body_expected=False)
    assert (r.status, r.reason, r.body) == (304, b"Not Modified", b"")
    assert raw.endswith(b"\r\n\r\n")
    assert r.header(b"Content-Length") is None and r.header(b"Content-Type") is None
    assert (r.header(b"ETag"), r.header(b"Cache-Control"), r.header(b"Age")) == (
        tag(b"value"), b"max-age=57", b"3")
    assert r.header(b"X-Cache") == b"HIT"
    assert door.metrics.requests["http", "hit"] == 1


@pytest.mark.parametrize("header", [b'"nope"', b"W/\"nope\"", tag(b"other")])
def test_if_none_match_with_another_etag_is_a_200(door, header):
    door.store(b"k", b"value")
    r = parse_one(door.send(get(b"k", b"If-None-Match: " + header)))
    assert (r.status, r.body) == (200, b"value")


def test_a_changed_value_gets_a_new_etag_and_a_200(door):
    door.store(b"k", b"v1")
    old = tag(b"v1")
    door.reader.invalidate(b"k")
    channel = door.site.buildProtocol(ADDR)
    transport = StringTransport(peerAddress=ADDR)
    channel.makeConnection(transport)
    channel.dataReceived(get(b"k", b"If-None-Match: " + old))
    door.backing.pending.pop().callback(b"v2")
    r = parse_one(transport.value())
    assert (r.status, r.body, r.header(b"ETag")) == (200, b"v2", tag(b"v2"))


def test_a_miss_that_matches_is_a_304_too(door):
    channel = door.site.buildProtocol(ADDR)
    transport = StringTransport(peerAddress=ADDR)
    channel.makeConnection(transport)
    channel.dataReceived(get(b"k", b"If-None-Match: " + tag(b"value")))
    door.backing.pending.pop().callback(b"value")
    r = parse_one(transport.value(), body_expected=False)
    assert (r.status, r.header(b"X-Cache")) == (304, b"MISS")
    assert door.metrics.requests["http", "miss"] == 1


def test_head_with_a_matching_etag_is_304(door):
    door.store(b"k", b"value")
    raw = door.send(get(b"k", b"If-None-Match: " + tag(b"value"), method=b"HEAD"))
    assert raw.startswith(b"HTTP/1.1 304 Not Modified\r\n") and raw.endswith(b"\r\n\r\n")


def test_a_304_keeps_the_connection_for_the_next_request(door):
    door.store(b"k", b"value")
    channel = door.site.buildProtocol(ADDR)
    transport = StringTransport(peerAddress=ADDR)
    channel.makeConnection(transport)
    channel.dataReceived(get(b"k", b"If-None-Match: " + tag(b"value")))
    channel.dataReceived(get(b"k"))
    first, second = transport.value().split(b"HTTP/1.1 ")[1:]
    assert first.startswith(b"304") and second.startswith(b"200")
    assert second.endswith(b"\r\n\r\nvalue") and not transport.disconnecting


# -- the plain-GET path and twisted.web's send the same bytes --------------------------------


def both_paths(door: Door, key: bytes, headers: list[bytes]) -> tuple[bytes, bytes, int]:
    """The response to the same request by the plain-GET path and (with a
    header that only twisted.web takes) by twisted.web's, and how many went
    through twisted.web."""
    seen = routed(door)
    fast = door.send(get(key, *headers))
    slow = door.send(get(key, *headers, b"X-Slow: 1"))
    return fast, slow, len(seen)


PASSWORD = Secret("pw")
USERS = (UserConfig("u", Secret("upw"), "read"),)


@settings(max_examples=150, deadline=None)
@given(
    value=st.binary(max_size=300),
    age=st.floats(0, TTL - 0.001),
    validator=st.sampled_from(["none", "match", "weak", "star", "other"]),
    credentials=st.sampled_from(["none", "bearer", "basic", "wrong"]),
    secured=st.booleans(),
)
def test_the_plain_path_and_twisted_web_answer_alike(value, age, validator, credentials,
                                                     secured):
    door = Door(**({"password": PASSWORD, "users": USERS} if secured else {}))
    door.cache.put(b"k", value)
    door.clock.advance(age)
    headers = []
    if validator != "none":
        headers.append(b"If-None-Match: " + {
            "match": tag(value), "weak": b"W/" + tag(value), "star": b"*",
            "other": b'"other"'}[validator])
    if credentials != "none":
        headers.append(b"Authorization: " + {
            "bearer": b"Bearer pw", "basic": b"Basic " + base64.b64encode(b"u:upw"),
            "wrong": b"Bearer nope"}[credentials])
    fast, slow, routed = both_paths(door, b"k", headers)
    assert fast == slow
    answered_fast = not secured or credentials in ("bearer", "basic")
    assert routed == (1 if answered_fast else 2)
    requests = door.metrics.requests
    if answered_fast:
        assert requests["http", "hit"] == 2
    else:
        assert fast.startswith(b"HTTP/1.1 401 ")
        assert door.metrics.auth_failures == (2 if credentials == "wrong" else 0)
