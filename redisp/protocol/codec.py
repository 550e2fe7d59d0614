"""RESP without I/O: the request parser of both wire forms, and reply encoders.

Nothing here touches a socket, a reactor or a command: bytes go in, argument
lists (or a ``ProtocolError``) come out, and replies are built as bytes.  That
keeps the hot path of the RESP door in two small pieces that can be tested
byte by byte and measured on their own.

Parsing follows Redis 7's ``processMultibulkBuffer``/``processInlineBuffer``
(src/networking.c) and ``sdssplitargs`` (src/sds.c), with their error
wording, down to what Redis does with bytes a client gets wrong: the byte
after a header's ``\\r`` and the two bytes after a bulk string are skipped
unseen, and a NUL byte before a line's end hides that end.  Where Redis's
answer depends on how its reads happened to cut the stream, the parser
instead follows one rule on the bytes themselves, so the same bytes always
parse the same way:

* the limits (``max_bulk_bytes``, ``max_args``, ``max_inline_bytes``) are the
  proxy's own, each enforced on a header or a line *before* the body is
  buffered, so no client can make us hold more than one limit's worth of an
  unfinished element;
* a header line (``*``/``$`` and the digits before its ``\\r``) or an inline
  line (before its ``\\r\\n``) longer than ``max_inline_bytes`` is a "too big"
  error however it arrives (Redis only checks lines it has not yet seen the
  end of, so a long line read in one piece may pass there);
* an inline request breaking ``max_args``, or with an argument longer than
  ``max_bulk_bytes``, is refused as ``Protocol error: too big inline
  request`` (Redis has no such limits for inline requests).

Before AUTH, Redis holds multibulk requests to tighter limits (``tighten``,
below), and parses one command, runs it, then parses the next: so an AUTH
lifts them for what follows it in the same packet.  ``feed(data, one=True)``
and ``rest`` give that order; otherwise they cost ``feed`` one test, and the
fast paths (``only_gets``, ``whole``, ``_parse_split``) nothing.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

__all__ = [
    "ProtocolError", "RequestParser", "LogLimiter", "parse_integer", "split_inline",
    "Encoder", "RESP2", "RESP3", "encoder_for",
    "OK", "PONG", "CRLF", "EMPTY_ARRAY",
    "bulk", "simple", "error", "integer", "array", "encode_command",
]


class ProtocolError(Exception):
    """Input that is not RESP; ``str()`` is the reply text after ``-ERR ``."""

    @property
    def reply(self) -> bytes:
        """The error reply, byte for byte as Redis sends it: one message
        quotes a raw byte of the input, which may not be UTF-8."""
        return error(("ERR " + str(self)).encode("latin-1"))


# -- numbers ------------------------------------------------------------------

LLONG_MAX = 2**63 - 1
LLONG_MIN = -(2**63)

#: header text -> value for the lengths clients send all the time: one dict
#: lookup both validates and converts, where int() would accept " 1", "+1",
#: "0_1" and "01", which Redis refuses.
_SMALL: dict[bytes, int] = {b"%d" % i: i for i in range(-1, 10000)}


def parse_integer(text: bytes) -> int | None:
    """The value of ``text`` if Redis's ``string2ll`` accepts it, else None.

    That is an optional ``-`` then decimal digits without a leading zero
    (``0`` itself excepted), within a signed 64-bit integer.
    """
    value = _SMALL.get(text)
    if value is not None:
        return value
    if len(text) > 20:
        return None
    negative = text[:1] == b"-"
    digits = text[1:] if negative else text
    if not digits.isdigit() or digits[0] == 0x30:  # isdigit() is ASCII-only on bytes
        return None
    value = -int(digits) if negative else int(digits)
    if not LLONG_MIN <= value <= LLONG_MAX:
        return None
    return value


# -- inline requests ----------------------------------------------------------

#: bytes that make ``bytes.split()`` disagree with sdssplitargs: quotes, NUL
#: (C ends the string there), and \v \f (blanks between arguments, but not
#: argument terminators, for sdssplitargs)
_NEEDS_SDSSPLIT = re.compile(b"[\"'\\x00\\x0b\\x0c]")
_BLANKS = frozenset(b" \t\n\r\x0b\x0c")  # C isspace()
_ENDS_TOKEN = frozenset(b" \n\r\t")
_HEX = frozenset(b"0123456789abcdefABCDEF")
_ESCAPES = {ord("n"): 10, ord("r"): 13, ord("t"): 9, ord("b"): 8, ord("a"): 7}


def split_inline(line: bytes) -> list[bytes] | None:
    """Split an inline request line like Redis's ``sdssplitargs``.

    Returns the arguments, or None for unbalanced quotes (which includes a
    closing quote followed by anything but a blank, as Redis has it).
    """
    if _NEEDS_SDSSPLIT.search(line) is None:
        return line.split()
    return _sdssplitargs(line)


def _sdssplitargs(line: bytes) -> list[bytes] | None:
    """The full state machine, for lines with quotes or unusual blanks."""
    nul = line.find(b"\0")
    if nul >= 0:
        line = line[:nul]
    n = len(line)

    def at(i: int) -> int:
        return line[i] if i < n else 0

    argv: list[bytes] = []
    i = 0
    while True:
        while i < n and line[i] in _BLANKS:
            i += 1
        if i >= n:
            return argv
        current = bytearray()
        in_double = in_single = False
        while True:
            c = at(i)
            if in_double:
                if c == 0x5C and at(i + 1) == 0x78 and at(i + 2) in _HEX and at(i + 3) in _HEX:
                    current.append(int(line[i + 2:i + 4], 16))
                    i += 3
                elif c == 0x5C and at(i + 1):
                    i += 1
                    current.append(_ESCAPES.get(line[i], line[i]))
                elif c == 0x22:
                    if at(i + 1) and at(i + 1) not in _BLANKS:
                        return None
                    i += 1
                    break
                elif c == 0:
                    return None
                else:
                    current.append(c)
            elif in_single:
                if c == 0x5C and at(i + 1) == 0x27:
                    i += 1
                    current.append(0x27)
                elif c == 0x27:
                    if at(i + 1) and at(i + 1) not in _BLANKS:
                        return None
                    i += 1
                    break
                elif c == 0:
                    return None
                else:
                    current.append(c)
            elif c == 0 or c in _ENDS_TOKEN:
                break
            elif c == 0x22:
                in_double = True
            elif c == 0x27:
                in_single = True
            else:
                current.append(c)
            i += 1
        argv.append(bytes(current))


# -- the parser -----------------------------------------------------------------

_INVALID_MULTIBULK = "Protocol error: invalid multibulk length"
_INVALID_BULK = "Protocol error: invalid bulk length"
_BIG_MULTIBULK = "Protocol error: too big mbulk count string"
_BIG_BULK = "Protocol error: too big bulk count string"
_BIG_INLINE = "Protocol error: too big inline request"
_UNBALANCED = "Protocol error: unbalanced quotes in request"
_UNAUTH_MULTIBULK = "Protocol error: unauthenticated multibulk length"
_UNAUTH_BULK = "Protocol error: unauthenticated bulk length"

#: Redis 7.0's own bound on a multibulk count, past which it is invalid
#: whether or not the client has authenticated
INT_MAX = 2**31 - 1

#: "$<n>", the canonical bulk header of each small n, for the fast paths
_HEADERS = [b"$%d" % i for i in range(1024)]

#: what feed() returns: requests, possibly ending with the error that stopped it
Parsed = list[list[bytes] | ProtocolError]


class RequestParser:
    """Turns a client's byte stream into requests, incrementally.

    ``feed()`` may be given the stream cut anywhere, and the outcome never
    depends on where: every limit is a rule on the bytes of one element, not
    on what one read happened to hold.  It parses every request of a chunk in
    one pass -- well-formed multibulk requests from one ``split`` of the
    chunk (``_parse_split``), anything else by offsets (``_parse``, the
    grammar itself) -- and keeps only the unconsumed tail.  While that tail
    is an unfinished element it is not parsed again until it can have become
    complete: until the pending bulk string has all its bytes (by count), or
    until a chunk brings the byte that ends the pending line (each new chunk
    is searched once, the tail never again).  A large value trickling in a
    byte at a time therefore costs linear time.  ``feed()`` takes ``bytes``,
    as Twisted delivers them.

    A line (inline request, ``*`` or ``$`` header) holding a NUL byte before
    its terminator never ends, as in Redis, whose ``strchr`` stops there: the
    parser swallows what follows until the element passes
    ``max_inline_bytes``, then fails with that element's "too big" error.
    """

    __slots__ = (
        "max_bulk_bytes", "max_args", "max_inline_bytes",
        "_parts", "_size", "_need", "_until", "_too_big", "_inline", "_stuck",
        "_args", "_remaining", "_bulk", "_failed",
        "_max_count", "_max_size", "_known", "_gets_known",
        "_count_limit", "_bulk_limit", "_tight_args", "_tight_bulk",
    )

    def __init__(
        self,
        max_bulk_bytes: int = 512 * 1024 * 1024,
        max_args: int = 1024 * 1024,
        max_inline_bytes: int = 64 * 1024,
    ) -> None:
        self.max_bulk_bytes = max_bulk_bytes
        self.max_args = max_args
        self.max_inline_bytes = max_inline_bytes
        # the unconsumed tail, as the chunks it arrived in; it always starts
        # at the beginning of the element being waited for
        self._parts: list[bytes] = []
        self._size = 0
        # waiting by count: nothing to do until len(tail) >= _need ...
        self._need = 0
        # ... or by terminator: nothing to do until a chunk holds _until; the
        # line (less a final \r when _inline) may not pass max_inline_bytes
        self._until = b""
        self._too_big = ""
        self._inline = False
        # a NUL byte was seen in a pending line: _size counts the bytes
        # swallowed since its start, until they pass the limit
        self._stuck = False
        # the multibulk request in progress
        self._args: list[bytes] = []
        self._remaining = 0  # arguments still to come
        self._bulk = -1  # length of the bulk string whose header was read
        self._failed = False
        self.relax()

    def tighten(self, max_args: int, max_bulk_bytes: int) -> None:
        """Until ``relax()``, a multibulk count over ``max_args`` is refused
        as ``unauthenticated multibulk length`` and a bulk length over
        ``max_bulk_bytes`` as ``unauthenticated bulk length``, as Redis
        refuses them before AUTH (src/networking.c,
        ``processMultibulkBuffer``).  The proxy's own limits keep their
        errors, checked first as Redis checks its own, save that a count
        only Redis's ``INT_MAX`` bounds is refused as unauthenticated, as
        Redis does.  Inline requests have no such limits, in Redis either.
        The caller feeds one request at a time meanwhile (``one``)."""
        self._set_limits(max_args, max_bulk_bytes)

    def relax(self) -> None:
        """Back to the proxy's own limits only."""
        self._set_limits(LLONG_MAX, LLONG_MAX)

    def _set_limits(self, tight_args: int, tight_bulk: int) -> None:
        self._tight_args = tight_args
        self._tight_bulk = tight_bulk
        # what _parse compares each header with: past it, _count_error and
        # _bulk_error tell which limit it broke
        self._count_limit = min(self.max_args, tight_args)
        self._bulk_limit = min(self.max_bulk_bytes, tight_bulk)
        # What the fast paths may take from their tables without a check per
        # header: counts and sizes whose header line ("*" or "$" then the
        # digits) fits max_inline_bytes, within the limits.
        digits = max(self.max_inline_bytes - 1, 0)
        widest = 10**digits - 1 if digits < 19 else LLONG_MAX
        self._max_count = min(self._count_limit, widest)
        self._max_size = min(self._bulk_limit, widest)
        self._known = min(len(_HEADERS), self._max_size + 1)
        # only_gets also needs "*2", and "$3" for the name GET itself: else
        # it takes no key at all
        self._gets_known = self._known if self._max_count >= 2 and self._known > 3 else 0

    def feed(self, data: bytes, one: bool = False) -> Parsed:
        """Every request completed by ``data``, in order.

        After malformed input the list ends with a ``ProtocolError`` and the
        parser ignores anything fed later (the connection is to be closed).

        ``one``: at most the first request (or the error that stopped it);
        the parser keeps the bytes after it unparsed (``kept``), for
        ``rest``, so the caller can run it before the next is parsed.
        """
        if self._failed or not data:
            return []
        if self._stuck:
            self._size += len(data)
            if self._size > self.max_inline_bytes:
                return self._fail([], self._too_big)
            return []
        parts = self._parts
        if parts:
            parts.append(data)
            self._size += len(data)
            if self._until:
                if self._until not in data:
                    if 0 in data:
                        out: Parsed = []
                        self._stick(out, self._size, self._too_big)
                        return out
                    size = self._size
                    if self._inline and data[-1] == 0x0D:
                        size -= 1  # may yet be the \r of \r\n
                    if size > self.max_inline_bytes:
                        return self._fail([], self._too_big)
                    return []
            elif self._size < self._need:
                return []
            data = b"".join(parts)
            self._parts = []
        return self._parse(data, 0, one)

    @property
    def kept(self) -> bool:
        """True when ``feed(one=True)`` (or ``keep``) left bytes unparsed."""
        return bool(self._parts) and self._parts[0].__class__ is memoryview

    def keep(self, data: bytes) -> None:
        """Take ``data`` unparsed, after what is kept already, for ``rest``:
        the caller has a request still to run that may change the limits.
        Only while ``idle`` or ``kept`` (else ``feed`` it)."""
        if self._failed or not data:
            return
        if self._parts:
            self._parts.append(data)
            self._size += len(data)
        else:
            self._keep(data, 0)

    def rest(self, one: bool = False) -> Parsed:
        """``feed`` what is ``kept``, as if it came now."""
        parts = self._parts
        if self._failed or not self.kept:
            return []
        self._parts = []
        if one and len(parts) == 1:  # where it is, not copied: resumed once per request
            view = parts[0]
            buf = view.obj
            return self._parse(buf, len(buf) - len(view), True)  # type: ignore[arg-type]
        return self._parse(b"".join(parts), 0, one)

    def _keep(self, buf: bytes, pos: int) -> None:
        """Keep ``buf[pos:]`` unparsed, as a view (a memoryview marks it
        ``kept``)."""
        self._parts = [memoryview(buf)[pos:]]  # type: ignore[list-item]
        self._size = len(buf) - pos
        self._need = 0
        self._until = b""

    def _parse(self, buf: bytes, pos: int = 0, one: bool = False) -> Parsed:
        """The grammar: Redis's processMultibulkBuffer / processInlineBuffer,
        with the limits checked on each element as soon as it can be.

        ``one``: stop after the first request, keeping the rest, from
        ``pos`` (the fast path, which splits the whole buffer, is not tried:
        resumed per request, it would cost quadratic time)."""
        n = len(buf)
        if one or self._remaining or buf[0] != 0x2A:
            out: Parsed = []
        else:
            out, pos = self._parse_split(buf)
            if pos >= n:
                return out
        args = self._args
        remaining = self._remaining
        bulk = self._bulk
        small = _SMALL
        max_line = self.max_inline_bytes
        while True:
            if remaining:
                if bulk < 0:
                    if pos >= n:
                        break
                    cr = buf.find(b"\r", pos)
                    if cr < 0:
                        self._wait_line(out, buf, pos, b"\r", _BIG_BULK, inline=False)
                        break
                    if cr - pos > max_line:
                        self._fail(out, _BIG_BULK)
                        break
                    if cr + 1 >= n:  # Redis wants a byte after the \r, whatever it is
                        self._wait_header(out, buf, pos, cr, _BIG_BULK)
                        break
                    if buf[pos] != 0x24:  # '$'
                        self._refuse(out, buf, pos, cr, _expected_dollar(buf[pos]), _BIG_BULK)
                        break
                    bulk = small.get(buf[pos + 1:cr])
                    if bulk is None:
                        bulk = parse_integer(buf[pos + 1:cr])
                        if bulk is None:
                            bulk = -1
                    if bulk < 0 or bulk > self._bulk_limit:
                        self._refuse(out, buf, pos, cr, self._bulk_error(bulk), _BIG_BULK)
                        break
                    pos = cr + 2
                end = pos + bulk
                if end + 2 > n:
                    self._wait_count(buf, pos, bulk + 2)
                    break
                # the two bytes after the value are skipped unseen, as Redis does
                args.append(buf[pos:end])
                pos = end + 2
                bulk = -1
                remaining -= 1
                if not remaining:
                    out.append(args)
                    if one:
                        if pos < n:
                            self._keep(buf, pos)
                        break
                continue

            if pos >= n:
                break
            if buf[pos] == 0x2A:  # '*'
                cr = buf.find(b"\r", pos)
                if cr < 0:
                    self._wait_line(out, buf, pos, b"\r", _BIG_MULTIBULK, inline=False)
                    break
                if cr - pos > max_line:
                    self._fail(out, _BIG_MULTIBULK)
                    break
                if cr + 1 >= n:
                    self._wait_header(out, buf, pos, cr, _BIG_MULTIBULK)
                    break
                count = small.get(buf[pos + 1:cr])
                if count is None:
                    count = parse_integer(buf[pos + 1:cr])
                if count is None or count > self._count_limit:
                    self._refuse(out, buf, pos, cr, self._count_error(count), _BIG_MULTIBULK)
                    break
                pos = cr + 2
                if count > 0:  # Redis skips *0 and *-1 (and any count <= 0)
                    args = []
                    remaining = count
                continue

            newline = buf.find(b"\n", pos)
            if newline < 0:
                self._wait_line(out, buf, pos, b"\n", _BIG_INLINE, inline=True)
                break
            end = newline - 1 if newline > pos and buf[newline - 1] == 0x0D else newline
            if end - pos > max_line:  # NUL or not: too big either way
                self._fail(out, _BIG_INLINE)
                break
            line = buf[pos:end]
            if _NEEDS_SDSSPLIT.search(line) is None:
                argv = line.split()
            elif 0 in line:
                self._stick(out, n - pos, _BIG_INLINE)
                break
            else:
                argv = _sdssplitargs(line)
                if argv is None:
                    self._fail(out, _UNBALANCED)
                    break
            pos = newline + 1
            if argv:  # an empty line is no request
                if len(argv) > self.max_args or (
                    self.max_bulk_bytes < len(line) and max(map(len, argv)) > self.max_bulk_bytes
                ):
                    # the limits of multibulk requests hold for this form too
                    self._fail(out, _BIG_INLINE)
                    break
                out.append(argv)
                if one:
                    if pos < n:
                        self._keep(buf, pos)
                    break

        self._args = args
        self._remaining = remaining
        self._bulk = bulk
        return out

    def _parse_split(self, buf: bytes) -> tuple[Parsed, int]:
        """The fast path: the leading well-formed multibulk requests of ``buf``
        and the offset where the rest begins (``parse_split``, compiled when
        ``redisp.protocol._resp`` was built)."""
        return _parse_split(buf, self._max_count, self._max_size)

    @property
    def idle(self) -> bool:
        """True between requests: nothing buffered, no request half read."""
        return not (self._parts or self._remaining or self._failed or self._stuck)

    def whole(self, data: bytes) -> Parsed | None:
        """The requests, if ``data`` is exactly whole multibulk requests in
        canonical form (what clients send), else None (then ``feed(data)``).
        Only while the parser is ``idle``, which it stays.

        What ``feed`` would return (``_parse_split`` takes only what
        ``_parse`` would), plus a proof that ``data`` is those requests
        encoded as ``encode_command`` would: the RESP door relays such a
        packet of forwarded commands as it came (routing/forwarding.py).
        """
        if data[:1] != b"*":
            return None
        out, pos = self._parse_split(data)
        return out if pos == len(data) and out else None

    def only_gets(self, data: bytes) -> list[bytes] | None:
        """The keys, if ``data`` is exactly whole ``GET key`` requests in
        canonical multibulk form (what clients send), else None (then
        ``feed(data)``).  Only while the parser is ``idle`` (the caller
        checks: the RESP door's ``dataReceived``).

        The RESP door's fast path (``only_gets``, compiled when
        ``redisp.protocol._resp`` was built), and the only other reader of the
        grammar: it returns exactly what ``feed`` would
        (tests/test_resp_paths.py checks that on random input).
        """
        return _only_gets(data, self._gets_known)

    # -- waiting and failing -------------------------------------------------------

    def _count_error(self, count: int | None) -> str:
        """Which limit a multibulk count past ``_count_limit`` broke."""
        if count is not None and self._tight_args < count <= INT_MAX:
            return _UNAUTH_MULTIBULK
        return _INVALID_MULTIBULK

    def _bulk_error(self, size: int) -> str:
        """Which limit a bulk length past ``_bulk_limit`` (or negative) broke."""
        if self._tight_bulk < size <= self.max_bulk_bytes:
            return _UNAUTH_BULK
        return _INVALID_BULK

    def _wait_count(self, buf: bytes, pos: int, need: int) -> None:
        tail = buf[pos:] if pos else buf
        self._parts = [tail]
        self._size = len(tail)
        self._need = need
        self._until = b""

    def _wait_line(
        self, out: Parsed, buf: bytes, pos: int, until: bytes, too_big: str, inline: bool
    ) -> None:
        """Keep the unterminated line at ``pos`` -- unless it already breaks a rule."""
        tail = buf[pos:] if pos else buf
        if 0 in tail:
            self._stick(out, len(tail), too_big)
            return
        size = len(tail)
        if inline and tail[-1] == 0x0D:
            size -= 1  # may yet be the \r of \r\n
        if size > self.max_inline_bytes:
            self._fail(out, too_big)
            return
        self._parts = [tail]
        self._size = len(tail)
        self._until = until
        self._too_big = too_big
        self._inline = inline

    def _wait_header(self, out: Parsed, buf: bytes, pos: int, cr: int, too_big: str) -> None:
        """A header line ending in the last byte: wait for the byte after its \\r."""
        if 0 in buf[pos:cr]:
            self._stick(out, len(buf) - pos, too_big)
        else:
            self._wait_count(buf, pos, cr - pos + 2)

    def _refuse(
        self, out: Parsed, buf: bytes, pos: int, cr: int, message: str, too_big: str
    ) -> None:
        """A header line that is wrong: ``message``, unless a NUL hides its \\r."""
        if 0 in buf[pos:cr]:
            self._stick(out, len(buf) - pos, too_big)
        else:
            self._fail(out, message)

    def _stick(self, out: Parsed, size: int, too_big: str) -> None:
        """A line that never ends (a NUL before its terminator)."""
        if size > self.max_inline_bytes:
            self._fail(out, too_big)
            return
        self._stuck = True
        self._size = size
        self._too_big = too_big
        self._parts = []

    def _fail(self, out: Parsed, message: str) -> Parsed:
        self._failed = True
        self._stuck = False
        self._parts = []
        self._args = []
        out.append(ProtocolError(message))
        return out


