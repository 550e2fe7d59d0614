"""bench/chaos's load: a steady, rate-limited mix of GETs on both of redisp's doors,
every request recorded, plus a prober that says when Redis itself answers.

CONNS connections per door (RESP and HTTP), one request in flight on each,
RATE requests per second in all.  Each request is one of:

* ``w`` (half): a key the writer keeps changing (``<prefix>w:K``); its value
  is checked later against the writer's history (chaos_report.py);
* ``h`` (a quarter): one of HOT static keys, read over and over (hits);
* ``m`` (a quarter): the next static key not read before in this run, a
  guaranteed miss; its value is checked here.

A request not answered within HANG_CAP seconds is given up and its
connection closed (redisp drops what it queued for it).  The prober GETs
``s:00000000`` directly on Redis every 10 ms (no timeout while the connection
lives: a SIGSTOPped Redis answers it right after SIGCONT), so the report knows
when Redis was reachable again.

Runs until SIGTERM (or MAX_SECONDS), then writes OUT as JSON:
``requests``: [door, kind, ident, t0, t1, outcome, value, x_cache] (wall clock;
outcome: ``value`` / ``nil`` for ``w``; ``ok`` / ``wrong`` for ``h`` and ``m``;
else an error kind: timeout, unavailable, reset, closed, hung, ...),
``probe_ok`` and ``probe_fail``: times of the prober's answers.

    python bench/chaos_load.py RESP_PORT HTTP_PORT REDIS_PORT PREFIX OUT \
        [--rate 400] [--conns 16] [--wkeys 20] [--hot 10] [--miss-start 10] \
        [--miss-count 20000] [--max-len 200] [--hang-cap 10] [--max-seconds 900]
"""

from __future__ import annotations

import argparse
import asyncio
import json
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


