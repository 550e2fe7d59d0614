"""GETs through redisp in front of a real Redis Cluster (SPEC §10).

Every test uses the session's 3-master cluster (tests/cluster_support.py),
keys of its own, and never assumes which node is a master.  Tests that
change the topology leave the cluster healthy.  Waits poll with a deadline.
"""

from __future__ import annotations

import pytest
import pytest_twisted
from twisted.internet import defer, threads

from redisp.backing.cluster_map import key_slot
from tests.support import until

inline = pytest_twisted.inlineCallbacks


def in_thread(f, *args):
    return threads.deferToThread(f, *args)


def cluster_proxy(start_proxy, cluster, **kw):
    kw.setdefault("forward", "none")
    return start_proxy(cluster.url, **kw)


@defer.inlineCallbacks
def ready(p):
    yield until(lambda: p.proxy.backing.up)


def keys_per_master(cluster, prefix, per_master=3):
    """``per_master`` keys in each master's slot ranges (spread over them)."""
    current = cluster.slot_map()
    found: dict = {m: [] for m in current.masters}
    i = 0
    while any(len(v) < per_master for v in found.values()):
        key = f"{prefix}:{i}".encode()
        master = current.master(key_slot(key))
        if len(found[master]) < per_master:
            found[master].append(key)
        i += 1
    return found


@inline
def test_gets_of_keys_on_every_master_through_both_doors(redis_cluster, start_proxy):
    """Misses then hits, for keys in every master's slot ranges, over RESP
    and HTTP (one shared cache), absent keys and a non-string included."""
    writer = redis_cluster.cluster_client()
    keys = [k for ks in keys_per_master(redis_cluster, "every").values() for k in ks]
    for key in keys:
        writer.set(key, b"v-" + key)
    writer.delete("every:absent")
    writer.delete("{every}list")
    writer.rpush("{every}list", "x")
    p = cluster_proxy(start_proxy, redis_cluster)
    yield ready(p)
    r = p.redis_py()
    got = yield in_thread(lambda: [r.get(k) for k in keys])
    assert got == [b"v-" + k for k in keys]
    assert p.proxy.metrics.cache_misses == len(keys)
    again = yield in_thread(lambda: [p.http_get(k.decode()) for k in keys])
    assert [(status, headers["X-Cache"], body) for status, headers, body in again] == \
        [(200, "HIT", b"v-" + k) for k in keys]
    assert p.proxy.metrics.cache_hits == len(keys)
    status, _, _ = yield in_thread(p.http_get, "every:absent")
    assert status == 404
    assert (yield in_thread(r.get, "every:absent")) is None
    status, _, body = yield in_thread(p.http_get, "{every}list")
    assert status == 502 and body.startswith(b"WRONGTYPE")
    with pytest.raises(Exception, match="WRONGTYPE"):
        yield in_thread(r.get, "{every}list")
    # one MGET over every master's slots, hits and misses mixed
    mixed = [*keys, b"every:absent", b"{every}list"]
    assert (yield in_thread(r.mget, mixed)) == [b"v-" + k for k in keys] + [None, None]


@inline
def test_a_turn_of_misses_on_many_slots_is_answered_right(redis_cluster, start_proxy):
    """Pipelined GETs with concurrency: the misses of one turn go out per
    slot to each master together (hashtagged keys sharing an MGET)."""
    writer = redis_cluster.cluster_client()
    keys = [f"turn:{i}".encode() for i in range(40)] + [b"{turn}%d" % i for i in range(10)]
    for key in keys:
        writer.set(key, key[::-1])
    p = cluster_proxy(start_proxy, redis_cluster, concurrency=64)
    yield ready(p)

    def pipelined():
        pipe = p.redis_py().pipeline(transaction=False)
        for key in keys:
            pipe.get(key)
        return pipe.execute()

    assert (yield in_thread(pipelined)) == [k[::-1] for k in keys]
    assert p.proxy.metrics.cache_misses == len(keys)


@inline
def test_healthz_info_and_metrics_see_every_master(redis_cluster, start_proxy):
    p = cluster_proxy(start_proxy, redis_cluster)
    yield ready(p)
    status, _, body = yield in_thread(p.http_path, "/healthz")
    assert (status, body) == (200, b"ok\n")
    info = yield in_thread(p.redis_py().info, "proxy")
    assert info["backing_status"] == "up"
    status, _, body = yield in_thread(p.http_path, "/metrics")
    assert status == 200 and b"redisp_backing_up 1" in body


