"""Python time of redisp.protocol._resp's pieces alone, compiled and pure Python.

``only_gets`` (a packet of ``-P 16`` and of ``-P 1`` ``GET hot`` requests, as
the RESP door's hit path sees it), ``parse_split`` (16 pipelined ``SET``
requests, the forwarded-packet path and the general parser's first step) and
``get_replies`` (the replies of 16 GETs of a 100-byte value), each timed with
``redisp.protocol._resp``'s function and with the Python version (redisp/protocol/codec.py's
references; commands/replies.py without ``_bulks``), the same input, alternating: the
A/B figure for the compiled pieces (bench/NOTES-perf.md, "w-chot").
``ONLY=c`` or ``ONLY=py`` times one side only, ``REPEAT`` calls a round.
Run: .venv/bin/python bench/resp_micro.py
"""

import os
import time

import redisp.commands.replies as replies
import redisp.protocol.codec as resp

try:
    import redisp.protocol._resp as compiled
except ImportError:  # not built: the reference alone
    compiled = None

GETS_KNOWN = 1024
GET = b"*2\r\n$3\r\nGET\r\n$3\r\nhot\r\n"
SET = b"*3\r\n$3\r\nSET\r\n$16\r\nkey:000000012345\r\n$100\r\n" + b"v" * 100 + b"\r\n"
VALUES = [b"v" * 100] * 16


def python_replies(values: list[bytes]) -> object:
    """replies.get_replies as where redisp.protocol._resp is not built."""
    replies._bulks = None
    try:
        return replies.get_replies(values)
    finally:
        replies._bulks = compiled_bulks


compiled_bulks = replies._bulks
#: case -> (name in redisp.protocol.codec / redisp.protocol._resp, or the two callables;
#: arguments; requests)
CASES = {
    "only_gets -P 16": ("only_gets", (GET * 16, GETS_KNOWN), 16),
    "only_gets -P 1": ("only_gets", (GET, GETS_KNOWN), 1),
    "parse_split 16 SETs": ("parse_split", (SET * 16, 1024 * 1024, 512 * 1024 * 1024), 16),
    "get_replies 16 values": ((python_replies, replies.get_replies), (VALUES,), 16),
}


def function(name, side: str):
    """The callable of ``side`` ("py" or "c") for a case."""
    if isinstance(name, tuple):
        return name[0] if side == "py" else name[1]
    return getattr(resp if side == "py" else compiled, name)


def best(function, args: tuple, requests: int, repeat: int) -> float:
    """Best of 25 rounds, seconds a request."""
    fastest = float("inf")
    for _ in range(25):
        started = time.process_time()
        for _ in range(repeat):
            function(*args)
        fastest = min(fastest, (time.process_time() - started) / (repeat * requests))
    return fastest


def main() -> None:
    repeat = int(os.environ.get("REPEAT", "20000"))
    only = os.environ.get("ONLY")
    sides = ["py"] + (["c"] if compiled is not None else [])
    for case, (name, args, requests) in CASES.items():
        figures = {}
        for side in sides:
            if only in (None, side):
                figures[side] = best(function(name, side), args, requests, repeat // requests)
        shown = ", ".join(f"{side} {t * 1e9:.0f} ns" for side, t in figures.items())
        ratio = f" ({figures['py'] / figures['c']:.1f}x)" if len(figures) == 2 else ""
        print(f"{case}: {shown} a request{ratio}")


if __name__ == "__main__":
    main()
