"""Forwarded commands in front of a Redis Cluster (SPEC §10): routed by slot.

Clients see one ordinary Redis (db 0) and need no cluster support, so what
a cluster client library does is done here, between the forwarder
(routing/forwarding.py) and one relay pool per master (backing/relay.py):

* **routed** -- a command is sent to the master of its keys' slot, on the
  client's lane of that master's pool (its commands to one node stay in its
  order).  The key positions are the ones the forwarder already reads from
  the backing's ``COMMAND`` table, shard channels included (SPUBLISH,
  SSUBSCRIBE: Redis Cluster routes them by slot too); movable keys are
  asked of a master with ``COMMAND GETKEYSANDFLAGS`` first.  A keyless
  command goes to one master, chosen by the client's lane.
* **split** -- MGET, DEL, UNLINK, EXISTS, TOUCH and MSET whose keys hash to
  several slots are sent as one command per slot (Redis Cluster refuses
  more, even on one node), and the replies merged: MGET's array in the
  client's key order, the integers summed, MSET's ``+OK``.  The first error
  reply of a part (or failure) is the answer.  Any other command whose keys
  hash to different slots is answered ``-CROSSSLOT`` exactly as a cluster
  node answers it.
* **fanned out** -- DBSIZE (summed), KEYS (concatenated), FLUSHDB and
  FLUSHALL (``+OK`` when every master says so), RANDOMKEY (one master's key,
  at random among those that have one) run on every master; SCAN walks the
  masters one after the other under a single cursor (``scan_cursor``).
  SCRIPT LOAD/FLUSH and FUNCTION LOAD/DELETE/FLUSH/RESTORE too, so that a
  later EVALSHA or FCALL finds its script on whichever master its keys
  live (the first master's reply, when none fails).
* **redirected** -- a ``-MOVED`` reply tells the topology
  (``ClusterTopology.moved``) and the command is sent again to the new node;
  ``-ASK`` is followed once, with ``ASKING`` just before the command on the
  same connection.  At most ``MAX_REDIRECTS`` of them, then the client gets
  "backing redis unavailable (too many cluster redirections)": a
  redirection itself never reaches a client.

Replies are relayed as the bytes the node sent (RESP2 or RESP3): only the
merged replies are rebuilt, element frames cut out with ``FrameScanner``
and never decoded.  The forwarder applies a command's invalidation when
the merged reply arrives, so the keys of a split write are all dropped
before the client sees it acknowledged.

Pinned clients (``ClusterPin``): the pinned connection is opened on the
node the first command that needs one asks for: the slot of a keyed command
(BLPOP, WATCH, a keyed command inside MULTI, SSUBSCRIBE), any master for a
keyless one (SUBSCRIBE: cluster pub/sub is broadcast).  MULTI and the
keyless commands queued after it are replayed on the right node when the
transaction's first keyed command turns out to live elsewhere; from then
on the transaction has a slot, and a command for another slot is answered
``-CROSSSLOT`` and makes EXEC answer ``-EXECABORT``, as Redis flags a
transaction.  A pin with state on its node (WATCH, subscriptions, CLIENT
TRACKING …) sends a command for another node over the shared pools
instead.  SELECT of another db reaches a node, which answers Redis
Cluster's own error.

The per-master pools follow the slot map: a pool is opened when a master
is first used and closed when its address stops being a master.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from typing import Any

from twisted.internet.defer import Deferred, DeferredList
from twisted.logger import Logger

from redisp.backing.cluster_map import Address, SlotMap, key_slot
from redisp.backing.connection import BackingError, BackingUnavailable
from redisp.backing.relay import Done, RelayPool, RelayProtocol
from redisp.protocol.codec import bulk, encode_command, parse_integer
from redisp.protocol.frames import ErrorReply, FrameScanner, decode
from redisp.routing.command_table import CommandInfo, getkeys_request

__all__ = ["ClusterRouter", "ClusterPin", "CROSSSLOT", "MAX_REDIRECTS", "SCAN_BASE",
           "scan_cursor", "scan_position", "split_parts", "merge"]

log = Logger()

#: redirections (MOVED, ASK) followed for one command before giving up
MAX_REDIRECTS = 5
#: a client's SCAN cursor is ``node_cursor * SCAN_BASE + master_index`` (``scan_cursor``)
SCAN_BASE = 16384
#: what a cluster node answers when a command's keys hash to several slots
CROSSSLOT = b"-CROSSSLOT Keys in request don't hash to the same slot\r\n"
#: a slot that no master serves, as a cluster node words it
NOT_SERVED = b"-CLUSTERDOWN Hash slot not served\r\n"
#: EXEC of a transaction with a refused command, as Redis words it
EXECABORT = b"-EXECABORT Transaction discarded because of previous errors.\r\n"
#: a keyed command of a transaction whose slot moved once commands were queued
MOVED_IN_MULTI = (b"-ERR the slot of this transaction moved to another node while it "
                  b"was queued; EXEC will abort it\r\n")
OK = b"+OK\r\n"

#: multi-key commands split by slot, and how their parts merge
SPLIT = {b"mget": "array", b"del": "sum", b"unlink": "sum", b"exists": "sum",
         b"touch": "sum", b"mset": "ok"}
#: keyless commands run on every master, and how their replies merge (SCAN: its own)
FAN_OUT = {b"dbsize": "sum", b"keys": "concat", b"flushdb": "ok", b"flushall": "ok",
           b"randomkey": "random", b"scan": "scan"}
#: SCRIPT and FUNCTION subcommands that change what every node can run:
#: run on every master (a later EVALSHA or FCALL may go to any), the first
#: master's reply answered when none fails
_EVERYWHERE = {b"script": frozenset((b"load", b"flush")),
               b"function": frozenset((b"load", b"delete", b"flush", b"restore"))}
_NULLS = (b"$-1\r\n", b"_\r\n", b"*-1\r\n")
#: commands whose state stays on the pin's node (for WATCH: ``watching``)
_ANCHORING = frozenset((b"client", b"subscribe", b"psubscribe", b"ssubscribe", b"monitor"))
_NO_MAP = "backing redis unavailable (no cluster slot map yet)"
_TOO_MANY = "backing redis unavailable (too many cluster redirections)"


def _ignore(frame: Any) -> None:
    pass


def _redirection(frame: bytes) -> tuple[bool, int, Address] | None:
    """``(ask, slot, address)`` of a ``-MOVED``/``-ASK`` reply, else None."""
    if frame.startswith(b"-MOVED ") or frame.startswith(b"-ASK "):
        try:
            word, slot, where = frame[1:].rstrip(b"\r\n").split(b" ")
            host, _, port = where.rpartition(b":")
            return word == b"ASK", int(slot), (host.decode("latin-1"), int(port))
        except ValueError:
            return None
    return None


def _is_error(frame: bytes | BackingError) -> bool:
    return frame.__class__ is not bytes or frame[:1] in (b"-", b"!")  # type: ignore[index]


def elements(frame: bytes) -> list[bytes]:
    """The element frames of an aggregate reply frame, cut out, not decoded."""
    end = frame.index(b"\r\n")
    count = int(frame[1:end])
    if count <= 0:
        return []
    return FrameScanner().feed(frame[end + 2:])


def _integer(frame: bytes) -> int:
    return int(frame[1:frame.index(b"\r\n")])


# -- split and merge (pure: unit-tested without a cluster) ----------------------------


def split_parts(argv: list[bytes], positions: list[int],
                slot_of: Callable[[bytes], int] = key_slot,
                ) -> list[tuple[int, list[int], list[bytes]]]:
    """``argv`` as one command per slot: ``(slot, key indexes, argv)`` for each,
    in the order the slots first appear.  A key's unit is the key and the
    arguments up to the next key (MSET's value)."""
    step = positions[1] - positions[0] if len(positions) > 1 else 1
    groups: dict[int, tuple[list[int], list[bytes]]] = {}
    for n, position in enumerate(positions):
        slot = slot_of(argv[position])
        group = groups.get(slot)
        if group is None:
            group = groups[slot] = ([], [argv[0]])
        group[0].append(n)
        group[1].extend(argv[position:position + step])
    return [(slot, keys, sub) for slot, (keys, sub) in groups.items()]


def merge(how: str, replies: list[bytes | BackingError],
          keys: list[list[int]] | None = None, total: int = 0,
          choose: Callable[[list[bytes]], bytes] = random.choice) -> bytes | BackingError:
    """One reply from the parts' ``replies`` (in part order): the first
    failure or error reply, else the merge ``how`` says.  ``keys``/``total``
    put MGET's elements back in the client's key order."""
    for reply in replies:
        if reply.__class__ is not bytes:
            return reply
    for reply in replies:
        if reply[:1] in (b"-", b"!"):  # type: ignore[index]
            return reply
    frames: list[bytes] = replies  # type: ignore[assignment]
    if how == "sum":
        return b":%d\r\n" % sum(_integer(f) for f in frames)
    if how == "ok":
        return OK
    if how == "first":
        return frames[0]
    if how == "concat":
        found = [e for f in frames for e in elements(f)]
        return b"*%d\r\n" % len(found) + b"".join(found)
    if how == "random":
        present = [f for f in frames if f not in _NULLS]
        return choose(present) if present else frames[0]
    # "array": MGET
    ordered: list[bytes] = [b""] * total
    for frame, indexes in zip(frames, keys or ()):
        for index, element in zip(indexes, elements(frame)):
            ordered[index] = element
    return b"*%d\r\n" % total + b"".join(ordered)


def scan_position(cursor: int) -> tuple[int, int]:
    """``(master index, node cursor)`` of a client's SCAN cursor."""
    return cursor % SCAN_BASE, cursor // SCAN_BASE


def scan_cursor(index: int, node_cursor: int, masters: int) -> int:
    """The client's cursor after master ``index`` answered ``node_cursor``:
    the same master again while its cursor goes on, else the next master
    from its start, else 0 (done).  Never 0 before the last master is done,
    since a next master's index is at least 1."""
    if node_cursor:
        return node_cursor * SCAN_BASE + index
    following = index + 1
    return following if following < masters else 0


# -- the router ---------------------------------------------------------------------


class ClusterRouter:
    """Forwarded commands to the right master; what the forwarder uses as its pool.

    ``lane``, ``call`` (a keyless command), ``pinned``, ``stop`` and the pool
    properties are RelayPool's, so the forwarder and the door use it as they
    use a pool; ``route`` is the one the forwarder calls for a command with
    its argv and table entry.
    """

    def __init__(self, topology: Any, timeout: float, reactor: Any, size: int = 2,
                 connect: Callable[[RelayProtocol], Deferred] | None = None,
                 clock: Any = None) -> None:
        self.topology = topology
        self.timeout = timeout
        self.size = size
        self._reactor = reactor
        self._clock = clock or reactor
        self._connect = connect
        self._pools: dict[Address, RelayPool] = {}
        self._next_lane = 0
        self._stopped = False
        self._readied: set[Address] = set()
        #: the forwarder's hook: a pool connection of a new node is up (its table)
        self.on_ready: Callable[[RelayProtocol], None] | None = None
        topology.on_change(self._map_changed)

    # -- the pool interface ------------------------------------------------------

    @property
    def pinned_count(self) -> int:
        return sum(p.pinned_count for p in self._pools.values())

    @property
    def up(self) -> bool:
        return any(p.up for p in self._pools.values())

    @property
    def stalled(self) -> bool:
        return any(p.stalled for p in self._pools.values())

    def lane(self) -> int:
        lane = self._next_lane
        self._next_lane = (lane + 1) % self.size
        return lane

    def call(self, lane: int, request: bytes, done: Done, resp3: bool = False,
             timeout: float | None = None) -> None:
        """A keyless request (COMMAND, INFO, GETKEYSANDFLAGS): one master's reply."""
        slot_map = self.topology.map
        if slot_map is None or not slot_map.masters:
            self._with_map(done, lambda m: self.call(lane, request, done, resp3, timeout))
            return
        self._at(self._any(slot_map, lane), lane, request, done, resp3, timeout, 0)

    def pinned(self, resp3: bool = False, db: int | None = None,
               on_push: Callable[[bytes], None] | None = None,
               on_lost: Callable[[Any], None] | None = None) -> ClusterPin:
        return ClusterPin(self, resp3, on_push, on_lost)

    def stop(self) -> Deferred:
        self._stopped = True
        pools, self._pools = list(self._pools.values()), {}
        return DeferredList([p.stop() for p in pools])

    def pool(self, address: Address) -> RelayPool:
        """The pool of one master, opened on first use."""
        pool = self._pools.get(address)
        if pool is None:
            kwargs: dict[str, Any] = {"clock": self._clock, "on_ready": self._ready}
            if self._connect is not None:
                kwargs["connect"] = self._connect
            pool = self._pools[address] = RelayPool(
                self.topology.node_url(address), self.timeout, self._reactor, self.size,
                **kwargs)
        return pool

    def _ready(self, protocol: RelayProtocol) -> None:
        # the forwarder reads the table again when a pool connection is
        # (re)made; once per node's pool is enough here, not once per lane
        address = (protocol.url.host, protocol.url.port)
        if self.on_ready is not None and address not in self._readied:
            self._readied.add(address)
            self.on_ready(protocol)

    def _map_changed(self, old: SlotMap | None, new: SlotMap) -> None:
        masters = set(new.masters)
        for address in [a for a in self._pools if a not in masters]:
            log.info("cluster node {host}:{port} is no longer a master: its forwarding "
                     "connections close", host=address[0], port=address[1])
            self._pools.pop(address).stop()
            self._readied.discard(address)

    def _with_map(self, done: Done, then: Callable[[SlotMap], None]) -> None:
        """``then(map)`` once the topology knows one, or ``done`` fails as
        unavailable after ``timeout``: nothing waits forever."""
        if self._stopped:
            done(BackingUnavailable("backing redis unavailable (redisp is stopping)"))
            return
        waiting = [True]

        def known(slot_map: Any) -> None:
            if waiting[0]:
                waiting[0] = False
                timer.cancel()
                if isinstance(slot_map, SlotMap) and slot_map.masters:
                    then(slot_map)
                else:
                    done(BackingUnavailable(_NO_MAP))
            return None

        def expired() -> None:
            if waiting[0]:
                waiting[0] = False
                done(BackingUnavailable(_NO_MAP))

        timer = self._clock.callLater(self.timeout, expired)
        self.topology.when_known().addBoth(known)  # (starts a read if none runs)

    @staticmethod
    def _any(slot_map: SlotMap, lane: int) -> Address:
        masters = slot_map.masters
        return masters[lane % len(masters)]

    # -- one command ----------------------------------------------------------------

    def route(self, lane: int, argv: list[bytes], info: CommandInfo | None,
              request: bytes, done: Done, resp3: bool) -> None:
        """Send ``argv`` (encoded: ``request``) where its keys live; ``done``
        gets the reply (merged when split or fanned out) or a BackingError."""
        slot_map = self.topology.map
        if slot_map is None or not slot_map.masters:
            self._with_map(done, lambda m: self.route(lane, argv, info, request, done, resp3))
            return
        single = info.single_key if info is not None else 0
        if single and single < len(argv) and info.arity_ok(argv):  # type: ignore[union-attr]
            # one key (GET, SET, INCR …): the common case, without the spec walk
            address = slot_map.master(key_slot(argv[single]))
            if address is None:
                done(NOT_SERVED)
            else:
                self._at(address, lane, request, done, resp3, None, 0)
            return
        name = argv[0].lower()
        how = FAN_OUT.get(name)
        if how is None and name in _EVERYWHERE and len(argv) > 1:
            how = "first" if argv[1].lower() in _EVERYWHERE[name] else None
        if how is not None and info is not None and info.arity_ok(argv):
            self._fan_out(slot_map, lane, argv, how, request, done, resp3)
            return
        positions = routing_keys(argv, info)
        if positions is None:
            # movable keys: a master says which, then the command goes
            def got(frame: bytes | BackingError) -> None:
                keys: list[bytes] = []
                if frame.__class__ is bytes:
                    keys = _keys_of_getkeys(frame)  # type: ignore[arg-type]
                self._keyed(lane, name, argv, None, keys, request, done, resp3)

            self.call(lane, encode_command(getkeys_request(argv)), got, resp3=False)
            return
        self._keyed(lane, name, argv, positions, [argv[i] for i in positions],
                    request, done, resp3)

    def _keyed(self, lane: int, name: bytes, argv: list[bytes], positions: list[int] | None,
               keys: list[bytes], request: bytes, done: Done, resp3: bool) -> None:
        slot_map = self.topology.map
        if slot_map is None or not slot_map.masters:
            done(BackingUnavailable(_NO_MAP))
            return
        if not keys:
            self._at(self._any(slot_map, lane), lane, request, done, resp3, None, 0)
            return
        slot = key_slot(keys[0])
        for key in keys[1:]:
            if key_slot(key) != slot:
                break
        else:
            self.to_slot(slot, lane, request, done, resp3)
            return
        how = SPLIT.get(name)
        if how is None or positions is None or (name == b"mset" and len(argv) % 2 == 0):
            # (an odd MSET is not split: Redis refuses it whole)
            done(CROSSSLOT if name != b"mset" else
                 b"-ERR wrong number of arguments for 'mset' command\r\n")
            return
        parts = split_parts(argv, positions)
        replies: list[Any] = [None] * len(parts)
        owed = [len(parts)]

        def part_done(n: int, frame: bytes | BackingError) -> None:
            replies[n] = frame
            owed[0] -= 1
            if not owed[0]:
                done(merge(how, replies, [keys for _, keys, _ in parts], len(positions)))

        for n, (slot, _, sub) in enumerate(parts):
            self.to_slot(slot, lane, encode_command(sub),
                         lambda frame, n=n: part_done(n, frame), resp3)

    def to_slot(self, slot: int, lane: int, request: bytes, done: Done, resp3: bool,
                timeout: float | None = None) -> None:
        """``request`` to the master of ``slot``, redirections followed."""
        slot_map = self.topology.map
        address = slot_map.master(slot) if slot_map is not None else None
        if address is None:
            done(NOT_SERVED if slot_map is not None else BackingUnavailable(_NO_MAP))
            return
        self._at(address, lane, request, done, resp3, timeout, 0)

    def _at(self, address: Address, lane: int, request: bytes, done: Done, resp3: bool,
            timeout: float | None, tries: int, asking: bool = False) -> None:
        """``request`` on ``lane`` of ``address``'s pool; a MOVED or ASK in
        its reply sends it again (at most MAX_REDIRECTS times)."""
        def redirected(frame: bytes | BackingError) -> None:
            if frame.__class__ is bytes and frame[:2] in (b"-M", b"-A"):  # type: ignore[index]
                where = _redirection(frame)  # type: ignore[arg-type]
                if where is not None:
                    ask, slot, target = where
                    if not target[0]:
                        target = (address[0], target[1])  # "MOVED 1 :port": same host
                    if ask:
                        self.topology.asked()
                    else:
                        self.topology.moved(slot, target)
                    if tries >= MAX_REDIRECTS:
                        done(BackingUnavailable(_TOO_MANY))
                    else:
                        self._at(target, lane, request, done, resp3, timeout, tries + 1, ask)
                    return
            done(frame)

        if self._stopped:
            done(BackingUnavailable("backing redis unavailable (redisp is stopping)"))
            return
        pool = self.pool(address)
        if asking:
            pool.call(lane, b"*1\r\n$6\r\nASKING\r\n", _ignore, resp3)  # same connection
        pool.call(lane, request, redirected, resp3, timeout)

    # -- every master ---------------------------------------------------------------

    def _fan_out(self, slot_map: SlotMap, lane: int, argv: list[bytes], how: str,
                 request: bytes, done: Done, resp3: bool) -> None:
        masters = slot_map.masters
        if how == "scan":
            self._scan(masters, lane, argv, request, done, resp3)
            return
        replies: list[Any] = [None] * len(masters)
        owed = [len(masters)]

        def part_done(n: int, frame: bytes | BackingError) -> None:
            replies[n] = frame
            owed[0] -= 1
            if not owed[0]:
                done(merge(how, replies))

        for n, address in enumerate(masters):
            self._at(address, lane, request, lambda frame, n=n: part_done(n, frame),
                     resp3, None, 0)

    def _scan(self, masters: tuple[Address, ...], lane: int, argv: list[bytes],
              request: bytes, done: Done, resp3: bool) -> None:
        cursor = parse_integer(argv[1])
        if cursor is None or cursor < 0:
            # not a cursor: the node's own error ("invalid cursor")
            self._at(masters[0], lane, request, done, resp3, None, 0)
            return
        index, node_cursor = scan_position(cursor)
        if index >= len(masters):
            done(b"*2\r\n$1\r\n0\r\n*0\r\n")  # past the last master: nothing left
            return

        def scanned(frame: bytes | BackingError) -> None:
            if _is_error(frame):
                done(frame)
                return
            try:
                node, batch = elements(frame)  # type: ignore[arg-type]
                following = scan_cursor(index, int(decode(node)), len(masters))
            except (ValueError, TypeError):
                done(frame)
                return
            done(b"*2\r\n" + bulk(b"%d" % following) + batch)

        sub = encode_command([argv[0], b"%d" % node_cursor, *argv[2:]])
        self._at(masters[index], lane, sub, scanned, resp3, None, 0)


def routing_keys(argv: list[bytes], info: CommandInfo | None) -> list[int] | None:
    """The argv indexes a command is routed by (keys, and shard channels);
    None when only the backing can say (movable keys).  A command the table
    does not know, or whose arity Redis refuses, has none: any node answers
    it (with its error)."""
    if info is None or not info.arity_ok(argv):
        return []
    return info.route_keys(argv)


def _keys_of_getkeys(frame: bytes) -> list[bytes]:
    """The keys of a ``COMMAND GETKEYSANDFLAGS`` (or GETKEYS) reply frame."""
    try:
        reply = decode(frame)
    except (ValueError, TypeError, IndexError):
        return []
    if isinstance(reply, ErrorReply) or not isinstance(reply, list):
        return []
    keys = []
    for item in reply:
        key = item[0] if isinstance(item, list) and item else item
        if isinstance(key, bytes):
            keys.append(key)
    return keys


# -- pinned connections ----------------------------------------------------------------


class ClusterPin:
    """A pinned client's backing connection, on the node its commands need.

    Looks like the RelayProtocol the forwarder pins (``call``, ``send``,
    ``close``, ``subscribed``, ``monitoring``); the forwarder calls
    ``call_keyed`` with the command's argv and table entry so that it can
    choose the node.  See the module docstring for the rules.
    """

    def __init__(self, router: ClusterRouter, resp3: bool,
                 on_push: Callable[[bytes], None] | None,
                 on_lost: Callable[[Any], None] | None) -> None:
        self._router = router
        self.resp3 = resp3
        self._on_push = on_push
        self._on_lost = on_lost
        self.lane = router.lane()  # for the commands it sends over the shared pools
        self.conn: RelayProtocol | None = None
        self.node: Address | None = None
        #: state on the node that a move would lose (WATCH, CLIENT …): the
        #: pin stays on its node
        self.anchored = False
        self.multi = False
        self.multi_keyed = 0  # keyed commands queued in this MULTI, on this node
        self.multi_slot: int | None = None
        self.aborted = False  # a command of the transaction was refused: EXEC aborts
        self.watch_lost = False  # WATCH state was left on a node moved away from
        self.watching = False
        #: MULTI and the keyless commands queued after it: replayed on a move
        self.prelude: list[bytes] = []
        self._retired: list[RelayProtocol] = []
        #: calls held while a transaction's first keyed command is answered
        #: (a MOVED for it moves the transaction: what follows must go there)
        self._held: list[tuple] | None = None
        self.closed = False

    @property
    def subscribed(self) -> bool:
        return self.conn is not None and self.conn.subscribed

    @property
    def monitoring(self) -> bool:
        return self.conn is not None and self.conn.monitoring

    @property
    def waiting(self) -> int:
        return self.conn.waiting if self.conn is not None else 0

    # -- the RelayProtocol interface -------------------------------------------------

    def call(self, request: bytes, done: Done, timeout: float | None = None,
             confirms: bytes | None = None, expect: int | None = 1) -> None:
        """A request without its argv: on the pin's node (or any master)."""
        if self._bound(done, None):
            self.conn.call(request, done, timeout, confirms, expect)  # type: ignore[union-attr]

    def send(self, request: bytes) -> None:
        """Under CLIENT REPLY OFF/SKIP: on the pin's node, which keeps the state."""
        if self._bound(_ignore, None):
            self.anchored = True
            self.conn.send(request)  # type: ignore[union-attr]

    def close(self) -> None:
        self.closed = True
        held, self._held = self._held or [], None
        for call in held:
            call[3](BackingUnavailable("backing redis unavailable (connection closed)"))
        for conn in self._retired + ([self.conn] if self.conn is not None else []):
            conn.close()
        self._retired = []

    # -- routing -------------------------------------------------------------------

    def call_keyed(self, argv: list[bytes], info: CommandInfo | None, request: bytes,
                   done: Done, timeout: float | None = None, confirms: bytes | None = None,
                   expect: int | None = 1) -> None:
        """``argv`` on the node its keys need, by the rules of the module docstring."""
        if self.closed:
            done(BackingUnavailable("backing redis unavailable (connection closed)"))
            return
        if self._held is not None:
            self._held.append((argv, info, request, done, timeout, confirms, expect))
            return
        router = self._router
        slot_map = router.topology.map
        if slot_map is None or not slot_map.masters:
            router.topology.refresh().addErrback(lambda _: None)
            done(BackingUnavailable(_NO_MAP))
            return
        name = argv[0].lower()
        positions = routing_keys(argv, info)
        slots = {key_slot(argv[i]) for i in positions} if positions else set()
        if len(slots) > 1:
            if self.multi:
                self.aborted = True
            done(CROSSSLOT)
            return
        if name in (b"exec", b"discard") and self.multi and (self.aborted or self.watch_lost):
            self._end_refused(name, done)
            return
        slot = slots.pop() if slots else None
        target = slot_map.master(slot) if slot is not None else None
        if slot is not None and target is None:
            if self.multi:
                self.aborted = True
            done(NOT_SERVED)
            return
        if self.multi and slot is not None:
            if self.multi_slot is None:
                self.multi_slot = slot
            elif slot != self.multi_slot:
                self.aborted = True
                done(CROSSSLOT)
                return
        if target is not None and self.node is not None and target != self.node:
            if self._stuck():
                if self.multi:
                    self.aborted = True
                    done(CROSSSLOT)
                elif timeout is None and confirms is None:
                    router.route(self.lane, argv, info, request, done, self.resp3)
                else:
                    done(CROSSSLOT)  # a blocking command cannot take a shared lane
                return
            self._move(target)
        if not self._bound(done, target):
            return
        self._state_before(name, slot)
        if self.multi and slot is not None and self.multi_keyed == 1:
            done = self._holding(done)
        self._send(argv, slot, request, done, timeout, confirms, expect, 0)

    def _holding(self, done: Done) -> Done:
        """Hold the client's next calls until ``done`` is called (the
        transaction's first keyed command is answered, redirections followed)."""
        self._held = []

        def answered(frame: bytes | BackingError) -> None:
            held, self._held = self._held or [], None
            done(frame)
            for call in held:
                self.call_keyed(*call)

        return answered

    def _send(self, argv: list[bytes], slot: int | None, request: bytes, done: Done,
              timeout: float | None, confirms: bytes | None, expect: int | None,
              tries: int, asking: bool = False) -> None:
        conn = self.conn
        if conn is None:
            done(BackingUnavailable("backing redis unavailable (connection closed)"))
            return
        if self.multi and argv[0].lower() != b"multi" and slot is None:
            self.prelude.append(request)

        def redirected(frame: bytes | BackingError) -> None:
            if frame.__class__ is bytes and frame[:2] in (b"-M", b"-A"):  # type: ignore[index]
                where = _redirection(frame)  # type: ignore[arg-type]
                if where is not None:
                    self._redirected(where, argv, slot, request, done, timeout, confirms,
                                     expect, tries)
                    return
            done(frame)

        if asking:
            conn.call(b"*1\r\n$6\r\nASKING\r\n", _ignore)
        conn.call(request, redirected, timeout, confirms, expect)

    def _redirected(self, where: tuple[bool, int, Address], argv: list[bytes],
                    slot: int | None, request: bytes, done: Done, timeout: float | None,
                    confirms: bytes | None, expect: int | None, tries: int) -> None:
        ask, moved_slot, target = where
        router = self._router
        if not target[0] and self.node is not None:
            target = (self.node[0], target[1])
        if ask:
            router.topology.asked()
        else:
            router.topology.moved(moved_slot, target)
        if tries >= MAX_REDIRECTS or self.closed:
            done(BackingUnavailable(_TOO_MANY))
            return
        if self.multi:
            # the node flagged the transaction; it can move only while this
            # is its first keyed command (the rest queued is the prelude)
            self.multi_keyed -= 1
            if self._stuck():
                self.aborted = True
                done(MOVED_IN_MULTI)
                return
            self._move(target)
        elif self._stuck():
            if timeout is None and confirms is None:
                router._at(target, self.lane, request, done, self.resp3, None, tries + 1, ask)
            else:
                done(CROSSSLOT)
            return
        else:
            self._move(target)
        self._state_before(argv[0].lower(), slot)
        self._send(argv, slot, request, done, timeout, confirms, expect, tries + 1, ask)

    def _state_before(self, name: bytes, slot: int | None) -> None:
        """What sending ``name`` does to the pin's state, as Redis will see it."""
        if name == b"multi":
            if not self.multi:
                self.multi = True
                self.multi_slot = None
                self.multi_keyed = 0
                self.aborted = False
                self.prelude = [b"*1\r\n$5\r\nMULTI\r\n"]
        elif name in (b"exec", b"discard", b"reset"):
            self.multi = False
            self.multi_slot = None
            self.multi_keyed = 0
            self.prelude = []
            self.watching = self.watch_lost = False
            if name == b"reset":
                self.anchored = False
        elif name == b"watch":
            self.watching = self.anchored = True
        elif name == b"unwatch":
            self.watching = False
        elif name in _ANCHORING:
            self.anchored = True  # (before their confirmations tell ``subscribed``)
        elif self.multi and slot is not None:
            self.multi_keyed += 1  # a keyed command queued: the transaction lives here

    def _stuck(self) -> bool:
        """The node holds state a move would lose."""
        conn = self.conn
        if conn is not None and (conn.subscribed or conn.monitoring):
            return True
        return self.anchored or self.multi_keyed > 0

    def _end_refused(self, name: bytes, done: Done) -> None:
        """EXEC or DISCARD of a transaction redisp refused a command of (or
        whose WATCH was left on another node): the node's transaction is
        discarded, and the client gets what Redis answers such an EXEC."""
        if self.conn is not None:
            self.conn.call(b"*1\r\n$7\r\nDISCARD\r\n", _ignore)
        aborted = self.aborted
        self._state_before(name, None)
        if name == b"discard":
            done(OK)
        elif aborted:
            done(EXECABORT)
        else:  # a watched key may have changed: as a WATCH conflict
            done(b"_\r\n" if self.resp3 else b"*-1\r\n")

    def _bound(self, done: Done, target: Address | None) -> bool:
        """A connection exists (opened on ``target`` or any master); False
        (``done`` told) when there is no map to choose from."""
        if self.conn is not None:
            return True
        if self.closed:
            done(BackingUnavailable("backing redis unavailable (connection closed)"))
            return False
        if target is None:
            slot_map = self._router.topology.map
            if slot_map is None or not slot_map.masters:
                done(BackingUnavailable(_NO_MAP))
                return False
            target = self._router._any(slot_map, self.lane)
        self._open(target)
        return True

    def _open(self, address: Address) -> None:
        holder: list[RelayProtocol] = []

        def pushed(frame: bytes) -> None:
            if holder and holder[0] is self.conn and self._on_push is not None:
                self._on_push(frame)

        def lost(protocol: RelayProtocol) -> None:
            if protocol is self.conn and not self.closed and self._on_lost is not None:
                self._on_lost(self)

        conn = self._router.pool(address).pinned(resp3=self.resp3, db=0, on_push=pushed,
                                                 on_lost=lost)
        holder.append(conn)
        self.conn = conn
        self.node = address

    def _move(self, address: Address) -> None:
        """Open the pin again on ``address``: MULTI and what was queued in
        it keyless are sent again there (their replies were given); the old
        connection is closed once it owes nothing (its MULTI never EXECs)."""
        old = self.conn
        if self.watching:
            self.watch_lost = True
        self.conn = None
        self._open(address)
        for request in self.prelude:
            self.conn.call(request, _ignore)  # type: ignore[union-attr]
        if old is not None:
            if old.waiting:
                self._retired.append(old)
            else:
                old.close()
