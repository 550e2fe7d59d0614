"""Where reply frames end: every type of RESP2 and RESP3, in every chunking.

The scanner must cut the same frames out of a stream however it is cut into
chunks, agree with hiredis on where each frame ends, skip bulk bodies by
length, and refuse what is not RESP.
"""

from __future__ import annotations

import math

import hiredis
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from redisp.protocol.frames import (
    ARRAY,
    BULK,
    PUSH,
    SIMPLE,
    ErrorReply,
    FrameError,
    FrameScanner,
    Push,
    decode,
    frame_kind,
)


def nested(value: object, depth: int) -> object:
    for _ in range(depth):
        value = [value]
    return value


# -- a corpus of single frames, each with its decoded value -----------------------

CORPUS: list[tuple[bytes, object]] = [
    (b"+OK\r\n", b"OK"),
    (b"+\r\n", b""),
    (b"-ERR unknown command 'x', with args beginning with: \r\n",
     ErrorReply(b"ERR unknown command 'x', with args beginning with: ")),
    (b"-WRONGTYPE Operation against a key holding the wrong kind of value\r\n",
     ErrorReply(b"WRONGTYPE Operation against a key holding the wrong kind of value")),
    (b":0\r\n", 0),
    (b":-9223372036854775808\r\n", -(2**63)),
    (b":9223372036854775807\r\n", 2**63 - 1),
    (b"$0\r\n\r\n", b""),
    (b"$-1\r\n", None),
    (b"$5\r\nhello\r\n", b"hello"),
    (b"$4\r\n\r\n\r\n\r\n", b"\r\n\r\n"),  # a body that looks like lines
    (b"$5\r\n*1\r\n:\r\n", b"*1\r\n:"),  # ... or like frames
    (b"*0\r\n", []),
    (b"*-1\r\n", None),
    (b"*2\r\n$3\r\nfoo\r\n$-1\r\n", [b"foo", None]),
    (b"*3\r\n*1\r\n*0\r\n*-1\r\n*2\r\n:1\r\n+x\r\n", [[[]], None, [1, b"x"]]),
    (b"_\r\n", None),
    (b"#t\r\n", True),
    (b"#f\r\n", False),
    (b",3.14\r\n", 3.14),
    (b",-1e10\r\n", -1e10),
    (b",inf\r\n", math.inf),
    (b",-inf\r\n", -math.inf),
    (b",10\r\n", 10.0),
    (b"(3492890328409238509324850943850943825024385\r\n",
     3492890328409238509324850943850943825024385),
    (b"(-12\r\n", -12),
    (b"!21\r\nSYNTAX invalid syntax\r\n", ErrorReply(b"SYNTAX invalid syntax")),
    (b"=15\r\ntxt:Some string\r\n", b"Some string"),
    (b"=4\r\nmkd:\r\n", b""),
    (b"%0\r\n", {}),
    (b"%2\r\n+first\r\n:1\r\n+second\r\n:2\r\n", {b"first": 1, b"second": 2}),
    (b"~0\r\n", []),
    (b"~3\r\n+a\r\n:1\r\n,2.5\r\n", [b"a", 1, 2.5]),
    (b">3\r\n$7\r\nmessage\r\n$2\r\nch\r\n$3\r\nhey\r\n", Push([b"message", b"ch", b"hey"])),
    (b">2\r\n$10\r\ninvalidate\r\n*1\r\n$1\r\nk\r\n", Push([b"invalidate", [b"k"]])),
    # an attribute travels with the frame it annotates, at top level and inside
    (b"|1\r\n+key-popularity\r\n%2\r\n$1\r\na\r\n,0.1923\r\n$1\r\nb\r\n,0.0012\r\n"
     b"*2\r\n:2039123\r\n:9543892\r\n", [2039123, 9543892]),
    (b"|0\r\n+bare\r\n", b"bare"),
    (b"*2\r\n|1\r\n+ttl\r\n:3600\r\n:1\r\n:2\r\n", [1, 2]),
    (b"|1\r\n+a\r\n|1\r\n+b\r\n+c\r\n+d\r\n:7\r\n", 7),  # an attribute on an attribute's value
    (b"|1\r\n+a\r\n+b\r\n|1\r\n+c\r\n+d\r\n>1\r\n+p\r\n", Push([b"p"])),  # two in a row
    # a map with an aggregate key, and deep nesting
    (b"%1\r\n*2\r\n:1\r\n:2\r\n+v\r\n", {(1, 2): b"v"}),
    (b"*1\r\n" * 50 + b":1\r\n", nested(1, 50)),
]

