"""``rediss+cluster://``: redisp in front of a Redis Cluster that speaks
only TLS (``tls-cluster yes``, no plaintext port): the slot map read over
TLS names each node's ``tls-port``, and every connection -- misses, forwarded
commands, tracking, the start-up check -- speaks TLS with the ``redis_tls_*``
files.  One 3-master cluster for this module, on free loopback ports."""

from __future__ import annotations

import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import pytest
import pytest_twisted
from twisted.internet import threads

from redisp.backing.cluster_map import SLOTS, key_slot
from redisp.config import load_config
from redisp.core.tracking import tracking_support_problem
from tests.cluster_support import redis_cli_binary
from tests.resp_client import connect
from tests.support import STARTUP_LIMIT, free_port, redis_server_binary, until
from tests.tls_support import make_tls_files

inline = pytest_twisted.inlineCallbacks


class TLSCluster:
    """Three TLS-only cluster masters, created with ``redis-cli --tls --cluster create``."""

    def __init__(self, directory: Path) -> None:
        self.dir = directory
        self.files = make_tls_files(directory / "tls")
        self.ports = [free_port() for _ in range(3)]
        self.procs: list[subprocess.Popen] = []

    def _tls(self) -> list[str]:
        f = self.files
        # nodes are each other's TLS clients on the bus: with a client certificate
        return ["--tls-cert-file", f.server_cert, "--tls-key-file", f.server_key,
                "--tls-client-cert-file", f.client_cert, "--tls-client-key-file", f.client_key,
                "--tls-ca-cert-file", f.ca, "--tls-auth-clients", "optional"]

    def start(self) -> TLSCluster:
        for port in self.ports:
            node_dir = self.dir / str(port)
            node_dir.mkdir(parents=True)
            self.procs.append(subprocess.Popen(
                [redis_server_binary(), "--port", "0", "--tls-port", str(port),
                 "--bind", "127.0.0.1", "--tls-cluster", "yes", "--tls-replication", "yes",
                 "--cluster-enabled", "yes", "--cluster-port", str(free_port()),
                 "--cluster-config-file", "nodes.conf", "--cluster-node-timeout", "1000",
                 "--dir", str(node_dir), "--save", "", "--appendonly", "no",
                 "--daemonize", "no", "--logfile", "", "--loglevel", "warning", *self._tls()],
                stdout=subprocess.PIPE, stderr=subprocess.STDOUT))
        self._wait(lambda: all(self.client(p).ping() for p in self.ports), "nodes up")
        f = self.files
        subprocess.run(
            [redis_cli_binary(), "--tls", "--cacert", f.ca, "--cert", f.client_cert,
             "--key", f.client_key, "--cluster", "create",
             *[f"127.0.0.1:{p}" for p in self.ports], "--cluster-yes"],
            check=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
            timeout=STARTUP_LIMIT * 3)
        self._wait(lambda: all(b"cluster_state:ok" in self.client(p).execute_command(
            "CLUSTER", "INFO") for p in self.ports), "cluster_state:ok")
        return self

    def _wait(self, condition, what: str) -> None:
        deadline = time.monotonic() + STARTUP_LIMIT
        while True:
            try:
                if condition():
                    return
            except Exception:  # not up yet
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"TLS cluster: {what} not within {STARTUP_LIMIT}s")
            time.sleep(0.02)  # polling a real cluster being formed

    def client(self, port: int):
        import redis

        f = self.files
        return redis.Redis(host="127.0.0.1", port=port, protocol=2, ssl=True,
                           ssl_ca_certs=f.ca, ssl_certfile=f.client_cert,
                           ssl_keyfile=f.client_key, socket_timeout=STARTUP_LIMIT)

    def client_for(self, key: bytes):
        """A direct TLS client of the master serving ``key``."""
        ranges = {}
        for first, last, master, *_ in self.client(self.ports[0]).execute_command(
                "CLUSTER", "SLOTS"):
            ranges[(first, last)] = master[1]
        slot = key_slot(key)
        return self.client(next(p for (a, b), p in ranges.items() if a <= slot <= b))

    @property
    def url(self) -> str:
        return "rediss+cluster://" + ",".join(f"127.0.0.1:{p}" for p in self.ports)

    def stop(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.terminate()
            proc.wait(timeout=STARTUP_LIMIT)
            proc.stdout.close()


@pytest.fixture(scope="module")
def tls_cluster():
    directory = Path(tempfile.mkdtemp(prefix="redisp-tls-cluster-"))
    cluster = TLSCluster(directory)
    try:
        cluster.start()
    except BaseException:
        cluster.stop()
        shutil.rmtree(directory, ignore_errors=True)
        raise
    yield cluster
    cluster.stop()
    shutil.rmtree(directory, ignore_errors=True)


def _tls_keys(cluster: TLSCluster) -> dict:
    f = cluster.files
    return {"redis_tls_ca": f.ca, "redis_tls_cert": f.client_cert,
            "redis_tls_key": f.client_key}


def _keys_on_each_master(cluster: TLSCluster) -> list[bytes]:
    """One key per master (the three thirds of the slots)."""
    wanted = {0: None, 1: None, 2: None}
    i = 0
    while None in wanted.values():
        key = b"tls:%d" % i
        third = min(key_slot(key) * 3 // SLOTS, 2)
        if wanted[third] is None:
            wanted[third] = key
        i += 1
    return list(wanted.values())


@inline
def test_reads_writes_and_split_commands_over_tls(tls_cluster, start_proxy):
    p = start_proxy(tls_cluster.url, **_tls_keys(tls_cluster))
    yield until(lambda: p.proxy.backing.up)
    assert set(p.proxy.topology.map.masters) == {("127.0.0.1", port)
                                                 for port in tls_cluster.ports}, "tls-ports"
    keys = _keys_on_each_master(tls_cluster)
    client = yield connect(p.resp_port)
    for key in keys:
        assert (yield client.call(b"SET", key, b"v-" + key)) == b"+OK\r\n"
        value = yield threads.deferToThread(lambda k=key: tls_cluster.client_for(k).get(k))
        assert value == b"v-" + key
    reply = yield client.call(b"MGET", *keys)
    assert reply == b"*3\r\n" + b"".join(b"$%d\r\nv-%s\r\n" % (len(k) + 2, k) for k in keys)
    assert (yield client.call(b"GET", keys[0])) == b"$%d\r\nv-%s\r\n" % (len(keys[0]) + 2,
                                                                         keys[0])
    assert p.proxy.metrics.cache_hits >= 1
    yield client.close()


@inline
def test_tracking_over_tls_drops_a_key_written_on_its_master(tls_cluster, start_proxy):
    url = tls_cluster.url
    config = load_config({}, {"REDISP_REDIS": url, **{
        "REDISP_" + k.upper(): v for k, v in _tls_keys(tls_cluster).items()}})
    from redisp.backing.tls import backing_url

    assert tracking_support_problem(backing_url(config), 2.0) is None
    p = start_proxy(url, invalidation="tracking", **_tls_keys(tls_cluster))
    yield until(lambda: p.proxy.backing.up and p.proxy.invalidator.active)
    key = b"tls:tracked"
    direct = tls_cluster.client_for(key)
    direct.set(key, b"old")
    client = yield connect(p.resp_port)
    assert (yield client.call(b"GET", key)) == b"$3\r\nold\r\n"
    assert (yield client.call(b"GET", key)) == b"$3\r\nold\r\n"
    assert p.proxy.cache.lifetime(key) is not None
    yield threads.deferToThread(direct.set, key, b"new")
    yield until(lambda: p.proxy.cache.lifetime(key) is None)
    assert (yield client.call(b"GET", key)) == b"$3\r\nnew\r\n"
    yield client.close()


def test_a_rediss_cluster_url_is_tls_and_redacted_as_such():
    config = load_config({}, {"REDISP_REDIS": "rediss+cluster://u:pw@h1:7000,h2:7001"})
    assert config.redis.tls and config.redis.kind == "cluster"
    assert config.redis.redacted() == "rediss+cluster://u:***@h1:7000,h2:7001"
    assert config.redis.at("h2", 7001).tls
