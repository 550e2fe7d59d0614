"""Raw-socket RESP and HTTP clients and the key set, shared by bench/chaos and bench/soak.

Both tools need to see exactly what goes wrong (an error reply, a reset, a
request that never gets an answer), so the clients are a few lines of asyncio
over plain sockets: no client library retries, reconnects or hides a timeout.

Static keys: ``s:%08d`` i, value ``svalue(i, max_len)`` (deterministic, 16 to
``max_len`` bytes, naming i), so any reply can be checked byte for byte.

    python bench/load_clients.py populate REDIS_PORT N MAX_LEN
        SET s:0 .. s:N-1 directly on Redis (pipelined MSETs), then check DBSIZE

Loopback only: the host is fixed to 127.0.0.1.
"""

from __future__ import annotations

import asyncio
import socket
import struct
import sys
from urllib.parse import quote_from_bytes

HOST = "127.0.0.1"

# reply kinds
BULK, NIL, ERR, SIMPLE, INT, ARRAY = "bulk", "nil", "err", "simple", "int", "array"

#: what a broken connection looks like from asyncio streams
CONN_ERRORS = (ConnectionError, asyncio.IncompleteReadError, OSError, EOFError)


def skey(i: int) -> bytes:
    return b"s:%08d" % i


def svalue(i: int, max_len: int) -> bytes:
    n = 16 + (i * 7919) % max(1, max_len - 15)
    head = b"s%08d:" % i
    return (head * (n // len(head) + 1))[:n]


def resp_command(*args: bytes) -> bytes:
    return b"*%d\r\n" % len(args) + b"".join(b"$%d\r\n%s\r\n" % (len(a), a) for a in args)


def resp_get(key: bytes) -> bytes:
    return b"*2\r\n$3\r\nGET\r\n$%d\r\n%s\r\n" % (len(key), key)


def http_get(key: bytes, close: bool = False) -> bytes:
    return (b"GET /get?key=%s HTTP/1.1\r\nHost: 127.0.0.1\r\n%s\r\n"
            % (quote_from_bytes(key, safe=":").encode(),
               b"Connection: close\r\n" if close else b""))


def error_kind(text: bytes) -> str:
    """redisp's error replies, by kind (SPEC §3): timeout, unavailable, or the text."""
    if text.startswith(b"ERR backing redis timed out"):
        return "timeout"
    if text.startswith(b"ERR backing redis unavailable"):
        return "unavailable"
    return "err:" + text[:40].decode("latin-1")


def http_kind(status: int) -> str:
    """redisp's HTTP statuses by the same kinds (SPEC §2)."""
    return {504: "timeout", 503: "unavailable"}.get(status, f"http{status}")


def exc_kind(exc: BaseException) -> str:
    if isinstance(exc, ConnectionRefusedError):
        return "refused"
    if isinstance(exc, ConnectionResetError):
        return "reset"
    if isinstance(exc, asyncio.IncompleteReadError | EOFError | BrokenPipeError):
        return "closed"
    return type(exc).__name__


class Conn:
    """One TCP connection to 127.0.0.1:port."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer

    @classmethod
    async def open(cls, port: int, timeout: float = 2.0) -> Conn:
        reader, writer = await asyncio.wait_for(asyncio.open_connection(HOST, port), timeout)
        return cls(reader, writer)

    def send(self, data: bytes) -> None:
        self.writer.write(data)

    def close(self) -> None:
        """Close at once (no waiting on the peer); a reset is fine too."""
        try:
            self.writer.close()
        except Exception:  # noqa: BLE001 - closing a dead socket may raise
            pass

    def abort(self) -> None:
        """Close with a reset (SO_LINGER 0): a client that vanishes."""
        sock = self.writer.get_extra_info("socket")
        try:
            if sock is not None:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        except OSError:
            pass
        self.writer.transport.abort()

    # -- RESP ------------------------------------------------------------------

    async def read_reply(self) -> tuple[str, object]:
        line = await self.reader.readuntil(b"\r\n")
        t, body = line[:1], line[1:-2]
        if t == b"$":
            n = int(body)
            if n < 0:
                return NIL, None
            data = await self.reader.readexactly(n + 2)
            return BULK, data[:-2]
        if t == b"-":
            return ERR, body
        if t == b"+":
            return SIMPLE, body
        if t == b":":
            return INT, int(body)
        if t == b"*":
            n = int(body)
            if n < 0:
                return NIL, None
            return ARRAY, [await self.read_reply() for _ in range(n)]
        raise ValueError(f"not a RESP reply: {line[:60]!r}")

    # -- HTTP ------------------------------------------------------------------

    async def read_response(self) -> tuple[int, dict[bytes, bytes], bytes]:
        """Status, headers (lower-case names) and body of one HTTP/1.1 response."""
        status_line = await self.reader.readuntil(b"\r\n")
        parts = status_line.split(b" ", 2)
        if len(parts) < 2 or not parts[0].startswith(b"HTTP/"):
            raise ValueError(f"not an HTTP status line: {status_line[:60]!r}")
        status = int(parts[1])
        headers: dict[bytes, bytes] = {}
        while True:
            line = await self.reader.readuntil(b"\r\n")
            if line == b"\r\n":
                break
            name, _, value = line.partition(b":")
            headers[name.strip().lower()] = value.strip()
        if headers.get(b"transfer-encoding", b"").lower() == b"chunked":
            chunks = []
            while True:
                size = int((await self.reader.readuntil(b"\r\n")).split(b";")[0], 16)
                data = await self.reader.readexactly(size + 2)
                if size == 0:
                    break
                chunks.append(data[:-2])
            body = b"".join(chunks)
        else:
            body = await self.reader.readexactly(int(headers.get(b"content-length", b"0")))
        return status, headers, body


async def populate(port: int, n: int, max_len: int) -> None:
    conn = await Conn.open(port)
    batch = 500
    sent = 0
    for start in range(0, n, batch):
        args = [b"MSET"]
        for i in range(start, min(n, start + batch)):
            args += [skey(i), svalue(i, max_len)]
        conn.send(resp_command(*args))
        sent += 1
        if sent % 20 == 0:
            await conn.writer.drain()
    for _ in range(sent):
        kind, reply = await conn.read_reply()
        if kind != SIMPLE:
            raise SystemExit(f"populate: MSET answered {kind} {reply!r}")
    conn.send(resp_command(b"EXISTS", skey(0), skey(n - 1)))
    kind, reply = await conn.read_reply()
    if reply != 2:
        raise SystemExit(f"populate: keys missing after MSET ({reply!r})")
    conn.close()


if __name__ == "__main__":
    if len(sys.argv) != 5 or sys.argv[1] != "populate":
        raise SystemExit(__doc__)
    asyncio.run(populate(int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])))