# -- the parser's fast paths: the Python reference, and redisp.protocol._resp ---------------


def parse_split(buf: bytes, max_count: int, max_size: int) -> tuple[Parsed, int]:
    """The leading well-formed multibulk requests of ``buf``, split at every
    CRLF, and the offset where the rest begins (``RequestParser._parse_split``).

    One ``bytes.split`` in C replaces a ``find`` and a slice per line.  A
    request is taken only if each of its bulk strings is a token exactly as
    long as its header says (``$<len>`` written canonically), which also
    proves the CRLF after it, and only with counts (at most ``max_count``,
    and those ``_SMALL`` knows) and sizes (at most ``max_size``) whose headers
    ``_parse`` would take under the limits: so it takes exactly what
    ``_parse`` would.  Anything else -- a CRLF inside a value, an unfinished
    request, a limit, an inline request, an error -- stops here, and
    ``_parse`` goes on from the returned offset byte by byte.

    The reference for ``redisp.protocol._resp.parse_split``, which answers the same
    on every input (tests/test_resp_c.py) and replaces it when built.
    """
    tokens = buf.split(b"\r\n")
    last = len(tokens) - 1  # the one token no CRLF ends
    small = _SMALL
    headers = _HEADERS
    known = min(len(_HEADERS), max_size + 1)
    out: Parsed = []
    i = 0
    while i < last:
        token = tokens[i]
        if token[:1] != b"*":
            break
        count = small.get(token[1:])
        if count is None or count <= 0 or count > max_count:
            break
        end = i + 2 * count
        if end >= last:
            break
        args = tokens[i + 2:end + 1:2]
        if count == 2:  # GET key: the request that matters most, unrolled
            a, b = args
            if (
                len(a) < known and tokens[i + 1] == headers[len(a)]
                and len(b) < known and tokens[i + 3] == headers[len(b)]
            ):
                out.append(args)
                i = end + 1
                continue
        j = i + 1
        for arg in args:
            size = len(arg)
            if size < known:
                if tokens[j] != headers[size]:
                    break
            elif size > max_size or tokens[j] != b"$%d" % size:
                break
            j += 2
        else:
            out.append(args)
            i = end + 1
            continue
        break
    if i == last and not tokens[last]:
        return out, len(buf)
    return out, sum(map(len, tokens[:i])) + 2 * i


