"""Forwarding: every command redisp does not answer itself goes to the backing (SPEC §7).

A request the RESP door does not answer locally comes here and takes one of
three routes, decided in ``Forwarder.forward`` and nowhere else:

* **refused** -- in ``deny_commands``, or not read-only under ``forward:
  read``, or anything under ``forward: none``;
* **shared** -- sent on the client's lane of the relay pool (backing/relay.py),
  through the request gate like a GET, its reply frame relayed unchanged;
* **pinned** -- a command that puts state on the connection (MULTI, WATCH,
  blocking commands, (S|P)SUBSCRIBE, MONITOR, SELECT of another db, CLIENT
  TRACKING/CACHING/REPLY/NO-EVICT/NO-TOUCH) gives the client a backing
  connection of its own (``Pin``), and every later command of that client
  goes there until the state ends.

A pin is let go when its state has ended *and* no command routed to it is
still owed (one may wait at the gate behind EXEC), and its first command
waits until the client's commands sent on the pool before it are answered:
Redis runs a client's commands in the order it sent them, across the two
connections too (SET then WATCH).  A pin lost by itself while holding state
(backing restart, CLIENT KILL) hangs up on the client, as Redis would have:
a subscriber must notice, and a MULTI must not go on one command at a time.
A client that leaves has its pin closed, and its forwarded commands still
at the gate are dropped (SPEC §4).

Writes drop what they touch.  Which argv entries are keys, and which of them
a command may modify, comes from the backing's own ``COMMAND`` reply
(routing/command_table.py), read when the pool first connects and again whenever a
pool connection comes back; where key specs cannot say, ``COMMAND
GETKEYSANDFLAGS`` asks the backing, while the command itself goes out in
its place in the client's order (``_AskedKeys``).  The keys are dropped from the
cache, and every fetch of them in flight is poisoned (``CachedReader.
invalidate``), when the write's reply arrives and before it is handed to the
client: a fetch that read the old value cannot be stored after the client
has seen its write acknowledged.  Commands that change keys they do not name
(FLUSHDB, FLUSHALL, SWAPDB, a script declaring no keys) flush the cache.
Inside MULTI the writes are collected and applied when EXEC answers.

Read-your-writes on one connection: while a client has forwarded commands
in flight (from ``forward`` on, waiting for the table or the gate included)
its GETs are forwarded too (``Session.forwarding``), so a GET pipelined
behind a SET sees the SET, as on Redis.

Not followed: a HELLO that changes the protocol while the client is pinned
(the pin keeps the protocol it was opened with), commands pipelined across
a protocol-changing HELLO (the two protocols use different pool
connections, so they may run out of order), and subscriptions made inside
MULTI (backing/relay.py does not see them: the pin is let go after EXEC).

A packet of commands (``forward_packet``): when every command of what a
client wrote in one read is one that would take the shared route above --
known to the table, not refused, neither pinning nor blocking, its written
keys known without asking the backing, the client unpinned, one server --
the packet goes as a whole: one gate entry for its commands, the client's
bytes relayed as it sent them (``RequestParser.whole`` proved them
canonical: what ``encode_command`` would send), one relay call for its
commands, and one reply once the last frame has come, the writes' keys
dropped first.  What the client, Redis, the cache and the
metrics see is what the command-by-command route gives
(tests/test_forward_packets.py checks it on random packets and cuts); only
the gate differs: the packet waits until it has a token for each command.

In front of a Redis Cluster a router (routing/cluster.py) is the pool: a
shared command goes to ``router.route`` with its argv and table entry, a
pinned one to ``ClusterPin.call_keyed``, and they choose the node; the
rest of this module is the same for one server and for a cluster (the one
server's path pays one ``is None`` test per command for it).

The gate: shared and pinned commands pass it as GETs do (SPEC §4), with the
two exceptions SPEC §7 names: a blocking command waits on its pinned
connection outside the gate, and a subscribed client's messages flow outside
it (pushes go straight to the client).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from functools import partial
from typing import Any

from twisted.internet.defer import Deferred
from twisted.logger import Logger

from redisp.backing.connection import BackingError, BackingTimeout, BackingUnavailable, first_line
from redisp.backing.relay import CONFIRMED, RelayPool, RelayProtocol
from redisp.clients import ClientSlots
from redisp.config import Config
from redisp.metrics import Metrics
from redisp.protocol.codec import encode_command, error, parse_integer
from redisp.protocol.frames import ErrorReply, decode
from redisp.routing.command_table import (
    FLUSH,
    CommandInfo,
    CommandTable,
    getkeys_request,
    keys_from_getkeys,
)

log = Logger()

#: outcome labels of forwarded commands (metrics)
OK_OUTCOME = "ok"
ERROR_OUTCOME = "error"  # Redis answered with an error reply
FAILED_OUTCOME = "backing_error"  # unreachable or timed out
REFUSED_OUTCOME = "refused"  # deny_commands or forward mode

#: a reply for the RESP door: (encoded reply, request outcome)
Reply = tuple[bytes, str]

#: commands that pin a client by their name alone (the rest: ``_blocks``, SELECT n).
#: (P|S)UNSUBSCRIBE too, when not subscribed: its RESP3 reply is a push frame,
#: which a pool connection could not tell from a reply
_PINNING = frozenset((b"multi", b"watch", b"subscribe", b"psubscribe", b"ssubscribe",
                      b"unsubscribe", b"punsubscribe", b"sunsubscribe", b"monitor"))
#: CLIENT subcommands that put state on the connection
_PINNING_CLIENT = frozenset((b"tracking", b"caching", b"reply", b"no-evict", b"no-touch"))
#: the confirmations a (un)subscribe command answers with (backing/relay.py's ``confirms``)
_CONFIRMS = {b"subscribe": b"subscribe", b"psubscribe": b"psubscribe",
             b"ssubscribe": b"ssubscribe", b"unsubscribe": b"unsubscribe",
             b"punsubscribe": b"punsubscribe", b"sunsubscribe": b"sunsubscribe",
             b"monitor": b"monitor"}
_NULLS = (b"*-1\r\n", b"_\r\n")
#: never in a packet of forwarded commands: they change the connection
#: (SELECT n pins; RESET, HELLO, AUTH, QUIT are redisp's own anyway)
_NOT_SIMPLE = frozenset((b"select", b"client", b"command", b"reset", b"hello", b"auth",
                         b"quit", b"exec", b"discard", b"unwatch"))
#: at most this many spellings of command names keep their metrics label (``_count``)
_MAX_LABELS = 1024
#: a pinned connection would pass max_clients (Redis's own wording)
MAX_CLIENTS_ERROR = error("ERR max number of clients reached")


class Pin:
    """A client's own backing connection, and the state that keeps it."""

    connection: RelayProtocol

    def __init__(self, db: int) -> None:
        self.db = db
        #: the client's commands routed here and not answered yet (some may
        #: still wait at the gate): the pin is not let go while any is owed
        self.owed = 0
        #: sends held back until the client's commands on the shared pool,
        #: sent before it was pinned, are answered (see ``Forwarder._call``)
        self.parked: list[Callable[[], None]] = []
        self.multi = False
        self.watching = False
        self.sticky = False  # CLIENT TRACKING/CACHING/… : kept until RESET or disconnect
        self.reply_off = False  # CLIENT REPLY OFF: Redis answers nothing
        self.skip_next = False  # CLIENT REPLY SKIP: Redis does not answer the next one
        self.blocking = 0  # blocking calls in flight (they do not hold the gate)
        self.queued: list[Any] = []  # invalidations of the commands queued in MULTI

    def holds_state(self, default_db: int) -> bool:
        c = self.connection
        return (self.multi or self.watching or self.sticky or self.reply_off
                or self.skip_next or c.subscribed or c.monitoring or self.db != default_db)


