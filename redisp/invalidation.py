"""Coherence with Redis: drop a cached key as soon as it changes (SPEC §5).

Redis's server-assisted client-side caching in **broadcasting mode**, on one
dedicated connection that is both the tracking client and the redirect
target: ``CLIENT ID`` -> ``CLIENT TRACKING on REDIRECT <own id> BCAST`` ->
``SUBSCRIBE __redis__:invalidate``.  Why BCAST rather than default tracking:

* Default tracking is enabled on each data connection and redirected to the
  subscriber's id.  After a Redis restart a data connection can come back
  before the subscriber and redirect to an id that no longer exists; tracking
  is then off without anyone noticing unless both connections are watched
  and re-enabled in the right order.  BCAST lives on one connection: when it
  is up and subscribed, tracking holds, full stop.
* It keeps no per-key tracking table in Redis (``tracking-table-max-keys``
  does not apply), so a large cache costs Redis no memory.
* The cost: Redis sends a message for every write to any key (of every db),
  not only for keys redisp has read.  For a read cache in front of a Redis
  that is mostly read, that is little.

Caching is off until tracking is established, and off again (after a full
flush) as soon as the connection is lost: no invalidation can be missed
while a stale value is served.  Turning it on first poisons every fetch in
flight, since those were read while nothing was watching.  The race between
a fetch and an invalidation of the same key is designed out in ``reader.py``.
"""

from __future__ import annotations

import socket
from typing import Any

import txredisapi
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IStreamClientEndpoint
from twisted.logger import Logger
from twisted.python.failure import Failure

from redisp.backing import first_line, reconnecting
from redisp.config import RedisURL
from redisp.metrics import Metrics
from redisp.reader import CachedReader

log = Logger()

CHANNEL = b"__redis__:invalidate"


class _InvalidationProtocol(txredisapi.SubscriberProtocol):
    """txredisapi's subscriber, handing each invalidation message on."""

    on_message: Any = None

    def deliver_to(self, on_message: Any) -> None:
        # a method, not an attribute set from outside: ClientService hands out
        # a proxy of this protocol, and setting attributes on it misses us
        self.on_message = on_message

    def messageReceived(self, pattern: Any, channel: bytes, message: Any) -> None:
        if self.on_message is not None and channel == CHANNEL:
            self.on_message(message)


def _protocol() -> _InvalidationProtocol:
    return _InvalidationProtocol(charset=None, convertNumbers=False)


class Invalidator:
    """Keeps one tracking connection up and the reader's ``caching`` flag true to it."""

    _stopping = False  # set by stop()

    def __init__(
        self,
        url: RedisURL,
        timeout: float,
        reactor: Any,
        reader: CachedReader,
        metrics: Metrics,
        endpoint: IStreamClientEndpoint | None = None,
    ) -> None:
        self.url = url
        self.timeout = timeout
        self._clock = reactor
        self._reader = reader
        self._metrics = metrics
        self.active = False
        self._problem: str | None = None
        self._service = reconnecting(url, timeout, reactor, _protocol, self._enable, endpoint)

    @property
    def state(self) -> str:
        """'active' while tracking holds, else 'down' (caching is off)."""
        return "active" if self.active else "down"

    def start(self) -> None:
        self._reader.caching = False
        self._service.startService()

    def stop(self) -> Deferred:
        self._stopping = True  # closing the connection on purpose is no loss to report
        return self._service.stopService()

    def _enable(self, protocol: _InvalidationProtocol) -> Deferred:
        """Tracking on this connection, redirected to itself, then subscribe."""
        d = protocol.whenConnected()
        auth = self.url.auth_command()
        if auth is not None:
            d.addCallback(lambda _: protocol.execute_command(*auth, apply_timeout=False))
        d.addCallback(lambda _: protocol.execute_command(b"CLIENT", b"ID", apply_timeout=False))
        d.addCallback(lambda client_id: protocol.execute_command(
            b"CLIENT", b"TRACKING", b"on", b"REDIRECT", str(client_id).encode(), b"BCAST",
            apply_timeout=False))
        d.addCallback(self._check_ok)
        d.addCallback(lambda _: protocol.execute_command(b"SUBSCRIBE", CHANNEL,
                                                         apply_timeout=False))
        d.addTimeout(self.timeout, self._clock)
        d.addCallbacks(lambda _: self._established(protocol), self._failed,
                       errbackArgs=(protocol,))
        return d

    @staticmethod
    def _check_ok(reply: Any) -> None:
        if reply not in (b"OK", "OK"):
            raise txredisapi.ResponseError(f"CLIENT TRACKING answered {reply!r}")

    def _established(self, protocol: _InvalidationProtocol) -> None:
        protocol.deliver_to(self._message)
        protocol.whenDisconnected().addCallback(self._lost)
        # fetches in flight were read while nothing watched: none may be stored
        self._reader.invalidate_all()
        self.active = True
        self._reader.caching = True
        self._problem = None
        log.info("invalidation: tracking active (BCAST); caching on")

    def _failed(self, failure: Failure, protocol: Any) -> Failure:
        problem = first_line(failure.getErrorMessage())
        if problem != self._problem:
            log.warn("invalidation: cannot enable tracking on {url}: {problem}; "
                     "caching stays off until it can", url=self.url.redacted(), problem=problem)
        self._problem = problem
        return failure  # ClientService closes the connection and retries

    def _lost(self, _: object) -> None:
        self.active = False
        self._reader.caching = False
        self._flush()
        if not self._stopping:
            log.warn("invalidation: tracking connection lost; cache flushed, caching off "
                     "until tracking is re-established")

    def _message(self, keys: list | None) -> None:
        self._metrics.invalidation_messages += 1
        if keys is None:  # FLUSHDB / FLUSHALL, or Redis lost track: anything changed
            self._flush()
            return
        if isinstance(keys, bytes):
            keys = [keys]
        invalidate = self._reader.invalidate
        for key in keys:
            invalidate(key)

    def _flush(self) -> None:
        self._metrics.invalidation_flushes += 1
        self._reader.invalidate_all()


def tracking_support_problem(url: RedisURL, timeout: float) -> str | None:
    """Why the backing Redis cannot do BCAST tracking, or None when it can.

    Asked once, synchronously, before the reactor starts, so that an old
    Redis stops start-up with one clear line.  A Redis that cannot be reached
    at all is not a problem here: redisp starts with caching off.
    """
    try:
        with socket.create_connection((url.host, url.port), timeout=timeout) as s:
            s.settimeout(timeout)
            reader = s.makefile("rb")
            auth = url.auth_command()
            commands = [auth] if auth is not None else []
            commands += [(b"CLIENT", b"TRACKING", b"on", b"BCAST"),
                         (b"CLIENT", b"TRACKING", b"off")]
            for command in commands:
                s.sendall(b"*%d\r\n" % len(command)
                          + b"".join(b"$%d\r\n%s\r\n" % (len(a), a) for a in command))
                line = reader.readline().rstrip(b"\r\n")
                if line.startswith(b"-"):
                    return line[1:].decode("utf-8", "replace")
    except OSError:
        return None
    return None
