"""redis+sentinel:// end to end (SPEC §10): a real master, replica and three
Sentinels (tests/sentinel_support.py), redisp in front, plain clients.

Failovers are real: ``SENTINEL FAILOVER`` and a SIGKILLed master.  Waits
are for events or polls with a deadline; blocking work (redis-py, the
deployment's own polls) runs in threads so the reactor keeps serving.
"""

from __future__ import annotations

import pytest
import pytest_twisted
from twisted.internet import threads

from redisp.backing.sentinel import blocking_master
from redisp.config import parse_redis_url
from redisp.core.tracking import tracking_support_problem
from tests import sentinel_support
from tests.resp_client import connect
from tests.sentinel_support import PASSWORD, SERVICE, Node, Sentinel
from tests.support import RunningProxy, free_port, proxy_config, until

inline = pytest_twisted.inlineCallbacks
sentinel_deployment = sentinel_support.sentinel_deployment  # the fixtures
sentinels = sentinel_support.sentinels


def in_thread(f, *args):
    return threads.deferToThread(f, *args)


@pytest.fixture
def log_lines():
    """Every log line written during the test, formatted."""
    from twisted.logger import formatEvent, globalLogPublisher

    lines: list[str] = []

    def observe(event) -> None:
        lines.append(formatEvent(event))

    globalLogPublisher.addObserver(observe)
    yield lines
    globalLogPublisher.removeObserver(observe)


@pytest.fixture
def proxies():
    """``proxies(url, **config)`` -> a RunningProxy, stopped after the test."""
    started: list[RunningProxy] = []

    def start(url: str, **overrides) -> RunningProxy:
        proxy = RunningProxy(proxy_config(url, **overrides))
        started.append(proxy)
        return proxy

    yield start
    for proxy in started:
        pytest_twisted.blockon(proxy.stop())


def info_fields(text: bytes) -> dict[str, str]:
    fields = {}
    for line in text.decode().splitlines():
        key, sep, value = line.partition(":")
        if sep and not line.startswith("#"):
            fields[key] = value
    return fields


@inline
def test_reads_and_writes_go_to_the_master_sentinel_names(sentinels, proxies):
    """Writes land on the master, reads come from it and are cached; INFO
    and /metrics name the master; nothing says the password."""
    master = sentinels.master_port()
    p = proxies(sentinels.url)
    yield until(lambda: p.proxy.backing.up)
    client = yield connect(p.resp_port)
    assert (yield client.call(b"SET", b"k", b"v1")) == b"+OK\r\n"
    with sentinels.client(master) as direct:
        assert direct.get("k") == b"v1"
    assert (yield client.call(b"GET", b"k")) == b"$2\r\nv1\r\n"
    assert (yield client.call(b"GET", b"k")) == b"$2\r\nv1\r\n"
    assert p.proxy.metrics.cache_hits == 1
    info = info_fields(decode_bulk((yield client.call(b"INFO", b"proxy"))))
    assert info["topology"] == f"sentinel {SERVICE} master 127.0.0.1:{master}"
    assert info["sentinel_master"] == f"127.0.0.1:{master}"
    assert info["sentinel_failovers"] == "0"
    status, _, body = yield in_thread(p.http_path, "/metrics")
    assert status == 200
    assert f'redisp_sentinel_master{{address="127.0.0.1:{master}"}} 1.0'.encode() in body
    assert b"redisp_sentinel_failovers_total 0.0" in body
    assert PASSWORD.encode() not in body
    assert PASSWORD not in info["backing_redis"]
    yield client.close()


def decode_bulk(frame: bytes) -> bytes:
    header, _, rest = frame.partition(b"\r\n")
    return rest[:int(header[1:])]


@inline
def test_a_sentinel_failover_moves_every_connection_and_flushes_the_cache(sentinels, proxies,
                                                                          log_lines):
    """SENTINEL FAILOVER: redisp follows +switch-master; the cache is flushed
    (a value changed on the new master is read fresh, never the cached old
    one), writes go to the new master, the forwarding pool too, and a client
    pinned in MULTI on the old master is hung up on."""
    p = proxies(sentinels.url)
    yield until(lambda: p.proxy.backing.up)
    client = yield connect(p.resp_port)
    assert (yield client.call(b"SET", b"k", b"old")) == b"+OK\r\n"
    assert (yield client.call(b"GET", b"k")) == b"$3\r\nold\r\n"  # cached now
    assert len(p.proxy.cache) == 1
    pinned = yield connect(p.resp_port)
    assert (yield pinned.call(b"MULTI")) == b"+OK\r\n"

    old, new = yield in_thread(sentinels.failover)
    yield until(lambda: p.proxy.sentinel.address == ("127.0.0.1", new))
    assert p.proxy.sentinel.failovers == 1
    assert len(p.proxy.cache) == 0 and p.proxy.metrics.invalidation_flushes == 1
    yield pinned.hung_up()  # its MULTI was on the old master
    yield in_thread(sentinels.wait_healthy)  # the old master is a replica now

    with sentinels.client(new) as direct:
        direct.set("k", "new")
    assert (yield client.call(b"GET", b"k")) == b"$3\r\nnew\r\n"
    assert (yield client.call(b"SET", b"w", b"1")) == b"+OK\r\n"  # forwarded, to the new master
    with sentinels.client(new) as direct:
        assert direct.get("w") == b"1"
    assert (yield client.call(b"INCR", b"w")) == b":2\r\n"
    info = info_fields(decode_bulk((yield client.call(b"INFO", b"proxy"))))
    assert info["topology"] == f"sentinel {SERVICE} master 127.0.0.1:{new}"
    assert info["sentinel_failovers"] == "1"
    yield client.close()
    moved = [line for line in log_lines if "moved from" in line]
    assert len(moved) == 1, "one line for the switch, however many Sentinels announce it"
    assert f"moved from 127.0.0.1:{old} to 127.0.0.1:{new} (+switch-master" in moved[0]
    assert not [line for line in log_lines if PASSWORD in line]


