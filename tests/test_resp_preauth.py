"""Redis's limits before AUTH on the RESP door, byte for byte against a
redis-server started with ``--requirepass`` (SPEC §8, §9).

Since CVE-2021-32675, Redis refuses a multibulk count over 10 and a bulk
length over 16384 from a client that has not authenticated, then hangs up;
it parses one command, runs it, then parses the next, so an AUTH lifts the
limits for what follows it in the same packet and a failed one does not.
Inline requests have no such limits.  The reference is Redis 7.0 (the
version the RESP door follows); against another these tests are skipped.

Requests that a server refuses at a header are sent without their body:
a server that hangs up with bytes unread resets the connection, and the
reset may overtake the reply.
"""

from __future__ import annotations

import pytest
import pytest_twisted
from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.internet import threads

from redisp.config import Secret
from redisp.protocol.codec import RequestParser
from redisp.protocol.frames import FrameScanner
from tests.raw_redis import encode
from tests.support import redis_7_0_with_password, until
from tests.test_auth_redis import masked, talk
from tests.test_resp_logging import protocol_error_lines  # noqa: F401  (the fixture)
from tests.test_resp_server import Door

inline = pytest_twisted.inlineCallbacks
PASSWORD = "sekret"
PW = PASSWORD.encode()
BIG = 16384


@pytest.fixture(scope="module")
def reference():
    """A redis-server with requirepass, holding ``k`` = ``v``."""
    with redis_7_0_with_password(PASSWORD) as (server, client):
        client.set("k", "v")
        yield server


@pytest.fixture
def proxied(redis_db, start_proxy):
    """redisp in front of the session's redis-server (``k`` = ``v``)."""
    @inline
    def start(**settings):
        redis_db.set("k", "v")
        p = start_proxy(**settings)
        yield until(lambda: p.proxy.backing.up)
        if p.proxy.forwarder is not None:
            yield until(lambda: p.proxy.forwarder.table is not None)
        return p
    return start


def mget(count: int) -> bytes:
    """A multibulk request of ``count`` arguments: MGET k k …"""
    return encode(b"MGET", *[b"k"] * (count - 1))


def get_header(size: int) -> bytes:
    """GET of a ``size``-byte key, up to its bulk header (see the module's note)."""
    return b"*2\r\n$3\r\nGET\r\n$%d\r\n" % size


AUTH = encode(b"AUTH", PW)
WRONG = encode(b"AUTH", b"wrong")

