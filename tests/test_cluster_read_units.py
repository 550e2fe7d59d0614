"""ClusterBacking on fakes: batching per slot, redirections, masters coming and going.

The fake masters record every command and answer only when a test says
so, so each test sees exactly what went where and in which reactor turn.
"""

from __future__ import annotations

import pytest
from twisted.internet.defer import Deferred, succeed
from twisted.internet.task import Clock
from twisted.python.failure import Failure

from redisp.backing.batching import MAX_BATCH
from redisp.backing.cluster_fetch import MAX_REDIRECTIONS, REFRESH_AFTER_FAILURE, ClusterBacking
from redisp.backing.cluster_map import SLOTS, SlotMap, key_slot
from redisp.backing.connection import BackingReplyError, BackingTimeout, BackingUnavailable
from redisp.config import parse_redis_url
from redisp.metrics import Metrics

A, B, C = ("10.0.0.1", 7000), ("10.0.0.2", 7000), ("10.0.0.3", 7000)


class FakeNode:
    """One master's Backing: records commands; answers when told."""

    def __init__(self, address):
        self.address = address
        self.sent: list[tuple[bytes, ...]] = []
        self.pending: list[Deferred] = []
        self.batches: list[list[tuple[bytes, ...]]] = []  # the commands of each call_many
        self.up = True
        self.state = "up"
        self.started = self.stopped = False
        self.suspected = 0

    def call(self, *args):
        self.sent.append(args)
        d = Deferred()
        self.pending.append(d)
        return d

    def call_many(self, commands):
        """As Backing.call_many: the commands (decoded) are recorded and
        answered one by one; an error reply takes its place in the list, any
        other failure fails the lot."""
        commands = [decode_command(c) for c in commands]
        self.batches.append(commands)
        result = Deferred()
        replies: list = [None] * len(commands)
        left = [len(commands)]

        def got(value, index):
            if result.called:
                return
            if isinstance(value, Failure):
                if not value.check(BackingReplyError):
                    result.errback(value)
                    return
                value = value.value
            replies[index] = value
            left[0] -= 1
            if not left[0]:
                result.callback(replies)

        for index, command in enumerate(commands):
            self.call(*command).addBoth(got, index)
        return result

    def ping(self):
        return self.call(b"PING")

    def answer(self, value, index=0):
        d = self.pending.pop(index)
        if isinstance(value, Exception):
            d.errback(Failure(value))
        else:
            d.callback(value)

    def start(self):
        self.started = True

    def stop(self):
        self.stopped = True
        return succeed(None)

    def suspect(self):
        self.suspected += 1


def decode_command(data: bytes) -> tuple[bytes, ...]:
    """The arguments of one ``encode_command`` (no CR LF in them here)."""
    parts = data.split(b"\r\n")
    count = int(parts[0][1:])
    assert len(parts) == 2 * count + 2 and parts[-1] == b"", data
    return tuple(parts[2:2 * count + 1:2])


class FakeTopology:
    """The parts of ClusterTopology the backing uses; ``moved`` installs as the real one."""

    def __init__(self, current=None):
        self.url = parse_redis_url("redis+cluster://10.0.0.1:7000")
        self.map = current
        self.listeners = []
        self.moves: list = []
        self.asks = 0
        self.refreshes = 0
        self.known: list[Deferred] = []

    def on_change(self, listener):
        self.listeners.append(listener)

    def install(self, new):
        old, self.map = self.map, new
        for listener in self.listeners:
            listener(old, new)
        known, self.known = self.known, []
        for d in known:
            d.callback(new)

    def moved(self, slot, address):
        self.moves.append((slot, address))
        self.install(self.map.with_slot(slot, address))

    def asked(self):
        self.asks += 1

    def refresh(self):
        self.refreshes += 1
        return Deferred()

    def when_known(self):
        if self.map is not None:
            return succeed(self.map)
        d = Deferred()
        self.known.append(d)
        return d

    def node_url(self, address):
        return self.url.at(*address)


