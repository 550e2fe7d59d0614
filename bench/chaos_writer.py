"""bench/chaos's writer: versioned values written directly on Redis, each write recorded.

Keys ``<prefix>w:0`` .. ``<prefix>w:K-1``; every SET writes the next value of
one global counter, so a value names exactly one write and any reply can be
placed in the key's history.  One connection, one write at a time, and no
write is ever abandoned while Redis may still execute it: a reply is awaited
for as long as the connection lives (SIGSTOP only delays it), so Redis applies
a key's writes in counter order and the history is exact.  A write whose
connection died gets an unknown outcome (Redis may or may not have it).

Output, one line per write: ``key_index value send_time ack_time`` (wall
clock, seconds); ack_time -1 = unknown outcome, -2 = refused with an error
(never held).  The initial value of every key is written first, then the
ready file is created.  Stops on SIGTERM.

    python bench/chaos_writer.py REDIS_PORT PREFIX KEYS RATE OUT READY_FILE
"""

from __future__ import annotations

import random
import signal
import socket
import sys
import time

HOST = "127.0.0.1"
REPLY_WAIT = 60.0  # far beyond any stall bench/chaos makes; bounded all the same
UNKNOWN, REFUSED = -1.0, -2.0

stopping = False


def _stop(*_: object) -> None:
    global stopping
    stopping = True


def connect(port: int) -> tuple[socket.socket, object]:
    while not stopping:
        try:
            s = socket.create_connection((HOST, port), timeout=0.5)
            s.settimeout(REPLY_WAIT)
            s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            return s, s.makefile("rb")
        except OSError:
            time.sleep(0.02)
    raise SystemExit(0)


def main(port: int, prefix: bytes, keys: int, rate: float, out_path: str, ready: str) -> int:
    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)
    rng = random.Random(1)
    counter = 0
    acked = lost = refused = 0
    sock, reader = connect(port)
    with open(out_path, "w") as out:
        def write(k: int) -> bool:
            nonlocal counter, sock, reader, acked, lost, refused
            counter += 1
            key = prefix + b"w:%d" % k
            value = b"%d" % counter
            t_send = time.time()
            try:
                sock.sendall(b"*3\r\n$3\r\nSET\r\n$%d\r\n%s\r\n$%d\r\n%s\r\n"
                             % (len(key), key, len(value), value))
                line = reader.readline()
                if not line:
                    raise ConnectionError("closed")
            except OSError:  # reset, closed or REPLY_WAIT passed: Redis may have it
                out.write(f"{k} {counter} {t_send:.6f} {UNKNOWN}\n")
                lost += 1
                sock.close()
                sock, reader = connect(port)
                return False
            if line.startswith(b"+OK"):
                out.write(f"{k} {counter} {t_send:.6f} {time.time():.6f}\n")
                acked += 1
                return True
            out.write(f"{k} {counter} {t_send:.6f} {REFUSED}\n")  # e.g. -LOADING
            refused += 1
            time.sleep(0.01)
            return False

        for k in range(keys):  # every key holds a value before any read
            while not write(k):
                if stopping:
                    return 1
        out.flush()
        open(ready, "w").close()
        interval = 1.0 / rate
        next_t = time.monotonic()
        while not stopping:
            next_t += interval
            delay = next_t - time.monotonic()
            if delay > 0:
                time.sleep(delay)
            elif delay < -1.0:
                next_t = time.monotonic()  # after a stall: no burst to catch up
            write(rng.randrange(keys))
    print(f"writer: {acked} acknowledged, {lost} unknown (connection lost), "
          f"{refused} refused", file=sys.stderr)
    return 0


if __name__ == "__main__":
    a = sys.argv[1:]
    if len(a) != 6:
        raise SystemExit(__doc__)
    sys.exit(main(int(a[0]), a[1].encode(), int(a[2]), float(a[3]), a[4], a[5]))
