"""Coherence in front of a Redis Cluster: one tracking connection per node (SPEC §5, §10).

Each master sends the invalidations of its own keys only, so every master
of the current map gets its own ``Invalidator`` (BCAST, checked for life
exactly as for one server), and the reader caches only while every one of
them is active: a write on a master nobody listens to would go unseen.

Every replica the map names gets one too, and counts the same: a replica
sends the invalidations of the writes it replicates, so while it is a
replica its connection repeats its master's, and the moment it is promoted
(``CLUSTER FAILOVER``, or its master's death) the connection redisp already
holds carries the invalidations of the writes made on it as the new master,
before redisp has read the new map.  A replica the cluster marks as failed
leaves the map (``SlotMap.from_shards``), and with it the set caching waits
for.

What flushes the whole cache:

* a tracking connection lost (the ``Invalidator`` itself flushes, as for one
  server), and caching stays off until it is back, or until the map drops
  that master;
* a map change that gives a slot another master (a slot migrated away, a
  replica promoted): the old master's invalidations for that slot stopped,
  and a failover may have lost writes the cache holds.  The flush poisons
  every fetch in flight, so a value read from the old master is never
  stored (core/reader.py).

A replica promoted by ``CLUSTER FAILOVER`` gives no sign on the tracking
connections (the old master, now a replica, keeps its own up), so while
tracking is on the map is also read every ``FOLLOW_SECONDS`` (the
topology's own period is for routing, and longer): a promotion is seen, and
the cache flushed, within about that much of the cluster knowing.  The
invalidations of writes on the new master meanwhile come on the connection
it had as a replica.

A new node gets its own connection, and caching is off until it is
active (its activation poisons the fetches in flight again); a master that
left the map has its connection closed.  While some master's tracking is
down the map is read again every ``RECHECK_SECONDS``: a master that died is
replaced by the cluster within a few node timeouts, and caching comes back
as soon as the map names its successor and that one's tracking is active,
instead of at the next periodic read.

Read-after-write: before the first cache lookup of a reactor turn the
reader drains every active tracking socket (one ``poll(0)`` each).
"""

from __future__ import annotations

import select
from collections.abc import Callable
from typing import Any

from twisted.internet.defer import Deferred, DeferredList
from twisted.internet.interfaces import IDelayedCall
from twisted.internet.task import LoopingCall
from twisted.logger import Logger

from redisp.backing.cluster_map import Address, ClusterTopology, SlotMap
from redisp.core.reader import CachedReader
from redisp.core.tracking import Invalidator
from redisp.metrics import Metrics

log = Logger()

#: seconds between map reads while some master's tracking is down
RECHECK_SECONDS = 0.25

#: seconds between map reads while tracking is on (see the module docstring)
FOLLOW_SECONDS = 1.0


