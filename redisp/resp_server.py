"""The RESP front door: bytes in, requests parsed, replies out in order.

Each connection runs its requests as they are parsed, many per packet when
the client pipelines, and answers strictly in request order from a queue of
pending replies: a reply that is ready at once (a cache hit) waits behind an
earlier one still fetching from the backing Redis.  When a whole packet's
replies are ready at once -- the common case under load -- they leave in one
``transport.write``.

The connection pauses reading when more than ``MAX_PENDING`` replies are
owed, and also when the client stops reading its replies (the connection is
registered as the transport's producer, so a full send buffer pauses it).
Either way the memory one client can pin is bounded, and a slow client
slows down only itself.  (A packet of GETs read as one gate entry owes one
reply slot holding all its replies; a packet is at most one read's worth of
bytes, so the bound stays.)
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from functools import partial
from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IDelayedCall, IPushProducer, IReactorTime, ITCPTransport
from twisted.internet.protocol import Factory, Protocol, connectionDone
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from redisp.clients import ClientSlots
from redisp.commands import HIT, MISS, OTHER, PROTOCOL_ERROR, Session, execute, get_answer
from redisp.config import Config
from redisp.metrics import Metrics
from redisp.resp import Encoder, LogLimiter, ProtocolError, RequestParser, bulk, bulks, error
from redisp.sending import can_send_now, send_now

log = Logger()

#: replies owed to one client before it is no longer read from ...
MAX_PENDING = 1024
#: ... and how few must remain before it is read from again
RESUME_PENDING = MAX_PENDING // 2

MAX_CLIENTS_REPLY = b"-ERR max number of clients reached\r\n"
INTERNAL_ERROR_REPLY = error("ERR internal error")

DOOR = "resp"
_RESP_HIT = (DOOR, HIT)  # metrics keys, built once
_RESP_MISS = (DOOR, MISS)


@implementer(IPushProducer)
class RespProtocol(Protocol):
    """One client connection of the RESP door."""

    def __init__(self, factory: RespFactory, client_id: int) -> None:
        self.factory = factory
        config = factory.config
        self._metrics = factory.metrics
        self._slots = factory.slots
        self._reader = factory.reader
        self._session = Session(client_id, factory.reader, factory.metrics, config, factory.clock)
        self._concurrency = config.concurrency  # packets of GETs up to this size: one gate entry
        self._parser = RequestParser(
            config.max_bulk_bytes, config.max_args, config.max_inline_bytes
        )
        # replies in request order; each slot is [encoded reply or None while owed]
        self._pending: deque[list[bytes | None]] = deque()
        # replies ready to write, every one of them before anything pending
        self._out: list[bytes] = []
        self._dispatching = False  # inside dataReceived: write once, at its end
        self._admitted = False  # holds a client slot, to give back once
        self._closing = False  # QUIT or protocol error: no more requests, close when flushed
        self._closed = False
        self._lost = False
        self._backlogged = False  # paused because too many replies are owed
        self._consumer_paused = False  # paused because the client is not reading
        self._reading_paused = False
        self._direct = False  # see _send
        self._flush_due = False  # a late reply is ready; the factory flushes at turn's end

    # -- connection ------------------------------------------------------------

    def connectionMade(self) -> None:
        if not self._slots.acquire():
            # like Redis: say why, then hang up; the slot was never taken
            self._closing = self._closed = True
            self.transport.write(MAX_CLIENTS_REPLY)
            self.transport.loseConnection()
            return
        self._admitted = True
        if ITCPTransport.providedBy(self.transport):
            # replies are written whole; never hold one back for Nagle
            self.transport.setTcpNoDelay(True)
            self._direct = can_send_now(self.transport)
        self.transport.registerProducer(self, True)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        # Replies still owed are dropped; their Deferreds settle into
        # _answered, which sees _lost and writes nothing.
        self._lost = True
        self._pending.clear()
        self._out.clear()
        if self._admitted:
            self._admitted = False
            self._slots.release()

    # -- requests ----------------------------------------------------------------

    def dataReceived(self, data: bytes) -> None:
        if self._closing:
            return
        parser = self._parser
        keys = parser.only_gets(data) if parser.idle else None
        self._dispatching = True
        try:
            if keys is not None:
                self._run_gets(keys)
            else:
                self._run(parser.feed(data))
        finally:
            self._dispatching = False
        self._flush(self._send)
        if not self._backlogged and len(self._pending) > MAX_PENDING:
            self._backlogged = True
            self._update_reading()

    def _run_gets(self, keys: list[bytes]) -> None:
        """A packet of nothing but ``GET key`` requests (most of what clients
        send), run without the general dispatch.

        All hits while the gate is idle and nothing is owed: answered with no
        per-request call and one metrics update.  Otherwise the keys go
        through the gate in groups of at most ``concurrency`` (one group, under
        load), each answered in one piece into its reply slot
        (``CachedReader.read_packet``).  No Deferred per miss (bench/profile
        WORKLOAD=miss: Deferred callback chains were the largest share once
        misses were batched).
        """
        if not self._pending:
            if len(keys) == 1:  # -P 1: one dict lookup, no batch machinery
                lookup = self._reader.read(keys[0])
                if lookup is not None:
                    self._metrics.requests[_RESP_HIT] += 1
                    self._out.append(bulk(lookup[0]))
                    return
            else:
                values = self._reader.cached(keys)
                if values is not None:
                    self._metrics.requests[_RESP_HIT] += len(values)
                    self._out.append(bulks(values))
                    return
        read_packet = self._reader.read_packet
        encoder = self._session.encoder
        pending = self._pending
        size = self._concurrency  # a packet larger than that goes in groups of it
        for start in range(0, len(keys), size):
            slot: list[bytes | None] = [None]
            pending.append(slot)
            read_packet(keys[start:start + size], partial(self._read_packet, slot, encoder))

    def _read_packet(
        self, slot: list[bytes | None], encoder: Encoder, results: list, hits: int
    ) -> None:
        """The replies of a packet of GETs (``CachedReader.read_packet``), as one."""
        requests = self._metrics.requests
        try:
            if all(map(bytes.__instancecheck__, results)):
                reply = bulks(results)  # the common case: every key had a value
                values = len(results)
            else:
                replies = []
                values = 0
                for result in results:
                    if result.__class__ is bytes:
                        replies.append(bulk(result))
                        values += 1
                    else:
                        lookup = (None, False) if result is None else result
                        answer, outcome = _get_reply(lookup, encoder)
                        replies.append(answer)
                        requests[DOOR, outcome] += 1
                reply = b"".join(replies)
            if hits:
                requests[_RESP_HIT] += hits
            if values > hits:
                requests[_RESP_MISS] += values - hits
        except Exception:  # it must not raise: it runs inside a fetch's settling
            log.failure("internal error answering a packet of RESP GETs")
            reply = INTERNAL_ERROR_REPLY * len(results)
            requests[DOOR, OTHER] += len(results)
        self._fill(slot, reply)

    def _run(self, requests: list) -> None:
        """Run parsed requests in order; a reply owed holds back every later one."""
        session = self._session
        pending = self._pending
        out = self._out
        count = self._metrics.request
        for argv in requests:
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
                if pending:
                    pending.append([result[0]])
                else:
                    out.append(result[0])
            else:
                slot: list[bytes | None] = [None]
                pending.append(slot)
                d: Deferred = result  # type: ignore[assignment]
                d.addCallbacks(self._answered, self._crashed, (slot,), None, (slot,))
                d.addErrback(self._log_failure)
            if session.closing:  # QUIT: later requests are not run, as in Redis
                self._closing = True
                break

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
            self._pending.append([reply])
        else:
            self._out.append(reply)
        self._closing = True

    def _answered(self, result: tuple[bytes, str], slot: list[bytes | None]) -> None:
        self._metrics.requests[DOOR, result[1]] += 1
        self._fill(slot, result[0])

    def _fill(self, slot: list[bytes | None], reply: bytes) -> None:
        slot[0] = reply
        if not (self._dispatching or self._flush_due):
            # the replies settling in one reactor turn leave in one send
            self._flush_due = True
            self.factory.flush_later(self)

    def flush_late(self) -> None:
        """Write the replies that settled after ``dataReceived`` (misses)."""
        self._flush_due = False
        self._flush(self._send)

    def _crashed(self, failure: Failure, slot: list[bytes | None]) -> None:
        log.failure("internal error answering a RESP request", failure)
        self._answered((INTERNAL_ERROR_REPLY, OTHER), slot)

    def _log_failure(self, failure: Failure) -> None:
        log.failure("error while writing a RESP reply", failure)

    def _flush(self, send: Callable[[bytes], None]) -> None:
        """Write every reply that is ready and has no owed reply before it."""
        if self._lost:
            return
        pending = self._pending
        out = self._out
        while pending and pending[0][0] is not None:
            out.append(pending.popleft()[0])  # type: ignore[arg-type]
        if out:
            send(out[0] if len(out) == 1 else b"".join(out))
            out.clear()
        if pending:
            if self._backlogged and len(pending) <= RESUME_PENDING:
                self._backlogged = False
                self._update_reading()
        elif self._closing:
            self._close()
        elif self._backlogged:
            self._backlogged = False
            self._update_reading()

    def _send(self, data: bytes) -> None:
        """``transport.write(data)``, sent at once when nothing is queued
        (sending.py).  Replies settling later (misses) come here once per
        reactor turn through the factory's ``flush_later``, so those of one
        turn share a send (one send per late reply made the miss path ~20%
        slower, bench/profile PROFILER=cprofile WORKLOAD=miss).
        """
        if self._direct:
            send_now(self.transport, data)
        else:
            self.transport.write(data)

    def _close(self) -> None:
        if self._closed:
            return
        self._closed = True
        # a registered producer would keep the transport open after its
        # buffer is flushed (see FileDescriptor.loseConnection)
        self.transport.unregisterProducer()
        self.transport.loseConnection()

    # -- flow control -----------------------------------------------------------

    def _update_reading(self) -> None:
        paused = self._backlogged or self._consumer_paused
        if paused != self._reading_paused and not (self._lost or self._closed):
            self._reading_paused = paused
            if paused:
                self.transport.pauseProducing()
            else:
                self.transport.resumeProducing()

    def pauseProducing(self) -> None:
        """The client is not reading its replies: stop reading its requests."""
        self._consumer_paused = True
        self._update_reading()

    def resumeProducing(self) -> None:
        self._consumer_paused = False
        self._update_reading()

    def stopProducing(self) -> None:
        """The transport is going away; connectionLost does the cleanup."""


def _get_reply(result: Any, encoder: Encoder) -> tuple[bytes, str]:
    """GET's reply for a Lookup or Failure; a bug becomes a logged internal error."""
    try:
        return get_answer(result, encoder)
    except Exception:
        log.failure("internal error answering a RESP GET")
        return INTERNAL_ERROR_REPLY, OTHER


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
    ) -> None:
        self.reader = reader
        self.metrics = metrics
        self.slots = slots
        self.config = config
        self.clock = clock
        self._last_id = 0
        self._late: list[RespProtocol] = []  # connections with replies to flush
        self._late_call: IDelayedCall | None = None
        self.protocol_error_log = LogLimiter()

    def flush_later(self, protocol: RespProtocol) -> None:
        """Flush ``protocol``'s settled replies at the end of this reactor turn.

        A batch of misses settles many replies of one connection in one turn;
        one ``callLater(0)`` for all connections lets each write them in one
        send, without the epoll registration a buffered ``write`` costs
        (bench/cpu_per_request WORKLOAD=miss, see bench/NOTES-perf.md).
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
