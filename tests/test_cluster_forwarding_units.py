"""routing/cluster.py on fakes: split and merge, the SCAN cursor, redirections.

The router runs on real RelayPools whose connections are StringTransports;
"the nodes" are the test answering each connection's pending calls.  The
end-to-end behaviour against a real cluster is in test_cluster_forwarding.py.
"""

from __future__ import annotations

from collections import defaultdict

from hypothesis import given
from hypothesis import strategies as st
from twisted.internet.defer import succeed
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport

from redisp.backing.cluster_map import SlotMap, key_slot
from redisp.backing.connection import BackingUnavailable
from redisp.config import RedisURL
from redisp.protocol.frames import FrameScanner, decode
from redisp.routing.cluster import (
    CROSSSLOT,
    EXECABORT,
    MAX_REDIRECTS,
    SCAN_BASE,
    ClusterRouter,
    merge,
    scan_cursor,
    scan_position,
    split_parts,
)
from redisp.routing.command_table import CommandTable
from tests.raw_redis import COMMAND_REPLY_FILE, encode

TABLE = CommandTable.from_command_reply(decode(COMMAND_REPLY_FILE.read_bytes()))
A, B = ("127.0.0.1", 7001), ("127.0.0.1", 7002)


def key_on(address, prefix="k", taken=()):
    """A key whose slot the test map gives to ``address`` (A: 0-8191)."""
    for i in range(10000):
        key = f"{prefix}{i}".encode()
        if (key_slot(key) < 8192) == (address == A) and key not in taken:
            return key
    raise AssertionError


class FakeTopology:
    def __init__(self, ranges=None):
        self.map = SlotMap.from_ranges(ranges or {A: [(0, 8191)], B: [(8192, 16383)]})
        self.moves: list = []
        self.asks = 0
        self.listeners: list = []

    def node_url(self, address):
        return RedisURL().at(*address)

    def moved(self, slot, address):
        self.moves.append((slot, address))
        self.change(self.map.with_slot(slot, address))

    def change(self, new):
        old, self.map = self.map, new
        for listener in self.listeners:
            listener(old, new)

    def asked(self):
        self.asks += 1

    def on_change(self, listener):
        self.listeners.append(listener)

    def when_known(self):
        return succeed(self.map)

    def refresh(self):
        return succeed(self.map)


class Nodes:
    """Every connection the router opens, by node port."""

    def __init__(self):
        self.conns = defaultdict(list)

    def connect(self, protocol):
        protocol.makeConnection(StringTransport())
        self.conns[protocol.url.port].append(protocol)
        return succeed(protocol)

    def sent(self, address) -> bytes:
        return b"".join(p.transport.value() for p in self.conns[address[1]])

    def answer(self, address, *frames: bytes) -> None:
        """The node answers its oldest pending calls, one frame each."""
        for frame in frames:
            conn = next(p for p in self.conns[address[1]] if p.waiting)
            conn.dataReceived(frame)


class Setup:
    def __init__(self):
        self.clock = Clock()
        self.topology = FakeTopology()
        self.nodes = Nodes()
        self.router = ClusterRouter(self.topology, 2.0, self.clock,
                                    connect=self.nodes.connect, clock=self.clock)

    def route(self, *argv, resp3=False):
        raw = [a.encode() if isinstance(a, str) else a for a in argv]
        got: list = []
        self.router.route(0, raw, TABLE.lookup(raw), encode(*raw), got.append, resp3)
        return got


# -- pure functions ---------------------------------------------------------------


def test_split_keeps_each_keys_value_with_it_and_slots_in_first_seen_order():
    a1, b1 = key_on(A), key_on(B)
    a2 = key_on(A, taken=(a1,)) if key_slot(key_on(A, taken=(a1,))) == key_slot(a1) else a1
    argv = [b"MSET", a1, b"1", b1, b"2", a2, b"3"]
    parts = split_parts(argv, [1, 3, 5])
    assert parts[0][0] == key_slot(a1) and parts[0][2][:3] == [b"MSET", a1, b"1"]
    assert [b"MSET", b1, b"2"] in [p[2] for p in parts]
    # every key index lands in exactly one part
    assert sorted(i for _, keys, _ in parts for i in keys) == [0, 1, 2]


def test_merge_puts_mget_elements_back_in_key_order():
    replies = [b"*2\r\n$1\r\na\r\n$-1\r\n", b"*1\r\n$1\r\nb\r\n"]
    assert merge("array", replies, [[0, 2], [1]], 3) == b"*3\r\n$1\r\na\r\n$1\r\nb\r\n$-1\r\n"


