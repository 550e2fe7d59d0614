"""ClusterTracking on fakes: caching only while every node's tracking holds (masters and replicas),
a flush when a slot changes master, trackers following the masters."""

from __future__ import annotations

from twisted.internet.defer import succeed
from twisted.internet.task import Clock

from redisp.backing.cluster_map import SLOTS, SlotMap
from redisp.core.cluster_tracking import FOLLOW_SECONDS, RECHECK_SECONDS, ClusterTracking
from redisp.metrics import Metrics
from tests.test_cluster_read_units import A, B, C, FakeTopology, thirds


class FakeReader:
    def __init__(self):
        self.caching = True
        self.flushes = 0
        self.drain = None

    def invalidate_all(self):
        self.flushes += 1
        return 0

    def drain_before_hits(self, drain, clock=None):
        self.drain = drain


class FakeTracker:
    """One master's Invalidator: reports to its owner as the real one does."""

    def __init__(self, address, owner):
        self.address = address
        self.owner = owner
        self.active = self.drainable = False
        self.started = self.stopped = False
        self.drained = 0

    def start(self):
        self.started = True
        self.owner.tracking_changed(self)

    def stop(self):
        self.stopped = True
        return succeed(None)

    def establish(self, drainable=True):
        self.active, self.drainable = True, drainable
        self.owner.tracking_changed(self)

    def lose(self):
        self.active = self.drainable = False
        self.owner.tracking_changed(self)

    def drain(self):
        self.drained += 1

    def fileno(self):
        return None  # no socket: drained on every call


def setup(current=None):
    clock = Clock()
    topology = FakeTopology(thirds() if current is None else current)
    reader = FakeReader()
    metrics = Metrics(started=0.0)
    made: dict = {}

    def make(address, owner):
        made[address] = FakeTracker(address, owner)
        return made[address]

    tracking = ClusterTracking(topology, 1.0, clock, reader, metrics, make_invalidator=make)
    tracking.start()
    return clock, topology, reader, metrics, tracking, made


def test_caching_waits_for_every_masters_tracking():
    clock, topology, reader, metrics, tracking, made = setup()
    assert set(made) == {A, B, C} and all(t.started for t in made.values())
    assert not reader.caching and tracking.state == "down"
    made[A].establish()
    made[B].establish()
    assert not reader.caching
    made[C].establish()
    assert reader.caching and tracking.state == "active"


def test_losing_one_masters_tracking_turns_caching_off_until_it_is_back():
    clock, topology, reader, metrics, tracking, made = setup()
    for tracker in made.values():
        tracker.establish()
    made[B].lose()
    assert not reader.caching and tracking.state == "down"
    made[B].establish()
    assert reader.caching


def test_while_a_masters_tracking_is_down_the_map_is_read_again_and_again():
    clock, topology, reader, metrics, tracking, made = setup()
    for tracker in made.values():
        tracker.establish()
    made[B].lose()
    assert topology.refreshes == 0
    clock.advance(RECHECK_SECONDS)
    clock.advance(RECHECK_SECONDS)
    assert topology.refreshes == 2
    made[B].establish()
    clock.advance(RECHECK_SECONDS)
    assert topology.refreshes == 2
    assert FOLLOW_SECONDS > RECHECK_SECONDS * 3


def test_while_tracking_the_map_is_read_every_follow_period():
    """A promotion by CLUSTER FAILOVER shows on no tracking connection."""
    clock, topology, reader, metrics, tracking, made = setup()
    for tracker in made.values():
        tracker.establish()
    for _ in range(3):
        clock.advance(FOLLOW_SECONDS)
    assert topology.refreshes == 3
    tracking.stop()
    for _ in range(3):
        clock.advance(FOLLOW_SECONDS)
    assert topology.refreshes == 3


def test_a_dead_master_replaced_in_the_map_gets_its_successor_tracked():
    clock, topology, reader, metrics, tracking, made = setup()
    for tracker in made.values():
        tracker.establish()
    old_b = made[B]
    old_b.lose()
    promoted = ("10.0.0.5", 7000)
    topology.install(SlotMap.from_ranges({A: [(0, 5460)], promoted: [(5461, 10922)],
                                          C: [(10923, SLOTS - 1)]}))
    assert old_b.stopped and B not in tracking.trackers
    assert reader.flushes == 1 and metrics.invalidation_flushes == 1
    assert made[promoted].started and not reader.caching
    made[promoted].establish()
    assert reader.caching
    old_b.lose()  # a late report from the stopped one changes nothing
    assert reader.caching


def test_a_slot_moving_away_flushes_the_cache():
    clock, topology, reader, metrics, tracking, made = setup()
    for tracker in made.values():
        tracker.establish()
    topology.install(topology.map.with_slot(100, B))
    assert reader.flushes == 1 and metrics.invalidation_flushes == 1
    assert reader.caching  # the same masters, all still tracked
    assert not any(t.stopped for t in made.values())


def test_a_map_change_that_moves_no_slot_flushes_nothing():
    clock, topology, reader, metrics, tracking, made = setup()
    topology.install(SlotMap.from_ranges(
        {A: [(0, 5460)], B: [(5461, 10922)], C: [(10923, SLOTS - 1)]},
        replicas={A: [("10.0.0.7", 7000)]}))
    assert reader.flushes == 0


def test_a_slot_served_for_the_first_time_is_no_move():
    clock, topology, reader, metrics, tracking, made = setup(
        SlotMap.from_ranges({A: [(0, 5460)], B: [(5461, 10922)]}))
    topology.install(thirds())
    assert reader.flushes == 0 and C in made


