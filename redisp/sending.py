"""Writing a reply to a client socket now, rather than on the next reactor turn.

Twisted's ``transport.write`` only buffers: the bytes leave on the next
reactor turn, after an ``epoll_ctl`` to watch for writability, a ``doWrite``
dispatch, and another ``epoll_ctl`` to stop, for every reply of a client
that waits for it (``redis-benchmark -P 1``, ``wrk``).  A plain TCP
transport with an empty buffer can take the bytes straight away; whatever
the socket does not take (or an error) goes through ``write`` as before, so
ordering, flow control and error handling stay Twisted's.  Measured: RESP
GET hot -P 1 -c 50 ~27k/s buffered, ~31k/s sent at once; the HTTP door's
figures are in bench/NOTES-perf.md.
"""

from __future__ import annotations

from typing import Any

from twisted.internet import abstract, tcp
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
    nothing is queued before them; only for a transport ``can_send_now`` accepts."""
    if (
        not transport.dataBuffer
        and not transport._tempDataBuffer
        and transport.connected
        and not transport.disconnecting
        and not transport._writeDisconnected
    ):
        sent = transport.writeSomeData(data)
        if sent.__class__ is int:
            if sent == len(data):
                return
            data = data[sent:]
    transport.write(data)


def buffered(transport: Any) -> int:
    """Bytes written to ``transport`` and not yet taken by the kernel: what a
    client that does not read its replies costs in Twisted's send buffers
    (part of its ``max_client_buffer``).  0 for a transport of unknown kind."""
    if isinstance(transport, abstract.FileDescriptor):
        return len(transport.dataBuffer) - transport.offset + transport._tempDataLen
    if isinstance(transport, TLS_TRANSPORTS):
        # cleartext waiting for the handshake or in the small-write
        # aggregator, then the ciphertext in the socket's own buffer
        size = sum(map(len, transport._appSendBuffer))
        size += sum(map(len, getattr(getattr(transport, "_aggregator", None), "_buffer", ())))
        return size + buffered(transport.transport)
    return 0
