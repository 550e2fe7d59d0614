"""A raw RESP client on the reactor for end-to-end tests: requests out,
every frame back as bytes in the order it came (replies and pushes alike),
so a test sees exactly what a client of redisp would."""

from __future__ import annotations

from collections import deque

from twisted.internet import defer, reactor
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.internet.error import ConnectionDone
from twisted.internet.protocol import Protocol

from redisp.protocol.frames import FrameScanner
from tests.raw_redis import encode
from tests.support import STARTUP_LIMIT


class RespClient(Protocol):
    """A raw RESP connection: requests out, every frame back as bytes, in
    the order it came (replies and pushes alike)."""

    def __init__(self) -> None:
        self._scanner = FrameScanner()
        self._frames: deque[bytes] = deque()
        self._readers: deque[tuple[int, defer.Deferred]] = deque()
        self.closed: defer.Deferred = defer.Deferred()
        self.lost = False

    def dataReceived(self, data: bytes) -> None:
        self._frames.extend(self._scanner.feed(data))
        self._serve()

    def _serve(self) -> None:
        readers, frames = self._readers, self._frames
        while readers and (readers[0][1].called or len(frames) >= readers[0][0]):
            n, d = readers.popleft()
            if not d.called:
                d.callback([frames.popleft() for _ in range(n)])

    def connectionLost(self, reason=None) -> None:
        self.lost = True
        readers, self._readers = self._readers, deque()
        for _, d in readers:
            if not d.called:
                d.errback(ConnectionDone(f"closed; unread frames: {list(self._frames)!r:.300}"))
        self.closed.callback(None)

    @property
    def unread(self) -> int:
        return len(self._frames)

    def send(self, *requests) -> None:
        self.transport.write(b"".join(encode(*argv) for argv in requests))

    def read(self, n: int = 1) -> defer.Deferred:
        """The next ``n`` frames (a guard fails the test if they never come)."""
        d: defer.Deferred = defer.Deferred()
        self._readers.append((n, d))
        d.addTimeout(STARTUP_LIMIT, reactor)
        self._serve()
        return d

    def pipeline(self, *requests) -> defer.Deferred:
        """Send ``requests`` in one write; their reply frames."""
        self.send(*requests)
        return self.read(len(requests))

    def call(self, *argv) -> defer.Deferred:
        self.send(argv)
        return self.read(1).addCallback(lambda frames: frames[0])

    def close(self) -> defer.Deferred:
        self.transport.loseConnection()
        return self.closed

    def hung_up(self) -> defer.Deferred:
        """Fires once the other side has closed the connection (a guard
        fails the test if it never does)."""
        d: defer.Deferred = defer.Deferred()
        self.closed.addBoth(lambda r: (d.called or d.callback(None), r)[1])
        return d.addTimeout(STARTUP_LIMIT, reactor)


def connect(port: int) -> defer.Deferred:
    return connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", port), RespClient())
