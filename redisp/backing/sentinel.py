"""Redis Sentinel (SPEC §10): the master of ``redis+sentinel://…/service``,
asked of the Sentinels, confirmed with ``ROLE``, followed through failovers.

Every backing connection (the fetch connection, the relay pool's lanes and
pinned connections, the tracking connection) is made through one endpoint,
``SentinelMaster.endpoint()``, whose ``connect`` goes to the current master.
The master's address is cached: asking the Sentinels on every connect would
put a Sentinel round trip in front of every pinned client.  The cache is
kept honest three ways:

* every new connection asks ``ROLE`` itself (pipelined behind ``AUTH``,
  before the connection is handed over): an old master that came back as a
  replica, or a stale address, is refused on the spot instead of taking
  writes it would answer ``READONLY`` to;
* a connection that cannot be made, or is refused that way, has the
  Sentinels asked again at once, and is retried on the master they name;
* each Sentinel of the URL is subscribed to ``+switch-master``: the switch
  is known as soon as Sentinel makes it, not when the old master's clients
  are killed.  A subscription that is lost is made again, and each time it
  is made the Sentinels are asked again (a switch may have gone by).

When the master changes (a ``+switch-master`` for our service, or the
Sentinels naming another master than the cached one) the listeners hear of
it (``on_switch``): build_proxy flushes the cache, since the old master may
have lost writes the new one never saw, and drops every backing connection
so that each reconnects to the new master, tracking included.  A connection
being made to the old master when the switch comes is refused before it is
handed over (``generation``).

The URL's credentials are the master's; the Sentinels are asked with their
own (``sentinel_user``/``sentinel_password``, as their ``requirepass``),
or without AUTH.  ``rediss+sentinel://`` speaks TLS to the Sentinels and to
the master alike, with the ``redis_tls_*`` files.  The Sentinels the URL
does not name are learnt from those it does (``SENTINEL SENTINELS``) and
asked and watched as well.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from twisted.internet.defer import Deferred, DeferredList, inlineCallbacks, succeed
from twisted.internet.interfaces import IDelayedCall, IStreamClientEndpoint
from twisted.internet.protocol import Protocol, connectionDone
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from redisp.backing.connection import BackingError, first_line
from redisp.backing.relay import RelayProtocol
from redisp.backing.tls import ConnectFailure, OneProtocol, blocking_connection, client_endpoint
from redisp.config import RedisURL
from redisp.protocol.codec import encode_command
from redisp.protocol.frames import ErrorReply, FrameError, FrameScanner, as_map, decode

log = Logger()

Address = tuple[str, int]

#: the Sentinel channel announcing a new master:
#: ``<service> <old ip> <old port> <new ip> <new port>``
SWITCH_CHANNEL = b"+switch-master"

#: seconds between liveness PINGs on a Sentinel subscription (a Sentinel
#: that died silently would otherwise hide every later switch)
PING_INTERVAL = 1.0

#: Sentinels known at most, those of the URL and those they name together:
#: each is one subscription kept up
MAX_SENTINELS = 16

#: attempts of one ``connect``: the cached master, then the master the
#: Sentinels name, then once more if the master switched meanwhile
CONNECT_ATTEMPTS = 3

#: resubscribe to a lost Sentinel after 0.1 s, doubling up to this
MAX_BACKOFF = 1.0

#: seconds during which a master we switched away from is not taken back
#: from a Sentinel's answer (only from a ``+switch-master`` naming it): a
#: Sentinel that has not heard of the switch yet still names it, and after
#: SENTINEL FAILOVER it still answers ROLE as a master until Sentinel
#: converts it (~10 s later).  Sentinels tell each other of a switch in
#: their hello messages, every 2 s.
LEFT_GRACE = 5.0


class SentinelUnavailable(ConnectFailure):
    """No master could be had from the Sentinels; ``str()`` says why, in one line."""


class NotMaster(SentinelUnavailable):
    """The address answered, but not as the master (ROLE), or refused us."""


class _Moved(SentinelUnavailable):
    """The master switched while a connection to the old one was being made."""


def _reason(failure: Failure | BaseException) -> str:
    """Why a connection to a Sentinel or a master failed, short: it goes
    into ``backing redis unavailable (…)``."""
    error = failure.value if isinstance(failure, Failure) else failure
    text = str(error)
    if isinstance(error, BackingError):
        prefix = "backing redis unavailable ("
        if text.startswith(prefix) and text.endswith(")"):
            text = text[len(prefix):-1]
    elif isinstance(error, ConnectionRefusedError) or "refused" in text.lower():
        text = "connection refused"
    return first_line(text)


def _where(address: Address) -> str:
    return f"{address[0]}:{address[1]}"


class _Confirm(Protocol):
    """Stands in for the caller's protocol until the address has answered
    ``ROLE`` as the master (after ``AUTH``), then hands the connection over.

    Once handed over, reads and the close go straight to the caller's
    protocol (``dataReceived`` and ``connectionLost`` are rebound to its
    methods), so the check costs one round trip per connection and nothing
    per read.
    """

    _timer: IDelayedCall | None = None

    def __init__(self, factory: Any, url: RedisURL, address: Address, timeout: float,
                 clock: Any, current: Callable[[], bool]) -> None:
        self._factory = factory
        self._auth = url.auth_command()
        self._address = address
        self._timeout = timeout
        self._clock = clock
        self._current = current
        self._scanner = FrameScanner()
        self._frames: list[bytes] = []
        self._error: SentinelUnavailable | None = None
        self.tcp: Deferred | None = None
        self.done: Deferred = Deferred(self._cancel)

    def connectionMade(self) -> None:
        commands = [self._auth] if self._auth is not None else []
        commands.append((b"ROLE",))
        self.transport.write(b"".join(encode_command(c) for c in commands))
        self._timer = self._clock.callLater(self._timeout, self._too_slow)

    def dataReceived(self, data: bytes) -> None:
        try:
            self._frames += self._scanner.feed(data)
        except FrameError as e:
            self._refuse(NotMaster(f"{_where(self._address)}: protocol error ({e})"))
            return
        expected = 2 if self._auth is not None else 1
        if len(self._frames) < expected:
            return
        self._stop_timer()
        where = _where(self._address)
        for frame in self._frames:
            if frame[:1] == b"-":
                text = decode(frame).message.decode("utf-8", "replace")
                self._refuse(NotMaster(f"{where} refused us: {first_line(text)}"))
                return
        role = decode(self._frames[-1])
        kind = role[0] if isinstance(role, list) and role else None
        if kind != b"master":
            said = kind.decode("latin-1") if isinstance(kind, bytes) else "nothing usable"
            self._refuse(NotMaster(f"{where} is not the master (ROLE: {said})"))
            return
        if not self._current():
            self._refuse(_Moved(f"the master moved away from {where}"))
            return
        protocol = self._factory.buildProtocol(self.transport.getPeer())
        if protocol is None:
            self._refuse(NotMaster("refused by redisp's own factory"))
            return
        self.dataReceived = protocol.dataReceived  # type: ignore[method-assign]
        self.connectionLost = protocol.connectionLost  # type: ignore[method-assign]
        protocol.makeConnection(self.transport)
        self.done.callback(protocol)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self._stop_timer()
        if not self.done.called:
            error = self._error or NotMaster(
                f"{_where(self._address)}: connection lost before it answered ROLE")
            self.done.errback(error)

    def tcp_failed(self, failure: Failure) -> None:
        if not self.done.called:
            self.done.errback(NotMaster(f"{_where(self._address)}: {_reason(failure)}"))

    def _refuse(self, error: SentinelUnavailable) -> None:
        self._error = error
        self.transport.abortConnection()

    def _too_slow(self) -> None:
        self._timer = None
        self._refuse(NotMaster(f"{_where(self._address)}: no answer to ROLE within "
                               f"{self._timeout:g}s"))

    def _stop_timer(self) -> None:
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None

    def _cancel(self, _: Deferred) -> None:
        if self.transport is not None:
            self._error = NotMaster("cancelled")
            self.transport.abortConnection()
        elif self.tcp is not None:
            self.tcp.cancel()


@implementer(IStreamClientEndpoint)
class MasterEndpoint:
    """The endpoint every backing connection is made through: the current master."""

    def __init__(self, master: SentinelMaster) -> None:
        self._master = master

    def connect(self, factory: Any) -> Deferred:
        return self._master.connect(factory)


#: ``ask(address, argv, url)``: the decoded reply of one command sent on a
#: short connection to ``address`` set up for ``url`` (AUTH, SELECT), or a
#: failure (a Redis error reply comes as ``NotMaster``)
Ask = Callable[[Address, list[bytes], RedisURL], Deferred]


class SentinelMaster:
    """The current master of one Sentinel service, and how to connect to it.

    ``address`` is the cached master (None until first known); ``generation``
    counts its changes; ``failovers`` counts switches seen after the first.
    """

    def __init__(self, url: RedisURL, timeout: float, reactor: Any, clock: Any = None,
                 ask: Ask | None = None, connect_to: Callable[..., Deferred] | None = None
                 ) -> None:
        self.url = url
        self.service = url.service or ""
        self.timeout = timeout
        self._reactor = reactor
        self._clock = clock or reactor
        self._ask = ask or self._ask_redis
        self._open = connect_to or self._open_tcp
        self.sentinels: tuple[Address, ...] = url.seeds
        self._first = 0  # the Sentinel that answered last is asked first
        self.address: Address | None = None
        self.generation = 0
        self.failovers = 0
        self._waiters: list[Deferred] | None = None  # callers of the resolve in progress
        self._listeners: list[Callable[[Address | None, Address], None]] = []
        self._watches = [_Watch(self, address) for address in self.sentinels]
        #: masters switched away from -> when (see LEFT_GRACE)
        self._left: dict[Address, float] = {}
        self._problem: str | None = None
        self._stopped = False

    # -- life -----------------------------------------------------------------------

    def start(self) -> None:
        """Subscribe to ``+switch-master`` on every Sentinel (each asks for
        the master once subscribed)."""
        for watch in self._watches:
            watch.start()

    def stop(self) -> Deferred:
        self._stopped = True
        return DeferredList([watch.stop() for watch in self._watches])

    def on_switch(self, listener: Callable[[Address | None, Address], None]) -> None:
        """``listener(old, new)`` after every change of master (not the first one found)."""
        self._listeners.append(listener)

    def endpoint(self) -> MasterEndpoint:
        return MasterEndpoint(self)

    def connect_relay(self, protocol: RelayProtocol) -> Deferred:
        """RelayPool's ``connect``: one relay connection to the current master."""
        return self.connect(OneProtocol(protocol))

    def describe(self) -> str:
        """The topology line of INFO."""
        where = _where(self.address) if self.address is not None else "unknown"
        return f"sentinel {self.service} master {where}"

    def info(self) -> list[tuple[str, object]]:
        """The INFO ``# Proxy`` fields of the topology, ``topology`` first."""
        master = _where(self.address) if self.address is not None else "unknown"
        return [("topology", self.describe()), ("sentinel_master", master),
                ("sentinel_failovers", self.failovers)]

    def metric_families(self) -> Iterator[Metric]:
        """The /metrics families: the master named now, and switches seen."""
        current = GaugeMetricFamily(
            "redisp_sentinel_master", "the master Sentinel names now: 1, labelled with "
            "its address (no sample while it is unknown)", labels=["address"])
        if self.address is not None:
            current.add_metric([_where(self.address)], 1)
        yield current
        yield CounterMetricFamily(
            "redisp_sentinel_failovers", "master switches seen (+switch-master, or "
            "the Sentinels naming another master)", value=self.failovers)

    # -- the master -------------------------------------------------------------------

    def resolve(self) -> Deferred:
        """The master now, asked of the Sentinels and confirmed with ROLE;
        calls made while a round is on share it.  Fails with
        ``SentinelUnavailable`` saying what each Sentinel answered."""
        d: Deferred = Deferred()
        if self._waiters is not None:
            self._waiters.append(d)
            return d
        self._waiters = [d]
        self._round().addBoth(self._resolved)
        return d

    @inlineCallbacks
    def _round(self) -> Any:
        problems: list[str] = []
        refused: set[Address] = set()
        count = len(self.sentinels)
        service = self.service.encode()
        for i in range(count):
            index = (self._first + i) % count
            sentinel = self.sentinels[index]
            try:
                reply = yield self._ask(sentinel, [b"SENTINEL", b"GET-MASTER-ADDR-BY-NAME",
                                                   service], self.url.sentinel_at(*sentinel))
            except Exception as e:
                problems.append(f"Sentinel {_where(sentinel)}: {_reason(e)}")
                continue
            if not (isinstance(reply, list) and len(reply) == 2):
                problems.append(f"Sentinel {_where(sentinel)} knows no master "
                                f"{self.service!r}")
                continue
            try:
                master = (reply[0].decode(), int(reply[1]))
            except (AttributeError, ValueError, UnicodeDecodeError):
                problems.append(f"Sentinel {_where(sentinel)}: unreadable answer")
                continue
            if master in refused:
                continue
            left = self._left.get(master)
            if left is not None and self._clock.seconds() - left < LEFT_GRACE:
                problems.append(f"Sentinel {_where(sentinel)} still names the old master "
                                f"{_where(master)}")
                continue
            try:
                role = yield self._ask(master, [b"ROLE"], self.url.at(*master))
            except Exception as e:
                problems.append(f"master {_where(master)}: {_reason(e)}")
                refused.add(master)
                continue
            kind = role[0] if isinstance(role, list) and role else None
            if kind != b"master":
                said = kind.decode("latin-1") if isinstance(kind, bytes) else "?"
                problems.append(f"{_where(master)} is not the master (ROLE: {said})")
                refused.add(master)
                continue
            self._first = index
            return master
        raise SentinelUnavailable(f"no master {self.service!r} from the Sentinels: "
                                  + "; ".join(problems))

    def _resolved(self, result: Address | Failure) -> None:
        waiters, self._waiters = self._waiters or [], None
        if isinstance(result, Failure):
            problem = _reason(result)
            if problem != self._problem:
                log.warn("sentinel: {problem}", problem=problem)
            self._problem = problem
        else:
            self._problem = None
            self._found(result, "the Sentinels name it")
            self._discover(self.sentinels[self._first])
        for d in waiters:
            d.callback(result)

    def _discover(self, sentinel: Address) -> None:
        """Learn the other Sentinels of the service from one that answered
        (``SENTINEL SENTINELS``, as Redis's guidelines for Sentinel clients
        advise): each one found is asked in turn and watched for switches,
        so losing the Sentinels the URL names loses neither the master nor a
        failover."""
        if self._stopped or len(self.sentinels) >= MAX_SENTINELS:
            return
        d = self._ask(sentinel, [b"SENTINEL", b"SENTINELS", self.service.encode()],
                      self.url.sentinel_at(*sentinel))
        d.addCallbacks(lambda reply: self._discovered(reply, sentinel), lambda _: None)

    def _discovered(self, reply: Any, source: Address) -> None:
        if self._stopped or not isinstance(reply, list):
            return
        for entry in reply:
            fields = as_map(entry)
            if fields is None:
                continue
            try:
                address = (fields[b"ip"].decode(), int(fields[b"port"]))
            except (KeyError, AttributeError, ValueError, UnicodeDecodeError):
                continue
            if address in self.sentinels or len(self.sentinels) >= MAX_SENTINELS:
                continue
            self.sentinels += (address,)
            watch = _Watch(self, address)
            self._watches.append(watch)
            watch.start()
            log.info("sentinel: Sentinel {where} found (named by {source}); watching it too",
                     where=_where(address), source=_where(source))

    def _found(self, address: Address, why: str) -> None:
        old = self.address
        if address == old:
            return
        self.address = address
        self.generation += 1
        now = self._clock.seconds()
        self._left = {a: t for a, t in self._left.items()
                      if a != address and now - t < LEFT_GRACE}
        if old is not None:
            self._left[old] = now
        if old is None:
            log.info("sentinel: master {service!r} is {where} ({why})",
                     service=self.service, where=_where(address), why=why)
            return
        self.failovers += 1
        log.warn("sentinel: master {service!r} moved from {old} to {new} ({why}); cache "
                 "flushed, every backing connection goes to the new master",
                 service=self.service, old=_where(old), new=_where(address), why=why)
        for listener in self._listeners:
            listener(old, address)

    def switch_message(self, message: bytes, sentinel: Address) -> None:
        """A ``+switch-master`` message: ``<service> <old ip> <old port> <new ip> <new port>``."""
        parts = message.split()
        if len(parts) != 5 or parts[0] != self.service.encode():
            return
        try:
            new = (parts[3].decode(), int(parts[4]))
        except (ValueError, UnicodeDecodeError):
            return
        self._found(new, f"+switch-master from Sentinel {_where(sentinel)}")

    def check(self) -> None:
        """Ask the Sentinels again (a subscription was just made: a switch may
        have gone by unseen); a new master found switches."""
        self.resolve().addErrback(lambda _: None)  # logged in _resolved

    # -- connections -----------------------------------------------------------------------

    @inlineCallbacks
    def connect(self, factory: Any) -> Any:
        """A connection to the current master, confirmed by ROLE; on failure
        the Sentinels are asked again and the master they name is tried."""
        failed: Address | None = None
        error: Exception | None = None
        for _ in range(CONNECT_ATTEMPTS):
            address, generation = self.address, self.generation
            if address is None or address == failed:
                address = yield self.resolve()
                generation = self.generation
                if address == failed:
                    raise error
            try:
                protocol = yield self._open(address, factory, generation)
            except _Moved as e:
                error = e
                continue
            except Exception as e:
                failed, error = address, e
                continue
            return protocol
        raise error

    def _open_tcp(self, address: Address, factory: Any, generation: int) -> Deferred:
        confirm = _Confirm(factory, self.url, address, self.timeout, self._clock,
                           lambda: self.generation == generation)
        endpoint = client_endpoint(self._reactor, self.url.at(*address), self.timeout)
        confirm.tcp = endpoint.connect(OneProtocol(confirm))
        confirm.tcp.addErrback(confirm.tcp_failed)
        return confirm.done

    def _ask_redis(self, address: Address, argv: list[bytes], url: RedisURL) -> Deferred:
        protocol = RelayProtocol(self._clock, self.timeout, url.at(*address))
        d: Deferred = Deferred()

        def done(reply: bytes | BackingError) -> None:
            protocol.close()
            if isinstance(reply, BackingError):
                d.errback(reply)
                return
            value = decode(reply)
            if isinstance(value, ErrorReply):
                d.errback(NotMaster(first_line(value.message.decode("utf-8", "replace"))))
            else:
                d.callback(value)

        protocol.call(encode_command(argv), done)
        endpoint = client_endpoint(self._reactor, url.at(*address), self.timeout)
        endpoint.connect(OneProtocol(protocol)).addErrback(protocol.connect_failed)
        return d


