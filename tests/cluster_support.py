"""A real Redis Cluster for the tests: 3 masters and 3 replicas on loopback.

One cluster per test session (``redis_cluster`` fixture, registered in
conftest.py): creating one takes a few seconds, so every cluster test
shares it.  Tests that change the topology (a migrated slot, a failover, a
killed master) leave it healthy again (``wait_healthy``), and no test may
assume which node is a master: ask ``masters()`` or ``node_for(key)``.

No sleeps: every wait polls the cluster with a deadline.
"""

from __future__ import annotations

import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import pytest

from redisp.backing.cluster_map import SLOTS, Address, SlotMap, key_slot
from redisp.protocol.frames import decode
from tests.raw_redis import replies
from tests.support import STARTUP_LIMIT, free_port, redis_server_binary

NODES = 6
POLL = 0.02  # seconds between two looks at the cluster while waiting


def redis_cli_binary() -> str:
    path = shutil.which("redis-cli")
    if not path:
        raise RuntimeError("no redis-cli: install redis-tools (scripts/test does)")
    return path


class ClusterNode:
    """One redis-server of the cluster, stopped by PID."""

    def __init__(self, directory: Path) -> None:
        self.port = free_port()
        self.bus_port = free_port()
        self.dir = directory / str(self.port)
        self.proc: subprocess.Popen | None = None

    def start(self) -> subprocess.Popen:
        self.dir.mkdir(parents=True, exist_ok=True)
        self.proc = subprocess.Popen(
            [redis_server_binary(), "--port", str(self.port), "--bind", "127.0.0.1",
             "--cluster-enabled", "yes", "--cluster-port", str(self.bus_port),
             "--cluster-config-file", "nodes.conf", "--cluster-node-timeout", "1000",
             "--dir", str(self.dir), "--save", "", "--appendonly", "no",
             "--repl-diskless-sync-delay", "0",
             "--daemonize", "no", "--logfile", "", "--loglevel", "warning"],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        )
        return self.proc

    def wait_ready(self) -> None:
        """Up when it answers PING (warning-level logs say nothing at start)."""
        deadline = time.monotonic() + STARTUP_LIMIT
        while True:
            try:
                if replies(self.port, [["PING"]]) == [b"+PONG\r\n"]:
                    return
            except OSError:
                pass
            if self.proc.poll() is not None:
                raise RuntimeError(f"redis-server :{self.port} exited: "
                                   f"{self.proc.stdout.read()[-2000:]!r}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"redis-server :{self.port} did not answer PING")
            time.sleep(POLL)

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self) -> None:
        if self.proc is not None:
            if self.proc.poll() is None:
                self.proc.terminate()
            self.proc.wait(timeout=STARTUP_LIMIT)
            self.proc.stdout.close()
            self.proc = None

    def kill(self) -> None:
        """Gone at once, as a crashed master (SIGKILL)."""
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait(timeout=STARTUP_LIMIT)
            self.proc.stdout.close()
            self.proc = None


