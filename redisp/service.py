"""Wiring: every object of one proxy is built once, here, and passed down.

No module keeps a singleton, so two proxies can run in one process (the
end-to-end tests do) and every clock is the one handed in.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, replace
from typing import Any

from twisted.application.service import MultiService, Service
from twisted.internet.defer import Deferred, succeed
from twisted.internet.endpoints import SSL4ServerEndpoint, serverFromString
from twisted.internet.interfaces import IListeningPort, IProtocolFactory
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.python.failure import Failure

import redisp
from redisp.backing.connection import Backing
from redisp.backing.sentinel import SentinelMaster
from redisp.backing.tls import backing_url, require_client_certificates
from redisp.clients import ClientSlots
from redisp.commands.auth import Authenticator
from redisp.config import Config, ConfigError
from redisp.core.cache import Cache
from redisp.core.gate import Gate
from redisp.core.reader import CachedReader
from redisp.core.tracking import Invalidator
from redisp.doors.resp import RespFactory
from redisp.doors.web import build_site
from redisp.metrics import Metrics
from redisp.routing.forwarding import Forwarder

log = Logger()

#: seconds between sweeps of expired entries, oldest store first
SWEEP_INTERVAL = 1.0

#: listen backlog unless the endpoint string sets one: Redis's tcp-backlog
#: (Twisted's own default of 50 makes a burst of connects wait on SYN retries)
BACKLOG = 511
#: endpoint types whose parser takes ``backlog=``
_BACKLOG_TYPES = frozenset({"tcp", "tcp6", "ssl", "unix"})

#: descriptors kept for redisp's own use beyond clients and its own
#: connections (log, epoll, wakers, a reconnect in progress …), as Redis's
#: CONFIG_MIN_RESERVED_FDS
RESERVED_FDS = 32


def with_backlog(description: str, backlog: int = BACKLOG) -> str:
    """``description`` with ``:backlog=N`` added when its endpoint type takes
    a backlog and it sets none; anything else is left for serverFromString
    to take or refuse.  Parsed with Twisted's own tokenizer (private, but the
    grammar serverFromString itself uses: escapes and all)."""
    from twisted.internet.endpoints import _parse

    try:
        args, kwargs = _parse(description)
    except Exception:  # a malformed string: serverFromString says why
        return description
    if args and args[0].lower() in _BACKLOG_TYPES and "backlog" not in kwargs:
        return f"{description}:backlog={backlog}"
    return description


def fit_open_files(max_clients: int, own: int) -> tuple[int, str | None]:
    """Raise the soft open-file limit to fit ``max_clients`` and redisp's own
    descriptors, up to the hard limit (or beyond it, for root); if it cannot
    fit, the ``max_clients`` that does and one line saying so, as Redis does.

    ``own``: the connections redisp opens itself (listeners, backing).  A
    client past ``max_clients`` is refused on a descriptor of its own, so the
    reserve also keeps room for refusals and for the backing to reconnect.
    """
    import resource

    reserved = own + RESERVED_FDS + _descriptors_open()
    needed = max_clients + reserved
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < needed:
        if hard == resource.RLIM_INFINITY or hard >= needed:
            attempts = [(needed, hard)]
        else:
            attempts = [(needed, needed), (hard, hard)]  # the first needs privileges
        for limits in attempts:
            try:
                resource.setrlimit(resource.RLIMIT_NOFILE, limits)
            except (ValueError, OSError):
                continue
            soft = limits[0]
            break
    if soft == resource.RLIM_INFINITY or soft >= needed:
        return max_clients, None
    fits = soft - reserved
    if fits < 1:
        raise SystemExit(f"redisp: the open-file limit ({soft}, ulimit -n) leaves no "
                         f"descriptor for clients: redisp needs {reserved} for itself")
    return fits, (
        f"max_clients lowered from {max_clients} to {fits}: the open-file limit is {soft} "
        f"(hard limit {hard}) and redisp keeps {reserved} descriptors for itself; "
        f"raise ulimit -n to at least {needed} for max_clients {max_clients}")


def _descriptors_open() -> int:
    """Descriptors open now (stdio, log, reactor …), where the system says."""
    try:
        return len(os.listdir("/proc/self/fd"))
    except OSError:
        return 0


class Listener(Service):
    """One front door's listening port.

    It binds in ``privilegedStartService``, which twistd runs before the
    reactor starts, so a port that cannot be bound stops start-up with one
    line and a non-zero status instead of a logged traceback and a proxy
    that runs without its door.
    """

    def __init__(self, name: str, description: str, endpoint: Any, factory: IProtocolFactory):
        self.name = name
        self.description = description
        self._endpoint = endpoint
        self._factory = factory
        self.port: IListeningPort | None = None

    def privilegedStartService(self) -> None:
        outcome: list[Any] = []
        self._endpoint.listen(self._factory).addBoth(outcome.append)
        if not outcome:
            raise SystemExit(f"redisp: listening for {self.name} on {self.description} "
                             "did not complete at start-up")
        if isinstance(outcome[0], Failure):
            raise SystemExit(f"redisp: cannot listen for {self.name} on {self.description}: "
                             f"{outcome[0].getErrorMessage()}")
        self.port = outcome[0]
        super().privilegedStartService()

    def startService(self) -> None:
        if self.port is None:
            self.privilegedStartService()
        super().startService()

    def stopService(self) -> Deferred:
        super().stopService()
        port, self.port = self.port, None
        return port.stopListening() if port is not None else succeed(None)

    def address(self) -> str:
        host = self.port.getHost() if self.port is not None else None
        if host is None:
            return self.description
        if hasattr(host, "port"):
            return f"{host.host}:{host.port}"
        name = getattr(host, "name", None)
        if isinstance(name, bytes):  # a UNIX socket's path
            return os.fsdecode(name)
        return str(name if name is not None else host)


class ProxyService(MultiService):
    """Owns the listeners, the backing connection and the cache sweeper."""

    def __init__(self, proxy: Proxy) -> None:
        super().__init__()
        self.proxy = proxy
        self._sweeper = LoopingCall(proxy.cache.sweep)
        self._sweeper.clock = proxy.reactor
        #: the line saying max_clients was lowered to fit the open-file limit
        self.fd_warning: str | None = None

    def startService(self) -> None:
        super().startService()
        p = self.proxy
        if self.fd_warning is not None:
            log.warn("{warning}", warning=self.fd_warning)
        if p.sentinel is not None:
            p.sentinel.start()
        if p.topology is not None:
            p.topology.start()
        p.backing.start()
        if p.forwarder is not None:
            p.forwarder.start()
        if p.invalidator is not None:
            p.invalidator.start()
        self._sweeper.start(SWEEP_INTERVAL, now=False)
        doors = ", ".join(f"{s.name} on {s.address()}" for s in self if isinstance(s, Listener))
        c = p.config
        log.info(
            "redisp {version}: {doors}; backing {redis}; ttl {ttl:g}s, capacity {capacity}, "
            "concurrency {concurrency}, invalidation {invalidation}, forward {forward}; {auth}",
            version=redisp.__version__, doors=doors or "no listeners",
            redis=c.redis.redacted(), ttl=c.ttl, capacity=c.capacity,
            concurrency=c.concurrency, invalidation=c.invalidation, forward=c.forward,
            auth=p.auth.describe(),
        )

    def stopService(self) -> Deferred:
        """Stop accepting, let requests in flight finish, then close the backing."""
        p = self.proxy
        if self._sweeper.running:
            self._sweeper.stop()
        d = super().stopService()  # listeners stop accepting new connections
        d.addCallback(lambda _: p.gate.drained(p.config.redis_timeout + 1.0))
        if p.invalidator is not None:
            d.addBoth(lambda _: p.invalidator.stop())
        if p.forwarder is not None:
            d.addBoth(lambda _: p.forwarder.stop())
        d.addBoth(lambda _: p.backing.stop())
        if p.sentinel is not None:
            d.addBoth(lambda _: p.sentinel.stop())
        if p.topology is not None:
            d.addBoth(lambda _: p.topology.stop())
        return d


@dataclass
class Proxy:
    """Every object of one proxy, for the service and for tests to reach into."""

    config: Config
    reactor: Any
    metrics: Metrics
    cache: Cache
    gate: Gate
    backing: Backing
    reader: CachedReader
    slots: ClientSlots
    invalidator: Invalidator | None = None
    forwarder: Forwarder | None = None
    #: redis+cluster://: the ClusterTopology (backing/cluster_map.py), started first
    topology: Any = None
    service: ProxyService = None  # type: ignore[assignment]
    auth: Authenticator = None  # type: ignore[assignment]
    sentinel: SentinelMaster | None = None  # redis+sentinel:// only


def follow_sentinel(proxy: Proxy, sentinel: SentinelMaster) -> None:
    """When Sentinel moves the master: flush the cache (the old master may
    have lost writes the new one never saw) and drop every backing
    connection, so each reconnects to the new master (tracking is set up
    again by the Invalidator's own reconnect; pinned clients holding state
    are hung up on, as after a backing restart).  Also INFO and /metrics."""
    def switched(old: Any, new: Any) -> None:
        proxy.reader.invalidate_all()
        proxy.backing.drop()
        if proxy.invalidator is not None:
            proxy.invalidator.drop()  # flushes (and counts it) too
        else:
            proxy.metrics.invalidation_flushes += 1
        if proxy.forwarder is not None:
            proxy.forwarder.pool.drop_all(f"the master moved to {new[0]}:{new[1]}")

    sentinel.on_switch(switched)
    proxy.metrics.topology_info = sentinel.info
    proxy.metrics.topology_metrics = sentinel.metric_families


def cluster_backing(config: Config, reactor: Any, metrics: Metrics) -> tuple[Any, Any]:
    """redis+cluster://: the slot map, kept fresh, and the read path that
    sends each miss to its slot's master (backing/cluster_fetch.py)."""
    from redisp.backing.cluster_fetch import ClusterBacking
    from redisp.backing.cluster_map import ClusterTopology

    topology = ClusterTopology(config.redis, config.redis_timeout, reactor, metrics)
    return topology, ClusterBacking(topology, config.redis_timeout, reactor, metrics)


