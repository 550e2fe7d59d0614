"""send_now: straight to the socket when nothing is queued, else Twisted's write."""

import socket

import pytest
from twisted.internet import tcp
from twisted.internet.testing import StringTransport

from redisp.sending import can_send_now, send_now


class FakeSocketTransport:
    """The attributes send_now reads, a socket taking ``takes`` bytes at most."""

    def __init__(self, takes=None, error=None):
        self.dataBuffer = b""
        self._tempDataBuffer = []
        self.connected = True
        self.disconnecting = False
        self._writeDisconnected = False
        self.takes, self.error = takes, error
        self.sent, self.written = [], []

    def writeSomeData(self, data):
        if self.error is not None:
            return self.error
        taken = data if self.takes is None else data[:self.takes]
        self.sent.append(taken)
        return len(taken)

    def write(self, data):
        self.written.append(data)


def test_everything_goes_to_the_socket_when_it_takes_it():
    t = FakeSocketTransport()
    send_now(t, b"reply")
    assert (t.sent, t.written) == ([b"reply"], [])


def test_what_the_socket_does_not_take_is_buffered_in_order():
    t = FakeSocketTransport(takes=2)
    send_now(t, b"reply")
    assert (t.sent, t.written) == ([b"re"], [b"ply"])


def test_a_socket_error_leaves_it_all_to_write():
    t = FakeSocketTransport(error=ConnectionResetError())
    send_now(t, b"reply")
    assert t.written == [b"reply"]


@pytest.mark.parametrize("state", ["queued", "temp-queued", "disconnecting", "closed"])
def test_anything_queued_or_closing_goes_through_write(state):
    t = FakeSocketTransport()
    if state == "queued":
        t.dataBuffer = b"earlier"
    elif state == "temp-queued":
        t._tempDataBuffer = [b"earlier"]
    elif state == "disconnecting":
        t.disconnecting = True
    else:
        t.connected = False
    send_now(t, b"reply")
    assert (t.sent, t.written) == ([], [b"reply"])


def test_only_plain_tcp_transports_may_be_sent_to_directly():
    assert not can_send_now(StringTransport())
    a, b = socket.socketpair()
    try:
        connection = tcp.Connection(a, None)
        assert can_send_now(connection)
        connection.TLS = True
        assert not can_send_now(connection)
    finally:
        a.close()
        b.close()
