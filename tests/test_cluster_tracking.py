"""invalidation: tracking in front of a real Redis Cluster: one tracking
connection per master (SPEC §5, §10).  Waits are for events, polled with a
deadline."""

from __future__ import annotations

import signal

import pytest_twisted
from twisted.internet import defer, threads

from redisp.backing import cluster_map
from redisp.backing.cluster_map import key_slot
from redisp.config import parse_redis_url
from redisp.core import cluster_tracking
from redisp.core.tracking import tracking_support_problem
from tests.support import until
from tests.test_cluster_read import keys_per_master

inline = pytest_twisted.inlineCallbacks


def in_thread(f, *args):
    return threads.deferToThread(f, *args)


def tracking_proxy(start_proxy, cluster, **kw):
    return start_proxy(cluster.url, invalidation="tracking", forward="none", **kw)


@defer.inlineCallbacks
def ready(p):
    yield until(lambda: p.proxy.backing.up and p.proxy.invalidator.active)


def cached(p, key: bytes) -> bool:
    return p.proxy.cache.lifetime(key) is not None


@inline
def test_every_master_and_replica_gets_a_tracking_connection(redis_cluster, start_proxy):
    p = tracking_proxy(start_proxy, redis_cluster)
    yield ready(p)
    nodes = set(redis_cluster.masters()) | set(redis_cluster.replicas())
    assert len(nodes) == 6 and set(p.proxy.invalidator.trackers) == nodes
    assert p.proxy.reader.caching
    status, _, body = yield in_thread(p.http_path, "/healthz")
    assert (status, body) == (200, b"ok\ninvalidation: tracking active\n")


@inline
def test_a_write_made_directly_on_each_master_drops_the_cached_key(redis_cluster, start_proxy):
    per_master = keys_per_master(redis_cluster, "written", per_master=1)
    writer = redis_cluster.cluster_client()
    for [key] in per_master.values():
        writer.set(key, b"old")
    p = tracking_proxy(start_proxy, redis_cluster)
    yield ready(p)
    r = p.redis_py()
    for (_, port), [key] in per_master.items():
        assert (yield in_thread(r.get, key)) == b"old"
        assert (yield in_thread(r.get, key)) == b"old"
        assert cached(p, key)
        redis_cluster.client(port).set(key, b"new")  # straight to that master
        yield until(lambda key=key: not cached(p, key))
        assert (yield in_thread(r.get, key)) == b"new"


@inline
def test_a_read_right_after_a_write_on_a_master_is_never_stale(redis_cluster, start_proxy):
    """Redis sends the invalidation before it acknowledges the write; the
    reader drains every master's tracking socket before a hit."""
    per_master = keys_per_master(redis_cluster, "raw", per_master=1)
    p = tracking_proxy(start_proxy, redis_cluster)
    yield ready(p)

    def write_then_read_each(rounds: int) -> list:
        r = p.redis_py()
        direct = {key: redis_cluster.client(port) for (_, port), [key] in per_master.items()}
        stale = []
        for i in range(rounds):
            for key, client in direct.items():
                value = b"%d" % i
                client.set(key, value)
                got = r.get(key)
                if got != value:
                    stale.append((key, got, value))
                r.get(key)  # a hit, normally
        return stale

    assert (yield in_thread(write_then_read_each, 20)) == []
    assert p.proxy.metrics.cache_hits > 0


@inline
def test_killing_one_masters_tracking_connection_flushes_and_caching_comes_back(
        redis_cluster, start_proxy):
    per_master = keys_per_master(redis_cluster, "killed", per_master=1)
    writer = redis_cluster.cluster_client()
    for [key] in per_master.values():
        writer.set(key, b"v1")
    p = tracking_proxy(start_proxy, redis_cluster)
    yield ready(p)
    r = p.redis_py()
    for [key] in per_master.values():
        assert (yield in_thread(r.get, key)) == b"v1"
    (host, port), [victim_key] = next(iter(per_master.items()))
    flushes = p.proxy.metrics.invalidation_flushes
    redis_cluster.client(port).client_kill_filter(_type="pubsub")
    yield until(lambda: p.proxy.metrics.invalidation_flushes > flushes)
    assert len(p.proxy.cache) == 0
    redis_cluster.client(port).set(victim_key, b"v2")  # maybe nobody watching yet
    assert (yield in_thread(r.get, victim_key)) == b"v2"
    yield ready(p)
    assert (yield in_thread(r.get, victim_key)) == b"v2"
    assert (yield in_thread(r.get, victim_key)) == b"v2"
    assert cached(p, victim_key)  # caching is back
    redis_cluster.client(port).set(victim_key, b"v3")
    yield until(lambda: not cached(p, victim_key))
    assert (yield in_thread(r.get, victim_key)) == b"v3"