class Pending:
    """A forwarded command's reply to come, as ``(reply, outcome)``.

    Not a Deferred: the RESP door forwards most of what clients write, and
    a Deferred per command with its callback chain was the largest share of
    a forwarded SET's cost (bench/forward_micro.py).  It has one owner, the
    caller of ``Forwarder.forward``, which says once, with ``when``, what
    gets the reply; a reply settled before that is kept until then.  Code
    that speaks Deferreds wraps it with ``as_deferred``.
    """

    __slots__ = ("then", "reply", "pin", "session", "gated")

    def __init__(self) -> None:
        self.then: Callable[[Reply], None] | None = None
        self.reply: Reply | None = None
        self.pin: Pin | None = None  # routed to a pin: settling counts it off (_pin_settled)
        self.session: Any = None
        self.gated = False  # holds a gate token: settling gives it back

    def when(self, then: Callable[[Reply], None]) -> None:
        """``then(reply)`` once settled (now, if it is)."""
        if self.reply is not None:
            then(self.reply)
        else:
            self.then = then

    def _settled(self, reply: Reply) -> None:
        if self.then is None:
            self.reply = reply
        else:
            self.then(reply)


def as_deferred(result: Any) -> Any:
    """``result`` (a reply, a Deferred, or a ``Pending``) as something a
    Deferred callback may return: a Pending becomes a Deferred."""
    if result.__class__ is not Pending:
        return result
    d: Deferred = Deferred()
    result.when(d.callback)
    return d


