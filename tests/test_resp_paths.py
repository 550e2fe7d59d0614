"""One grammar, parsed the same everywhere (issue 8, item 16).

``reference`` below is the grammar written the plain way: Redis 7's
processInputBuffer / processMultibulkBuffer / processInlineBuffer over the
whole stream at once, with C's ``strchr`` (it stops at NUL) and
``string2ll`` spelled out, plus redisp's rules for the limits.  Every path
of ``RequestParser`` -- the split fast path, the offset parser, the wait
states of a stream cut anywhere, and ``only_gets`` -- must give exactly what
it gives, on random bytes, on mutated valid requests, in every chunking,
with small limits (a 4-byte inline limit, 1..3-byte bulks) as with the
defaults.
"""

from __future__ import annotations

import re

from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from redisp.protocol.codec import ProtocolError, RequestParser, _sdssplitargs

DEFAULTS = {"max_bulk_bytes": 512 * 1024 * 1024, "max_args": 1024 * 1024,
            "max_inline_bytes": 64 * 1024}

_STRING2LL = re.compile(rb"0|-?[1-9][0-9]*")


def string2ll(text: bytes) -> int | None:
    """Redis's string2ll: canonical decimal within a signed 64-bit integer."""
    if _STRING2LL.fullmatch(text) is None:
        return None
    value = int(text)
    return value if -(2**63) <= value < 2**63 else None


def strchr(data: bytes, char: bytes, start: int) -> int:
    """C's strchr on the query buffer: -1 when a NUL comes first."""
    found = data.find(char, start)
    nul = data.find(b"\0", start)
    if nul >= 0 and (found < 0 or nul < found):
        return -1
    return found


def reference(data: bytes, max_bulk_bytes: int, max_args: int, max_inline_bytes: int) -> list:
    """What ``data`` means once all of it has arrived: the requests, then
    ("error", text) if it holds a protocol error."""
    out: list = []
    pos, n = 0, len(data)
    limit = max_inline_bytes

    def line(char: bytes, too_big: str, inline: bool = False):
        """The end of the line at ``pos``, "wait", or an error."""
        end = strchr(data, char, pos)
        if end < 0:
            size = n - pos
            if inline and data.endswith(b"\r") and b"\0" not in data[pos:]:
                size -= 1  # no NUL on the way: the \r may be the start of \r\n
            return ("error", too_big) if size > limit else "wait"
        if char == b"\r" and end + 1 >= n:  # the byte after \r, skipped unseen
            return ("error", too_big) if end - pos > limit else "wait"
        return end

    while pos < n:
        if data[pos] == ord("*"):
            cr = line(b"\r", "Protocol error: too big mbulk count string")
            if not isinstance(cr, int):
                return out if cr == "wait" else [*out, cr]
            if cr - pos > limit:
                return [*out, ("error", "Protocol error: too big mbulk count string")]
            count = string2ll(data[pos + 1:cr])
            if count is None or count > max_args:
                return [*out, ("error", "Protocol error: invalid multibulk length")]
            pos = cr + 2
            args = []
            for _ in range(count):
                if pos >= n:
                    return out
                cr = line(b"\r", "Protocol error: too big bulk count string")
                if not isinstance(cr, int):
                    return out if cr == "wait" else [*out, cr]
                if cr - pos > limit:
                    return [*out, ("error", "Protocol error: too big bulk count string")]
                if data[pos] != ord("$"):
                    shown = " " if data[pos] in b"\r\n" else chr(data[pos])
                    return [*out, ("error", f"Protocol error: expected '$', got '{shown}'")]
                size = string2ll(data[pos + 1:cr])
                if size is None or size < 0 or size > max_bulk_bytes:
                    return [*out, ("error", "Protocol error: invalid bulk length")]
                pos = cr + 2
                if n - pos < size + 2:
                    return out
                args.append(data[pos:pos + size])
                pos += size + 2
            if args:
                out.append(args)
        else:
            newline = line(b"\n", "Protocol error: too big inline request", inline=True)
            if not isinstance(newline, int):
                return out if newline == "wait" else [*out, newline]
            end = newline - 1 if newline > pos and data[newline - 1] == ord("\r") else newline
            if end - pos > limit:
                return [*out, ("error", "Protocol error: too big inline request")]
            argv = _sdssplitargs(data[pos:end])
            if argv is None:
                return [*out, ("error", "Protocol error: unbalanced quotes in request")]
            pos = newline + 1
            if argv:
                if len(argv) > max_args or max(map(len, argv)) > max_bulk_bytes:
                    return [*out, ("error", "Protocol error: too big inline request")]
                out.append(argv)
    return out


def fed(data: bytes, cuts: list[int], limits: dict) -> list:
    """``data`` through one parser, cut at ``cuts``; errors as ("error", text)."""
    parser = RequestParser(**limits)
    out: list = []
    points = [0, *sorted({c for c in cuts if 0 < c < len(data)}), len(data)]
    for a, b in zip(points, points[1:], strict=False):
        out += parser.feed(data[a:b])
    return [("error", str(r)) if isinstance(r, ProtocolError) else r for r in out]


# -- inputs ------------------------------------------------------------------------

def multibulk(*args: bytes) -> bytes:
    return b"*%d\r\n" % len(args) + b"".join(b"$%d\r\n%b\r\n" % (len(a), a) for a in args)


words = st.sampled_from([b"GET", b"get", b"PING", b"ECHO", b"MGET", b"k", b"", b"a b",
                         b"\r\n", b"x" * 40, b"\0", b"'", b'"', b"$3", b"*1"])
