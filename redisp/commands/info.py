"""INFO: redisp's own sections, and the backing's for the sections redisp has none of.

Field names follow Redis's INFO where one means the same thing (so dashboards
and tools read them), plus redisp's cache, forwarding and topology fields.
"""

from __future__ import annotations

import os
import sys
from typing import Any

from twisted.internet.defer import Deferred

import redisp
from redisp.commands.session import OTHER, REDIS_VERSION, Reply, Session
from redisp.config import Config
from redisp.metrics import Metrics
from redisp.protocol.codec import (
    bulk,
    encode_command,
)
from redisp.protocol.frames import decode

#: section names in the order INFO prints them when redisp answers alone
INFO_SECTIONS = ("server", "clients", "memory", "stats", "keyspace", "proxy")
_ALL_SECTIONS = frozenset((b"all", b"default", b"everything"))


def info_command(session: Session, argv: list[bytes]) -> Reply:
    """The backing's own INFO (its version, memory, keyspace: what clients
    and tools read), with redisp's ``# Proxy`` section after it.

    Without forwarding, or when the backing cannot answer, redisp's own
    figures in the same format.  Always a bulk string, in RESP3 too (Redis
    sends a verbatim string there; redis-cli asserts on anything but a bulk
    string).
    """
    asked = [arg.lower() for arg in argv[1:]]
    with_proxy = not asked or any(a in _ALL_SECTIONS or a == b"proxy" for a in asked)
    for_backing = [a for a in argv[1:] if a.lower() != b"proxy"]
    forwarder = session.forwarder
    if forwarder is None or (asked and not for_backing):
        return bulk(_own_info(session, asked).encode()), OTHER
    answer: Deferred = Deferred()

    def got(frame: Any) -> None:
        text = _bulk_text(frame)
        if text is None:  # down, timed out, or an error reply: our own figures
            text = _own_info(session, asked)
        elif with_proxy:
            text = text + "\r\n" + render_info(session, {"proxy"})
        answer.callback((bulk(text.encode()), OTHER))

    forwarder.pool.call(session.lane, encode_command([b"INFO", *for_backing]), got)
    return answer


def _bulk_text(frame: Any) -> str | None:
    """The text of a bulk string reply frame, or None for anything else (an
    error reply, a null, a BackingError)."""
    value = decode(frame) if frame.__class__ is bytes else None
    return value.decode("utf-8", "replace") if value.__class__ is bytes else None


def _own_info(session: Session, asked: list[bytes]) -> str:
    wanted = {a.decode("latin-1") for a in asked}
    if not wanted or wanted & {"all", "default", "everything"}:
        wanted = set(INFO_SECTIONS)
    return render_info(session, wanted)


def render_info(session: Session, sections: set[str]) -> str:
    """The INFO text: ``# Section`` then ``field:value`` lines, sections
    separated by a blank line, every line ending in CRLF, as Redis writes it."""
    metrics, config, clock = session.metrics, session.config, session.clock
    uptime = max(0, int(clock.seconds() - metrics.started))
    requests = sum(metrics.requests.values())
    fields: dict[str, list[tuple[str, object]]] = {
        "server": [
            ("redis_version", REDIS_VERSION),
            ("redis_mode", "standalone"),
            ("os", f"{os.uname().sysname} {os.uname().release} {os.uname().machine}"),
            ("arch_bits", 64 if sys.maxsize > 2**32 else 32),
            ("process_id", os.getpid()),
            ("tcp_port", 0),
            ("uptime_in_seconds", uptime),
            ("uptime_in_days", uptime // 86400),
        ],
        "clients": [
            ("connected_clients", metrics.connected_clients),
            ("maxclients", config.max_clients),
            ("blocked_clients", 0),
        ],
        "memory": [
            ("used_memory", _resident_bytes()),
        ],
        "stats": [
            ("total_connections_received", metrics.connections_received),
            ("total_commands_processed", requests),
            ("keyspace_hits", metrics.cache_hits),
            ("keyspace_misses", metrics.cache_misses),
            ("evicted_keys", metrics.cache_evictions),
            ("expired_keys", metrics.cache_expirations),
        ],
        "keyspace": [],  # redisp alone cannot say what the backing holds
        "proxy": [
            ("redisp_version", redisp.__version__),
            ("uptime_in_seconds", uptime),
            ("connected_clients", metrics.connected_clients),
            ("pinned_clients", metrics.pinned_clients),
            ("cache_size", metrics.cache_size()),
            ("cache_hits", metrics.cache_hits),
            ("cache_misses", metrics.cache_misses),
            ("cache_evictions", metrics.cache_evictions),
            ("cache_expirations", metrics.cache_expirations),
            ("cache_invalidations", metrics.cache_invalidations),
            ("write_invalidations", metrics.write_invalidations),
            ("write_flushes", metrics.write_flushes),
            ("forwarded_commands", sum(metrics.forwarded.values())),
            ("backing_redis", config.redis.redacted()),
            ("backing_status", "up" if metrics.backing_up() else "down"),
            *_topology(metrics, config),
            ("ttl", f"{config.ttl:g}"),
            ("capacity", config.capacity),
            ("concurrency", config.concurrency),
            ("forward", config.forward),
            ("invalidation", config.invalidation),
            ("invalidation_state", metrics.invalidation_state()),
            ("invalidation_messages", metrics.invalidation_messages),
            ("invalidation_flushes", metrics.invalidation_flushes),
            ("auth_failures", metrics.auth_failures),
        ],
    }
    blocks = []
    for name in INFO_SECTIONS:
        if name in sections:
            lines = [f"# {name.capitalize()}"]
            lines += [f"{key}:{value}" for key, value in fields[name]]
            blocks.append("".join(line + "\r\n" for line in lines))
    return "\r\n".join(blocks)


def _topology(metrics: Metrics, config: Config) -> list[tuple[str, object]]:
    """The ``topology`` field, and the fields of whoever follows a topology
    other than one server (cluster_map.ClusterTopology.describe)."""
    if metrics.topology_info is None:
        return [("topology", f"single {config.redis.host}:{config.redis.port}")]
    return metrics.topology_info()


def _resident_bytes() -> int:
    """This process's resident memory, what Redis's used_memory stands for here."""
    try:
        with open("/proc/self/statm", "rb") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0
