"""Where each key lives in a Redis Cluster (SPEC §10): key slots, the slot
map, and the object that keeps the map fresh.

``key_slot`` is Redis's ``keyHashSlot``: CRC16/XMODEM (``binascii.crc_hqx``
with 0, in C) of the key, or of its ``{hashtag}`` -- the bytes between the
first ``{`` and the first ``}`` after it, when there are any -- modulo
16384.

A ``SlotMap`` is one immutable snapshot: a list indexed by slot, so the
master of a slot is one index (the router asks it for every key of every
forwarded command and every miss).  Snapshots are replaced, never changed,
so a request that read the map keeps a consistent view while a refresh
lands.

``ClusterTopology`` owns the current map.  It reads it from the cluster
(``CLUSTER SHARDS``, or ``CLUSTER SLOTS`` on a Redis that has no SHARDS),
asking a node named by a recent MOVED first, then the known masters, then
the URL's seeds, then known replicas, on a short-lived connection per node
(redisp's own ``RelayProtocol``: AUTH from the URL, TLS for ``rediss``
seeds, ``redis_timeout`` on the connect and on every call).  Concurrent
refreshes share one read.  It refreshes every ``REFRESH_SECONDS``; more
often (``UNSETTLED_SECONDS``) while the cluster is mid-failover (a master
marked failing, or slots nobody serves), so a promoted replica is found
quickly; and with a backoff while no map is known, so redisp recovers by
itself once a node answers.  A MOVED moves its slot at once (the router
can retry straight away) and asks for a refresh.  Every change of the map
goes to the ``on_change`` listeners: the per-master tracking flushes the
cache on a slot moving away, the routers drop connections to addresses
that are no longer masters.
"""

from __future__ import annotations

from binascii import crc_hqx
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from twisted.internet.defer import Deferred, DeferredList, succeed
from twisted.internet.interfaces import IDelayedCall
from twisted.logger import Logger
from twisted.python.failure import Failure

from redisp.backing.connection import BackingError, BackingUnavailable, first_line
from redisp.backing.relay import RelayProtocol
from redisp.backing.tls import OneProtocol, client_endpoint
from redisp.config import RedisURL
from redisp.protocol.frames import ErrorReply, FrameError, as_map, decode

__all__ = ["SLOTS", "Address", "key_slot", "SlotMap", "ClusterMapError", "ClusterTopology",
           "REFRESH_SECONDS", "UNSETTLED_SECONDS"]

log = Logger()

SLOTS = 16384
Address = tuple[str, int]

#: seconds between two reads of the slot map when nothing asks for one
REFRESH_SECONDS = 10.0
#: seconds between reads while the cluster is moving (a failing master, slots
#: nobody serves): a failover completes within a few node timeouts
UNSETTLED_SECONDS = 0.5
#: while no map is known: the first retry after this, doubling up to the cap
RETRY_FIRST, RETRY_CAP = 0.1, 1.0
#: reads started again because MOVEDs came while they were in flight, at most
MAX_REREADS = 3

_CLUSTER_SHARDS = b"*2\r\n$7\r\nCLUSTER\r\n$6\r\nSHARDS\r\n"
_CLUSTER_SLOTS = b"*2\r\n$7\r\nCLUSTER\r\n$5\r\nSLOTS\r\n"


def key_slot(key: bytes) -> int:
    """The cluster slot of ``key``, as Redis computes it."""
    start = key.find(b"{")
    if start >= 0:
        end = key.find(b"}", start + 1)
        if end > start + 1:
            return crc_hqx(key[start + 1:end], 0) & 0x3FFF
    return crc_hqx(key, 0) & 0x3FFF


class ClusterMapError(ValueError):
    """A CLUSTER SHARDS/SLOTS reply that is not one (an error, a bad shape)."""


