"""The backing Redis, through txredisapi, with the failure modes made explicit.

txredisapi speaks the protocol (with hiredis parsing its replies when
installed); this module owns everything around it that a proxy needs and
txredisapi leaves open:

* one connection kept up by ``ClientService`` with a backoff capped near one
  second, so a Redis that is down at start-up or restarts later is picked up
  by itself; each new connection must answer PING (after AUTH and SELECT)
  before anyone may use it, so a Redis that refuses us (NOAUTH) or accepts
  connections without answering them (SIGSTOPped) is not "up";
* a timeout on every call (txredisapi waits forever while Redis is down),
  on the injected clock so tests drive it with ``task.Clock``.  Each call
  has its own: a call that times out fails alone, the connection and the
  other calls on it are left alone, and its late reply is swallowed in its
  slot of the reply queue so later replies keep their order;
* fail-fast paths, so requests queued behind the single-client gate do not
  each wait out the timeout: while the last connection attempt failed
  ("unavailable"), and after a call timed out until the backing answers a
  probe PING ("timed out": ``Backing.state`` is ``stalled``);
* typed errors the front doors map to 502/503/504 and RESP errors;
* binary-safe replies: ``charset=None, convertNumbers=False`` (the defaults
  turn ``b"007"`` into ``7``), in ``BinaryRedisProtocol``;
* TCP_NODELAY and TCP keepalive on every backing connection;
* TLS for ``rediss://`` (backing/tls.py): a connection is up once its handshake is,
  and a TLS failure is reported like any other failed connection, with its
  reason;
* GETs batched per reactor turn into MGETs (``fetch``, backing/batching.py).
"""

from __future__ import annotations

import random
import socket
from collections.abc import Callable
from typing import Any

import txredisapi
from twisted.application.internet import ClientService, backoffPolicy
from twisted.internet import error as net_error
from twisted.internet.defer import CancelledError, Deferred, fail, maybeDeferred
from twisted.internet.defer import TimeoutError as DeferredTimeout
from twisted.internet.interfaces import IDelayedCall, IStreamClientEndpoint, ITCPTransport
from twisted.internet.protocol import Factory
from twisted.logger import Logger
from twisted.python.failure import Failure

from redisp.backing.batching import Done, GetBatcher
from redisp.backing.tls import client_endpoint, describe, tcp_transport
from redisp.config import RedisURL
from redisp.metrics import Metrics
from redisp.protocol.codec import encode_command
from redisp.protocol.sending import can_send_now, send_now

log = Logger()

#: TCP keepalive on every backing connection, with hiredis's timings
#: (``redisEnableKeepAlive``: first probe after 15 s idle, then every 5 s, 3
#: unanswered probes and the kernel drops it): a peer that vanished without
#: a FIN is noticed in under a minute even on an idle connection, and NAT
#: state along the way does not expire.
KEEPALIVE = (("TCP_KEEPIDLE", 15), ("TCP_KEEPINTVL", 5), ("TCP_KEEPCNT", 3))

#: seconds between probe PINGs while a stalled backing answers with an error
#: (LOADING, BUSY): it is alive but cannot serve yet
PROBE_INTERVAL = 0.25

#: reconnect after 0.2, 0.4, then every 0.5 s, each plus up to 0.1 s of
#: jitter: a Redis that is back is picked up well within a second, connection
#: set-up included (Twisted's default jitter alone adds up to a whole second)
RETRY_POLICY = backoffPolicy(initialDelay=0.1, maxDelay=0.5, factor=2.0,
                             jitter=lambda: random.random() * 0.1)

#: failures that mean the connection itself failed (and not Redis's answer)
CONNECTION_FAILURES = (txredisapi.ConnectionError, net_error.ConnectError,
                       net_error.ConnectionClosed, CancelledError, OSError)


class BackingError(Exception):
    """A GET the backing Redis could not answer; ``str()`` is the text clients see."""

    kind = "error"


class BackingReplyError(BackingError):
    """Redis answered with an error (WRONGTYPE, NOAUTH …): its own text."""

    kind = "reply"


