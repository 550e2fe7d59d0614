"""The private internals of Twisted and txredisapi that redisp relies on.

Each is used because neither library offers a public way to do the same;
setup.cfg bounds both to the versions tested with them.  These tests check
each internal on the real library, so an upgrade that changes one fails
here, naming it and the redisp code that needs it, rather than somewhere
downstream (a client buffer never counted, a 400 instead of a 431, an
"Unhandled NoTransition" in the log).  setup.cfg's comments name the same
internals.
"""

import socket

import pytest
import txredisapi
from twisted.internet import defer, tcp
from twisted.internet.error import ConnectionDone
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.python.failure import Failure
from twisted.web.http import HTTPChannel

from redisp.protocol.sending import unbuffer


def _needed(what: str, user: str) -> str:
    return f"{what} is gone or changed: {user} needs it (see setup.cfg's bounds)"


# -- twisted.internet: the epoll reactor's loop (event_loop.py) --------------------------------

def test_epoll_reactor_keeps_its_poller_selectables_and_dispatch():
    epollreactor = pytest.importorskip("twisted.internet.epollreactor")
    reactor = epollreactor.EPollReactor()
    try:
        for name in ("_poller", "_selectables", "_doReadOrWrite"):
            assert hasattr(reactor, name), _needed(f"EPollReactor.{name}", "event_loop._do_poll")
        assert isinstance(reactor._selectables, dict), _needed(
            "EPollReactor._selectables (fd -> selectable)", "event_loop._do_poll")
    finally:
        reactor.removeAll()
        reactor.removeReader(reactor.waker)
        reactor.waker.connectionLost(None)
        reactor._poller.close()


# -- twisted.internet: what a socket transport still holds (protocol/sending.py) -------------------

def test_file_descriptor_tempDataLen_counts_bytes_written_this_turn():
    a, b = socket.socketpair()
    try:
        connection = tcp.Connection(a, None, reactor=MemoryReactorClock())
        connection.connected = True
        connection.write(b"queued")
        assert getattr(connection, "_tempDataLen", None) == len(b"queued"), _needed(
            "FileDescriptor._tempDataLen", "sending.send_now and sending.buffered")
        assert (connection.dataBuffer, connection.offset) == (b"", 0)  # undocumented too
    finally:
        a.close()
        b.close()


def test_tls_appSendBuffer_holds_cleartext_until_the_handshake():
    pytest.importorskip("OpenSSL")
    from twisted.internet import protocol
    from twisted.protocols.tls import TLSMemoryBIOFactory

    from tests.test_resp_server import _tls_cert

    _, cert = _tls_cert()
    tls = TLSMemoryBIOFactory(cert.options(), False, protocol.Factory.forProtocol(
        protocol.Protocol), MemoryReactorClock()).buildProtocol(None)
    tls.makeConnection(StringTransport())
    unbuffer(tls)  # as the RESP door does: no small-write aggregator in between
    tls.writeSequence([b"before ", b"the handshake"])
    assert b"".join(getattr(tls, "_appSendBuffer", [])) == b"before the handshake", _needed(
        "TLSMemoryBIOProtocol._appSendBuffer", "sending.buffered (max_client_buffer)")


# -- twisted.internet.endpoints (service.py, backing/tls.py) ---------------------------------------

def test_endpoints_parse_tokenizes_an_endpoint_string():
    from twisted.internet import endpoints

    parse = getattr(endpoints, "_parse", None)
    assert parse is not None, _needed("twisted.internet.endpoints._parse",
                                      "service.with_backlog")
    assert parse(r"ssl:6380:certKey=a\:b.pem:backlog=7") == (
        ["ssl", "6380"], {"certKey": "a:b.pem", "backlog": "7"})


def test_ssl_server_endpoint_keeps_its_sslContextFactory(tmp_path):
    pytest.importorskip("OpenSSL")
    from twisted.internet.endpoints import serverFromString
    from twisted.internet.ssl import CertificateOptions

    from tests.tls_support import make_tls_files

    files = make_tls_files(tmp_path)
    endpoint = serverFromString(
        MemoryReactorClock(), f"ssl:0:certKey={files.server_cert}:privateKey={files.server_key}")
    assert isinstance(getattr(endpoint, "_sslContextFactory", None), CertificateOptions), \
        _needed("SSL4ServerEndpoint._sslContextFactory", "tls.require_client_certificates")


# -- twisted.application: ClientService's protocol proxy (backing/connection.py) -------------------

