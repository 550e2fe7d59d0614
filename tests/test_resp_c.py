"""redisp.protocol._resp, the compiled fast parsers and reply writer, against their
Python references.

``only_gets`` and ``parse_split`` in redisp/protocol/codec.py are the reference; the C
versions replace them when built and must answer exactly the same on every
input (random bytes, mutated valid requests, packets of GETs), under any
limits (small ones especially), and a ``RequestParser`` must give the same
requests with either, on every chunking of a stream.  Then what C adds on
its own: no reference leaked or lost, on the paths that succeed as on those
that give up halfway through a request, and exact ``bytes`` only.
``bulks`` (the small case of ``replies.get_replies``) is held to
``b"".join(map(bulk, values))`` the same way.
"""

from __future__ import annotations

import re
import sys
import tracemalloc
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

import redisp.commands.replies as replies
import redisp.protocol.codec as resp
from redisp.commands.replies import LARGE, Chunked
from redisp.protocol.codec import ProtocolError, RequestParser, bulk
from tests.compiled import EXTENSIONS, compiled, required
from tests.test_resp_paths import (
    DEFAULTS,
    cut_lists,
    get_packets,
    inputs,
    limits,
    multibulk,
)

_resp = compiled("protocol._resp")

#: limits around every edge the fast paths test: nothing, one, the
#: tables' sizes (9999 counts, 1024 headers), and the defaults
counts = st.sampled_from([-1, 0, 1, 2, 3, 5, 9999, 10000, 2**20, 2**63 - 1, 2**70])
sizes = st.sampled_from([-1, 0, 1, 2, 3, 4, 9, 10, 40, 1023, 1024, 1025, 2**29, 2**63 - 1])
#: (at most 1024: the reference reads headers from a table of that size, and
#: RequestParser never passes more)
gets_known = st.sampled_from([-1, 0, 1, 2, 3, 4, 9, 10, 11, 1023, 1024])


@st.composite
def packets(draw) -> bytes:
    """Whole requests as clients pipeline them (GETs, SETs, long values,
    counts past 9999 in the header), some slightly wrong."""
    parts = []
    for _ in range(draw(st.integers(1, 6))):
        kind = draw(st.sampled_from(["get", "set", "long", "many"]))
        if kind == "get":
            parts.append(multibulk(draw(st.sampled_from([b"GET", b"get"])),
                                   draw(st.binary(max_size=12))))
        elif kind == "set":
            key, value = draw(st.binary(max_size=5)), draw(st.binary(max_size=5))
            parts.append(multibulk(b"SET", key, value))
        elif kind == "long":
            size = draw(st.sampled_from([9, 10, 1023, 1024, 2000]))
            parts.append(multibulk(b"SET", b"k", b"v" * size))
        else:
            count = draw(st.sampled_from([9999, 10000, 12345]))
            parts.append(b"*%d\r\n" % count + multibulk(b"x")[4:])
    data = bytearray(b"".join(parts))
    if draw(st.booleans()):
        at = draw(st.integers(0, len(data)))
        data[at:at + draw(st.integers(0, 3))] = draw(st.binary(max_size=4))
    return bytes(data)


anything = st.one_of(inputs, get_packets(), packets())