class Load:
    def __init__(self, a: argparse.Namespace) -> None:
        self.a = a
        self.stopping = asyncio.Event()
        self.requests: list[list] = []
        self.probe_ok: list[float] = []
        self.probe_fail: list[float] = []
        self.next_miss = 0
        self.rng = random.Random(2)

    def pick(self) -> tuple[str, int, bytes]:
        r = self.rng.random()
        if r < 0.5:
            k = self.rng.randrange(self.a.wkeys)
            return "w", k, self.a.prefix.encode() + b"w:%d" % k
        if r < 0.75:
            i = self.rng.randrange(self.a.hot)
            return "h", i, skey(i)
        i = self.a.miss_start + self.next_miss % self.a.miss_count
        self.next_miss += 1
        return "m", i, skey(i)

    def judge(self, kind: str, ident: int, value: bytes | None) -> tuple[str, object]:
        if kind == "w":
            if value is None:
                return "nil", None
            try:
                return "value", int(value)
            except ValueError:
                return "wrong", value[:40].decode("latin-1")
        if value == svalue(ident, self.a.max_len):
            return "ok", None
        return "wrong", "nil" if value is None else value[:40].decode("latin-1")

    async def worker(self, door: str, port: int, total: int) -> None:
        a = self.a
        loop = asyncio.get_running_loop()
        interval = total / a.rate
        next_t = loop.time() + self.rng.random() * interval
        conn: Conn | None = None
        while not self.stopping.is_set():
            next_t += interval
            delay = next_t - loop.time()
            if delay > 0:
                await asyncio.sleep(delay)
            elif delay < -1.0:
                next_t = loop.time()  # after a stall: no burst to catch up
            kind, ident, key = self.pick()
            t0 = time.time()
            if conn is None:
                try:
                    conn = await Conn.open(port, timeout=a.hang_cap)
                except (TimeoutError, *CONN_ERRORS) as e:
                    outcome = "hung" if isinstance(e, TimeoutError) else exc_kind(e)
                    self.requests.append([door, "connect", 0, t0, time.time(), outcome,
                                          None, None])
                    await asyncio.sleep(0.05)
                    continue
                t0 = time.time()
            x_cache = None
            value: object = None
            try:
                if door == "resp":
                    conn.send(resp_get(key))
                    rkind, reply = await asyncio.wait_for(conn.read_reply(), a.hang_cap)
                    if rkind in (BULK, NIL):
                        outcome, value = self.judge(kind, ident, reply)
                    elif rkind == ERR:
                        outcome = error_kind(reply)
                    else:
                        outcome, value = "wrong", f"{rkind} {reply!r}"[:40]
                else:
                    conn.send(http_get(key))
                    status, headers, body = await asyncio.wait_for(conn.read_response(),
                                                                   a.hang_cap)
                    x_cache = headers.get(b"x-cache", b"").decode("latin-1") or None
                    if status in (200, 404):
                        outcome, value = self.judge(kind, ident, body if status == 200 else None)
                    else:
                        outcome = http_kind(status)
                    if headers.get(b"connection", b"").lower() == b"close":
                        conn.close()
                        conn = None
            except TimeoutError:  # before CONN_ERRORS: TimeoutError is an OSError
                outcome = "hung"
                conn.close()
                conn = None
            except (*CONN_ERRORS, ValueError) as e:
                outcome = "garbled" if isinstance(e, ValueError) else exc_kind(e)
                conn.close()
                conn = None
            self.requests.append([door, kind, ident, t0, time.time(), outcome, value, x_cache])
        if conn is not None:
            conn.close()

    async def prober(self) -> None:
        conn: Conn | None = None
        while not self.stopping.is_set():
            if conn is None:
                try:
                    conn = await Conn.open(self.a.redis, timeout=0.5)
                except (TimeoutError, *CONN_ERRORS):
                    self.probe_fail.append(time.time())
                    await asyncio.sleep(0.01)
                    continue
            try:
                conn.send(resp_get(skey(0)))
                rkind, _ = await asyncio.wait_for(conn.read_reply(), 60.0)
                (self.probe_ok if rkind == BULK else self.probe_fail).append(time.time())
            except (TimeoutError, *CONN_ERRORS, ValueError):
                self.probe_fail.append(time.time())
                conn.close()
                conn = None
            await asyncio.sleep(0.01)
        if conn is not None:
            conn.close()

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        loop.add_signal_handler(signal.SIGTERM, self.stopping.set)
        loop.add_signal_handler(signal.SIGINT, self.stopping.set)
        loop.call_later(self.a.max_seconds, self.stopping.set)
        total = 2 * self.a.conns
        tasks = [asyncio.create_task(self.worker(door, port, total))
                 for door, port in (("resp", self.a.resp_port), ("http", self.a.http_port))
                 for _ in range(self.a.conns)]
        tasks.append(asyncio.create_task(self.prober()))
        await self.stopping.wait()
        # every worker ends with its request in flight, within HANG_CAP; the prober
        # may be waiting on a stopped Redis: it is not waited for
        await asyncio.wait(tasks[:-1], timeout=self.a.hang_cap + 5)
        for t in tasks:
            t.cancel()


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("resp_port", type=int)
    p.add_argument("http_port", type=int)
    p.add_argument("redis", type=int)
    p.add_argument("prefix")
    p.add_argument("out")
    p.add_argument("--rate", type=float, default=400.0)
    p.add_argument("--conns", type=int, default=16)
    p.add_argument("--wkeys", type=int, default=20)
    p.add_argument("--hot", type=int, default=10)
    p.add_argument("--miss-start", type=int, default=10)
    p.add_argument("--miss-count", type=int, default=20000)
    p.add_argument("--max-len", type=int, default=200)
    p.add_argument("--hang-cap", type=float, default=10.0)
    p.add_argument("--max-seconds", type=float, default=900.0)
    a = p.parse_args()
    load = Load(a)
    asyncio.run(load.run())
    with open(a.out, "w") as f:
        json.dump({"requests": load.requests, "probe_ok": load.probe_ok,
                   "probe_fail": load.probe_fail}, f)
    c = Counter(r[5] for r in load.requests)
    print(f"load: {len(load.requests)} requests: "
          + ", ".join(f"{k} {v}" for k, v in c.most_common()), file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
