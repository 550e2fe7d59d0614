"""The RESP front door: bytes in, requests parsed, replies out in order.

Each connection runs its requests as they are parsed, many per packet when
the client pipelines, and answers strictly in request order from a queue of
pending replies: a reply that is ready at once (a cache hit) waits behind an
earlier one still fetching from the backing Redis.  When a whole packet's
replies are ready at once -- the common case under load -- they leave in one
``transport.write``.

What one client may cost is bounded (SPEC §9).  The connection is the
transport's producer: when the client stops reading and Twisted's send
buffer fills, the connection stops *dispatching* (parsed requests wait in
``_held``, unrun) as well as reading, and so it does when more than
``HIGH_WATER`` bytes of replies wait in redisp or more than ``MAX_PENDING``
replies are owed.  A reply larger than ``replies.LARGE`` is a ``Chunked``,
written ``replies.CHUNK`` bytes at a time as the socket drains, so one huge
MGET neither copies its values twice nor holds other clients while it is
sent.  Past ``max_client_buffer`` (its unfinished request, requests read but
not run, replies waiting here and bytes in the send buffer, together) the
client is disconnected, as Redis does past its output buffer limits.

Timeouts cost nothing per packet: one timer per connection, armed when there
is something to time (a request begun, a TLS handshake, ``client_timeout``),
finds out when it fires whether there was progress, and re-arms itself.
A connection's lifecycle is one field, ``_state`` (``Lifecycle``: open,
closing, closed, lost).  The usual path through ``dataReceived`` tests one
attribute, ``_detour``: True whenever the connection is in any unusual
condition (``RespProtocol._unusual``: not open, requests held, reading
blocked, an idle probe armed).
A client that disconnects takes its requests still waiting at the gate with
it (``gate.Owner``).

Before AUTH (a password set, the client not authenticated), the connection
is unusual too (``_w.preauth``): Redis's tighter limits hold
(``auth.UNAUTHENTICATED_ARGS``, ``auth.UNAUTHENTICATED_BULK``), and as Redis
parses one command, runs it, then parses the next, each packet is kept
unparsed and its requests parsed one at a time, each after the one before it
has run (``_more``): an AUTH lifts the limits for the requests after it in
the same packet, a failed one does not.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from enum import IntEnum
from functools import partial
from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import (
    IDelayedCall,
    IHandshakeListener,
    IPushProducer,
    IReactorTime,
    ITCPTransport,
)
from twisted.internet.protocol import Factory, Protocol, connectionDone
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from redisp.clients import ClientSlots
from redisp.commands.auth import DENIED, UNAUTHENTICATED_ARGS, UNAUTHENTICATED_BULK, Authenticator
from redisp.commands.client_list import ClientRegistry
from redisp.commands.dispatch import execute, execute_packet
from redisp.commands.local import get_answer
from redisp.commands.replies import CHUNK, Chunked, bulk_reply, get_replies, join_replies
from redisp.commands.session import HIT, MISS, OTHER, PROTOCOL_ERROR, Session
from redisp.config import Config
from redisp.core.gate import Owner
from redisp.metrics import Metrics
from redisp.protocol.codec import Encoder, LogLimiter, ProtocolError, RequestParser, bulk, error
from redisp.protocol.sending import TLS_TRANSPORTS, buffered, can_send_now, send_now, unbuffer
from redisp.routing.forwarding import Pending

log = Logger()

#: replies owed to one client before it is no longer read from ...
MAX_PENDING = 1024
#: ... and how few must remain before it is read from again
RESUME_PENDING = MAX_PENDING // 2
#: bytes of replies waiting in redisp for one client past which its requests
#: are no longer run (nor its socket read) until they have been sent
HIGH_WATER = 256 * 1024
#: requests run at a time from those held back
HELD_BATCH = 256
#: GETs of a packet looked up at a time, between high-water checks
GET_BATCH = 256
#: idle connections are checked this many times per ``client_timeout``
IDLE_CHECKS = 8
#: seconds between two log lines about clients disconnected for their buffers
OVERFLOW_LOG_INTERVAL = 10.0

MAX_CLIENTS_REPLY = b"-ERR max number of clients reached\r\n"
INTERNAL_ERROR_REPLY = error("ERR internal error")

DOOR = "resp"
_RESP_HIT = (DOOR, HIT)  # metrics keys, built once
_RESP_MISS = (DOOR, MISS)


class Lifecycle(IntEnum):
    """Where a connection is in its life; it only moves forward."""

    OPEN = 0  #: requests are read and run
    CLOSING = 1  #: QUIT, a protocol error, hang_up: no more requests; close once flushed
    CLOSED = 2  #: the transport is told to close (or refused at connectionMade)
    LOST = 3  #: gone: nothing more is sent or run


OPEN, CLOSING, CLOSED, LOST = Lifecycle  # one global lookup on the paths that test them


@implementer(IPushProducer, IHandshakeListener)
class RespProtocol(Protocol):
    """One client connection of the RESP door."""

    def __init__(self, factory: RespFactory, client_id: int) -> None:
        # Few attributes of its own, on purpose: past 29, CPython 3.11 gives
        # up its shared-key instance dicts and every attribute access on the
        # hot path gets slower (see bench/NOTES-perf.md, "Issue 8, RESP
        # door").  State that only the slow paths touch lives in _w.
        self.factory = factory
        config = factory.config
        self._metrics = factory.metrics
        self._reader = factory.reader
        self._owner = Owner()  # this client's requests waiting at the gate
        self._session = Session(client_id, factory.reader, factory.metrics, config, factory.clock)
        self._session.owner = self._owner
        self._session.auth = factory.auth
        factory.auth.admit(self._session)  # unauthenticated while a password is set
        forwarder = factory.forwarder
        if forwarder is not None:
            self._session.forwarder = forwarder
            self._session.lane = forwarder.pool.lane()
            self._session.push = self.push
            self._session.hang_up = self.hang_up
        self._session.kill = self._killed
        self._concurrency = config.concurrency  # packets of GETs up to this size: one gate entry
        self._parser = RequestParser(
            config.max_bulk_bytes, config.max_args, config.max_inline_bytes
        )
        # replies in request order; each slot is [encoded reply or None while owed]
        self._pending: deque[list[bytes | Chunked | None]] = deque()
        # replies ready to write, every one of them before anything pending
        self._out: list[bytes] = []
        # requests not run yet (the client is not reading its replies): parsed
        # requests, and keys of GETs (a tuple) from the GET-packet path
        self._held: deque[list[bytes] | tuple[bytes, ...] | ProtocolError] = deque()
        self._queued = 0  # bytes of ready replies waiting in _pending
        self._high = min(HIGH_WATER, config.max_client_buffer)
        self._state = OPEN
        # True whenever _unusual() is: set where one of its terms may have
        # become true, recomputed (and cleared) only by _update_flow
        self._detour = False
        # replies that settle now are written without asking: dispatching
        # (written at its end), or the factory's flush_later is due
        self._flush_coming = False
        # how replies are written, chosen once, at connectionMade
        self._send: Callable[[bytes], None] = self._write
        self._w = _Watch(config)
        self._session.unauthenticated = self._unauthenticated
        if self._session.user is None:
            self._unauthenticated()

    # -- connection ------------------------------------------------------------

    def connectionMade(self) -> None:
        if not self.factory.slots.acquire():
            # like Redis: say why, then hang up; the slot was never taken
            return self._refuse(MAX_CLIENTS_REPLY)
        self._w.admitted = True
        if self.factory.auth.refuses(self.transport.getPeer()):
            # protected mode (SPEC §8), as Redis: say why, then hang up
            return self._refuse(DENIED)
        session = self._session
        session.created = self.factory.clock.seconds()
        session.addresses = (self.transport.getPeer(), self.transport.getHost())
        session.clients = self.factory.clients
        session.clients.add(session)
        if ITCPTransport.providedBy(self.transport):
            # replies are written whole; never hold one back for Nagle
            self.transport.setTcpNoDelay(True)
            if can_send_now(self.transport):
                # sent at once when nothing is queued (protocol/sending.py).  Replies
                # settling later (misses) are sent once per reactor turn
                # through the factory's flush_later, so those of one turn
                # share a send (see bench/NOTES-perf.md, "What changed and why")
                self._send = partial(send_now, self.transport)
        unbuffer(self.transport)  # TLS: replies reach the cipher this turn (protocol/sending.py)
        self.transport.registerProducer(self, True)
        if self._w.client_timeout or self._w.request_timeout:
            now = self.factory.clock.seconds()
            if self._w.request_timeout and isinstance(self.transport, TLS_TRANSPORTS):
                # our connectionMade comes before the handshake: a client
                # that never finishes it sends nothing we would ever parse
                self._w.handshake_deadline = now + self._w.request_timeout
                self._arm(self._w.handshake_deadline, now)
            if self._w.client_timeout:
                self._w.idle_since = now
                self._probe()
                self._arm(now + self._w.client_timeout / IDLE_CHECKS, now)

    def _refuse(self, reply: bytes) -> None:
        """Say why, then hang up, before anything is read."""
        self._enter(CLOSED)
        self.transport.write(reply)
        self.transport.loseConnection()

    def _enter(self, state: Lifecycle) -> None:
        """Move the lifecycle on (never back); any state past OPEN is unusual."""
        if state > self._state:
            self._state = state
            self._detour = True

    def handshakeCompleted(self) -> None:
        """The TLS handshake is done (IHandshakeListener)."""
        self._w.handshake_deadline = None

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        # Replies still owed are dropped; their Deferreds settle into
        # _answered, which sees LOST and writes nothing.  Requests still
        # waiting at the gate are dropped unrun.
        self._forget()
        if self._w.admitted:
            self._w.admitted = False
            self.factory.slots.release()

    def _forget(self) -> None:
        """Nothing more is sent or run for this client."""
        self._enter(LOST)
        self._owner.gone = True
        self._pending.clear()
        self._out.clear()
        self._held.clear()
        self.factory.clients.remove(self._session)
        if self._session.forwarder is not None:
            self._session.forwarder.release(self._session)
        if self._w.timer is not None:
            self._w.timer.cancel()
            self._w.timer = None

    def _abort(self) -> None:
        """Drop the client now, whatever it is owed (as Redis frees a client)."""
        if self._state is LOST:
            return
        self._forget()
        self.transport.abortConnection()

    # -- requests ----------------------------------------------------------------

    def dataReceived(self, data: bytes) -> None:
        if self._detour and self._detoured(data):
            return
        parser = self._parser
        keys = parser.only_gets(data) if parser.idle and self._session.plain else None
        coming = self._flush_coming
        self._flush_coming = True
        try:
            if keys is not None:
                self._run_gets(keys)
            else:
                requests = None
                if self._session.forwarder is not None and parser.idle:
                    requests = parser.whole(data)
                    if requests is not None and self._forward_packet(requests, data):
                        requests = ()
                if requests is None:
                    requests = self._parse(data)
                ran = self._run(requests)
                if ran < len(requests) and self._state is OPEN:
                    self._hold(requests[ran:])
        finally:
            self._flush_coming = coming
        self._flush()
        if self._detour or len(self._pending) > MAX_PENDING:
            self._pump()

    def _detoured(self, data: bytes) -> bool:
        """The packet in an unusual state; True when it has been dealt with.

        Past OPEN: ignored.  Before AUTH: see ``_before_auth``.  Requests
        held back, or the client not reading: parsed and held, in order.
        Otherwise (an idle probe) on its way.
        """
        if self._state is not OPEN:
            return True
        self._w.probe = False  # input: the client is not idle
        self._update_flow()
        if self._w.preauth:
            self._before_auth(data)
            return True
        if not (self._held or self._w.blocked):
            return False
        self._hold(self._parse(data))
        if not self._over_limit():
            self._update_flow()
        return True

    def _parse(self, data: bytes, one: bool = False) -> list:
        """``feed`` the parser, keeping track of the request left unfinished:
        when it began (``request_timeout``) and a bound on its size."""
        requests = self._parser.feed(data, one)
        if self._parser.idle:
            self._w.partial = 0
        elif requests or not self._w.partial:  # the unfinished request began in data
            self._w.partial = len(data)
            if self._w.request_timeout:
                self._start_request_clock()
        else:
            self._w.partial += len(data)
            if self._over_limit():
                return []
        return requests

    # -- before AUTH ---------------------------------------------------------------

    def _unauthenticated(self) -> None:
        """The client must authenticate (a new connection, or RESET): Redis's
        limits before AUTH hold until it has.  Requests of a packet that RESET
        read already were parsed under the limits before it (README)."""
        self._w.preauth = True
        self._parser.tighten(UNAUTHENTICATED_ARGS, UNAUTHENTICATED_BULK)
        self._detour = True  # (_unusual: preauth)

    def _before_auth(self, data: bytes) -> None:
        """A packet before AUTH: kept unparsed, then parsed and run a request
        at a time (``_pump``, ``_more``), each parsed under the limits that
        the ones before it left, as in Redis.  A request begun in an earlier
        packet goes on being parsed (its count was checked then)."""
        parser = self._parser
        if not (parser.idle or parser.kept):
            self._hold(self._parse(data, True))
            self._w.kept = parser.kept
            self._pump()
            return
        parser.keep(data)
        self._w.kept = True
        began = not self._w.partial
        self._w.partial += len(data)  # a bound, as _parse keeps it
        self._pump()
        if self._state is OPEN and not parser.idle:  # a request left unfinished, or kept
            if began and self._w.request_timeout:
                self._start_request_clock()
            self._over_limit()

    def _more(self) -> bool:
        """Parse on in what the parser kept, after the requests before it
        have run: one request while the client is still unauthenticated, the
        rest at once after AUTH.  True if requests came of it (held)."""
        parser = self._parser
        requests = parser.rest(self._w.preauth)
        self._w.kept = parser.kept
        if parser.idle:
            self._w.partial = 0
        if not requests:
            return False
        self._hold(requests)
        return True

    # -- GETs ------------------------------------------------------------------------

    def _run_gets(self, keys: list[bytes]) -> None:
        """A packet of nothing but ``GET key`` requests (most of what clients
        send), run without the general dispatch.

        All hits while the gate is idle and nothing is owed: answered with no
        per-request call and one metrics update (packets of more than
        ``GET_BATCH`` keys: a batch at a time, until the replies pass the
        high-water mark).  Otherwise the keys go through the gate in groups of
        at most ``concurrency`` (one group, under load), each answered in one
        piece into its reply slot (``CachedReader.read_packet``).  No Deferred
        per miss (see bench/NOTES-perf.md, "Miss path and HTTP door").
        Groups stop too once their replies pass the high-water mark.  Keys
        left are held, first in line, as a tuple.
        """
        if not self._pending:
            if len(keys) == 1:  # -P 1: one dict lookup, no batch machinery
                lookup = self._reader.read(keys[0])
                if lookup is not None:
                    self._metrics.requests[_RESP_HIT] += 1
                    self._out.append(bulk(lookup[0]))
                    return
            elif len(keys) <= GET_BATCH:
                values = self._reader.cached(keys)
                if values is not None:
                    self._metrics.requests[_RESP_HIT] += len(values)
                    reply = get_replies(values)
                    if reply.__class__ is bytes:
                        self._out.append(reply)  # type: ignore[arg-type]
                    else:
                        self._queue(reply)
                    return
            else:
                keys = self._run_hits(keys)
                if not keys:
                    return
        read_packet = self._reader.read_packet
        encoder = self._session.encoder
        pending = self._pending
        owner = self._owner
        size = self._concurrency  # a packet larger than that goes in groups of it
        for start in range(0, len(keys), size):
            slot: list[bytes | Chunked | None] = [None]
            pending.append(slot)
            read_packet(keys[start:start + size], partial(self._read_packet, slot, encoder), owner)
            if self._queued > self._high or len(pending) > MAX_PENDING:
                self._hold_keys(keys[start + size:])
                return

    def _run_hits(self, keys: list[bytes]) -> list[bytes]:
        """The leading batches of a large packet of GETs that are all hits;
        returns the keys left for the gate (none once the replies pass the
        high-water mark: then the rest is held)."""
        cached = self._reader.cached
        produced = 0
        start = 0
        while start < len(keys):
            values = cached(keys[start:start + GET_BATCH])
            if values is None:
                return keys[start:]
            start += len(values)
            self._metrics.requests[_RESP_HIT] += len(values)
            reply = get_replies(values)
            if reply.__class__ is bytes:
                self._out.append(reply)  # type: ignore[arg-type]
                produced += len(reply)
            else:
                self._queue(reply)
            if produced + self._queued > self._high:
                self._hold_keys(keys[start:])
                return []
        return []

    def _hold_keys(self, keys: list[bytes]) -> None:
        """GETs not run yet go first in line (before anything held already)."""
        if keys:
            self._held.appendleft(tuple(keys))
            self._w.held_bytes += sum(map(len, keys)) + 20 * len(keys)  # ~ *2 $3 GET $n
            self._detour = True  # requests held

    def _hold(self, requests: list) -> None:
        """Parsed requests not run yet go last in line."""
        self._held.extend(requests)
        self._w.held_bytes += sum(
            sum(map(len, argv)) + 8 * len(argv) for argv in requests if argv.__class__ is list
        )
        self._detour = True  # requests held

    def _read_packet(
        self, slot: list[bytes | Chunked | None], encoder: Encoder, results: list, hits: int
    ) -> None:
        """The replies of a packet of GETs (``CachedReader.read_packet``), as one."""
        requests = self._metrics.requests
        try:
            reply: bytes | Chunked
            if all(map(bytes.__instancecheck__, results)):
                reply = get_replies(results)  # the common case: every key had a value
                values = len(results)
            else:
                replies: list[bytes | Chunked] = []
                values = 0
                for result in results:
                    if result.__class__ is bytes:
                        replies.append(bulk_reply(result))
                        values += 1
                    else:
                        lookup = (None, False) if result is None else result
                        answer, outcome = _get_reply(lookup, encoder)
                        replies.append(answer)
                        requests[DOOR, outcome] += 1
                reply = join_replies(replies)
            if hits:
                requests[_RESP_HIT] += hits
            if values > hits:
                requests[_RESP_MISS] += values - hits
        except Exception:  # it must not raise: it runs inside a fetch's settling
            log.failure("internal error answering a packet of RESP GETs")
            reply = INTERNAL_ERROR_REPLY * len(results)
            requests[DOOR, OTHER] += len(results)
        self._fill(slot, reply)

    def _run(self, requests: list) -> int:
        """Run parsed requests in order; a reply owed holds back every later one.

        Stops after the request whose reply passes the high-water mark, or
        that owes one reply too many, and returns how many requests ran: the
        caller holds the rest.
        """
        session = self._session
        pending = self._pending
        out = self._out
        count = self._metrics.request
        produced = 0  # bytes put in out
        high = self._high
        ran = 0
        for argv in requests:
            ran += 1
            if argv.__class__ is not list:
                self._protocol_error(argv)  # type: ignore[arg-type]
                break
            try:
                result = execute(session, argv)
            except Exception:
                log.failure("internal error in RESP command {command!r}", command=argv[0])
                result = (INTERNAL_ERROR_REPLY, OTHER)
            if result.__class__ is tuple:
                count(DOOR, result[1])
                reply = result[0]
                if pending or reply.__class__ is not bytes:
                    self._queue(reply)
                    if self._queued > high or len(pending) > MAX_PENDING:
                        break
                else:
                    out.append(reply)
                    produced += len(reply)
                    if produced > high:
                        break
            elif result.__class__ is Pending:  # forwarded: no Deferred (routing/forwarding.py)
                slot = [None]
                pending.append(slot)
                result.when(partial(self._forwarded, slot))  # type: ignore[union-attr]
                if len(pending) > MAX_PENDING or self._state is LOST:  # over its limit
                    break
            else:
                slot = [None]
                pending.append(slot)
                d: Deferred = result  # type: ignore[assignment]
                d.addCallbacks(self._answered, self._crashed, (slot,), None, (slot,))
                d.addErrback(self._log_failure)
                if len(pending) > MAX_PENDING or self._state is LOST:  # over its limit
                    break
            if session.closing:  # QUIT: later requests are not run, as in Redis
                self._enter(CLOSING)
                break
            if self._state is not OPEN:  # CLIENT KILL of itself (hang_up): nor after it
                break
        return ran

    def _forward_packet(self, requests: list, data: bytes) -> bool:
        """A packet of commands that are all forwarded, sent as one
        (``commands.execute_packet``) into one reply slot; False when it
        is not such a packet (nothing done: run it request by request)."""
        try:
            result = execute_packet(self._session, requests, data)
        except Exception:  # as _run answers a request that raised
            log.failure("internal error forwarding a packet of RESP commands")
            self._metrics.requests[DOOR, OTHER] += len(requests)
            self._queue(INTERNAL_ERROR_REPLY * len(requests))
            return True
        if result is None:
            return False
        slot: list[bytes | Chunked | None] = [None]
        self._pending.append(slot)
        result.when(partial(self._forwarded_packet, slot))
        return True

    def _forwarded_packet(self, slot: list, result: tuple[bytes, dict[str, int]]) -> None:
        requests = self._metrics.requests
        for outcome, count in result[1].items():
            requests[DOOR, outcome] += count
        self._fill(slot, result[0])

    def push(self, frame: bytes, owed: int = 0) -> None:
        """A frame Redis sent unasked (pub/sub message, MONITOR line,
        invalidation) on the client's pinned connection, ``owed`` of whose
        commands are still unanswered: it goes before their replies, which
        Redis sends after it (they are the last ``owed`` replies still
        owed), and after everything else."""
        if self._state is LOST:
            return
        pending = self._pending
        if not pending:
            self._out.append(frame)
            self._flush_soon()
            return
        slot: list[bytes | Chunked | None] = [None]
        i = len(pending)
        while owed and i:
            i -= 1
            if pending[i][0] is None:
                owed -= 1
        pending.insert(i, slot)
        # filled like any reply: a subscriber that does not read is bounded too
        self._fill(slot, frame)

    def _killed(self, itself: bool) -> None:
        """CLIENT KILL: a client killing itself gets its reply first, as in
        Redis; any other is dropped at once, whatever it is owed."""
        if itself:
            self.hang_up()
        else:
            self._abort()

    def hang_up(self) -> None:
        """Read no more requests; close once the replies owed are written.
        As if Redis had closed the client's connection: its pinned
        connection was lost, and the state with it (SUBSCRIBE, MULTI)."""
        if self._state is OPEN:
            self._enter(CLOSING)
            self._flush()

    def _protocol_error(self, problem: ProtocolError) -> None:
        """Answer the error after every earlier reply, then hang up (as Redis).

        Logged at most once a second across the door (``LogLimiter``), with
        the count of those not logged: any client can send garbage at will
        (the metrics count every one)."""
        self._metrics.request(DOOR, PROTOCOL_ERROR)
        factory = self.factory
        unlogged = factory.protocol_error_log.admit(factory.clock.seconds())
        if unlogged is not None:
            log.debug("RESP protocol error from {peer}: {problem}"
                      " ({unlogged} more since the last such line, not logged)",
                      peer=self.transport.getPeer(), problem=str(problem), unlogged=unlogged)
        reply = problem.reply
        if self._pending:
            self._queue(reply)
        else:
            self._out.append(reply)
        self._enter(CLOSING)

    def _queue(self, reply: bytes | Chunked) -> None:
        """A reply ready now that must wait in _pending (behind an owed one, or
        large)."""
        self._pending.append([reply])
        self._queued += len(reply)
        if self._queued > self._high:
            self._over_high()

    def _over_high(self) -> bool:
        """More than the high-water mark of replies waits here: an unusual
        condition (reading and running stop in _update_flow), and maybe past
        ``max_client_buffer``; True if the client was dropped for it."""
        self._detour = True
        return self._over_limit()

    def _answered(self, result: tuple[bytes | Chunked, str], slot: list) -> None:
        self._metrics.requests[DOOR, result[1]] += 1
        self._fill(slot, result[0])

    def _forwarded(self, slot: list, result: tuple[bytes, str]) -> None:
        self._metrics.requests[DOOR, result[1]] += 1
        self._fill(slot, result[0])

    def _fill(self, slot: list[bytes | Chunked | None], reply: bytes | Chunked) -> None:
        if self._state is LOST:
            return
        slot[0] = reply
        self._queued += len(reply)
        if self._queued > self._high and self._over_high():
            return
        if not self._flush_coming:  # _flush_soon, inlined: every late reply passes here
            self._flush_coming = True
            self.factory.flush_later(self)

    def _flush_soon(self) -> None:
        """A reply is ready outside dispatching: the replies settling in one
        reactor turn leave in one send, at its end."""
        if not self._flush_coming:
            self._flush_coming = True
            self.factory.flush_later(self)

    def flush_late(self) -> None:
        """Write the replies that settled after ``dataReceived`` (misses)."""
        self._flush_coming = False
        self._flush()
        if self._detour:
            self._pump()

    def _crashed(self, failure: Failure, slot: list[bytes | Chunked | None]) -> None:
        log.failure("internal error answering a RESP request", failure)
        self._answered((INTERNAL_ERROR_REPLY, OTHER), slot)

    def _log_failure(self, failure: Failure) -> None:
        log.failure("error while writing a RESP reply", failure)

    # -- replies out -------------------------------------------------------------

    def _flush(self) -> None:
        """Write every reply that is ready and has no owed reply before it,
        while the client keeps reading."""
        if self._state is LOST:
            return
        send = self._send
        pending = self._pending
        if pending and pending[0][0] is not None:
            self._flush_pending(send)
        out = self._out
        if out:
            send(out[0] if len(out) == 1 else b"".join(out))
            out.clear()
        if not pending and self._state is not OPEN:
            self._close()

    def _flush_pending(self, send: Callable[[bytes], None]) -> None:
        """Move ready replies from _pending to the transport, a ``CHUNK`` at a
        time, until one is owed or the transport is full."""
        pending = self._pending
        out = self._out
        size = 0
        while pending and not self._w.consumer_paused:
            reply = pending[0][0]
            if reply is None:
                break
            if reply.__class__ is bytes:
                pending.popleft()
                out.append(reply)  # type: ignore[arg-type]
                self._queued -= len(reply)
                size += len(reply)
                if size >= CHUNK:
                    send(b"".join(out))
                    out.clear()
                    size = 0
                continue
            if out:
                send(out[0] if len(out) == 1 else b"".join(out))
                out.clear()
                size = 0
            large: Chunked = reply  # type: ignore[assignment]
            # buffered writes, one chunk a time: the transport pauses us
            # after each (CHUNK is past its buffer size) until the client
            # has read it, and the reactor serves other clients meanwhile
            while large.left and not self._w.consumer_paused and self._state is not LOST:
                chunk = large.take(CHUNK)
                self._queued -= len(chunk)
                self.transport.write(chunk)
            if large.left or self._state is LOST:
                return
            pending.popleft()

    def _write(self, data: bytes) -> None:
        """``_send`` on any transport but plain TCP (TLS rewrites ``write``)."""
        self.transport.write(data)

    def _close(self) -> None:
        if self._state >= CLOSED:
            return
        self._enter(CLOSED)
        # a registered producer would keep the transport open after its
        # buffer is flushed (see FileDescriptor.loseConnection)
        self.transport.unregisterProducer()
        self.transport.loseConnection()

    # -- flow control -----------------------------------------------------------

    def _pump(self) -> None:
        """After a flush in an unusual state: run held requests while nothing
        blocks them, writing as they go; then pause or resume reading."""
        while True:
            self._update_flow()
            if self._w.blocked and self._over_limit():
                return
            if self._w.blocked or self._state is not OPEN:
                return
            if not self._held and not (self._w.kept and self._more()):
                return
            self._run_held()
            self._flush()

    def _run_held(self) -> None:
        """Run held requests up to the high-water mark, in order: a tuple of
        keys as a packet of GETs, the rest in batches; what is left stays
        first in line."""
        held = self._held
        coming = self._flush_coming
        self._flush_coming = True
        try:
            if held[0].__class__ is tuple:
                self._run_gets(list(held.popleft()))
            else:
                batch = []
                while held and held[0].__class__ is not tuple and len(batch) < HELD_BATCH:
                    batch.append(held.popleft())
                ran = self._run(batch)
                if ran < len(batch) and self._state is OPEN:
                    held.extendleft(reversed(batch[ran:]))
        finally:
            self._flush_coming = coming
        if self._state is not OPEN:
            held.clear()
        if not held:
            self._w.held_bytes = 0

    def _update_flow(self) -> None:
        """Recompute what blocks requests and reading, from the state now."""
        if self._w.preauth and self._session.user is not None:
            self._w.preauth = False  # AUTH succeeded: the proxy's own limits only
            self._parser.relax()
        count = len(self._pending)
        if self._w.backlogged:
            if count <= RESUME_PENDING:
                self._w.backlogged = False
        elif count > MAX_PENDING:
            self._w.backlogged = True
        self._w.blocked = blocked = (
            self._w.consumer_paused or self._w.backlogged or self._queued > self._high
        )
        self._detour = self._unusual()
        paused = blocked or bool(self._held)
        if paused != self._w.reading_paused and self._state < CLOSED:
            self._w.reading_paused = paused
            if paused:
                self.transport.pauseProducing()
            else:
                self.transport.resumeProducing()
                if self._w.partial and self._w.request_timeout:
                    # time spent not reading (the client not reading us)
                    # does not count against its unfinished request
                    self._start_request_clock()

    def pauseProducing(self) -> None:
        """The client is not reading its replies: stop running and reading its requests."""
        self._w.consumer_paused = True
        if not self._over_limit():
            self._update_flow()

    def resumeProducing(self) -> None:
        """The client has read everything written: go on writing and running."""
        self._w.consumer_paused = False
        self._w.probe = False  # output progress: not idle either
        self._flush()
        self._pump()

    def stopProducing(self) -> None:
        """The transport is going away; connectionLost does the cleanup."""

    # -- limits and timeouts ----------------------------------------------------------

    def _over_limit(self) -> bool:
        """Disconnect the client if what it has buffered here passes
        ``max_client_buffer``; True if it was."""
        size = self._w.partial + self._w.held_bytes + self._queued + buffered(self.transport)
        if size <= self._w.max_buffer or self._state is LOST:
            return False
        self.factory.overflowed(self.transport.getPeer(), size)
        self._abort()
        return True

    def _start_request_clock(self) -> None:
        now = self.factory.clock.seconds()
        self._w.partial_since = now
        self._arm(now + self._w.request_timeout, now)

    def _arm(self, when: float, now: float) -> None:
        """Have _check run at ``when`` at the latest."""
        timer = self._w.timer
        if timer is None:
            self._w.timer = self.factory.clock.callLater(max(0.0, when - now), self._check)
        elif timer.getTime() > when:
            timer.reset(max(0.0, when - now))

    def _check(self) -> None:
        """The connection's one timer: close it if a deadline has passed,
        else re-arm for the next one (none: the timer stays off until a
        request begins again)."""
        self._w.timer = None
        if self._state is LOST:  # (a connection closing after QUIT still counts: its
            return  # client may never read the last replies, and so never let go)
        now = self.factory.clock.seconds()
        wake = None
        deadline = self._w.handshake_deadline
        if deadline is not None:
            if now >= deadline:
                return self._expire("TLS handshake not completed within request_timeout")
            wake = deadline
        if self._w.partial and self._w.request_timeout and not self._w.reading_paused:
            deadline = self._w.partial_since + self._w.request_timeout
            if now >= deadline:
                return self._expire("request not completed within request_timeout")
            wake = deadline if wake is None else min(wake, deadline)
        if self._w.client_timeout:
            pending = self._pending
            if not self._w.probe or (pending and pending[0][0] is None):
                self._w.idle_since = now  # input, output, or waiting on Redis
            elif now - self._w.idle_since >= self._w.client_timeout:
                return self._expire("idle for client_timeout")
            self._probe()
            deadline = now + self._w.client_timeout / IDLE_CHECKS
            wake = deadline if wake is None else min(wake, deadline)
        if wake is not None:
            self._arm(wake, now)

    def _probe(self) -> None:
        """Arm the idle probe: the next input (or output progress) clears it;
        still armed at the next check, the client was idle meanwhile."""
        self._w.probe = self._detour = True

    def _unusual(self) -> bool:
        """What ``_detour`` stands for, in one place: the connection is past
        OPEN, holds requests not run, may not run more (``blocked``: the
        client not reading, too many replies owed, or more than ``_high``
        bytes of them queued), has an idle probe armed, or is not
        authenticated yet (``preauth``).  Each path that makes one of these
        true sets ``_detour`` (``_enter``, ``_hold``, ``_hold_keys``,
        ``_over_high``, ``_probe``, ``_unauthenticated``), so the hot path
        tests one attribute; only ``_update_flow``, which recomputes
        ``blocked`` and ``preauth``, clears it."""
        return bool(self._state is not OPEN or self._held or self._w.blocked or self._w.probe
                    or self._w.preauth)

    def _expire(self, why: str) -> None:
        log.debug("RESP client {peer} closed: {why}", peer=self.transport.getPeer(), why=why)
        self._abort()


class _Watch:
    """A connection's flow control, limits and timeouts: the state only its
    slow paths read."""

    __slots__ = (
        "admitted", "backlogged", "consumer_paused", "blocked", "reading_paused",
        "held_bytes", "max_buffer", "request_timeout", "client_timeout", "timer",
        "partial", "partial_since", "handshake_deadline", "probe", "idle_since",
        "preauth", "kept",
    )

    def __init__(self, config: Config) -> None:
        self.admitted = False  # holds a client slot, to give back once
        self.backlogged = False  # too many replies owed
        self.consumer_paused = False  # the client is not reading
        self.blocked = False  # either of those, or too many bytes queued: hold requests
        self.reading_paused = False
        self.held_bytes = 0  # bytes of the packets whose requests are all held
        self.max_buffer = config.max_client_buffer
        self.request_timeout = config.request_timeout
        self.client_timeout = config.client_timeout
        self.timer: IDelayedCall | None = None
        self.partial = 0  # bytes of the request begun and not finished (a bound)
        self.partial_since = 0.0  # when it began, or reading resumed
        self.handshake_deadline: float | None = None  # TLS: handshake not done by then
        self.probe = False  # idle probe armed: the next packet clears it
        self.idle_since = 0.0
        self.preauth = False  # not authenticated yet: requests parsed one at a time (_more)
        self.kept = False  # the parser keeps bytes not parsed yet (preauth)


def _get_reply(result: Any, encoder: Encoder) -> tuple[bytes, str]:
    """GET's reply for a Lookup or Failure; a bug becomes a logged internal error."""
    try:
        return get_answer(result, encoder)
    except Exception:
        log.failure("internal error answering a RESP GET")
        return INTERNAL_ERROR_REPLY, OTHER