class BackingUnavailable(BackingError):
    """No usable connection to the backing Redis."""

    kind = "unavailable"


class BackingTimeout(BackingError):
    """The backing Redis did not answer within ``redis_timeout``."""

    kind = "timeout"


class BackingInternalError(BackingError):
    """A fault in redisp while sending (out of memory …): logged once where it
    happened, reported to each caller as an internal error, never as Redis's."""

    kind = "internal"


class BinaryRedisProtocol(txredisapi.RedisProtocol):
    """txredisapi's protocol for bytes in and bytes out, with its per-command
    and per-item hot spots replaced for that case.

    With ``charset=None, convertNumbers=False`` (binary-safe replies),
    ``tryConvertData`` returns every reply unchanged, yet walks each MGET
    reply element by element; and ``_build_command`` encodes each argument
    through two type-dispatching calls.  Together they were a large share
    of the pass-through profile (bench/profile WORKLOAD=miss, batched MGETs;
    before/after of bench/batching_micro.py in bench/NOTES-perf.md).
    Arguments that are not all bytes still go txredisapi's own way.

    ``execute_command`` is redisp's own too: see there.  Pipelining and
    MULTI, which txredisapi's version handles, are not used on this
    connection.
    """

    #: whether ``execute_command`` and ``execute_many`` may hand their bytes
    #: to the socket at once (protocol/sending.py), found on first use: None until then
    _direct: bool | None = None

    def __init__(self) -> None:
        super().__init__(charset=None, convertNumbers=False)

    def tryConvertData(self, data: Any) -> Any:
        return data  # nothing to convert without a charset or number conversion

    def _build_command(self, *args: Any, **kwargs: Any) -> bytes:
        for arg in args:
            if arg.__class__ is not bytes:
                return super()._build_command(*args, **kwargs)
        return encode_command(args)

    def dataReceived(self, data: bytes, unpause: bool = False) -> None:
        """txredisapi's (hiredis) loop, less the steps this connection never
        needs (conversion, MULTI bookkeeping, two calls through the reply
        queue): each reply goes straight to its waiter, and the replies of
        an ``execute_many`` batch straight into its list, with no call per
        reply (a batch of GETs has one a key)."""
        reader = self._reader
        if data:
            reader.feed(data)
        queue = self.replyQueue
        waiting = queue.waiting
        reply = reader.gets()
        while reply is not False:
            if not waiting:  # nobody waits (never, with a reply per command): txredisapi keeps it
                queue.put(reply)
            elif waiting[0].__class__ is not _Replies:
                waiting.pop(0).callback(reply)
            else:
                batch = waiting[0]
                replies, count = batch.replies, batch.count
                while True:
                    if reply.__class__ is txredisapi.ResponseError:
                        reply = BackingReplyError(str(reply))
                    replies.append(reply)
                    if len(replies) == count:
                        break
                    reply = reader.gets()
                    if reply is False:  # the rest in a later read
                        return
                waiting.pop(0)
                if not batch.deferred.called:  # else timed out: the late replies are dropped
                    batch.deferred.callback(replies)
            reply = reader.gets()

    def connectionLost(self, why: Any) -> None:
        fail_with_tls_reason(self, why)
        super().connectionLost(why)

    def execute_command(self, *args: Any, **kwargs: Any) -> Deferred:
        """Send one command; the Deferred is its own slot in the reply queue.

        txredisapi's version already survives a cancelled (timed-out) call:
        its Deferred is a copy of the queue slot's, so the late reply lands
        in the slot and is dropped.  This one returns the slot itself, whose
        cancellation (``ReplyQueue._cancelGet``) leaves a placeholder in the
        queue that swallows the late reply just the same: replies stay in
        order for the calls behind it, with one Deferred a call instead of
        three.  It also builds the command before anything is written, so a
        failure there (out of memory) leaves the connection as it was; a
        failure while writing leaves the byte stream in an unknown state, so
        the connection is dropped.  ``kwargs`` (``apply_timeout``) are
        accepted and ignored: the timeout is the caller's.  The bytes go to
        the socket at once on a plain TCP connection, as ``execute_many``'s
        do: a batch of misses reaches Redis in the reactor turn that made
        it, not one ``epoll`` later.
        """
        if not self.connected:
            raise txredisapi.ConnectionError("Not connected")
        command = self._build_command(*args)
        reply = self.replyQueue.get()
        try:
            self._send(command)
        except BaseException:
            reply.addErrback(lambda _: None)  # the slot fails with the connection
            raise
        return reply.addCallback(self.handle_reply)

    def _send(self, data: bytes) -> None:
        """Hand ``data`` to the socket at once on plain TCP, else to Twisted;
        a failure leaves the byte stream in an unknown state, so the
        connection is dropped before the error goes on."""
        transport = self.transport
        direct = self._direct
        if direct is None:
            direct = self._direct = can_send_now(transport)
        try:
            if direct:
                send_now(transport, data)
            else:
                transport.write(data)
        except BaseException:
            transport.abortConnection()
            raise

    def execute_many(self, commands: list[bytes]) -> Deferred:
        """Send several encoded commands (``relay.encode_command``) in one write;
        one Deferred for all their replies.

        A command sent alone costs a Deferred, a callback chain and a reply
        queue slot of its own; here one ``_Replies`` stands in the reply
        queue for them all and fires once with the list of their replies in
        order (an error reply as a ``BackingReplyError`` in its place).  The
        connection failing fails the lot; cancelling it (a timeout) leaves
        the slot in the queue to swallow the late replies, as
        ``execute_command``'s cancelled slot does.  The bytes go to the
        socket at once when it is a plain TCP one (protocol/sending.py): the write
        would otherwise wait for the next reactor turn and cost two
        ``epoll_ctl``.
        """
        if not self.connected:
            raise txredisapi.ConnectionError("Not connected")
        if self.replyQueue.pending:  # never with a reply per command sent; stay in order anyway
            raise txredisapi.ConnectionError("reply queue out of step")
        replies = _Replies(len(commands))
        self._send(b"".join(commands))
        self.replyQueue.waiting.append(replies)
        return replies.deferred