@inline
def test_tracking_is_set_up_again_on_the_new_master(sentinels, proxies):
    """With invalidation: tracking, after a failover the tracking connection
    is on the new master: a write made there directly drops the cached key."""
    p = proxies(sentinels.url, invalidation="tracking")
    yield until(lambda: p.proxy.backing.up and p.proxy.invalidator.active)
    client = yield connect(p.resp_port)
    assert (yield client.call(b"SET", b"k", b"a")) == b"+OK\r\n"
    assert (yield client.call(b"GET", b"k")) == b"$1\r\na\r\n"

    _, new = yield in_thread(sentinels.failover)
    yield until(lambda: p.proxy.sentinel.address == ("127.0.0.1", new))
    yield until(lambda: p.proxy.invalidator.active)
    yield in_thread(sentinels.wait_healthy)
    assert (yield client.call(b"GET", b"k")) == b"$1\r\na\r\n"  # cached from the new master
    assert len(p.proxy.cache) == 1
    with sentinels.client(new) as direct:
        direct.set("k", "b")
    yield until(lambda: len(p.proxy.cache) == 0)  # the invalidation came
    assert (yield client.call(b"GET", b"k")) == b"$1\r\nb\r\n"
    yield client.close()


@inline
def test_a_killed_master_is_followed_to_the_new_one(sentinels, proxies):
    """SIGKILL on the master: misses fail as unavailable while no master
    answers, and once Sentinel promotes the replica redisp reads and writes
    there, with nothing stale served."""
    p = proxies(sentinels.url)
    yield until(lambda: p.proxy.backing.up)
    client = yield connect(p.resp_port)
    assert (yield client.call(b"SET", b"k", b"before")) == b"+OK\r\n"
    with sentinels.client(sentinels.master_port()) as direct:
        direct.execute_command("WAIT", "1", "5000")  # the replica has it
    assert (yield client.call(b"GET", b"k")) == b"$6\r\nbefore\r\n"

    old, new = yield in_thread(sentinels.kill_master)
    try:
        yield until(lambda: p.proxy.sentinel.address == ("127.0.0.1", new), 30)
        assert len(p.proxy.cache) == 0
        with sentinels.client(new) as direct:
            assert direct.get("k") == b"before"  # replicated before the kill
            direct.set("k", "after")
        yield until(lambda: p.proxy.backing.up)
        assert (yield client.call(b"GET", b"k")) == b"$5\r\nafter\r\n"
        assert (yield client.call(b"SET", b"x", b"1")) == b"+OK\r\n"
        with sentinels.client(new) as direct:
            assert direct.get("x") == b"1"
    finally:
        yield in_thread(sentinels.restart_as_replica, old)
        yield in_thread(sentinels.wait_healthy)
    yield client.close()


@inline
def test_sentinels_down_at_start_up_then_up(proxies, tmp_path, log_lines):
    """No Sentinel answers at start-up: redisp starts, answers "backing
    redis unavailable (…)" naming the Sentinels' problem, and serves once
    a Sentinel is up."""
    node = Node().start()
    sentinel = Sentinel(str(tmp_path), node.port, quorum=1)
    try:
        url = f"redis+sentinel://:{PASSWORD}@127.0.0.1:{sentinel.port}/{SERVICE}"
        p = proxies(url)
        client = yield connect(p.resp_port)
        reply = yield client.call(b"GET", b"k")
        assert reply.startswith(b"-ERR backing redis unavailable (")
        assert b"Sentinel" in reply and PASSWORD.encode() not in reply
        reply = yield client.call(b"SET", b"k", b"v")
        assert reply.startswith(b"-ERR backing redis unavailable (")
        status, _, body = yield in_thread(p.http_get, "k")
        assert status == 503 and b"Sentinel" in body
        info = info_fields(decode_bulk((yield client.call(b"INFO", b"proxy"))))
        assert info["topology"] == f"sentinel {SERVICE} master unknown"
        yield in_thread(sentinel.start)
        yield until(lambda: p.proxy.backing.up)
        assert (yield client.call(b"SET", b"k", b"v")) == b"+OK\r\n"
        assert (yield client.call(b"GET", b"k")) == b"$1\r\nv\r\n"
        yield client.close()
        assert any("cannot watch" in line for line in log_lines)
        assert not [line for line in log_lines if PASSWORD in line]
    finally:
        sentinel.stop()
        node.stop()


