"""Large cached values handed out by reference (``Cache.get_all``) reach the
client byte for byte, through the real RESP door, reader and cache, against a
real redis-server.
"""

from __future__ import annotations

import socket

import pytest
import pytest_twisted

from redisp.core.cache import BY_REFERENCE, COPIED
from tests.support import until
from tests.test_resp import encode
from tests.test_resp_limits import in_thread, read_exactly

inline = pytest_twisted.inlineCallbacks


@pytest.mark.parametrize("form", ["MGET", "pipelined GETs"])
@inline
def test_a_batch_of_large_cached_values_is_answered_exactly(form, redis_db, start_proxy):
    count = COPIED + 4  # past COPIED: values over BY_REFERENCE go uncopied
    keys = [f"big:{i}" for i in range(count)]
    values = {key: bytes([65 + i % 26]) * (BY_REFERENCE + 1 + i) for i, key in enumerate(keys)}
    values[keys[1]] = b"small"
    redis_db.mset(values)
    p = start_proxy()
    yield until(lambda: p.proxy.backing.up)
    other = p.redis_py()
    yield in_thread(other.mget, keys)  # all cached now
    bulks = b"".join(b"$%d\r\n%b\r\n" % (len(values[key]), values[key]) for key in keys)
    if form == "MGET":
        request = encode(b"MGET", *[key.encode() for key in keys])
        expected = b"*%d\r\n" % count + bulks
    else:
        request = b"".join(encode(b"GET", key.encode()) for key in keys)
        expected = bulks
    client = socket.create_connection(("127.0.0.1", p.resp_port))
    try:
        hits = p.proxy.metrics.cache_hits
        client.sendall(request * 2)
        answer = yield in_thread(read_exactly, client, 2 * len(expected))
        assert answer == expected * 2
        assert p.proxy.metrics.cache_hits == hits + 2 * count
    finally:
        client.close()
