"""Every request limit holds for both request forms at the RESP door (issue 8,
item 15): a 16 KB inline MGET of 8 000 keys was once accepted past the
1 024-argument limit and stalled every client."""

from __future__ import annotations

from twisted.internet import task
from twisted.internet.testing import StringTransport

from redisp.clients import ClientSlots
from redisp.config import Config
from redisp.metrics import Metrics
from redisp.resp_server import RespFactory
from tests.test_commands import FakeReader
from tests.test_resp import encode
from tests.test_resp_server import PEER


class CountingReader(FakeReader):
    """Counts the keys looked up, to prove a refused request ran nothing."""

    def __init__(self, values: dict[bytes, bytes]) -> None:
        super().__init__(values)
        self.looked_up = 0

    def get(self, key: bytes):
        self.looked_up += 1
        return super().get(key)

    def read(self, key: bytes):
        self.looked_up += 1
        return super().read(key)


def connect(**limits: int):
    clock = task.Clock()
    metrics = Metrics(started=clock.seconds())
    reader = CountingReader({b"k": b"v"})
    config = Config(protected_mode=False, **limits)  # StringTransport's peer is not loopback
    factory = RespFactory(reader, metrics, ClientSlots(10, metrics), config, clock)
    proto = factory.buildProtocol(PEER)
    transport = StringTransport()
    proto.makeConnection(transport)
    return proto, transport, reader


def test_inline_mget_over_max_args_is_refused_before_it_runs():
    proto, transport, reader = connect(max_args=4)
    proto.dataReceived(b"MGET k k k\r\n")
    assert transport.value() == b"*3\r\n$1\r\nv\r\n$1\r\nv\r\n$1\r\nv\r\n"
    looked_up = reader.looked_up
    proto.dataReceived(b"MGET " + b"k " * 8000 + b"\r\n")
    assert transport.value().endswith(b"-ERR Protocol error: too big inline request\r\n")
    assert transport.disconnecting
    assert reader.looked_up == looked_up


def test_multibulk_mget_over_max_args_is_refused_on_its_header():
    proto, transport, reader = connect(max_args=4)
    proto.dataReceived(b"*5\r\n")
    assert transport.value() == b"-ERR Protocol error: invalid multibulk length\r\n"
    assert reader.looked_up == 0


def test_inline_argument_over_max_bulk_bytes_is_refused():
    proto, transport, reader = connect(max_bulk_bytes=4)
    proto.dataReceived(b"GET kkkkk\r\n")
    assert transport.value() == b"-ERR Protocol error: too big inline request\r\n"
    assert reader.looked_up == 0


def test_get_fast_path_keeps_the_limits():
    """With max_bulk_bytes below 3 the name GET itself is too long, as for
    Redis's proto-max-bulk-len: the fast path must refuse it too."""
    proto, transport, reader = connect(max_bulk_bytes=2)
    proto.dataReceived(encode(b"GET", b"k"))
    assert transport.value() == b"-ERR Protocol error: invalid bulk length\r\n"
    assert reader.looked_up == 0
