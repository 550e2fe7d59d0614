"""AUTH, NOAUTH, NOPERM and protected mode against a real redis-server, byte
for byte (SPEC §8: "as Redis").

The reference is a redis-server started with ``--requirepass`` and an ACL
user ``u`` limited to reads; redisp is configured alike (``password`` and a
``commands: read`` user ``u``) in front of the session's redis-server.  The
same requests go to both over raw sockets, and the reply frames must be the
same bytes (HELLO's map only differs in ``version`` and ``id``).  The
texts are those of Redis 7.0, the version the RESP door follows: against
another redis-server these tests are skipped.

The ACL of ``u`` in the reference (+@read +@connection, no @admin or
@dangerous) agrees with redisp's ``commands: read`` on every request sent
here; redisp's rule (what it answers itself, plus what the backing flags
readonly) is in README.
"""

from __future__ import annotations

import socket

import pytest
import pytest_twisted
from twisted.internet import threads

from redisp.config import Secret, UserConfig
from redisp.protocol.frames import FrameScanner, decode
from tests.raw_redis import encode
from tests.support import redis_7_0_with_password, until

inline = pytest_twisted.inlineCallbacks
LIMIT = 20.0
PASSWORD = "sekret"
READ_ACL = ["on", ">pw", "~*", "&*", "+@read", "+@connection", "-@admin", "-@dangerous"]


@pytest.fixture(scope="module")
def reference():
    """A redis-server with requirepass and the read-only user ``u``."""
    with redis_7_0_with_password(PASSWORD) as (server, client):
        client.acl_setuser("u", reset=True, enabled=True, passwords=["+pw"], keys=["*"],
                           channels=["*"], categories=["+@read", "+@connection", "-@admin",
                                                       "-@dangerous"])
        client.set("k", "value")
        yield server


def talk(port: int, steps: list, bind: str | None = None) -> list:
    """Send each step (an argv tuple, or raw bytes with the number of
    replies it gets) on one connection; each step's reply frames, and
    "closed" once the server has hung up."""
    scanner = FrameScanner()
    out: list = []
    with socket.create_connection(("127.0.0.1", port), timeout=LIMIT,
                                  source_address=(bind, 0) if bind else None) as sock:
        for step in steps:
            if isinstance(step, tuple) and isinstance(step[0], bytes) and len(step) == 2 \
                    and isinstance(step[1], int):
                data, wanted = step
            else:
                data, wanted = encode(*step), 1
            frames: list = []
            try:
                sock.sendall(data)
                while len(frames) < wanted:
                    chunk = sock.recv(65536)
                    if not chunk:
                        break
                    frames += scanner.feed(chunk)
            except OSError:  # reset: the server had closed (which one wins is a race)
                pass
            if len(frames) < wanted:
                out.append([*frames, "closed"])
                break
            out.append(frames)
    return out


def masked(frames: list) -> list:
    """HELLO's server map without the two fields that differ by design."""
    result = []
    for frame in frames:
        if isinstance(frame, bytes) and frame[:1] in (b"%", b"*") and b"version" in frame:
            value = decode(frame)
            if isinstance(value, list):
                value = dict(zip(value[::2], value[1::2]))
            value.pop(b"version", None)
            value.pop(b"id", None)
            result.append(value)
        else:
            result.append(frame)
    return result


@pytest.fixture
def proxied(redis_db, start_proxy):
    """redisp with the reference's password and user, its cache holding ``k``."""
    @inline
    def start(**settings):
        redis_db.set("k", "value")
        p = start_proxy(**settings)
        yield until(lambda: p.proxy.backing.up)
        if p.proxy.forwarder is not None:
            yield until(lambda: p.proxy.forwarder.table is not None)
        warm = [(b"AUTH", PASSWORD.encode())] if settings.get("password") else []
        yield threads.deferToThread(talk, p.resp_port, [*warm, (b"GET", b"k")])
        assert p.proxy.cache.get(b"k") == b"value"
        return p
    return start


SECURED = {"password": Secret(PASSWORD), "users": (UserConfig("u", Secret("pw"), "read"),)}