#: steps on one connection (see tests/test_auth_redis.py ``talk``); a step
#: that ends in a refusal waits for one reply more, to see the hang-up
CASES = {
    "11 args before AUTH": [(mget(11), 2)],
    "10 args before AUTH": [(mget(10), 1), (b"PING",)],
    "a count past max_args before AUTH": [(b"*2000000\r\n", 2)],
    "a count past INT_MAX before AUTH": [(b"*2147483648\r\n", 2)],
    "no count before AUTH": [(b"*0\r\n*-1\r\n" + encode(b"PING"), 1)],
    "16385-byte bulk before AUTH": [(get_header(BIG + 1), 2)],
    "16384-byte bulk before AUTH": [(encode(b"GET", b"a" * BIG), 1), (b"PING",)],
    "the third bulk before AUTH": [(b"*3\r\n$3\r\nSET\r\n$1\r\nk\r\n$16385\r\n", 2)],
    "a bulk past proto-max-bulk-len": [(get_header(512 * 1024 * 1024 + 1), 2)],
    "a bulk at proto-max-bulk-len": [(get_header(512 * 1024 * 1024), 2)],
    "the count is checked first": [(b"*11\r\n$16385\r\n", 2)],
    "AUTH then 20 args": [(AUTH + mget(20) + encode(b"GET", b"k"), 3)],
    "AUTH then a 16385-byte bulk": [(AUTH + encode(b"GET", b"a" * (BIG + 1)), 2)],
    "AUTH as two users then big": [
        (encode(b"AUTH", b"default", PW) + mget(12), 2), (mget(30), 1)],
    "failed AUTH then 20 args": [(WRONG + mget(20) + encode(b"GET", b"k"), 3)],
    "failed AUTH then a 16385-byte bulk": [(WRONG + get_header(BIG + 1), 3)],
    "NOAUTH then 11 args": [(encode(b"GET", b"k") + b"PING\r\n" + mget(11), 4)],
    "AUTH in a later packet": [(WRONG, 1), (AUTH, 1), (mget(20), 1)],
    "inline before AUTH": [
        (b"MGET" + b" k" * 30 + b"\r\n", 1), (b"GET " + b"a" * (BIG + 1) + b"\r\n", 1),
        (b"AUTH " + PW + b"\r\n" + b"MGET" + b" k" * 30 + b"\r\n", 2)],
    "inline AUTH then big": [(b"AUTH " + PW + b"\r\n" + mget(20), 2)],
    "HELLO 3 AUTH then big": [
        (encode(b"HELLO", b"3", b"AUTH", b"default", PW) + mget(20), 2)],
    "HELLO 3 AUTH failed then big": [
        (encode(b"HELLO", b"3", b"AUTH", b"default", b"x") + mget(20), 3)],
    "HELLO 3 AUTH with a long password": [
        (b"*5\r\n$5\r\nHELLO\r\n$1\r\n3\r\n$4\r\nAUTH\r\n$7\r\ndefault\r\n$16385\r\n", 2)],
    "RESET ends the authentication": [(AUTH, 1), (b"RESET",), (mget(11), 2)],
    "QUIT before AUTH": [(encode(b"QUIT") + mget(11), 2)],
}


@pytest.mark.parametrize("case", list(CASES))
@inline
def test_the_same_bytes_as_redis_before_auth(reference, proxied, case):
    p = yield proxied(password=Secret(PASSWORD))
    steps = CASES[case]
    expected = talk(reference.port, steps)
    got = yield threads.deferToThread(talk, p.resp_port, steps)
    assert [masked(x) for x in got] == [masked(x) for x in expected]


def test_the_reference_refuses_what_the_cases_say(reference):
    """The cases test what they are named after."""
    refused = b"-ERR Protocol error: unauthenticated "
    out = talk(reference.port, CASES["AUTH then 20 args"] + [(mget(11), 1)])
    assert out[0][0] == b"+OK\r\n" and out[0][1].startswith(b"*19\r\n")
    assert talk(reference.port, CASES["failed AUTH then 20 args"])[0][1:] == [
        refused + b"multibulk length\r\n", "closed"]
    assert talk(reference.port, CASES["inline AUTH then big"])[0][1].startswith(b"*19\r\n")
    assert talk(reference.port, CASES["16385-byte bulk before AUTH"]) == [
        [refused + b"bulk length\r\n", "closed"]]
    assert talk(reference.port, CASES["a count past max_args before AUTH"]) == [
        [refused + b"multibulk length\r\n", "closed"]]


NO_PASSWORD = [(mget(20), 1), (encode(b"GET", b"a" * (BIG + 1)), 1), (mget(11), 1)]


@inline
def test_no_password_no_limit_as_redis(redis_server, proxied):
    p = yield proxied()
    expected = talk(redis_server.port, NO_PASSWORD)
    got = yield threads.deferToThread(talk, p.resp_port, NO_PASSWORD)
    assert got == expected
    assert got[0][0].startswith(b"*19\r\n")


# -- chunked: the same bytes whatever the reads -------------------------------------

