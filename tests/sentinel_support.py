"""A real Redis Sentinel deployment for the tests: a master, one replica and
three Sentinels (``redis-server <conf> --sentinel``), all on free loopback
ports, with a password on the data nodes (the URL's credentials are the
master's; the Sentinels have none).

Waits are for events (log lines) or polls with a deadline; every process
is stopped by PID.  Tests that fail over leave the deployment healthy again
(``wait_healthy``: every Sentinel agrees on the master, which has its
replica online) and never assume which node is the master.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator

import pytest

from tests.support import (
    STARTUP_LIMIT,
    RedisServer,
    free_port,
    read_until,
    redis_server_binary,
    stop_process,
)

SERVICE = "redisp-test"
PASSWORD = "s3ntinel-test-pw"
#: Sentinel timings: a master silent for 1 s is down; failovers may follow
#: each other after 2 * failover-timeout
DOWN_AFTER_MS = 1000
FAILOVER_TIMEOUT_MS = 2000


class Node(RedisServer):
    """A data node: password set, replicas authenticate to their master."""

    def __init__(self, port: int | None = None, *extra: str, directory: str | None = None
                 ) -> None:
        # a replica writes the RDB it receives into its directory: never the checkout
        super().__init__(port, "--requirepass", PASSWORD, "--masterauth", PASSWORD,
                         "--repl-diskless-sync-delay", "0",
                         "--dir", directory or tempfile.gettempdir(), *extra)

    def client(self):
        import redis

        return redis.Redis(host="127.0.0.1", port=self.port, password=PASSWORD, protocol=2,
                           socket_timeout=STARTUP_LIMIT)


class Sentinel:
    """One ``redis-server <conf> --sentinel`` monitoring the service."""

    def __init__(self, directory: str, master_port: int, port: int | None = None,
                 quorum: int = 2, extra: str = "", tls_files=None) -> None:
        """``extra``: more lines for its config file (``requirepass …``);
        ``tls_files`` (tests/tls_support.py): it listens with TLS only, and
        speaks TLS to the master (``tls-replication``)."""
        self.port = port or free_port()
        self.quorum = quorum
        self.directory = directory
        self.master_port = master_port
        self.extra = extra
        self.tls_files = tls_files
        self.proc: subprocess.Popen | None = None

    def _listen(self) -> str:
        f = self.tls_files
        if f is None:
            return f"port {self.port}\n"
        return (f"port 0\ntls-port {self.port}\ntls-cert-file {f.server_cert}\n"
                f"tls-key-file {f.server_key}\ntls-ca-cert-file {f.ca}\n"
                "tls-auth-clients optional\ntls-replication yes\n"
                # it checks the master's certificate with the same CA
                f"tls-client-cert-file {f.client_cert}\ntls-client-key-file {f.client_key}\n")

    def start(self) -> Sentinel:
        conf = os.path.join(self.directory, f"sentinel-{self.port}.conf")
        if not os.path.exists(conf):  # a restarted Sentinel keeps what it learnt
            with open(conf, "w") as f:
                f.write(f"{self._listen()}bind 127.0.0.1\ndir {self.directory}\n{self.extra}"
                        f"sentinel monitor {SERVICE} 127.0.0.1 {self.master_port} {self.quorum}\n"
                        f"sentinel auth-pass {SERVICE} {PASSWORD}\n"
                        f"sentinel down-after-milliseconds {SERVICE} {DOWN_AFTER_MS}\n"
                        f"sentinel failover-timeout {SERVICE} {FAILOVER_TIMEOUT_MS}\n"
                        f"sentinel parallel-syncs {SERVICE} 1\n")
        self.proc = subprocess.Popen(
            [redis_server_binary(), conf, "--sentinel", "--logfile", "", "--daemonize", "no"],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, cwd=self.directory,
        )
        read_until(self.proc, b"+monitor master")
        return self

    def stop(self) -> None:
        self.proc = stop_process(self.proc)

    def client(self, password: str | None = None):
        import redis

        return redis.Redis(host="127.0.0.1", port=self.port, protocol=2, password=password,
                           socket_timeout=STARTUP_LIMIT)

    def master(self) -> tuple[str, int] | None:
        with self.client() as c:
            reply = c.execute_command("SENTINEL", "GET-MASTER-ADDR-BY-NAME", SERVICE)
        if not reply:
            return None
        host, port = reply
        return (host.decode() if isinstance(host, bytes) else host), int(port)


def poll(condition, limit: float = 30.0, what: str = "condition"):
    """Poll ``condition()`` (blocking, between tests or in a thread) until it
    returns something true; fail after ``limit`` seconds."""
    deadline = time.monotonic() + limit
    while True:
        try:
            value = condition()
        except Exception:  # a node restarting, a Sentinel not answering yet
            value = None
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} not met within {limit}s")
        time.sleep(0.05)  # a poll between checks of a real deployment, not a test's wait


class SentinelDeployment:
    """The master, its replica and three Sentinels; see the module docstring."""

    def __init__(self) -> None:
        self.directory = tempfile.mkdtemp(prefix="redisp-sentinel-")
        self.nodes: dict[int, Node] = {}
        self.sentinels: list[Sentinel] = []
        try:
            first = Node(directory=self._node_dir())
            second = Node(None, "--replicaof", "127.0.0.1", str(first.port),
                          directory=self._node_dir())
            for node in (first, second):
                self.nodes[node.port] = node  # stopped by stop() even if start() fails
                node.start()
            for _ in range(3):
                self.sentinels.append(Sentinel(self.directory, first.port))
                self.sentinels[-1].start()
        except BaseException:
            self.stop()
            raise

    def _node_dir(self) -> str:
        return tempfile.mkdtemp(dir=self.directory)

    @property
    def url(self) -> str:
        hosts = ",".join(f"127.0.0.1:{s.port}" for s in self.sentinels)
        return f"redis+sentinel://:{PASSWORD}@{hosts}/{SERVICE}"

    def master_port(self) -> int:
        """The master every Sentinel names now (after ``wait_healthy``)."""
        return self.sentinels[0].master()[1]

    def replica_port(self) -> int:
        master = self.master_port()
        return next(port for port in self.nodes if port != master)

    def client(self, port: int):
        return self.nodes[port].client()

    def healthy(self) -> bool:
        masters = {s.master() for s in self.sentinels}
        if len(masters) != 1 or None in masters:
            return False
        (_, port), = masters
        with self.client(port) as c:
            info = c.info("replication")
            if info.get("role") != "master" or info.get("connected_slaves") != 1:
                return False
            if info["slave0"]["state"] != "online":
                return False
        replica = next(p for p in self.nodes if p != port)
        with self.client(replica) as c:
            if c.info("replication").get("master_link_status") != "up":
                return False
        for s in self.sentinels:
            with s.client() as c:
                replicas = c.execute_command("SENTINEL", "REPLICAS", SERVICE)
                others = c.execute_command("SENTINEL", "SENTINELS", SERVICE)
                state = c.execute_command("SENTINEL", "MASTER", SERVICE)
            if len(others) != 2 or len(replicas) != 1:
                return False
            flags = _field(state, "flags")
            if flags != "master" or _field(replicas[0], "flags") != "slave":
                return False
            if _field(state, "failover-state") not in (None, "none"):
                return False
        return True

    def demote_stray_masters(self) -> None:
        """A node that still says master while the Sentinels name another
        (the old master after SENTINEL FAILOVER, which Sentinel converts
        only ~10 s later) is made a replica now, as Sentinel would."""
        try:
            master = self.sentinels[0].master()
        except Exception:
            return
        if master is None:
            return
        for port, node in self.nodes.items():
            if port == master[1] or node.proc is None:
                continue
            with node.client() as c:
                if c.info("replication").get("role") == "master":
                    c.execute_command("REPLICAOF", "127.0.0.1", str(master[1]))

    def wait_healthy(self, limit: float = 60.0) -> None:
        self.demote_stray_masters()
        poll(self.healthy, limit, "a healthy Sentinel deployment")

    def failover(self) -> tuple[int, int]:
        """``SENTINEL FAILOVER``: (old master port, new master port) once a
        Sentinel names the new one."""
        old = self.master_port()
        with self.sentinels[0].client() as c:
            c.execute_command("SENTINEL", "FAILOVER", SERVICE)
        new = poll(lambda: _other(self.sentinels[0].master(), old), what="a new master")
        return old, new

    def kill_master(self) -> tuple[int, int]:
        """SIGKILL the master; (old port, new port) once a Sentinel names the
        new one.  ``restart_as_replica(old)`` brings the old one back."""
        old = self.master_port()
        node = self.nodes[old]
        os.kill(node.proc.pid, signal.SIGKILL)
        node.proc.wait(timeout=STARTUP_LIMIT)
        node.proc.stdout.close()
        node.proc = None
        new = poll(lambda: any(_other(s.master(), old) for s in self.sentinels)
                   and next(_other(s.master(), old) for s in self.sentinels
                            if _other(s.master(), old)),
                   60.0, "a new master after killing the old one")
        return old, new

    def restart_as_replica(self, port: int) -> None:
        """A killed node back, as a replica of the current master."""
        master = next(s.master() for s in self.sentinels if s.master()[1] != port)
        node = Node(port, "--replicaof", "127.0.0.1", str(master[1]), directory=self._node_dir())
        self.nodes[port] = node.start()

    def stop(self) -> None:
        for s in self.sentinels:
            s.stop()
        for node in self.nodes.values():
            node.stop()
        shutil.rmtree(self.directory, ignore_errors=True)


def _field(flat: list, name: str):
    """A field of a SENTINEL MASTER/REPLICAS entry (a flat name, value list)."""
    if isinstance(flat, dict):
        value = flat.get(name)
    else:
        pairs = dict(zip(flat[::2], flat[1::2], strict=False))
        value = pairs.get(name.encode(), pairs.get(name))
    return value.decode() if isinstance(value, bytes) else value


def _other(address: tuple[str, int] | None, old: int) -> int | None:
    if address is not None and address[1] != old:
        return address[1]
    return None


@pytest.fixture(scope="session")
def sentinel_deployment() -> Iterator[SentinelDeployment]:
    deployment = SentinelDeployment()
    try:
        deployment.wait_healthy()
        yield deployment
    finally:
        deployment.stop()


@pytest.fixture
def sentinels(sentinel_deployment: SentinelDeployment) -> SentinelDeployment:
    """The session's deployment, healthy, its master's data flushed."""
    sentinel_deployment.wait_healthy()
    with sentinel_deployment.client(sentinel_deployment.master_port()) as c:
        c.flushall()
    return sentinel_deployment