class _Replies:
    """The one reply-queue slot of the commands of an ``execute_many``:
    ``dataReceived`` fills ``replies`` and fires ``deferred`` (unless it
    was cancelled: then the replies are only counted off)."""

    __slots__ = ("deferred", "replies", "count")

    def __init__(self, count: int) -> None:
        self.deferred: Deferred = Deferred()
        self.replies: list[Any] = []
        self.count = count

    def callback(self, reply: Any) -> None:
        """Through the reply queue comes only the connection's failure
        (txredisapi's ``connectionLost``, ``fail_with_tls_reason``)."""
        if not self.deferred.called:
            if not isinstance(reply, Exception):
                reply = txredisapi.ConnectionError("reply queue out of step")
            self.deferred.errback(Failure(reply))


class TLSConnectionError(txredisapi.ConnectionError):
    """The connection was closed by TLS (a certificate refused after the
    handshake, as a TLS 1.3 server does when it wants one from us); the text
    says why."""


def fail_with_tls_reason(protocol: txredisapi.BaseRedisProtocol, why: Any) -> None:
    """When TLS closed the connection, fail the calls waiting on it with the
    reason, before txredisapi fails them with a bare "Lost connection"."""
    problem = describe(why) if isinstance(why, Failure) else None
    if problem is not None:
        error = TLSConnectionError(problem)
        while protocol.replyQueue.waiting:
            protocol.replyReceived(error)


def _new_protocol() -> txredisapi.BaseRedisProtocol:
    return BinaryRedisProtocol()


