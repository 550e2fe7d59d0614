"""A raw socket to a redis-server: the reply bytes exactly as Redis sends them.

The reference for relay and command-table tests (what a client talking to
Redis directly would get), and the tool that records the ``COMMAND`` reply
the command-table tests load:

    python -m tests.raw_redis [PORT] [FILE]

With no PORT it starts a throwaway redis-server (tests/support.py).
"""

from __future__ import annotations

import socket
import sys
from collections.abc import Sequence
from pathlib import Path

from redisp.protocol.frames import FrameScanner

COMMAND_REPLY_FILE = Path(__file__).parent / "data" / "command-reply-7.0.resp"
LIMIT = 20.0  # seconds a reply may take, at most


def encode(*argv: bytes | str) -> bytes:
    """One request as clients send it: a multibulk of bulk strings."""
    args = [a.encode() if isinstance(a, str) else a for a in argv]
    return b"*%d\r\n" % len(args) + b"".join(b"$%d\r\n%b\r\n" % (len(a), a) for a in args)


def replies(port: int, requests: Sequence[Sequence[bytes | str]], expect: int | None = None,
            resp3: bool = False) -> list[bytes]:
    """Send ``requests`` in one write on a new connection; the reply frames
    (``expect`` of them, one per request by default), as raw bytes.  With
    ``resp3`` the connection first says HELLO 3 (its reply is not returned)."""
    scanner = FrameScanner()
    data = b"".join(encode(*argv) for argv in requests)
    wanted = len(requests) if expect is None else expect
    if resp3:
        data = encode("HELLO", "3") + data
        wanted += 1
    frames: list[bytes] = []
    with socket.create_connection(("127.0.0.1", port), timeout=LIMIT) as sock:
        sock.sendall(data)
        while len(frames) < wanted:
            chunk = sock.recv(65536)
            if not chunk:
                raise RuntimeError(f"redis-server closed the connection after {frames!r:.200}")
            frames += scanner.feed(chunk)
    return frames[1:] if resp3 else frames


def main(argv: list[str]) -> None:
    path = Path(argv[2]) if len(argv) > 2 else COMMAND_REPLY_FILE
    if len(argv) > 1:
        [reply] = replies(int(argv[1]), [["COMMAND"]])
    else:
        from tests.support import RedisServer

        server = RedisServer().start()
        try:
            [reply] = replies(server.port, [["COMMAND"]])
        finally:
            server.stop()
    path.write_bytes(reply)
    print(f"{len(reply)} bytes -> {path}")


if __name__ == "__main__":
    main(sys.argv)