def test_merge_sums_integers_and_answers_ok():
    assert merge("sum", [b":2\r\n", b":0\r\n", b":5\r\n"]) == b":7\r\n"
    assert merge("ok", [b"+OK\r\n", b"+OK\r\n"]) == b"+OK\r\n"


def test_merge_answers_the_first_failure_then_the_first_error_reply():
    failure = BackingUnavailable("backing redis unavailable (x)")
    assert merge("sum", [b"-ERR one\r\n", failure, b":1\r\n"]) is failure
    assert merge("sum", [b":1\r\n", b"-ERR one\r\n", b"-ERR two\r\n"]) == b"-ERR one\r\n"


def test_merge_concatenates_keys_and_picks_a_present_random_key():
    assert merge("concat", [b"*1\r\n$1\r\na\r\n", b"*0\r\n", b"*1\r\n$1\r\nb\r\n"]) == (
        b"*2\r\n$1\r\na\r\n$1\r\nb\r\n")
    assert merge("random", [b"$-1\r\n", b"$1\r\nz\r\n"], choose=lambda x: x[0]) == b"$1\r\nz\r\n"
    assert merge("random", [b"_\r\n", b"_\r\n"]) == b"_\r\n"


def test_scan_cursor_decodes_to_its_master_and_node_cursor():
    assert scan_position(scan_cursor(2, 77, 3)) == (2, 77)
    assert scan_cursor(0, 0, 3) == 1 and scan_position(1) == (1, 0)
    assert scan_cursor(2, 0, 3) == 0  # the last master is done: so is the scan
    assert scan_cursor(1, 5, 3) == 5 * SCAN_BASE + 1


@given(st.lists(st.lists(st.integers(1, 2**40), max_size=6, unique=True), min_size=1,
                max_size=8))
def test_one_cursor_walks_every_master_page_exactly_once(pages):
    """Master i answers its node cursors ``pages[i]`` in turn (then 0): a
    client that follows the merged cursor from 0 to 0 sees every master's
    every page once, in order, whatever the node cursors are."""
    masters = len(pages)
    seen: list = []
    cursor, steps = 0, 0
    while True:
        index, node_cursor = scan_position(cursor)
        chain = [0] + pages[index]
        at = chain.index(node_cursor)
        seen.append((index, node_cursor))
        following = chain[at + 1] if at + 1 < len(chain) else 0
        cursor = scan_cursor(index, following, masters)
        steps += 1
        assert steps <= sum(len(p) + 1 for p in pages)
        if cursor == 0:
            break
    assert seen == [(i, c) for i in range(masters) for c in [0] + pages[i]]


# -- the router on fake nodes -------------------------------------------------------


def test_a_keyed_command_goes_to_its_slots_master():
    t = Setup()
    a, b = key_on(A), key_on(B)
    got_b = t.route("SET", b, "1")
    got_a = t.route("INCR", a)
    assert t.nodes.sent(B) == encode("SET", b, "1") and t.nodes.sent(A) == encode("INCR", a)
    t.nodes.answer(A, b":1\r\n")
    t.nodes.answer(B, b"+OK\r\n")
    assert got_a == [b":1\r\n"] and got_b == [b"+OK\r\n"]


def test_mget_across_slots_is_split_and_merged_in_key_order():
    t = Setup()
    a, b = key_on(A), key_on(B)
    third = b"nokey-on-?"
    got = t.route("MGET", b, a, third)
    # each node answers every MGET it was asked with "v-<key>" per key
    for address in (A, B):
        for conn in t.nodes.conns[address[1]]:
            requests = FrameScanner().feed(conn.transport.value())
            conn.transport.clear()
            for request in requests:
                keys = decode(request)[1:]
                conn.dataReceived(b"*%d\r\n" % len(keys) + b"".join(
                    b"$%d\r\nv-%b\r\n" % (len(k) + 2, k) for k in keys))
    assert got == [b"*3\r\n" + b"".join(b"$%d\r\nv-%b\r\n" % (len(k) + 2, k)
                                        for k in (b, a, third))]


def test_del_across_slots_sums_and_mset_answers_ok():
    t = Setup()
    a, b = key_on(A), key_on(B)
    got = t.route("DEL", a, b)
    t.nodes.answer(A, b":1\r\n")
    t.nodes.answer(B, b":1\r\n")
    assert got == [b":2\r\n"]
    got = t.route("MSET", a, "1", b, "2")
    assert encode("MSET", b, "2") in t.nodes.sent(B)
    t.nodes.answer(A, b"+OK\r\n")
    t.nodes.answer(B, b"+OK\r\n")
    assert got == [b"+OK\r\n"]


