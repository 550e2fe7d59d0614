"""Python time of one HTTP cache hit through redisp's door, in-process.

The real Site, channel, request and FrontDoor, over a StringTransport, with
the key cached; wrk's request shape (``GET /get?key=hot``, a Host header,
keep-alive).  Stable where socket benchmarks on a shared VM swing by +-30%:
the A/B figure for the HTTP door's changes (bench/NOTES-perf.md).
With ``password`` the proxy has one and each request carries
``Authorization: Bearer``: what authentication costs a hit.
Run: .venv/bin/python bench/http_micro.py [profile | password | once N]

``once N`` answers N requests in one round and prints nothing: under
``valgrind --tool=callgrind``, the difference between two such runs (say N =
2000 and 12000) divided by 10000 is the door's instructions per request, a
figure that holds still whatever else the machine runs.
"""

import sys
import time

from twisted.internet.address import IPv4Address
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport

from redisp.clients import ClientSlots
from redisp.config import Config, Secret
from redisp.core.cache import Cache
from redisp.core.gate import Gate
from redisp.core.reader import CachedReader
from redisp.doors.web import build_site
from redisp.metrics import Metrics

REQUESTS = 4000
REQUEST = b"GET /get?key=hot HTTP/1.1\r\nHost: 127.0.0.1:9997\r\n\r\n"
PEER = IPv4Address("TCP", "127.0.0.1", 40000)  # loopback: let in by protected mode
PASSWORD = "bench-secret"


def main(password: str | None = None, rounds: int = 25, requests: int = REQUESTS) -> float:
    request = REQUEST
    if password:
        request = REQUEST[:-2] + b"Authorization: Bearer %s\r\n\r\n" % password.encode()
    clock = Clock()
    clock.advance(1_800_000_000)
    metrics = Metrics(started=0)
    cache = Cache(10, 3600.0, clock, metrics)
    cache.put(b"hot", b"v" * 100)
    reader = CachedReader(cache, Gate(1, clock), None, metrics)
    config = Config(password=Secret(password) if password else None)
    site = build_site(reader, None, metrics, ClientSlots(10, metrics), config, clock,
                      cache=cache)
    channel = site.buildProtocol(PEER)
    transport = StringTransport(peerAddress=PEER)
    channel.makeConnection(transport)
    best = float("inf")
    for _ in range(rounds):
        started = time.process_time()
        for _ in range(requests):
            channel.dataReceived(request)
        best = min(best, (time.process_time() - started) / requests)
        assert transport.value().count(b"X-Cache: HIT") == requests, transport.value()[:300]
        transport.clear()
    return best


if __name__ == "__main__":
    if sys.argv[1:] == ["profile"]:
        import cProfile
        import pstats

        cProfile.run("main()", "/tmp/http_micro.prof")
        pstats.Stats("/tmp/http_micro.prof").sort_stats("tottime").print_stats(30)
    elif sys.argv[1:2] == ["once"]:
        main(rounds=1, requests=int(sys.argv[2]))
    else:
        password = PASSWORD if sys.argv[1:] == ["password"] else None
        print(f"HTTP GET hit through the door{' (password)' if password else ''}: "
              f"{main(password) * 1e6:.2f} us of Python a request (best of 25)")