def only_gets(data: bytes, gets_known: int) -> list[bytes] | None:
    """The keys, if ``data`` is exactly whole ``GET key`` requests in
    canonical multibulk form, each key shorter than ``gets_known`` (at most
    ``len(_HEADERS)``), else None (``RequestParser.only_gets``).

    Each request must split into the five tokens ``*2 $3 GET $<n> key`` (the
    name ``GET`` or ``get``) with ``len(key) == n``, which proves its framing
    and its limits as ``parse_split`` does.  The checks are list operations
    in C, none per request in Python (see bench/NOTES-perf.md, "What changed
    and why").  The reference for ``redisp.protocol._resp.only_gets``, which answers
    the same on every input (tests/test_resp_c.py) and replaces it when built.
    """
    tokens = data.split(b"\r\n")
    n = len(tokens) - 1
    if n == 5:  # one request (-P 1): fewer list operations
        star, dollar, name, header, key, rest = tokens
        if (
            star == b"*2" and dollar == b"$3" and (name == b"GET" or name == b"get")
            and not rest and len(key) < gets_known and header == _HEADERS[len(key)]
        ):
            return [key]
        return None
    count = n // 5
    if n % 5 or not count or tokens[n]:
        return None
    if tokens[0:n:5].count(b"*2") != count or tokens[1:n:5].count(b"$3") != count:
        return None
    names = tokens[2:n:5]
    if names.count(b"GET") != count and names.count(b"GET") + names.count(b"get") != count:
        return None
    keys = tokens[4:n:5]
    sizes = list(map(len, keys))
    if max(sizes) >= gets_known:
        return None
    if list(map(_HEADERS.__getitem__, sizes)) != tokens[3:n:5]:
        return None
    return keys