CASES = {
    "before-auth": [
        (b"GET", b"k"), (encode(b"GET", b"k") * 3, 3), (b"MGET", b"k"), (b"PING",),
        (b"SET", b"k", b"v"), (b"FOO", b"x"), (b"GET",), (b"CLIENT", b"FOO"),
        (b"CLIENT", b"SETNAME", b"n"), (b"EXEC",), (b"EXEC", b"x"), (b"SUBSCRIBE", b"c"),
        (b"CONFIG",), (b"HELLO", b"3"), (b"HELLO", b"3", b"AUTH", b"default", b"wrong"),
        (b"AUTH", b"wrong"), (b"AUTH", b"default", b"wrong"), (b"AUTH", b"a", b"b", b"c"),
        (b"AUTH", b"u", b"wrong"), (b"AUTH",), (b"GET k\r\n", 1), (b"RESET",), (b"QUIT",),
        (b"PING",),
    ],
    "password": [
        (b"AUTH", b"sekret"), (b"GET", b"k"), (encode(b"GET", b"k") * 2, 2),
        (b"SET", b"k2", b"v"), (b"AUTH", b"u", b"wrong"), (b"GET", b"k"), (b"DEL", b"k2"),
        (b"RESET",), (b"GET", b"k"), (b"AUTH", b"default", b"sekret"), (b"GET", b"k"),
    ],
    "read-user": [
        (b"AUTH", b"u", b"pw"), (b"GET", b"k"), (encode(b"GET", b"k") * 2, 2),
        (b"MGET", b"k", b"k"), (b"SET", b"k", b"v"), (b"CLIENT", b"KILL", b"ID", b"99999"),
        (b"CONFIG", b"GET", b"x"), (b"OBJECT", b"ENCODING", b"k"), (b"STRLEN", b"k"),
        (b"SET", b"k"), (b"EXEC",), (b"MULTI",), (b"PING",), (b"ECHO", b"x"),
        (b"CLIENT", b"GETNAME"), (b"DEL", b"k"), (b"FLUSHALL",), (b"GET", b"k"),
    ],
    "pipelined": [
        (encode(b"GET", b"k") * 2 + encode(b"AUTH", b"sekret") + encode(b"GET", b"k"), 4),
    ],
    "inline": [(b"GET k\r\n", 1), (b"AUTH sekret\r\n", 1), (b"GET k\r\n", 1)],
    "hello": [
        (b"HELLO", b"3", b"AUTH", b"u", b"pw", b"SETNAME", b"n"), (b"CLIENT", b"GETNAME"),
        (b"GET", b"k"), (b"SET", b"k", b"v"),
    ],
}


@pytest.mark.parametrize("case", list(CASES))
@inline
def test_the_same_bytes_as_redis_with_requirepass_and_an_acl_user(reference, proxied, case):
    p = yield proxied(**SECURED)
    steps = CASES[case]
    expected = talk(reference.port, steps)
    got = yield threads.deferToThread(talk, p.resp_port, steps)
    for step, want, have in zip(steps, expected, got):
        assert masked(have) == masked(want), step
    assert len(got) == len(expected)
    assert p.proxy.cache.get(b"k") in (b"value", None)  # never written by a refused SET


@inline
def test_failures_are_counted_in_info_and_metrics(reference, proxied):
    p = yield proxied(**SECURED)
    yield threads.deferToThread(talk, p.resp_port, [(b"AUTH", b"x"), (b"AUTH", b"u", b"y")])
    out = yield threads.deferToThread(
        talk, p.resp_port, [(b"AUTH", b"sekret"), (b"INFO", b"proxy")])
    info = out[1][0]
    assert b"auth_failures:2\r\n" in info
    assert b"redisp_auth_failures_total 2.0" in p.proxy.metrics.exposition()


WITHOUT_PASSWORDS = [
    (b"AUTH", b"x"), (b"AUTH", b"default", b"x"), (b"AUTH", b"u", b"x"),
    (b"HELLO", b"2", b"AUTH", b"u", b"x"), (b"HELLO", b"3", b"AUTH", b"default", b"x"),
    (b"GET", b"k"),
]


@inline
def test_auth_without_passwords_is_answered_as_redis_without_requirepass(redis_server,
                                                                         proxied):
    p = yield proxied()
    expected = talk(redis_server.port, WITHOUT_PASSWORDS)
    got = yield threads.deferToThread(talk, p.resp_port, WITHOUT_PASSWORDS)
    assert [masked(x) for x in got] == [masked(x) for x in expected]


def read_to_the_end(port: int, bind: str) -> bytes:
    """Connect from ``bind``, send nothing, read until the server hangs up."""
    data = b""
    with socket.create_connection(("127.0.0.1", port), timeout=LIMIT,
                                  source_address=(bind, 0)) as sock:
        while chunk := sock.recv(65536):
            data += chunk
    return data


@inline
def test_protected_mode_denies_another_loopback_address_as_redis(redis_server, proxied):
    """127.0.0.2 is not local to Redis (``connIsLocal``): the same -DENIED
    text from both, then both hang up."""
    p = yield proxied()
    expected = read_to_the_end(redis_server.port, "127.0.0.2")
    got = yield threads.deferToThread(read_to_the_end, p.resp_port, "127.0.0.2")
    assert expected.startswith(b"-DENIED Redis is running in protected mode")
    assert got == expected
    local = yield threads.deferToThread(talk, p.resp_port, [(b"PING",)])
    assert local == [[b"+PONG\r\n"]]


@inline
def test_redis_py_and_redis_cli_authenticate(reference, proxied):
    """Clients that send AUTH (protocol 2) or HELLO 3 AUTH at connect."""
    import redis

    p = yield proxied(**SECURED)

    def clients():
        answers = []
        for protocol in (2, 3):
            client = redis.Redis(port=p.resp_port, password=PASSWORD, protocol=protocol)
            answers.append(client.get("k"))
            client.close()
            reader = redis.Redis(port=p.resp_port, username="u", password="pw",
                                 protocol=protocol)
            answers.append(reader.get("k"))
            try:
                reader.set("k", "other")
            except redis.exceptions.NoPermissionError as e:
                answers.append(str(e))
            reader.close()
        try:
            redis.Redis(port=p.resp_port, password="wrong").ping()
        except redis.exceptions.AuthenticationError as e:
            answers.append(type(e).__name__)
        return answers

    answers = yield threads.deferToThread(clients)
    noperm = "this user has no permissions to run the 'set' command"
    assert answers == [b"value", b"value", noperm, b"value", b"value", noperm,
                       "AuthenticationError"]
