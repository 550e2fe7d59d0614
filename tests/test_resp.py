"""The sans-IO RESP parser and the reply encoders.

Every byte stream is fed in every chunking (1..9 bytes at a time, and all at
once) and must parse the same way: a client may cut its requests anywhere.
"""

from __future__ import annotations

import hiredis
import pytest
from hypothesis import given
from hypothesis import strategies as st

from redisp.protocol.codec import (
    OK,
    PONG,
    RESP2,
    RESP3,
    ProtocolError,
    RequestParser,
    array,
    bulk,
    encoder_for,
    error,
    integer,
    parse_integer,
    simple,
    split_inline,
)

LIMITS = {
    "max_bulk_bytes": 512 * 1024 * 1024, "max_args": 1024 * 1024, "max_inline_bytes": 64 * 1024,
}


def encode(*args: bytes) -> bytes:
    """A request as clients send it: a multibulk of bulk strings."""
    return b"*%d\r\n" % len(args) + b"".join(b"$%d\r\n%b\r\n" % (len(a), a) for a in args)


def feed_in_chunks(data: bytes, size: int, **limits: int) -> list:
    """Feed ``data`` ``size`` bytes at a time; errors become ("error", text)."""
    parser = RequestParser(**{**LIMITS, **limits})
    out: list = []
    for start in range(0, len(data), size):
        out += parser.feed(data[start:start + size])
    return [("error", str(r)) if isinstance(r, ProtocolError) else r for r in out]


def parse(data: bytes, **limits: int) -> list:
    """What ``data`` parses to, checked to be the same in every chunking."""
    whole = feed_in_chunks(data, max(len(data), 1), **limits)
    for size in range(1, 10):
        assert feed_in_chunks(data, size, **limits) == whole, f"chunk size {size}"
    return whole


# -- well-formed input --------------------------------------------------------


def test_multibulk_request():
    assert parse(encode(b"GET", b"foo")) == [[b"GET", b"foo"]]


def test_pipelined_multibulk_requests():
    data = encode(b"GET", b"a") + encode(b"MGET", b"b", b"c") + encode(b"PING")
    assert parse(data) == [[b"GET", b"a"], [b"MGET", b"b", b"c"], [b"PING"]]


def test_binary_arguments_are_kept_byte_for_byte():
    """Values may hold CRLF, NUL, '$', '*' and every other byte."""
    every_byte = bytes(range(256))
    data = encode(b"ECHO", every_byte, b"\r\n", b"$3\r\n*1\r\n", b"")
    assert parse(data) == [[b"ECHO", every_byte, b"\r\n", b"$3\r\n*1\r\n", b""]]


def test_large_argument():
    """Arguments past the fast path's header table parse the same way."""
    value = bytes(range(256)) * 20
    assert parse(encode(b"ECHO", value) + encode(b"PING")) == [[b"ECHO", value], [b"PING"]]


def test_arguments_of_every_count():
    data = b"".join(encode(*[b"x%d" % i for i in range(n)]) for n in range(1, 20))
    assert parse(data) == [[b"x%d" % i for i in range(n)] for n in range(1, 20)]


def test_empty_and_null_multibulk_are_skipped():
    """Redis ignores ``*0`` and ``*-1`` (and any count below one)."""
    assert parse(b"*0\r\n*-1\r\n*-7\r\n" + encode(b"PING")) == [[b"PING"]]


@pytest.mark.parametrize("frame", [
    encode(b"GET", b"foo"), encode(b"ECHO", b"a\r\nb", b"x" * 1500), b"GET foo\r\n",
])
def test_truncated_frames_wait_without_error(frame):
    """Every strict prefix of a request is just incomplete: no request, no error."""
    for end in range(len(frame)):
        assert parse(frame[:end]) == [], end


def test_bulk_length_at_the_limit_is_accepted():
    assert parse(encode(b"ECHO", b"x" * 16), max_bulk_bytes=16) == [[b"ECHO", b"x" * 16]]


def test_argument_count_at_the_limit_is_accepted():
    assert parse(encode(*[b"a"] * 8), max_args=8) == [[b"a"] * 8]


# -- inline requests -----------------------------------------------------------


def test_inline_request():
    assert parse(b"GET foo\r\n") == [[b"GET", b"foo"]]