class Forwarder:
    """Sends the commands redisp does not answer itself to the backing Redis."""

    def __init__(self, config: Config, reactor: Any, reader: Any, gate: Any,
                 metrics: Metrics, pool: RelayPool | None = None,
                 slots: ClientSlots | None = None, backing: Any = None,
                 connect: Callable[[RelayProtocol], Deferred] | None = None,
                 router: Any = None) -> None:
        self.config = config
        self.mode = config.forward
        self.deny = frozenset(name.lower().encode() for name in config.deny_commands)
        self._reactor = reactor
        self._reader = reader
        self._gate = gate
        self._metrics = metrics
        self._default_db = config.redis.db
        self._backing = backing  # its state says when the backing stopped answering
        # the counts live in metrics, so this shares the doors' max_clients
        self._slots = slots or ClientSlots(config.max_clients, metrics)
        #: clients with commands in flight on the shared pool -> how many
        self._pooled: dict[Any, int] = {}
        #: in front of a cluster (cluster_routing.ClusterRouter): it is the
        #: pool too, and each command goes where its keys live; None for one server
        self._router = router
        if router is not None:
            router.on_ready = self._pool_ready
            self.pool = router
        else:
            self.pool = pool or RelayPool(config.redis, config.redis_timeout, reactor,
                                          connect=connect, on_ready=self._pool_ready)
        self.table: CommandTable | None = None
        #: a command's name as sent -> its metrics label, for the names the
        #: table knows (emptied when the table is read again)
        self._labels: dict[bytes, str] = {}
        #: a command's name as sent -> how a packet of forwarded commands
        #: takes it (``_Simple``), or None when it never can (emptied with _labels)
        self._simple: dict[bytes, _Simple | None] = {}
        self._loading = False
        self._table_waiters: list[Callable[[CommandTable | BackingError], None]] = []

    # -- the command table --------------------------------------------------------

    def start(self) -> None:
        if self.mode != "none":
            self._load_table()

    def stop(self) -> Deferred:
        return self.pool.stop()

    def _pool_ready(self, connection: RelayProtocol) -> None:
        """A pool connection came (back): the backing may have changed
        (restart, upgrade, MODULE LOAD), so its table is read again."""
        if self.table is not None and not self._loading:
            self._load_table()

    def _load_table(self) -> None:
        if self._loading:
            return
        self._loading = True
        self.pool.call(0, encode_command([b"COMMAND"]), self._table_read)

    def _table_read(self, frame: bytes | BackingError) -> None:
        self._loading = False
        result: CommandTable | BackingError
        if isinstance(frame, BackingError):
            result = frame
        else:
            try:
                result = CommandTable.from_command_reply(decode(frame))
            except (ValueError, TypeError, IndexError) as e:
                log.warn("cannot read the backing's COMMAND reply: {e}", e=first_line(str(e)))
                result = BackingUnavailable("backing redis unavailable (unreadable COMMAND reply)")
            else:
                self.table = result
                self._labels = {}
                self._simple = {}
        waiters, self._table_waiters = self._table_waiters, []
        for waiter in waiters:
            waiter(result)

    def _with_table(self, then: Callable[[CommandTable | BackingError], None]) -> None:
        """``then(table)`` now if it is known, else once it has been read."""
        if self.table is not None:
            then(self.table)
            return
        self._table_waiters.append(then)
        self._load_table()

    # -- the route of one request --------------------------------------------------

    def refusal(self, argv: list[bytes], info: CommandInfo | None) -> bytes | None:
        """The error reply for a command redisp will not forward, or None."""
        name = argv[0].lower()
        if name in self.deny:
            return error(b"ERR command '" + _quoted(name) + b"' is not allowed through redisp")
        if (self.mode == "read" and info is not None and not info.readonly
                and name != b"command"):  # the table itself: clients read it at connect
            return error(b"ERR redisp forwards read-only commands only: '" + _quoted(name) + b"'")
        return None

    def forward(self, session: Any, argv: list[bytes]) -> Pending:
        """The reply to ``argv`` from the backing, as ``(frame, outcome)``.

        ``session.forwarding`` counts the request from here until its reply:
        a GET the client sends meanwhile follows it to the backing instead
        of being answered from the cache before it (read-your-writes on one
        connection), even while it still waits for the table or the gate.
        """
        session.forwarding += 1  # back down once settled (_pool_done, _pin_settled, _early)
        result = Pending()
        # the protocol the client speaks now: a HELLO it sends next must not
        # change the reply to this (it may wait for the table or the gate)
        resp3 = session.encoder.version == 3
        table = self.table
        if table is not None:
            self._route(session, argv, table, result, resp3)
        else:
            self._with_table(lambda table: self._route(session, argv, table, result, resp3))
        return result

    def _route(self, session: Any, argv: list[bytes], table: CommandTable | BackingError,
               result: Pending, resp3: bool) -> None:
        if session.gone:  # it left while the table was read: nothing to pin or send
            _early(session, result, (b"", "other"))
            return
        if isinstance(table, BackingError):
            session.forwarding -= 1
            self._answer(result, argv, table)
            return
        info = table.lookup(argv)
        refused = self.refusal(argv, info)
        if refused is not None:
            self._count(argv, REFUSED_OUTCOME)
            _early(session, result, (refused, "bad_request"))
            return
        blocks = _blocks(argv, info) if info is not None and info.blocking else 0.0
        pin = session.pin
        if pin is None and (blocks or _pins(argv, info, self._default_db)):
            if not self._slots.acquire_pinned():
                # SPEC §7: pinned connections count toward max_clients
                self._count(argv, REFUSED_OUTCOME)
                _early(session, result, (MAX_CLIENTS_ERROR, "backing_error"))
                return
            pin = session.pin = self._pin(session, resp3)
        if pin is None:  # settled by _pool_done, called where its reply is given
            pooled = self._pooled
            pooled[session] = pooled.get(session, 0) + 1
        else:
            pin.owed += 1
            result.pin = pin
            result.session = session
        if pin is not None and (blocks or pin.blocking):
            # SPEC §7: a blocking command waits outside the gate; so do the
            # commands behind it on its connection (holding a token there
            # would stall every client under concurrency 1)
            self._send(session, pin, argv, info, result, resp3, blocks)
        else:
            self._gate.enter(self._admitted, session, pin, argv, info, result, resp3, blocks)

    # -- a packet of forwarded commands ------------------------------------------------

    def forward_packet(self, session: Any, requests: list[list[bytes]],
                       data: bytes) -> Pending | None:
        """``forward`` for a whole packet of commands at once, or None (and
        nothing done) unless each of them would take the plain shared route:
        known to the table, not refused, not pinning or blocking, its keys
        known without asking the backing, the client unpinned, one server.

        ``data`` is the packet as the client sent it, in canonical form
        (``RequestParser.whole``), hence byte for byte what ``encode_command``
        would send for ``requests``: it is relayed as it came.  One gate
        entry, one relay call (``RelayProtocol.call_many``), one reply: the
        frames joined, settled once the last has come, after the writes' keys
        were dropped (each applied as ``_answered`` applies it).  The reply
        is ``(bytes, {outcome: count})``.  Why: bench/NOTES-perf.md, "Issue
        12: a packet of forwarded commands".
        """
        table = self.table
        count = len(requests)
        if (table is None or self._router is not None or session.pin is not None
                or session.gone or count > self._gate.concurrency):
            return None
        simple = self._simple
        infos: list[_Simple] = []
        invalidations: list[Any] = []
        for argv in requests:
            entry = simple.get(argv[0], False)
            if entry is False:
                entry = self._classify(argv[0], table)
            if entry is None:
                return None
            arity = entry.arity  # (CommandInfo.arity_ok, inlined)
            if len(argv) != arity if arity >= 0 else len(argv) < -arity:
                invalidation: Any = []  # Redis refuses it
            elif entry.fixed is not None:
                invalidation = entry.fixed
            else:
                invalidation = entry.info.invalidation(argv)
                if invalidation is None:
                    return None  # movable keys: only the backing can say
            infos.append(entry)
            invalidations.append(invalidation)
        session.forwarding += count
        pooled = self._pooled
        pooled[session] = pooled.get(session, 0) + count
        result = Pending()
        packet = _Packet(session, requests, infos, invalidations, data, result,
                         session.encoder.version == 3)
        self._gate.enter_many(count, self._packet_admitted, packet)
        return result

    def _classify(self, name: bytes, table: CommandTable) -> _Simple | None:
        lowered = name.lower()
        info = table.commands.get(lowered)
        entry = None
        if (info is not None and not info.subcommands and not info.blocking
                and lowered not in _PINNING and lowered not in _NOT_SIMPLE
                and self.refusal([name], info) is None):
            fixed = None
            single = info.single_key
            if (single and single < abs(info.arity) and not info.script
                    and not info.keyspace_wide):
                # one key at a fixed place: what it invalidates depends on
                # nothing else (for an argv of the right arity)
                fixed = info.invalidation([name] + [b"k"] * (abs(info.arity) - 1))
            entry = _Simple(info, lowered.decode("latin-1"), fixed)
        if len(self._simple) < _MAX_LABELS:  # (clients choose the spelling)
            self._simple[name] = entry
        return entry

    def _packet_admitted(self, packet: _Packet) -> None:
        session = packet.session
        count = len(packet.requests)
        if session.gone:
            # SPEC §4: work for a client that has left is dropped at the gate
            self._pool_done(session, count)
            self._gate.leave(count)
            packet.result._settled((b"", {"other": count}))
            return
        if self._stalled():
            # SPEC §9: fail fast while the backing is stalled (see _call)
            self._packet_answered(packet, [BackingTimeout(
                f"backing redis timed out after {self.config.redis_timeout:g}s")] * count)
            return
        self.pool.call_many(session.lane, packet.data, count,
                            partial(self._packet_answered, packet), resp3=packet.resp3)

    def _packet_answered(self, packet: _Packet, frames: list[Any]) -> None:
        """Every reply of the packet came: ``_answered`` for each, in order,
        with one settling."""
        counts = self._metrics.forwarded
        invalidate = self._reader.invalidate
        dropped = failed = 0
        for i, (argv, invalidation, entry, frame) in enumerate(
                zip(packet.requests, packet.invalidations, packet.infos, frames)):
            if frame.__class__ is bytes:
                if invalidation:
                    if invalidation is FLUSH:
                        self._invalidate(argv, invalidation)
                    else:  # argv indexes (_invalidate, inlined)
                        for at in invalidation:
                            invalidate(argv[at])
                        dropped += len(invalidation)
                counts[entry.error if frame[:1] in (b"-", b"!") else entry.ok] += 1
                continue
            failed += 1
            if frame.kind == "timeout":
                # (a timed-out write may still be applied: drop its keys too)
                self._invalidate(argv, invalidation)
                if frame.__class__ is BackingTimeout and self._backing is not None:
                    self._backing.suspect()
            counts[entry.label, FAILED_OUTCOME] += 1
            frames[i] = error("ERR " + str(frame))
        if dropped:
            self._metrics.write_invalidations += dropped
        count = len(frames)
        self._pool_done(packet.session, count)
        if not failed:
            outcomes = {"forwarded": count}
        elif failed == count:
            outcomes = {"backing_error": count}
        else:
            outcomes = {"forwarded": count - failed, "backing_error": failed}
        # the waiting packets go to Redis before this one's reply goes to its
        # client (Gate.leave_now); under concurrency 1, after (SPEC §4)
        gate = self._gate
        if gate.concurrency == 1:
            packet.result._settled((b"".join(frames), outcomes))
            gate.leave_now(count)
            return
        gate.leave_now(count)
        packet.result._settled((b"".join(frames), outcomes))

    def _pin(self, session: Any, resp3: bool) -> Pin:
        pin = Pin(self._default_db)
        pin.connection = self.pool.pinned(
            resp3=resp3, db=self._default_db,
            on_push=lambda frame: session.push(frame, pin.owed),
            on_lost=lambda _: self._pin_lost(session, pin))
        return pin

    def _admitted(self, session: Any, pin: Pin | None, argv: list[bytes],
                  info: CommandInfo | None, result: Pending, resp3: bool,
                  blocks: float) -> None:
        result.gated = True
        if session.gone:
            # SPEC §4: work for a client that has left is dropped at the gate
            if pin is None:
                self._pool_done(session)
            self._settle(result, (b"", "other"))
            return
        self._send(session, pin, argv, info, result, resp3, blocks)

    def _settle(self, result: Pending, reply: Reply) -> None:
        """Every reply of a routed command ends here: its pin counted off,
        its gate token given back, then the reply handed over."""
        if result.pin is not None:
            self._pin_settled(result.session, result.pin)
        if result.gated:
            self._gate.leave()
        result._settled(reply)

    def _send(self, session: Any, pin: Pin | None, argv: list[bytes],
              info: CommandInfo | None, result: Pending, resp3: bool, blocks: float) -> None:
        invalidation = _invalidation(argv, info)
        if invalidation is None:
            # only the backing can say which keys (movable keys): it is asked
            # on the pool while the command itself goes out now, in its order
            asked = _AskedKeys(info)  # type: ignore[arg-type]
            self.pool.call(session.lane, encode_command(getkeys_request(argv)), asked.got)
            invalidation = asked
        self._call(session, pin, argv, info, invalidation, result, resp3, blocks)

    def _call(self, session: Any, pin: Pin | None, argv: list[bytes],
              info: CommandInfo | None, invalidation: Any, result: Pending,
              resp3: bool, blocks: float) -> None:
        request = encode_command(argv)
        name = argv[0].lower()

        def done(frame: bytes | BackingError) -> None:
            if blocking:
                pin.blocking -= 1  # type: ignore[union-attr]
            if invalidation.__class__ is _AskedKeys:
                invalidation.then(lambda found: self._answered(
                    session, result, argv, name, pin, info, found, frame))
            else:
                self._answered(session, result, argv, name, pin, info, invalidation, frame)

        blocking = False
        if pin is None:
            if self._router is None and self._stalled():
                # SPEC §9: after a call timed out, and until the backing answers
                # again, fail fast instead of each command waiting out the timeout
                # (in front of a cluster each master times out on its own: one
                # stalled master must not fail the commands meant for the others)
                done(BackingTimeout(
                    f"backing redis timed out after {self.config.redis_timeout:g}s"))
                return
            if self._router is None:
                self.pool.call(session.lane, request, done, resp3=resp3)
            else:
                self._router.route(session.lane, argv, info, request, done, resp3)
            return
        connection = pin.connection
        mode = _reply_mode(argv)
        if name == b"reset" and not pin.skip_next:
            silent = False  # RESET answers even under CLIENT REPLY OFF
        else:
            silent = (pin.reply_off and mode != b"on") or pin.skip_next or mode in (b"off", b"skip")
        if silent:
            # CLIENT REPLY OFF/SKIP: Redis answers nothing, so nothing is
            # awaited or relayed; SKIP silences itself and the next command
            pin.skip_next = mode == b"skip"
            if mode == b"off":
                pin.reply_off = True
            elif name == b"reset":
                pin.reply_off = False
            self._pinned_send(session, pin, lambda: connection.send(request))
            if invalidation.__class__ is _AskedKeys:
                invalidation.then(lambda found: self._invalidate(argv, found))
            else:
                self._invalidate(argv, invalidation)
            self._count(argv, OK_OUTCOME)
            self._settle(result, (b"", "forwarded"))
            return
        blocking = bool(blocks)
        if blocking:
            pin.blocking += 1
            timeout = self.config.redis_timeout + blocks
        else:
            timeout = None
        confirms = _CONFIRMS.get(name)
        expect = (len(argv) - 1 or None) if confirms in CONFIRMED else 1
        if self._router is None:
            self._pinned_send(session, pin, lambda: connection.call(
                request, done, timeout, confirms, expect))
        else:
            self._pinned_send(session, pin, lambda: connection.call_keyed(
                argv, info, request, done, timeout, confirms, expect))

    def _answered(self, session: Any, result: Pending, argv: list[bytes], name: bytes,
                  pin: Pin | None,
                  info: CommandInfo | None, invalidation: Any,
                  frame: bytes | BackingError) -> None:
        """The reply came: drop what the command wrote, then answer."""
        if info is None and not isinstance(frame, BackingError):
            if frame[:1] in (b"-", b"!"):
                invalidation = None  # unknown to Redis too: it changed nothing
            else:
                self._load_table()  # a command added since (MODULE LOAD)
        if pin is not None:
            self._pinned_reply(pin, argv, name, invalidation, frame)
        else:
            if frame.__class__ is bytes or frame.kind == "timeout":  # type: ignore[union-attr]
                # (a timed-out write may still be applied: drop its keys too)
                self._invalidate(argv, invalidation)
                if frame.__class__ is BackingTimeout and self._backing is not None:
                    self._backing.suspect()  # misses and commands behind it fail fast
            self._pool_done(session)
        self._answer(result, argv, frame)

    def _pinned_send(self, session: Any, pin: Pin, send: Callable[[], None]) -> None:
        """``send()`` now, or once the client's commands sent on the shared
        pool before it was pinned are answered: Redis runs a client's
        commands in the order it sent them, even across the two connections
        (SET then WATCH, LPUSH then BLPOP)."""
        if session in self._pooled or pin.parked:
            pin.parked.append(send)
        else:
            send()

    def _pool_done(self, session: Any, count: int = 1) -> None:
        """``count`` commands of ``session`` on the shared pool are answered (or dropped)."""
        session.forwarding -= count
        left = self._pooled[session] - count
        if left:
            self._pooled[session] = left
        else:
            del self._pooled[session]
            pin = session.pin
            if pin is not None:
                _unpark(pin)

    def _pinned_reply(self, pin: Pin, argv: list[bytes], name: bytes, invalidation: Any,
                      frame: bytes | BackingError) -> None:
        """Keep the pin's state in step with what Redis answered, and apply
        the writes that took effect (or may have: a call that failed on the
        way may still have run)."""
        failed = isinstance(frame, BackingError)
        ok = not failed and frame[:1] not in (b"-", b"!")  # type: ignore[index]
        if name == b"reset" and ok:  # run at once, inside MULTI too
            pin.multi = pin.watching = pin.sticky = pin.reply_off = False
            pin.db = self._default_db
            pin.queued = []
            return
        if pin.multi:
            if name == b"exec":
                pin.multi = pin.watching = False
                if failed or (ok and frame not in _NULLS):
                    for queued_argv, queued in pin.queued:
                        self._invalidate(queued_argv, queued)
                        if queued_argv[0].lower() == b"select" and len(queued_argv) == 2:
                            pin.db = parse_integer(queued_argv[1]) or 0
                pin.queued = []
            elif name == b"discard":
                pin.multi = pin.watching = False
                pin.queued = []
            elif ok and frame == b"+QUEUED\r\n":
                pin.queued.append((argv, invalidation))
            elif not failed and frame.startswith(b"-EXECABORT"):  # type: ignore[union-attr]
                pin.multi = False
            return
        if ok or failed:
            # in another db only a flush reaches the cache (FLUSHALL, SWAPDB)
            if pin.db == self._default_db or invalidation is FLUSH:
                self._invalidate(argv, invalidation)
        if not ok:
            return
        if name == b"multi":
            pin.multi = True
        elif name == b"watch":
            pin.watching = True
        elif name in (b"unwatch", b"exec", b"discard"):
            pin.watching = False
        elif name == b"select":
            pin.db = parse_integer(argv[1]) or 0
        elif name == b"client" and len(argv) > 2:
            sub = argv[1].lower()
            if sub == b"reply":
                pin.reply_off = argv[2].lower() == b"off"
            elif sub in _PINNING_CLIENT:
                pin.sticky = True

    def _pin_settled(self, session: Any, pin: Pin) -> None:
        """One of the pin's commands is answered: let the pin go once none
        is owed and no state is left."""
        session.forwarding -= 1
        pin.owed -= 1
        if not pin.owed and session.pin is pin and not pin.holds_state(self._default_db):
            self._unpin(session)

    def _answer(self, result: Pending, argv: list[bytes], frame: bytes | BackingError) -> None:
        if isinstance(frame, BackingError):
            self._count(argv, FAILED_OUTCOME)
            self._settle(result, (error("ERR " + str(frame)), "backing_error"))
            return
        self._count(argv, ERROR_OUTCOME if frame[:1] in (b"-", b"!") else OK_OUTCOME)
        self._settle(result, (frame, "forwarded"))

    def _invalidate(self, argv: list[bytes], invalidation: Any) -> None:
        if not invalidation:
            return
        if invalidation is FLUSH:
            self._reader.invalidate_all()
            self._metrics.write_flushes += 1
            return
        invalidate = self._reader.invalidate
        for entry in invalidation:
            invalidate(entry if entry.__class__ is bytes else argv[entry])
        self._metrics.write_invalidations += len(invalidation)

    def _count(self, argv: list[bytes], outcome: str) -> None:
        label = self._labels.get(argv[0])
        if label is None:
            name = argv[0].lower()
            table = self.table
            if table is None or name not in table:
                label = "unknown"
            else:
                label = name.decode("latin-1")
                if len(self._labels) < _MAX_LABELS:  # (clients choose the spelling)
                    self._labels[argv[0]] = label
        self._metrics.forwarded[label, outcome] += 1

    def _stalled(self) -> bool:
        """A backing call timed out and the backing's probe PING has not been
        answered since (backing/connection.py).  The probe is what ends it: a pool lane's
        own ``stalled`` flag is not used, because a lane that fails fast sends
        nothing that could clear it."""
        return self._backing is not None and self._backing.state == "stalled"

    # -- pins ------------------------------------------------------------------------

    def _unpin(self, session: Any) -> None:
        pin, session.pin = session.pin, None
        if pin is not None:
            self._slots.release_pinned()
            pin.connection.close()
            _unpark(pin)  # (they fail: the connection is closing)

    def _pin_lost(self, session: Any, pin: Pin) -> None:
        """The pinned connection went down by itself (backing restarted,
        CLIENT KILL): its state is gone in Redis too.  A client that held
        state is hung up on once its replies are out, as Redis would have
        done: a subscriber must not wait for messages that will never
        come, nor a MULTI go on with its commands run one by one."""
        if session.pin is pin:
            session.pin = None
            self._slots.release_pinned()
            _unpark(pin)
            if pin.holds_state(self._default_db):
                session.hang_up()

    def release(self, session: Any) -> None:
        """The client left: its commands still waiting at the gate are
        dropped, and its pinned connection closed, so Redis drops the state
        (an open MULTI, a BLPOP, subscriptions)."""
        session.gone = True
        self._unpin(session)


