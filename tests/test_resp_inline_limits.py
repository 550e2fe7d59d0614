"""Every request limit holds for both request forms at the RESP door (issue 8,
item 15): a 16 KB inline MGET of 8 000 keys was once accepted past the
1 024-argument limit and stalled every client."""

from __future__ import annotations

from tests.test_resp import encode
from tests.test_resp_server import Door


class Lookups:
    """The keys looked up in the real reader's cache, hit or miss, to prove
    a refused request ran nothing."""

    def __init__(self, door: Door) -> None:
        self.metrics = door.metrics

    @property
    def looked_up(self) -> int:
        return self.metrics.cache_hits + self.metrics.cache_misses


def connect(**limits: int):
    door = Door({b"k": b"v"}, max_clients=10, **limits)
    proto, transport = door.connect()
    return proto, transport, Lookups(door)


def test_inline_mget_over_max_args_is_refused_before_it_runs():
    proto, transport, reader = connect(max_args=4)
    proto.dataReceived(b"MGET k k k\r\n")
    assert transport.value() == b"*3\r\n$1\r\nv\r\n$1\r\nv\r\n$1\r\nv\r\n"
    looked_up = reader.looked_up
    assert looked_up == 3
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