class RedisCluster:
    """Six redis-servers joined by ``redis-cli --cluster create``."""

    def __init__(self, directory: Path | None = None) -> None:
        self._own_dir = directory is None
        self.dir = Path(directory or tempfile.mkdtemp(prefix="redisp-cluster-"))
        self.nodes = [ClusterNode(self.dir) for _ in range(NODES)]

    # -- life ------------------------------------------------------------------

    def start(self) -> RedisCluster:
        for node in self.nodes:
            node.start()
        for node in self.nodes:
            node.wait_ready()
        addresses = [f"127.0.0.1:{n.port}" for n in self.nodes]
        subprocess.run(
            [redis_cli_binary(), "--cluster", "create", *addresses,
             "--cluster-replicas", "1", "--cluster-yes"],
            check=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
            timeout=STARTUP_LIMIT * 3,
        )
        self.wait_healthy()
        return self

    def stop(self) -> None:
        for node in self.nodes:
            node.stop()
        if self._own_dir:
            shutil.rmtree(self.dir, ignore_errors=True)

    # -- what clients use ------------------------------------------------------

    @property
    def ports(self) -> list[int]:
        return [n.port for n in self.nodes]

    @property
    def running_ports(self) -> list[int]:
        """The nodes up now (a test may have killed one)."""
        return [n.port for n in self.nodes if n.running]

    @property
    def url(self) -> str:
        """redis+cluster:// with two seeds that are up (a seed may be a replica: fine)."""
        seeds = self.running_ports[:2] or self.ports[:2]
        return "redis+cluster://" + ",".join(f"127.0.0.1:{p}" for p in seeds)

    def client(self, port: int):
        """A plain (non-cluster) redis-py client to one node, RESP2."""
        import redis

        return redis.Redis(host="127.0.0.1", port=port, protocol=2,
                           socket_timeout=STARTUP_LIMIT)

    def cluster_client(self):
        """redis-py's RedisCluster on this cluster: the reference for merged replies."""
        from redis.cluster import RedisCluster as PyRedisCluster

        return PyRedisCluster(host="127.0.0.1", port=self._any_running().port, protocol=2,
                              socket_timeout=STARTUP_LIMIT)

    def command(self, port: int, *argv: bytes | str):
        """One command's decoded reply from one node (frames.decode)."""
        [frame] = replies(port, [argv])
        return decode(frame)

    def slot_map(self, port: int | None = None) -> SlotMap:
        """The map as one node (or any running one) sees it now."""
        port = port if port is not None else self._any_running().port
        queried = ("127.0.0.1", port)
        return SlotMap.from_shards(self.command(port, "CLUSTER", "SHARDS"), queried)

    def masters(self) -> list[Address]:
        return list(self.slot_map().masters)

    def replicas(self) -> list[Address]:
        current = self.slot_map()
        return [r for m in current.masters for r in current.replicas[m]]

    def node_for(self, key: bytes | str) -> Address:
        """The master serving ``key`` now."""
        raw = key.encode() if isinstance(key, str) else key
        address = self.slot_map().master(key_slot(raw))
        assert address is not None, f"no master serves {key!r}"
        return address

    def node(self, port: int) -> ClusterNode:
        return next(n for n in self.nodes if n.port == port)

    def node_id(self, port: int) -> str:
        return self.command(port, "CLUSTER", "MYID").decode()

    def key_in_slot_of(self, port: int, prefix: str = "k") -> bytes:
        """A key whose slot ``port`` serves now."""
        current = self.slot_map()
        for i in range(100000):
            key = f"{prefix}{i}".encode()
            if current.master(key_slot(key)) == ("127.0.0.1", port):
                return key
        raise AssertionError(f"no key found for :{port}")

    # -- changing the topology -------------------------------------------------

    def migrate_slot(self, slot: int, to_port: int, keys_batch: int = 100) -> None:
        """Move ``slot`` with its keys to the master on ``to_port``, as
        ``redis-cli --cluster reshard`` does: IMPORTING on the target,
        MIGRATING on the source, MIGRATE every key, then SETSLOT NODE on
        both, then on every other master; waits until every node agrees."""
        source = self.slot_map().master(slot)
        assert source is not None, f"slot {slot} has no master"
        src_port = source[1]
        if src_port == to_port:
            return
        target_id, source_id = self.node_id(to_port), self.node_id(src_port)
        self._ok(to_port, "CLUSTER", "SETSLOT", str(slot), "IMPORTING", source_id)
        self._ok(src_port, "CLUSTER", "SETSLOT", str(slot), "MIGRATING", target_id)
        self.move_keys(slot, src_port, to_port, keys_batch)
        self.finish_migration(slot, to_port, src_port)

    def start_migration(self, slot: int, to_port: int) -> int:
        """Only the first half (IMPORTING/MIGRATING), for tests of ASK; the
        source's port.  Follow with ``move_keys`` and ``finish_migration``."""
        source = self.slot_map().master(slot)
        assert source is not None
        src_port = source[1]
        target_id, source_id = self.node_id(to_port), self.node_id(src_port)
        self._ok(to_port, "CLUSTER", "SETSLOT", str(slot), "IMPORTING", source_id)
        self._ok(src_port, "CLUSTER", "SETSLOT", str(slot), "MIGRATING", target_id)
        return src_port

    def move_keys(self, slot: int, src_port: int, to_port: int, batch: int = 100) -> None:
        while True:
            keys = self.command(src_port, "CLUSTER", "GETKEYSINSLOT", str(slot), str(batch))
            if not keys:
                return
            reply = self.command(src_port, "MIGRATE", "127.0.0.1", str(to_port), "", "0",
                                 str(int(STARTUP_LIMIT * 1000)), "KEYS", *keys)
            assert reply == b"OK", reply

    def finish_migration(self, slot: int, to_port: int, src_port: int) -> None:
        target_id = self.node_id(to_port)
        self._ok(to_port, "CLUSTER", "SETSLOT", str(slot), "NODE", target_id)
        self._ok(src_port, "CLUSTER", "SETSLOT", str(slot), "NODE", target_id)
        for _host, port in self.masters():
            if port not in (to_port, src_port):
                self.command(port, "CLUSTER", "SETSLOT", str(slot), "NODE", target_id)
        self.wait_healthy()

    def failover(self, replica_port: int) -> None:
        """Promote a replica (CLUSTER FAILOVER, its master agreeing); waits
        until every node agrees."""
        self._ok(replica_port, "CLUSTER", "FAILOVER")
        self._wait(lambda: self.command(replica_port, "ROLE")[0] == b"master",
                   f":{replica_port} promoted")
        self.wait_healthy()

    def kill(self, port: int) -> None:
        """SIGKILL one node; ``restart(port)`` brings it back (a replica by then)."""
        self.node(port).kill()

    def wait_failover(self, dead_port: int, limit: float = STARTUP_LIMIT) -> None:
        """After killing a master: until a replica serves its slots, as
        every running node sees it."""
        def promoted() -> bool:
            try:
                maps = [self.slot_map(n.port) for n in self.nodes if n.running]
            except (OSError, RuntimeError):
                return False
            return all(m.covered == SLOTS and all(port != dead_port for _, port in m.masters)
                       for m in maps)

        self._wait(promoted, f"the slots of :{dead_port} served again", limit)

    def restart(self, port: int) -> None:
        node = self.node(port)
        node.start()
        node.wait_ready()

    def wait_healthy(self, limit: float = STARTUP_LIMIT * 2) -> None:
        """Every running node says cluster_state:ok, knows every other
        running node as connected, and all of them see the same slot map,
        with each master's replicas in place and in sync."""
        self._wait(self._healthy, "cluster healthy", limit)

    # -- inside ----------------------------------------------------------------

    def _healthy(self) -> bool:
        running = [n for n in self.nodes if n.running]
        maps = []
        try:
            for node in running:
                info = self.command(node.port, "CLUSTER", "INFO")
                if b"cluster_state:ok" not in info:
                    return False
                role = self.command(node.port, "ROLE")
                if role[0] == b"slave" and role[3] != b"connected":
                    return False  # a replica still syncing cannot be promoted
                lines = self.command(node.port, "CLUSTER", "NODES").decode().splitlines()
                if any("fail" in line.split()[2] or "handshake" in line.split()[2]
                       or line.split()[7] != "connected" for line in lines):
                    return False
                maps.append(self.slot_map(node.port))
        except (OSError, RuntimeError):
            return False
        first = maps[0]
        replicas = sum(len(first.replicas[m]) for m in first.masters)
        return (all(m == first for m in maps) and first.settled
                and len(first.masters) + replicas == len(running))

    def _ok(self, port: int, *argv: str) -> None:
        reply = self.command(port, *argv)
        assert reply == b"OK", f"{argv}: {reply!r}"

    def _wait(self, condition, what: str, limit: float = STARTUP_LIMIT) -> None:
        deadline = time.monotonic() + limit
        while not condition():
            if time.monotonic() > deadline:
                raise AssertionError(f"not {what} within {limit}s")
            time.sleep(POLL)

    def _any_running(self) -> ClusterNode:
        return next(n for n in self.nodes if n.running)


@pytest.fixture(scope="session")
def redis_cluster(tmp_path_factory):
    """A 3-master, 3-replica Redis Cluster shared by the whole session."""
    cluster = RedisCluster(tmp_path_factory.mktemp("cluster"))
    try:
        cluster.start()
    except BaseException:
        cluster.stop()
        raise
    yield cluster
    cluster.stop()