class _Simple:
    """What a packet of forwarded commands needs of one command name."""

    __slots__ = ("info", "arity", "label", "fixed", "ok", "error")

    def __init__(self, info: CommandInfo, label: str, fixed: list[int] | None) -> None:
        self.info = info
        self.arity = info.arity
        self.label = label  # its metrics label
        self.fixed = fixed  # its invalidation whatever the argv (of the right arity)
        self.ok = (label, OK_OUTCOME)  # its keys in ``Metrics.forwarded``, built once
        self.error = (label, ERROR_OUTCOME)


class _Packet:
    """A client's packet of forwarded commands, between the gate and the replies."""

    __slots__ = ("session", "requests", "infos", "invalidations", "data", "result", "resp3")

    def __init__(self, session: Any, requests: list[list[bytes]], infos: list[_Simple],
                 invalidations: list[Any], data: bytes, result: Pending,
                 resp3: bool) -> None:
        self.session = session
        self.requests = requests
        self.infos = infos
        self.invalidations = invalidations
        self.data = data
        self.result = result
        self.resp3 = resp3


class _AskedKeys:
    """Which keys a movable-keys command writes, as the backing says
    (``COMMAND GETKEYSANDFLAGS``), asked while the command itself is sent."""

    __slots__ = ("info", "found", "waiters")

    def __init__(self, info: CommandInfo) -> None:
        self.info = info
        self.found: Any = None  # the keys (a list of bytes) or FLUSH, once answered
        self.waiters: list[Callable[[Any], None]] = []

    def got(self, frame: bytes | BackingError) -> None:
        found: Any = FLUSH  # the backing could not say: anything may have changed
        if not isinstance(frame, BackingError):
            try:
                reply = decode(frame)
                if not isinstance(reply, ErrorReply):
                    found = keys_from_getkeys(self.info, reply)
            except (ValueError, TypeError, IndexError):
                pass
        self.found = found
        waiters, self.waiters = self.waiters, []
        for then in waiters:
            then(found)

    def then(self, f: Callable[[Any], None]) -> None:
        if self.found is None:
            self.waiters.append(f)
        else:
            f(self.found)


