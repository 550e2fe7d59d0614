"""The HTTP door's test plumbing, shared by tests/test_web.py (what a request
means) and tests/test_http_channel.py (the protocol under it): a real Site
over the real reader, gate and cache on a ``task.Clock``, Redis scripted
(``ScriptedRedis``), raw response bytes parsed back."""

from __future__ import annotations

import gc
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

from twisted.internet.address import IPv4Address
from twisted.internet.defer import Deferred
from twisted.internet.error import ConnectionDone
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.logger import globalLogPublisher
from twisted.python.failure import Failure

from redisp.clients import ClientSlots
from redisp.config import Config
from redisp.core.cache import Cache
from redisp.core.gate import Gate
from redisp.core.reader import CachedReader
from redisp.doors.web import build_site
from redisp.metrics import Metrics
from tests.door_support import ScriptedRedis

ADDR = IPv4Address("TCP", "127.0.0.1", 40000)


class Pings:
    """The backing as ``/healthz`` sees it: ``ping()`` hands out Deferreds
    the test fires."""

    def __init__(self):
        self.pings: list[Deferred] = []

    def ping(self):
        self.pings.append(Deferred())
        return self.pings[-1]


@dataclass
class Response:
    status: int
    reason: bytes
    headers: dict[bytes, list[bytes]]
    body: bytes

    def header(self, name: bytes) -> bytes | None:
        values = self.headers.get(name.lower())
        assert values is None or len(values) == 1, values
        return values[0] if values else None


def parse(data: bytes, head: bool = False) -> list[Response]:
    """Every complete response in ``data`` (Content-Length framing only)."""
    responses = []
    while data:
        head_block, sep, data = data.partition(b"\r\n\r\n")
        assert sep, f"incomplete headers: {head_block!r}"
        status_line, *lines = head_block.split(b"\r\n")
        version, code, reason = status_line.split(b" ", 2)
        assert version in (b"HTTP/1.1", b"HTTP/1.0")
        headers: dict[bytes, list[bytes]] = {}
        for line in lines:
            name, _, value = line.partition(b": ")
            headers.setdefault(name.lower(), []).append(value)
        assert b"transfer-encoding" not in headers
        length = 0 if head else int(headers[b"content-length"][0])
        body, data = data[:length], data[length:]
        assert len(body) == length, "truncated body"
        responses.append(Response(int(code), reason, headers, body))
    return responses


@dataclass
class Proxy:
    site: object
    reader: CachedReader
    redis: ScriptedRedis
    backing: Pings
    metrics: Metrics
    slots: ClientSlots
    clock: Clock
    cache: Cache
    connections: list = field(default_factory=list)

    def connect(self):
        protocol = self.site.buildProtocol(ADDR)
        transport = StringTransport(peerAddress=ADDR)
        protocol.makeConnection(transport)
        self.connections.append(protocol)
        return protocol, transport

    def send(self, raw: bytes, head: bool = False) -> list[Response]:
        """Send ``raw`` on a new connection; the responses written so far."""
        protocol, transport = self.connect()
        protocol.dataReceived(raw)
        return parse(transport.value(), head)

    def get(self, target: bytes, method: bytes = b"GET") -> Response:
        (response,) = self.send(request(target, method), head=method == b"HEAD")
        return response

    def counted(self, outcome: str) -> int:
        return self.metrics.requests["http", outcome]

    def cached(self, key: bytes, value: bytes) -> None:
        """``key`` is in Redis and in the cache already: a GET of it is a hit."""
        self.redis.values[key] = value
        self.cache.put(key, value)

    def lookups(self) -> int:
        """How often the door asked below it: cache hits, misses, and Redis."""
        return self.metrics.cache_hits + self.metrics.cache_misses + len(self.redis.calls)


def request(target: bytes, method: bytes = b"GET", body: bytes = b"") -> bytes:
    length = b"Content-Length: %d\r\n" % len(body) if body else b""
    return method + b" " + target + b" HTTP/1.1\r\nHost: x\r\n" + length + b"\r\n" + body



def make_proxy(
    max_clients: int = 100, access_log: bool = False, lifetimes: bool = False, **settings
) -> Proxy:
    """``lifetimes``: the site reads entries' ages from the cache (max-age and
    Age headers, as ``build_proxy`` wires it); without, every value is sent
    ``no-store``."""
    clock = Clock()
    clock.advance(1_700_000_000)
    metrics = Metrics(started=clock.seconds())
    slots = ClientSlots(max_clients, metrics)
    redis = ScriptedRedis({}, clock)
    cache = Cache(1000, 60.0, clock, metrics)
    reader = CachedReader(cache, Gate(1, clock), redis, metrics)
    backing = Pings()
    config = Config(access_log=access_log, **settings)
    site = build_site(reader, backing, metrics, slots, config, reactor=clock,
                      cache=cache if lifetimes else None)
    return Proxy(site, reader, redis, backing, metrics, slots, clock, cache)


def failures(events: list[dict]) -> list[Failure]:
    gc.collect()  # an unhandled error in a Deferred is logged when it is collected
    return [e["log_failure"] for e in events if "log_failure" in e]


def lose(protocol) -> None:
    protocol.connectionLost(Failure(ConnectionDone()))


PLAIN = b"GET /get?key=k HTTP/1.1\r\nHost: 127.0.0.1:9997\r\nUser-Agent: wrk\r\n\r\n"


def routed(proxy) -> list[bytes]:
    """Targets that went through twisted.web (FrontDoor.route), recorded from now."""
    seen: list[bytes] = []
    door = proxy.site.resource
    original = door.route

    def route(request):
        seen.append(request.uri)
        original(request)

    door.route = route
    return seen




@contextmanager
def log_events() -> Iterator[list[dict]]:
    """Every log event emitted meanwhile (failures, access log lines)."""
    events: list[dict] = []
    globalLogPublisher.addObserver(events.append)
    try:
        yield events
    finally:
        globalLogPublisher.removeObserver(events.append)
