"""Become one redisp worker listening on ports other workers listen on too.

    python bench/workers_reuseport.py HOST HTTP_PORT RESP_PORT -- twistd -n redisp ...

Binds one socket per door with SO_REUSEPORT (the kernel then spreads new
connections over every socket bound to the port, one accept queue each),
places them at descriptors 3 and 4 and replaces itself (same PID) with the
command, telling it about them the way systemd socket activation does
(LISTEN_PID, LISTEN_FDS, LISTEN_FDNAMES). The command is given
``--http systemd:domain=INET:name=http --resp systemd:domain=INET:name=resp``:
Twisted's ``systemd:`` endpoint adopts an inherited listening socket
(``reactor.adoptStreamPort``), so redisp runs unchanged, as a product.

Each worker binds its own socket (rather than all inheriting one) so that the
kernel balances connections between them; a worker that dies takes its socket
and the connections queued on it with it, and later connections go to the
others.
"""

from __future__ import annotations

import fcntl
import os
import socket
import sys

#: what redisp's own listeners get (service.BACKLOG, Redis's tcp-backlog)
BACKLOG = 511
#: where systemd puts the first inherited socket (SD_LISTEN_FDS_START)
FIRST_FD = 3


def reuseport_listener(host: str, port: int) -> socket.socket:
    """A listening TCP socket on ``host:port`` that other processes may bind too."""
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    s.bind((host, port))
    s.listen(BACKLOG)
    return s


def main(argv: list[str]) -> None:
    if len(argv) < 5 or argv[3] != "--":
        raise SystemExit(__doc__.strip().splitlines()[2].strip())
    host, http_port, resp_port, command = argv[0], int(argv[1]), int(argv[2]), argv[4:]
    sockets = [reuseport_listener(host, http_port), reuseport_listener(host, resp_port)]
    # out of the way of descriptors 3 and 4 first (F_DUPFD: the lowest free one
    # from 10 up), then onto them
    high = [fcntl.fcntl(s.fileno(), fcntl.F_DUPFD, 10) for s in sockets]
    for s in sockets:
        s.close()
    for i, fd in enumerate(high):
        os.dup2(fd, FIRST_FD + i, inheritable=True)
        os.close(fd)
    env = dict(os.environ, LISTEN_PID=str(os.getpid()), LISTEN_FDS="2",
               LISTEN_FDNAMES="http:resp")
    command += ["--http", "systemd:domain=INET:name=http",
                "--resp", "systemd:domain=INET:name=resp"]
    os.execvpe(command[0], command, env)


if __name__ == "__main__":
    main(sys.argv[1:])