def test_inline_request_ended_by_newline_only():
    assert parse(b"GET foo\nPING\n") == [[b"GET", b"foo"], [b"PING"]]


def test_inline_blanks_between_arguments():
    assert parse(b"  GET\t foo  \r\n") == [[b"GET", b"foo"]]


def test_empty_inline_lines_are_skipped():
    """Blank lines (telnet users hit enter) are no request, as in Redis."""
    assert parse(b"\r\n\n  \r\n\t\nPING\r\n") == [[b"PING"]]


def test_inline_quotes_and_escapes():
    """Double quotes take C escapes and \\xHH, single quotes only \\'."""
    data = b"ECHO \"a b\\n\\x41\\\"\" 'it\\'s \\n' \"\"\r\n"
    assert parse(data) == [[b"ECHO", b"a b\nA\"", b"it's \\n", b""]]


def test_inline_quotes_inside_an_argument():
    """A quote opens inside an unquoted argument, as sdssplitargs does."""
    assert parse(b'SET k"ey" v\r\n') == [[b"SET", b"key", b"v"]]


def test_inline_nul_hides_the_end_of_the_line():
    """Redis looks for the newline with strchr, which stops at a NUL: the
    line never ends, whatever follows, until it passes the inline limit."""
    assert parse(b"PING\r\nPING\0junk\r\nPING\r\n") == [[b"PING"]]
    assert parse(b"PING\0" + b"\r\n" * 5 + b"x", max_inline_bytes=16) == []  # 16 bytes
    assert parse(b"PING\0" + b"\r\n" * 6, max_inline_bytes=16) == [
        ("error", "Protocol error: too big inline request"),
    ]


def test_nul_in_a_header_hides_its_end():
    """The same for ``*`` and ``$`` lines: Redis never finds their \\r."""
    assert parse(b"*1\0\r\n$4\r\nPING\r\n", max_inline_bytes=16) == []
    assert parse(b"*1\0\r\n$4\r\nPING\r\nxx", max_inline_bytes=16) == [
        ("error", "Protocol error: too big mbulk count string"),
    ]
    assert parse(b"*1\r\n$4\0\r\nPING\r\n", max_inline_bytes=12) == []
    assert parse(b"*1\r\n$4\0\r\nPING\r\n\r\n", max_inline_bytes=12) == [
        ("error", "Protocol error: too big bulk count string"),
    ]
    assert parse(b"*1\r\nx\0\r\n") == []  # not "expected '$'": no line yet


def test_nul_inside_values_is_just_a_byte():
    assert parse(encode(b"ECHO", b"\0") + b"*1\r\n$1\r\n\0\r\n") == [[b"ECHO", b"\0"], [b"\0"]]


def test_inline_vertical_tab_is_part_of_an_argument():
    """\\v and \\f separate arguments only where C's isspace() skips blanks."""
    assert parse(b"\x0bECHO a\x0cb\r\n") == [[b"ECHO", b"a\x0cb"]]


def test_pipelined_mix_of_multibulk_and_inline():
    data = encode(b"GET", b"a") + b"PING\r\n" + encode(b"ECHO", b"x\r\ny") + b"GET b\n"
    assert parse(data) == [[b"GET", b"a"], [b"PING"], [b"ECHO", b"x\r\ny"], [b"GET", b"b"]]


def test_inline_line_at_the_limit_is_accepted():
    """The limit counts the line without its CRLF, however it arrives."""
    line = b"x" * 32
    assert parse(line + b"\r\n", max_inline_bytes=32) == [[line]]
    assert parse(line + b"\n", max_inline_bytes=32) == [[line]]


@pytest.mark.parametrize("line, expected", [
    (b"a b", [b"a", b"b"]),
    (b"", []),
    (b'"a"', [b"a"]),
    (b'"\\x4g"', [b"x4g"]),
    (b"'\\x41'", [b"\\x41"]),
    (b'"\\', None),
    (b'"a" "b"', [b"a", b"b"]),
    (b'"a"b', None),
    (b"'a'b", None),
    (b"'a", None),
    (b'"a', None),
])
def test_split_inline_like_sdssplitargs(line, expected):
    assert split_inline(line) == expected