STREAM = b"".join(frame for frame, _ in CORPUS)
FRAMES = [frame for frame, _ in CORPUS]


def scan_in_chunks(data: bytes, size: int, scanner: FrameScanner | None = None) -> list[bytes]:
    scanner = scanner or FrameScanner()
    out: list[bytes] = []
    for start in range(0, len(data), size):
        out += scanner.feed(data[start:start + size])
    return out


def scan_cut_at(data: bytes, cuts: list[int]) -> list[bytes]:
    scanner = FrameScanner()
    out: list[bytes] = []
    last = 0
    for cut in sorted(set(cuts)) + [len(data)]:
        out += scanner.feed(data[last:cut])
        last = cut
    return out


@pytest.mark.parametrize("frame,value", CORPUS)
def test_each_frame_alone_in_every_chunking(frame, value):
    """A frame comes out whole and unchanged, however its bytes are cut."""
    for size in range(1, len(frame) + 1):
        assert scan_in_chunks(frame, size) == [frame], f"chunk size {size}"


@pytest.mark.parametrize("frame,value", CORPUS)
def test_decode(frame, value):
    """When asked, a frame decodes to its value (attributes dropped)."""
    decoded = decode(frame)
    assert decoded == value
    assert type(decoded) is type(value)


def test_the_whole_corpus_in_every_chunking():
    """Frames back to back are cut apart the same for every chunk size."""
    assert FrameScanner().feed(STREAM) == FRAMES
    for size in range(1, 64):
        assert scan_in_chunks(STREAM, size) == FRAMES, f"chunk size {size}"


def test_every_single_cut_of_the_corpus():
    """One cut anywhere (mid-header, mid-body, mid-CRLF) changes nothing."""
    for cut in range(len(STREAM) + 1):
        assert scan_cut_at(STREAM, [cut]) == FRAMES, f"cut at {cut}"


def test_a_chunk_that_is_exactly_one_frame_is_passed_on_as_is():
    """No copy when a read brings one whole frame, the common case."""
    chunk = b"*2\r\n$3\r\nfoo\r\n$3\r\nbar\r\n"
    [frame] = FrameScanner().feed(chunk)
    assert frame is chunk


def test_idle_only_between_frames():
    scanner = FrameScanner()
    assert scanner.idle
    scanner.feed(b"*2\r\n:1\r\n")
    assert not scanner.idle
    scanner.feed(b":2\r\n$3\r\nab")
    assert not scanner.idle
    scanner.feed(b"c\r\n")
    assert scanner.idle
    scanner.feed(b"+O")
    assert not scanner.idle


def test_frame_kind_sees_through_attributes():
    """A push with attributes is still a push: the relay routes by this."""
    assert frame_kind(b"+OK\r\n") == SIMPLE
    assert frame_kind(b"|1\r\n+a\r\n+b\r\n>1\r\n+p\r\n") == PUSH
    assert frame_kind(b"|1\r\n+a\r\n|1\r\n+b\r\n+c\r\n+d\r\n$1\r\nx\r\n") == BULK
    assert frame_kind(b"|1\r\n+a\r\n+b\r\n|0\r\n*0\r\n") == ARRAY


# -- big bulks: skipped by length -----------------------------------------------------


def test_big_bulk_in_many_chunks():
    """An 8 MiB value in 64 KiB chunks is one frame, byte for byte."""
    body = bytes(range(256)) * (8 * 4096)
    frame = b"$%d\r\n%b\r\n" % (len(body), body)
    stream = b"+before\r\n" + frame + b":1\r\n"
    assert scan_in_chunks(stream, 65536) == [b"+before\r\n", frame, b":1\r\n"]


