"""Real parts for end-to-end tests: a redis-server on a free loopback port, a
backing connection that the test can hold up, and an in-process proxy.

No sleeps: redis-server is ready when it says so on its log; a held
forwarder is released by the test, not by a timer.
"""

from __future__ import annotations

import os
import selectors
import shutil
import socket
import subprocess
import time
from contextlib import contextmanager
from dataclasses import replace

from twisted.internet import defer, protocol, reactor, task

from redisp.config import Config
from redisp.service import build_proxy

STARTUP_LIMIT = 20.0  # seconds a child process may take to come up, at most


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def redis_server_binary() -> str:
    path = os.environ.get("REDIS_SERVER") or shutil.which("redis-server")
    if not path:
        raise RuntimeError("no redis-server: set REDIS_SERVER or run scripts/test")
    return path


def read_until(proc: subprocess.Popen, marker: bytes, limit: float = STARTUP_LIMIT) -> bytes:
    """Read a child's output until ``marker`` appears (or fail after ``limit``)."""
    seen = b""
    deadline = time.monotonic() + limit
    with selectors.DefaultSelector() as sel:
        sel.register(proc.stdout, selectors.EVENT_READ)
        while marker not in seen:
            left = deadline - time.monotonic()
            if left <= 0 or not sel.select(left):
                raise RuntimeError(f"no {marker!r} within {limit}s; got {seen[-2000:]!r}")
            chunk = os.read(proc.stdout.fileno(), 65536)
            if not chunk:
                raise RuntimeError(f"process exited before {marker!r}; got {seen[-2000:]!r}")
            seen += chunk
    return seen


def stop_process(proc: subprocess.Popen | None) -> None:
    """Stop a server this process started (by its own handle), and close its
    output pipe; returns None for the caller to forget the handle."""
    if proc is not None:
        proc.terminate()
        proc.wait(timeout=STARTUP_LIMIT)
        proc.stdout.close()
    return None


class RedisServer:
    """A throwaway redis-server on 127.0.0.1, stopped by PID."""

    def __init__(self, port: int | None = None, *extra: str) -> None:
        self.port = port or free_port()
        self.extra = extra
        self.proc: subprocess.Popen | None = None

    def start(self) -> RedisServer:
        self.proc = subprocess.Popen(
            [redis_server_binary(), "--port", str(self.port), "--bind", "127.0.0.1",
             "--save", "", "--appendonly", "no", "--daemonize", "no", "--logfile", "",
             "--loglevel", "notice", *self.extra],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        )
        read_until(self.proc, b"Ready to accept connections")
        return self

    def stop(self) -> None:
        self.proc = stop_process(self.proc)

    def client(self):
        import redis

        return redis.Redis(host="127.0.0.1", port=self.port, protocol=2)

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"


class _ForwardedServerSide(protocol.Protocol):
    def connectionMade(self):
        self.peer = self.factory.client_side
        self.peer.server_side = self
        for data in self.peer.early:
            self.transport.write(data)
        self.peer.transport.resumeProducing()

    def dataReceived(self, data):
        self.factory.forwarder.to_client(self.peer, data)

    def connectionLost(self, reason):
        self.peer.transport.loseConnection()


class _ForwardedClientSide(protocol.Protocol):
    server_side = None
    subscriber = False  # sent SUBSCRIBE: an invalidation connection, never held

    def connectionMade(self):
        self.early: list[bytes] = []
        self.transport.pauseProducing()
        self.factory.connections.append(self)
        out = protocol.ClientFactory()
        out.protocol = _ForwardedServerSide
        out.client_side = self
        out.forwarder = self.factory
        reactor.connectTCP("127.0.0.1", self.factory.target_port, out)

    def dataReceived(self, data):
        if b"SUBSCRIBE" in data.upper():
            self.subscriber = True
        if self.server_side is None:
            self.early.append(data)
        else:
            self.server_side.transport.write(data)

    def connectionLost(self, reason):
        self.factory.connections.remove(self)
        if self.server_side is not None:
            self.server_side.transport.loseConnection()


