"""``python -m redisp.probe [--ping] [redisp options]``: where is the backing Redis?

scripts/run asks this before starting redisp, so it can start a local
redis-server when none answers, at the very address redisp will use (the
same options, environment and conf.yaml, through the same ``load_config``).
Prints ``host port``; with ``--ping``, exits 0 only if a Redis answers PING
(or the backing is ``rediss://``, Sentinel or Cluster: the operator's own,
and a plain one started here would be of no use to redisp).
"""

from __future__ import annotations

import os
import socket
import sys

from twisted.python import usage

from redisp.config import ConfigError, load_config
from redisp.tap import Options, cli_values


def answers_ping(host: str, port: int, timeout: float = 1.0) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout) as s:
            s.sendall(b"PING\r\n")
            reply = s.recv(64)
    except OSError:
        return False
    # "-NOAUTH" still means a Redis is there
    return reply.startswith((b"+PONG", b"-NOAUTH", b"-ERR"))


def main(argv: list[str]) -> int:
    ping = "--ping" in argv
    argv = [a for a in argv if a != "--ping"]
    options = Options()
    try:
        options.parseOptions(argv)
        config = load_config(cli_values(options), os.environ, options["config"])
    except (usage.UsageError, ConfigError) as e:
        print(f"redisp: {e}", file=sys.stderr)
        return 2
    host, port = config.redis.host, config.redis.port
    if ping:
        # a Sentinel or cluster deployment is the operator's own too: a
        # plain redis-server started at its first address would be none
        own = config.redis.tls or config.redis.kind != "server"
        return 0 if own or answers_ping(host, port) else 1
    print(host, port)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