def thirds():
    """A: slots 0-5460, B: 5461-10922, C: 10923-16383, as redis-cli makes them."""
    return SlotMap.from_ranges({A: [(0, 5460)], B: [(5461, 10922)], C: [(10923, SLOTS - 1)]})


def key_on(address, current, prefix="k", skip=()):
    for i in range(100000):
        key = f"{prefix}{i}".encode()
        if current.master(key_slot(key)) == address and key not in skip:
            return key
    raise AssertionError


def setup(current=None):
    clock = Clock()
    topology = FakeTopology(thirds() if current is None else current)
    nodes: dict = {}

    def make(address):
        nodes[address] = node = FakeNode(address)
        return node

    backing = ClusterBacking(topology, 1.0, clock, Metrics(started=0.0), clock=clock,
                             make_node=make)
    backing.start()
    return clock, topology, backing, nodes


def fetch(backing, key):
    got: list = []
    backing.fetch(key, got.append)
    return got


def test_a_lone_miss_is_one_get_to_its_slots_master():
    clock, topology, backing, nodes = setup()
    key = key_on(B, topology.map)
    got = fetch(backing, key)
    assert nodes[B].sent == []  # not before the end of the turn
    clock.advance(0)
    assert nodes[B].sent == [(b"GET", key)]
    assert nodes[A].sent == nodes[C].sent == []
    nodes[B].answer(b"v")
    assert got == [b"v"]


def test_the_misses_of_one_turn_go_one_mget_per_slot_to_each_master():
    """Redis Cluster refuses an MGET across slots (CROSSSLOT, even on one
    node): keys sharing a hashtag share an MGET, the others go alone; every
    command of the turn is written in that turn (pipelined)."""
    clock, topology, backing, nodes = setup()
    tag = [b"{user1}a", b"{user1}b", b"{user1}c"]
    tagged_master = topology.map.master(key_slot(b"user1"))
    other = key_on(tagged_master, topology.map, skip=tag)
    elsewhere = key_on(C if tagged_master != C else A, topology.map)
    results = {key: fetch(backing, key) for key in [*tag, other, elsewhere]}
    clock.advance(0)
    assert sorted(nodes[tagged_master].sent) == sorted([(b"MGET", *tag), (b"GET", other)])
    far = nodes[C if tagged_master != C else A]
    assert far.sent == [(b"GET", elsewhere)]
    tagged = nodes[tagged_master]
    mget_index = tagged.sent.index((b"MGET", *tag))
    tagged.answer([b"1", b"2", b"3"], mget_index)
    tagged.answer(b"o")
    far.answer(None)
    assert [results[k] for k in tag] == [[b"1"], [b"2"], [b"3"]]
    assert results[other] == [b"o"] and results[elsewhere] == [None]


def test_a_nil_in_an_mget_is_asked_again_with_get():
    clock, topology, backing, nodes = setup()
    a, b = b"{t}a", b"{t}b"
    ra, rb = fetch(backing, a), fetch(backing, b)
    clock.advance(0)
    node = nodes[topology.map.master(key_slot(a))]
    node.answer([b"x", None])
    assert ra == [b"x"] and rb == []
    assert node.sent[-1] == (b"GET", b)
    node.answer(BackingReplyError("WRONGTYPE Operation against a key holding the wrong kind"))
    assert rb[0].check(BackingReplyError)


def test_a_large_turn_on_one_slot_is_split_into_batches():
    clock, topology, backing, nodes = setup()
    keys = [b"{s}%d" % i for i in range(MAX_BATCH + 3)]
    for key in keys:
        fetch(backing, key)
    clock.advance(0)
    node = nodes[topology.map.master(key_slot(b"s"))]
    assert [len(c) - 1 for c in node.sent] == [MAX_BATCH, 3]


def test_moved_moves_the_slot_and_retries_at_the_new_master():
    clock, topology, backing, nodes = setup()
    key = key_on(A, topology.map)
    slot = key_slot(key)
    got = fetch(backing, key)
    clock.advance(0)
    nodes[A].answer(BackingReplyError(f"MOVED {slot} 10.0.0.2:7000"))
    assert topology.moves == [(slot, B)]
    assert nodes[B].sent == [(b"GET", key)]
    nodes[B].answer(b"v")
    assert got == [b"v"]
    # later misses of that slot go straight to B
    fetch(backing, key)
    clock.advance(0)
    assert nodes[B].sent[-1] == (b"GET", key) and len(nodes[A].sent) == 1