@inline
def test_no_node_reachable_answers_unavailable_as_a_server_down(start_proxy):
    from tests.support import free_port

    url = f"redis+cluster://127.0.0.1:{free_port()},127.0.0.1:{free_port()}"
    p = start_proxy(url, forward="none", redis_timeout=1.0)
    r = p.redis_py()
    with pytest.raises(Exception, match="backing redis unavailable"):
        yield in_thread(r.get, "k")
    status, _, body = yield in_thread(p.http_get, "k")
    assert status == 503 and b"backing redis unavailable" in body
    status, _, _ = yield in_thread(p.http_path, "/healthz")
    assert status == 503


@inline
def test_a_slot_migrated_while_served_gives_no_wrong_answer(redis_cluster, start_proxy):
    """ASK while the slot's keys are split between the two masters (single
    keys, and an MGET that Redis answers TRYAGAIN), then MOVED once the
    slot belongs to the target: never a redirection to the client, never a
    wrong value."""
    keys = [b"{mig}%d" % i for i in range(6)]
    slot = key_slot(keys[0])
    writer = redis_cluster.cluster_client()
    for key in keys:
        writer.set(key, b"value-" + key)
    source = redis_cluster.node_for(keys[0])
    target = next(m for m in redis_cluster.masters() if m != source)
    # capacity 0: every GET goes to the cluster
    p = cluster_proxy(start_proxy, redis_cluster, capacity=0, concurrency=8)
    yield ready(p)
    r = p.redis_py()
    expected = [b"value-" + k for k in keys]

    def read_all():
        singles = [r.get(k) for k in keys]
        pipe = r.pipeline(transaction=False)
        for key in keys:
            pipe.get(key)
        return singles, pipe.execute(), r.mget(keys)

    assert (yield in_thread(read_all)) == (expected, expected, expected)
    src_port = redis_cluster.start_migration(slot, target[1])
    try:
        # half the keys move: the source answers ASK for those
        reply = redis_cluster.command(src_port, "MIGRATE", "127.0.0.1", str(target[1]), "",
                                      "0", "5000", "KEYS", *keys[:3])
        assert reply == b"OK"
        asked = p.proxy.metrics.cluster_asked
        assert (yield in_thread(read_all)) == (expected, expected, expected)
        assert p.proxy.metrics.cluster_asked > asked
        redis_cluster.move_keys(slot, src_port, target[1])
        assert (yield in_thread(read_all)) == (expected, expected, expected)
    finally:
        redis_cluster.finish_migration(slot, target[1], src_port)
    moved = p.proxy.metrics.cluster_moved
    assert (yield in_thread(read_all)) == (expected, expected, expected)
    assert p.proxy.metrics.cluster_moved > moved  # redisp's map still had the source
    assert p.proxy.topology.map.master(slot) == target
    # and back, so the cluster is as other tests expect it
    redis_cluster.migrate_slot(slot, source[1])
    assert (yield in_thread(read_all)) == (expected, expected, expected)


@inline
def test_a_pipeline_of_misses_over_many_slots_is_answered_as_one_server_would(
        redis_cluster, start_proxy):
    """A turn's misses go to each master as one batch of GETs: values,
    absent keys and WRONGTYPE each in their place, also when one slot of
    the batch has moved to another master since redisp read the map."""
    writer = redis_cluster.cluster_client()
    keys = [f"batch:{i}".encode() for i in range(60)]
    for key in keys:
        writer.set(key, b"v-" + key)
    writer.delete("batch:absent", "batch:list")
    writer.rpush("batch:list", "x")
    p = cluster_proxy(start_proxy, redis_cluster, capacity=0, concurrency=64)
    yield ready(p)
    asked = [*keys[:30], b"batch:absent", b"batch:list", *keys[30:]]

    def pipelined():
        pipe = p.redis_py().pipeline(transaction=False)
        for key in asked:
            pipe.get(key)
        return pipe.execute(raise_on_error=False)

    def check(replies):
        assert replies[:30] == [b"v-" + k for k in keys[:30]]
        assert replies[30] is None
        assert "WRONGTYPE" in str(replies[31])
        assert replies[32:] == [b"v-" + k for k in keys[30:]]

    check((yield in_thread(pipelined)))
    moving = keys[7]
    slot = key_slot(moving)
    source = redis_cluster.node_for(moving)
    target = next(m for m in redis_cluster.masters() if m != source)
    moved = p.proxy.metrics.cluster_moved
    redis_cluster.migrate_slot(slot, target[1])
    try:
        check((yield in_thread(pipelined)))
        assert p.proxy.metrics.cluster_moved > moved  # redisp's map still had the source
    finally:
        redis_cluster.migrate_slot(slot, source[1])
    check((yield in_thread(pipelined)))
