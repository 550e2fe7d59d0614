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
a fetch and an invalidation of the same key is designed out in ``core/reader.py``.

"Lost" includes silent: a connection cut without a FIN or RST (a NAT
dropping its state, a peer that froze) looks exactly like a quiet Redis.  So
the connection is PINGed every second (in RESP2 a subscribed connection may
PING, and gets a ``pong`` message back) and one PING unanswered for
``redis_timeout`` counts as a loss; TCP keepalive is on as on every backing
connection.

Read-after-write: Redis queues the invalidation before it answers the
writer, but a client's GET that reaches redisp in the same reactor turn as
the invalidation may be handled first.  So before the first cache lookup of
each reactor turn, the reader has the tracking socket read at once,
non-blocking, and what is there is handed to the protocol
(``_InvalidationProtocol.drain``, ``CachedReader.drain_before_hits``).
Over TLS (``rediss://``) the socket holds TLS records, not RESP: what is
read is handed to the TLS layer instead, which deciphers it and hands the
messages on, in the order the reactor would have.
"""


from __future__ import annotations

import select
import socket
from typing import Any

import txredisapi
from twisted.internet.defer import Deferred, succeed
from twisted.internet.defer import TimeoutError as DeferredTimeout
from twisted.internet.interfaces import IDelayedCall, IStreamClientEndpoint
from twisted.logger import Logger
from twisted.python.failure import Failure

from redisp.backing.connection import fail_with_tls_reason, first_line, reconnecting
from redisp.backing.tls import blocking_connection, tcp_transport
from redisp.config import RedisURL
from redisp.core.reader import CachedReader
from redisp.metrics import Metrics

log = Logger()

CHANNEL = b"__redis__:invalidate"

#: seconds between liveness PINGs on the tracking connection (SPEC §5: at
#: least one a second); each must be answered within ``redis_timeout``
PING_INTERVAL = 1.0

#: bytes read at once by ``drain`` (as Twisted's own reads)
DRAIN_BYTES = 65536


class _InvalidationProtocol(txredisapi.SubscriberProtocol):
    """txredisapi's subscriber, handing each invalidation message on."""

    on_message: Any = None
    _socket: socket.socket | None = None
    _poll: Any = None  # select.poll of _socket: cheaper to ask than a recv that fails
    _feed: Any = None  # where drained bytes go: this protocol, or the TLS layer under it

    def deliver_to(self, on_message: Any) -> None:
        # a method, not an attribute set from outside: ClientService hands out
        # a proxy of this protocol, and setting attributes on it misses us
        self.on_message = on_message

    def messageReceived(self, pattern: Any, channel: bytes, message: Any) -> None:
        if self.on_message is not None and channel == CHANNEL:
            self.on_message(message)

    def connectionLost(self, why: Any) -> None:
        fail_with_tls_reason(self, why)
        super().connectionLost(why)

    def can_drain(self) -> bool:
        """True when ``drain`` can read this connection's socket itself (TCP,
        with or without TLS, or a unix socket)."""
        tcp = tcp_transport(self.transport)
        if not hasattr(tcp, "getHandle"):
            return False
        handle = tcp.getHandle()
        if not isinstance(handle, socket.socket):
            return False
        # TLS records go through the TLS layer, which hands us the cleartext
        self._feed = self.transport.dataReceived if tcp is not self.transport \
            else self.dataReceived
        self._socket = handle
        self._poll = select.poll()
        self._poll.register(handle, select.POLLIN)
        return True

    def drain(self) -> bool:
        """Hand what already waits in the socket to the protocol now, instead
        of when the reactor gets to it.  False when the socket says the
        connection is closed or broken (the reactor will see that too)."""
        if not self._poll.poll(0):
            return True  # nothing waiting: the usual case
        sock = self._socket
        while True:
            try:
                data = sock.recv(DRAIN_BYTES)
            except (BlockingIOError, InterruptedError):
                return True  # nothing more waiting
            except OSError:
                return False
            if not data:
                return False
            self._feed(data)
            if len(data) < DRAIN_BYTES:
                return True


def _protocol() -> _InvalidationProtocol:
    return _InvalidationProtocol(charset=None, convertNumbers=False)


class Invalidator:
    """Keeps one tracking connection up and the reader's ``caching`` flag true to it.

    With an ``owner`` (a cluster's per-master tracking, core/cluster_tracking.py),
    this connection is one of several: it still flushes on a loss, but
    whether to cache, and which sockets to drain before hits, is the
    owner's to decide from all of them (``owner.tracking_changed(self)``).
    """

    _stopping = False  # set by stop()

    def __init__(
        self,
        url: RedisURL,
        timeout: float,
        reactor: Any,
        reader: CachedReader,
        metrics: Metrics,
        endpoint: IStreamClientEndpoint | None = None,
        owner: Any = None,
    ) -> None:
        self.url = url
        self.timeout = timeout
        self._clock = reactor
        self._reader = reader
        self._metrics = metrics
        self.active = False
        self._owner = owner
        #: the established connection's socket can be read by ``drain``
        self.drainable = False
        self._problem: str | None = None
        # the established tracking connection (the protocol, not ClientService's proxy)
        self._protocol: _InvalidationProtocol | None = None
        self._ping_call: IDelayedCall | None = None
        self._stopping = False  # closing on purpose: no "connection lost" warning
        self._service = reconnecting(url, timeout, reactor, _protocol, self._enable, endpoint)

    @property
    def state(self) -> str:
        """'active' while tracking holds, else 'down' (caching is off)."""
        return "active" if self.active else "down"

    def start(self) -> None:
        self._reader.caching = False
        self._service.startService()
        if self._owner is not None:
            self._owner.tracking_changed(self)

    def stop(self) -> Deferred:
        self._stopping = True
        self._cancel_ping()
        return self._service.stopService()

    def drop(self) -> None:
        """Treat the tracking connection as lost and close it (the master
        moved, backing/sentinel.py): cache flushed, caching off until tracking is
        set up again on the new connection."""
        if self._protocol is not None:
            self._give_up(self._protocol)

    def _enable(self, proxy: Any) -> Deferred:
        """Tracking on this connection, redirected to itself, then subscribe."""
        d = proxy.whenConnected()  # fires with the protocol itself
        d.addCallback(self._track)
        d.addTimeout(self.timeout, self._clock)
        d.addCallbacks(self._established, self._failed)
        return d

    def _track(self, protocol: _InvalidationProtocol) -> Deferred:
        d: Deferred = succeed(None)
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
        return d.addCallback(lambda _: protocol)

    @staticmethod
    def _check_ok(reply: Any) -> None:
        if reply not in (b"OK", "OK"):
            raise txredisapi.ResponseError(f"CLIENT TRACKING answered {reply!r}")

    def _established(self, protocol: _InvalidationProtocol) -> None:
        self._protocol = protocol
        protocol.deliver_to(self._message)
        protocol.whenDisconnected().addCallback(self._lost)
        # fetches in flight were read while nothing watched: none may be stored
        self._reader.invalidate_all()
        self.active = True
        self.drainable = protocol.can_drain()
        self._ping_later(protocol, PING_INTERVAL)
        self._problem = None
        if self._owner is not None:
            log.info("invalidation: tracking active (BCAST) on {url}", url=self.url.redacted())
            self._owner.tracking_changed(self)
            return
        self._reader.caching = True
        if self.drainable:
            self._reader.drain_before_hits(self.drain, self._clock)
        log.info("invalidation: tracking active (BCAST); caching on")

    def _failed(self, failure: Failure) -> Failure:
        if failure.check(DeferredTimeout):
            problem = f"no answer within {self.timeout:g}s"
        else:
            problem = first_line(failure.getErrorMessage())
        if problem != self._problem:
            log.warn("invalidation: cannot enable tracking on {url}: {problem}; "
                     "caching stays off until it can", url=self.url.redacted(), problem=problem)
        self._problem = problem
        return failure  # the connection is closed and ClientService retries

    def _lost(self, protocol: _InvalidationProtocol) -> None:
        if protocol is not self._protocol:
            return  # already handled (found silent), or an old connection
        self._protocol = None
        self._cancel_ping()
        self.active = self.drainable = False
        if self._owner is None:
            self._reader.drain_before_hits(None)
            self._reader.caching = False
        self._flush()
        if self._owner is not None:
            if not self._stopping:
                log.warn("invalidation: tracking connection to {url} lost; cache flushed, "
                         "caching off until tracking is re-established",
                         url=self.url.redacted())
            self._owner.tracking_changed(self)
        elif not self._stopping:
            log.warn("invalidation: tracking connection lost; cache flushed, caching off "
                     "until tracking is re-established")

    def _give_up(self, protocol: _InvalidationProtocol) -> None:
        """Treat a connection that still looks open as lost, and close it."""
        transport = protocol.transport
        self._lost(protocol)
        if transport is not None:
            transport.abortConnection()  # ClientService reconnects

    # -- liveness ---------------------------------------------------------------------------

    def _ping_later(self, protocol: _InvalidationProtocol, delay: float) -> None:
        self._ping_call = self._clock.callLater(delay, self._ping, protocol)

    def _ping(self, protocol: _InvalidationProtocol) -> None:
        self._ping_call = None
        if protocol is not self._protocol:
            return
        sent = self._clock.seconds()
        try:
            d = protocol.execute_command(b"PING", apply_timeout=False)
        except Exception:  # not connected any more: _lost comes with the close
            return
        d.addTimeout(self.timeout, self._clock)
        d.addCallbacks(self._pong, self._no_pong, (protocol, sent), None, (protocol,))

    def _pong(self, _: object, protocol: _InvalidationProtocol, sent: float) -> None:
        if protocol is self._protocol:
            self._ping_later(protocol, max(0.0, sent + PING_INTERVAL - self._clock.seconds()))

    def _no_pong(self, failure: Failure, protocol: _InvalidationProtocol) -> None:
        if protocol is not self._protocol:
            return
        if failure.check(txredisapi.ResponseError):  # an answer all the same
            self._ping_later(protocol, PING_INTERVAL)
        elif failure.check(DeferredTimeout):
            log.warn("invalidation: tracking connection did not answer a PING within "
                     "{timeout}s; treating it as lost", timeout=f"{self.timeout:g}")
            self._give_up(protocol)
        # else: the connection failed, and _lost hears of it

    def _cancel_ping(self) -> None:
        if self._ping_call is not None and self._ping_call.active():
            self._ping_call.cancel()
        self._ping_call = None

    # -- invalidations ----------------------------------------------------------------------

    def fileno(self) -> int | None:
        """The tracking socket's descriptor while it is ``drainable``: an owner
        watching many (one per cluster node) asks them all in one poll."""
        protocol = self._protocol
        if not self.drainable or protocol is None or protocol._socket is None:
            return None
        return protocol._socket.fileno()

    def drain(self) -> None:
        """The reader's hook: take in the invalidations already in the socket.

        Runs inside a cache lookup, so it never raises: a connection that
        turns out closed, or a fault, is a lost connection (flush, caching
        off), which the lookup then sees.
        """
        protocol = self._protocol
        if protocol is None:
            return
        try:
            alive = protocol.drain()
        except Exception:
            log.failure("invalidation: reading the tracking connection failed")
            alive = False
        if not alive and protocol is self._protocol:
            self._give_up(protocol)

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
    """Why ``invalidation: tracking`` cannot work with the backing Redis, as
    one line for start-up to stop with, or None when it can (or cannot tell).

    Asked once, synchronously, before the reactor starts, so that an old
    Redis, or credentials it refuses, stop start-up with one clear line
    naming the actual problem.  A Redis that cannot be reached, or that is
    in a passing state (LOADING, BUSY, max clients reached), is not a problem here: redisp starts
    with caching off and turns it on once tracking can be enabled.

    For a cluster every node runs the same Redis: the first seed that can be
    reached speaks for them all.
    """
    if url.kind == "sentinel":  # ask the master the Sentinels name now, if any does
        from redisp.backing.sentinel import blocking_master

        master = blocking_master(url, timeout)
        if master is None:
            return None
        url = url.at(*master)
    nodes = [url.at(host, port) for host, port in url.seeds] if url.kind == "cluster" else [url]
    for node in nodes:
        try:
            return _tracking_problem(node, timeout)
        except (OSError, ValueError):  # ssl.SSLError is an OSError
            continue
    return None


def _tracking_problem(url: RedisURL, timeout: float) -> str | None:
    """``tracking_support_problem`` of one server; raises when it cannot be asked."""
    where = url.redacted()
    with blocking_connection(url, timeout) as s:
        s.settimeout(timeout)
        reader = s.makefile("rb")

        def ask(*command: bytes) -> str | None:
            """Redis's error text for ``command``, or None when it did not fail."""
            s.sendall(b"*%d\r\n" % len(command)
                      + b"".join(b"$%d\r\n%s\r\n" % (len(a), a) for a in command))
            line = reader.readline().rstrip(b"\r\n")
            return line[1:].decode("utf-8", "replace") if line.startswith(b"-") else None

        auth = url.auth_command()
        if auth is not None:
            problem = ask(*auth)
            if problem is not None:
                return (f"invalidation: tracking: backing redis {where} refused our "
                        f"credentials: {problem}")
        problem = ask(b"CLIENT", b"TRACKING", b"on", b"BCAST")
        if problem is None:
            ask(b"CLIENT", b"TRACKING", b"off")
            return None
    code = problem.split(" ", 1)[0]
    if code in ("NOAUTH", "WRONGPASS"):
        return (f"invalidation: tracking: backing redis {where} requires authentication "
                f"(put the password in the redis URL): {problem}")
    if code == "NOPERM":
        return (f"invalidation: tracking: backing redis {where} does not let our user run "
                f"CLIENT TRACKING: {problem}")
    text = problem.lower()
    if code == "ERR" and ("unknown" in text or "syntax" in text or "wrong number" in text):
        # no CLIENT TRACKING, or not with BCAST: Redis < 6, or CLIENT renamed
        return (f"invalidation: tracking needs Redis >= 6 with CLIENT TRACKING; "
                f"{where} answered: {problem}")
    return None