# -- malformed and oversized input ------------------------------------------------


def test_non_numeric_multibulk_length():
    """``*x`` is refused with Redis's wording, after the requests before it."""
    assert parse(encode(b"PING") + b"*x\r\n") == [
        [b"PING"], ("error", "Protocol error: invalid multibulk length"),
    ]


@pytest.mark.parametrize("header", [b"*01", b"*+1", b"* 1", b"*1 ", b"*-0", b"*", b"*1x"])
def test_multibulk_length_must_be_a_canonical_integer(header):
    """Only what Redis's string2ll takes: no sign, blank or leading zero."""
    assert parse(header + b"\r\n") == [("error", "Protocol error: invalid multibulk length")]


def test_huge_multibulk_length():
    assert parse(b"*99999999999999999999999\r\n") == [
        ("error", "Protocol error: invalid multibulk length"),
    ]


def test_multibulk_count_over_max_args_is_refused_at_the_header():
    """The count is checked as soon as its line is complete, before any argument."""
    assert parse(b"*9\r\n", max_args=8) == [("error", "Protocol error: invalid multibulk length")]


def test_negative_bulk_length():
    """``$-1`` is a null in replies but never a valid request argument."""
    assert parse(b"*1\r\n$-1\r\n") == [("error", "Protocol error: invalid bulk length")]


@pytest.mark.parametrize("header", [b"$x", b"$01", b"$+1", b"$ 1", b"$", b"$99999999999999999999"])
def test_bad_bulk_length(header):
    assert parse(b"*1\r\n" + header + b"\r\n") == [("error", "Protocol error: invalid bulk length")]


def test_bulk_over_max_bulk_bytes_is_refused_before_its_body():
    """The header alone is enough: not one byte of the body is waited for."""
    assert parse(b"*2\r\n$3\r\nSET\r\n$17\r\n", max_bulk_bytes=16) == [
        ("error", "Protocol error: invalid bulk length"),
    ]


def test_bulk_over_max_bulk_bytes_with_its_body():
    assert parse(encode(b"SET", b"x" * 17), max_bulk_bytes=16) == [
        ("error", "Protocol error: invalid bulk length"),
    ]


def test_expected_dollar():
    assert parse(b"*1\r\nx\r\n") == [("error", "Protocol error: expected '$', got 'x'")]


def test_expected_dollar_shows_line_breaks_as_blanks():
    """The reply must stay one line; Redis blanks \\r and \\n the same way."""
    assert parse(b"*1\r\n\r\n") == [("error", "Protocol error: expected '$', got ' '")]


def test_two_bytes_after_a_bulk_are_skipped_unseen():
    """As Redis: whatever follows a bulk string's bytes is skipped, two bytes
    of it (the issue's example: Redis answers ``$1 a`` then ``+PONG``)."""
    assert parse(b"*2\r\n$4\r\nECHO\r\n$1\r\nab\r\nPING\r\n") == [
        [b"ECHO", b"a"], [b"PING"],
    ]
    assert parse(b"*1\r\n$4\r\nPINGxx*1\r\n$4\r\nPING\r\n") == [[b"PING"], [b"PING"]]


def test_byte_after_a_header_cr_is_skipped_unseen():
    """Redis ends a header at its \\r and skips the next byte, whatever it is."""
    assert parse(b"*1\rX$4\r\nPING\r\n") == [[b"PING"]]
    assert parse(b"*1\r\n$4\rXPING\r\n") == [[b"PING"]]
    assert parse(b"*1\r") == []  # the byte after \r is still awaited


def test_expected_dollar_waits_for_the_line():
    """Redis checks the ``$`` once the header line is whole (and a byte after)."""
    assert parse(b"*1\r\nx") == []
    assert parse(b"*1\r\nx\r") == []
    assert parse(b"*1\r\nx\rY") == [("error", "Protocol error: expected '$', got 'x'")]


def test_expected_dollar_quotes_the_raw_byte():
    """Redis's %c puts the byte itself in the reply, UTF-8 or not."""
    [problem] = RequestParser().feed(b"*1\r\n\xffx\r\n")
    assert problem.reply == b"-ERR Protocol error: expected '$', got '\xff'\r\n"
    [problem] = RequestParser().feed(b"*1\r\n\n\r\n")
    assert problem.reply == b"-ERR Protocol error: expected '$', got ' '\r\n"