class SlotMap:
    """Which master serves each slot, and the replicas of each master."""

    __slots__ = ("masters", "replicas", "failing", "_owner", "_ranges", "covered")

    def __init__(self, owner: list[Address | None],
                 replicas: Mapping[Address, Iterable[Address]] | None = None,
                 failing: Iterable[Address] = ()) -> None:
        """``owner``: SLOTS entries, the master of each slot (None: unserved).
        Build one with ``from_ranges``, ``from_shards`` or ``from_slots``."""
        if len(owner) != SLOTS:
            raise ClusterMapError(f"a slot map has {SLOTS} slots, not {len(owner)}")
        self._owner = owner
        ranges: dict[Address, list[tuple[int, int]]] = {}
        start = 0
        current = owner[0]
        for slot in range(1, SLOTS + 1):
            here = owner[slot] if slot < SLOTS else None
            if slot == SLOTS or here != current:
                if current is not None:
                    ranges.setdefault(current, []).append((start, slot - 1))
                start, current = slot, here
        self._ranges = ranges
        #: every master that serves a slot, sorted: the same masters give the
        #: same order, whatever slots they serve
        self.masters: tuple[Address, ...] = tuple(sorted(ranges))
        self.covered = SLOTS - owner.count(None)  # slots that have a master
        given = replicas or {}
        self.replicas: dict[Address, tuple[Address, ...]] = {
            m: tuple(given.get(m, ())) for m in self.masters}
        #: masters the cluster marks as failing (CLUSTER SHARDS health): a
        #: failover is under way
        self.failing: frozenset[Address] = frozenset(failing) & frozenset(self.masters)

    # -- reading ---------------------------------------------------------------

    def master(self, slot: int) -> Address | None:
        """The master serving ``slot``, or None when no node serves it."""
        return self._owner[slot]

    def master_for_key(self, key: bytes) -> Address | None:
        return self._owner[key_slot(key)]

    def ranges(self) -> dict[Address, list[tuple[int, int]]]:
        """Each master's slots as inclusive (first, last) ranges, in slot order."""
        return {m: list(self._ranges[m]) for m in self.masters}

    @property
    def settled(self) -> bool:
        """Every slot served and no master failing: nothing is about to move."""
        return self.covered == SLOTS and not self.failing

    def moved_slots(self, old: SlotMap | None) -> list[int]:
        """Slots whose master is not the one ``old`` had (a slot moving away);
        nothing when ``old`` is None (there was no map)."""
        if old is None:
            return []
        mine, theirs = self._owner, old._owner
        return [s for s in range(SLOTS) if theirs[s] is not None and mine[s] != theirs[s]]

    def nodes(self) -> list[Address]:
        """Every node this map knows of: masters, then their replicas."""
        seen = dict.fromkeys(self.masters)
        for master in self.masters:
            seen.update(dict.fromkeys(self.replicas[master]))
        return list(seen)

    def with_slot(self, slot: int, address: Address) -> SlotMap:
        """A copy in which ``slot`` is served by ``address`` (after a MOVED)."""
        owner = list(self._owner)
        owner[slot] = address
        return SlotMap(owner, self.replicas, self.failing)

    def __eq__(self, other: object) -> bool:
        return (isinstance(other, SlotMap) and self._owner == other._owner
                and self.replicas == other.replicas and self.failing == other.failing)

    def __hash__(self) -> int:
        return hash(tuple(self._ranges.items()))

    def __repr__(self) -> str:
        parts = ", ".join(
            f"{h}:{p}=" + ",".join(f"{a}-{b}" for a, b in self._ranges[h, p])
            for h, p in self.masters)
        return f"SlotMap({parts})"

    # -- building --------------------------------------------------------------

    @classmethod
    def from_ranges(cls, ranges: Mapping[Address, Iterable[tuple[int, int]]],
                    replicas: Mapping[Address, Iterable[Address]] | None = None,
                    failing: Iterable[Address] = ()) -> SlotMap:
        """From each master's inclusive slot ranges."""
        owner: list[Address | None] = [None] * SLOTS
        for address, spans in ranges.items():
            for first, last in spans:
                if not (isinstance(first, int) and isinstance(last, int)
                        and 0 <= first <= last < SLOTS):
                    raise ClusterMapError(f"bad slot range {first!r}-{last!r}")
                owner[first:last + 1] = [address] * (last - first + 1)
        return cls(owner, replicas, failing)

    @classmethod
    def from_shards(cls, reply: Any, queried: Address | None = None,
                    tls: bool = False) -> SlotMap:
        """From a decoded CLUSTER SHARDS reply (RESP2 flat key/value arrays or
        RESP3 maps).  ``queried``: the node asked, whose host stands in for an
        endpoint the node does not know (``?`` or empty), as Redis's own
        clients do; ``tls``: use each node's ``tls-port``."""
        _check_reply(reply)
        ranges: dict[Address, list[tuple[int, int]]] = {}
        replicas: dict[Address, list[Address]] = {}
        failing: list[Address] = []
        for shard in reply:
            fields = _as_map(shard)
            slots = fields.get(b"slots") or []
            nodes = [_as_map(n) for n in fields.get(b"nodes") or []]
            if not isinstance(slots, list) or len(slots) % 2:
                raise ClusterMapError("CLUSTER SHARDS: slots must be pairs")
            masters = [n for n in nodes if n.get(b"role") == b"master"]
            # a shard may list a failed old master beside the promoted one
            masters.sort(key=lambda n: n.get(b"health") == b"fail")
            if not masters:
                if slots:
                    raise ClusterMapError("CLUSTER SHARDS: a shard with slots and no master")
                continue
            master = _node_address(masters[0], queried, tls)
            if masters[0].get(b"health") == b"fail":
                failing.append(master)
            if not slots:
                continue
            spans = ranges.setdefault(master, [])
            spans.extend(zip(slots[0::2], slots[1::2], strict=True))
            replicas.setdefault(master, []).extend(
                _node_address(n, queried, tls) for n in nodes
                if n.get(b"role") != b"master" and n.get(b"health") != b"fail")
        return cls.from_ranges(ranges, replicas, failing)

    @classmethod
    def from_slots(cls, reply: Any, queried: Address | None = None) -> SlotMap:
        """From a decoded CLUSTER SLOTS reply: ``[first, last, master,
        replica…]`` per range, each node ``[host, port, id, …]``."""
        _check_reply(reply)
        ranges: dict[Address, list[tuple[int, int]]] = {}
        replicas: dict[Address, list[Address]] = {}
        for entry in reply:
            if not isinstance(entry, list) or len(entry) < 3:
                raise ClusterMapError("CLUSTER SLOTS: an entry is [first, last, master, …]")
            first, last, master_node, *replica_nodes = entry
            master = _slots_node(master_node, queried)
            ranges.setdefault(master, []).append((first, last))
            known = replicas.setdefault(master, [])
            for node in replica_nodes:
                address = _slots_node(node, queried)
                if address not in known:
                    known.append(address)
        return cls.from_ranges(ranges, replicas)