def tune_socket(transport: Any) -> None:
    """TCP_NODELAY and keepalive on a backing connection (TCP, under TLS too).

    Pipelined GETs must not wait for Nagle's algorithm, as with every Redis
    client; keepalive: see ``KEEPALIVE``.
    """
    transport = tcp_transport(transport)
    if not ITCPTransport.providedBy(transport):
        return
    transport.setTcpNoDelay(True)
    transport.setTcpKeepAlive(True)
    handle = transport.getHandle()
    for name, value in KEEPALIVE:
        option = getattr(socket, name, None)
        if option is not None:  # Linux names; other systems keep their defaults
            handle.setsockopt(socket.IPPROTO_TCP, option, value)


def reconnecting(
    url: RedisURL, timeout: float, reactor: Any, protocol: Callable[[], Any],
    prepare: Callable[[Any], Deferred], endpoint: IStreamClientEndpoint | None = None,
    failed: Callable[[Failure], None] | None = None, clock: Any = None,
) -> ClientService:
    """One connection to Redis, re-established by itself with a backoff capped
    near one second (a restarted Redis is picked up quickly), tuned
    (``tune_socket``) and prepared by ``prepare`` before anyone may use it;
    ``failed`` hears why an attempt to connect failed.  A connection whose
    preparation fails is closed (``_drop``).  ``clock`` (default: the
    reactor) times the retries."""
    if endpoint is None:
        endpoint = client_endpoint(reactor, url, timeout)
    if failed is not None:
        endpoint = _RecordingEndpoint(endpoint, failed)

    def prepare_or_drop(proxy: Any) -> Deferred:
        tune_socket(proxy.transport)
        return maybeDeferred(prepare, proxy).addErrback(_drop, proxy)

    return ClientService(
        endpoint, Factory.forProtocol(protocol), clock=clock or reactor,
        prepareConnection=prepare_or_drop, retryPolicy=RETRY_POLICY,
    )


def _drop(failure: Failure, proxy: Any) -> Failure:
    """Close a connection whose preparation failed, then let ClientService retry.

    ClientService counts a rejected connection as a failed attempt but
    leaves it open: one more idle connection to Redis per retry, for as long
    as Redis refuses us.  Closing it ourselves makes its disconnect notice
    reach ClientService's state machine in a state that does not expect one
    (an Unhandled NoTransition error in the log), so that notice, which
    Twisted's proxy of our protocol holds, is silenced first.
    """
    if hasattr(proxy, "_lostNotification"):  # twisted's _ReconnectingProtocolProxy
        proxy._lostNotification = _ignore
    transport = proxy.transport
    if transport is not None:
        transport.abortConnection()
    return failure


def _ignore(*_: object) -> None:
    pass


class _RecordingEndpoint:
    """Remembers why the last connection attempt failed, for error messages."""

    def __init__(self, endpoint: IStreamClientEndpoint, failed: Callable[[Failure], None]) -> None:
        self._endpoint = endpoint
        self._failed = failed

    def connect(self, factory: Factory) -> Deferred:
        d = self._endpoint.connect(factory)
        d.addErrback(self._note)
        return d

    def _note(self, failure: Failure) -> Failure:
        self._failed(failure)
        return failure