class _Watch:
    """One Sentinel's ``+switch-master`` messages, on a subscription kept up
    (reconnected with a backoff, PINGed for life)."""

    def __init__(self, master: SentinelMaster, address: Address) -> None:
        self._master = master
        self.address = address
        self._clock = master._clock
        self._protocol: RelayProtocol | None = None
        self._call: IDelayedCall | None = None
        self._backoff = 0.0
        self._stopped = False
        self._troubled = False
        self.subscribed = False

    def start(self) -> None:
        self._connect()

    def stop(self) -> Deferred:
        self._stopped = True
        self._cancel()
        protocol = self._protocol
        if protocol is None:
            return succeed(None)
        lost = protocol.when_lost()
        protocol.close()
        return lost

    def _connect(self) -> None:
        self._call = None
        if self._stopped:
            return
        master = self._master
        url = master.url.sentinel_at(*self.address)
        protocol = RelayProtocol(self._clock, master.timeout, url, on_push=self._push,
                                 on_lost=self._lost)
        self._protocol = protocol
        protocol.call(encode_command([b"SUBSCRIBE", SWITCH_CHANNEL]),
                      lambda reply: self._subscribed(protocol, reply), confirms=b"subscribe")
        endpoint = client_endpoint(master._reactor, url, master.timeout)
        endpoint.connect(OneProtocol(protocol)).addErrback(protocol.connect_failed)

    def _subscribed(self, protocol: RelayProtocol, reply: bytes | BackingError) -> None:
        if isinstance(reply, BackingError):  # lost, or no answer in time
            protocol.close()  # -> _lost: subscribe again after a backoff
            return
        if reply[:1] == b"-":
            self._trouble(decode(reply).message.decode("utf-8", "replace"))
            protocol.close()
            return
        self.subscribed = True
        self._backoff = 0.0
        if self._troubled:
            log.info("sentinel: watching {where} for failovers again", where=_where(self.address))
        self._troubled = False
        self._ping_later(protocol)
        self._master.check()

    def _push(self, frame: bytes) -> None:
        value = decode(frame)
        if (isinstance(value, list) and len(value) == 3 and value[0] == b"message"
                and value[1] == SWITCH_CHANNEL and isinstance(value[2], bytes)):
            self._master.switch_message(value[2], self.address)

    def _ping_later(self, protocol: RelayProtocol) -> None:
        self._call = self._clock.callLater(PING_INTERVAL, self._ping, protocol)

    def _ping(self, protocol: RelayProtocol) -> None:
        self._call = None
        if protocol is not self._protocol or protocol.lost:
            return

        def pong(reply: bytes | BackingError) -> None:
            if protocol is not self._protocol or protocol.lost:
                return
            if isinstance(reply, BackingError):  # silent for a whole timeout: gone
                self._trouble(str(reply))
                protocol.close()
            else:
                self._ping_later(protocol)

        protocol.call(encode_command([b"PING"]), pong)

    def _lost(self, protocol: RelayProtocol) -> None:
        if protocol is not self._protocol:
            return
        self.subscribed = False
        self._cancel()
        if self._stopped:
            return
        self._trouble(_reason(Exception(protocol._why_lost)))
        self._backoff = min(MAX_BACKOFF, self._backoff * 2 or 0.1)
        self._call = self._clock.callLater(self._backoff, self._connect)

    def _trouble(self, why: str) -> None:
        if not self._troubled:
            log.warn("sentinel: cannot watch {where} for failovers: {why}; retrying",
                     where=_where(self.address), why=first_line(why))
        self._troubled = True

    def _cancel(self) -> None:
        if self._call is not None and self._call.active():
            self._call.cancel()
        self._call = None


