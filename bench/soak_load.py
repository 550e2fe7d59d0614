"""bench/soak's load: a mixed, rate-limited load on both of redisp's doors for
SECONDS, with connections opening and closing all the time.

Clients (each a paced asyncio task; SCALE multiplies every rate):

* RESP pipeliners (4): batches of 16 GETs, all replies read and checked; a new
  connection every 50 batches (3 batches/s each);
* RESP keep-alive (4): one GET at a time, a new connection every 100 (10/s each);
* HTTP keep-alive (4): one GET at a time, a new connection every 100 (15/s each);
* RESP and HTTP one-shot: connect, one GET, read, close (15/s each);
* abandoners (10/s): connect and then, at random, send half a request and
  close; pipeline 32 GETs (RESP) or 8 (HTTP) and reset the connection without
  reading a reply; or send one GET and close before the reply.

Keys: 70 % from HOT static keys (hits), 30 % uniform over KEYS static keys
(mostly misses once the cache is full; values 16 B to MAX_LEN B).  Every
reply that is read is checked byte for byte.  At the end every connection is
closed, and a summary line goes to stdout.

    python bench/soak_load.py RESP_PORT HTTP_PORT SECONDS \
        [--keys 20000] [--hot 200] [--max-len 4096] [--scale 1.0]
"""

from __future__ import annotations

import argparse
import asyncio
import random
import signal
import sys
import time
from collections import Counter

from load_clients import (
    BULK,
    CONN_ERRORS,
    ERR,
    NIL,
    Conn,
    error_kind,
    exc_kind,
    http_get,
    http_kind,
    resp_get,
    skey,
    svalue,
)

REPLY_WAIT = 30.0  # a reply later than this counts as "hung" and the connection is dropped