def test_multibulk_header_too_long_without_crlf():
    """An endless ``*`` line is refused once it passes the inline limit."""
    assert parse(b"*" + b"1" * 16, max_inline_bytes=16) == [
        ("error", "Protocol error: too big mbulk count string"),
    ]
    assert parse(b"*" + b"1" * 15, max_inline_bytes=16) == []


def test_bulk_header_too_long_without_crlf():
    assert parse(b"*1\r\n$" + b"1" * 16, max_inline_bytes=16) == [
        ("error", "Protocol error: too big bulk count string"),
    ]
    assert parse(b"*1\r\n$" + b"1" * 15, max_inline_bytes=16) == []


def test_inline_too_long_without_newline():
    """Refused as soon as the line passes the limit, before any newline."""
    assert parse(b"x" * 33, max_inline_bytes=32) == [
        ("error", "Protocol error: too big inline request"),
    ]


def test_inline_at_the_limit_waits_for_its_newline():
    """32 bytes and a \\r may still be a 32-byte line: no error yet."""
    assert parse(b"x" * 32 + b"\r", max_inline_bytes=32) == []


def test_inline_request_over_max_args_is_refused():
    """Item 15: the argument limit holds for inline requests too; refused
    with the error Redis gives an oversized inline request."""
    assert parse(b"MGET a b\r\n", max_args=3) == [[b"MGET", b"a", b"b"]]
    assert parse(b"PING\r\nMGET a b c\r\nPING\r\n", max_args=3) == [
        [b"PING"], ("error", "Protocol error: too big inline request"),
    ]


def test_inline_argument_over_max_bulk_bytes_is_refused():
    assert parse(b"ECHO abc\r\n", max_bulk_bytes=4) == [[b"ECHO", b"abc"]]
    assert parse(b'ECHO "a\\x41cde"\r\n', max_bulk_bytes=4) == [
        ("error", "Protocol error: too big inline request"),
    ]


def test_header_over_max_inline_bytes_is_refused_however_it_arrives():
    """A header line counts against the inline limit (``$12345``: 6 bytes),
    whole or a byte at a time (issue 8, item 16: max_inline_bytes 4)."""
    assert parse(encode(b"GET", b"k"), max_inline_bytes=2) == [[b"GET", b"k"]]
    assert parse(encode(b"ECHO", b"x" * 10), max_inline_bytes=2) == [
        ("error", "Protocol error: too big bulk count string"),
    ]
    assert parse(encode(*[b"a"] * 10), max_inline_bytes=2) == [
        ("error", "Protocol error: too big mbulk count string"),
    ]
    assert parse(encode(b"GET", b"x" * 999), max_inline_bytes=4) == [
        [b"GET", b"x" * 999],
    ]
    assert parse(encode(b"GET", b"x" * 10000), max_inline_bytes=4) == [
        ("error", "Protocol error: too big bulk count string"),
    ]


def test_inline_too_long_with_newline():
    """A complete line over the limit is refused too, whatever the chunking."""
    assert parse(b"x" * 33 + b"\r\n", max_inline_bytes=32) == [
        ("error", "Protocol error: too big inline request"),
    ]


@pytest.mark.parametrize("line", [
    b'ECHO "a\r\n', b"ECHO 'a\r\n", b'ECHO "a"b\r\n', b"ECHO 'a'b\n", b'ECHO "a\\"\n',
])
def test_unbalanced_quotes(line):
    assert parse(line) == [("error", "Protocol error: unbalanced quotes in request")]


def test_requests_before_an_error_are_returned_first():
    assert parse(b"PING\r\n" + encode(b"GET", b"a") + b"*1\r\n$x\r\n" + b"PING\r\n") == [
        [b"PING"], [b"GET", b"a"], ("error", "Protocol error: invalid bulk length"),
    ]


def test_parser_refuses_input_after_an_error():
    parser = RequestParser()
    assert isinstance(parser.feed(b"*x\r\n")[-1], ProtocolError)
    assert parser.feed(b"PING\r\n") == []