# -- start-up ------------------------------------------------------------------------------

def blocking_master(url: RedisURL, timeout: float) -> Address | None:
    """The master the Sentinels name now, asked synchronously before the
    reactor runs (start-up checks), or None when none answers; with the
    Sentinels' own credentials and TLS, as every other connection to them."""
    service = (url.service or "").encode()
    for host, port in url.seeds:
        sentinel = url.sentinel_at(host, port)
        auth = sentinel.auth_command()
        request = encode_command([b"SENTINEL", b"GET-MASTER-ADDR-BY-NAME", service])
        try:
            with blocking_connection(sentinel, timeout) as s:
                s.settimeout(timeout)
                if auth is not None:
                    s.sendall(encode_command(list(auth)))
                s.sendall(request)
                scanner = FrameScanner()
                frames: list[bytes] = []
                while len(frames) < (2 if auth is not None else 1):
                    data = s.recv(65536)
                    if not data:
                        break
                    frames += scanner.feed(data)
        except (OSError, ValueError, FrameError):  # ssl.SSLError is an OSError
            continue
        value = decode(frames[-1]) if frames else None
        if isinstance(value, list) and len(value) == 2:
            try:
                return value[0].decode(), int(value[1])
            except (AttributeError, ValueError, UnicodeDecodeError):
                continue
    return None