def test_moved_to_a_node_not_yet_known_connects_to_it():
    clock, topology, backing, nodes = setup()
    key = key_on(A, topology.map)
    got = fetch(backing, key)
    clock.advance(0)
    nodes[A].answer(BackingReplyError(f"MOVED {key_slot(key)} 10.0.0.9:7001"))
    new = nodes[("10.0.0.9", 7001)]
    assert new.started and new.sent == [(b"GET", key)]
    new.answer(b"v")
    assert got == [b"v"]


def test_ask_sends_asking_and_the_command_back_to_back_to_the_target_once():
    clock, topology, backing, nodes = setup()
    key = key_on(A, topology.map)
    slot = key_slot(key)
    before = topology.map
    got = fetch(backing, key)
    clock.advance(0)
    nodes[A].answer(BackingReplyError(f"ASK {slot} 10.0.0.2:7000"))
    assert nodes[B].sent == [(b"ASKING",), (b"GET", key)]
    assert topology.map is before and topology.moves == [] and topology.asks == 1
    nodes[B].answer(b"OK")
    nodes[B].answer(b"v")
    assert got == [b"v"]
    fetch(backing, key)  # the next miss asks the slot's owner again
    clock.advance(0)
    assert nodes[A].sent[-1] == (b"GET", key)


def test_tryagain_on_a_migrating_slots_mget_sends_each_key_alone():
    clock, topology, backing, nodes = setup()
    a, b = b"{m}a", b"{m}b"
    master = topology.map.master(key_slot(a))
    ra, rb = fetch(backing, a), fetch(backing, b)
    clock.advance(0)
    node = nodes[master]
    node.answer(BackingReplyError("TRYAGAIN Multiple keys request during rehashing of slot"))
    assert node.sent[1:] == [(b"GET", a), (b"GET", b)]
    node.answer(b"1")
    node.answer(b"2")
    assert ra == [b"1"] and rb == [b"2"]


def test_redirections_are_bounded_then_the_key_fails_as_unavailable():
    clock, topology, backing, nodes = setup()
    key = key_on(A, topology.map)
    slot = key_slot(key)
    got = fetch(backing, key)
    clock.advance(0)
    hops = [A, B, A, B, A]
    for here, there in zip(hops, hops[1:]):
        if got:
            break
        nodes[here].answer(BackingReplyError(f"MOVED {slot} {there[0]}:{there[1]}"))
    assert len(topology.moves) == MAX_REDIRECTIONS
    [failure] = got
    assert failure.check(BackingUnavailable)
    assert "redirections" in str(failure.value) and "MOVED" in str(failure.value)
    assert str(failure.value).startswith("backing redis unavailable (")


def test_a_call_failed_on_a_master_the_map_has_since_replaced_goes_to_the_new_one():
    """A failover seen while the GET was in flight: the old master's
    connection fails, the GET goes to the slot's new master."""
    clock, topology, backing, nodes = setup()
    key = key_on(A, topology.map)
    got = fetch(backing, key)
    clock.advance(0)
    topology.install(SlotMap.from_ranges({("10.0.0.4", 7000): [(0, 5460)], B: [(5461, 10922)],
                                          C: [(10923, SLOTS - 1)]}))
    assert nodes[A].stopped
    nodes[A].answer(BackingUnavailable("backing redis unavailable (connection lost)"))
    promoted = nodes[("10.0.0.4", 7000)]
    assert promoted.sent == [(b"GET", key)]
    promoted.answer(b"v")
    assert got == [b"v"]