class Backing:
    """GETs (batched), MGET and PING against one backing Redis, never waiting forever.

    States (``state``): ``up`` (calls go to the connection), ``stalled`` (a
    call timed out and the connection has not answered the probe PING since:
    calls fail at once with the timeout error), ``down`` (no connection, or
    the last attempt failed: calls fail at once as unavailable, or wait for
    the connection being made, within their timeout).
    """

    def __init__(
        self,
        url: RedisURL,
        timeout: float,
        reactor: Any,
        metrics: Metrics,
        endpoint: IStreamClientEndpoint | None = None,
        clock: Any = None,
    ) -> None:
        self.url = url
        self.timeout = timeout
        self._clock = clock or reactor  # timeouts, probes and retries
        self._metrics = metrics
        # the prepared connection (the txredisapi protocol itself, not
        # ClientService's proxy of it), answering or not
        self._protocol: Any = None
        # _connection while it answers: where calls go (the hot path reads this only)
        self._live: Any = None
        # why calls fail at once while there is no live connection:
        # (BackingError subclass, text), or None to wait for the connection
        self._refusal: tuple[type[BackingError], str] | None = None
        self._down_reason: str | None = None
        self._abandoned: Any = None  # the last connection given up as silent
        self._probe_call: IDelayedCall | None = None
        self._ever_up = False
        self._troubled = False  # a warning was logged: say when it is over
        self._stopping = False  # closing on purpose: no "connection lost" warning
        self._service = reconnecting(url, timeout, reactor, _new_protocol, self._prepare, endpoint,
                                     failed=self._attempt_failed, clock=self._clock)
        #: ``fetch(key, done)`` calls ``done`` with the value of ``key``, None,
        #: or a Failure; the fetches of one reactor turn share one MGET
        #: (backing/batching.py).  The batcher's own method: no wrapper call per miss.
        self.fetch: Callable[[bytes, Done], None] = GetBatcher(self.call, reactor).fetch

    @property
    def up(self) -> bool:
        """True while a connection is established and answering."""
        return self._live is not None

    @property
    def state(self) -> str:
        """'up', 'stalled' (connected, not answering since a call timed out) or 'down'."""
        if self._live is not None:
            return "up"
        return "stalled" if self._refusal is not None and \
            self._refusal[0] is BackingTimeout else "down"

    def start(self) -> None:
        self._service.startService()

    def stop(self) -> Deferred:
        """Close the connection and stop reconnecting."""
        self._stopping = True
        self._cancel_probe()
        return self._service.stopService()

    def drop(self) -> None:
        """Close the connection on purpose (the master moved, backing/sentinel.py):
        calls in flight on it fail as unavailable, later ones wait for the
        new connection within their timeout."""
        protocol = self._protocol
        self._protocol = self._live = None
        self._refusal = None
        self._cancel_probe()
        if protocol is not None and protocol.transport is not None:
            protocol.transport.abortConnection()

    def mget(self, keys: list[bytes]) -> Deferred:
        """Fires with a list of values or None, Redis's MGET semantics."""
        return self.call(b"MGET", *keys)

    def ping(self) -> Deferred:
        return self.call(b"PING")

    def call(self, *args: bytes) -> Deferred:
        """Send one command; fails with a BackingError subclass, never hangs."""
        return self._send(_execute_command, args)

    def call_many(self, commands: list[bytes]) -> Deferred:
        """Send several encoded commands (``resp.encode_command``) in one write,
        under one timeout and one latency observation; fires with their
        replies in order, an error reply as a ``BackingReplyError`` in its
        place (not counted in ``backing_errors``: the caller decides what it
        is); fails as a whole with a BackingError subclass, as ``call``
        does, never hangs."""
        return self._send(_execute_many, commands)

    def _send(self, execute: Callable[[Any, Any], Deferred], payload: Any) -> Deferred:
        """``execute(protocol, payload)`` on the live connection, or once one
        is made, or a failure at once while calls are refused; under the
        timeout, observed, errors translated."""
        protocol = self._live
        if protocol is not None:
            try:
                d = execute(protocol, payload)
            except Exception:  # not connected any more, or out of memory
                return fail(self._translate(Failure(), protocol))
        elif self._refusal is not None:
            kind, text = self._refusal
            error = kind(text)
            self._metrics.backing_errors[error.kind] += 1
            return fail(error)
        else:  # no connection yet, or it was lost and is being made again
            d = self._service.whenConnected(failAfterFailures=1)
            d.addCallbacks(execute, self._no_connection, (payload,))
        started = self._clock.seconds()
        d.addTimeout(self.timeout, self._clock)
        d.addCallbacks(self._observe, self._translate, (started,), None, (protocol,))
        return d

    def _no_connection(self, failure: Failure) -> Failure:
        if failure.check(DeferredTimeout):  # the new connection did not answer PING
            return Failure(BackingTimeout(self._timed_out()))
        if failure.check(CancelledError):  # our own timeout (addTimeout says so) or stopping
            return failure
        reason = self._down_reason or first_line(failure.getErrorMessage() or "not connected")
        return Failure(BackingUnavailable(f"backing redis unavailable ({reason})"))

    def _observe(self, result: object, started: float) -> object:
        self._metrics.backing_latency.observe(self._clock.seconds() - started)
        return result

    def _timed_out(self) -> str:
        return f"backing redis timed out after {self.timeout:g}s"

    def _translate(self, failure: Failure, protocol: Any) -> Failure:
        if failure.check(BackingError):  # already ours (_no_connection)
            error = failure.value
        elif failure.check(txredisapi.ResponseError):
            error = BackingReplyError(str(failure.value))
        elif failure.check(DeferredTimeout):
            error = BackingTimeout(self._timed_out())
            if protocol is not None and protocol is self._live:
                self._stall(protocol)
        elif failure.check(*CONNECTION_FAILURES):
            if protocol is not None and protocol is self._abandoned:
                # dropped by us after its probe went unanswered for a whole
                # timeout: this call had waited that long too
                error = BackingTimeout(self._timed_out())
            else:
                reason = self._down_reason or failure.getErrorMessage() or "connection lost"
                error = BackingUnavailable(f"backing redis unavailable ({first_line(reason)})")
        else:  # a fault of ours (MemoryError while building or writing the command …)
            log.failure("internal error sending a command to backing redis {url}", failure,
                        url=self.url.redacted())
            error = BackingInternalError(
                f"internal error sending to backing redis ({failure.type.__name__})")
        self._metrics.backing_errors[error.kind] += 1
        return Failure(error)

    # -- a backing that stopped answering --------------------------------------------

    def suspect(self) -> None:
        """Another connection to the same Redis (a forwarded command's) timed
        out: fail fast here too until the probe PING answers, so misses and
        forwarded commands queued behind it do not each wait a timeout."""
        if self._live is not None:
            self._stall(self._live)

    def _stall(self, protocol: Any) -> None:
        """A call on the live connection timed out: fail fast until it answers a PING.

        The connection is kept: calls still in flight on it keep their own
        timeouts and get their replies if they come in time.  The probe PING
        goes behind them, so its answer means every one before it has been
        answered (or is past its own timeout).  If the probe itself goes
        unanswered for a whole timeout, the connection is given up
        (``_probe_failed``).
        """
        self._live = None
        self._refusal = (BackingTimeout, self._timed_out() + " and has not answered since")
        self._troubled = True
        log.warn("backing redis {url} did not answer within {timeout}s; failing misses at once "
                 "until it answers a PING", url=self.url.redacted(), timeout=f"{self.timeout:g}")
        self._probe(protocol)

    def _probe(self, protocol: Any) -> None:
        self._probe_call = None
        if protocol is not self._protocol:
            return
        try:
            d = protocol.execute_command(b"PING")
        except Exception:  # the connection is going: _lost takes over
            return
        d.addTimeout(self.timeout, self._clock)
        d.addCallbacks(self._probe_answered, self._probe_failed, (protocol,), None, (protocol,))

    def _probe_answered(self, _: object, protocol: Any) -> None:
        if protocol is self._protocol and self._live is None:
            self._live = protocol
            self._refusal = None
            self._troubled = False
            log.info("backing redis {url} answers again", url=self.url.redacted())

    def _probe_failed(self, failure: Failure, protocol: Any) -> None:
        if protocol is not self._protocol:
            return
        if failure.check(txredisapi.ResponseError):  # LOADING, BUSY …: alive, not serving
            self._probe_call = self._clock.callLater(PROBE_INTERVAL, self._probe, protocol)
        elif failure.check(DeferredTimeout):
            # a half-open connection (NAT state dropped) never answers, and a
            # new connection is the only way to find out: give this one up.
            # Every call on it was sent before the probe, so is past its own
            # timeout by now.  The new connection must answer PING before use
            self._abandoned = protocol
            self._protocol = None
            log.warn("backing redis {url} did not answer a PING within {timeout}s either; "
                     "reconnecting", url=self.url.redacted(), timeout=f"{self.timeout:g}")
            protocol.transport.abortConnection()
        # else: the connection failed, and _lost hears of it

    def _cancel_probe(self) -> None:
        if self._probe_call is not None and self._probe_call.active():
            self._probe_call.cancel()
        self._probe_call = None

    # -- connection life -----------------------------------------------------------------

    def _attempt_failed(self, failure: Failure) -> None:
        reason = failure.getErrorMessage().strip().rstrip(".")
        first = failure.value.__class__.__name__ if not reason else reason
        if self._down_reason is None:
            self._troubled = True
            log.warn(
                "backing redis {url} unavailable: {reason}; retrying",
                url=self.url.redacted(), reason=first,
            )
        self._down_reason = first_line(first)
        self._refusal = (BackingUnavailable, f"backing redis unavailable ({self._down_reason})")

    def _prepare(self, proxy: Any) -> Deferred:
        """AUTH and SELECT on every new connection, then PING: nobody may use
        it before it answers (a Redis that wants a password answers NOAUTH, a
        stopped one nothing at all)."""
        commands: list[tuple[bytes, ...]] = []
        auth = self.url.auth_command()
        if auth is not None:
            commands.append(auth)
        if self.url.db:
            commands.append((b"SELECT", str(self.url.db).encode()))
        commands.append((b"PING",))

        d = proxy.whenConnected()  # fires with the protocol itself, not the proxy
        for command in commands:
            d.addCallback(_setup_step, command)
        d.addTimeout(self.timeout, self._clock)
        d.addCallbacks(self._ready, self._rejected)
        return d

    def _ready(self, protocol: Any) -> None:
        self._protocol = self._live = protocol
        protocol.whenDisconnected().addCallback(self._lost)
        if self._troubled or not self._ever_up:
            log.info("backing redis {url} connected", url=self.url.redacted())
        self._refusal = None
        self._down_reason = None
        self._troubled = False
        self._ever_up = True

    def _rejected(self, failure: Failure) -> Failure:
        if failure.check(CancelledError):  # stopping
            return failure
        if failure.check(DeferredTimeout):
            reason = f"no answer to PING within {self.timeout:g}s"
            self._refusal = (BackingTimeout, self._timed_out() + " (a new connection did not "
                             "answer PING)")
        else:
            reason = first_line(failure.getErrorMessage())
            self._refusal = (BackingUnavailable, f"backing redis unavailable ({reason})")
        if self._down_reason != reason:
            self._troubled = True
            if failure.check(DeferredTimeout):
                log.warn("backing redis {url} accepted a connection but did not answer PING "
                         "within {timeout}s; retrying", url=self.url.redacted(),
                         timeout=f"{self.timeout:g}")
            elif failure.check(TLSConnectionError):  # the handshake passed, then TLS refused us
                log.warn("backing redis {url} unavailable: {reason}; retrying",
                         url=self.url.redacted(), reason=reason)
            else:
                log.warn("backing redis {url} refused the connection setup: {reason}",
                         url=self.url.redacted(), reason=reason)
        self._down_reason = reason
        return failure  # _drop closes the connection, ClientService retries

    def _lost(self, protocol: Any) -> None:
        if self._protocol is protocol:
            self._protocol = self._live = None
            self._refusal = None  # calls wait for the new connection, within their timeout
            self._cancel_probe()
            if self._stopping:
                return
            self._troubled = True
            log.warn("backing redis {url} connection lost; reconnecting", url=self.url.redacted())


def _execute_command(protocol: Any, args: tuple[bytes, ...]) -> Deferred:
    return protocol.execute_command(*args)


def _execute_many(protocol: Any, commands: list[bytes]) -> Deferred:
    return protocol.execute_many(commands)


def _setup_step(protocol: Any, command: tuple[bytes, ...]) -> Deferred:
    return protocol.execute_command(*command).addCallback(lambda _: protocol)


def first_line(text: str) -> str:
    """First line of an error message, trimmed: it goes into one-line replies and logs."""
    line = text.strip().splitlines()[0] if text.strip() else "unknown error"
    return line[:200]
