"""Authentication on the RESP door's every path (SPEC §8), in memory.

The door answers GETs by several roads (doors/resp.py): one GET in a
packet (-P 1), a packet of hits, a packet past ``GET_BATCH``, a packet with
misses through the gate, the general dispatch (mixed or inline requests,
MGET), and requests held while the client does not read.  None of them may
answer a key before the client has authenticated: one test per road, each
with the key in the cache, so a road that skipped the check would answer
it.  Then protected mode, at connect.
"""

from __future__ import annotations

import pytest
from twisted.internet.address import IPv4Address, UNIXAddress
from twisted.internet.error import ConnectionDone
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure

from redisp.commands.auth import DENIED, NOAUTH
from redisp.config import Secret
from redisp.doors.resp import GET_BATCH
from tests.test_resp import encode
from tests.test_resp_server import PEER, RecordingTransport, real_door

PASSWORD = Secret("pw")
AUTH = encode(b"AUTH", b"pw")
VALUE = b"$5\r\nvalue\r\n"


def gets(*keys: bytes) -> bytes:
    return b"".join(encode(b"GET", key) for key in keys)


@pytest.fixture
def door():
    """A door with a password whose cache holds ``k`` (fetched by a client
    that authenticated); the backing records any call."""
    door, backing = real_door(password=PASSWORD)
    proto, transport = door.connect()
    proto.dataReceived(AUTH + gets(b"k"))
    backing.pending.pop().callback(b"value")
    door.clock.advance(0)
    assert transport.value() == b"+OK\r\n" + VALUE
    backing.calls.clear()
    door.backing = backing
    return door


def cache_reads(door) -> int:
    """Lookups the reader made in the cache (its own Metrics, see real_door)."""
    metrics = door.reader._metrics
    return metrics.cache_hits + metrics.cache_misses


def unauthenticated(door, packet: bytes) -> bytes:
    """What a new connection that has not authenticated reads for ``packet``."""
    reads = cache_reads(door)
    proto, transport = door.connect()
    proto.dataReceived(packet)
    door.clock.advance(0)
    assert cache_reads(door) == reads, "a key was looked up in the cache"
    assert door.metrics.requests["resp", "hit"] == 0
    assert door.backing.calls == [], "a key was fetched"
    return transport.value()


def test_one_get_in_a_packet(door):
    """-P 1: ``_run_gets``' single-lookup path."""
    assert unauthenticated(door, gets(b"k")) == NOAUTH


def test_a_packet_of_hits(door):
    """``CachedReader.cached`` for a packet of up to GET_BATCH keys."""
    assert unauthenticated(door, gets(b"k", b"k", b"k")) == NOAUTH * 3


def test_a_packet_past_get_batch(door):
    """``_run_hits``: a large packet of hits in batches."""
    n = GET_BATCH + 10
    assert unauthenticated(door, gets(*[b"k"] * n)) == NOAUTH * n


def test_a_packet_with_misses(door):
    """``read_packet``: keys through the gate, misses fetched."""
    assert unauthenticated(door, gets(b"k", b"absent", b"k")) == NOAUTH * 3


@pytest.mark.parametrize("packet, replies", [
    (encode(b"PING") + gets(b"k"), 2),
    (b"GET k\r\n", 1),
    (encode(b"get", b"k"), 1),
    (encode(b"MGET", b"k", b"k"), 1),
    (gets(b"k")[:7], 0),
], ids=["mixed", "inline", "lower-case", "mget", "split"])
def test_the_general_dispatch(door, packet, replies):
    out = unauthenticated(door, packet)
    assert out == NOAUTH * replies


def test_a_get_split_across_packets(door):
    proto, transport = door.connect()
    packet = gets(b"k")
    for i in range(len(packet)):
        proto.dataReceived(packet[i:i + 1])
    assert transport.value() == NOAUTH
    assert cache_reads(door) == 1  # the fixture's client's one read


def test_requests_held_while_the_client_does_not_read(door):
    """Parsed while reading is paused, run when it resumes: still checked."""
    proto, transport = door.connect()
    proto.pauseProducing()
    proto.dataReceived(gets(b"k", b"k") + encode(b"MGET", b"k"))
    assert transport.value() == b""
    proto.resumeProducing()
    door.clock.advance(0)
    assert transport.value() == NOAUTH * 3


def test_after_auth_every_road_answers_from_the_cache(door):
    proto, transport = door.connect()
    proto.dataReceived(gets(b"k") + AUTH + gets(b"k"))  # general dispatch, in order
    assert transport.value() == NOAUTH + b"+OK\r\n" + VALUE
    for packet, n in [(gets(b"k"), 1), (gets(b"k", b"k"), 2),
                      (gets(*[b"k"] * (GET_BATCH + 1)), GET_BATCH + 1)]:
        transport.clear()
        proto.dataReceived(packet)
        assert transport.value() == VALUE * n
    assert door.backing.calls == []


def test_reset_closes_the_fast_paths_again(door):
    proto, transport = door.connect()
    proto.dataReceived(AUTH + gets(b"k") + encode(b"RESET"))
    transport.clear()
    proto.dataReceived(gets(b"k"))
    assert transport.value() == NOAUTH


def test_a_read_user_keeps_the_fast_paths():
    from redisp.config import UserConfig

    door, backing = real_door(users=(UserConfig("r", Secret("rpw"), "read"),))
    proto, transport = door.connect()
    proto.dataReceived(encode(b"AUTH", b"r", b"rpw") + gets(b"k"))
    backing.pending.pop().callback(b"value")
    door.clock.advance(0)
    transport.clear()
    proto.dataReceived(gets(b"k"))
    assert transport.value() == VALUE
    assert door.metrics.requests["resp", "hit"] == 1


# -- protected mode -------------------------------------------------------------------


@pytest.mark.parametrize("peer", [
    IPv4Address("TCP", "127.0.0.2", 5000), IPv4Address("TCP", "192.0.2.1", 5000),
])
def test_protected_mode_refuses_a_remote_client_as_redis(peer):
    door, backing = real_door(protected_mode=True)
    proto, transport = door.connect(StringTransport(peerAddress=peer))
    assert transport.value() == DENIED
    assert transport.disconnecting
    proto.dataReceived(gets(b"k"))
    assert transport.value() == DENIED and backing.calls == []
    proto.connectionLost(Failure(ConnectionDone()))
    assert door.metrics.connected_clients == 0


@pytest.mark.parametrize("peer", [PEER, UNIXAddress(b"/run/redisp.sock")])
def test_protected_mode_lets_in_local_clients(peer):
    door, _ = real_door(protected_mode=True)
    proto, transport = door.connect(StringTransport(peerAddress=peer))
    proto.dataReceived(encode(b"PING"))
    assert transport.value() == b"+PONG\r\n"


@pytest.mark.parametrize("settings", [{"protected_mode": False},
                                      {"protected_mode": True, "password": PASSWORD}])
def test_protected_mode_off_or_a_password_lets_remote_clients_in(settings):
    door, _ = real_door(**settings)
    proto, transport = door.connect(RecordingTransport())  # peer 10.0.0.1
    proto.dataReceived(encode(b"PING"))
    assert transport.value() == (NOAUTH if "password" in settings else b"+PONG\r\n")


def test_past_max_clients_the_refusal_comes_first_as_in_redis():
    door, _ = real_door(protected_mode=True, max_clients=1)
    door.connect(StringTransport(peerAddress=PEER))
    _, transport = door.connect(StringTransport(peerAddress=IPv4Address("TCP", "10.0.0.9", 1)))
    assert transport.value() == b"-ERR max number of clients reached\r\n"
