"""The read path in front of a Redis Cluster: each miss goes to its slot's master.

``ClusterBacking`` stands where ``Backing`` stands for one server (the
reader's ``fetch`` and ``mget``, /healthz's ``ping``, ``up`` and ``state``
for INFO and the forwarder), and holds one ``Backing`` per master of the
current ``SlotMap``: the connection, its timeouts, fail-fast states and
typed errors stay the single server's, made and dropped as masters come
and go.

Batching.  The misses of one reactor turn are grouped by slot, not only by
master: Redis Cluster refuses an MGET whose keys hash to different slots
(``-CROSSSLOT``, even when one node serves them all).  So each slot's keys
leave as one MGET (one GET for a lone key).  With keys spread over the
16384 slots a turn rarely has two keys of one slot, so in practice these
are GETs; keys sharing a ``{hashtag}`` still share an MGET.  The commands of
the turn for one master leave as one batch (``Backing.call_many``): one
write, one timeout and one latency observation for the lot, the replies
gathered into one list, so a GET costs about what a key of an MGET costs,
where a ``Backing.call`` each (a Deferred, a timeout, a reply-queue slot)
cost several times the single server's miss.  Each command of a batch keeps
its own outcome: an error reply (MOVED, ASK, TRYAGAIN, CLUSTERDOWN,
WRONGTYPE) is that command's, handled as below; a batch that times out or
loses its connection fails each of its keys as a lone GET would.  A master
with a single command in the turn gets it as a plain ``call``.  As for one
server, a nil in an MGET is asked again with GET (WRONGTYPE is GET's
answer, not MGET's).

Redirections never reach a client.  ``MOVED``: the slot goes to the named
master at once (``ClusterTopology.moved``, which also has the whole map read
again) and the keys are sent there.  ``ASK`` (a slot mid-migration whose key
already left): ``ASKING`` then the command, written back to back so they
travel on the same connection, once, without touching the map.
``TRYAGAIN`` (an MGET of a migrating slot whose keys are split between the
two nodes): each key is sent alone, to follow its own ASK.  A call that
failed on a master which the map no longer names for the slot (a failover
seen meanwhile, a master dropped) goes again to the slot's current master.
All of these count as redirections: ``MAX_REDIRECTIONS`` per key at most,
then the key fails as unavailable.  ``CLUSTERDOWN`` (a slot without a
master while a failover runs) is reported as "backing redis unavailable
(CLUSTERDOWN …)", as a server that is down.

No map yet: the keys wait for one read of the map (``when_known``), and
fail with its error, "backing redis unavailable (…)", as a server that is
down.  A master that cannot be reached fails as a server that is down does,
and has the map read again, at most every ``REFRESH_AFTER_FAILURE`` seconds,
so that a failover is found by the requests it fails.

Stale values are the reader's concern: a map change that moves a slot away
flushes the cache with tracking on (core/cluster_tracking.py), which poisons
every fetch in flight (``CachedReader.invalidate_all``), so a value read
from a node that has since lost the slot is answered but never stored.
"""

from __future__ import annotations

from binascii import crc_hqx
from collections.abc import Callable
from typing import Any

from twisted.internet.defer import Deferred, DeferredList, FirstError, gatherResults
from twisted.internet.interfaces import IDelayedCall
from twisted.logger import Logger
from twisted.python.failure import Failure

from redisp.backing.batching import MAX_BATCH, Done
from redisp.backing.cluster_map import Address, ClusterTopology, SlotMap, key_slot
from redisp.backing.connection import Backing, BackingError, BackingReplyError, BackingUnavailable
from redisp.config import RedisURL
from redisp.metrics import Metrics
from redisp.protocol.codec import encode_command

log = Logger()

#: GET <key>, encoded (``% (len(key), key)``)
_GET = b"*2\r\n$3\r\nGET\r\n$%d\r\n%s\r\n"

#: redirections (MOVED, ASK, TRYAGAIN, a retry on a slot's new master)
#: followed for one key before it fails: a slot that moves more often than
#: this while one GET is in flight is a cluster being resharded in a loop
MAX_REDIRECTIONS = 3

#: seconds between two map reads asked for by calls that failed to reach a
#: master: a master that is down is found failed over within one of these
#: once the cluster says so, without every failed miss asking again
REFRESH_AFTER_FAILURE = 0.25