requests = st.one_of(
    st.lists(words, min_size=1, max_size=4).map(lambda a: multibulk(*a)),
    st.builds(lambda k: multibulk(b"GET", k), st.binary(max_size=12)),
    st.lists(st.sampled_from([b"GET", b"k", b'"a b"', b"'x'", b'"\\x41"', b"\t"]),
             max_size=4).map(lambda a: b" ".join(a) + b"\r\n"),
    st.sampled_from([b"*0\r\n", b"*-1\r\n", b"\r\n", b"\n", b"PING\n"]),
)
interesting = b"*$\r\n\0 \t\"'\\x0123456789-GETPINGab\xff"
fragments = st.one_of(
    st.binary(max_size=6),
    st.lists(st.sampled_from(list(interesting)), max_size=8).map(bytes),
)


@st.composite
def streams(draw) -> bytes:
    """Valid requests with a few mutations (insert, delete, replace, cut)."""
    data = bytearray(b"".join(draw(st.lists(requests, max_size=6))))
    for _ in range(draw(st.integers(0, 3))):
        at = draw(st.integers(0, len(data)))
        kind = draw(st.sampled_from(["insert", "delete", "replace", "truncate"]))
        if kind == "insert":
            data[at:at] = draw(fragments)
        elif kind == "delete":
            del data[at:at + draw(st.integers(1, 3))]
        elif kind == "replace" and at < len(data):
            data[at] = draw(st.sampled_from(list(interesting)))
        elif kind == "truncate":
            del data[at:]
    return bytes(data)


inputs = st.one_of(streams(), st.binary(max_size=60),
                   st.lists(st.sampled_from(list(interesting)), max_size=40).map(bytes))
limits = st.fixed_dictionaries({
    "max_bulk_bytes": st.sampled_from([1, 2, 3, 4, 40, DEFAULTS["max_bulk_bytes"]]),
    "max_args": st.sampled_from([1, 2, 3, 5, DEFAULTS["max_args"]]),
    "max_inline_bytes": st.sampled_from([1, 2, 3, 4, 5, 12, DEFAULTS["max_inline_bytes"]]),
})
cut_lists = st.lists(st.integers(0, 200), max_size=10)


# -- properties ---------------------------------------------------------------------

@settings(max_examples=600, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(inputs, limits, cut_lists)
@example(b"*2\r\n$4\r\nECHO\r\n$1\r\nab\r\nPING\r\n", DEFAULTS, [])  # issue 8, item 16
@example(b"*2\r\n$3\r\nGET\r\n$1\r\nk\r\n", {**DEFAULTS, "max_inline_bytes": 4}, [])
@example(b"*2\r\n$3\r\nGET\r\n$1\r\nk\r\n", {**DEFAULTS, "max_bulk_bytes": 2}, [])
def test_every_chunking_parses_as_the_reference(data, limits, cuts):
    """Whole, a byte at a time, and cut anywhere: the reference's result."""
    expected = reference(data, **limits)
    assert fed(data, [], limits) == expected
    assert fed(data, list(range(len(data))), limits) == expected
    assert fed(data, cuts, limits) == expected


@st.composite
def get_packets(draw) -> bytes:
    """Packets of GETs as clients pipeline them, sometimes slightly wrong."""
    keys = draw(st.lists(st.one_of(st.binary(max_size=8), st.just(b"x" * 1023),
                                   st.just(b"y" * 1024)), min_size=1, max_size=8))
    data = bytearray(b"".join(multibulk(draw(st.sampled_from([b"GET", b"get", b"Get"])), k)
                              for k in keys))
    if draw(st.booleans()):
        at = draw(st.integers(0, len(data)))
        data[at:at + draw(st.integers(0, 2))] = draw(fragments)
    return bytes(data)


@settings(max_examples=600, deadline=None)
@given(st.one_of(get_packets(), inputs), limits)
@example(b"*2\r\n$3\r\nGET\r\n$1\r\nk\r\n", {**DEFAULTS, "max_bulk_bytes": 2})
@example(b"*2\r\n$3\r\nGET\r\n$3\r\nkey\r\n", {**DEFAULTS, "max_inline_bytes": 1})
@example(b"*2\r\n$3\r\nGET\r\n$1\r\nk\r\n", {**DEFAULTS, "max_args": 1})
def test_only_gets_takes_exactly_what_the_grammar_gives(data, limits):
    """When the fast path takes a packet, the grammar reads the same GETs
    from it, whole, with nothing left pending (when it declines, feed() is
    used, proven above)."""
    keys = RequestParser(**limits).only_gets(data)
    if keys is None:
        return
    expected = reference(data, **limits)
    assert all(isinstance(r, list) and len(r) == 2 and r[0] in (b"GET", b"get")
               for r in expected), expected
    assert [r[1] for r in expected] == keys
    parser = RequestParser(**limits)
    parser.feed(data)
    assert parser.idle  # nothing of the packet was left unparsed


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.sampled_from([b"GET", b"get"]),
                          st.binary(max_size=1023).filter(lambda k: b"\r\n" not in k)),
                min_size=1, max_size=20))
def test_only_gets_takes_every_plain_packet_of_gets(requests):
    """What redis-benchmark and clients pipeline (keys without CRLF) is taken
    by the fast path."""
    data = b"".join(multibulk(*r) for r in requests)
    assert RequestParser(**DEFAULTS).only_gets(data) == [k for _, k in requests]
