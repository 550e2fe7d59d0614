"""``twistd redisp``: the command-line options and ``makeService``.

Options default to None so ``load_config`` can tell "not given" from "given",
which the precedence (command line > environment > conf.yaml) needs.
"""

from __future__ import annotations

import gc
import os
from typing import Any

from twisted.application.service import IService
from twisted.logger import Logger
from twisted.python import usage

from redisp.config import ConfigError, load_config

log = Logger()

#: said once when a password is on the command line (as redis-cli says of -a)
COMMAND_LINE_SECRET_WARNING = (
    "a password given on the command line ({where}) can be read by every local user "
    "(ps, /proc); set REDISP_PASSWORD, or password in conf.yaml, instead "
    "(the backing's in REDISP_REDIS or conf.yaml's redis)")

#: (option, conf.yaml key, help); every key is also REDISP_<KEY> in the environment
OPTIONS = [
    ("http", "HTTP listener, a Twisted server endpoint string, or none "
             "[default: tcp:9997:interface=127.0.0.1]"),
    ("resp", "RESP listener, a Twisted server endpoint string, or none "
             "[default: tcp:6380:interface=127.0.0.1]"),
    ("redis", "backing Redis URL redis://[[user]:password@]host:port/db, or rediss://... "
              "for TLS, redis+sentinel://…/service or redis+cluster://… "
              "[default: redis://127.0.0.1:6379/0]"),
    ("redis-timeout", "seconds before a call to the backing Redis is given up [default: 2.0]"),
    ("ttl", "seconds an entry may live in the cache, from when it was stored [default: 60]"),
    ("capacity", "cache capacity in keys; 0 = no caching, pure pass-through [default: 10000]"),
    ("max-item-bytes", "a value larger than this is served but not cached; 0 = no limit "
                       "[default: 1048576]"),
    ("concurrency", "requests processed at once across all clients; 1 = one at a time "
                    "[default: 1]"),
    ("max-clients", "connections accepted at once over both front doors [default: 10000]"),
    ("invalidation", "off, or tracking: drop keys as soon as they change in Redis "
                     "(Redis >= 6) [default: off]"),
    ("client-timeout", "close a connection idle for this many seconds; 0 = never [default: 0]"),
    ("request-timeout", "close a connection that started a request and has not finished it "
                        "within this many seconds; 0 = never [default: 10]"),
    ("max-bulk-bytes", "largest bulk string argument accepted over RESP [default: 536870912]"),
    ("max-args", "most arguments in one RESP request [default: 1048576]"),
    ("max-inline-bytes", "longest inline (telnet) RESP request line [default: 65536]"),
    ("max-client-buffer", "bytes one client may have buffered, requests and replies together; "
                          "past it the client is disconnected [default: 1073741824]"),
    ("forward", "which other commands go to the backing Redis: all, read (read-only "
                "commands only) or none [default: all]"),
    ("deny-commands", "commands never forwarded, comma-separated "
                      "[default: SHUTDOWN,DEBUG,FAILOVER,REPLICAOF,SLAVEOF,SYNC,PSYNC]"),
    ("access-log", "log every HTTP request: true or false [default: false]"),
    ("password", "clients must authenticate with this password (AUTH, or HTTP "
                 "Authorization: Bearer); on the command line every local user can read it "
                 "in ps: prefer REDISP_PASSWORD or conf.yaml [default: none]"),
    ("protected-mode", "yes or no: with no password and no users, refuse clients that are "
                       "not on the loopback address [default: yes]"),
    ("redis-tls-ca", "rediss://: PEM file of the CA(s) the backing's certificate must chain "
                     "to [default: the system's CAs]"),
    ("redis-tls-cert", "rediss://: PEM file of redisp's client certificate, if the backing "
                       "wants one (with --redis-tls-key)"),
    ("redis-tls-key", "rediss://: PEM file of that certificate's private key (unencrypted)"),
    ("redis-tls-verify", "rediss://: verify the backing's certificate and host name: true or "
                         "false [default: true]"),
    ("tls-client-ca", "PEM file of the CA that must have signed the certificate of every "
                      "client of the ssl: listeners (mutual TLS)"),
    ("sentinel-user", "redis+sentinel://: the user redisp authenticates to the Sentinels as "
                      "(with --sentinel-password) [default: default]"),
    ("sentinel-password", "redis+sentinel://: the Sentinels' own password (their "
                          "requirepass); the URL's credentials are the master's; prefer "
                          "REDISP_SENTINEL_PASSWORD or conf.yaml [default: none]"),
]