PACKETS = {
    "11 args": mget(11),
    "16385-byte bulk": encode(b"GET", b"a" * (BIG + 1)),
    "16384-byte bulk": encode(b"GET", b"a" * BIG),
    "AUTH then big": AUTH + mget(20) + encode(b"GET", b"a" * (BIG + 1)) + encode(b"GET", b"k"),
    "failed AUTH then big": WRONG + mget(20),
    "failed AUTH then a long bulk": WRONG + encode(b"GET", b"a" * (BIG + 1)),
    "inline": b"MGET" + b" k" * 30 + b"\r\nAUTH " + PW + b"\r\n" + mget(20),
    "HELLO 3 AUTH then big": encode(b"HELLO", b"3", b"AUTH", b"default", PW) + mget(20),
    "AUTH then RESET": AUTH + encode(b"RESET") + encode(b"PING"),
}


def redis_reply(port: int, data: bytes) -> bytes:
    """Everything Redis answers ``data`` (sent whole) until it has answered
    every request or hung up."""
    import socket

    parser = RequestParser()
    wanted = len(parser.feed(data)) + (not parser.idle)  # (an unfinished one: refused)
    scanner = FrameScanner()
    frames: list = []
    out = b""
    with socket.create_connection(("127.0.0.1", port), timeout=20) as sock:
        sock.sendall(data)
        while len(frames) < wanted:
            chunk = sock.recv(65536)
            if not chunk:
                break
            out += chunk
            frames += scanner.feed(chunk)
    return out


def secured_door() -> Door:
    return Door(password=Secret(PASSWORD), values={b"k": b"v"})


@pytest.mark.parametrize("size", [1, 7, None])
@pytest.mark.parametrize("name", list(PACKETS))
def test_the_same_bytes_in_any_chunks(reference, name, size):
    """redisp fed the packet ``size`` bytes at a time (None: whole) answers
    what Redis answers the whole packet."""
    data = PACKETS[name]
    if name == "16385-byte bulk":  # Redis, hanging up with bytes unread, may reset first
        expected = redis_reply(reference.port, get_header(BIG + 1))
    elif name == "failed AUTH then a long bulk":
        expected = redis_reply(reference.port, WRONG + get_header(BIG + 1))
    else:
        expected = redis_reply(reference.port, data)
    door = secured_door()
    proto, transport = door.connect()
    step = size or len(data)
    for i in range(0, len(data), step):
        proto.dataReceived(data[i:i + step])
    door.clock.advance(0)  # the turn ends: replies of misses are written
    assert masked(FrameScanner().feed(transport.value())) == \
        masked(FrameScanner().feed(expected))
    assert b"version" in expected or transport.value() == expected
    closes = b"Protocol error" in expected
    assert bool(transport.disconnecting) == closes


def test_redis_reply_counts_requests_whole(reference):
    """(The helper above waits for as many replies as requests.)"""
    assert redis_reply(reference.port, AUTH + mget(3)) == b"+OK\r\n*2\r\n$1\r\nv\r\n$1\r\nv\r\n"


# -- the door: counted and logged as any protocol error; the hot path untouched ----------


def test_counted_and_logged_as_protocol_errors(protocol_error_lines):  # noqa: F811
    door = secured_door()
    proto, transport = door.connect()
    proto.dataReceived(WRONG + mget(11))
    assert transport.value().endswith(
        b"-ERR Protocol error: unauthenticated multibulk length\r\n")
    assert door.outcomes()["protocol_error"] == 1
    assert len(protocol_error_lines) == 1
    assert protocol_error_lines[0]["problem"] == "Protocol error: unauthenticated multibulk length"
    door.clock.advance(1)
    door.connect()[0].dataReceived(get_header(BIG + 1))
    assert door.outcomes()["protocol_error"] == 2
    assert protocol_error_lines[1]["problem"] == "Protocol error: unauthenticated bulk length"


def test_after_auth_the_fast_paths_are_back():
    door = secured_door()
    proto, transport = door.connect()
    assert proto._detour and proto._w.preauth
    proto.dataReceived(AUTH)
    assert not proto._detour and not proto._w.preauth and proto._parser.idle
    assert proto._parser._max_count == door.config.max_args
    transport.clear()
    proto.dataReceived(encode(b"GET", b"k") * 2)
    assert transport.value() == b"$1\r\nv\r\n" * 2


