"""Writing a reply to a client socket now, rather than on the next reactor turn.

Twisted's ``transport.write`` only buffers: the bytes leave on the next
reactor turn, after an ``epoll_ctl`` to watch for writability, a ``doWrite``
dispatch, and another ``epoll_ctl`` to stop, for every reply of a client
that waits for it (``redis-benchmark -P 1``, ``wrk``).  A plain TCP
transport with an empty buffer can take the bytes straight away; whatever
the socket does not take (or an error) goes through ``write`` as before, so
ordering, flow control and error handling stay Twisted's.  A TLS transport
cannot be written past, but its write can at least reach the cipher at once
(``unbuffer``).  Figures: bench/NOTES-perf.md, "What changed and why"
(``doors/resp.py _send``) and "TLS on the RESP door".

Twisted has no public way to ask how much a transport still holds, so two of
its private attributes are read here (and in no other module):
``FileDescriptor._tempDataLen`` and ``TLSMemoryBIOProtocol._appSendBuffer``.
setup.cfg bounds Twisted to the versions tested with them, and
tests/test_dependency_internals.py fails by name if either disappears.
"""

from __future__ import annotations

from types import MethodType
from typing import Any

from twisted.internet import tcp
from twisted.internet.interfaces import ITCPTransport

try:
    from twisted.protocols.tls import TLSMemoryBIOProtocol

    #: the transports of TLS connections (``ssl:`` endpoints)
    TLS_TRANSPORTS: tuple[type, ...] = (TLSMemoryBIOProtocol,)
except ImportError:  # no pyOpenSSL: no TLS connections either
    TLS_TRANSPORTS = ()


def can_send_now(transport: Any) -> bool:
    """True for a plain TCP transport (not TLS, which rewrites ``write``)."""
    return (
        ITCPTransport.providedBy(transport)
        and isinstance(transport, tcp.Connection)
        and not getattr(transport, "TLS", False)
    )


def send_now(transport: Any, data: bytes) -> None:
    """``transport.write(data)``, handing the bytes to the socket at once when
    nothing is queued before them; only for a transport ``can_send_now`` accepts.

    The socket's own ``send``, not ``writeSomeData``: that wrapper adds a
    memoryview, a slice of it and an EINTR loop (which Python's ``send``
    already has) to every reply.  A full socket buffer, or an error, leaves
    the bytes to ``write``, whose next ``doWrite`` meets the error as before;
    after a ``loseWriteConnection`` (which redisp never calls) that means
    they are dropped, as they would have been anyway.
    """
    if (
        not transport.dataBuffer
        and not transport._tempDataLen
        and transport.connected
        and not transport.disconnecting
    ):
        try:
            sent = transport.socket.send(data)
        except OSError:  # EAGAIN, or the connection is gone
            sent = 0
        if sent == len(data):
            return
        if sent:
            data = data[sent:]
    transport.write(data)


def unbuffer(transport: Any) -> None:
    """Make the writes of a TLS transport reach the cipher and the socket's
    buffer at once, instead of on the next reactor turn; no-op for others.

    Twisted's ``ssl:`` transport (``BufferingTLSTransport``) collects small
    writes until a ``callLater(0)``, one extra reactor turn per reply for a
    caller that already writes each batch of replies whole, as the RESP door
    does.  The plain ``TLSMemoryBIOProtocol`` methods it overrides are put
    back on this one transport (both ``write`` and ``writeSequence``, so
    nothing can be held back behind a later write).  Figures:
    bench/NOTES-perf.md, "TLS on the RESP door".
    """
    if TLS_TRANSPORTS and isinstance(transport, TLSMemoryBIOProtocol):
        transport.write = MethodType(TLSMemoryBIOProtocol.write, transport)
        transport.writeSequence = MethodType(TLSMemoryBIOProtocol.writeSequence, transport)


def buffered(transport: Any) -> int:
    """Bytes written to ``transport`` and not yet taken by the kernel: what a
    client that does not read its replies costs in Twisted's send buffers
    (part of its ``max_client_buffer``).

    A TCP or UNIX transport keeps them in ``dataBuffer`` (from ``offset``)
    and ``_tempDataLen``; TLS keeps cleartext until its handshake is done
    (``_appSendBuffer``) and passes the rest to the transport under it.
    Others count 0.  TLS's small-write aggregator is not counted: the RESP
    door's TLS transports do not use it (``unbuffer``), and the HTTP door
    writes a response in one call, flushed on the next turn.
    """
    size = 0
    if TLS_TRANSPORTS and isinstance(transport, TLSMemoryBIOProtocol):
        # first: the TLS layer forwards unknown attributes (dataBuffer …)
        # to the transport under it, and would hide its own buffer
        size = sum(map(len, transport._appSendBuffer))
        transport = transport.transport
    data = getattr(transport, "dataBuffer", None)  # FileDescriptor (or a stand-in)
    if data is None:
        return size
    return size + len(data) - transport.offset + transport._tempDataLen
