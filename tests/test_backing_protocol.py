"""BinaryRedisProtocol: txredisapi's protocol with its bytes-only hot spots replaced."""

import pytest
import txredisapi
from twisted.internet.testing import StringTransport

from redisp.backing import BinaryRedisProtocol


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
