"""Backing connections for forwarded commands: request bytes out, reply frames out.

A forwarded command's reply goes to the client as the bytes Redis sent
(SPEC §7), so this connection never decodes a reply it passes on: it cuts
the stream into frames (protocol/frames.py) and hands each frame, as ``bytes``, to
the callback of the request it answers.  Replies come in request order on a
connection, so matching is a FIFO of pending calls, as in twemproxy and
Envoy's redis_proxy; one callback per call, no Deferred.

``done`` callbacks get either the reply frame (``bytes``, which may be an
error reply: Redis's errors are relayed unchanged) or a ``BackingError``
from backing/connection.py: ``BackingTimeout`` when this call's own ``redis_timeout``
ran out, ``BackingUnavailable`` when the connection could not be made,
refused its setup, or was lost.  Exactly one call of ``done`` per call.

Timeouts.  Each call has its own deadline on the injected clock, but there
is one timer per connection, and it is lazy: it is armed for the earliest
deadline and, when it fires, fails the calls that are due and re-arms for
the next.  A reply arriving does not touch the timer, so the common case
costs a float per call.  A call that timed out keeps its place in the FIFO:
its late reply is recognised and dropped, later calls keep their own
deadlines, and the connection stays up -- a slow Redis is not a broken one
(SPEC §9).  ``stalled`` is True from a timeout until Redis answers again,
for callers that want to fail fast meanwhile.

Connection set-up is pipelined in front of the first calls: ``HELLO 3``
(with AUTH) for a RESP3 connection, else ``AUTH``; ``SELECT`` for a db
other than 0.  Calls may be made before the connection is up; their bytes
wait and follow the set-up.  If the set-up is refused (wrong password, a
Redis without HELLO), every call fails as unavailable and the connection
closes.

A client's packet of commands, sent as it came, is one ``call_many``: one
pending entry for its commands, whose replies are handed over together,
with one deadline (as calls made at once have); a timeout or a loss fails
the commands not answered yet, and their late replies are dropped in place.

Push frames are not replies.  They go to ``on_push``, in stream order:

* RESP3 ``>`` frames (also behind an attribute): pub/sub messages,
  subscription confirmations, tracking invalidations;
* on a RESP2 connection in pub/sub mode, the arrays that start with a
  pub/sub kind (``message``, ``subscribe`` …) -- only then, because a RESP2
  reply to LRANGE may look the same;
* after MONITOR, the status lines that start with a timestamp.

A (P|S)(UN)SUBSCRIBE is called with ``confirms=<its lowercase name>`` and
``expect``, the number of confirmations Redis sends for it (one per channel
named; None for an UNSUBSCRIBE of everything: one per subscription of that
kind held when Redis runs it, or one when there is none).  Its first
``expect`` confirmations settle it together (``done`` gets them as one
piece of bytes, so a command the client pipelined behind it is answered
after all of them, as Redis does), further ones go to ``on_push``; an error
or ``+QUEUED`` settles it as any reply.  The connection tracks how
many subscriptions it holds from the counts in confirmations
(``subscribed``), so the caller knows when the client has left pub/sub.
A ``confirms=b"monitor"`` call turns on monitor mode once answered.
Not handled: subscriptions made inside MULTI/EXEC (their confirmations are
inside the EXEC reply), and CLIENT REPLY OFF/SKIP: a command Redis will not
answer must go through ``send`` (no pending call), or matching is lost.

The pool (``RelayPool``) is a few such connections for the unpinned
clients, per protocol (RESP2 and RESP3 connections are apart, so each
client gets frames in its own protocol).  Policy: each client is given a
lane when it first forwards (round robin over the pool) and keeps it, so a
client's commands run on one connection in its order -- SET then INCR from
one client must not race each other over two connections -- while
different clients spread over the pool.  A lane whose connection is lost
is reconnected on its next call, with a backoff (0.1 s doubling to 1 s)
during which calls fail fast as unavailable.  ``pinned()`` opens a
dedicated connection for one client (MULTI, blocking commands, pub/sub …),
which the caller closes when the client leaves.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Callable
from typing import Any

from twisted.internet.defer import Deferred, DeferredList
from twisted.internet.interfaces import IDelayedCall, IReactorTime, ITCPTransport
from twisted.internet.protocol import Protocol, connectionDone
from twisted.logger import Logger
from twisted.python.failure import Failure

from redisp.backing.connection import BackingError, BackingTimeout, BackingUnavailable, first_line
from redisp.backing.tls import OneProtocol, client_endpoint, describe
from redisp.config import RedisURL
from redisp.protocol.codec import encode_command
from redisp.protocol.frames import (
    ARRAY,
    ATTRIBUTE,
    PUSH,
    SIMPLE,
    FrameError,
    FrameScanner,
    decode,
    frame_kind,
)
from redisp.protocol.sending import can_send_now, send_now

__all__ = ["Done", "RelayProtocol", "RelayPool", "CONFIRMED"]

log = Logger()

#: what a call's callback gets: the reply frame, or why there is none
Done = Callable[[bytes | BackingError], None]

#: commands answered by pub/sub confirmations rather than a plain reply
CONFIRMED = frozenset((b"subscribe", b"psubscribe", b"ssubscribe",
                       b"unsubscribe", b"punsubscribe", b"sunsubscribe"))
_SHARD = frozenset((b"ssubscribe", b"sunsubscribe"))
_SUBSCRIBING = frozenset((b"subscribe", b"psubscribe", b"ssubscribe"))
#: which of RelayProtocol._names a confirmation is about
_NAME_KIND = {b"subscribe": 0, b"unsubscribe": 0, b"psubscribe": 1, b"punsubscribe": 1,
              b"ssubscribe": 2, b"sunsubscribe": 2}
_PUBSUB_KINDS = CONFIRMED | {b"message", b"pmessage", b"smessage"}
_DIGITS = frozenset(b"0123456789")


def _first_word(frame: bytes) -> bytes | None:
    """The first element of an aggregate frame, lowercase, when it is a
    string: the kind of a pub/sub frame, read without decoding the payload."""
    if frame[0] == ATTRIBUTE:
        value = decode(frame)
        first = value[0] if value and isinstance(value, list) else None
        return first.lower() if isinstance(first, bytes) else None
    eol = frame.index(b"\r\n")
    start = eol + 2
    if start >= len(frame):
        return None  # an empty aggregate
    kind = frame[start]
    end = frame.index(b"\r\n", start)
    if kind == 0x24:  # $
        size = int(frame[start + 1:end])
        return frame[end + 2:end + 2 + size].lower() if size >= 0 else None
    if kind == SIMPLE:
        return frame[start + 1:end].lower()
    return None


class _Call:
    """One request awaiting its reply; ``done`` is None once settled or timed out."""

    __slots__ = ("done", "deadline", "confirms", "expect", "frames")

    def __init__(self, done: Done | None, deadline: float, confirms: bytes | None,
                 expect: int | None = 1) -> None:
        self.done = done
        self.deadline = deadline
        self.confirms = confirms
        self.expect = expect  # confirmations still owed (None: not known yet)
        self.frames: list[bytes] | None = None  # confirmations received so far


class _Batch(_Call):
    """The pending calls of a packet of ``left`` commands, as one: ``done``
    gets the list of their replies (or of BackingErrors from where it failed)."""

    __slots__ = ("left",)

    def __init__(self, done: Callable[[list], None], deadline: float, count: int) -> None:
        super().__init__(done, deadline, None)  # type: ignore[arg-type]
        self.left = count
        self.frames = []

    def failed(self, error: BackingError) -> list:
        return self.frames + [error] * self.left  # type: ignore[operator]


def _fail(call: _Call, done: Done, error: BackingError) -> None:
    """``done`` of ``call`` (taken from it) with ``error``, whatever kind of call."""
    if call.__class__ is _Call:
        done(error)
    else:
        done(call.failed(error))  # type: ignore[attr-defined, arg-type]


class RelayProtocol(Protocol):
    """One backing connection relaying reply frames as bytes, pipelined.

    Make it, use ``call`` at once, and connect it with
    ``twisted.internet.endpoints.connectProtocol``; ``connect_failed`` is
    for that Deferred's errback (RelayPool does all of this).
    """

    def __init__(
        self,
        clock: IReactorTime,
        timeout: float,
        url: RedisURL | None = None,
        resp3: bool = False,
        db: int | None = None,
        on_push: Callable[[bytes], None] | None = None,
        on_lost: Callable[[RelayProtocol], None] | None = None,
        on_ready: Callable[[RelayProtocol], None] | None = None,
    ) -> None:
        self.clock = clock
        self.timeout = timeout
        self.url = url or RedisURL()
        self.resp3 = resp3
        self.db = self.url.db if db is None else db
        self.on_push = on_push
        self.on_lost = on_lost
        self.on_ready = on_ready
        self.ready = False  # set-up answered: Redis runs our calls
        self.lost = False  # connection failed or closed: calls fail at once
        self.stalled = False  # a call timed out and Redis has not answered since
        self.hello: Any = None  # the decoded HELLO 3 reply, for a RESP3 connection
        self.channels = 0  # channels and patterns subscribed, from confirmations
        self.shard_channels = 0
        # names subscribed, by kind (channel, pattern, shard channel): how
        # many confirmations an UNSUBSCRIBE of everything will bring
        self._names: tuple[set, set, set] = (set(), set(), set())
        self.monitoring = False
        self._pending: deque[_Call] = deque()
        self._unsent: list[bytes] | None = []  # None once the set-up has been written
        self._scanner = FrameScanner()
        self._timer: IDelayedCall | None = None
        self._timer_at = math.inf
        self._setup_left = 0
        self._setup = self._setup_done  # one bound method, compared by identity
        self._why_lost = "connection lost"
        self._watching = False  # pub/sub or monitor mode: look at every frame
        self._lost_waiters: list[Deferred] = []
        self._closing = False  # close() was called: no new calls
        self._blind = False  # send() before the connection was up
        self._close_on_connect = False  # closed before connecting, with send()s to deliver
        self.ever_ready = False
        self._direct = False  # plain TCP: call_many sends at once (protocol/sending.py)
        self._batched = 0  # commands of _Batch calls beyond one each (``waiting``)

    # -- calls ---------------------------------------------------------------------

    @property
    def subscribed(self) -> bool:
        """In pub/sub mode, as far as the confirmations tell."""
        return bool(self.channels or self.shard_channels)

    @property
    def waiting(self) -> int:
        """Calls sent (or to be sent) whose reply has not come yet."""
        return len(self._pending) + self._batched

    def call(self, request: bytes, done: Done, timeout: float | None = None,
             confirms: bytes | None = None, expect: int | None = 1) -> None:
        """Send ``request`` (one encoded command, as the client sent it or from
        ``encode_command``); ``done`` gets its reply frame or a BackingError, once.

        ``timeout`` overrides ``redis_timeout`` (a blocking command adds its
        own; ``math.inf`` for none); ``confirms``, ``expect``: see the module
        docstring.
        """
        if self.lost or self._closing:
            done(BackingUnavailable(f"backing redis unavailable ({self._why_lost})"))
            return
        deadline = self.clock.seconds() + (self.timeout if timeout is None else timeout)
        self._pending.append(_Call(done, deadline, confirms, expect))
        unsent = self._unsent
        if unsent is None:
            self.transport.write(request)
        else:
            unsent.append(request)
        if deadline < self._timer_at:
            self._arm(deadline)

    def call_many(self, request: bytes, count: int, done: Callable[[list], None]) -> None:
        """``call`` for ``request`` holding ``count`` commands (a client's
        packet, as it sent it): ``done`` gets the list of their ``count``
        replies, in order, as ``count`` calls would have had them (one
        deadline, as calls made at once; a timeout or a loss fails those
        not answered yet, and their late replies are dropped)."""
        if self.lost or self._closing:
            done([BackingUnavailable(f"backing redis unavailable ({self._why_lost})")] * count)
            return
        deadline = self.clock.seconds() + self.timeout
        self._pending.append(_Batch(done, deadline, count))
        self._batched += count - 1
        unsent = self._unsent
        if unsent is None:
            # at once rather than on the next reactor turn (protocol/sending.py): the
            # gate lets few packets out at a time, so each turn saved on the
            # way to Redis is throughput (bench/NOTES-perf.md, issue 12)
            if self._direct:
                send_now(self.transport, request)
            else:
                self.transport.write(request)
        else:
            unsent.append(request)
        if deadline < self._timer_at:
            self._arm(deadline)

    def send(self, request: bytes) -> None:
        """Send a command Redis will not answer (under CLIENT REPLY OFF/SKIP)."""
        if self.lost or self._closing:
            return
        if self._unsent is None:
            self.transport.write(request)
        else:
            self._unsent.append(request)
            self._blind = True

    def close(self) -> None:
        """Close the connection; calls still waiting fail as unavailable.
        For a pinned connection, this is what makes Redis drop its state.
        Calls made from now on fail at once."""
        self._why_lost = "connection closed"
        self._closing = True
        if self.lost:
            return
        if self.transport is not None:
            self.transport.loseConnection()
        elif self._blind:
            # not connected yet, and commands Redis will not answer wait to
            # go out (CLIENT REPLY OFF): they still go, then it closes
            self._close_on_connect = True
            for call in self._pending:
                done, call.done = call.done, None
                if done is not None:
                    _fail(call, done,
                          BackingUnavailable("backing redis unavailable (connection closed)"))
        else:
            self._lose("connection closed")

    # -- connection ----------------------------------------------------------------

    def when_lost(self) -> Deferred:
        """Fires (with None) once the connection is down, or at once if it is."""
        d: Deferred = Deferred()
        if self.lost:
            d.callback(None)
        else:
            self._lost_waiters.append(d)
        return d

    def connectionMade(self) -> None:
        if self.lost:  # closed before it was even connected
            self.transport.loseConnection()
            return
        if ITCPTransport.providedBy(self.transport):
            self.transport.setTcpNoDelay(True)  # pipelined requests must not wait for Nagle
            self._direct = can_send_now(self.transport)
        setup = self._setup_commands()
        self._setup_left = len(setup)
        deadline = self.clock.seconds() + self.timeout
        for _ in setup:
            self._pending.appendleft(_Call(self._setup, deadline, None))
        unsent, self._unsent = self._unsent or [], None
        self.transport.write(b"".join([encode_command(c) for c in setup] + unsent))
        if deadline < self._timer_at:
            self._arm(deadline)
        if self._close_on_connect:
            self.transport.loseConnection()
        elif not setup:
            self._became_ready()

    def connect_failed(self, failure: Failure) -> None:
        """The connection could not be made: every call fails as unavailable."""
        self._lose(first_line(failure.getErrorMessage()) or "connection failed")

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self._lose(describe(reason) or self._why_lost)  # TLS says why it closed

    def _setup_commands(self) -> list[tuple[bytes, ...]]:
        commands: list[tuple[bytes, ...]] = []
        auth = self.url.auth_command()
        if self.resp3:
            hello: tuple[bytes, ...] = (b"HELLO", b"3")
            if auth is not None:
                user = auth[1] if len(auth) == 3 else b"default"
                hello += (b"AUTH", user, auth[-1])
            commands.append(hello)
        elif auth is not None:
            commands.append(auth)
        if self.db:
            commands.append((b"SELECT", b"%d" % self.db))
        return commands

    def _setup_done(self, reply: bytes | BackingError) -> None:
        if isinstance(reply, BackingError):
            self._abort(f"set-up: {reply}")
            return
        if reply[:1] in (b"-", b"!"):
            text = decode(reply).message.decode("utf-8", "replace")
            # Redis's refusals never contain the password; still, one line only
            self._abort(f"backing redis refused the connection set-up: {first_line(text)}")
            return
        if self.resp3 and self.hello is None:
            self.hello = decode(reply)
        self._setup_left -= 1
        if not self._setup_left:
            self._became_ready()

    def _became_ready(self) -> None:
        self.ready = self.ever_ready = True
        if self.on_ready is not None:
            self.on_ready(self)

    def _abort(self, why: str) -> None:
        self._why_lost = why
        if self.transport is not None:
            self.transport.abortConnection()
        self._lose(why)

    def _lose(self, why: str) -> None:
        """Fail every waiting call, once; the connection is done for."""
        if self.lost:
            return
        self.lost = True
        self.ready = False
        self._why_lost = why
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None
        self._timer_at = math.inf
        self._unsent = None
        pending, self._pending = self._pending, deque()
        self._batched = 0
        # the owner hears first, so that callbacks find its state up to date
        if self.on_lost is not None:
            self.on_lost(self)
        error = BackingUnavailable(f"backing redis unavailable ({why})")
        for call in pending:
            done = call.done
            if done is not None and done is not self._setup:
                call.done = None
                _fail(call, done, error)
        waiters, self._lost_waiters = self._lost_waiters, []
        for d in waiters:
            d.callback(None)

    # -- replies -------------------------------------------------------------------

    def dataReceived(self, data: bytes) -> None:
        try:
            frames = self._scanner.feed(data)
        except FrameError as e:
            log.warn("backing redis sent a malformed reply: {error}", error=str(e))
            self._frames_received(e.frames)  # the good ones before the garbage
            self._abort(f"protocol error from backing redis: {e}")
            return
        if frames:
            self._frames_received(frames)

    def _frames_received(self, frames: list[bytes]) -> None:
        self.stalled = False
        pending = self._pending
        for frame in frames:
            if self.lost:
                return  # a callback closed us: the rest is nobody's
            kind = frame[0]
            if (kind == PUSH or kind == ATTRIBUTE or self._watching
                    or (pending and pending[0].confirms is not None)):
                if self._routed(frame, kind):
                    continue
            if not pending:
                self._abort("a reply nobody asked for (CLIENT REPLY OFF without send()?)")
                return
            call = pending[0]
            if call.__class__ is _Call:
                pending.popleft()
                if call.done is not None:
                    call.done(frame)
                continue
            # a packet's: its replies are handed over together
            call.frames.append(frame)  # type: ignore[union-attr]
            left = call.left = call.left - 1  # type: ignore[attr-defined]
            if left:
                self._batched -= 1
                continue
            pending.popleft()
            if call.done is not None:
                call.done(call.frames)  # type: ignore[arg-type]

    def _routed(self, frame: bytes, kind: int) -> bool:
        """Push frames (and subscription confirmations) go their own way;
        True when ``frame`` was one of those."""
        if kind == ATTRIBUTE:
            kind = frame_kind(frame)
        pending = self._pending
        if kind == PUSH:
            word = _first_word(frame)
        elif kind == ARRAY and not self.resp3 and (
                self.channels or self.shard_channels
                or (pending and pending[0].confirms in CONFIRMED)):
            word = _first_word(frame)
            if word not in _PUBSUB_KINDS:
                return False  # a plain reply (PING in pub/sub mode: "pong")
        elif kind == SIMPLE and self.monitoring and frame[1] in _DIGITS:
            self._push(frame)  # a MONITOR line: "+<timestamp> [db addr] ..."
            return True
        else:
            if (kind == SIMPLE and pending and pending[0].confirms == b"monitor"
                    and frame == b"+OK\r\n"):
                self.monitoring = True
            elif frame == b"+RESET\r\n":
                self.channels = self.shard_channels = 0
                self.monitoring = False
                for names in self._names:
                    names.clear()
            self._watching = bool(self.channels or self.shard_channels or self.monitoring)
            return False
        if word in CONFIRMED:
            value = decode(frame)
            names = self._names[_NAME_KIND[word]]
            call = pending[0] if pending and pending[0].confirms == word else None
            if call is not None and call.expect is None:
                call.expect = max(1, len(names))  # before this one is counted off
            name = value[1] if len(value) == 3 else None
            if name is not None:
                (names.add if word in _SUBSCRIBING else names.discard)(name)
            count = value[2] if len(value) == 3 else None
            if isinstance(count, int):
                if word in _SHARD:
                    self.shard_channels = count
                else:
                    self.channels = count
                self._watching = bool(self.channels or self.shard_channels or self.monitoring)
            if call is not None:
                if call.frames is None:
                    call.frames = []
                call.frames.append(frame)
                call.expect -= 1
                if call.expect <= 0:
                    pending.popleft()
                    if call.done is not None:
                        call.done(b"".join(call.frames))
                return True
        self._push(frame)
        return True

    def _push(self, frame: bytes) -> None:
        if self.on_push is not None:
            self.on_push(frame)
        else:
            log.debug("push frame with nobody to take it: {frame!r:.80}", frame=frame)

    # -- timeouts --------------------------------------------------------------------

    def _arm(self, deadline: float) -> None:
        self._timer_at = deadline
        delay = max(0.0, deadline - self.clock.seconds())
        if self._timer is not None and self._timer.active():
            self._timer.reset(delay)
        else:
            self._timer = self.clock.callLater(delay, self._expire)

    def _expire(self) -> None:
        self._timer = None
        self._timer_at = math.inf
        now = self.clock.seconds()
        due: list[_Call] = []
        next_deadline = math.inf
        for call in self._pending:
            if call.done is None:
                continue
            if call.deadline <= now:
                due.append(call)
            elif call.deadline < next_deadline:
                next_deadline = call.deadline
        if next_deadline < self._timer_at:
            self._arm(next_deadline)
        if not due:
            return
        if due[0].done is self._setup:
            # Redis never answered the set-up: nothing on this connection can be trusted
            self._abort(f"set-up timed out after {self.timeout:g}s")
            return
        self.stalled = True
        error = BackingTimeout(f"backing redis timed out after {self.timeout:g}s")
        for call in due:
            done, call.done = call.done, None
            if done is not None:  # (an earlier callback may have closed us)
                _fail(call, done, error)


class RelayPool:
    """A few pipelined connections for unpinned clients, and pinned ones on demand.

    See the module docstring for the lane policy.  ``size`` connections per
    protocol, opened on first use.
    """

    def __init__(
        self,
        url: RedisURL,
        timeout: float,
        reactor: Any,
        size: int = 2,
        connect: Callable[[RelayProtocol], Deferred] | None = None,
        on_ready: Callable[[RelayProtocol], None] | None = None,
        clock: IReactorTime | None = None,
    ) -> None:
        if size < 1:
            raise ValueError("a pool needs at least one connection")
        self.url = url
        self.timeout = timeout
        self.size = size
        self._reactor = reactor
        self._clock = clock or reactor  # timeouts and backoff; tests pass a task.Clock
        self._connect = connect or self._connect_tcp
        self._on_ready = on_ready
        self._lanes: dict[bool, list[RelayProtocol | None]] = {
            False: [None] * size, True: [None] * size}
        self._next_lane = 0
        self._retry_at = 0.0
        self._backoff = 0.0
        self._down_reason: str | None = None
        self._pinned: set[RelayProtocol] = set()
        self._stopped = False

    @property
    def pinned_count(self) -> int:
        return len(self._pinned)

    @property
    def up(self) -> bool:
        """Some pool connection is ready."""
        return any(p is not None and p.ready for lanes in self._lanes.values() for p in lanes)

    @property
    def stalled(self) -> bool:
        """A pool connection has a timed-out call and no answer since."""
        return any(p is not None and p.stalled for lanes in self._lanes.values() for p in lanes)

    def lane(self) -> int:
        """A lane for a new client, round robin; the client keeps it."""
        lane = self._next_lane
        self._next_lane = (lane + 1) % self.size
        return lane

    def call(self, lane: int, request: bytes, done: Done, resp3: bool = False,
             timeout: float | None = None) -> None:
        """Forward ``request`` on the client's lane, in the client's protocol."""
        connection = self._lanes[resp3][lane]
        if connection is None or connection.lost:
            connection = self._reconnect(lane, resp3)
            if connection is None:
                done(BackingUnavailable(f"backing redis unavailable ({self._down_reason})"))
                return
        connection.call(request, done, timeout)

    def call_many(self, lane: int, request: bytes, count: int,
                  done: Callable[[list], None], resp3: bool = False) -> None:
        """``call`` for a packet of ``count`` commands (``RelayProtocol.call_many``)."""
        connection = self._lanes[resp3][lane]
        if connection is None or connection.lost:
            connection = self._reconnect(lane, resp3)
            if connection is None:
                done([BackingUnavailable(f"backing redis unavailable ({self._down_reason})")]
                     * count)
                return
        connection.call_many(request, count, done)

    def connection(self, lane: int, resp3: bool = False) -> RelayProtocol | None:
        """The lane's connection, if any (for ``send`` and tests)."""
        return self._lanes[resp3][lane]

    def pinned(self, resp3: bool = False, db: int | None = None,
               on_push: Callable[[bytes], None] | None = None,
               on_lost: Callable[[RelayProtocol], None] | None = None) -> RelayProtocol:
        """A dedicated connection for one client, usable at once (calls wait
        for it to connect); the caller ``close()``s it when the client goes.
        ``on_lost`` hears when it goes down by itself (state lost)."""
        def lost(protocol: RelayProtocol) -> None:
            self._pinned.discard(protocol)
            if on_lost is not None:
                on_lost(protocol)

        protocol = RelayProtocol(self._clock, self.timeout, self.url, resp3, db,
                                 on_push=on_push, on_lost=lost)
        self._pinned.add(protocol)
        self._connect(protocol).addErrback(protocol.connect_failed)
        return protocol

    def drop_all(self, why: str) -> None:
        """Close every connection, pool and pinned, at once (the master
        moved, backing/sentinel.py): calls waiting on them fail as unavailable with
        ``why``, a pinned client holding state is hung up on as after a
        backing restart, and the next call on a lane reconnects without
        waiting out a backoff."""
        self._down_reason = None
        self._backoff = 0.0
        protocols = [p for lanes in self._lanes.values() for p in lanes if p is not None]
        for protocol in protocols + list(self._pinned):
            if not protocol.lost:
                protocol._abort(why)

    def stop(self) -> Deferred:
        """Close every connection, pool and pinned; fires when all are down."""
        self._stopped = True
        protocols = [p for lanes in self._lanes.values() for p in lanes if p is not None]
        protocols += self._pinned
        down = [p.when_lost() for p in protocols]
        for protocol in protocols:
            protocol.close()
        return DeferredList(down)

    def _reconnect(self, lane: int, resp3: bool) -> RelayProtocol | None:
        if self._stopped:
            self._down_reason = "redisp is stopping"
            return None
        if self._down_reason is not None and self._clock.seconds() < self._retry_at:
            return None  # fail fast until the backoff has passed
        protocol = RelayProtocol(self._clock, self.timeout, self.url, resp3,
                                 on_ready=self._ready, on_lost=self._lost)
        self._lanes[resp3][lane] = protocol
        self._connect(protocol).addErrback(self._connect_failed, protocol)
        return protocol

    def _ready(self, protocol: RelayProtocol) -> None:
        if self._down_reason is not None:
            log.info("backing redis {url} reachable again for forwarding",
                     url=self.url.redacted())
        self._down_reason = None
        self._backoff = 0.0
        if self._on_ready is not None:
            self._on_ready(protocol)

    def _lost(self, protocol: RelayProtocol) -> None:
        if not protocol.ever_ready and not self._stopped:
            # never got ready: the attempt failed (refused set-up, lost early)
            self._failed(protocol._why_lost)

    def _connect_failed(self, failure: Failure, protocol: RelayProtocol) -> None:
        protocol.connect_failed(failure)  # -> _lost -> _failed

    def _failed(self, reason: str) -> None:
        if self._down_reason is None:
            log.warn("backing redis {url} unavailable for forwarding: {reason}",
                     url=self.url.redacted(), reason=reason)
        self._down_reason = reason
        self._backoff = min(1.0, self._backoff * 2 or 0.1)
        self._retry_at = self._clock.seconds() + self._backoff

    def _connect_tcp(self, protocol: RelayProtocol) -> Deferred:
        # TCP, or TLS for rediss:// (up once the handshake is: a refused
        # certificate is a failed attempt, with its reason)
        endpoint = client_endpoint(self._reactor, self.url, self.timeout)
        return endpoint.connect(OneProtocol(protocol))