def test_large_value_in_one_byte_packets_is_linear():
    """256 KiB arriving a byte at a time: the tail is joined once, when the
    bulk is complete.  Re-joining or rescanning it per packet would be tens
    of gigabytes of copying here, and this test would not finish."""
    value = bytes(range(256)) * 1024
    data = encode(b"ECHO", value)
    parser = RequestParser()
    out = []
    for i in range(len(data)):
        out += parser.feed(data[i:i + 1])
    assert out == [[b"ECHO", value]]


def test_long_inline_line_in_one_byte_packets_is_linear():
    """Likewise a line: each packet is searched for the newline once."""
    line = b"ECHO " + b"y" * 60000 + b"\r\n"
    parser = RequestParser()
    out = []
    for i in range(len(line)):
        out += parser.feed(line[i:i + 1])
    assert out == [[b"ECHO", b"y" * 60000]]


@given(
    st.lists(st.lists(st.binary(max_size=40), min_size=1, max_size=6), max_size=8),
    st.lists(st.integers(min_value=0, max_value=2000), max_size=12),
)
def test_any_requests_cut_anywhere_parse_back(requests, cuts):
    """Property: multibulk-encoded requests, split at arbitrary points, parse
    back to exactly the requests sent."""
    data = b"".join(encode(*request) for request in requests)
    points = sorted({min(cut, len(data)) for cut in cuts})
    pieces = [data[a:b] for a, b in zip([0, *points], [*points, len(data)], strict=True)]
    parser = RequestParser()
    out = []
    for piece in pieces:
        out += parser.feed(piece)
    assert out == requests


@given(st.lists(st.binary(min_size=1, max_size=20).filter(
    lambda b: not any(c in b for c in b" \t\r\n\x00\x0b\x0c\"'")), min_size=1, max_size=6))
def test_plain_inline_words_parse_back(words):
    """Words without quotes or blanks split back as sent (after a command
    name: a line starting with '*' would be a multibulk header)."""
    assert RequestParser().feed(b"CMD " + b" ".join(words) + b"\r\n") == [[b"CMD", *words]]


@pytest.mark.parametrize("text, value", [
    (b"0", 0), (b"1", 1), (b"-1", -1), (b"12345", 12345), (b"9223372036854775807", 2**63 - 1),
    (b"-9223372036854775808", -(2**63)), (b"9223372036854775808", None), (b"", None),
    (b"-", None), (b"01", None), (b"-0", None), (b"+1", None), (b" 1", None), (b"1_0", None),
    (b"\xd9\xa1", None),
])
def test_parse_integer_like_string2ll(text, value):
    assert parse_integer(text) == value


# -- encoders ---------------------------------------------------------------------


def test_bulk():
    assert bulk(b"") == b"$0\r\n\r\n"
    assert bulk(b"a\r\nb") == b"$4\r\na\r\nb\r\n"
    assert bulk(b"x" * 2000) == b"$2000\r\n" + b"x" * 2000 + b"\r\n"


def test_null_depends_on_the_protocol():
    assert RESP2.null == b"$-1\r\n"
    assert RESP3.null == b"_\r\n"


def test_constants():
    assert OK == b"+OK\r\n"
    assert PONG == b"+PONG\r\n"
    assert simple("QUEUED") == b"+QUEUED\r\n"


def test_error_stays_on_one_line():
    assert error("ERR bad\r\nthing") == b"-ERR bad  thing\r\n"
    assert error(b"WRONGTYPE x") == b"-WRONGTYPE x\r\n"


def test_integer_and_array():
    assert integer(-3) == b":-3\r\n"
    assert array([integer(1), bulk(b"a")]) == b"*2\r\n:1\r\n$1\r\na\r\n"
    assert array([]) == b"*0\r\n"


def test_map_and_set_by_protocol():
    pairs = [(bulk(b"a"), integer(1))]
    assert RESP3.map(pairs) == b"%1\r\n$1\r\na\r\n:1\r\n"
    assert RESP2.map(pairs) == b"*2\r\n$1\r\na\r\n:1\r\n"
    assert RESP3.set([simple("x")]) == b"~1\r\n+x\r\n"
    assert RESP2.set([simple("x")]) == b"*1\r\n+x\r\n"


