"""Forwarded commands in front of a real Redis Cluster (SPEC §10, routing/cluster.py).

A plain (non-cluster) client talks to redisp as to one Redis: every key
reaches its slot's master, multi-key commands are split and merged as
redis-py's ``RedisCluster`` would have them, keyspace-wide commands cover
every master, and a slot moved while redisp serves it is followed without
a MOVED or ASK reaching the client.

Clients are raw RESP connections on the reactor (reply bytes as sent); the
references are redis-py's ``RedisCluster`` and plain connections to the
nodes.  A request is made "forwarded" where redisp would answer it from the
cache (MGET) by pipelining it behind a forwarded command: the route a
client's MGET takes right after its own write.
"""

from __future__ import annotations

import pytest
import pytest_twisted
from twisted.internet import defer, threads

from redisp.backing.cluster_map import key_slot
from redisp.protocol.frames import decode
from redisp.routing.cluster import CROSSSLOT, EXECABORT
from tests.raw_redis import replies
from tests.resp_client import connect
from tests.support import until

inline = pytest_twisted.inlineCallbacks


def flush_cluster(cluster) -> None:
    for _host, port in cluster.masters():
        client = cluster.client(port)
        client.flushall()
        client.close()


@pytest.fixture
def cluster_proxy(redis_cluster, start_proxy):
    """A proxy in front of the session's cluster, emptied; its table read."""
    flush_cluster(redis_cluster)
    proxy = start_proxy(redis_cluster.url)
    pytest_twisted.blockon(until(lambda: proxy.proxy.forwarder.table is not None))
    return proxy


@pytest.fixture
def reference(redis_cluster):
    """redis-py's RedisCluster on the same cluster."""
    client = redis_cluster.cluster_client()
    yield client
    client.close()


def keys_on_every_master(cluster, per_master: int = 4, prefix: str = "key") -> list[bytes]:
    """Keys spread over every master and many slots."""
    current = cluster.slot_map()
    wanted = {m: per_master for m in current.masters}
    found: list[bytes] = []
    i = 0
    while any(wanted.values()):
        key = f"{prefix}:{i}".encode()
        master = current.master(key_slot(key))
        if wanted.get(master):
            wanted[master] -= 1
            found.append(key)
        i += 1
    return found


@defer.inlineCallbacks
def client_of(proxy, resp3: bool = False):
    client = yield connect(proxy.resp_port)
    if resp3:
        yield client.call("HELLO", "3")
    return client


def in_thread(f, *args):
    return threads.deferToThread(f, *args)


# -- routed ------------------------------------------------------------------------------


@inline
def test_reads_and_writes_reach_every_slot_range(cluster_proxy, redis_cluster):
    """A key at each end of every master's slot ranges is written and read
    through redisp, and is on that master when asked directly."""
    current = redis_cluster.slot_map()
    wanted = {}
    for master, spans in current.ranges().items():
        for first, last in spans:
            for slot in (first, last):
                wanted[slot] = master
    keys = {}
    i = 0
    while len(keys) < len(wanted):
        key = f"edge:{i}".encode()
        if key_slot(key) in wanted and key_slot(key) not in keys:
            keys[key_slot(key)] = key
        i += 1
    client = yield client_of(cluster_proxy)
    for slot, key in keys.items():
        assert (yield client.call("SET", key, b"v" + key)) == b"+OK\r\n"
        assert (yield client.call("APPEND", key, "!")) == b":%d\r\n" % (len(key) + 2)
        assert (yield client.call("GETRANGE", key, "0", "-1")) == (
            b"$%d\r\nv%b!\r\n" % (len(key) + 2, key))
        direct = redis_cluster.client(wanted[slot][1])
        assert direct.get(key) == b"v" + key + b"!"
        direct.close()


