"""Forwarding: every command redisp does not answer itself goes to the backing (SPEC §7).

A request the RESP door does not answer locally comes here and takes one of
three routes, decided in ``Forwarder.forward`` and nowhere else:

* **refused** -- in ``deny_commands``, or not read-only under ``forward:
  read``, or anything under ``forward: none``;
* **shared** -- sent on the client's lane of the relay pool (relay.py),
  through the request gate like a GET, its reply frame relayed unchanged;
* **pinned** -- a command that puts state on the connection (MULTI, WATCH,
  blocking commands, (S|P)SUBSCRIBE, MONITOR, SELECT of another db, CLIENT
  TRACKING/CACHING/REPLY/NO-EVICT/NO-TOUCH) gives the client a backing
  connection of its own (``Pin``), and every later command of that client
  goes there until the state ends.

Writes drop what they touch.  Which argv entries are keys, and which of them
a command may modify, comes from the backing's own ``COMMAND`` reply
(command_table.py), read when the pool first connects and again whenever a
pool connection comes back; where key specs cannot say, ``COMMAND
GETKEYSANDFLAGS`` asks the backing first.  The keys are dropped from the
cache, and every fetch of them in flight is poisoned (``CachedReader.
invalidate``), when the write's reply arrives and before it is handed to the
client: a fetch that read the old value cannot be stored after the client
has seen its write acknowledged.  Commands that change keys they do not name
(FLUSHDB, FLUSHALL, SWAPDB, a script declaring no keys) flush the cache.
Inside MULTI the writes are collected and applied when EXEC answers.

Read-your-writes on one connection: while a client has forwarded commands
in flight its GETs are forwarded too (``Session.forwarding``), so a GET
pipelined behind a SET sees the SET, as on Redis.

The gate: shared and pinned commands pass it as GETs do (SPEC §4), with the
two exceptions SPEC §7 names: a blocking command waits on its pinned
connection outside the gate, and a subscribed client's messages flow outside
it (pushes go straight to the client).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

from twisted.internet.defer import Deferred
from twisted.logger import Logger

from redisp.backing import BackingError, BackingTimeout, BackingUnavailable, first_line
from redisp.command_table import (
    FLUSH,
    CommandInfo,
    CommandTable,
    getkeys_request,
    keys_from_getkeys,
)
from redisp.config import Config
from redisp.frames import ErrorReply, decode
from redisp.metrics import Metrics
from redisp.relay import RelayPool, RelayProtocol, encode_command
from redisp.resp import error, parse_integer

log = Logger()

#: outcome labels of forwarded commands (metrics)
OK_OUTCOME = "ok"
ERROR_OUTCOME = "error"  # Redis answered with an error reply
FAILED_OUTCOME = "backing_error"  # unreachable or timed out
REFUSED_OUTCOME = "refused"  # deny_commands or forward mode

#: a reply for the RESP door: (encoded reply, request outcome)
Reply = tuple[bytes, str]

#: commands that pin a client by their name alone (the rest: blocking flag, SELECT n)
_PINNING = frozenset((b"multi", b"watch", b"subscribe", b"psubscribe", b"ssubscribe",
                      b"monitor"))
#: CLIENT subcommands that put state on the connection
_PINNING_CLIENT = frozenset((b"tracking", b"caching", b"reply", b"no-evict", b"no-touch"))
#: the confirmations a (un)subscribe command answers with (relay.py's ``confirms``)
_CONFIRMS = {b"subscribe": b"subscribe", b"psubscribe": b"psubscribe",
             b"ssubscribe": b"ssubscribe", b"unsubscribe": b"unsubscribe",
             b"punsubscribe": b"punsubscribe", b"sunsubscribe": b"sunsubscribe",
             b"monitor": b"monitor"}
_NULLS = (b"*-1\r\n", b"_\r\n")


class Pin:
    """A client's own backing connection, and the state that keeps it."""

    def __init__(self, connection: RelayProtocol, db: int) -> None:
        self.connection = connection
        self.db = db
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
                or c.subscribed or c.monitoring or self.db != default_db)


