"""Large replies: encoded a chunk at a time, byte for byte the reply built whole."""

import pytest
from hypothesis import given
from hypothesis import strategies as st

from redisp.commands.replies import (
    CHUNK,
    LARGE,
    Chunked,
    bulk_reply,
    get_replies,
    join_replies,
    values_array,
)
from redisp.protocol.codec import RESP2, RESP3, array, bulk


def drain(reply, limit=CHUNK):
    """Every chunk of a Chunked (or the bytes themselves)."""
    if isinstance(reply, bytes):
        return [reply]
    chunks = []
    while reply.left:
        before = reply.left
        chunk = reply.take(limit)
        assert 0 < len(chunk) <= limit
        assert reply.left == before - len(chunk) == len(reply)
        chunks.append(chunk)
    return chunks


@given(st.lists(st.binary(max_size=40), min_size=1, max_size=12), st.integers(1, 50))
def test_chunks_join_to_the_parts(parts, limit):
    reply = Chunked(list(parts))
    assert len(reply) == sum(map(len, parts))
    assert b"".join(drain(reply, limit)) == b"".join(parts)


def test_parts_sent_are_released():
    """A value fetched for this reply alone is freed once it has been sent."""
    value = b"v" * 100
    reply = Chunked([b"$100\r\n", value, b"\r\n", b"+OK\r\n"])
    reply.take(50)
    assert reply._parts[0] == b"" and reply._parts[1] is value, "value half sent: kept"
    reply.take(60)
    assert reply._parts[1] == b"", "value sent: released"


@pytest.mark.parametrize("values", [[b"v"], [b"a", b"bc" * 10, b""], [b"a\r\nb", b"y" * 1023]])
def test_small_values_make_one_bytes_the_bulk_of_each(values):
    assert get_replies(values) == b"".join(map(bulk, values))


@pytest.mark.parametrize("count,size", [(300, 100), (10, 5000), (3, LARGE)])
def test_larger_packets_stay_bytes_under_large(count, size):
    values = [bytes([65 + i % 26]) * size for i in range(count)]
    reply = get_replies(values)
    expected = b"".join(map(bulk, values))
    assert b"".join(drain(reply)) == expected
    assert isinstance(reply, bytes) == (len(expected) <= LARGE + 16 * count)


def test_a_packet_past_large_is_chunked_by_reference():
    value = b"x" * 4096
    reply = get_replies([value] * 3000)
    assert isinstance(reply, Chunked)
    assert reply._parts[1] is value, "not copied"
    assert reply._parts[0] is reply._parts[3], "one header object for all values of a size"
    assert b"".join(drain(reply)) == bulk(value) * 3000


def test_bulk_reply():
    assert bulk_reply(b"abc") == b"$3\r\nabc\r\n"
    value = b"y" * (LARGE + 1)
    reply = bulk_reply(value)
    assert isinstance(reply, Chunked)
    assert b"".join(drain(reply)) == bulk(value)


@pytest.mark.parametrize("encoder", [RESP2, RESP3], ids=["RESP2", "RESP3"])
@pytest.mark.parametrize("size", [10, 100_000])
def test_values_array_as_mget_answers(encoder, size):
    values = [b"a" * size, None, b"b" * size, None, b"c" * size]
    expected = array([encoder.null if v is None else bulk(v) for v in values])
    reply = values_array(values, encoder.null)
    assert isinstance(reply, Chunked) == (size > 50_000)
    assert b"".join(drain(reply)) == expected


def test_join_replies_flattens_chunked_ones():
    big = b"z" * (LARGE + 10)
    half_sent = bulk_reply(big)
    first = half_sent.take(7)
    replies = [b"+OK\r\n", half_sent, b"$-1\r\n"]
    joined = join_replies(replies)
    assert isinstance(joined, Chunked)
    assert b"".join(drain(joined, 1000)) == b"+OK\r\n" + bulk(big)[len(first):] + b"$-1\r\n"
    assert join_replies([b"+OK\r\n", b":1\r\n"]) == b"+OK\r\n:1\r\n"
    many = join_replies([b"x" * 1000] * 300)
    assert isinstance(many, Chunked) and b"".join(drain(many)) == b"x" * 300_000
