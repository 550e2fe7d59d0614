"""send_now: straight to the socket when nothing is queued, else Twisted's write."""

import socket

import pytest
from twisted.internet import tcp
from twisted.internet.testing import MemoryReactorClock, StringTransport

from redisp.protocol.sending import buffered, can_send_now, send_now, unbuffer


class FakeSocketTransport:
    """The attributes send_now reads, its ``socket`` (itself) taking
    ``takes`` bytes at most, or raising ``error``."""

    def __init__(self, takes=None, error=None):
        self.dataBuffer = b""
        self._tempDataLen = 0
        self.connected = True
        self.disconnecting = False
        self.socket = self
        self.takes, self.error = takes, error
        self.sent, self.written = [], []

    def send(self, data):
        if self.error is not None:
            raise self.error
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


@pytest.mark.parametrize("error", [ConnectionResetError(), BlockingIOError()])
def test_a_socket_error_leaves_it_all_to_write(error):
    t = FakeSocketTransport(error=error)
    send_now(t, b"reply")
    assert t.written == [b"reply"]


def test_a_socket_that_takes_nothing_leaves_it_all_to_write():
    t = FakeSocketTransport(takes=0)
    send_now(t, b"reply")
    assert t.written == [b"reply"]


@pytest.mark.parametrize("state", ["queued", "temp-queued", "disconnecting", "closed"])
def test_anything_queued_or_closing_goes_through_write(state):
    t = FakeSocketTransport()
    if state == "queued":
        t.dataBuffer = b"earlier"
    elif state == "temp-queued":
        t._tempDataLen = len(b"earlier")
    elif state == "disconnecting":
        t.disconnecting = True
    else:
        t.connected = False
    send_now(t, b"reply")
    assert (t.sent, t.written) == ([], [b"reply"])


def test_after_the_write_side_is_shut_nothing_is_sent_and_nothing_raises():
    """loseWriteConnection (which redisp never calls): the socket refuses the
    bytes with an error and Twisted's write drops them, as it would have."""
    a, b = socket.socketpair()
    try:
        connection = tcp.Connection(a, None, reactor=MemoryReactorClock())
        connection.connected = True
        connection.loseWriteConnection()
        connection.doWrite()  # nothing buffered: shuts the write side now
        send_now(connection, b"reply")
        b.setblocking(False)
        assert b.recv(100) == b""  # end of stream, and no reply before it
        assert buffered(connection) == 0
    finally:
        a.close()
        b.close()


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
        unbuffer(tls)
        tls.write(b"before the handshake: kept as cleartext")
        assert buffered(tls) == len(b"before the handshake: kept as cleartext")
    finally:
        a.close()
        b.close()


def _tls_transport(reactor):
    """A server-side TLS transport over one end of a socket pair, as an
    ``ssl:`` listener builds it; returns it and the other end."""
    from twisted.internet import protocol
    from twisted.protocols.tls import TLSMemoryBIOFactory

    from tests.test_resp_server import _tls_cert

    _, cert = _tls_cert()
    a, b = socket.socketpair()
    tls = TLSMemoryBIOFactory(cert.options(), False, protocol.Factory.forProtocol(
        protocol.Protocol), reactor).buildProtocol(None)
    connection = tcp.Connection(a, tls, reactor=reactor)
    connection.connected = True
    tls.makeConnection(connection)
    return tls, a, b


def test_an_unbuffered_tls_transport_takes_writes_on_the_same_turn():
    """Twisted's TLS transport holds small writes until the next reactor turn
    (a callLater(0)); unbuffered, a write reaches the TLS layer at once, and
    writes and writeSequence keep their order."""
    pytest.importorskip("OpenSSL")
    reactor = MemoryReactorClock()
    tls, a, b = _tls_transport(reactor)
    try:
        tls.write(b"x")
        assert reactor.getDelayedCalls(), "Twisted's TLS transport buffers small writes"
        assert buffered(tls) == 0, "and that buffer is not counted"
        reactor.advance(0)
        unbuffer(tls)
        tls.write(b"one")
        tls.writeSequence([b"two", b"three"])
        tls.write(b"four")
        assert not reactor.getDelayedCalls()
        assert buffered(tls) == len(b"xonetwothreefour")  # in order, before the handshake
    finally:
        a.close()
        b.close()


def test_unbuffer_leaves_other_transports_alone():
    t = StringTransport()
    write = t.write
    unbuffer(t)
    assert t.write == write


def test_the_resp_door_answers_over_tls_without_waiting_for_the_next_turn():
    """The RESP door unbuffers its TLS transports: a reply is encrypted and
    handed to the socket's transport in the turn that produced it (Twisted's
    default waits for a callLater(0))."""
    pytest.importorskip("OpenSSL")
    from twisted.internet import protocol
    from twisted.protocols.tls import TLSMemoryBIOFactory
    from twisted.test import iosim

    from tests.test_resp_server import PEER, Door, _Client, _tls_cert

    ssl, cert = _tls_cert()
    door = Door()
    server = TLSMemoryBIOFactory(cert.options(), False, door.factory, door.clock)
    client = TLSMemoryBIOFactory(ssl.optionsForClientTLS("localhost", trustRoot=cert), True,
                                 protocol.Factory.forProtocol(_Client), door.clock)
    client_side, _, pump = iosim.connectedServerAndClient(
        lambda: server.buildProtocol(PEER), lambda: client.buildProtocol(PEER),
        clock=door.clock)
    pump.flush()  # the handshake
    unbuffer(client_side)  # the client's own TLS transport would wait for a turn too
    client_side.write(b"PING\r\n")
    for _ in range(4):  # the request there, the reply back: no clock advance
        pump.pump(advanceClock=False)
    assert client_side.wrappedProtocol.data == b"+PONG\r\n"