# The compiled versions when redisp.protocol._resp was built (setup.py: a C compiler
# and Python's headers), else the references above; RequestParser looks the
# names up at each call.
try:
    from redisp.protocol._resp import only_gets as _only_gets
    from redisp.protocol._resp import parse_split as _parse_split
except ImportError:  # not built: the same answers, more time (bench/NOTES-perf.md)
    _only_gets = only_gets
    _parse_split = parse_split


class LogLimiter:
    """At most one log line per ``period`` about something clients cause at
    will (malformed requests), each saying how many were left unlogged.

    The caller passes the time, so this stays free of any clock; the count
    left unlogged after the last line is reported with the next one.
    """

    __slots__ = ("period", "_next", "_unlogged")

    def __init__(self, period: float = 1.0) -> None:
        self.period = period
        self._next = float("-inf")
        self._unlogged = 0

    def admit(self, now: float) -> int | None:
        """None: do not log this one.  Otherwise log it, with the returned
        number of events not logged since the previous line."""
        if now < self._next:
            self._unlogged += 1
            return None
        self._next = now + self.period
        unlogged, self._unlogged = self._unlogged, 0
        return unlogged


def _expected_dollar(byte: int) -> str:
    # Redis prints the byte with %c, raw (ProtocolError.reply keeps it one
    # byte), then blanks \r and \n so the reply stays one line.
    shown = " " if byte in (0x0D, 0x0A) else chr(byte)
    return f"Protocol error: expected '$', got '{shown}'"


