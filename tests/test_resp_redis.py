"""Bad input answered as Redis 7 answers it (SPEC §3, issue 8 item 16).

The same bytes go to a real redis-server and to redisp's RESP door (in front
of that server): PING and ECHO requests, multibulk and inline, pipelined,
with random mutations.  The reply bytes and whether the connection was
closed must be the same.

Each exchange must end without waiting on a timer: after the input comes a
tail that ends whatever the input left unfinished -- ``\\r\\n``, then (only
when redisp's own parser says the input still waits for more) two blank
lines of 60 000 spaces, which complete a pending bulk and push a line held
open by a NUL past the 64 KiB limit -- and a marker ``ECHO``.  The
exchange is over when the marker's reply arrives or the server hangs up; a
server that does neither within ``DEADLINE`` fails the test.
"""

from __future__ import annotations

import os
import socket

import pytest_twisted
from hypothesis import HealthCheck, assume, example, given, settings
from hypothesis import strategies as st
from twisted.internet import threads

from redisp.protocol.codec import ProtocolError, RequestParser
from tests.support import until

DEADLINE = 10.0  # seconds one exchange may take before the test fails
#: examples per run; more by hand: RESP_REDIS_EXAMPLES=3000 pytest tests/test_resp_redis.py
EXAMPLES = int(os.environ.get("RESP_REDIS_EXAMPLES", "200"))
PAD = (b" " * 60000 + b"\r\n") * 2


def closing_tail(data: bytes, commands: set[bytes]) -> tuple[bytes, bytes]:
    """(the tail to send after ``data``, the reply that ends the exchange).

    Rejects (``assume``) the rare input the tail cannot end (a bulk
    announced as 9 999 999 bytes) and any that would run a Redis command
    other than PING and ECHO: the comparison is about reading requests,
    and mutations must not write to the server.
    """
    marker = os.urandom(8).hex().encode()
    request = b"*2\r\n$4\r\nECHO\r\n$16\r\n" + marker + b"\r\n"
    for tail in (b"\r\n" + request, b"\r\n" + PAD + request):
        parser = RequestParser()
        out = parser.feed(data + tail)
        if any(isinstance(r, ProtocolError) for r in out) or (
            out and out[-1] == [b"ECHO", marker] and parser.idle
        ):
            assume(not any(isinstance(r, list) and r[0].lower() in commands for r in out))
            return tail, b"$16\r\n" + marker + b"\r\n"
    assume(False)
    raise AssertionError("unreachable")


def exchange(port: int, data: bytes, tail: bytes, marker_reply: bytes) -> tuple[bytes, bool]:
    """Send ``data`` and its tail; (replies to ``data``, hung up?)."""
    with socket.create_connection(("127.0.0.1", port), timeout=DEADLINE) as s:
        try:
            s.sendall(data + tail)
        except (BrokenPipeError, ConnectionResetError):
            pass  # hung up early; what it said before is still to be read
        got = b""
        while not got.endswith(marker_reply):
            try:
                chunk = s.recv(65536)
            except ConnectionResetError:
                chunk = b""
            if not chunk:
                return got, True
            got += chunk
        return got[:-len(marker_reply)], False


def multibulk(*args: bytes) -> bytes:
    return b"*%d\r\n" % len(args) + b"".join(b"$%d\r\n%b\r\n" % (len(a), a) for a in args)


args = st.sampled_from([b"hello", b"", b"a b", b"\r\n", b"\0", b"'", b'"', b"x" * 30])
names = st.sampled_from([b"PING", b"ping", b"ECHO", b"echo", b"EcHo"])
requests = st.one_of(
    st.builds(lambda n, a: multibulk(n, *a), names, st.lists(args, max_size=2)),
    st.builds(lambda n, a: b" ".join([n, *a]) + b"\r\n", names,
              st.lists(st.sampled_from([b"hi", b'"a b"', b"'x y'", b'"\\x41\\n"', b"\t"]),
                       max_size=2)),
    st.sampled_from([b"*0\r\n", b"*-1\r\n", b"\r\n", b"\n", b"PING\n"]),
)
vocabulary = list(b"*$\r\n\0 \t\"'\\0123456789-PINGECHOab\x01\x80\xff")
fragments = st.lists(st.sampled_from(vocabulary), min_size=1, max_size=6).map(bytes)


@st.composite
def inputs(draw) -> bytes:
    """Pipelined PING/ECHO requests with up to three mutations."""
    data = bytearray(b"".join(draw(st.lists(requests, min_size=1, max_size=5))))
    for _ in range(draw(st.integers(0, 3))):
        at = draw(st.integers(0, len(data)))
        kind = draw(st.sampled_from(["insert", "delete", "replace", "truncate"]))
        if kind == "insert":
            data[at:at] = draw(fragments)
        elif kind == "delete":
            del data[at:at + draw(st.integers(1, 3))]
        elif kind == "replace" and at < len(data):
            data[at] = draw(st.sampled_from(vocabulary))
        elif kind == "truncate":
            del data[at:]
    return bytes(data)


def compare(redis_port: int, redisp_port: int, commands: set[bytes]) -> None:
    @settings(max_examples=EXAMPLES, deadline=None, database=None,
              suppress_health_check=[HealthCheck.filter_too_much, HealthCheck.too_slow])
    @given(inputs())
    @example(b"*2\r\n$4\r\nECHO\r\n$1\r\nab\r\nPING\r\n")  # issue 8, item 16
    @example(b"*1\rX$4\r\nPING\r\n")
    @example(b"*1\r\n\xffx\r\n")
    @example(b"PING\0junk\r\nPING\r\n")
    @example(b"*1\r\n$4\0\r\nPING\r\n")
    @example(b'ECHO "a\r\n')
    @example(b"PING a b\r\n")
    def same_answer(data: bytes) -> None:
        tail, marker_reply = closing_tail(data, commands)
        assert (exchange(redisp_port, data, tail, marker_reply)
                == exchange(redis_port, data, tail, marker_reply))

    same_answer()


@pytest_twisted.inlineCallbacks
def test_any_ping_echo_stream_is_answered_as_redis_does(redis_server, start_proxy):
    client = redis_server.client()
    commands = {name.lower() for name in client.command_list()}
    client.close()
    commands -= {b"ping", b"echo"}
    p = start_proxy()
    yield until(lambda: p.proxy.backing.up)
    yield threads.deferToThread(compare, redis_server.port, p.resp_port, commands)
