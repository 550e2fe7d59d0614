"""The backing Redis, through txredisapi, with the failure modes made explicit.

txredisapi speaks the protocol (with hiredis parsing its replies when
installed); this module owns everything around it that a proxy needs and
txredisapi leaves open:

* one connection kept up by ``ClientService`` with a capped backoff, so a
  Redis that is down at start-up or restarts later is picked up by itself;
* a timeout on every call (txredisapi waits forever while Redis is down),
  on the injected clock so tests drive it with ``task.Clock``;
* a fail-fast path while the last connection attempt failed, so requests
  queued behind the single-client gate do not each wait out the timeout;
* typed errors the front doors map to 502/503/504 and RESP errors;
* binary-safe replies: ``charset=None, convertNumbers=False`` (the defaults
  turn ``b"007"`` into ``7``), in ``BinaryRedisProtocol``;
* GETs batched per reactor turn into MGETs (``fetch``, batching.py).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import txredisapi
from twisted.application.internet import ClientService, backoffPolicy
from twisted.internet.defer import Deferred, fail, maybeDeferred
from twisted.internet.defer import TimeoutError as DeferredTimeout
from twisted.internet.endpoints import HostnameEndpoint
from twisted.internet.interfaces import IStreamClientEndpoint, ITCPTransport
from twisted.internet.protocol import Factory
from twisted.logger import Logger
from twisted.python.failure import Failure

from redisp.batching import Done, GetBatcher
from redisp.config import RedisURL
from redisp.metrics import Metrics

log = Logger()


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


class BinaryRedisProtocol(txredisapi.RedisProtocol):
    """txredisapi's protocol for bytes in and bytes out, with its two per-item
    hot spots replaced for that case.

    With ``charset=None, convertNumbers=False`` (binary-safe replies),
    ``tryConvertData`` returns every reply unchanged, yet walks each MGET
    reply element by element; and ``_build_command`` encodes each argument
    through two type-dispatching calls.  Together they were ~15% of the
    pass-through profile (bench/profile WORKLOAD=miss, batched MGETs);
    bench/batching_micro.py: ~1.9 -> ~1.2 us a key of a 16-key MGET.
    Arguments that are not all bytes still go txredisapi's own way.
    """

    def __init__(self) -> None:
        super().__init__(charset=None, convertNumbers=False)

    def tryConvertData(self, data: Any) -> Any:
        return data  # nothing to convert without a charset or number conversion

    def _build_command(self, *args: Any, **kwargs: Any) -> bytes:
        for arg in args:
            if arg.__class__ is not bytes:
                return super()._build_command(*args, **kwargs)
        return b"*%d\r\n" % len(args) + b"".join(
            [b"$%d\r\n%s\r\n" % (len(arg), arg) for arg in args]
        )


def _protocol() -> txredisapi.BaseRedisProtocol:
    return BinaryRedisProtocol()


def reconnecting(
    url: RedisURL, timeout: float, reactor: Any, protocol: Callable[[], Any],
    prepare: Callable[[Any], Deferred], endpoint: IStreamClientEndpoint | None = None,
    failed: Callable[[Failure], None] | None = None,
) -> ClientService:
    """One connection to Redis, re-established by itself with a backoff capped
    at one second (a restarted Redis is picked up quickly), and prepared by
    ``prepare`` before anyone may use it; ``failed`` hears why an attempt failed."""
    if endpoint is None:
        endpoint = HostnameEndpoint(reactor, url.host, url.port, timeout=timeout)
    if failed is not None:
        endpoint = _RecordingEndpoint(endpoint, failed)
    return ClientService(
        endpoint, Factory.forProtocol(protocol), clock=reactor, prepareConnection=prepare,
        retryPolicy=backoffPolicy(initialDelay=0.1, maxDelay=1.0, factor=2.0),
    )


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
    """GETs (batched), MGET and PING against one backing Redis, never waiting forever."""

    def __init__(
        self,
        url: RedisURL,
        timeout: float,
        reactor: Any,
        metrics: Metrics,
        endpoint: IStreamClientEndpoint | None = None,
    ) -> None:
        self.url = url
        self.timeout = timeout
        self._clock = reactor
        self._metrics = metrics
        self._protocol: txredisapi.BaseRedisProtocol | None = None
        self._down_reason: str | None = None
        self._ever_up = False
        self._service = reconnecting(url, timeout, reactor, _protocol, self._prepare, endpoint,
                                     failed=self._attempt_failed)
        #: ``fetch(key, done)`` calls ``done`` with the value of ``key``, None,
        #: or a Failure; the fetches of one reactor turn share one MGET
        #: (batching.py).  The batcher's own method: no wrapper call per miss.
        self.fetch: Callable[[bytes, Done], None] = GetBatcher(self.call, reactor).fetch

    @property
    def up(self) -> bool:
        """True while a connection is established and ready for commands."""
        return self._protocol is not None

    def start(self) -> None:
        self._service.startService()

    def stop(self) -> Deferred:
        """Close the connection and stop reconnecting; a connection closed on
        purpose is not lost, so ``_lost`` has nothing to report."""
        self._protocol = None
        return self._service.stopService()

    def mget(self, keys: list[bytes]) -> Deferred:
        """Fires with a list of values or None, Redis's MGET semantics."""
        return self.call(b"MGET", *keys)

    def ping(self) -> Deferred:
        return self.call(b"PING")

    def call(self, *args: bytes) -> Deferred:
        """Send one command; fails with a BackingError subclass, never hangs."""
        protocol = self._protocol
        if protocol is not None:
            # raises "Not connected" when the connection has just dropped and
            # _lost has not run yet: a failed Deferred like any other failure
            d = maybeDeferred(protocol.execute_command, *args, apply_timeout=False)
        elif self._down_reason is not None:
            error = BackingUnavailable(f"backing redis unavailable ({self._down_reason})")
            self._metrics.backing_errors[error.kind] += 1
            return fail(error)
        else:
            d = self._service.whenConnected(failAfterFailures=1)
            d.addCallback(lambda p: p.execute_command(*args, apply_timeout=False))
        started = self._clock.seconds()
        d.addTimeout(self.timeout, self._clock)
        d.addCallbacks(self._observe, self._translate, (started,), None, (protocol,))
        return d

    def _observe(self, result: object, started: float) -> object:
        self._metrics.backing_latency.observe(self._clock.seconds() - started)
        return result

    def _translate(self, failure: Failure, protocol: Any) -> Failure:
        if failure.check(txredisapi.ResponseError):
            error: BackingError = BackingReplyError(str(failure.value))
        elif failure.check(DeferredTimeout):
            if protocol is not None and protocol is self._protocol:
                error = BackingTimeout(f"backing redis timed out after {self.timeout:g}s")
                # its reply may still come, or never (a half-open connection):
                # start afresh rather than trust the stream, as txredisapi does.
                # Forget it now, not when connectionLost comes round: calls in
                # between wait for the next connection instead of failing on it
                self._protocol = None
                protocol.transport.abortConnection()
            else:
                reason = self._down_reason or "not connected"
                error = BackingUnavailable(f"backing redis unavailable ({reason})")
        else:
            reason = self._down_reason or failure.getErrorMessage() or "connection lost"
            error = BackingUnavailable(f"backing redis unavailable ({reason})")
        self._metrics.backing_errors[error.kind] += 1
        return Failure(error)

    def _attempt_failed(self, failure: Failure) -> None:
        reason = failure.getErrorMessage().strip().rstrip(".")
        first = failure.value.__class__.__name__ if not reason else reason
        if self._down_reason is None:
            log.warn(
                "backing redis {url} unavailable: {reason}; retrying",
                url=self.url.redacted(), reason=first,
            )
        self._down_reason = first_line(first)

    def _prepare(self, protocol: Any) -> Deferred:
        """AUTH and SELECT on every new connection, before anyone may use it."""
        auth = self.url.auth_command()
        commands = [auth] if auth is not None else []
        if self.url.db:
            commands.append((b"SELECT", str(self.url.db).encode()))

        d = protocol.whenConnected()
        for command in commands:
            d.addCallback(lambda _, c=command: protocol.execute_command(*c, apply_timeout=False))
        d.addTimeout(self.timeout, self._clock)
        d.addCallbacks(lambda _: self._ready(protocol), self._rejected, errbackArgs=(protocol,))
        return d

    def _ready(self, protocol: Any) -> None:
        self._protocol = protocol
        if ITCPTransport.providedBy(protocol.transport):
            # pipelined GETs must not wait for Nagle's algorithm, as every Redis client does
            protocol.transport.setTcpNoDelay(True)
        # ``protocol`` is ClientService's proxy of the real one, which is what
        # whenDisconnected fires with: bind the proxy, compared in _lost
        protocol.whenDisconnected().addCallback(lambda _: self._lost(protocol))
        if self._down_reason is not None or not self._ever_up:
            log.info("backing redis {url} connected", url=self.url.redacted())
        self._down_reason = None
        self._ever_up = True

    def _rejected(self, failure: Failure, protocol: Any) -> Failure:
        reason = first_line(failure.getErrorMessage())
        if self._down_reason != reason:
            log.warn("backing redis {url} refused the connection setup: {reason}",
                     url=self.url.redacted(), reason=reason)
        self._down_reason = reason
        return failure  # ClientService closes the connection and retries

    def _lost(self, protocol: Any) -> None:
        if self._protocol is protocol:
            self._protocol = None
            log.warn("backing redis {url} connection lost; reconnecting", url=self.url.redacted())


def first_line(text: str) -> str:
    """First line of an error message, trimmed: it goes into one-line replies and logs."""
    line = text.strip().splitlines()[0] if text.strip() else "unknown error"
    return line[:200]