def test_every_active_tracking_socket_is_drained_before_hits():
    clock, topology, reader, metrics, tracking, made = setup()
    assert reader.drain is None
    made[A].establish()
    made[B].establish(drainable=False)  # not a socket we can read (tests' transports)
    made[C].establish()
    reader.drain()
    assert [made[a].drained for a in (A, B, C)] == [1, 0, 1]
    made[A].lose()
    reader.drain()
    assert [made[a].drained for a in (A, B, C)] == [1, 0, 2]


def test_no_map_no_caching_and_stop_stops_every_tracker():
    clock, topology, reader, metrics, tracking, made = setup()
    topology_without = FakeTopology(None)
    other = ClusterTracking(topology_without, 1.0, clock, FakeReader(), metrics,
                            make_invalidator=lambda a, o: FakeTracker(a, o))
    other.start()
    assert other.state == "down" and other.trackers == {}
    for tracker in made.values():
        tracker.establish()
    tracking.stop()
    assert all(t.stopped for t in made.values())
    assert not reader.caching and tracking.state == "down"


def test_a_value_read_from_a_master_that_lost_the_slot_is_answered_not_stored():
    """Real reader and ClusterBacking, fake masters and trackers: a GET in
    flight on A when the map gives its slot to B (a failover seen) comes
    back with A's value: the client gets it, the cache never holds it."""
    from redisp.backing.cluster_fetch import ClusterBacking
    from redisp.backing.cluster_map import key_slot
    from redisp.core.cache import Cache
    from redisp.core.gate import Gate
    from redisp.core.reader import CachedReader
    from tests.test_cluster_read_units import FakeNode, key_on

    clock = Clock()
    topology = FakeTopology(thirds())
    metrics = Metrics(started=0.0)
    nodes: dict = {}

    def make_node(address):
        nodes[address] = FakeNode(address)
        return nodes[address]

    backing = ClusterBacking(topology, 1.0, clock, metrics, clock=clock, make_node=make_node)
    reader = CachedReader(Cache(100, 60.0, clock, metrics), Gate(4, clock), backing, metrics)
    trackers: dict = {}

    def make_tracker(address, owner):
        trackers[address] = FakeTracker(address, owner)
        return trackers[address]

    tracking = ClusterTracking(topology, 1.0, clock, reader, metrics,
                               make_invalidator=make_tracker)
    backing.start()
    tracking.start()
    for tracker in trackers.values():
        tracker.establish(drainable=False)
    assert reader.caching
    key = key_on(A, topology.map)
    answers = []
    reader.get(key).addBoth(answers.append)
    clock.advance(0)
    assert nodes[A].sent == [(b"GET", key)]
    topology.install(topology.map.with_slot(key_slot(key), B))  # moved away meanwhile
    nodes[A].answer(b"old")
    assert answers == [(b"old", False)]
    assert reader.caching and len(reader._cache) == 0
    reader.get(key).addBoth(answers.append)
    clock.advance(0)
    assert nodes[B].sent == [(b"GET", key)]
    nodes[B].answer(b"new")
    assert answers[-1] == (b"new", False) and len(reader._cache) == 1


def _with_replicas():
    """thirds(), each master with one replica."""
    replicas = {A: [RA], B: [RB], C: [RC]}
    return SlotMap.from_ranges({A: [(0, 5460)], B: [(5461, 10922)], C: [(10923, SLOTS - 1)]},
                               replicas)


RA, RB, RC = ("10.0.0.11", 7000), ("10.0.0.12", 7000), ("10.0.0.13", 7000)


def test_every_replica_is_tracked_too_and_caching_waits_for_it():
    """A replica's connection carries the invalidations of the writes made on
    it the moment it is promoted, before redisp reads the new map."""
    clock, topology, reader, metrics, tracking, made = setup(_with_replicas())
    assert set(made) == {A, B, C, RA, RB, RC} and all(t.started for t in made.values())
    for address in (A, B, C, RA, RB):
        made[address].establish()
    assert not reader.caching, "RC's tracking is not active yet"
    made[RC].establish()
    assert reader.caching
    reader.drain()
    assert all(t.drained == 1 for t in made.values()), "every node's socket is drained"
    made[RB].lose()
    assert not reader.caching


def test_a_replica_leaving_the_map_has_its_tracking_stopped_and_caching_resumes():
    clock, topology, reader, metrics, tracking, made = setup(_with_replicas())
    for tracker in made.values():
        tracker.establish()
    made[RB].lose()  # it died
    assert not reader.caching
    failed = SlotMap.from_ranges({A: [(0, 5460)], B: [(5461, 10922)], C: [(10923, SLOTS - 1)]},
                                 {A: [RA], C: [RC]})  # the cluster marked it failed
    topology.install(failed)
    assert made[RB].stopped and RB not in tracking.trackers
    assert reader.caching and reader.flushes == 0, "no slot changed master"


def test_the_sockets_are_asked_in_one_poll_and_only_those_with_data_drained():
    import socket

    clock, topology, reader, metrics, tracking, made = setup(_with_replicas())
    pairs = {address: socket.socketpair() for address in made}
    try:
        for address, tracker in made.items():
            tracker.fileno = pairs[address][0].fileno
            tracker.establish()
        reader.drain()
        assert all(t.drained == 0 for t in made.values()), "nothing waiting, nothing read"
        pairs[RB][1].sendall(b">2 invalidate")
        reader.drain()
        assert {a for a, t in made.items() if t.drained} == {RB}
    finally:
        for a, b in pairs.values():
            a.close()
            b.close()