def _check_reply(reply: Any) -> None:
    if isinstance(reply, ErrorReply):
        raise ClusterMapError(reply.message.decode("utf-8", "replace"))
    if not isinstance(reply, list):
        raise ClusterMapError(f"not an array: {type(reply).__name__}")


def _as_map(value: Any) -> dict:
    """``frames.as_map``, a shard or node of CLUSTER SHARDS being a map."""
    found = as_map(value)
    if found is None:
        raise ClusterMapError("CLUSTER SHARDS: expected a map")
    return found


def _host(value: Any, queried: Address | None) -> str | None:
    if isinstance(value, bytes) and value and value != b"?":
        return value.decode("utf-8", "replace")
    return queried[0] if queried is not None else None


def _node_address(node: dict, queried: Address | None, tls: bool) -> Address:
    host = _host(node.get(b"endpoint"), None) or _host(node.get(b"ip"), queried)
    port = node.get(b"tls-port") if tls else None
    if port is None:
        port = node.get(b"port", node.get(b"tls-port"))
    if host is None or not isinstance(port, int) or not 0 < port < 65536:
        raise ClusterMapError("CLUSTER SHARDS: a node without an address")
    return host, port


def _slots_node(node: Any, queried: Address | None) -> Address:
    if not isinstance(node, list) or len(node) < 2 or not isinstance(node[1], int):
        raise ClusterMapError("CLUSTER SLOTS: a node is [host, port, …]")
    host = _host(node[0], queried)
    if host is None:
        raise ClusterMapError("CLUSTER SLOTS: a node without a host")
    return host, node[1]


# -- keeping the map fresh ------------------------------------------------------------

