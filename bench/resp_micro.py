"""Python time of the RESP parser's fast paths alone, compiled and pure Python.

``only_gets`` (a packet of ``-P 16`` and of ``-P 1`` ``GET hot`` requests, as
the RESP door's hit path sees it) and ``parse_split`` (16 pipelined ``SET``
requests, the forwarded-packet path and the general parser's first step),
each timed with ``redisp._resp``'s function and with the reference in
redisp/resp.py, the same input, alternating: the A/B figure for the compiled
parser (bench/NOTES-perf.md, "w-chot").  ``ONLY=c`` or ``ONLY=py`` times one
side only, ``REPEAT`` calls a round, for counting instructions under
callgrind.
Run: .venv/bin/python bench/resp_micro.py
"""

import os
import time

import redisp.resp as resp

try:
    import redisp._resp as compiled
except ImportError:  # not built: the reference alone
    compiled = None

GETS_KNOWN = 1024
GET = b"*2\r\n$3\r\nGET\r\n$3\r\nhot\r\n"
SET = b"*3\r\n$3\r\nSET\r\n$16\r\nkey:000000012345\r\n$100\r\n" + b"v" * 100 + b"\r\n"
CASES = {
    "only_gets -P 16": ("only_gets", (GET * 16, GETS_KNOWN), 16),
    "only_gets -P 1": ("only_gets", (GET, GETS_KNOWN), 1),
    "parse_split 16 SETs": ("parse_split", (SET * 16, 1024 * 1024, 512 * 1024 * 1024), 16),
}


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
    sides = [("py", resp)] + ([("c", compiled)] if compiled is not None else [])
    for case, (name, args, requests) in CASES.items():
        figures = {}
        for side, module in sides:
            if only in (None, side):
                figures[side] = best(getattr(module, name), args, requests, repeat // requests)
        shown = ", ".join(f"{side} {t * 1e9:.0f} ns" for side, t in figures.items())
        ratio = f" ({figures['py'] / figures['c']:.1f}x)" if len(figures) == 2 else ""
        print(f"{case}: {shown} a request{ratio}")


if __name__ == "__main__":
    main()