def test_an_unreachable_master_fails_as_a_server_down_and_has_the_map_read_again():
    clock, topology, backing, nodes = setup()
    keys = [key_on(A, topology.map, prefix) for prefix in ("a", "b", "c")]
    key = keys[0]
    got = [fetch(backing, k) for k in keys]
    clock.advance(0)
    error = BackingUnavailable("backing redis unavailable (Connection refused)")
    for _ in range(3):
        nodes[A].answer(error)
    assert all(g[0].value is error for g in got)
    assert topology.refreshes == 1  # at most one per REFRESH_AFTER_FAILURE
    clock.advance(REFRESH_AFTER_FAILURE)
    later = fetch(backing, key)
    clock.advance(0)
    nodes[A].answer(error)
    assert later[0].value is error and topology.refreshes == 2


def test_a_timeout_is_reported_as_such_and_reads_no_map():
    clock, topology, backing, nodes = setup()
    got = fetch(backing, key_on(A, topology.map))
    clock.advance(0)
    nodes[A].answer(BackingTimeout("backing redis timed out after 1s"))
    assert got[0].check(BackingTimeout) and topology.refreshes == 0


def test_without_a_map_misses_wait_for_one_read_and_fail_with_its_error():
    clock, topology, backing, nodes = setup(current=None)
    topology.map = None
    got = fetch(backing, b"k")
    clock.advance(0)
    assert got == [] and len(topology.known) == 1
    error = BackingUnavailable("backing redis unavailable (127.0.0.1:7000: Connection refused)")
    topology.known.pop().errback(Failure(error))
    assert got[0].value is error


def test_misses_waiting_for_the_first_map_go_out_once_it_is_read():
    clock, topology, backing, nodes = setup(current=None)
    topology.map = None
    got = fetch(backing, b"k")
    clock.advance(0)
    topology.install(thirds())
    master = topology.map.master(key_slot(b"k"))
    assert nodes[master].sent == [(b"GET", b"k")] and nodes[master].started
    nodes[master].answer(b"v")
    assert got == [b"v"]


def test_a_slot_without_a_master_fails_at_once_as_unavailable():
    clock, topology, backing, nodes = setup(SlotMap.from_ranges({A: [(0, 5460)]}))
    key = key_on(None, topology.map)
    got = fetch(backing, key)
    clock.advance(0)
    assert got[0].check(BackingUnavailable) and "no cluster master" in str(got[0].value)
    assert topology.refreshes == 1


def test_mget_splits_by_slot_and_merges_in_request_order():
    clock, topology, backing, nodes = setup()
    current = topology.map
    ka, kb, kc = key_on(A, current), key_on(B, current), key_on(C, current)
    result = []
    backing.mget([kc, ka, kb, b"{t}x", b"{t}y"]).addBoth(result.append)
    tagged = nodes[current.master(key_slot(b"t"))]
    assert (b"MGET", b"{t}x", b"{t}y") in tagged.sent
    assert (b"MGET", ka) in nodes[A].sent  # MGET even for one key: nil for a non-string
    for node in nodes.values():
        while node.pending:
            args = node.sent[len(node.sent) - len(node.pending)]
            node.answer([k.upper() if k != kb else None for k in args[1:]])
    assert result == [[kc.upper(), ka.upper(), None, b"{T}X", b"{T}Y"]]


def test_mget_fails_as_a_whole_with_the_first_failure():
    clock, topology, backing, nodes = setup()
    current = topology.map
    result = []
    backing.mget([key_on(A, current), key_on(B, current)]).addBoth(result.append)
    error = BackingTimeout("backing redis timed out after 1s")
    nodes[A].answer(error)
    nodes[B].answer([b"v"])
    assert len(result) == 1 and result[0].value is error


def test_masters_get_a_backing_each_and_lose_it_when_the_map_drops_them():
    clock, topology, backing, nodes = setup()
    assert set(nodes) == {A, B, C} and all(n.started for n in nodes.values())
    topology.install(SlotMap.from_ranges({A: [(0, 10922)], C: [(10923, SLOTS - 1)]}))
    assert nodes[B].stopped and not nodes[A].stopped
    assert backing.up
    nodes[C].up, nodes[C].state = False, "stalled"
    assert not backing.up and backing.state == "stalled"
    nodes[A].up, nodes[A].state = False, "down"
    assert backing.state == "down"