# -- replies ----------------------------------------------------------------------

CRLF = b"\r\n"
OK = b"+OK\r\n"
PONG = b"+PONG\r\n"
EMPTY_ARRAY = b"*0\r\n"

#: "$<n>\r\n" for the value sizes most replies have
_BULK_HEADERS = [b"$%d\r\n" % i for i in range(1024)]


def bulk(value: bytes) -> bytes:
    """A bulk string, the same in both protocols."""
    size = len(value)
    if size < 1024:
        return _BULK_HEADERS[size] + value + CRLF
    return b"$%d\r\n%b\r\n" % (size, value)


def simple(text: str) -> bytes:
    """A simple (status) string such as ``+OK``; ``text`` must be one line."""
    return b"+" + text.encode() + CRLF


def error(message: str | bytes) -> bytes:
    """An error reply; ``message`` starts with its code word (``ERR ...``).

    Line breaks become blanks, as Redis does, since the reply is one line and
    the text may quote a client's input.
    """
    if isinstance(message, str):
        message = message.encode("utf-8", "replace")
    return b"-" + message.replace(b"\r", b" ").replace(b"\n", b" ") + CRLF


def integer(value: int) -> bytes:
    return b":%d\r\n" % value


def array(items: list[bytes]) -> bytes:
    """An array of already encoded replies."""
    return b"*%d\r\n" % len(items) + b"".join(items)


