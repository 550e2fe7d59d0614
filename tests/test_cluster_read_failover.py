"""Failovers under load, through redisp with tracking in front of a real cluster.

A client thread reads keys of every master through redisp the whole time.
What is asserted: no wrong answer ever, no stale read once the change is
known, caching back on every master.  What is measured (printed, never
asserted; bench/NOTES-perf.md has the figures): requests that failed, and
the time from the cluster agreeing on the new master to redisp serving
from it with tracking active again.
"""

from __future__ import annotations

import threading
import time

import pytest_twisted
from twisted.internet import defer, reactor, task, threads

from redisp.backing.cluster_map import key_slot
from tests.support import STARTUP_LIMIT, until
from tests.test_cluster_read import keys_per_master

inline = pytest_twisted.inlineCallbacks

#: the longest a whole failover scenario may take before the test gives up
SCENARIO_LIMIT = 30.0


def in_thread(f, *args):
    return threads.deferToThread(f, *args)


class Load:
    """Reads ``keys`` through redisp in a loop from a thread, counting the
    outcomes; ``allowed[key]`` is the set of values a read may return."""

    def __init__(self, p, keys: list[bytes], allowed: dict) -> None:
        self.client = p.redis_py(socket_timeout=STARTUP_LIMIT)
        self.keys = keys
        self.allowed = allowed
        self.ok = self.failed = 0
        self.first_failure = self.last_failure = 0.0
        self.wrong: list = []
        self.errors: set[str] = set()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def start(self) -> Load:
        self._thread.start()
        return self

    def _run(self) -> None:
        deadline = time.monotonic() + SCENARIO_LIMIT
        while not self._stop.is_set() and time.monotonic() < deadline:
            for key in self.keys:
                try:
                    value = self.client.get(key)
                except Exception as e:
                    self.failed += 1
                    self.last_failure = time.monotonic()
                    self.first_failure = self.first_failure or self.last_failure
                    self.errors.add(str(e).split("(")[0][:60])
                    continue
                if value in self.allowed[key]:
                    self.ok += 1
                else:
                    self.wrong.append((key, value))

    @defer.inlineCallbacks
    def stop(self):
        """Stop, and wait (without blocking the reactor that answers it)
        until the thread has finished its last read."""
        self._stop.set()
        yield until(lambda: not self._thread.is_alive())


@defer.inlineCallbacks
def serving_with_tracking(p, slot, master, key, value):
    """Until redisp's map names ``master`` for ``slot``, every master's
    tracking is active, and a read of ``key`` through redisp gives ``value``."""
    r = p.redis_py(socket_timeout=STARTUP_LIMIT)

    def read_ok():
        try:
            return r.get(key) == value
        except Exception:
            return False

    outcome = []

    @defer.inlineCallbacks
    def check():
        outcome.append((yield in_thread(read_ok)))

    deadline = time.monotonic() + SCENARIO_LIMIT
    while True:
        current = p.proxy.topology.map
        if current is not None and current.master(slot) == master \
                and p.proxy.invalidator.active:
            yield check()
            if outcome[-1]:
                return
        assert time.monotonic() < deadline, "redisp did not recover"
        yield task.deferLater(reactor, 0.01, lambda: None)


@defer.inlineCallbacks
def scenario(cluster, start_proxy, name, change, restore):
    """Read keys of every master under load while ``change(victim_port,
    replica_port)`` (blocking, in a thread) hands the victim's slots to its
    replica; then check freshness, measure, and ``restore``."""
    per_master = keys_per_master(cluster, name, per_master=2)
    writer = cluster.cluster_client()
    keys = [k for ks in per_master.values() for k in ks]
    for key in keys:
        writer.set(key, b"v1")
    victim = next(iter(per_master))
    replica = cluster.slot_map().replicas[victim][0]
    victim_key = per_master[victim][0]
    slot = key_slot(victim_key)
    p = start_proxy(cluster.url, invalidation="tracking", forward="none", redis_timeout=1.0)
    yield until(lambda: p.proxy.backing.up and p.proxy.invalidator.active)
    load = Load(p, keys, {key: {b"v1"} for key in keys}).start()
    yield until(lambda: load.ok > 50)
    flushes = p.proxy.metrics.invalidation_flushes
    started = time.monotonic()
    try:
        known = yield in_thread(change, victim[1], replica[1])
        yield serving_with_tracking(p, slot, replica, victim_key, b"v1")
        recovered = time.monotonic()
        yield load.stop()
        assert load.wrong == []
        assert p.proxy.metrics.invalidation_flushes > flushes
        # no stale read after the flush: a write on the new master is seen at once
        new_master = cluster.client(replica[1])
        r = p.redis_py()
        for i in range(5):
            value = b"v2-%d" % i
            new_master.set(victim_key, value)
            assert (yield in_thread(r.get, victim_key)) == value
            assert (yield in_thread(r.get, victim_key)) == value
        print(f"\n{name}: {load.failed} of {load.ok + load.failed} reads failed "
              f"over {load.last_failure - load.first_failure:.2f}s "
              f"({', '.join(sorted(load.errors)) or 'none'}); change took "
              f"{known - started:.2f}s; redisp serving with tracking "
              f"{recovered - known:+.2f}s after the cluster agreed "
              f"({recovered - started:.2f}s after the change began)")
    finally:
        yield load.stop()
        yield in_thread(restore, victim[1])


@inline
def test_a_replica_promoted_by_cluster_failover(redis_cluster, start_proxy):
    def change(victim_port, replica_port):
        redis_cluster.failover(replica_port)  # returns once every node agrees
        return time.monotonic()

    yield scenario(redis_cluster, start_proxy, "failover", change, lambda _: None)


@inline
def test_a_master_killed(redis_cluster, start_proxy):
    def change(victim_port, replica_port):
        redis_cluster.kill(victim_port)
        redis_cluster.wait_failover(victim_port)  # every running node sees the new master
        return time.monotonic()

    def restore(victim_port):
        redis_cluster.restart(victim_port)  # rejoins as a replica
        redis_cluster.wait_healthy()

    yield scenario(redis_cluster, start_proxy, "master killed", change, restore)