class Soak:
    def __init__(self, a: argparse.Namespace) -> None:
        self.a = a
        self.rng = random.Random(3)
        self.outcomes: Counter[str] = Counter()
        self.connections = 0
        self.stopping = asyncio.Event()

    def key(self) -> int:
        if self.rng.random() < 0.7:
            return self.rng.randrange(self.a.hot)
        return self.rng.randrange(self.a.keys)

    def check(self, i: int, value: bytes | None) -> None:
        self.outcomes["ok" if value == svalue(i, self.a.max_len) else "wrong"] += 1

    async def open(self, port: int) -> Conn | None:
        try:
            conn = await Conn.open(port, timeout=REPLY_WAIT)
        except (TimeoutError, *CONN_ERRORS) as e:
            self.outcomes["connect " + exc_kind(e)] += 1
            await asyncio.sleep(0.05)
            return None
        self.connections += 1
        return conn

    async def paced(self, rate: float, step) -> None:
        """Call ``step()`` ``rate`` times a second until the end; no catch-up bursts."""
        loop = asyncio.get_running_loop()
        interval = 1.0 / (rate * self.a.scale)
        next_t = loop.time() + self.rng.random() * interval
        while not self.stopping.is_set():
            next_t += interval
            delay = next_t - loop.time()
            if delay > 0:
                await asyncio.sleep(delay)
            elif delay < -1.0:
                next_t = loop.time()
            await step()

    async def resp_replies(self, conn: Conn, keys: list[int]) -> bool:
        """Read and check one reply per key; False when the connection is unusable."""
        try:
            for i in keys:
                kind, reply = await asyncio.wait_for(conn.read_reply(), REPLY_WAIT)
                if kind in (BULK, NIL):
                    self.check(i, reply)
                elif kind == ERR:
                    self.outcomes[error_kind(reply)] += 1
                else:
                    self.outcomes["wrong"] += 1
            return True
        except TimeoutError:
            self.outcomes["hung"] += 1
        except (*CONN_ERRORS, ValueError) as e:
            self.outcomes[exc_kind(e)] += 1
        conn.close()
        return False

    async def http_reply(self, conn: Conn, i: int) -> bool:
        try:
            status, _, body = await asyncio.wait_for(conn.read_response(), REPLY_WAIT)
        except TimeoutError:
            self.outcomes["hung"] += 1
        except (*CONN_ERRORS, ValueError) as e:
            self.outcomes[exc_kind(e)] += 1
        else:
            if status in (200, 404):
                self.check(i, body if status == 200 else None)
            else:
                self.outcomes[http_kind(status)] += 1
            return True
        conn.close()
        return False

    def persistent(self, door: str, batch: int, per_conn: int):
        """A client that keeps a connection for ``per_conn`` steps of ``batch`` GETs."""
        port = self.a.resp_port if door == "resp" else self.a.http_port
        state: dict = {"conn": None, "left": 0}

        async def step() -> None:
            if state["conn"] is None or state["left"] == 0:
                if state["conn"] is not None:
                    state["conn"].close()
                state["conn"] = await self.open(port)
                state["left"] = per_conn
                if state["conn"] is None:
                    return
            conn: Conn = state["conn"]
            state["left"] -= 1
            keys = [self.key() for _ in range(batch)]
            if door == "resp":
                conn.send(b"".join(resp_get(skey(i)) for i in keys))
                ok = await self.resp_replies(conn, keys)
            else:
                conn.send(http_get(skey(keys[0])))
                ok = await self.http_reply(conn, keys[0])
            if not ok:
                state["conn"] = None

        return step, state

    async def one_shot(self, door: str) -> None:
        port = self.a.resp_port if door == "resp" else self.a.http_port
        conn = await self.open(port)
        if conn is None:
            return
        i = self.key()
        if door == "resp":
            conn.send(resp_get(skey(i)))
            await self.resp_replies(conn, [i])
        else:
            conn.send(http_get(skey(i), close=True))
            await self.http_reply(conn, i)
        conn.close()

    async def abandon(self) -> None:
        way = self.rng.randrange(6)
        door = "resp" if way < 3 else "http"
        conn = await self.open(self.a.resp_port if door == "resp" else self.a.http_port)
        if conn is None:
            return
        if way == 0:  # half a request, then close
            req = resp_get(skey(self.key()))
            conn.send(req[: len(req) // 2])
        elif way == 1:  # 32 pipelined misses, then a reset without reading
            conn.send(b"".join(resp_get(skey(self.rng.randrange(self.a.keys)))
                               for _ in range(32)))
        elif way == 2:  # one GET, closed before the reply
            conn.send(resp_get(skey(self.key())))
        elif way == 3:
            req = http_get(skey(self.key()))
            conn.send(req[: len(req) // 2])
        elif way == 4:
            conn.send(b"".join(http_get(skey(self.rng.randrange(self.a.keys)))
                               for _ in range(8)))
        else:
            conn.send(http_get(skey(self.key())))
        try:
            await conn.writer.drain()
        except CONN_ERRORS:
            pass
        await asyncio.sleep(0.001 * self.rng.randrange(20))
        self.outcomes["abandoned"] += 1
        if way in (1, 4):
            conn.abort()
        else:
            conn.close()

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        loop.add_signal_handler(signal.SIGTERM, self.stopping.set)
        loop.add_signal_handler(signal.SIGINT, self.stopping.set)
        loop.call_later(self.a.seconds, self.stopping.set)
        jobs, states = [], []
        for door, batch, per_conn, rate, n in (("resp", 16, 50, 3, 4), ("resp", 1, 100, 10, 4),
                                               ("http", 1, 100, 15, 4)):
            for _ in range(n):
                step, state = self.persistent(door, batch, per_conn)
                jobs.append(self.paced(rate, step))
                states.append(state)
        jobs.append(self.paced(15, lambda: self.one_shot("resp")))
        jobs.append(self.paced(15, lambda: self.one_shot("http")))
        jobs.append(self.paced(10, self.abandon))
        await asyncio.gather(*jobs)
        for state in states:
            if state["conn"] is not None:
                state["conn"].close()
        await asyncio.sleep(0.1)  # let the closes reach the kernel


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("resp_port", type=int)
    p.add_argument("http_port", type=int)
    p.add_argument("seconds", type=float)
    p.add_argument("--keys", type=int, default=20000)
    p.add_argument("--hot", type=int, default=200)
    p.add_argument("--max-len", type=int, default=4096)
    p.add_argument("--scale", type=float, default=1.0)
    a = p.parse_args()
    soak = Soak(a)
    t0 = time.monotonic()
    asyncio.run(soak.run())
    took = time.monotonic() - t0
    o = soak.outcomes
    answered = sum(v for k, v in o.items() if k != "abandoned" and not k.startswith("connect "))
    print(f"load: {took:.0f}s, {soak.connections} connections opened, {answered} replies "
          f"({answered / took:.0f}/s), "
          + ", ".join(f"{k} {v}" for k, v in o.most_common()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