Listener = Callable[[SlotMap | None, SlotMap], None]


class ClusterTopology:
    """The current SlotMap of one cluster, kept fresh; see the module docstring.

    ``connect(protocol, url)`` (tests) makes the connection for one node;
    by default ``redisp.backing.tls.client_endpoint``.
    """

    def __init__(self, url: RedisURL, timeout: float, reactor: Any, metrics: Any,
                 clock: Any = None,
                 connect: Callable[[Any, RedisURL], Deferred] | None = None) -> None:
        self.url = url
        self.timeout = timeout
        self.reactor = reactor
        self.clock = clock or reactor
        self.metrics = metrics
        self.map: SlotMap | None = None
        self._connect = connect or self._connect_tcp
        self._listeners: list[Listener] = []
        self._waiting: list[Deferred] | None = None  # a refresh in flight: its callers
        self._known: list[Deferred] = []  # when_known() callers while there is no map
        self._hint: Address | None = None  # named by the last MOVED: asked first
        self._stale = False  # a MOVED came while a read was in flight: read again
        self._restarts = 0
        self._timer: IDelayedCall | None = None
        self._retry = 0.0
        self._running = False
        self._stopped = False
        self._connections: set[Any] = set()
        #: the last reason no node answered, for INFO (never a secret: errors
        #: are first lines of Redis's replies or connection failures)
        self.last_error: str | None = None
        self.refreshed_at: float | None = None
        if metrics is not None:  # INFO and /metrics show this topology
            metrics.topology_info = self.describe
            metrics.topology_metrics = self.metric_families

    # -- life ------------------------------------------------------------------

    def start(self) -> None:
        """Read the map now, then keep reading it (see the module docstring)."""
        self._running = True
        self._read_soon(0)

    def stop(self) -> Deferred:
        """Stop refreshing; close connections in flight.  Callers still
        waiting are failed as unavailable."""
        self._running = False
        self._stopped = True
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None
        down = [p.when_lost() for p in self._connections]
        for protocol in list(self._connections):
            protocol.close()
        return DeferredList(down)

    # -- the map ---------------------------------------------------------------

    def when_known(self) -> Deferred:
        """Fires with the map once there is one.  While there is none, a read
        is started if none is running, and the callers fail as unavailable if
        it finds no map: nobody waits longer than one read (bounded by
        ``redis_timeout`` per node)."""
        if self.map is not None:
            return succeed(self.map)
        d: Deferred = Deferred()
        self._known.append(d)
        if self._waiting is None:
            self.refresh().addErrback(lambda _: None)
        return d

    def on_change(self, listener: Listener) -> None:
        """``listener(old, new)`` after every change of the map, in order."""
        self._listeners.append(listener)

    def node_url(self, address: Address) -> RedisURL:
        """The URL for one node: the cluster URL's credentials and TLS."""
        return self.url.at(*address)

    def moved(self, slot: int, address: Address) -> None:
        """A MOVED was seen: ``slot`` is served by ``address`` from now on,
        and the rest of the map is read again (the MOVED's node asked first)."""
        self.metrics.cluster_moved += 1
        if self.map is not None and self.map.master(slot) == address:
            return  # known already: the answer to a request sent before the map changed
        self._hint = address
        if self.map is not None:
            self._install(self.map.with_slot(slot, address))
        if self._waiting is not None:
            # the read in flight may have asked a node that has not heard of
            # the move yet: its answer would move the slot back
            self._stale = True
        self.refresh().addErrback(lambda _: None)

    def asked(self) -> None:
        """An ASK was followed (counted only: the map does not change)."""
        self.metrics.cluster_asked += 1

    def refresh(self) -> Deferred:
        """Read the map again; fires with the new map, or fails with
        BackingUnavailable when no node answered.  Concurrent calls share one
        read (each gets its own Deferred)."""
        d: Deferred = Deferred()
        if self._waiting is not None:
            self._waiting.append(d)
            return d
        self._waiting = [d]
        self._read(self._candidates(), None)
        return d

    def describe(self) -> list[tuple[str, object]]:
        """The INFO ``# Proxy`` fields of the topology, ``topology`` first:
        one ``cluster_masterN`` line per master in Redis's ``slaveN`` style
        (``key=value`` pairs, lists space-separated)."""
        m = self.metrics
        current = self.map
        masters = current.masters if current is not None else ()
        fields: list[tuple[str, object]] = [
            ("topology", "cluster " + (",".join(f"{h}:{p}" for h, p in masters)
                                       or "(no slot map yet)")),
            ("cluster_masters", len(masters)),
            ("cluster_slots_served", current.covered if current is not None else 0),
        ]
        if current is not None:
            ranges = current.ranges()
            for i, master in enumerate(masters):
                spans = " ".join(_span(a, b) for a, b in ranges[master])
                replicas = " ".join(f"{h}:{p}" for h, p in current.replicas[master])
                fields.append((f"cluster_master{i}", (
                    f"address={master[0]}:{master[1]},"
                    f"slots={sum(b - a + 1 for a, b in ranges[master])},ranges={spans},"
                    f"replicas={replicas},state={'fail' if master in current.failing else 'ok'}"
                )))
        fields += [
            ("cluster_refreshes", m.cluster_refreshes),
            ("cluster_refresh_failures", m.cluster_refresh_failures),
            ("cluster_redirections_moved", m.cluster_moved),
            ("cluster_redirections_ask", m.cluster_asked),
        ]
        if self.last_error is not None:
            fields.append(("cluster_last_error", self.last_error))
        return fields

    def metric_families(self) -> Iterator[Metric]:
        """The /metrics families of the topology: nodes, slot ranges, reads
        of the map and redirections followed."""
        m = self.metrics
        current = self.map
        yield CounterMetricFamily(
            "redisp_cluster_refreshes", "reads of the cluster slot map that succeeded",
            value=m.cluster_refreshes)
        yield CounterMetricFamily(
            "redisp_cluster_refresh_failures",
            "reads of the cluster slot map for which no node answered",
            value=m.cluster_refresh_failures)
        redirections = CounterMetricFamily(
            "redisp_cluster_redirections", "MOVED and ASK redirections followed, by kind",
            labels=["kind"])
        redirections.add_metric(["moved"], m.cluster_moved)
        redirections.add_metric(["ask"], m.cluster_asked)
        yield redirections
        yield GaugeMetricFamily(
            "redisp_cluster_slots_served", "slots that have a master in the slot map",
            value=current.covered if current is not None else 0)
        nodes = GaugeMetricFamily(
            "redisp_cluster_node", "the nodes of the cluster (1 each), with their role, "
            "their master, and whether the cluster marks them failing",
            labels=["address", "role", "master", "state"])
        slots = GaugeMetricFamily(
            "redisp_cluster_master_slots", "slots each master serves", labels=["master"])
        spans = GaugeMetricFamily(
            "redisp_cluster_slot_range", "the slot ranges each master serves (1 each)",
            labels=["master", "first", "last"])
        if current is not None:
            ranges = current.ranges()
            for master in current.masters:
                name = f"{master[0]}:{master[1]}"
                state = "fail" if master in current.failing else "ok"
                nodes.add_metric([name, "master", name, state], 1)
                for host, port in current.replicas[master]:
                    nodes.add_metric([f"{host}:{port}", "replica", name, "ok"], 1)
                slots.add_metric([name], sum(b - a + 1 for a, b in ranges[master]))
                for first, last in ranges[master]:
                    spans.add_metric([name, str(first), str(last)], 1)
        yield nodes
        yield slots
        yield spans

    # -- reading the map -------------------------------------------------------

    def _candidates(self) -> list[Address]:
        order: list[Address] = []
        if self._hint is not None:
            order.append(self._hint)
        if self.map is not None:
            order += self.map.masters
        order += self.url.seeds
        if self.map is not None:
            order += [r for m in self.map.masters for r in self.map.replicas[m]]
        return list(dict.fromkeys(order))

    def _read(self, candidates: list[Address], last_error: str | None) -> None:
        if self._stopped:
            self._no_answer("redisp is stopping")
            return
        if not candidates:
            self._no_answer(last_error or "no cluster node to ask")
            return
        address, rest = candidates[0], candidates[1:]
        self._ask(address).addCallbacks(
            self._answered, lambda f: self._read(rest, f"{address[0]}:{address[1]}: "
                                                       f"{f.getErrorMessage()}"))

    def _ask(self, address: Address) -> Deferred:
        """The map as one node sees it, on a connection of its own."""
        url = self.node_url(address)
        protocol = RelayProtocol(self.clock, self.timeout, url)
        self._connections.add(protocol)
        result: Deferred = Deferred()

        def finish(outcome: SlotMap | Exception) -> None:
            self._connections.discard(protocol)
            protocol.close()
            if isinstance(outcome, Exception):
                result.errback(Failure(outcome))
            else:
                result.callback(outcome)

        def parse(frame: bytes | BackingError, shards: bool) -> None:
            if isinstance(frame, BackingError):
                finish(frame)
                return
            try:
                value = decode(frame)
                if shards and _unknown_command(value):
                    protocol.call(_CLUSTER_SLOTS, lambda f: parse(f, False))
                    return
                if shards:
                    found = SlotMap.from_shards(value, address, self.url.tls)
                else:
                    found = SlotMap.from_slots(value, address)
            except (ClusterMapError, FrameError) as e:
                finish(ClusterMapError(first_line(str(e)) or "bad reply"))
                return
            if not found.covered:
                finish(ClusterMapError("the node serves no slots (not joined yet?)"))
                return
            finish(found)

        protocol.call(_CLUSTER_SHARDS, lambda f: parse(f, True))
        self._connect(protocol, url).addErrback(protocol.connect_failed)
        return result

    def _answered(self, found: SlotMap) -> None:
        self.metrics.cluster_refreshes += 1
        if self._stale and self._restarts < MAX_REREADS:
            self._stale = False
            self._restarts += 1
            self._read(self._candidates(), None)  # the same callers wait for it
            return
        self._stale = False
        self._restarts = 0
        self.last_error = None
        self.refreshed_at = self.clock.seconds()
        self._hint = None
        self._retry = 0.0
        if found != self.map:
            self._install(found)
        waiting, self._waiting = self._waiting or [], None
        for d in waiting:
            d.callback(found)
        self._read_soon(REFRESH_SECONDS if found.settled else UNSETTLED_SECONDS)

    def _no_answer(self, reason: str) -> None:
        self.metrics.cluster_refresh_failures += 1
        if self.last_error is None:
            log.warn("redis cluster {url}: no node gave the slot map: {reason}",
                     url=self.url.redacted(), reason=reason)
        self.last_error = reason
        error = BackingUnavailable(f"backing redis unavailable ({reason})")
        self._stale = False
        self._restarts = 0
        waiting, self._waiting = self._waiting or [], None
        known, self._known = self._known, []
        for d in waiting + known:
            d.errback(Failure(error))
        if self.map is None:
            self._retry = min(RETRY_CAP, self._retry * 2 or RETRY_FIRST)
            self._read_soon(self._retry)
        else:
            self._read_soon(UNSETTLED_SECONDS)

    def _install(self, new: SlotMap) -> None:
        old, self.map = self.map, new
        if old is None:
            log.info("redis cluster {url}: {count} masters", url=self.url.redacted(),
                     count=len(new.masters))
        known, self._known = self._known, []
        for listener in list(self._listeners):
            try:
                listener(old, new)
            except Exception:
                log.failure("a cluster map listener failed")
        for d in known:
            d.callback(new)

    def _read_soon(self, delay: float) -> None:
        """The next read, after ``delay`` (replacing any planned one)."""
        if not self._running:
            return
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = self.clock.callLater(delay, self._timed_read)

    def _timed_read(self) -> None:
        self._timer = None
        if self._waiting is None:
            self.refresh().addErrback(lambda _: None)

    def _connect_tcp(self, protocol: Any, url: RedisURL) -> Deferred:
        return client_endpoint(self.reactor, url, self.timeout).connect(OneProtocol(protocol))


def _span(first: int, last: int) -> str:
    return f"{first}-{last}" if first != last else f"{first}"


def _unknown_command(value: Any) -> bool:
    """CLUSTER SHARDS refused as unknown (a Redis older than 7.0)."""
    return isinstance(value, ErrorReply) and b"unknown" in value.message.lower()