def test_reset_brings_the_limits_back():
    door = secured_door()
    proto, transport = door.connect()
    proto.dataReceived(AUTH + mget(11))
    proto.dataReceived(encode(b"RESET"))
    assert proto._w.preauth and proto._detour
    transport.clear()
    proto.dataReceived(mget(11))
    assert transport.value() == b"-ERR Protocol error: unauthenticated multibulk length\r\n"


def test_reset_without_password_changes_nothing():
    door = Door()
    proto, transport = door.connect()
    assert not proto._detour  # the fast paths from the start
    proto.dataReceived(encode(b"RESET") + mget(20))
    assert not proto._w.preauth
    assert transport.value().startswith(b"+RESET\r\n*19\r\n")


def test_a_client_not_reading_before_auth_keeps_its_order():
    """While the client does not read, its packets are kept unparsed: the
    AUTH held back still lifts the limits for what follows it."""
    door = secured_door()
    proto, transport = door.connect()
    proto.pauseProducing()
    proto.dataReceived(AUTH + mget(5))
    proto.dataReceived(mget(20))
    assert transport.value() == b""
    proto.resumeProducing()
    assert transport.value() == b"+OK\r\n*4\r\n" + b"$1\r\nv\r\n" * 4 + b"*19\r\n" + \
        b"$1\r\nv\r\n" * 19
    assert not transport.disconnecting and proto._parser.idle


def test_a_request_begun_before_auth_is_timed():
    door = Door(password=Secret(PASSWORD), request_timeout=5.0)
    proto, transport = door.connect()
    proto.dataReceived(encode(b"PING") + b"*2\r\n$3\r\nGET\r\n$10\r\nabc")
    assert transport.value() == b"-NOAUTH Authentication required.\r\n"
    door.clock.advance(4.9)
    assert not transport.disconnecting
    door.clock.advance(0.1)
    assert transport.disconnecting


def test_a_request_begun_before_auth_is_bounded():
    """Past max_client_buffer, as after AUTH; an overlong line, refused as after AUTH."""
    door = Door(password=Secret(PASSWORD), max_client_buffer=1000, max_inline_bytes=5000)
    proto, transport = door.connect()
    proto.dataReceived(b"*2\r\n$3\r\nGET\r\n$10000\r\n" + b"a" * 1000)
    assert transport.disconnecting and transport.value() == b""
    door = Door(password=Secret(PASSWORD))
    proto, transport = door.connect()
    proto.dataReceived(b"PING " * 30_000)
    assert transport.value() == b"-ERR Protocol error: too big inline request\r\n"


# -- the parser ------------------------------------------------------------------------


def test_one_at_a_time_keeps_the_packet_uncopied():
    parser = RequestParser()
    data = encode(b"PING") * 3
    assert parser.feed(data, one=True) == [[b"PING"]]
    assert parser.kept and parser._parts[0].obj is data
    assert parser.rest(True) == [[b"PING"]]
    assert parser._parts[0].obj is data
    assert parser.rest(True) == [[b"PING"]]
    assert parser.idle and not parser.kept
    assert parser.rest(True) == []


