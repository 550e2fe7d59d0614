"""BinaryRedisProtocol: txredisapi's protocol with its bytes-only hot spots replaced."""

import pytest
import txredisapi
from twisted.internet import defer
from twisted.internet.error import ConnectionDone
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure

from redisp.backing.connection import BinaryRedisProtocol


def stock():
    return txredisapi.RedisProtocol(charset=None, convertNumbers=False)


@pytest.mark.parametrize("args", [
    (b"GET", b"k"),
    (b"MGET", b"a", b"", b"\r\n\x00\xff", b"x" * 70000),
    (b"PING",),
])
def test_commands_of_bytes_are_encoded_exactly_as_txredisapi_does(args):
    assert BinaryRedisProtocol()._build_command(*args) == stock()._build_command(*args)


def test_other_arguments_still_go_txredisapi_s_way():
    args = ("SELECT", 3, b"raw", 1.5)
    assert BinaryRedisProtocol()._build_command(*args) == stock()._build_command(*args)


def test_replies_come_back_unchanged_and_errors_still_fail():
    protocol = BinaryRedisProtocol()
    transport = StringTransport()
    protocol.makeConnection(transport)
    got = []
    protocol.execute_command(b"MGET", b"a", b"b", b"c").addBoth(got.append)
    protocol.execute_command(b"GET", b"list").addBoth(got.append)
    protocol.execute_command(b"GET", b"n").addBoth(got.append)
    assert transport.value().startswith(b"*4\r\n$4\r\nMGET\r\n$1\r\na\r\n")
    protocol.dataReceived(b"*3\r\n$3\r\n007\r\n$-1\r\n$0\r\n\r\n"
                          b"-WRONGTYPE Operation against a key\r\n"
                          b"$2\r\n12\r\n")
    assert got[0] == [b"007", None, b""]
    assert got[1].check(txredisapi.ResponseError)
    assert "WRONGTYPE" in str(got[1].value)
    assert got[2] == b"12", "numbers stay bytes"


@pytest.mark.parametrize("make", [stock, BinaryRedisProtocol], ids=["txredisapi", "ours"])
def test_a_cancelled_call_swallows_its_late_reply_and_later_replies_keep_their_order(make):
    """What a timeout does (``addTimeout`` cancels the Deferred): txredisapi's
    ReplyQueue keeps a placeholder in the cancelled call's slot, so its reply,
    when it comes, goes nowhere and the next call gets its own."""
    protocol = make()
    protocol.makeConnection(StringTransport())
    first = protocol.execute_command(b"GET", b"a")
    second = protocol.execute_command(b"GET", b"b")
    got = []
    first.addBoth(got.append)
    second.addBoth(got.append)
    first.cancel()
    assert len(got) == 1 and got[0].check(defer.CancelledError)
    protocol.dataReceived(b"$1\r\n1\r\n")
    assert len(got) == 1, "the late reply is not handed to anyone"
    protocol.dataReceived(b"$1\r\n2\r\n")
    assert got[1] == b"2"
    third = protocol.execute_command(b"GET", b"c")
    protocol.dataReceived(b"$1\r\n3\r\n")
    assert third.result == b"3"


def test_a_late_error_reply_to_a_cancelled_call_is_swallowed_too():
    protocol = BinaryRedisProtocol()
    protocol.makeConnection(StringTransport())
    first = protocol.execute_command(b"GET", b"list")
    first.addErrback(lambda _: None)
    first.cancel()
    protocol.dataReceived(b"-WRONGTYPE Operation against a key\r\n")
    second = protocol.execute_command(b"GET", b"b")
    protocol.dataReceived(b"$1\r\n2\r\n")
    assert second.result == b"2"


def test_calls_in_flight_fail_with_the_connection():
    protocol = BinaryRedisProtocol()
    protocol.makeConnection(StringTransport())
    d = protocol.execute_command(b"GET", b"a")
    got = []
    d.addBoth(got.append)
    protocol.connectionLost(Failure(ConnectionDone()))
    assert got[0].check(txredisapi.ConnectionError)
    with pytest.raises(txredisapi.ConnectionError):
        protocol.execute_command(b"GET", b"a")