def test_other_multi_key_commands_across_slots_get_crossslot_without_a_call():
    t = Setup()
    a, b = key_on(A), key_on(B)
    assert t.route("SUNIONSTORE", a, a, b) == [CROSSSLOT]
    assert t.route("RENAME", a, b) == [CROSSSLOT]
    assert t.nodes.sent(A) == t.nodes.sent(B) == b""


def test_moved_updates_the_topology_and_retries_on_the_new_node():
    t = Setup()
    a = key_on(A)
    slot = key_slot(a)
    got = t.route("SET", a, "1")
    t.nodes.answer(A, b"-MOVED %d 127.0.0.1:7002\r\n" % slot)
    assert t.topology.moves == [(slot, B)]
    assert t.nodes.sent(B) == encode("SET", a, "1")
    t.nodes.answer(B, b"+OK\r\n")
    assert got == [b"+OK\r\n"]


def test_ask_is_followed_once_with_asking_on_the_same_connection():
    t = Setup()
    a = key_on(A)
    got = t.route("GET", a)
    t.nodes.answer(A, b"-ASK %d 127.0.0.1:7002\r\n" % key_slot(a))
    assert t.nodes.sent(B) == encode("ASKING") + encode("GET", a)
    t.nodes.answer(B, b"+OK\r\n", b"$1\r\nx\r\n")
    assert got == [b"$1\r\nx\r\n"] and t.topology.asks == 1 and t.topology.moves == []


def test_redirections_are_bounded_and_never_reach_the_client():
    t = Setup()
    a = key_on(A)
    slot = key_slot(a)
    got = t.route("GET", a)
    for n in range(MAX_REDIRECTS + 1):
        here, there = (A, B) if n % 2 == 0 else (B, A)
        t.nodes.answer(here, b"-MOVED %d %s:%d\r\n" % (slot, there[0].encode(), there[1]))
    [failure] = got
    assert isinstance(failure, BackingUnavailable) and "redirections" in str(failure)


def test_dbsize_keys_and_flushall_run_on_every_master():
    t = Setup()
    got = t.route("DBSIZE")
    t.nodes.answer(A, b":3\r\n")
    t.nodes.answer(B, b":4\r\n")
    assert got == [b":7\r\n"]
    got = t.route("KEYS", "*")
    t.nodes.answer(A, b"*1\r\n$1\r\na\r\n")
    t.nodes.answer(B, b"*1\r\n$1\r\nb\r\n")
    assert got == [b"*2\r\n$1\r\na\r\n$1\r\nb\r\n"]
    got = t.route("FLUSHALL")
    t.nodes.answer(A, b"+OK\r\n")
    t.nodes.answer(B, b"-READONLY You can't write against a read only replica.\r\n")
    assert got == [b"-READONLY You can't write against a read only replica.\r\n"]


def test_script_load_runs_on_every_master():
    t = Setup()
    got = t.route("SCRIPT", "LOAD", "return 1")
    assert t.nodes.sent(A) == t.nodes.sent(B) == encode("SCRIPT", "LOAD", "return 1")
    sha = b"$40\r\ne0e1f9fabfc9d4800c877a703b823ac0578ff8db\r\n"
    t.nodes.answer(A, sha)
    t.nodes.answer(B, sha)
    assert got == [sha]
    got = t.route("SCRIPT", "EXISTS", "x")  # reads: one master
    asked = encode("SCRIPT", "EXISTS", "x")
    assert (t.nodes.sent(A) + t.nodes.sent(B)).count(asked) == 1 and got == []


def test_scan_goes_through_the_masters_in_turn_under_one_cursor():
    t = Setup()
    got = t.route("SCAN", "0", "COUNT", "5")
    assert t.nodes.sent(A) == encode("SCAN", "0", "COUNT", "5")
    t.nodes.answer(A, b"*2\r\n$2\r\n12\r\n*1\r\n$1\r\na\r\n")
    cursor = 12 * SCAN_BASE
    assert got == [b"*2\r\n$%d\r\n%d\r\n*1\r\n$1\r\na\r\n" % (len(str(cursor)), cursor)]
    got = t.route("SCAN", str(cursor))
    t.nodes.answer(A, b"*2\r\n$1\r\n0\r\n*0\r\n")
    assert got == [b"*2\r\n$1\r\n1\r\n*0\r\n"]  # master 1 next
    got = t.route("SCAN", "1")
    assert t.nodes.sent(B) == encode("SCAN", "0")
    t.nodes.answer(B, b"*2\r\n$1\r\n0\r\n*1\r\n$1\r\nb\r\n")
    assert got == [b"*2\r\n$1\r\n0\r\n*1\r\n$1\r\nb\r\n"]