def encode_command(argv: Sequence[bytes]) -> bytes:
    """A command as clients send it: how redisp writes its own calls to Redis,
    on the txredisapi connection and on the relay, sentinel and cluster ones."""
    return b"*%d\r\n" % len(argv) + b"".join(
        [b"$%d\r\n%b\r\n" % (len(arg), arg) for arg in argv])


class Encoder:
    """The replies whose encoding depends on the connection's protocol.

    One instance per protocol version (``RESP2``, ``RESP3``); a connection
    holds the one ``HELLO`` chose.  Protocol-independent encoders are here
    too, so a command needs nothing but its connection's encoder.
    """

    __slots__ = ("version", "null")

    bulk = staticmethod(bulk)
    simple = staticmethod(simple)
    error = staticmethod(error)
    integer = staticmethod(integer)
    array = staticmethod(array)

    def __init__(self, version: int) -> None:
        self.version = version
        #: a missing value: ``$-1`` / ``_``
        self.null = b"_\r\n" if version == 3 else b"$-1\r\n"

    def map(self, pairs: list[tuple[bytes, bytes]]) -> bytes:
        """A map of encoded keys to encoded values: ``%N`` in RESP3, a flat
        array of 2N elements in RESP2."""
        body = b"".join(key + value for key, value in pairs)
        if self.version == 3:
            return b"%%%d\r\n" % len(pairs) + body
        return b"*%d\r\n" % (2 * len(pairs)) + body

    def set(self, items: list[bytes]) -> bytes:
        """A set of encoded replies: ``~N`` in RESP3, an array in RESP2."""
        marker = b"~" if self.version == 3 else b"*"
        return marker + b"%d\r\n" % len(items) + b"".join(items)

    def __repr__(self) -> str:
        return f"<Encoder RESP{self.version}>"


RESP2 = Encoder(2)
RESP3 = Encoder(3)


def encoder_for(version: int) -> Encoder:
    """The encoder of protocol ``version`` (2 or 3)."""
    return RESP3 if version == 3 else RESP2