class Forwarder:
    """Sends the commands redisp does not answer itself to the backing Redis."""

    def __init__(self, config: Config, reactor: Any, reader: Any, gate: Any,
                 metrics: Metrics, pool: RelayPool | None = None, backing: Any = None) -> None:
        self.config = config
        self.mode = config.forward
        self.deny = frozenset(name.lower().encode() for name in config.deny_commands)
        self._reactor = reactor
        self._reader = reader
        self._gate = gate
        self._metrics = metrics
        self._default_db = config.redis.db
        self._backing = backing  # its state says when the backing stopped answering
        self.pool = pool or RelayPool(config.redis, config.redis_timeout, reactor,
                                      on_ready=self._pool_ready)
        self.table: CommandTable | None = None
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
        if self.mode == "read" and info is not None and not info.readonly:
            return error(b"ERR redisp forwards read-only commands only: '" + _quoted(name) + b"'")
        return None

    def forward(self, session: Any, argv: list[bytes]) -> Deferred:
        """The reply to ``argv`` from the backing, as ``(frame, outcome)``."""
        result: Deferred = Deferred()
        self._with_table(lambda table: self._route(session, argv, table, result))
        return result

    def _route(self, session: Any, argv: list[bytes], table: CommandTable | BackingError,
               result: Deferred) -> None:
        if isinstance(table, BackingError):
            self._answer(result, argv, table, None, None)
            return
        info = table.lookup(argv)
        refused = self.refusal(argv, info)
        if refused is not None:
            self._count(argv, REFUSED_OUTCOME)
            result.callback((refused, "bad_request"))
            return
        pin = session.pin
        if pin is None and _pins(argv, info, self._default_db):
            pin = session.pin = Pin(self.pool.pinned(
                resp3=session.encoder.version == 3, db=self._default_db,
                on_push=session.push, on_lost=lambda _: self._pin_lost(session)),
                self._default_db)
            self._metrics.pinned_clients += 1
        blocking = info is not None and info.blocking
        if pin is not None and blocking:
            # SPEC §7: a blocking command waits outside the gate
            self._send(session, pin, argv, info, result)
        elif pin is not None and pin.blocking:
            # behind a blocking call on its own connection: holding a token
            # there would stall every client (concurrency 1)
            self._send(session, pin, argv, info, result)
        else:
            self._gate.enter(self._admitted, session, pin, argv, info, result)

    def _admitted(self, session: Any, pin: Pin | None, argv: list[bytes],
                  info: CommandInfo | None, result: Deferred) -> None:
        result.addBoth(self._leave)
        self._send(session, pin, argv, info, result)

    def _leave(self, value: Any) -> Any:
        self._gate.leave()
        return value

    def _send(self, session: Any, pin: Pin | None, argv: list[bytes],
              info: CommandInfo | None, result: Deferred) -> None:
        invalidation = _invalidation(argv, info)
        if invalidation is None:  # only the backing can say which keys: ask first
            self._getkeys(session, pin, argv, info, result)
            return
        self._call(session, pin, argv, info, invalidation, result)

    def _getkeys(self, session: Any, pin: Pin | None, argv: list[bytes],
                 info: CommandInfo, result: Deferred) -> None:
        def got(frame: bytes | BackingError) -> None:
            invalidation: Any = FLUSH
            if not isinstance(frame, BackingError):
                try:
                    reply = decode(frame)
                    if not isinstance(reply, ErrorReply):
                        found = keys_from_getkeys(info, reply)
                        invalidation = found if found is FLUSH else [("key", k) for k in found]
                except (ValueError, TypeError, IndexError):
                    pass
            self._call(session, pin, argv, info, invalidation, result)

        self.pool.call(session.lane, encode_command(getkeys_request(argv)), got)

    def _call(self, session: Any, pin: Pin | None, argv: list[bytes],
              info: CommandInfo | None, invalidation: Any, result: Deferred) -> None:
        request = encode_command(argv)
        session.forwarding += 1
        name = argv[0].lower()

        def done(frame: bytes | BackingError) -> None:
            session.forwarding -= 1
            if pin is not None:
                if blocking:
                    pin.blocking -= 1
                self._pinned_reply(session, pin, argv, name, info, invalidation, frame)
            elif not isinstance(frame, BackingError) or frame.kind == "timeout":
                # a timed-out write may still be applied: drop its keys too
                self._invalidate(argv, invalidation)
                if frame.__class__ is BackingTimeout and self._backing is not None:
                    self._backing.suspect()
            self._answer(result, argv, frame, pin, session)

        if pin is None:
            resp3 = session.encoder.version == 3
            if self._stalled():
                # SPEC §9: after a call timed out, and until the backing answers
                # again, fail fast instead of each command waiting out the timeout
                done(BackingTimeout(
                    f"backing redis timed out after {self.config.redis_timeout:g}s"))
                return
            self.pool.call(session.lane, request, done, resp3=resp3)
            return
        blocking = info is not None and info.blocking
        connection = pin.connection
        mode = _reply_mode(argv)
        if (pin.reply_off and mode != b"on") or pin.skip_next or mode in (b"off", b"skip"):
            # CLIENT REPLY OFF/SKIP: Redis answers nothing, so nothing is
            # awaited or relayed; SKIP silences itself and the next command
            pin.skip_next = mode == b"skip"
            if mode == b"off":
                pin.reply_off = True
            connection.send(request)
            session.forwarding -= 1
            self._invalidate(argv, invalidation)
            self._count(argv, OK_OUTCOME)
            result.callback((b"", "forwarded"))
            return
        if blocking:
            pin.blocking += 1
            timeout = self.config.redis_timeout + _blocking_timeout(argv, name)
        else:
            timeout = None
        connection.call(request, done, timeout, _CONFIRMS.get(name))

    def _pinned_reply(self, session: Any, pin: Pin, argv: list[bytes], name: bytes,
                      info: CommandInfo | None, invalidation: Any,
                      frame: bytes | BackingError) -> None:
        """Keep the pin's state in step with what Redis answered, apply the
        writes that took effect, and let the pin go once no state is left."""
        ok = not isinstance(frame, BackingError) and frame[:1] not in (b"-", b"!")
        if pin.multi:
            if name == b"exec":
                pin.multi = pin.watching = False
                if ok and frame not in _NULLS:
                    for queued in pin.queued:
                        self._invalidate(queued[0], queued[1])
                pin.queued = []
            elif name == b"discard":
                pin.multi = pin.watching = False
                pin.queued = []
            elif ok and frame == b"+QUEUED\r\n":
                pin.queued.append((argv, invalidation))
            elif not isinstance(frame, BackingError) and frame.startswith(b"-EXECABORT"):
                pin.multi = False
        else:
            if ok and pin.db == self._default_db:
                self._invalidate(argv, invalidation)
            elif isinstance(frame, BackingError) and frame.kind == "timeout":
                self._invalidate(argv, invalidation)
            if ok:
                if name == b"multi":
                    pin.multi = True
                elif name == b"watch":
                    pin.watching = True
                elif name in (b"unwatch", b"exec", b"discard"):
                    pin.watching = False
                elif name == b"select":
                    pin.db = parse_integer(argv[1]) or 0
                elif name == b"reset":
                    pin.multi = pin.watching = pin.sticky = pin.reply_off = False
                    pin.db = self._default_db
                elif name == b"client" and len(argv) > 2:
                    sub = argv[1].lower()
                    if sub == b"reply":
                        pin.reply_off = argv[2].lower() == b"off"
                    elif sub in _PINNING_CLIENT:
                        pin.sticky = True
        if pin.connection.waiting == 0 and not pin.holds_state(self._default_db):
            self._unpin(session)

    def _answer(self, result: Deferred, argv: list[bytes], frame: bytes | BackingError,
                pin: Pin | None, session: Any) -> None:
        if isinstance(frame, BackingError):
            self._count(argv, FAILED_OUTCOME)
            result.callback((error("ERR " + str(frame)), "backing_error"))
            return
        self._count(argv, ERROR_OUTCOME if frame[:1] in (b"-", b"!") else OK_OUTCOME)
        result.callback((frame, "forwarded"))

    def _invalidate(self, argv: list[bytes], invalidation: Any) -> None:
        if not invalidation:
            return
        if invalidation is FLUSH:
            self._reader.invalidate_all()
            self._metrics.write_flushes += 1
            return
        invalidate = self._reader.invalidate
        for entry in invalidation:
            invalidate(entry[1] if entry.__class__ is tuple else argv[entry])
        self._metrics.write_invalidations += len(invalidation)

    def _count(self, argv: list[bytes], outcome: str) -> None:
        name = argv[0].lower()
        table = self.table
        label = name.decode("latin-1") if table is not None and name in table else "unknown"
        self._metrics.forwarded[label, outcome] += 1

    def _stalled(self) -> bool:
        """A backing call timed out and the backing's probe PING has not been
        answered since (backing.py).  The probe is what ends it: a pool lane's
        own ``stalled`` flag is not used, because a lane that fails fast sends
        nothing that could clear it."""
        return self._backing is not None and self._backing.state == "stalled"

    # -- pins ------------------------------------------------------------------------

    def _unpin(self, session: Any) -> None:
        pin, session.pin = session.pin, None
        if pin is not None:
            self._metrics.pinned_clients -= 1
            pin.connection.close()

    def _pin_lost(self, session: Any) -> None:
        """The pinned connection went down by itself: its state is gone in
        Redis too; the client's next command starts afresh on the pool."""
        if session.pin is not None and session.pin.connection.lost:
            session.pin = None
            self._metrics.pinned_clients -= 1

    def release(self, session: Any) -> None:
        """The client left: close its pinned connection, so Redis drops the
        state (an open MULTI, a BLPOP, subscriptions)."""
        self._unpin(session)


def _pins(argv: list[bytes], info: CommandInfo | None, default_db: int) -> bool:
    name = argv[0].lower()
    if name in _PINNING or (info is not None and info.blocking):
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


def _blocking_timeout(argv: list[bytes], name: bytes) -> float:
    """A blocking command's own timeout in seconds (inf for 0, "forever")."""
    try:
        if name in (b"xread", b"xreadgroup"):
            lowered = [a.lower() for a in argv]
            if b"block" not in lowered:
                return 0.0
            value = float(argv[lowered.index(b"block") + 1]) / 1000
        elif name in (b"wait", b"waitaof"):
            value = float(argv[-1]) / 1000
        elif name in (b"blmpop", b"bzmpop"):
            value = float(argv[1])
        else:
            value = float(argv[-1])
    except (ValueError, IndexError):
        return 0.0  # Redis answers the error at once
    return math.inf if value <= 0 else value


def _quoted(name: bytes) -> bytes:
    return name[:128]