def test_the_tracking_start_up_check_asks_the_master_sentinel_names(sentinels):
    """``invalidation: tracking`` checks the master, not a Sentinel (which has
    no CLIENT TRACKING): fine with the right password, the master's refusal
    named with a wrong one, and no verdict while no Sentinel answers."""
    url = parse_redis_url(sentinels.url)
    assert blocking_master(url, 2.0) == ("127.0.0.1", sentinels.master_port())
    assert tracking_support_problem(url, 2.0) is None
    wrong = parse_redis_url(sentinels.url.replace(PASSWORD, "wrong"))
    problem = tracking_support_problem(wrong, 2.0)
    assert problem is not None and "refused our credentials" in problem
    assert f"127.0.0.1:{sentinels.master_port()}" in problem and "wrong" not in problem
    nobody = parse_redis_url(f"redis+sentinel://127.0.0.1:{free_port()}/{SERVICE}")
    assert blocking_master(nobody, 2.0) is None
    assert tracking_support_problem(nobody, 2.0) is None


@inline
def test_an_old_master_answering_as_a_replica_is_refused(sentinels, proxies):
    """A connection made to an address that says it is a replica (ROLE) is
    refused and the Sentinels asked again: here the cached master is made
    a replica behind redisp's back, and the next connection goes to the
    master the Sentinels name."""
    p = proxies(sentinels.url)
    yield until(lambda: p.proxy.backing.up)
    master = p.proxy.sentinel.address
    replica = sentinels.replica_port()
    p.proxy.sentinel.address = ("127.0.0.1", replica)  # a stale cache
    p.proxy.backing.drop()
    yield until(lambda: p.proxy.backing.up)
    assert p.proxy.sentinel.address == master
    assert (yield p.proxy.backing.call(b"SET", b"k", b"v")) == b"OK"


@inline
def test_lost_sentinel_subscriptions_are_made_again_and_still_hear_switches(sentinels, proxies):
    """Every Sentinel drops redisp's subscription (CLIENT KILL TYPE pubsub):
    each is made again, and the next SENTINEL FAILOVER is heard on them (the
    old master stays a master meanwhile: only +switch-master moves redisp)."""
    p = proxies(sentinels.url)
    watches = p.proxy.sentinel._watches
    yield until(lambda: p.proxy.backing.up and all(w.subscribed for w in watches))
    before = [w._protocol for w in watches]
    for s in sentinels.sentinels:
        with s.client() as c:
            assert c.execute_command("CLIENT", "KILL", "TYPE", "pubsub") >= 1
    yield until(lambda: all(w._protocol is not old and w.subscribed
                            for w, old in zip(watches, before, strict=True)))
    _, new = yield in_thread(sentinels.failover)
    yield until(lambda: p.proxy.sentinel.address == ("127.0.0.1", new))
    assert p.proxy.sentinel.failovers == 1
    yield in_thread(sentinels.wait_healthy)


@inline
def test_sentinels_the_url_does_not_name_are_found_and_keep_redisp_following(
        sentinels, proxies, log_lines):
    """The URL names one Sentinel: redisp learns the other two from it
    (SENTINEL SENTINELS) and watches them, so with that one stopped a
    failover is still heard of (+switch-master from the others)."""
    named, *others = sentinels.sentinels
    p = proxies(f"redis+sentinel://:{PASSWORD}@127.0.0.1:{named.port}/{SERVICE}")
    yield until(lambda: p.proxy.backing.up)
    every = {("127.0.0.1", s.port) for s in sentinels.sentinels}
    yield until(lambda: set(p.proxy.sentinel.sentinels) == every
                and all(w.subscribed for w in p.proxy.sentinel._watches))
    client = yield connect(p.resp_port)
    assert (yield client.call(b"SET", b"k", b"before")) == b"+OK\r\n"
    old = p.proxy.sentinel.address
    named.stop()
    try:
        with others[0].client() as c:
            c.execute_command("SENTINEL", "FAILOVER", SERVICE)
        yield until(lambda: p.proxy.sentinel.address not in (None, old))
        new = p.proxy.sentinel.address
        assert (yield client.call(b"SET", b"k", b"after")) == b"+OK\r\n"
        with sentinels.client(new[1]) as direct:
            assert direct.get("k") == b"after"
    finally:
        yield in_thread(named.start)
        yield in_thread(sentinels.wait_healthy)
    yield client.close()
    found = [line for line in log_lines if "found (named by" in line]
    assert len(found) == 2 and not [line for line in log_lines if PASSWORD in line]