class _OneConnection:
    """An endpoint whose every connection is a StringTransport."""

    def connect(self, factory):
        protocol = factory.buildProtocol(None)
        protocol.makeConnection(StringTransport())
        return defer.succeed(protocol)


def test_client_service_proxy_has_a_lostNotification_to_silence():
    from twisted.application.internet import ClientService
    from twisted.internet.protocol import Factory, Protocol

    proxies = []
    service = ClientService(_OneConnection(), Factory.forProtocol(Protocol),
                            clock=MemoryReactorClock(), prepareConnection=proxies.append)
    service.startService()
    assert proxies, "prepareConnection was not called"
    proxy = proxies[0]
    assert "_lostNotification" in vars(proxy), _needed(
        "ClientService's _ReconnectingProtocolProxy._lostNotification", "backing._drop")
    heard = []
    proxy._lostNotification = heard.append
    proxy.connectionLost(Failure(ConnectionDone()))
    assert len(heard) == 1, "the proxy no longer tells ClientService through _lostNotification"
    service.stopService()


# -- twisted.web: HTTPChannel's parser state (doors/http.py) ---------------------------------

@pytest.mark.parametrize("name", [
    "_buffer",  # LineReceiver's: bytes received and not yet parsed
    "_dataBuffer",  # received while a request is being answered
    "_handlingRequest",
    "_networkProducer",
    "_waitingForTransport",
    "_receivedHeaderCount",
    "_receivedHeaderSize",
    "_HTTPChannel__first_line",
    "_respondToBadRequestAndDisconnect",
])
def test_http_channel_internal(name):
    channel = HTTPChannel()
    channel.makeConnection(StringTransport())
    assert hasattr(channel, name), _needed(f"HTTPChannel.{name}", "http_channel._Channel")


def test_http_channel_counts_headers_before_refusing_them():
    """http_channel._Channel tells 431 from 400 by these counters, read in the
    ``_respondToBadRequestAndDisconnect`` Twisted calls for a refused head."""
    refused = []

    class Channel(HTTPChannel):
        maxHeaders = 2

        def _respondToBadRequestAndDisconnect(self):
            refused.append((self._receivedHeaderCount, self._HTTPChannel__first_line))

    channel = Channel()
    channel.makeConnection(StringTransport())
    channel.dataReceived(b"GET / HTTP/1.1\r\nA: 1\r\nB: 2\r\nC: 3\r\nD: 4\r\n")  # C is read at D
    assert refused == [(3, 0)], _needed("HTTPChannel's header counters",
                                        "http_channel._Channel._respondToBadRequestAndDisconnect")


# -- txredisapi (backing/connection.py) ------------------------------------------------------------

def test_txredisapi_build_command_encodes_a_command():
    protocol = txredisapi.RedisProtocol(charset=None, convertNumbers=False)
    assert hasattr(protocol, "_build_command"), _needed(
        "txredisapi.RedisProtocol._build_command", "backing.BinaryRedisProtocol")
    assert protocol._build_command(b"GET", b"k") == b"*2\r\n$3\r\nGET\r\n$1\r\nk\r\n"


def test_txredisapi_reply_queue_keeps_a_cancelled_slot():
    """backing.BinaryRedisProtocol.execute_command returns the queue's slot
    itself: a cancelled (timed-out) call must still take its late reply
    (ReplyQueue._cancelGet), or replies would go to the wrong callers."""
    protocol = txredisapi.RedisProtocol(charset=None, convertNumbers=False)
    queue = protocol.replyQueue
    first, second = queue.get(), queue.get()
    first.addErrback(lambda f: f.trap(defer.CancelledError))
    first.cancel()
    assert len(queue.waiting) == 2, _needed("txredisapi.ReplyQueue._cancelGet's placeholder",
                                            "backing.BinaryRedisProtocol.execute_command")
    queue.put(b"late reply to the first")
    queue.put(b"reply to the second")
    got = []
    second.addCallback(got.append)
    assert got == [b"reply to the second"]


@pytest.mark.parametrize("name", ["replyQueue", "handle_reply", "tryConvertData"])
def test_txredisapi_protocol_member(name):
    """Public by name, undocumented: backing/connection.py overrides or calls them."""
    protocol = txredisapi.RedisProtocol(charset=None, convertNumbers=False)
    assert hasattr(protocol, name), _needed(f"txredisapi.RedisProtocol.{name}",
                                            "backing/connection.py")