@inline
def test_split_commands_match_redis_cluster(cluster_proxy, reference, redis_cluster):
    keys = keys_on_every_master(redis_cluster, 5)
    present = keys[::2]
    for key in present:
        reference.set(key, b"value-" + key)
    absent = [b"absent:" + k for k in keys[:3]]
    asked = keys + absent
    for resp3 in (False, True):
        client = yield client_of(cluster_proxy, resp3)
        frames = yield client.pipeline(["EXISTS", "warm"], ["MGET", *asked],
                                       ["EXISTS", *asked], ["TOUCH", *asked])
        assert decode(frames[1]) == reference.mget_nonatomic(asked)
        assert decode(frames[2]) == reference.exists(*asked) == len(present)
        assert decode(frames[3]) == len(present)
        yield client.close()
    client = yield client_of(cluster_proxy)
    pairs = [x for k in keys for x in (k, b"new-" + k)]
    assert (yield client.call("MSET", *pairs)) == b"+OK\r\n"
    assert reference.mget_nonatomic(keys) == [b"new-" + k for k in keys]
    assert (yield client.call("DEL", *keys[:6], *absent)) == b":6\r\n"
    assert (yield client.call("UNLINK", *keys)) == b":%d\r\n" % (len(keys) - 6)
    assert reference.exists(*keys) == 0


@inline
def test_a_split_write_drops_every_key_it_wrote_from_the_cache(cluster_proxy, redis_cluster):
    keys = keys_on_every_master(redis_cluster, 2)
    cache = cluster_proxy.proxy.cache
    for key in keys:
        cache.put(key, b"old")
    client = yield client_of(cluster_proxy)
    assert (yield client.call("DEL", *keys)) == b":0\r\n"
    assert all(cache.get(k) is None for k in keys)


@inline
def test_crossslot_is_the_clusters_own_reply(cluster_proxy, redis_cluster):
    a, b = keys_on_every_master(redis_cluster, 1)[:2]
    [theirs] = replies(redis_cluster.masters()[0][1], [["SUNIONSTORE", a, a, b]])
    client = yield client_of(cluster_proxy)
    ours = yield client.call("SUNIONSTORE", a, a, b)
    assert ours == theirs == CROSSSLOT
    assert (yield client.call("RENAME", a, b)) == CROSSSLOT
    # keys of one slot ({tag}) are fine
    assert (yield client.call("SUNIONSTORE", "{t}a", "{t}b", "{t}c")) == b":0\r\n"


@inline
def test_select_of_another_db_gets_the_clusters_own_error(cluster_proxy, redis_cluster):
    [theirs] = replies(redis_cluster.ports[0], [["SELECT", "1"]])
    client = yield client_of(cluster_proxy)
    assert (yield client.call("SELECT", "1")) == theirs
    assert theirs.startswith(b"-ERR SELECT is not allowed in cluster mode")
    assert (yield client.call("SELECT", "0")) == b"+OK\r\n"


# -- every master --------------------------------------------------------------------


@inline
def test_keyspace_commands_cover_every_master(cluster_proxy, reference, redis_cluster):
    keys = keys_on_every_master(redis_cluster, 12, prefix="ks")
    for key in keys:
        reference.set(key, b"1")
    client = yield client_of(cluster_proxy)
    assert (yield client.call("DBSIZE")) == b":%d\r\n" % len(keys)
    assert sorted(decode((yield client.call("KEYS", "ks:*")))) == sorted(keys)
    assert decode((yield client.call("RANDOMKEY"))) in keys
    seen: list[bytes] = []
    cursor = b"0"
    for _ in range(1000):
        cursor, batch = decode((yield client.call("SCAN", cursor, "COUNT", "5")))
        seen += batch
        if cursor == b"0":
            break
    assert sorted(seen) == sorted(keys)  # every key, exactly once
    assert (yield client.call("FLUSHALL")) == b"+OK\r\n"
    assert (yield client.call("DBSIZE")) == b":0\r\n"
    assert reference.dbsize() == 0
    assert (yield client.call("RANDOMKEY")) == b"$-1\r\n"