def test_no_map_is_down_and_ping_waits_for_one():
    clock, topology, backing, nodes = setup(current=None)
    topology.map = None
    assert not backing.up and backing.state == "down"
    pinged = []
    backing.ping().addBoth(pinged.append)
    topology.install(thirds())
    for node in nodes.values():
        assert node.sent == [(b"PING",)]
        node.answer(b"PONG")
    assert pinged == [[b"PONG"] * 3]


def test_ping_fails_with_the_first_masters_failure():
    clock, topology, backing, nodes = setup()
    pinged = []
    backing.ping().addBoth(pinged.append)
    error = BackingUnavailable("backing redis unavailable (Connection refused)")
    nodes[B].answer(error)
    nodes[A].answer(b"PONG")
    nodes[C].answer(b"PONG")
    assert pinged[0].value is error


def test_suspect_stalls_only_the_master_named():
    clock, topology, backing, nodes = setup()
    backing.suspect()
    backing.suspect(B)
    assert [nodes[a].suspected for a in (A, B, C)] == [0, 1, 0]


def test_stop_closes_every_master():
    clock, topology, backing, nodes = setup()
    fetch(backing, b"k")
    backing.stop()
    clock.advance(0)
    assert all(n.stopped and n.sent == [] for n in nodes.values())


@pytest.mark.parametrize("text, target", [
    ("MOVED 3999 127.0.0.1:6381", ("127.0.0.1", 6381)),
    ("ASK 3999 [::1]:6381", ("::1", 6381)),
    ("ASK 3999 host.example:30001", ("host.example", 30001)),
])
def test_redirection_targets_are_read_from_the_error(text, target):
    from redisp.backing.cluster_fetch import _target

    assert _target(text.split(" ", 1)[1]) == target


def test_a_malformed_redirection_is_passed_on_as_the_reply_error():
    clock, topology, backing, nodes = setup()
    got = fetch(backing, key_on(A, topology.map))
    clock.advance(0)
    nodes[A].answer(BackingReplyError("MOVED nonsense"))
    assert got[0].check(BackingReplyError)


def test_clusterdown_is_unavailable_and_has_the_map_read_again():
    clock, topology, backing, nodes = setup()
    got = fetch(backing, key_on(A, topology.map))
    clock.advance(0)
    nodes[A].answer(BackingReplyError("CLUSTERDOWN The cluster is down"))
    assert got[0].check(BackingUnavailable)
    assert str(got[0].value) == "backing redis unavailable (CLUSTERDOWN The cluster is down)"
    assert topology.refreshes == 1


# -- one master's commands of a turn: one call_many ----------------------------------------


def keys_on(address, current, count, prefix="k"):
    """``count`` keys of ``address``, each in a slot of its own."""
    found: list[bytes] = []
    for i in range(100000):
        key = f"{prefix}{i}".encode()
        if current.master(key_slot(key)) == address and \
                key_slot(key) not in {key_slot(k) for k in found}:
            found.append(key)
            if len(found) == count:
                return found
    raise AssertionError


def test_one_masters_commands_of_a_turn_go_as_one_batch_a_lone_one_as_a_call():
    """Every command for one master in the turn goes in one ``call_many``
    (one write, one timeout): a GET per slot, an MGET for keys sharing a
    hashtag; a master with a single command gets a plain ``call``."""
    clock, topology, backing, nodes = setup()
    tag = [b"{user1}a", b"{user1}b"]
    busy = topology.map.master(key_slot(b"user1"))
    spread = keys_on(busy, topology.map, 3)
    other = next(a for a in (A, B, C) if a != busy)
    alone = key_on(other, topology.map)
    got = {key: fetch(backing, key) for key in [spread[0], *tag, *spread[1:], alone]}
    clock.advance(0)
    assert nodes[busy].batches == [[(b"GET", spread[0]), (b"MGET", *tag),
                                    (b"GET", spread[1]), (b"GET", spread[2])]]
    assert nodes[other].batches == [] and nodes[other].sent == [(b"GET", alone)]
    for node in nodes.values():
        while node.pending:
            args = node.sent[len(node.sent) - len(node.pending)]
            node.answer([k.upper() for k in args[1:]] if args[0] == b"MGET" else args[1] * 2)
    assert all(got[k] == [k * 2] for k in [*spread, alone])
    assert got[tag[0]] == [tag[0].upper()] and got[tag[1]] == [tag[1].upper()]


