"""Every statistic of one proxy, declared once, on one injected object.

Counters on the hot path are plain ``int`` attributes: incrementing one is a
single bytecode, where a prometheus_client ``Counter.inc()`` takes a lock.
prometheus_client still owns the exposition format: a small collector turns
the attributes into metric families when /metrics is scraped.  The registry
belongs to this object, never the global one, so two proxies can live in one
process (the tests build many).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator

from prometheus_client import CollectorRegistry, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

#: attribute -> help text; each becomes the counter ``redisp_<attribute>_total``.
COUNTERS: dict[str, str] = {
    "cache_hits": "GET lookups answered from the cache",
    "cache_misses": "GET lookups that went to the backing Redis",
    "cache_evictions": "entries evicted to make room (LRU)",
    "cache_expirations": "entries dropped because their ttl had passed",
    "cache_invalidations": "entries dropped because the key changed in Redis",
    "invalidation_messages": "invalidation messages received from Redis (tracking)",
    "invalidation_flushes": "whole-cache flushes: FLUSHDB/FLUSHALL, tracking lost, or a "
                            "Sentinel failover",
    "write_invalidations": "keys dropped because a write passed through redisp",
    "write_flushes": "whole-cache flushes by a command passing through redisp (FLUSHDB …)",
    "auth_failures": "failed authentications: wrong credentials in AUTH, HELLO or HTTP",
}

#: outcomes a request can have, used as the ``outcome`` label:
#: hit / miss (value served from the cache / fetched), absent (404, nil),
#: backing_error (Redis failed, unreachable or timed out), bad_request (400,
#: unknown command, wrong arity), protocol_error (malformed RESP), other
#: (a RESP command that reads no key: PING, HELLO, INFO …)
OUTCOMES = ("hit", "miss", "absent", "backing_error", "bad_request", "protocol_error", "other")

BACKING_LATENCY_BUCKETS = (
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
)


class Counts(dict):
    """Counts by label, 0 for a label not seen (as ``collections.Counter``,
    nothing stored on a read).  Not a ``Counter``: that one defines
    ``__delitem__`` in Python, which puts every ``counts[k] += 1`` through a
    Python-level slot (bench/NOTES-perf.md, "Metrics counts")."""

    __slots__ = ()

    def __missing__(self, key: object) -> int:
        return 0


class Metrics:
    """Counters, gauges and the backing latency histogram of one proxy."""

    def __init__(self, started: float) -> None:
        self.started = started
        for name in COUNTERS:
            setattr(self, name, 0)
        self.requests: Counts = Counts()
        self.backing_errors: Counts = Counts()
        #: forwarded commands by (command name, outcome: ok, error, backing_error, refused)
        self.forwarded: Counts = Counts()
        self.connected_clients = 0
        self.connections_received = 0  # every connection accepted, since start
        self.pinned_clients = 0
        # set by whoever owns the live values (build_proxy wires them)
        self.cache_size: Callable[[], int] = lambda: 0
        self.backing_up: Callable[[], bool] = lambda: False
        #: 'off' (invalidation: off), 'active' or 'down' (tracking lost: caching off)
        self.invalidation_state: Callable[[], str] = lambda: "off"
        #: the INFO ``# Proxy`` fields of a backing topology other than one
        #: server (``topology`` first), set by whoever follows it
        #: (cluster_map.ClusterTopology); None: a single server
        self.topology_info: Callable[[], list[tuple[str, object]]] | None = None
        #: the /metrics families of that topology, likewise
        self.topology_metrics: Callable[[], Iterable[Metric]] | None = None
        # Redis Cluster: slot map reads, and redirections followed
        self.cluster_refreshes = 0
        self.cluster_refresh_failures = 0
        self.cluster_moved = 0
        self.cluster_asked = 0

        self.registry = CollectorRegistry()
        self.backing_latency = Histogram(
            "redisp_backing_latency_seconds",
            "seconds from sending a command to the backing Redis to its reply",
            buckets=BACKING_LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.registry.register(_AttributeCollector(self))

    def request(self, door: str, outcome: str) -> None:
        """Count one finished request of a front door ('http' or 'resp')."""
        self.requests[door, outcome] += 1

    def exposition(self) -> bytes:
        """The Prometheus text format of everything above."""
        return generate_latest(self.registry)


class _AttributeCollector:
    """Reads Metrics' plain attributes at scrape time."""

    def __init__(self, metrics: Metrics) -> None:
        self._m = metrics

    def describe(self) -> list[Metric]:
        return []

    def collect(self) -> Iterator[Metric]:
        m = self._m
        requests = CounterMetricFamily(
            "redisp_requests", "requests finished, by front door and outcome",
            labels=["door", "outcome"],
        )
        for (door, outcome), count in sorted(m.requests.items()):
            requests.add_metric([door, outcome], count)
        yield requests
        for name, text in COUNTERS.items():
            yield CounterMetricFamily(f"redisp_{name}", text, value=getattr(m, name))
        errors = CounterMetricFamily(
            "redisp_backing_errors", "failed calls to the backing Redis, by kind",
            labels=["kind"],
        )
        for kind, count in sorted(m.backing_errors.items()):
            errors.add_metric([kind], count)
        yield errors
        forwarded = CounterMetricFamily(
            "redisp_forwarded_commands", "commands forwarded to the backing Redis, "
            "by command and outcome (ok, error, backing_error, refused)",
            labels=["command", "outcome"],
        )
        for (command, outcome), count in sorted(m.forwarded.items()):
            forwarded.add_metric([command, outcome], count)
        yield forwarded
        causes = CounterMetricFamily(
            "redisp_invalidations", "cache invalidations by cause: write (a key written "
            "through redisp), tracking (an invalidation message), flush (whole cache)",
            labels=["cause"],
        )
        causes.add_metric(["write"], m.write_invalidations)
        causes.add_metric(["tracking"], m.invalidation_messages)
        causes.add_metric(["flush"], m.invalidation_flushes + m.write_flushes)
        yield causes
        yield GaugeMetricFamily(
            "redisp_pinned_clients", "clients holding a backing connection of their own "
            "(MULTI, blocking commands, pub/sub …)", value=m.pinned_clients,
        )
        yield GaugeMetricFamily("redisp_cache_size", "keys in the cache now", value=m.cache_size())
        yield GaugeMetricFamily(
            "redisp_connected_clients", "open client connections over both doors",
            value=m.connected_clients,
        )
        yield GaugeMetricFamily(
            "redisp_invalidation_active",
            "1 while invalidation tracking holds (0 when lost, or when invalidation is off)",
            value=1 if m.invalidation_state() == "active" else 0,
        )
        yield GaugeMetricFamily(
            "redisp_backing_up", "1 while the backing Redis connection is usable",
            value=1 if m.backing_up() else 0,
        )
        if m.topology_metrics is not None:
            yield from m.topology_metrics()