def cluster_tracking(config: Config, reactor: Any, metrics: Metrics, topology: Any,
                     reader: CachedReader) -> Any:
    """redis+cluster:// with tracking: one tracking connection per master."""
    from redisp.core.cluster_tracking import ClusterTracking

    return ClusterTracking(topology, config.redis_timeout, reactor, reader, metrics)


def build_proxy(config: Config, reactor: Any, cache_clock: Any = None) -> Proxy:
    """Build one proxy from its config; nothing listens until the service starts.

    ``cache_clock`` (default: the reactor) times cache entries alone, so
    end-to-end tests can expire entries with ``task.Clock`` instead of waiting.
    """
    doors = [("http", config.http), ("resp", config.resp)]
    if config.redis.tls and config.redis.tls_client is None:
        try:
            config = replace(config, redis=backing_url(config))
        except ConfigError as e:
            raise SystemExit(f"redisp: configuration error: {e}") from None
    own = sum(1 for _, description in doors if description is not None)
    # backing and tracking connections: one of each per master in front of a
    # cluster (as many as seeds are named, a guess made before any map is read)
    masters = len(config.redis.seeds) if config.redis.kind == "cluster" else 1
    own += masters * (1 + (config.invalidation == "tracking"))
    if config.redis.kind == "sentinel":
        own += len(config.redis.seeds)  # a subscription to each Sentinel
    max_clients, fd_warning = fit_open_files(config.max_clients, own)
    config = replace(config, max_clients=max_clients)
    metrics = Metrics(started=reactor.seconds())
    cache = Cache(config.capacity, config.ttl, cache_clock or reactor, metrics,
                  config.max_item_bytes)
    gate = Gate(config.concurrency, reactor)
    sentinel = SentinelMaster(config.redis, config.redis_timeout, reactor) \
        if config.redis.kind == "sentinel" else None
    endpoint = sentinel.endpoint() if sentinel is not None else None  # None: the URL's server
    topology = None
    if config.redis.kind == "cluster":
        topology, backing = cluster_backing(config, reactor, metrics)
    else:
        backing = Backing(config.redis, config.redis_timeout, reactor, metrics,
                          endpoint=endpoint)
    reader = CachedReader(cache, gate, backing, metrics)
    slots = ClientSlots(config.max_clients, metrics)
    metrics.cache_size = cache.__len__
    metrics.backing_up = lambda: backing.up
    invalidator = None
    if config.invalidation == "tracking":
        if topology is not None:
            invalidator = cluster_tracking(config, reactor, metrics, topology, reader)
        else:
            invalidator = Invalidator(config.redis, config.redis_timeout, reactor, reader,
                                      metrics, endpoint=endpoint)
        metrics.invalidation_state = lambda: invalidator.state
    forwarder = None
    if config.forward != "none":
        router = None
        if topology is not None:  # each command to its keys' master (routing/cluster.py)
            from redisp.routing.cluster import ClusterRouter

            router = ClusterRouter(topology, config.redis_timeout, reactor)
        forwarder = Forwarder(config, reactor, reader, gate, metrics, backing=backing,
                              connect=sentinel.connect_relay if sentinel is not None else None,
                              router=router)
    proxy = Proxy(config, reactor, metrics, cache, gate, backing, reader, slots, invalidator,
                  forwarder, topology=topology, sentinel=sentinel)
    if sentinel is not None:
        follow_sentinel(proxy, sentinel)
    auth = proxy.auth = Authenticator.from_config(config, metrics)  # both doors (§8)

    service = ProxyService(proxy)
    service.fd_warning = fd_warning
    factories = {
        "http": lambda: build_site(reader, backing, metrics, slots, config, reactor, auth, cache),
        "resp": lambda: RespFactory(reader, metrics, slots, config, reactor, forwarder, auth),
    }
    tls_doors = 0
    for name, description in doors:
        if description is None:
            continue
        try:
            endpoint = serverFromString(reactor, with_backlog(description))
        except Exception as e:  # endpoint parsers raise ValueError, KeyError, TypeError …
            raise SystemExit(f"redisp: configuration error: {name}: "
                             f"bad endpoint {description!r}: {e}") from None
        if isinstance(endpoint, SSL4ServerEndpoint):
            tls_doors += 1
            if config.tls_client_ca is not None:
                try:
                    require_client_certificates(endpoint, config.tls_client_ca)
                except ConfigError as e:
                    raise SystemExit(f"redisp: configuration error: {e}") from None
        Listener(name, description, endpoint, factories[name]()).setServiceParent(service)
    if config.tls_client_ca is not None and not tls_doors:
        # mutual TLS that protects nothing must not pass for protection
        raise SystemExit("redisp: configuration error: tls_client_ca is set but no listener "
                         "is an ssl: endpoint")
    proxy.service = service
    return proxy