def test_a_redirection_in_a_batch_is_followed_for_its_keys_only():
    clock, topology, backing, nodes = setup()
    a, b = keys_on(A, topology.map, 2)
    metrics = backing._metrics
    ra, rb = fetch(backing, a), fetch(backing, b)
    clock.advance(0)
    assert nodes[A].batches == [[(b"GET", a), (b"GET", b)]]
    nodes[A].answer(BackingReplyError(f"MOVED {key_slot(a)} 10.0.0.2:7000"))
    nodes[A].answer(b"vb")
    assert rb == [b"vb"] and ra == []
    assert topology.moves == [(key_slot(a), B)] and nodes[B].sent == [(b"GET", a)]
    assert metrics.backing_errors == {"reply": 1}  # as a lone GET's MOVED is counted
    nodes[B].answer(b"va")
    assert ra == [b"va"]


def test_an_error_reply_in_a_batch_is_that_keys_failure():
    clock, topology, backing, nodes = setup()
    a, b = keys_on(A, topology.map, 2)
    ra, rb = fetch(backing, a), fetch(backing, b)
    clock.advance(0)
    nodes[A].answer(b"va")
    nodes[A].answer(BackingReplyError("WRONGTYPE Operation against a key holding the wrong"))
    assert ra == [b"va"] and rb[0].check(BackingReplyError)
    assert str(rb[0].value).startswith("WRONGTYPE")


def test_clusterdown_in_a_batch_is_unavailable():
    clock, topology, backing, nodes = setup()
    a, b = keys_on(A, topology.map, 2)
    ra, rb = fetch(backing, a), fetch(backing, b)
    clock.advance(0)
    for _ in range(2):
        nodes[A].answer(BackingReplyError("CLUSTERDOWN The cluster is down"))
    assert ra[0].check(BackingUnavailable) and rb[0].check(BackingUnavailable)
    errors = backing._metrics.backing_errors
    assert errors["unavailable"] == 2 and not errors["reply"]
    assert topology.refreshes == 1


def test_a_batch_that_times_out_fails_each_key_as_a_timeout():
    clock, topology, backing, nodes = setup()
    keys = keys_on(A, topology.map, 3)
    got = [fetch(backing, k) for k in keys]
    clock.advance(0)
    error = BackingTimeout("backing redis timed out after 1s")
    nodes[A].answer(error)
    assert all(g[0].value is error for g in got) and topology.refreshes == 0


def test_a_batch_failed_on_a_master_since_replaced_goes_to_the_new_one():
    clock, topology, backing, nodes = setup()
    keys = keys_on(A, topology.map, 2)
    got = [fetch(backing, k) for k in keys]
    clock.advance(0)
    promoted_address = ("10.0.0.4", 7000)
    topology.install(SlotMap.from_ranges({promoted_address: [(0, 5460)], B: [(5461, 10922)],
                                          C: [(10923, SLOTS - 1)]}))
    nodes[A].answer(BackingUnavailable("backing redis unavailable (connection lost)"))
    promoted = nodes[promoted_address]
    assert sorted(promoted.sent) == sorted([(b"GET", k) for k in keys])
    promoted.answer(b"1")
    promoted.answer(b"2")
    assert sorted(g[0] for g in got) == [b"1", b"2"]


def test_a_huge_turn_on_one_master_is_split_into_batches():
    clock, topology, backing, nodes = setup(SlotMap.from_ranges({A: [(0, SLOTS - 1)]}))
    keys = [b"k%d" % i for i in range(2000)]
    slots = len({key_slot(k) for k in keys})
    for key in keys:
        fetch(backing, key)
    clock.advance(0)
    sizes = [len(batch) for batch in nodes[A].batches]
    assert sum(sizes) == slots and max(sizes) == MAX_BATCH
