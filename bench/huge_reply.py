"""One huge reply and everyone else: the client side of bench/huge_reply.

One client sends ``MGET big big ... big`` (COUNT times a key holding a cached
1 MiB value: a 1 GiB reply) and reads the whole reply as fast as it can,
checking its length and framing.  Meanwhile another client sends ``GET
small`` one at a time and records each round trip, and a sampler reads the
redisp process's VmRSS every 20 ms.  Bounded: the reply is read once, the
other client stops when it is done (or after LIMIT seconds), every socket
has a timeout.  Loopback only.
Run: python bench/huge_reply.py PORT REDISP_PID [COUNT]
"""

import socket
import sys
import threading
import time

LIMIT = 300.0  # seconds any part may take, at most
VALUE_SIZE = 1024 * 1024


def rss_kib(pid: int, field: str = "VmRSS") -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"no {field} for pid {pid}")


def command(*args: bytes) -> bytes:
    return b"*%d\r\n" % len(args) + b"".join(b"$%d\r\n%b\r\n" % (len(a), a) for a in args)


def big_reader(port: int, count: int, out: dict) -> None:
    item = b"$%d\r\n" % VALUE_SIZE
    expected = len(b"*%d\r\n" % count) + count * (len(item) + VALUE_SIZE + 2)
    with socket.create_connection(("127.0.0.1", port), timeout=LIMIT) as sock:
        started = time.monotonic()
        sock.sendall(command(b"MGET", *[b"big"] * count))
        got = 0
        head = b""
        buf = bytearray(1 << 20)
        view = memoryview(buf)
        while got < expected:
            n = sock.recv_into(view)
            if not n:
                raise RuntimeError(f"closed after {got} of {expected} bytes")
            if len(head) < 64:
                head += bytes(view[:min(n, 64)])
            got += n
        out["seconds"] = time.monotonic() - started
        out["bytes"] = got
        if not head.startswith(b"*%d\r\n" % count + item):
            raise RuntimeError(f"unexpected reply start {head!r}")


def main() -> None:
    port, pid = int(sys.argv[1]), int(sys.argv[2])
    count = int(sys.argv[3]) if len(sys.argv) > 3 else 1023
    baseline = rss_kib(pid)
    peak = [baseline]
    big: dict = {}
    reader = threading.Thread(target=big_reader, args=(port, count, big), daemon=True)
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            peak[0] = max(peak[0], rss_kib(pid))
            time.sleep(0.02)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    latencies = []
    with socket.create_connection(("127.0.0.1", port), timeout=LIMIT) as other:
        request = command(b"GET", b"small")
        deadline = time.monotonic() + LIMIT
        reader.start()
        while reader.is_alive() and time.monotonic() < deadline:
            t0 = time.monotonic()
            other.sendall(request)
            reply = b""
            while not reply.endswith(b"\r\n") or reply.count(b"\r\n") < 2:
                chunk = other.recv(100)
                if not chunk:
                    raise RuntimeError("the other client was disconnected")
                reply += chunk
            latencies.append(time.monotonic() - t0)
            time.sleep(0.001)
    reader.join(LIMIT)
    done.set()
    sampler.join()
    if "bytes" not in big:
        raise RuntimeError("the huge reply did not complete")
    latencies.sort()
    ms = [x * 1000 for x in latencies] or [float("nan")]
    print(f"MGET of {count} x 1 MiB: {big['bytes'] / 2**20:.0f} MiB reply read in "
          f"{big['seconds']:.2f} s")
    print(f"redisp RSS: {baseline / 1024:.0f} MiB before, peak {peak[0] / 1024:.0f} MiB sampled "
          f"(+{(peak[0] - baseline) / 1024:.0f} MiB), VmHWM {rss_kib(pid, 'VmHWM') / 1024:.0f} MiB")
    print(f"other client meanwhile: {len(ms)} GETs, median {ms[len(ms) // 2]:.1f} ms, "
          f"p99 {ms[int(len(ms) * 0.99)]:.1f} ms, max {ms[-1]:.1f} ms")


if __name__ == "__main__":
    main()