class HoldingForwarder(protocol.Factory):
    """TCP forwarder to a redis-server whose replies the test can hold back.

    ``hold()`` makes the backing "slow" for as long as the test wants,
    deterministically: replies wait until ``release()``.  Connections that
    subscribed (redisp's invalidation connection) are never held.
    """

    protocol = _ForwardedClientSide

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.connections: list[_ForwardedClientSide] = []
        self.held: list[tuple[_ForwardedClientSide, bytes]] | None = None
        self.port = reactor.listenTCP(0, self, interface="127.0.0.1")

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port.getHost().port}/0"

    def to_client(self, client_side, data: bytes) -> None:
        if self.held is not None and not client_side.subscriber:
            self.held.append((client_side, data))
        else:
            client_side.transport.write(data)

    def hold(self) -> None:
        self.held = []

    def release(self) -> None:
        held, self.held = self.held or [], None
        for client_side, data in held:
            client_side.transport.write(data)

    def stop(self):
        for c in list(self.connections):
            c.transport.abortConnection()
        return self.port.stopListening()


@contextmanager
def redis_7_0_with_password(password: str):
    """A redis-server with ``requirepass`` for side-by-side byte comparisons,
    and a connected redis-py client of it (closed when the block ends); the
    test is skipped when the server is not Redis 7.0, whose replies the
    comparisons are written against."""
    import pytest
    import redis

    server = RedisServer(None, "--requirepass", password).start()
    client = redis.Redis(port=server.port, password=password)
    try:
        version = client.info("server")["redis_version"]
        if not version.startswith("7.0."):
            pytest.skip(f"the replies compared are Redis 7.0's; redis-server is {version}")
        yield server, client
    finally:
        client.close()
        server.stop()


def proxy_config(redis_url: str, **overrides) -> Config:
    """A Config for an in-process proxy on free loopback ports."""
    from redisp.config import parse_redis_url

    base = Config(http="tcp:0:interface=127.0.0.1", resp="tcp:0:interface=127.0.0.1",
                  redis=parse_redis_url(redis_url), redis_timeout=2.0)
    return replace(base, **overrides)


class RunningProxy:
    """build_proxy + startService on the real reactor; ports from the listeners."""

    def __init__(self, config: Config, cache_clock=None) -> None:
        self.proxy = build_proxy(config, reactor, cache_clock)
        self.proxy.service.startService()
        ports = {s.name: s.port.getHost().port for s in self.proxy.service
                 if getattr(s, "port", None) is not None}
        self.http_port = ports.get("http")
        self.resp_port = ports.get("resp")

    def redis_py(self, **kw):
        import redis

        return redis.Redis(host="127.0.0.1", port=self.resp_port, **kw)

    def connected_redis_py(self, **kw):
        """A redis-py client whose connection is made (blocking: call it in a
        thread).  Connecting forwards what redis-py sends at connect (CLIENT
        MAINT_NOTIFICATIONS …) to the backing, so tests that hold the
        backing connect first."""
        client = self.redis_py(**kw)
        client.ping()
        return client

    def http_get(self, key: str, method: str = "GET"):
        """(status, headers, body) of /get?key=… through the HTTP door (blocking)."""
        import http.client
        from urllib.parse import quote

        conn = http.client.HTTPConnection("127.0.0.1", self.http_port, timeout=STARTUP_LIMIT)
        try:
            conn.request(method, "/get?key=" + quote(key, safe=""))
            r = conn.getresponse()
            return r.status, dict(r.getheaders()), r.read()
        finally:
            conn.close()

    def http_path(self, path: str):
        import http.client

        conn = http.client.HTTPConnection("127.0.0.1", self.http_port, timeout=STARTUP_LIMIT)
        try:
            conn.request("GET", path)
            r = conn.getresponse()
            return r.status, dict(r.getheaders()), r.read()
        finally:
            conn.close()

    def stop(self):
        return self.proxy.service.stopService()


@defer.inlineCallbacks
def until(condition, limit: float = STARTUP_LIMIT):
    """Let the reactor run until ``condition()`` holds; fail after ``limit`` seconds.

    For waiting on something the test cannot be told about directly (a
    request reaching the proxy from a client thread); never asserts a time.
    """
    deadline = time.monotonic() + limit
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {limit}s")
        yield task.deferLater(reactor, 0.005, lambda: None)
