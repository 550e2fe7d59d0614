"""send_now: straight to the socket when nothing is queued, else Twisted's write."""

import socket

import pytest
from twisted.internet import tcp
from twisted.internet.testing import MemoryReactorClock, StringTransport

from redisp.sending import buffered, can_send_now, send_now


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


def test_buffered_counts_what_a_socket_transport_has_not_sent():
    """Part of a client's max_client_buffer: both of Twisted's send buffers."""
    a, b = socket.socketpair()
    try:
        connection = tcp.Connection(a, None, reactor=MemoryReactorClock())
        connection.connected = True
        assert buffered(connection) == 0
        connection.dataBuffer, connection.offset = b"half-sent", 5
        connection.write(b"queued")
        assert buffered(connection) == len(b"sent") + len(b"queued")
    finally:
        a.close()
        b.close()


def test_buffered_is_zero_for_transports_it_does_not_know():
    t = StringTransport()
    t.write(b"x")
    assert buffered(t) == 0


def test_buffered_counts_a_tls_connection_through_its_socket():
    pytest.importorskip("OpenSSL")
    from twisted.internet import protocol
    from twisted.protocols.tls import TLSMemoryBIOFactory

    from tests.test_resp_server import _tls_cert

    _, cert = _tls_cert()
    a, b = socket.socketpair()
    try:
        reactor = MemoryReactorClock()
        tls = TLSMemoryBIOFactory(cert.options(), False, protocol.Factory.forProtocol(
            protocol.Protocol), reactor).buildProtocol(None)
        connection = tcp.Connection(a, tls, reactor=reactor)
        connection.connected = True
        tls.makeConnection(connection)
        tls.write(b"before the handshake: kept as cleartext")
        tls._aggregator.flush()
        assert buffered(tls) == len(b"before the handshake: kept as cleartext")
    finally:
        a.close()
        b.close()