def test_a_512_mib_bulk_is_skipped_by_length_not_scanned():
    """Each chunk of a huge body costs one step and no copy: 511 reads of a
    shared 1 MiB chunk leave the scanner waiting, holding only references."""
    scanner = FrameScanner()
    size = 512 * 1024 * 1024
    assert scanner.feed(b"*2\r\n$%d\r\n" % size) == []
    looks_like_garbage = b"\r\n*1\r\n:x\r\n@"
    chunk = (looks_like_garbage * (1024 * 1024 // len(looks_like_garbage) + 1))[:1024 * 1024]
    for _ in range(511):
        assert scanner.feed(chunk) == []  # body bytes that look like garbage are not looked at
    assert not scanner.idle


def test_bulk_end_straddling_chunks_is_checked():
    """The CRLF after a bulk is checked even when cut between two chunks."""
    scanner = FrameScanner()
    scanner.feed(b"$3\r\nabc\r")
    with pytest.raises(FrameError):
        scanner.feed(b"X")


# -- not RESP ------------------------------------------------------------------------

GARBAGE = [
    b"hello\r\n",  # no type byte
    b"\r\n",
    b"@5\r\n",
    b"$abc\r\nxyz\r\n",
    b"$-2\r\n",
    b"$ 3\r\nabc\r\n",
    b"$3\r\nabcd\r\n",  # the length is off: the next byte is not CRLF
    b"$3\r\nab\r\n\r\n",
    b"*x\r\n",
    b"*-2\r\n",
    b"%01\r\n",
    b":1.5\r\n",
    b":\r\n",
    b":+1\r\n",
    b"#x\r\n",
    b"#true\r\n",
    b"_x\r\n",
    b",abc\r\n",
    b", 1\r\n",
    b"(12a\r\n",
    b"(\r\n",
    b"=3\r\ntxt\r\n",  # a verbatim string without its format
    b"*2\r\n:1\r\n?\r\n",  # garbage inside an aggregate
]


@pytest.mark.parametrize("data", GARBAGE)
def test_garbage_is_a_frame_error_in_every_chunking(data):
    """Non-RESP from the backing is reported, never passed on as a frame."""
    for size in range(1, len(data) + 1):
        scanner = FrameScanner()
        with pytest.raises(FrameError):
            scan_in_chunks(data, size, scanner)


def test_frames_before_the_garbage_are_kept():
    """The frames a chunk completed before its garbage are good: they come
    with the error, for the calls they answer."""
    scanner = FrameScanner()
    with pytest.raises(FrameError) as raised:
        scanner.feed(b"+OK\r\n:1\r\n@\r\n")
    assert raised.value.frames == [b"+OK\r\n", b":1\r\n"]


def test_a_broken_stream_stays_broken():
    """Framing lost is lost for good: later bytes are refused too."""
    scanner = FrameScanner()
    with pytest.raises(FrameError):
        scanner.feed(b"@\r\n")
    with pytest.raises(FrameError):
        scanner.feed(b"+OK\r\n")


def test_an_endless_line_is_refused_past_max_line():
    scanner = FrameScanner(max_line=100)
    scanner.feed(b"+" + b"x" * 60)
    with pytest.raises(FrameError):
        scanner.feed(b"x" * 60)


def test_a_long_line_within_max_line_in_many_chunks():
    """A long status line (a script's status_reply) cut many times is one frame."""
    line = b"+" + b"y" * 10000 + b"\r\n"
    assert scan_in_chunks(line + b":1\r\n", 7) == [line, b":1\r\n"]


@pytest.mark.parametrize("data", [b"+OK\r\n+", b"*2\r\n:1\r\n", b"", b"$3\r\nab"])
def test_decode_refuses_anything_but_one_frame(data):
    with pytest.raises(FrameError):
        decode(data)


def test_decode_of_a_very_deep_frame_does_not_recurse():
    deep = b"*1\r\n" * 100000 + b":1\r\n"
    value = decode(deep)
    for _ in range(100000):
        value = value[0]
    assert value == 1


# -- generated frames: the scanner against the model and hiredis -----------------------

_text = st.binary(max_size=20)
_line = st.binary(max_size=20).map(lambda b: b.replace(b"\r", b"").replace(b"\n", b""))


def _leaf(resp3: bool, errors: bool):
    leaves = [
        _line.map(lambda s: b"+%b\r\n" % s),
        st.integers(-(2**63), 2**63 - 1).map(lambda i: b":%d\r\n" % i),
        _text.map(lambda b: b"$%d\r\n%b\r\n" % (len(b), b)),
        st.just(b"$-1\r\n"),
    ]
    if errors:
        leaves.append(_line.map(lambda s: b"-ERR %b\r\n" % s))
    if resp3:
        leaves += [
            st.just(b"_\r\n"),
            st.sampled_from([b"#t\r\n", b"#f\r\n"]),
            st.floats(allow_nan=False).map(lambda f: b",%r\r\n" % f),
            st.integers().map(lambda i: b"(%d\r\n" % i),
            _text.map(lambda b: b"=%d\r\ntxt:%b\r\n" % (len(b) + 4, b)),
        ]
        if errors:
            leaves.append(_text.map(lambda b: b"!%d\r\n%b\r\n" % (len(b), b)))
    return st.one_of(leaves)


def _frames(resp3: bool = True, errors: bool = True, attributes: bool = True,
            aggregate_keys: bool = True):
    def aggregates(children):
        keys = children if aggregate_keys else _leaf(resp3, errors)
        kinds = [st.lists(children, max_size=5).map(
            lambda xs: b"*%d\r\n" % len(xs) + b"".join(xs))]
        if resp3:
            for kind in b"~>":
                kinds.append(st.lists(children, max_size=5).map(
                    lambda xs, k=kind: b"%c%d\r\n" % (k, len(xs)) + b"".join(xs)))
            kinds.append(st.lists(st.tuples(keys, children), max_size=4).map(
                lambda kv: b"%%%d\r\n" % len(kv) + b"".join(k + v for k, v in kv)))
            if attributes:
                kinds.append(st.tuples(
                    st.lists(st.tuples(children, children), max_size=2), children).map(
                    lambda t: b"|%d\r\n" % len(t[0]) + b"".join(k + v for k, v in t[0]) + t[1]))
        return st.one_of(kinds)

    return st.recursive(_leaf(resp3, errors), aggregates, max_leaves=12)


@settings(max_examples=300, deadline=None)
@given(st.lists(_frames(), min_size=1, max_size=6), st.data())
def test_generated_frames_in_random_chunkings(frames, data):
    """Any sequence of frames, cut anywhere, comes out as those frames."""
    stream = b"".join(frames)
    cuts = data.draw(st.lists(st.integers(0, len(stream)), max_size=12))
    assert scan_cut_at(stream, cuts) == frames
    for frame in frames:
        decode(frame)  # every frame the scanner accepts decodes


def _hiredis_ends(stream: bytes) -> list[int]:
    """The offsets after which hiredis has a complete reply, fed a byte at a time."""
    reader = hiredis.Reader(notEnoughData=Ellipsis, replyError=ErrorReply)
    ends = []
    for i in range(len(stream)):
        reader.feed(stream[i:i + 1])
        while reader.gets() is not Ellipsis:
            ends.append(i + 1)
    return ends


def _scanner_ends(stream: bytes) -> list[int]:
    scanner = FrameScanner()
    ends = []
    for i in range(len(stream)):
        ends += [i + 1] * len(scanner.feed(stream[i:i + 1]))
    return ends


@settings(max_examples=200, deadline=None)
@given(st.lists(_frames(resp3=False), min_size=1, max_size=4))
def test_frame_ends_agree_with_hiredis_resp2(frames):
    """Fed a byte at a time, the scanner completes a frame exactly when hiredis does."""
    stream = b"".join(frames)
    assert _scanner_ends(stream) == _hiredis_ends(stream)


@settings(max_examples=200, deadline=None)
@given(st.lists(_frames(resp3=True, errors=False, attributes=False, aggregate_keys=False),
                min_size=1, max_size=4))
def test_frame_ends_agree_with_hiredis_resp3(frames):
    """The same for RESP3, less what hiredis does not treat as we must: blob
    errors (it refuses them), attributes (it returns them as replies) and
    maps keyed by aggregates (it cannot make them dict keys)."""
    stream = b"".join(frames)
    assert _scanner_ends(stream) == _hiredis_ends(stream)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=40))
def test_random_bytes_never_crash(data):
    """Random bytes give frames that are a prefix of them, or a FrameError."""
    scanner = FrameScanner()
    try:
        ours = scan_in_chunks(data, 3, scanner)
    except FrameError:
        return
    assert b"".join(ours) == data[:sum(len(f) for f in ours)]