def _early(session: Any, result: Pending, reply: Reply) -> None:
    """Answer a request settled before it was routed anywhere."""
    session.forwarding -= 1
    result._settled(reply)


def _unpark(pin: Pin) -> None:
    parked, pin.parked = pin.parked, []
    for send in parked:
        send()


def _pins(argv: list[bytes], info: CommandInfo | None, default_db: int) -> bool:
    """Whether ``argv`` puts state on the connection (blocking: ``_blocks``)."""
    name = argv[0].lower()
    if name in _PINNING:
        return True
    if name == b"select":
        return len(argv) == 2 and parse_integer(argv[1]) != default_db
    if name == b"client" and len(argv) > 1:
        return argv[1].lower() in _PINNING_CLIENT
    return False


def _invalidation(argv: list[bytes], info: CommandInfo | None) -> Any:
    """What ``argv`` may change in the cache: [] nothing, a list of argv
    indexes, FLUSH, or None when the backing must be asked."""
    if info is None:
        return FLUSH  # a command the table does not know (a module loaded since)
    if not info.arity_ok(argv):
        return []  # Redis refuses it
    return info.invalidation(argv)


def _reply_mode(argv: list[bytes]) -> bytes | None:
    if len(argv) == 3 and argv[0].lower() == b"client" and argv[1].lower() == b"reply":
        return argv[2].lower()
    return None


#: where Redis's own blocking commands take their timeout (seconds, or ms)
_TIMEOUT_AT = {b"blmpop": (1, 1), b"bzmpop": (1, 1), b"wait": (-1, 1000), b"waitaof": (-1, 1000)}


def _blocks(argv: list[bytes], info: CommandInfo | None) -> float:
    """How long ``argv`` may block its connection, in seconds (inf for
    "forever"), or 0 when it will not (XREAD without BLOCK: no pin for it).
    A timeout that cannot be read (a module's blocking command) is taken
    to block for good."""
    if info is None or not info.blocking:
        return 0.0
    name = argv[0].lower()
    try:
        if name in (b"xread", b"xreadgroup"):
            lowered = [a.lower() for a in argv]
            if b"block" not in lowered:
                return 0.0
            value = float(argv[lowered.index(b"block") + 1]) / 1000
        else:
            at, unit = _TIMEOUT_AT.get(name, (-1, 1))
            value = float(argv[at]) / unit
    except (ValueError, IndexError):
        return math.inf  # (Redis's own commands then answer an error at once)
    return math.inf if value <= 0 else value


def _quoted(name: bytes) -> bytes:
    return name[:128]