def test_encodings_are_valid_resp():
    """hiredis, a real client parser, reads back what we encode."""
    reader = hiredis.Reader()
    reader.feed(RESP3.map([(bulk(b"k"), RESP3.set([simple("v")])), (bulk(b"n"), RESP3.null)]))
    assert reader.gets() == {b"k": [b"v"], b"n": None}


def test_encoder_for():
    assert encoder_for(2) is RESP2
    assert encoder_for(3) is RESP3


@given(
    st.lists(st.sampled_from([
        encode(b"GET", b"k"), encode(b"ECHO", b"a\r\nb"), b"PING\r\n", b"ECHO 'x y'\n", b"\r\n",
        b"*", b"$", b"\r", b"\n", b"-1", b"0", b"3", b"x", b"'", b'"', b" ", b"\0",
    ]), max_size=30),
    st.integers(min_value=1, max_value=9),
)
def test_any_input_parses_the_same_in_any_chunking(tokens, size):
    """Property: requests and errors alike do not depend on how the stream was
    cut, even for garbage (small limits make the limit errors reachable)."""
    data = b"".join(tokens)
    limits = {"max_bulk_bytes": 8, "max_args": 4, "max_inline_bytes": 12}
    assert feed_in_chunks(data, size, **limits) == feed_in_chunks(data, len(data) or 1, **limits)


# -- the pipelined-GET fast path ------------------------------------------------


def test_only_gets_returns_the_keys_of_whole_get_requests():
    """Exactly what ``feed`` would parse, for one request or many."""
    parser = RequestParser(**LIMITS)
    assert parser.idle
    for data in (
        encode(b"GET", b"k"),
        encode(b"get", b"a") + encode(b"GET", b"") + encode(b"GET", b"x" * 1000),
    ):
        keys = parser.only_gets(data)
        assert [[b"GET", key] for key in keys] == [
            [b"GET", argv[1]] for argv in RequestParser(**LIMITS).feed(data)
        ]


@pytest.mark.parametrize("data", [
    b"",
    encode(b"GET", b"k")[:-1],  # unfinished
    encode(b"GET", b"k") + b"*2",  # a second request begun
    encode(b"GET", b"a\r\nb"),  # CRLF inside the key: not canonical tokens
    encode(b"GET", b"k") + encode(b"PING", b"k"),
    encode(b"Get", b"k"),  # valid, but left to the general path
    encode(b"GET", b"k", b"j"),
    encode(b"MGET", b"k"),
    b"*2\r\n$3\r\nGET\r\n$2\r\nk\r\n",  # length does not match
    b"*2\r\n$3\r\nGET\r\n$01\r\nk\r\n",  # not canonical
    b"GET k\r\n",  # inline
    encode(b"GET", b"x" * 2000),  # past the canonical header table
])
def test_only_gets_refuses_anything_else(data):
    assert RequestParser(**LIMITS).only_gets(data) is None


@pytest.mark.parametrize("limits", [
    {"max_bulk_bytes": 2}, {"max_args": 1}, {"max_inline_bytes": 1},
])
def test_only_gets_refuses_what_the_limits_refuse(limits):
    """With max_bulk_bytes below 3 even the name GET is too long (issue 8,
    item 16): the fast path must not take it."""
    data = encode(b"GET", b"k")
    parser = RequestParser(**{**LIMITS, **limits})
    assert parser.only_gets(data) is None
    assert isinstance(parser.feed(data)[-1], ProtocolError)


def test_parser_is_not_idle_inside_a_request():
    parser = RequestParser(**LIMITS)
    parser.feed(b"*2\r\n$3\r\nGET\r\n")
    assert not parser.idle
    parser.feed(b"$1\r\nk\r\n")
    assert parser.idle
    parser.feed(b"*2\r\n$3\r")
    assert not parser.idle



def test_encode_command_writes_a_call_as_clients_send_it():
    """One encoder for every call redisp makes to Redis (issue 12: the
    txredisapi connection had a copy of its own)."""
    from redisp.protocol.codec import encode_command

    assert encode_command([b"SET", b"k", b"", b"\r\n"]) == (
        b"*4\r\n$3\r\nSET\r\n$1\r\nk\r\n$0\r\n\r\n$2\r\n\r\n\r\n")
    assert encode_command([]) == b"*0\r\n"