def test_tightened_limits_and_their_errors():
    parser = RequestParser(max_args=100, max_bulk_bytes=20000)
    parser.tighten(10, BIG)
    assert [str(x) for x in parser.feed(b"*11\r\n")] == [
        "Protocol error: unauthenticated multibulk length"]
    parser = RequestParser(max_args=5)
    parser.tighten(10, BIG)
    assert [str(x) for x in parser.feed(b"*7\r\n")] == ["Protocol error: invalid multibulk length"]
    parser = RequestParser(max_args=5)
    parser.tighten(10, BIG)
    assert [str(x) for x in parser.feed(b"*11\r\n")] == [
        "Protocol error: unauthenticated multibulk length"]
    parser = RequestParser(max_bulk_bytes=20000)
    parser.tighten(10, BIG)
    assert [str(x) for x in parser.feed(b"*1\r\n$20001\r\n")] == [
        "Protocol error: invalid bulk length"]
    parser = RequestParser()
    parser.tighten(10, BIG)
    parser.relax()
    assert parser.feed(mget(20)) == [[b"MGET", *[b"k"] * 19]]


def test_tightened_fast_paths_take_nothing_past_the_limits():
    parser = RequestParser()
    parser.tighten(10, BIG)
    assert parser.whole(mget(11)) is None
    assert parser.only_gets(encode(b"GET", b"a" * (BIG + 1))) is None
    assert parser.whole(mget(10)) == [[b"MGET", *[b"k"] * 9]]


REQUESTS = st.lists(
    st.one_of(
        st.lists(st.binary(max_size=6), min_size=1, max_size=4).map(lambda a: encode(*a)),
        st.sampled_from([b"PING\r\n", b"GET k\n", b"\r\n", b"*0\r\n", b"*-1\r\n",
                         b"*1\r\n$1\r\nx\r\n", b"*x\r\n", b"*1\r\n$1\r\nxyz"]),
    ),
    max_size=8,
).map(b"".join)


@settings(max_examples=300, deadline=None)
@given(data=REQUESTS, cuts=st.lists(st.integers(0, 200), max_size=6))
def test_one_at_a_time_parses_as_all_at_once(data, cuts):
    """``feed(one=True)`` then ``rest`` until nothing comes: the same
    requests, in the same order, as ``feed`` of the whole, however the
    stream is cut (chunks arriving while bytes are kept are ``keep``-ed)."""
    whole = RequestParser(max_args=100, max_bulk_bytes=1000, max_inline_bytes=100)
    expected = [x if isinstance(x, list) else str(x) for x in whole.feed(data)]
    parser = RequestParser(max_args=100, max_bulk_bytes=1000, max_inline_bytes=100)
    got: list = []
    points = sorted({c for c in cuts if c < len(data)} | {0, len(data)})
    for start, end in zip(points, points[1:]):
        chunk = data[start:end]
        if parser.idle or parser.kept:
            parser.keep(chunk)
            out = parser.rest(True)
        else:
            out = parser.feed(chunk, one=True)
        while out:
            got += out
            out = parser.rest(True)
    assert [x if isinstance(x, list) else str(x) for x in got] == expected


def test_a_long_pipeline_before_auth_is_answered_whole():
    """Thousands of requests in one packet before AUTH: each answered, in
    order, the AUTH at its end lifting the limits for the next packet; the
    packet is resumed where the parser stopped, never copied per request."""
    door = secured_door()
    proto, transport = door.connect()
    proto.dataReceived(b"PING\r\n" * 10_000 + AUTH)
    assert transport.value() == b"-NOAUTH Authentication required.\r\n" * 10_000 + b"+OK\r\n"
    transport.clear()
    proto.dataReceived(mget(20))
    assert transport.value().startswith(b"*19\r\n")


def test_users_without_a_password_have_the_limits_too():
    """Named users and no ``password``: the default user cannot log in, as a
    Redis whose default user is off, where the limits hold before AUTH."""
    from redisp.config import UserConfig

    door = Door(users=(UserConfig("u", Secret("pw"), "all"),))
    proto, transport = door.connect()
    proto.dataReceived(encode(b"AUTH", b"u", b"pw") + mget(20))
    assert transport.value().startswith(b"+OK\r\n*19\r\n")
    proto, transport = door.connect()
    proto.dataReceived(mget(11))
    assert transport.value() == b"-ERR Protocol error: unauthenticated multibulk length\r\n"