@inline
def test_a_slot_moving_away_flushes_the_cache(redis_cluster, start_proxy):
    key = b"{away}k"
    slot = key_slot(key)
    writer = redis_cluster.cluster_client()
    writer.set(key, b"v")
    source = redis_cluster.node_for(key)
    target = next(m for m in redis_cluster.masters() if m != source)
    p = tracking_proxy(start_proxy, redis_cluster)
    yield ready(p)
    r = p.redis_py()
    assert (yield in_thread(r.get, key)) == b"v"
    assert (yield in_thread(r.get, key)) == b"v"
    flushes = p.proxy.metrics.invalidation_flushes
    try:
        yield in_thread(redis_cluster.migrate_slot, slot, target[1])
        yield in_thread(p.proxy.topology.refresh)  # as the periodic read would
        yield until(lambda: p.proxy.topology.map.master(slot) == target)
        assert p.proxy.metrics.invalidation_flushes > flushes
        assert not cached(p, key)
        redis_cluster.client(target[1]).set(key, b"w")
        assert (yield in_thread(r.get, key)) == b"w"
    finally:
        yield in_thread(redis_cluster.migrate_slot, slot, source[1])


def test_the_start_up_check_asks_the_first_seed_that_answers(redis_cluster):
    from tests.support import free_port

    live = redis_cluster.ports[0]
    url = parse_redis_url(f"redis+cluster://127.0.0.1:{free_port()},127.0.0.1:{live}")
    assert tracking_support_problem(url, 1.0) is None
    wrong = parse_redis_url(f"redis+cluster://:nope@127.0.0.1:{free_port()},127.0.0.1:{live}")
    problem = tracking_support_problem(wrong, 1.0)
    assert problem is not None and f"127.0.0.1:{live}" in problem and "nope" not in problem
    nobody = parse_redis_url(f"redis+cluster://127.0.0.1:{free_port()}")
    assert tracking_support_problem(nobody, 1.0) is None


@inline
def test_a_write_on_a_just_promoted_replica_is_invalidated_before_the_map_is_read(
        redis_cluster, start_proxy, monkeypatch):
    """The failover window: after ``CLUSTER FAILOVER``, before redisp reads
    the new map, a write made directly on the new master must still drop the
    cached key.  The old master (now its replica) is frozen (SIGSTOP), so it
    cannot relay the invalidation; only the connection redisp held to the
    replica before its promotion can.  redisp's map reads are held off, so
    nothing else flushes the cache meanwhile."""
    monkeypatch.setattr(cluster_tracking, "FOLLOW_SECONDS", 3600.0)
    monkeypatch.setattr(cluster_map, "REFRESH_SECONDS", 3600.0)
    key = b"{promoted}k"
    writer = redis_cluster.cluster_client()
    writer.set(key, b"v1")
    old_master = redis_cluster.node_for(key)
    replica = next(r for r in redis_cluster.replicas()
                   if redis_cluster.command(r[1], "ROLE")[1:3] == [
                       old_master[0].encode(), old_master[1]])
    # PINGs of the frozen node unanswered for this long would flush too
    p = tracking_proxy(start_proxy, redis_cluster, redis_timeout=60.0)
    yield ready(p)
    r = p.redis_py()
    assert (yield in_thread(r.get, key)) == b"v1"
    assert cached(p, key)
    frozen = redis_cluster.node(old_master[1]).proc
    try:
        yield in_thread(redis_cluster.failover, replica[1])
        assert p.proxy.topology.map.master(key_slot(key)) == old_master, "map read too soon"
        frozen.send_signal(signal.SIGSTOP)
        redis_cluster.client(replica[1]).set(key, b"v2")  # straight to the new master
        yield until(lambda: not cached(p, key), limit=10.0)
    finally:
        frozen.send_signal(signal.SIGCONT)
    assert (yield in_thread(r.get, key)) == b"v2"  # followed by MOVED to the new master
    yield in_thread(redis_cluster.failover, old_master[1])  # leave the roles as they were