class Options(usage.Options):
    """Every SPEC §1 option; each also settable as REDISP_<KEY> or in conf.yaml."""

    synopsis = "[options]"
    longdesc = (
        "A caching proxy for Redis: GET over HTTP (/get?key=K) and over the Redis "
        "protocol, from a local cache with a global TTL and LRU eviction. Each option "
        "can also be set in the environment as REDISP_<NAME> (e.g. REDISP_TTL) or as "
        "<name> in the YAML file given by --config (./conf.yaml by default). "
        "Precedence: command line > environment > conf.yaml > defaults."
    )
    optParameters: list[list[Any]] = [
        ["config", None, None, "YAML configuration file [default: ./conf.yaml if present]"],
        *[[name, None, None, text] for name, text in OPTIONS],
    ]


def cli_values(options: usage.Options) -> dict[str, str | None]:
    """The options as load_config keys (``redis-timeout`` -> ``redis_timeout``)."""
    return {name.replace("-", "_"): options[name] for name, _ in OPTIONS}


def makeService(options: usage.Options, reactor: Any = None) -> IService:
    """Load the configuration and build the proxy; bad config exits with one line."""
    if reactor is None:
        from twisted.internet import reactor as installed
        reactor = installed

    try:
        config = load_config(cli_values(options), os.environ, options["config"])
    except ConfigError as e:
        raise SystemExit(f"redisp: configuration error: {e}") from None
    secrets = command_line_secrets(options)
    if secrets:
        log.warn(COMMAND_LINE_SECRET_WARNING, where=", ".join(secrets))
        hide_from_process_title(list(secrets.values()))
    if config.redis.tls:  # read the TLS files once, before anything connects
        from dataclasses import replace

        from redisp.backing.tls import backing_url

        try:
            config = replace(config, redis=backing_url(config))
        except ConfigError as e:
            raise SystemExit(f"redisp: configuration error: {e}") from None
    if config.invalidation == "tracking":
        from redisp.core.tracking import tracking_support_problem

        problem = tracking_support_problem(config.redis, config.redis_timeout)
        if problem is not None:
            raise SystemExit(f"redisp: {problem}")

    from redisp.service import build_proxy

    service = build_proxy(config, reactor).service
    tune_garbage_collector()
    from redisp.event_loop import lean_dispatch

    lean_dispatch(reactor)  # one log context per poll, not per event (event_loop.py)
    full_collections(reactor).setServiceParent(service)
    return service


def command_line_secrets(options: usage.Options) -> dict[str, str]:
    """The passwords on the command line, by where they are, as typed."""
    from urllib.parse import urlsplit

    found = {}
    for key in ("password", "sentinel-password"):
        if options[key]:
            found["--" + key] = options[key]
    if options["redis"]:
        try:
            typed = urlsplit(options["redis"].strip()).password
        except ValueError:
            typed = None
        if typed:
            found["--redis"] = typed
    return found


def hide_from_process_title(secrets: list[str], argv: list[str] | None = None) -> str | None:
    """Rewrite the process title (what ps shows) with ``secrets`` as ``***``;
    returns the new title, or None when setproctitle is not installed (the
    warning is then all redisp can do)."""
    import sys

    try:
        from setproctitle import setproctitle
    except ImportError:
        return None
    words = []
    for word in sys.argv if argv is None else argv:
        for secret in secrets:
            word = word.replace(secret, "***")
        words.append(word)
    title = " ".join(words)
    setproctitle(title)
    return title


def tune_garbage_collector() -> None:
    """Fewer, cheaper collections for a long-running server process.

    Every request allocates short-lived Deferreds and lists; with the default
    gen0 threshold (700) the collector ran so often that it was a large share
    of a cache-miss profile (see bench/NOTES-perf.md, "What still misses,
    with evidence").  Freezing moves everything
    built at start-up (modules, the proxy's objects) out of every later
    collection's way.  Process-wide, so done here, in the twistd entry point,
    and not in build_proxy (tests build many proxies in one process).
    """
    gc.freeze()
    gc.set_threshold(50_000, 50, 50)


#: seconds between full collections (see full_collections)
FULL_COLLECTION_INTERVAL = 30.0


def full_collections(reactor: Any) -> Any:
    """A full collection every ``FULL_COLLECTION_INTERVAL`` seconds.

    With the thresholds above, the oldest generation is considered only after
    some hundred million allocations: the reference cycles of closed
    connections (protocol <-> transport) that lived long enough to reach it
    pile up for half an hour and more under a steady load, and RSS climbs
    with them (bench/soak).  A timed full collection bounds that; its cost
    is a traversal of the cache's dict, twice a minute (see
    bench/NOTES-perf.md, "Figures moved out of the code").
    """
    from twisted.application.internet import TimerService

    service = TimerService(FULL_COLLECTION_INTERVAL, gc.collect)
    service.clock = reactor
    return service