# -- pinned ----------------------------------------------------------------------------


@inline
def test_multi_exec_in_one_slot_on_every_master(cluster_proxy, reference, redis_cluster):
    """Whichever master the transaction's slot is on (the pin starts on
    one, and moves with what it queued when the first key is elsewhere)."""
    client = yield client_of(cluster_proxy)
    for _host, port in redis_cluster.masters():
        tag = redis_cluster.key_in_slot_of(port, "tag").decode()
        a, b = f"{{{tag}}}a", f"{{{tag}}}b"
        frames = yield client.pipeline(["MULTI"], ["PING"], ["SET", a, "1"], ["INCR", b],
                                       ["EXEC"])
        assert frames == [b"+OK\r\n", b"+QUEUED\r\n", b"+QUEUED\r\n", b"+QUEUED\r\n",
                          b"*3\r\n+PONG\r\n+OK\r\n:1\r\n"]
        assert reference.get(a) == b"1" and reference.get(b) == b"1"


@inline
def test_multi_across_slots_answers_crossslot_and_aborts(cluster_proxy, reference,
                                                         redis_cluster):
    a, b = keys_on_every_master(redis_cluster, 1)[:2]
    client = yield client_of(cluster_proxy)
    frames = yield client.pipeline(["MULTI"], ["SET", a, "1"], ["SET", b, "2"], ["EXEC"])
    assert frames == [b"+OK\r\n", b"+QUEUED\r\n", CROSSSLOT, EXECABORT]
    assert reference.exists(a, b) == 0
    # the client is unpinned and works on
    assert (yield client.call("SET", b, "3")) == b"+OK\r\n"
    assert cluster_proxy.proxy.metrics.pinned_clients == 0


@inline
def test_watch_then_transaction_on_the_watched_slot(cluster_proxy, reference, redis_cluster):
    a = keys_on_every_master(redis_cluster, 1)[1]
    client = yield client_of(cluster_proxy)
    frames = yield client.pipeline(["WATCH", a], ["MULTI"], ["SET", a, "1"], ["EXEC"])
    assert frames == [b"+OK\r\n", b"+OK\r\n", b"+QUEUED\r\n", b"*1\r\n+OK\r\n"]
    # a write behind WATCH makes EXEC fail, as on Redis
    other = yield client_of(cluster_proxy)
    assert (yield client.call("WATCH", a)) == b"+OK\r\n"
    assert (yield other.call("SET", a, "2")) == b"+OK\r\n"
    frames = yield client.pipeline(["MULTI"], ["SET", a, "3"], ["EXEC"])
    assert frames[-1] == b"*-1\r\n"
    assert reference.get(a) == b"2"


@inline
def test_blpop_on_the_keys_node_is_woken_by_an_lpush_through_redisp(cluster_proxy,
                                                                     redis_cluster):
    keys = keys_on_every_master(redis_cluster, 1)
    waiter = yield client_of(cluster_proxy)
    pusher = yield client_of(cluster_proxy)
    for key in keys:
        waiter.send(["BLPOP", key, "0"])
        yield until(lambda: cluster_proxy.proxy.metrics.pinned_clients == 1)
        assert (yield pusher.call("LPUSH", key, "x")) == b":1\r\n"
        [frame] = yield waiter.read()
        assert decode(frame) == [key, b"x"]