def _address(peer: Any) -> str:
    host, port = getattr(peer, "host", None), getattr(peer, "port", None)
    return f"{host}:{port}" if host is not None else str(peer)


class RespFactory(Factory):
    """Builds the RESP door's connections; everything they share comes in here."""

    noisy = False  # no log line per connection

    def __init__(
        self,
        reader: Any,
        metrics: Metrics,
        slots: ClientSlots,
        config: Config,
        clock: IReactorTime,
        forwarder: Any = None,
        auth: Authenticator | None = None,
    ) -> None:
        self.forwarder = forwarder
        self.auth = auth if auth is not None else Authenticator.from_config(config, metrics)
        self.reader = reader
        self.metrics = metrics
        self.slots = slots
        self.config = config
        self.clock = clock
        self._last_id = 0
        self._late: list[RespProtocol] = []  # connections with replies to flush
        self._late_call: IDelayedCall | None = None
        self._overflow_logged: float | None = None  # when the last such line was written
        self._overflows = 0  # clients disconnected since, not logged
        self.protocol_error_log = LogLimiter()
        self.clients = ClientRegistry()  # for CLIENT LIST / INFO / KILL

    def overflowed(self, peer: Any, size: int) -> None:
        """A client passed ``max_client_buffer`` and is disconnected: one log
        line at most every ``OVERFLOW_LOG_INTERVAL`` seconds, however many
        clients a flood of them brings."""
        now = self.clock.seconds()
        last = self._overflow_logged
        if last is not None and now - last < OVERFLOW_LOG_INTERVAL:
            self._overflows += 1
            return
        self._overflow_logged = now
        suppressed, self._overflows = self._overflows, 0
        log.warn(
            "RESP client {peer} disconnected: {size} bytes buffered for it passed "
            "max_client_buffer ({limit}){more}",
            peer=_address(peer), size=size, limit=self.config.max_client_buffer,
            suppressed=suppressed,
            more=f"; {suppressed} more clients since the last such line" if suppressed else "",
        )

    def flush_later(self, protocol: RespProtocol) -> None:
        """Flush ``protocol``'s settled replies at the end of this reactor turn.

        A batch of misses settles many replies of one connection in one turn;
        one ``callLater(0)`` for all connections lets each write them in one
        send, without the epoll registration a buffered ``write`` costs
        (see bench/NOTES-perf.md, "Miss path and HTTP door").
        """
        self._late.append(protocol)
        if self._late_call is None:
            self._late_call = self.clock.callLater(0, self._flush_late)

    def _flush_late(self) -> None:
        self._late_call = None
        late, self._late = self._late, []
        for protocol in late:
            protocol.flush_late()

    def buildProtocol(self, addr: Any) -> RespProtocol:
        self._last_id += 1  # CLIENT ID / HELLO id: unique per door, from 1
        return RespProtocol(self, self._last_id)