def test_a_pool_closes_when_its_node_is_no_longer_a_master():
    t = Setup()
    t.route("SET", key_on(B), "1")
    [conn] = t.nodes.conns[B[1]]
    t.topology.change(SlotMap.from_ranges({A: [(0, 16383)]}))
    assert conn.lost or conn._closing


def test_a_transaction_moves_to_its_first_keys_node_with_what_it_queued():
    """MULTI and a keyless command go to any master before a key is known;
    the first keyed command's node gets them again, then the command."""
    t = Setup()
    pin = t.router.pinned()
    got: list = []

    def call(*argv):
        raw = [x.encode() if isinstance(x, str) else x for x in argv]
        pin.call_keyed(raw, TABLE.lookup(raw), encode(*raw), got.append)

    first = pin.node if pin.node is not None else None
    assert first is None
    call("MULTI")
    call("PING")
    opened = pin.node
    other = B if opened == A else A
    key = key_on(other)
    call("SET", key, "1")
    assert pin.node == other
    assert t.nodes.sent(other) == encode("MULTI") + encode("PING") + encode("SET", key, "1")
    call("SET", key_on(opened), "2")  # another slot, inside MULTI
    call("EXEC")
    # held until the first keyed command is answered (it might be MOVED)
    assert got == []
    t.nodes.answer(opened, b"+OK\r\n", b"+QUEUED\r\n")  # the first node's answers
    t.nodes.answer(other, b"+OK\r\n", b"+QUEUED\r\n", b"+QUEUED\r\n")
    assert got[-3:] == [b"+QUEUED\r\n", CROSSSLOT, EXECABORT]
    assert t.nodes.sent(other).endswith(encode("DISCARD"))


def test_without_a_slot_map_commands_fail_as_unavailable_within_the_timeout():
    """No map yet (no node answered): a command waits for one at most
    ``redis_timeout``, then fails as unavailable; never forever."""
    from twisted.internet.defer import Deferred

    t = Setup()
    t.topology.map = None
    pending: list = []
    t.topology.when_known = lambda: pending.append(Deferred()) or pending[-1]
    got = t.route("SET", "k", "1")
    assert got == []
    t.clock.advance(2.0)
    [failure] = got
    assert isinstance(failure, BackingUnavailable) and "slot map" in str(failure)
    # the read that later finds a map does not answer it twice
    t.topology.map = FakeTopology().map
    pending[0].callback(t.topology.map)
    assert len(got) == 1


def test_a_command_waiting_for_the_map_goes_once_it_is_known():
    from twisted.internet.defer import Deferred

    t = Setup()
    known = FakeTopology().map
    t.topology.map = None
    waiting = Deferred()
    t.topology.when_known = lambda: waiting
    got = t.route("SET", key_on(B), "1")
    t.topology.map = known
    waiting.callback(known)
    t.nodes.answer(B, b"+OK\r\n")
    assert got == [b"+OK\r\n"]
    t.clock.advance(2.0)  # the guard timer was cancelled: nothing more
    assert got == [b"+OK\r\n"]


def test_a_pinned_client_with_state_sends_other_nodes_commands_over_the_pools():
    """WATCH on one node, then a command for a key of another: it goes over
    the shared pool of that node, and the pin stays where the WATCH is."""
    t = Setup()
    pin = t.router.pinned()
    got: list = []
    a, b = key_on(A), key_on(B)
    for argv in (["WATCH", a], ["INCR", b]):
        raw = [x.encode() if isinstance(x, str) else x for x in argv]
        pin.call_keyed(raw, TABLE.lookup(raw), encode(*raw), got.append)
    assert pin.node == A and t.nodes.sent(A) == encode("WATCH", a)
    assert t.nodes.sent(B) == encode("INCR", b)
    assert [c for c in t.nodes.conns[B[1]] if c in t.router.pool(B)._pinned] == []


def _every_command(table):
    for info in table.commands.values():
        yield info
        yield from info.subcommands.values()


@given(st.lists(st.binary(min_size=1, max_size=8), min_size=0, max_size=6))
def test_the_one_key_shortcut_routes_as_the_key_specs_do(extra):
    """``single_key`` (the route of GET, SET, INCR … without walking the
    specs) names the same argv index as ``route_keys`` for every command of
    the recorded table that has it, whatever follows the key."""
    checked = 0
    for info in _every_command(TABLE):
        if not info.single_key:
            continue
        name = info.name.split(b"|")
        argv = [*name, *[b"k"] * (abs(info.arity) - len(name)), *extra]
        if not info.arity_ok(argv) or info.single_key >= len(argv):
            continue
        assert info.route_keys(argv) == [info.single_key], info.name
        checked += 1
    assert checked > 50
