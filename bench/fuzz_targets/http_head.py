"""atheris target: the HTTP door's request-head handling (redisp.doors.web on twisted.web).

Each input, less its first byte, is what a client sends on one connection
to the real ``RedispSite`` (its ``_Channel`` on a ``StringTransport``, a
``task.Clock``, a cache that answers at once: ``k`` a hit, ``m`` a miss
fetched, anything else absent).  The first byte picks how the bytes are
cut.  A crash is any exception, any failure logged (the door turns a bug
into a logged 500), or a broken invariant:

* the response bytes do not depend on how the request was cut (the plain-GET
  fast path answers only a request that arrives whole, so cut and whole go
  different ways and must meet);
* ``plain_get`` and ``key_from_query`` raise nothing but ``BadKey``.

twisted.web is instrumented too: most of the head parsing is there.
Run by bench/fuzz; by hand: ``python bench/fuzz_targets/http_head.py
-runs=100000 CORPUS_DIR`` (``--seeds DIR`` writes the seed inputs).
"""

from __future__ import annotations

import contextlib
import os
import sys

try:
    import atheris
except ImportError:  # tests/test_fuzz_regressions.py runs the target without the fuzzer
    atheris = None

# what the door stands on, imported first so that only the web stack (redisp.doors.web,
# twisted.web) is instrumented: coverage there is what guides the search
from twisted.internet.address import IPv4Address
from twisted.internet.defer import succeed
from twisted.internet.error import ConnectionDone
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.logger import globalLogPublisher
from twisted.python.failure import Failure

import redisp.backing.connection
import redisp.core.reader
import redisp.protocol.sending  # noqa: F401
from redisp.clients import ClientSlots
from redisp.config import Config
from redisp.metrics import Metrics

_instrumented = (
    atheris.instrument_imports(include=["redisp", "twisted"])
    if atheris else contextlib.nullcontext()
)
with _instrumented:
    from redisp.doors.http import plain_get
    from redisp.doors.web import BadKey, build_site, key_from_query

ADDR = IPv4Address("TCP", "127.0.0.1", 40000)


class Reader:
    """The cache and backing as the door sees them, answering at once."""

    def read(self, key: bytes):
        return (b"value", True) if key == b"k" else None

    def get(self, key: bytes):
        if key == b"k":
            return (b"value", True)
        if key == b"m":
            return succeed((b"fetched", False))
        return (None, False)


class Backing:
    def ping(self):
        return succeed(b"PONG")


def make_site():
    clock = Clock()
    clock.advance(1_700_000_000)
    metrics = Metrics(started=clock.seconds())
    slots = ClientSlots(10, metrics)
    return build_site(Reader(), Backing(), metrics, slots, Config(), reactor=clock)


WHOLE, CUT = make_site(), make_site()
LOGGED: list = []


def _observe(event: dict) -> None:
    if "log_failure" in event:
        LOGGED.append(event)


def converse(site, pieces: list[bytes]) -> tuple[bytes, bool]:
    """The bytes a connection sends back, and whether it was closed."""
    channel = site.buildProtocol(ADDR)
    transport = StringTransport(peerAddress=ADDR)
    channel.makeConnection(transport)
    for piece in pieces:
        if transport.disconnecting:
            break
        channel.dataReceived(piece)
    closed = transport.disconnecting
    channel.connectionLost(Failure(ConnectionDone()))
    return transport.value(), closed


def TestOneInput(data: bytes) -> None:  # noqa: N802 (atheris's name)
    if not data:
        return
    stream = data[1:]
    size = data[0] % 17 or len(stream) // 2 or 1
    for text in (stream, stream.partition(b" ")[2].partition(b" ")[0]):
        plain_get(text)
        try:
            key_from_query(text)
        except BadKey:
            pass

    LOGGED.clear()
    globalLogPublisher.addObserver(_observe)
    try:
        whole = converse(WHOLE, [stream])
        cut = converse(CUT, [stream[i:i + size] for i in range(0, len(stream), size)])
    finally:
        globalLogPublisher.removeObserver(_observe)
    if LOGGED:
        LOGGED[0]["log_failure"].raiseException()
    if whole != cut and b"/metrics" not in stream:
        raise AssertionError(f"cutting the request changed the answer: {whole!r} != {cut!r}")


SEEDS = [
    b"\x00GET /get?key=k HTTP/1.1\r\nHost: x\r\n\r\n",
    b"\x01GET /get?key=m HTTP/1.1\r\nHost: x\r\nUser-Agent: a\r\nAccept: */*\r\n\r\n",
    b"\x05GET /get?key=%6b&x=1 HTTP/1.1\r\nHost: x\r\nConnection: keep-alive\r\n\r\n"
    b"HEAD /get?key=absent HTTP/1.1\r\n\r\n",
    b"\x03POST /get?key=k HTTP/1.1\r\nContent-Length: 3\r\n\r\nabc",
    b"\x00GET /healthz HTTP/1.0\r\n\r\n",
    b"\x02GET /get?key=k&key=m HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
    b"\x07GET /get?key=a+b HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
    b"\x00GET /nope HTTP/1.1\r\nX:  y\r\n folded\r\n\r\n",
]


def write_seeds(directory: str) -> None:
    os.makedirs(directory, exist_ok=True)
    for i, seed in enumerate(SEEDS):
        with open(os.path.join(directory, f"seed-{i}"), "wb") as f:
            f.write(seed)


if __name__ == "__main__":
    if sys.argv[1:2] == ["--seeds"]:
        write_seeds(sys.argv[2])
    else:
        atheris.Setup(sys.argv, TestOneInput)
        atheris.Fuzz()