class ClusterBacking:
    """Misses and MGETs against a Redis Cluster, through one Backing per master.

    ``make_node(address)`` (tests) builds the backing of one master; by
    default a ``Backing`` for ``topology.node_url(address)``.
    """

    def __init__(
        self,
        topology: ClusterTopology,
        timeout: float,
        reactor: Any,
        metrics: Metrics,
        clock: Any = None,
        make_node: Callable[[Address], Any] | None = None,
    ) -> None:
        self.url: RedisURL = topology.url
        self.timeout = timeout
        self._topology = topology
        self._clock = clock or reactor
        self._metrics = metrics
        self._make_node = make_node or (lambda address: Backing(
            topology.node_url(address), timeout, reactor, metrics, clock=clock))
        #: the Backing of each master of the map (and of redirection targets)
        self._nodes: dict[Address, Any] = {}
        self._running = False
        self._keys: list[bytes] = []
        self._dones: list[Done] = []
        self._flush_call: IDelayedCall | None = None
        self._last_refresh: float | None = None
        topology.on_change(self._map_changed)

    # -- what the reader, the doors and INFO ask ---------------------------------------

    @property
    def up(self) -> bool:
        """True while there is a map and every master's connection answers."""
        current = self._topology.map
        if current is None or not current.masters:
            return False
        nodes = self._nodes
        for address in current.masters:
            node = nodes.get(address)
            if node is None or not node.up:
                return False
        return True

    @property
    def state(self) -> str:
        """'up' (every master up), 'down' (no map, or a master down) or
        'stalled' (a master timed out and none is down)."""
        current = self._topology.map
        if current is None or not current.masters:
            return "down"
        states = {self._nodes[a].state if a in self._nodes else "down" for a in current.masters}
        for state in ("down", "stalled"):
            if state in states:
                return state
        return "up"

    def node(self, address: Address) -> Any:
        """The Backing of one master (made on first use)."""
        node = self._nodes.get(address)
        if node is None:
            node = self._nodes[address] = self._make_node(address)
            if self._running:
                node.start()
        return node

    def suspect(self, address: Address | None = None) -> None:
        """A forwarded command to ``address`` timed out: fail fast there too.
        Without an address (a forwarder that does not route by slot) there
        is no telling which master it was, and none is suspected."""
        if address is not None and address in self._nodes:
            self._nodes[address].suspect()

    def start(self) -> None:
        self._running = True
        for node in self._nodes.values():
            node.start()
        if self._topology.map is not None:
            self._map_changed(None, self._topology.map)

    def stop(self) -> Deferred:
        """Close every master's connection."""
        self._running = False
        if self._flush_call is not None and self._flush_call.active():
            self._flush_call.cancel()
        self._flush_call = None
        nodes, self._nodes = list(self._nodes.values()), {}
        return DeferredList([node.stop() for node in nodes])

    def ping(self) -> Deferred:
        """PING every master: fires when all answered, fails with the first
        failure (no map: the map read's)."""
        current = self._topology.map
        if current is None:
            return self._topology.when_known().addCallback(lambda _: self.ping())
        d = gatherResults([self.node(a).ping() for a in current.masters], consumeErrors=True)
        return d.addErrback(_first_failure)

    def fetch(self, key: bytes, done: Done) -> None:
        """Ask the cluster for ``key`` with the other fetches of this turn;
        ``done`` gets the value, None, or a Failure (a BackingError)."""
        self._keys.append(key)
        self._dones.append(done)
        if self._flush_call is None:
            self._flush_call = self._clock.callLater(0, self._flush)

    def mget(self, keys: list[bytes]) -> Deferred:
        """Fires with a list of values or None, Redis's MGET semantics; one
        MGET per slot; fails as a whole with the first key's failure."""
        result: Deferred = Deferred()
        values: list[Any] = [None] * len(keys)
        left = [len(keys)]

        def got(index: int, value: Any) -> None:
            if result.called:
                return
            if value.__class__ is Failure:
                result.errback(value)
                return
            values[index] = value
            left[0] -= 1
            if not left[0]:
                result.callback(values)

        if not keys:
            result.callback(values)
            return result
        dones = [(lambda value, i=i: got(i, value)) for i in range(len(keys))]
        self._route(keys, dones, True)
        return result

    # -- sending ----------------------------------------------------------------------

    def _flush(self) -> None:
        self._flush_call = None
        keys, dones = self._keys, self._dones
        self._keys, self._dones = [], []
        self._route(keys, dones, False)

    def _route(self, keys: list[bytes], dones: list[Done], mget: bool) -> None:
        """Group ``keys`` by slot and send each group to its master."""
        current = self._topology.map
        if current is None:
            d = self._topology.when_known()
            d.addCallbacks(lambda _: self._route(keys, dones, mget), _fail_all, None, None,
                           (dones,))
            return
        # one pass: each key to its slot's entry, each new slot's entry to
        # its master's batch.  A key a slot is the usual case, so an entry
        # holds a lone key and its done as they are (one list a key, no
        # more), and becomes lists only when a second key of its slot comes
        owner = current.master
        slots: dict[int, list] = {}
        batches: dict[Address | None, list[list]] = {}
        for key, done in zip(keys, dones):
            slot = crc_hqx(key, 0) & 0x3FFF if b"{" not in key else key_slot(key)
            sent = slots.get(slot)
            if sent is None:
                sent = slots[slot] = [slot, key, done]
                address = owner(slot)
                batch = batches.get(address)
                if batch is None:
                    batches[address] = [sent]
                else:
                    batch.append(sent)
            elif sent[1].__class__ is bytes:
                sent[1] = [sent[1], key]
                sent[2] = [sent[2], done]
            else:
                sent[1].append(key)
                sent[2].append(done)
        for address, batch in batches.items():
            if address is None or (len(batch) == 1 and (batch[0][1].__class__ is bytes
                                                        or len(batch[0][1]) <= MAX_BATCH)):
                # one command for this master (or none to send it to): as it is
                for slot, slot_keys, slot_dones in batch:
                    if slot_keys.__class__ is bytes:
                        slot_keys, slot_dones = [slot_keys], [slot_dones]
                    for start in range(0, len(slot_keys), MAX_BATCH):
                        self._send(slot, slot_keys[start:start + MAX_BATCH],
                                   slot_dones[start:start + MAX_BATCH], mget, address, 0, False)
                continue
            commands: list[bytes] = []
            split: list[list] = []
            for sent in batch:
                slot, slot_keys, slot_dones = sent
                if slot_keys.__class__ is bytes:
                    if mget:
                        commands.append(encode_command((b"MGET", slot_keys)))
                        split.append([slot, [slot_keys], [slot_dones]])
                    else:
                        commands.append(_GET % (len(slot_keys), slot_keys))
                        split.append(sent)
                    continue
                for start in range(0, len(slot_keys), MAX_BATCH):
                    chunk = slot_keys[start:start + MAX_BATCH]
                    chunk_dones = slot_dones[start:start + MAX_BATCH]
                    if len(chunk) == 1 and not mget:
                        commands.append(_GET % (len(chunk[0]), chunk[0]))
                        split.append([slot, chunk[0], chunk_dones[0]])
                    else:
                        commands.append(encode_command((b"MGET", *chunk)))
                        split.append([slot, chunk, chunk_dones])
            node = self.node(address)
            for start in range(0, len(commands), MAX_BATCH):
                node.call_many(commands[start:start + MAX_BATCH]).addBoth(
                    self._answered_many, split[start:start + MAX_BATCH], mget, address)

    def _answered_many(self, result: Any, split: list[list], mget: bool,
                       address: Address) -> None:
        """The replies to one master's commands of a turn (``call_many``);
        an entry of ``split`` is ``[slot, key, done]`` for a lone GET, else
        ``[slot, keys, dones]``."""
        if result.__class__ is Failure:  # the whole batch: timeout, connection …
            for slot, keys, dones in split:
                if keys.__class__ is bytes:
                    keys, dones = [keys], [dones]
                self._failed(result, slot, keys, dones, mget, address, 0)
            return
        for (slot, keys, dones), reply in zip(split, result):
            if reply.__class__ is BackingReplyError:
                self._metrics.backing_errors[reply.kind] += 1  # as Backing.call counts it
                if keys.__class__ is bytes:
                    keys, dones = [keys], [dones]
                self._failed(Failure(reply), slot, keys, dones, mget, address, 0)
            elif keys.__class__ is bytes:  # a lone GET: the value, or None
                dones(reply)
            else:
                self._answered(reply, slot, keys, dones, mget, address, 0)

    def _send(self, slot: int, keys: list[bytes], dones: list[Done], mget: bool,
              address: Address | None, hops: int, asking: bool) -> None:
        """One command for the keys of one slot (GET for a lone key of a
        fetch, else MGET) to ``address``; ``asking``: preceded by ASKING."""
        if address is None:
            self._refresh_soon()
            error = BackingUnavailable(
                f"backing redis unavailable (no cluster master serves slot {slot})")
            self._metrics.backing_errors[error.kind] += 1
            _fail_all(Failure(error), dones)
            return
        node = self.node(address)
        if asking:
            # back to back, so both go on the same connection (the live one,
            # or the next one made, whose waiters are served in order)
            node.call(b"ASKING").addErrback(_ignore)  # its failure shows in the next reply
        if len(keys) == 1 and not mget:
            d = node.call(b"GET", keys[0])
        else:
            d = node.call(b"MGET", *keys)
        d.addBoth(self._answered, slot, keys, dones, mget, address, hops)

    def _answered(self, result: Any, slot: int, keys: list[bytes], dones: list[Done],
                  mget: bool, address: Address, hops: int) -> None:
        if result.__class__ is Failure:
            self._failed(result, slot, keys, dones, mget, address, hops)
        elif result.__class__ is list:
            if mget:
                for value, done in zip(result, dones):
                    done(value)
                return
            for key, value, done in zip(keys, result, dones):
                if value is None:  # absent, or not a string: GET tells
                    self._send(slot, [key], [done], False, self._master(slot), hops, False)
                else:
                    done(value)
        else:
            dones[0](result)

    def _failed(self, failure: Failure, slot: int, keys: list[bytes], dones: list[Done],
                mget: bool, address: Address, hops: int) -> None:
        error = failure.value
        if isinstance(error, BackingReplyError):
            kind, _, rest = str(error).partition(" ")
            if kind in ("MOVED", "ASK", "TRYAGAIN"):
                if hops >= MAX_REDIRECTIONS:
                    self._too_many(str(error), slot, dones)
                    return
                if kind == "TRYAGAIN":
                    if len(keys) > 1:  # split between source and target: one key at a time
                        for key, done in zip(keys, dones):
                            self._send(slot, [key], [done], mget, self._master(slot),
                                       hops + 1, False)
                        return
                else:
                    target = _target(rest)
                    if target is not None:
                        if kind == "MOVED":
                            self._topology.moved(slot, target)
                        else:
                            self._topology.asked()
                        self._send(slot, keys, dones, mget, target, hops + 1, kind == "ASK")
                        return
            elif kind == "CLUSTERDOWN":  # mid-failover: the backing is unavailable for now
                self._refresh_soon()
                unavailable = BackingUnavailable(f"backing redis unavailable ({error})")
                self._metrics.backing_errors[error.kind] -= 1  # counted as what it is
                self._metrics.backing_errors[unavailable.kind] += 1
                failure = Failure(unavailable)
        else:
            current = self._master(slot)
            if current is not None and current != address and hops < MAX_REDIRECTIONS:
                # the slot changed master while this was in flight
                self._send(slot, keys, dones, mget, current, hops + 1, False)
                return
            if not isinstance(error, BackingError):  # cancelled: its master was dropped
                error = BackingUnavailable("backing redis unavailable (connection closed)")
                self._metrics.backing_errors[error.kind] += 1
                failure = Failure(error)
            if error.kind == "unavailable":
                self._refresh_soon()
        _fail_all(failure, dones)

    def _too_many(self, last: str, slot: int, dones: list[Done]) -> None:
        error = BackingUnavailable(
            f"backing redis unavailable (slot {slot} still redirected after "
            f"{MAX_REDIRECTIONS} redirections: {last.split(' ', 1)[0]})")
        self._metrics.backing_errors[error.kind] += 1
        _fail_all(Failure(error), dones)

    def _master(self, slot: int) -> Address | None:
        current = self._topology.map
        return current.master(slot) if current is not None else None

    def _refresh_soon(self) -> None:
        """Have the map read again, unless one was asked for just now."""
        now = self._clock.seconds()
        if self._last_refresh is None or now - self._last_refresh >= REFRESH_AFTER_FAILURE:
            self._last_refresh = now
            self._topology.refresh().addErrback(_ignore)

    # -- masters come and go --------------------------------------------------------

    def _map_changed(self, old: SlotMap | None, new: SlotMap) -> None:
        """Connect to every master of the new map; drop the masters it no
        longer has (a call in flight there fails, and goes to the slot's new
        master: ``_failed``)."""
        if not self._running:
            return
        for address in new.masters:
            self.node(address)
        masters = set(new.masters)
        for address in [a for a in self._nodes if a not in masters]:
            self._nodes.pop(address).stop()


def _target(text: str) -> Address | None:
    """The node of a ``MOVED``/``ASK`` error's ``<slot> <host>:<port>``."""
    _, _, where = text.partition(" ")
    host, _, port = where.rpartition(":")
    if not host or not port.isdigit():
        return None
    if host.startswith("[") and host.endswith("]"):  # an IPv6 address, as Redis 7 writes it
        host = host[1:-1]
    return host, int(port)


def _fail_all(failure: Failure, dones: list[Done]) -> None:
    for done in dones:
        done(failure)


def _first_failure(failure: Failure) -> Failure:
    if failure.check(FirstError):
        return failure.value.subFailure
    return failure


def _ignore(_: object) -> None:
    return None
