"""Shared fixtures: one redis-server for the session, proxies built per test."""

from __future__ import annotations

import pytest
import pytest_twisted
from twisted.internet import defer

from tests.cluster_support import redis_cluster  # noqa: F401  (the fixture, for every file)
from tests.resp_client import RespClient, connect
from tests.support import RedisServer, RunningProxy, proxy_config


@pytest.fixture(scope="session")
def redis_server():
    server = RedisServer().start()
    yield server
    server.stop()


@pytest.fixture
def redis_db(redis_server):
    """The session's redis-server, emptied for this test; a redis-py client to it."""
    client = redis_server.client()
    client.flushall()
    yield client
    client.close()


@pytest.fixture
def start_proxy(redis_server):
    """start_proxy(**config_overrides) -> RunningProxy in front of the session redis."""
    started: list[RunningProxy] = []

    def start(redis_url: str | None = None, cache_clock=None, **overrides) -> RunningProxy:
        proxy = RunningProxy(proxy_config(redis_url or redis_server.url, **overrides),
                             cache_clock)
        started.append(proxy)
        return proxy

    yield start
    for proxy in started:
        pytest_twisted.blockon(proxy.stop())


@pytest.fixture
def clients():
    """``clients(port)`` -> a connected RespClient, closed after the test."""
    made: list[RespClient] = []

    @defer.inlineCallbacks
    def make(port: int):
        client = yield connect(port)
        made.append(client)
        return client

    yield make
    for client in made:
        if not client.lost:
            client.transport.abortConnection()