class ClusterTracking:
    """One ``Invalidator`` per node, masters and replicas, and the reader's
    ``caching`` true to all of them.

    ``make_invalidator(address, owner)`` (tests) builds one node's tracking;
    by default an ``Invalidator`` for ``topology.node_url(address)``.
    """

    def __init__(
        self,
        topology: ClusterTopology,
        timeout: float,
        reactor: Any,
        reader: CachedReader,
        metrics: Metrics,
        make_invalidator: Callable[[Address, Any], Any] | None = None,
    ) -> None:
        self._topology = topology
        self._clock = reactor
        self._reader = reader
        self._metrics = metrics
        self._make = make_invalidator or (lambda address, owner: Invalidator(
            topology.node_url(address), timeout, reactor, reader, metrics, owner=owner))
        #: the tracking of each node of the current map, masters then replicas
        self.trackers: dict[Address, Any] = {}
        #: the nodes of the current map (``SlotMap.nodes``): what caching waits for
        self._nodes: tuple[Address, ...] = ()
        #: what ``_drain`` asks: every drainable socket in one poll, by descriptor,
        #: and the trackers that have none
        self._poller = select.poll()
        self._by_fd: dict[int, Any] = {}
        self._blind: tuple[Any, ...] = ()
        self._running = False
        self._recheck: IDelayedCall | None = None
        self._follow = LoopingCall(self._read_map_again)
        self._follow.clock = reactor
        topology.on_change(self._map_changed)

    @property
    def active(self) -> bool:
        """True while there is a map and every node's tracking holds."""
        current = self._topology.map
        if current is None or not current.masters or not self._running:
            return False
        trackers = self.trackers
        for address in self._nodes:
            tracker = trackers.get(address)
            if tracker is None or not tracker.active:
                return False
        return True

    @property
    def state(self) -> str:
        """'active' while tracking holds on every master, else 'down' (caching is off)."""
        return "active" if self.active else "down"

    def start(self) -> None:
        self._running = True
        self._reader.caching = False
        self._follow.start(FOLLOW_SECONDS, now=False)
        if self._topology.map is not None:
            self._map_changed(None, self._topology.map)

    def stop(self) -> Deferred:
        self._running = False
        self._cancel_recheck()
        if self._follow.running:
            self._follow.stop()
        trackers, self.trackers = list(self.trackers.values()), {}
        self._update()
        return DeferredList([tracker.stop() for tracker in trackers])

    # -- the owner of every master's Invalidator --------------------------------------

    def tracking_changed(self, tracker: Any) -> None:
        """A node's tracking became active, or was lost (and flushed)."""
        if not any(t is tracker for t in self.trackers.values()):
            return  # one we stopped (its node left the map)
        self._update()

    def _update(self) -> None:
        active = self.active
        self._reader.caching = active
        drains = [t for t in self.trackers.values() if t.active and t.drainable]
        # one poll(0) asks every socket at once (one system call per reactor
        # turn with hits, not one per node); a tracker without a descriptor
        # is drained each time
        poller = select.poll()
        by_fd: dict[int, Any] = {}
        blind = []
        for tracker in drains:
            fd = tracker.fileno()
            if fd is None:
                blind.append(tracker)
            else:
                by_fd[fd] = tracker
                poller.register(fd, select.POLLIN)
        self._poller, self._by_fd, self._blind = poller, by_fd, tuple(blind)
        self._reader.drain_before_hits(self._drain if drains else None, self._clock)
        if active or not self._running:
            self._cancel_recheck()
        elif self._recheck is None:
            self._recheck = self._clock.callLater(RECHECK_SECONDS, self._read_map)

    def _drain(self) -> None:
        by_fd = self._by_fd
        for fd, _ in self._poller.poll(0):
            tracker = by_fd.get(fd)
            if tracker is not None:
                tracker.drain()
        for tracker in self._blind:
            tracker.drain()

    def _read_map(self) -> None:
        """Some node's tracking is down: is it still in the map?"""
        self._recheck = None
        if self._running and not self.active:
            self._topology.refresh().addErrback(lambda _: None)
            self._recheck = self._clock.callLater(RECHECK_SECONDS, self._read_map)

    def _read_map_again(self) -> None:
        self._topology.refresh().addErrback(lambda _: None)

    def _cancel_recheck(self) -> None:
        if self._recheck is not None and self._recheck.active():
            self._recheck.cancel()
        self._recheck = None

    # -- masters come and go --------------------------------------------------------

    def _map_changed(self, old: SlotMap | None, new: SlotMap) -> None:
        moved = new.moved_slots(old)
        if moved:
            self._metrics.invalidation_flushes += 1
            self._reader.invalidate_all()
            log.info("invalidation: {count} cluster slot(s) changed master; cache flushed",
                     count=len(moved))
        if not self._running:
            return
        nodes = self._nodes = tuple(new.nodes())
        for address in [a for a in self.trackers if a not in nodes]:
            self.trackers.pop(address).stop()
        for address in nodes:
            if address not in self.trackers:
                tracker = self.trackers[address] = self._make(address, self)
                tracker.start()  # caching off until it is active (tracking_changed)
        self._update()