@inline
def test_subscribe_gets_what_is_published_through_redisp(cluster_proxy, redis_cluster):
    subscriber = yield client_of(cluster_proxy, resp3=True)
    publisher = yield client_of(cluster_proxy)
    [confirm] = yield subscriber.pipeline(["SUBSCRIBE", "news"])
    assert decode(confirm) == [b"subscribe", b"news", 1]
    # cluster pub/sub is broadcast: whichever node each side is on
    for n in range(3):
        yield publisher.call("PUBLISH", "news", f"m{n}")
        [message] = yield subscriber.read()
        assert decode(message) == [b"message", b"news", f"m{n}".encode()]
    # sharded pub/sub: the channel's slot
    sharded = yield client_of(cluster_proxy, resp3=True)
    [confirm] = yield sharded.pipeline(["SSUBSCRIBE", "{s}chan"])
    assert decode(confirm) == [b"ssubscribe", b"{s}chan", 1]
    assert (yield publisher.call("SPUBLISH", "{s}chan", "hi")) == b":1\r\n"
    [message] = yield sharded.read()
    assert decode(message) == [b"smessage", b"{s}chan", b"hi"]
    a, b = keys_on_every_master(redis_cluster, 1)[:2]
    assert (yield publisher.call("SPUBLISH", a, "x")) == b":0\r\n"
    second = yield client_of(cluster_proxy)
    assert (yield second.call("SSUBSCRIBE", a, b)) == CROSSSLOT


# -- a slot moving ---------------------------------------------------------------------


@inline
def test_a_slot_migrated_while_served_is_followed(cluster_proxy, redis_cluster):
    """MOVED after the migration and ASK during it are followed: the client
    only ever sees its own replies."""
    client = yield client_of(cluster_proxy)
    key = b"{mig}one"
    slot = key_slot(key)
    source = redis_cluster.node_for(key)[1]
    target = next(p for _, p in redis_cluster.masters() if p != source)
    assert (yield client.call("SET", key, "1")) == b"+OK\r\n"
    metrics = cluster_proxy.proxy.metrics

    # ASK: half-way, a key not yet moved is on the source, a new one on the target
    yield in_thread(redis_cluster.start_migration, slot, target)
    try:
        assert (yield client.call("INCR", key)) == b":2\r\n"  # still on the source
        yield in_thread(redis_cluster.move_keys, slot, source, target)
        assert (yield client.call("INCR", key)) == b":3\r\n"  # ASK -> target
        assert (yield client.call("SET", b"{mig}two", "x")) == b"+OK\r\n"
        assert metrics.cluster_asked >= 1
    finally:
        yield in_thread(redis_cluster.finish_migration, slot, target, source)
    direct = redis_cluster.client(target)
    assert direct.get(key) == b"3" and direct.get(b"{mig}two") == b"x"
    direct.close()

    # MOVED: the map redisp has still says the source
    moved_before = metrics.cluster_moved
    stale = cluster_proxy.proxy.topology.map.master(slot) == ("127.0.0.1", source)
    frames = yield client.pipeline(["INCR", key], ["MGET", key, "{mig}two"], ["DEL", "{mig}two"])
    assert frames == [b":4\r\n", b"*2\r\n$1\r\n4\r\n$1\r\nx\r\n", b":1\r\n"]
    # back where it was (the cluster as the other tests found it)
    yield in_thread(redis_cluster.migrate_slot, slot, source)
    frames = yield client.pipeline(["INCR", key], ["EXISTS", key])
    assert frames == [b":5\r\n", b":1\r\n"]
    assert metrics.cluster_moved > moved_before
    if stale:  # (unless a periodic read of the map came first)
        assert metrics.cluster_moved > moved_before

    # a transaction whose slot moved: pinned on the old node, MOVED, then there
    yield in_thread(redis_cluster.migrate_slot, slot, target)
    frames = yield client.pipeline(["MULTI"], ["INCR", key], ["INCR", key], ["EXEC"])
    assert frames == [b"+OK\r\n", b"+QUEUED\r\n", b"+QUEUED\r\n", b"*2\r\n:6\r\n:7\r\n"]
    # and a blocking command
    yield in_thread(redis_cluster.migrate_slot, slot, source)
    frames = yield client.pipeline(["RPUSH", "{mig}list", "a"], ["BLPOP", "{mig}list", "0"])
    assert frames == [b":1\r\n", b"*2\r\n$9\r\n{mig}list\r\n$1\r\na\r\n"]
