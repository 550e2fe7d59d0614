"""atheris target: the RESP request parser (redisp.protocol.codec), fed in random chunkings.

The first byte of an input picks the limits (defaults, or small ones that
make every limit reachable) and how the rest, the byte stream, is cut:
whole, N bytes at a time, or at points drawn from the stream itself.  A
crash is any exception (the parser returns its ProtocolError, never raises
it) or a broken invariant:

* the stream parses the same whole and cut up;
* once a ProtocolError is returned the parser stays failed;
* ``only_gets`` (the RESP door's GET fast path), when it takes the stream,
  returns exactly the keys of what ``feed`` parses, all ``GET key``.

Run by bench/fuzz; by hand: ``python bench/fuzz_targets/resp_parser.py
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

_instrumented = (
    atheris.instrument_imports(include=["redisp.protocol.codec"])
    if atheris else contextlib.nullcontext()
)
with _instrumented:
    from redisp.protocol.codec import ProtocolError, RequestParser

DEFAULT = {"max_bulk_bytes": 512 * 1024 * 1024, "max_args": 1024 * 1024,
           "max_inline_bytes": 64 * 1024}
LIMITS = [
    DEFAULT,
    {"max_bulk_bytes": 1, "max_args": 1, "max_inline_bytes": 1},
    {"max_bulk_bytes": 2, "max_args": 2, "max_inline_bytes": 4},
    {"max_bulk_bytes": 3, "max_args": 3, "max_inline_bytes": 3},
    {"max_bulk_bytes": 8, "max_args": 4, "max_inline_bytes": 12},
    {**DEFAULT, "max_inline_bytes": 4},
    {**DEFAULT, "max_bulk_bytes": 2},
    {**DEFAULT, "max_args": 2},
]


def _outcome(requests: list) -> list:
    return [str(r) if isinstance(r, ProtocolError) else r for r in requests]


def _cuts(stream: bytes, mode: int) -> list[bytes]:
    if mode == 0:
        return [stream]
    if mode < 24:  # fixed size pieces, 1..23 bytes
        return [stream[i:i + mode] for i in range(0, len(stream), mode)]
    # cut after every byte whose low bits say so: cuts that follow the data
    mask = (1 << (mode - 23) % 4 + 1) - 1
    pieces, start = [], 0
    for i, byte in enumerate(stream):
        if byte & mask == 0:
            pieces.append(stream[start:i + 1])
            start = i + 1
    pieces.append(stream[start:])
    return pieces


def TestOneInput(data: bytes) -> None:  # noqa: N802 (atheris's name)
    if not data:
        return
    limits = LIMITS[data[0] & 7]
    mode = data[0] >> 3
    stream = data[1:]

    whole = RequestParser(**limits)
    expected = _outcome(whole.feed(stream))

    parser = RequestParser(**limits)
    got: list = []
    for piece in _cuts(stream, mode):
        got += parser.feed(piece)
    got = _outcome(got)
    if got != expected:
        raise AssertionError(f"chunking changed the parse: {got!r} != {expected!r}")
    failed = bool(got) and isinstance(got[-1], str)
    if failed and (parser.feed(b"PING\r\n") or parser.idle):
        raise AssertionError("a failed parser took more input")

    keys = RequestParser(**limits).only_gets(stream)
    if keys is not None:
        if failed or [r[1] for r in expected] != keys or not all(
            len(r) == 2 and r[0] in (b"GET", b"get") for r in expected
        ):
            raise AssertionError(f"only_gets {keys!r} but feed {expected!r}")
        if not whole.idle:
            raise AssertionError("only_gets took a stream feed() left unfinished")


def multibulk(*args: bytes) -> bytes:
    return b"*%d\r\n" % len(args) + b"".join(b"$%d\r\n%b\r\n" % (len(a), a) for a in args)


SEEDS = [
    b"\x00" + multibulk(b"GET", b"key"),
    b"\x08" + multibulk(b"GET", b"a") + multibulk(b"get", b"b") * 3,
    b"\x10" + multibulk(b"ECHO", b"a\r\nb", b"x" * 40) + b"PING\r\n",
    b"\x01" + b'ECHO "a\\x41\\n" \'b c\'\r\n',
    b"\xc2" + b"*2\r\n$4\r\nECHO\r\n$1\r\nab\r\nPING\r\n",
    b"\x03" + b"*0\r\n*-1\r\n\r\n\n" + multibulk(b"MGET", b"a", b"b", b"c"),
    b"\xd5" + b"*1\r\n$4\0\r\nPING\r\n" + b"PING\0\r\n",
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