@settings(max_examples=1500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(anything, gets_known)
@example(b"*2\r\n$3\r\nGET\r\n$2\r\na\r\r\n", 1024)  # a key ending in \r
@example(b"*2\r\n$3\r\nGET\r\n$1\r\na\r\n*2\r\n$3\r\nget\r\n$0\r\n\r\n", 1024)
@example(b"*2\r\n$3\r\nGET\r\n$10\r\n0123456789\r\n", 10)
@example(b"*2\r\n$3\r\nGET\r\n$\r\n\r\n", 1024)
@example(b"*2\r\n$3\r\nGET\r\n$01\r\na\r\n", 1024)
def test_only_gets_answers_as_the_reference(data, known):
    assert _resp.only_gets(data, known) == resp.only_gets(data, known)


@settings(max_examples=1500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(anything, counts, sizes)
@example(b"*1\r\n$2\r\na\r\r\n*1\r\n", 5, 10)
@example(b"*10000\r\n$1\r\nx\r\n", 2**20, 10)
@example(b"*2\r\n$3\r\nSET\r\n$1\r\na\r\n", 1, 10)
@example(b"*1\r\n$00\r\n\r\n", 5, 10)
@example(b"*1\r\n$-1\r\n", 5, 10)
@example(b"*01\r\n$1\r\na\r\n", 5, 10)
def test_parse_split_answers_as_the_reference(data, max_count, max_size):
    ours = _resp.parse_split(data, max_count, max_size)
    assert ours == resp.parse_split(data, max_count, max_size)
    assert type(ours[1]) is int


@contextmanager
def python_parsers() -> Iterator[None]:
    """RequestParser on the references (what it runs where C was not built)."""
    saved = resp._only_gets, resp._parse_split
    resp._only_gets, resp._parse_split = resp.only_gets, resp.parse_split
    try:
        yield
    finally:
        resp._only_gets, resp._parse_split = saved


def through(data: bytes, cuts: list[int], limits: dict) -> list:
    """Every answer a parser gives on ``data`` cut at ``cuts``, as the RESP
    door asks: ``only_gets`` and ``whole`` while idle, then ``feed``."""
    parser = RequestParser(**limits)
    seen: list = []
    points = [0, *sorted({c for c in cuts if 0 < c < len(data)}), len(data)]
    for a, b in zip(points, points[1:], strict=False):
        chunk = data[a:b]
        if parser.idle:
            seen.append(("gets", parser.only_gets(chunk)))
            seen.append(("whole", parser.whole(chunk)))
        seen.append([("error", str(r)) if isinstance(r, ProtocolError) else r
                     for r in parser.feed(chunk)])
    return seen


@settings(max_examples=500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(anything, limits, cut_lists)
@example(b"*2\r\n$3\r\nGET\r\n$1\r\nk\r\n", {**DEFAULTS, "max_inline_bytes": 2}, [])
def test_a_parser_answers_the_same_with_either_in_every_chunking(data, limits, cuts):
    if resp._only_gets is resp.only_gets:
        pytest.skip("the parser runs on the references already")
    byte_by_byte = list(range(len(data)))
    ours = [through(data, c, limits) for c in ([], byte_by_byte, cuts)]
    with python_parsers():
        assert [through(data, c, limits) for c in ([], byte_by_byte, cuts)] == ours


def test_the_parser_uses_the_compiled_versions_when_built():
    assert resp._only_gets is _resp.only_gets
    assert resp._parse_split is _resp.parse_split


def test_the_switch_covers_every_extension_setup_py_builds():
    """One switch for all of them: each extension setup.py builds is in
    tests.compiled's list, and importable wherever the switch is set."""
    setup = (Path(__file__).resolve().parent.parent / "setup.py").read_text()
    assert set(re.findall(r'Extension\("redisp\.([\w.]+)"', setup)) == set(EXTENSIONS)
    if required():
        for name in EXTENSIONS:
            compiled(name)


# -- what C adds: references and types --------------------------------------------

#: inputs that take every path: whole requests, and requests given up after
#: some arguments were made (a bad header, a short value, a CRLF in a value)
CASES = [
    multibulk(b"GET", b"key") * 16,
    multibulk(b"GET", b"key") * 3 + b"*2\r\n$3\r\nGET\r\n$3\r\nke",
    multibulk(b"SET", b"k", b"v" * 2000) * 2,
    multibulk(b"SET", b"k", b"v") + b"*3\r\n$3\r\nSET\r\n$1\r\nk\r\n$2\r\nv\r\n",
    b"*3\r\n$3\r\nSET\r\n$1\r\nk\r\n$01\r\nv\r\n",
    b"*2\r\n$3\r\nSET\r\n$3\r\na\r\n\r\n",
    b"PING\r\n",
    b"",
]


def call_everything() -> None:
    for data in CASES:
        _resp.only_gets(data, 1024)
        _resp.only_gets(data, 2)
        _resp.parse_split(data, 1024, 512)
        _resp.parse_split(data, 2, 1)


def held_once(items: list) -> bool:
    """Every item of ``items`` is held by the list alone (+1: getrefcount's
    argument), but for CPython's shared 0- and 1-byte objects."""
    return all(sys.getrefcount(items[i]) == 2 for i in range(len(items))
               if not (type(items[i]) is bytes and len(items[i]) <= 1))


def test_no_reference_is_leaked_or_lost():
    for data in CASES:
        before = sys.getrefcount(data)
        keys = _resp.only_gets(data, 1024)
        out, _ = _resp.parse_split(data, 1024, 1 << 20)
        assert sys.getrefcount(data) == before
        # each object made is held by its list alone (+1: the call's argument),
        # but for CPython's shared 0- and 1-byte objects
        assert held_once(keys or [])
        assert held_once(out)
        assert all(held_once(out[i]) for i in range(len(out)))
    call_everything()  # warm: caches and free lists filled
    tracemalloc.start()
    try:
        for _ in range(3):
            call_everything()
        base = tracemalloc.get_traced_memory()[0]
        for _ in range(2000):
            call_everything()
        grown = tracemalloc.get_traced_memory()[0] - base
    finally:
        tracemalloc.stop()
    assert grown < 4096, grown  # a leak here would be 10^4 objects or more


@pytest.mark.parametrize("data", [bytearray(b"*1\r\n$1\r\na\r\n"), memoryview(b"*1\r\n"),
                                  "*1\r\n", None])
def test_only_exact_bytes_are_read(data):
    with pytest.raises(TypeError):
        _resp.only_gets(data, 1024)
    with pytest.raises(TypeError):
        _resp.parse_split(data, 1024, 1024)


def test_limits_must_be_integers_and_calls_their_arity():
    with pytest.raises(TypeError):
        _resp.only_gets(b"", 1.5)
    with pytest.raises(TypeError):
        _resp.parse_split(b"", 10, "10")
    with pytest.raises(TypeError):
        _resp.only_gets(b"")
    with pytest.raises(TypeError):
        _resp.parse_split(b"", 10)


# -- bulks: the replies of pipelined GETs -------------------------------------------

class Bytes(bytes):
    pass


values = st.lists(st.one_of(
    st.binary(max_size=12),
    st.sampled_from([9, 10, 99, 100, 1023, 1024, 5000, 70_000]).map(lambda n: b"v" * n),
    st.binary(max_size=4).map(memoryview),
    st.binary(max_size=4).map(Bytes),
), max_size=40)
budgets = st.sampled_from([-1, 0, 15, 16, 17, 100, 1000, LARGE, 2**63 - 1, 2**70])


@settings(max_examples=800, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(values, budgets)
@example([], 0)
@example([b""], 16)
@example([b"x"], 16)
def test_bulks_writes_what_bulk_joins_or_declines(values, limit):
    size = sum(map(len, values)) + 16 * len(values)
    fits = all(type(v) is bytes for v in values) and size <= limit
    expected = b"".join(map(bulk, values)) if fits else None
    assert _resp.bulks(values, limit) == expected
    assert _resp.bulks(tuple(values), limit) is None  # a list only


def whole(reply) -> bytes:
    return reply.take(len(reply)) if isinstance(reply, Chunked) else reply


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.one_of(
    st.sampled_from([0, 1, 99, 100, 1023, 1024, 4000, 300_000]).map(lambda n: b"v" * n),
    st.binary(max_size=8),
    st.sampled_from([b"m" * 10, b"m" * 300_000]).map(memoryview),
), min_size=1, max_size=300))
def test_get_replies_is_the_same_with_or_without_it(values):
    ours = replies.get_replies(values)
    saved, replies._bulks = replies._bulks, None
    try:
        theirs = replies.get_replies(values)
    finally:
        replies._bulks = saved
    assert type(ours) is type(theirs)
    assert whole(ours) == whole(theirs)


def test_get_replies_uses_it_when_built():
    assert replies._bulks is _resp.bulks


def test_bulks_takes_no_reference_and_leaks_nothing():
    value = b"x" * 100
    before = sys.getrefcount(value)
    reply = _resp.bulks([value, value], LARGE)
    assert sys.getrefcount(value) == before
    assert sys.getrefcount(reply) == 2
    cases = [[value] * 16, [value, "str"], [b""], [], [b"y" * 5000] * 60]
    tracemalloc.start()
    try:
        for case in cases * 3:
            _resp.bulks(case, LARGE)
        base = tracemalloc.get_traced_memory()[0]
        for _ in range(2000):
            for case in cases:
                _resp.bulks(case, LARGE)
        grown = tracemalloc.get_traced_memory()[0] - base
    finally:
        tracemalloc.stop()
    assert grown < 4096, grown
    with pytest.raises(TypeError):
        _resp.bulks([value], "10")
    with pytest.raises(TypeError):
        _resp.bulks([value])
