"""Where a RESP reply frame ends, without decoding what it carries.

A forwarded command's reply goes back to the client as the bytes Redis sent
(SPEC §7): decoding it into Python values and encoding it again would cost
per element, could change it (RESP3 doubles, verbatim strings, attributes)
and is not needed.  What the relay does need is where each top-level frame
ends, so that replies can be matched to requests in order, and whether a
frame is a push.  ``FrameScanner`` answers exactly that, for RESP2 and RESP3.
(hiredis cannot: it decodes every reply, and it knows neither blob errors
nor attributes as parts of the frame they annotate.)

How the scanner stays linear in its input, whatever the chunking:

* A chunk that holds whole frames -- the common case -- is scanned in place
  and each frame is one slice of it (the chunk itself when it is exactly one
  frame).  Nothing is copied into a buffer first.
* A frame cut by the end of a chunk keeps its scanned bytes as the chunks
  they came in and is joined once, when its last byte arrives: one copy of
  the frame, however many chunks it spans.
* A bulk body is skipped by its announced length, never looked at: a 512 MiB
  value arriving in 64 KiB chunks costs one subtraction per chunk, then the
  join.  Only the two bytes after it are checked (``\\r\\n``), which catches
  a backing whose lengths are off before it desynchronises every reply.
* A header line cut by a chunk boundary is carried to the next chunk; the
  new chunk is searched for the line's end, never the carried part again,
  and it is joined to the carried part at most once.
* Open aggregates are a stack of element counts, so depth costs no recursion.

Anything that is not RESP -- an unknown type byte, a bad length, a missing
``\\r\\n`` after a bulk, a malformed integer, boolean, double or null -- raises
``FrameError``, and the scanner is then unusable: a stream whose framing is
lost cannot be resynchronised, so its connection must go.

An attribute (RESP3 ``|``) annotates the frame after it; at top level the
attribute and that frame come out as one frame.  ``frame_kind`` gives the
type byte of the annotated frame, e.g. ``PUSH`` for a push with attributes.

``decode`` turns one complete frame into Python values, for the few replies
redisp must look into (EXEC, subscription confirmations, COMMAND): only when
asked, never on the relay path.
"""

from __future__ import annotations

from typing import Any

from redisp.protocol.codec import parse_integer

__all__ = [
    "FrameError", "FrameScanner", "frame_kind", "decode", "ErrorReply", "Push",
    "SIMPLE", "ERROR", "INTEGER", "BULK", "ARRAY", "NULL", "BOOLEAN", "DOUBLE",
    "BIG_NUMBER", "BLOB_ERROR", "VERBATIM", "MAP", "SET", "ATTRIBUTE", "PUSH",
]

# the type byte of each frame, as ints (what ``frame[0]`` gives)
SIMPLE = 0x2B  # +
ERROR = 0x2D  # -
INTEGER = 0x3A  # :
BULK = 0x24  # $
ARRAY = 0x2A  # *
NULL = 0x5F  # _
BOOLEAN = 0x23  # #
DOUBLE = 0x2C  # ,
BIG_NUMBER = 0x28  # (
BLOB_ERROR = 0x21  # !
VERBATIM = 0x3D  # =
MAP = 0x25  # %
SET = 0x7E  # ~
ATTRIBUTE = 0x7C  # |
PUSH = 0x3E  # >

CRLF = b"\r\n"

#: a line is its whole value
_LINE_TYPES = frozenset((SIMPLE, ERROR, INTEGER, NULL, BOOLEAN, DOUBLE, BIG_NUMBER))
#: a length, then that many bytes and CRLF
_BLOB_TYPES = frozenset((BULK, BLOB_ERROR, VERBATIM))
#: a count, then that many frames (twice as many for maps and attributes)
_AGGREGATE_TYPES = frozenset((ARRAY, SET, PUSH, MAP, ATTRIBUTE))

#: Redis's own proto-max-bulk-len: no header line Redis sends comes near it
DEFAULT_MAX_LINE = 512 * 1024 * 1024


class FrameError(Exception):
    """The backing sent something that is not RESP; its stream is lost.

    ``frames`` holds the frames the failing chunk completed before the
    garbage began: they are good, and their callers are owed them.
    """

    frames: list[bytes] = []


def _line_ok(kind: int, line: bytes) -> bool:
    """Whether a line-typed value is well-formed (``+`` and ``-`` always are)."""
    if kind == INTEGER or kind == BIG_NUMBER:
        if kind == INTEGER:
            return parse_integer(line) is not None
        digits = line[1:] if line[:1] == b"-" else line
        return digits.isdigit()
    if kind == NULL:
        return not line
    if kind == BOOLEAN:
        return line == b"t" or line == b"f"
    if kind == DOUBLE:
        try:
            float(line)  # also takes inf, -inf and nan, as Redis writes them
        except ValueError:
            return False
        return line.strip() == line and b"_" not in line
    return True


class FrameScanner:
    """Cuts a stream of RESP replies into complete top-level frames, as bytes.

    ``feed(chunk)`` returns the frames that chunk completes, in order, each as
    one ``bytes``; the chunk may be cut anywhere.  See the module docstring
    for why this is linear and never copies a frame more than once.
    """

    __slots__ = ("max_line", "_parts", "_stack", "_attributes", "_skip", "_carry",
                 "_carried", "_broken")

    def __init__(self, max_line: int = DEFAULT_MAX_LINE) -> None:
        self.max_line = max_line
        # scanned bytes of the frame in progress, from earlier chunks
        self._parts: list[bytes] = []
        # elements still owed by each open aggregate, innermost last
        self._stack: list[int] = []
        # depths (stack lengths) at which an open aggregate is an attribute
        self._attributes: list[int] = []
        # bytes of a bulk body, plus its CRLF, still to come
        self._skip = 0
        # an unterminated header line, as the chunks it came in, and its length
        self._carry: list[bytes] = []
        self._carried = 0
        self._broken: FrameError | None = None

    @property
    def idle(self) -> bool:
        """True between frames: nothing of a frame has been seen yet."""
        return not (self._parts or self._stack or self._skip or self._carry)

    def feed(self, data: bytes) -> list[bytes]:
        """The frames ``data`` completes; raises ``FrameError`` on non-RESP."""
        if self._broken is not None:
            raise FrameError(*self._broken.args)
        frames: list[bytes] = []
        try:
            return self._feed(data, frames)
        except FrameError as e:
            e.frames = frames
            self._broken = e
            raise

    def _feed(self, data: bytes, frames: list[bytes]) -> list[bytes]:
        parts = self._parts
        stack = self._stack
        n = len(data)
        pos = 0
        if self._skip:
            skip = self._skip
            if n < skip:
                parts.append(data)
                self._skip = skip - n
                return frames
            self._skip = 0
            pos = skip
            if pos >= 2:
                tail = data[pos - 2:pos]
            else:  # the CRLF straddles the chunks
                tail = parts[-1][-1:] + data[:1]
            if tail != CRLF:
                raise FrameError("bulk string not followed by CRLF")
            if self._completed(stack):
                frames.append(self._join(data[:pos]))
            start = pos
            # the frame in progress, if any, continues from parts, at 0
            if not self.idle:
                start = 0
        elif self._carry:
            end = data.find(b"\n")
            if end < 0:
                self._carry_more(data)
                return frames
            # one copy of this chunk, once: linear however the lines are cut
            self._carry.append(data)
            data = b"".join(self._carry)
            self._carry.clear()
            self._carried = 0
            n = len(data)
            start = 0
        else:
            start = 0

        find = data.find
        line_types = _LINE_TYPES
        blob_types = _BLOB_TYPES
        while pos < n:
            eol = find(CRLF, pos)
            if eol < 0:
                if pos > start:
                    parts.append(data[start:pos])
                self._carry_more(data[pos:])
                return frames
            kind = data[pos]
            if kind in line_types:
                if kind != SIMPLE and kind != ERROR and not _line_ok(kind, data[pos + 1:eol]):
                    raise FrameError(f"bad {chr(kind)!r} value {data[pos + 1:eol][:40]!r}")
                pos = eol + 2
            elif kind in blob_types:
                size = parse_integer(data[pos + 1:eol])
                if size is None or size < -1:
                    raise FrameError(f"bad {chr(kind)!r} length {data[pos + 1:eol][:40]!r}")
                if size < 0:
                    pos = eol + 2
                else:
                    if kind == VERBATIM and size < 4:
                        raise FrameError("verbatim string shorter than its format")
                    end = eol + 4 + size
                    if end > n:
                        # the body is skipped by length, in the chunks to come
                        parts.append(data[start:])
                        self._skip = end - n
                        return frames
                    if data[end - 2:end] != CRLF:
                        raise FrameError("bulk string not followed by CRLF")
                    pos = end
            elif kind in _AGGREGATE_TYPES:
                count = parse_integer(data[pos + 1:eol])
                if count is None or count < -1:
                    raise FrameError(f"bad {chr(kind)!r} count {data[pos + 1:eol][:40]!r}")
                pos = eol + 2
                if count > 0:
                    if kind == MAP or kind == ATTRIBUTE:
                        count *= 2
                        if kind == ATTRIBUTE:
                            self._attributes.append(len(stack) + 1)
                    stack.append(count)
                    continue
                if kind == ATTRIBUTE:
                    continue  # an empty attribute: still annotates what follows
            else:
                raise FrameError(f"unknown reply type byte {data[pos:pos + 1]!r}")
            # one element done: close what it completes; emit at top level
            if not stack or self._completed(stack):
                frames.append(self._join(data[start:pos]) if parts else data[start:pos])
                start = pos
        if start < n:
            parts.append(data[start:] if start else data)
        return frames

    def _completed(self, stack: list[int]) -> bool:
        """Count one element done; True when that ends a top-level frame."""
        attributes = self._attributes
        while stack:
            stack[-1] -= 1
            if stack[-1]:
                return False
            if attributes and attributes[-1] == len(stack):
                # an attribute is not an element of its parent: the frame it
                # annotates is still to come
                stack.pop()
                attributes.pop()
                return False
            stack.pop()
        return True

    def _join(self, last: bytes) -> bytes:
        parts = self._parts
        parts.append(last)
        frame = b"".join(parts)
        parts.clear()
        return frame

    def _carry_more(self, piece: bytes) -> None:
        self._carried += len(piece)
        if self._carried > self.max_line:
            raise FrameError(f"reply line longer than {self.max_line} bytes")
        self._carry.append(piece)


# -- looking into a frame, when asked -------------------------------------------


class ErrorReply:
    """An error reply (``-`` or ``!``), as a value rather than an exception."""

    __slots__ = ("message",)

    def __init__(self, message: bytes) -> None:
        self.message = message

    def __eq__(self, other: object) -> bool:
        return isinstance(other, ErrorReply) and other.message == self.message

    def __hash__(self) -> int:
        return hash(self.message)

    def __repr__(self) -> str:
        return f"ErrorReply({self.message!r})"


class Push(list):
    """A RESP3 push frame's elements: a list that says it was a push."""


def frame_kind(frame: bytes) -> int:
    """The type byte of a complete frame, past any attribute that annotates it."""
    pos = 0
    while frame[pos] == ATTRIBUTE:
        _attribute, pos = _decode_one(frame, pos, attribute_as_map=True)
    return frame[pos]


def decode(frame: bytes) -> Any:
    """One complete frame as Python values.

    bytes for simple, bulk and verbatim strings (the text after ``txt:``),
    int for integers and big numbers, float, bool, None for every null,
    ``ErrorReply`` for errors, list for arrays and sets, ``Push`` for push
    frames, dict for maps (list keys become tuples); attributes are dropped.
    Iterative, so no nesting depth can exhaust the Python stack.  Raises
    ``FrameError`` if ``frame`` is not exactly one well-formed frame.
    """
    value, pos = _decode_one(frame, 0)
    if pos != len(frame):
        raise FrameError("bytes after the frame")
    return value


def as_map(value: Any) -> dict | None:
    """A decoded reply that Redis sends as a map: a RESP3 map as is, a RESP2
    flat ``[key, value, …]`` array as a dict; None for anything else."""
    if isinstance(value, dict):
        return value
    if isinstance(value, list) and len(value) % 2 == 0:
        return dict(zip(value[0::2], value[1::2], strict=True))
    return None


class _Open:
    """An aggregate being decoded: its values so far and how many are owed."""

    __slots__ = ("kind", "items", "owed", "key")

    def __init__(self, kind: int, owed: int) -> None:
        self.kind = kind
        self.owed = owed
        self.items: Any = {} if kind == MAP or kind == ATTRIBUTE else (
            Push() if kind == PUSH else [])
        self.key: Any = _NOTHING


_NOTHING = object()


def _decode_one(buf: bytes, pos: int, attribute_as_map: bool = False) -> tuple[Any, int]:
    try:
        return _decode_one_unchecked(buf, pos, attribute_as_map)
    except (IndexError, ValueError) as e:
        raise FrameError(f"not a complete frame ({e})") from None


def _decode_one_unchecked(buf: bytes, pos: int, attribute_as_map: bool) -> tuple[Any, int]:
    stack: list[_Open] = []
    while True:
        kind = buf[pos]
        eol = buf.index(CRLF, pos)
        line = buf[pos + 1:eol]
        pos = eol + 2
        if kind in _AGGREGATE_TYPES:
            count = int(line)
            if kind == ATTRIBUTE and not (attribute_as_map and not stack):
                if count > 0:
                    stack.append(_Open(ATTRIBUTE, 2 * count))
                continue  # annotates the element that follows: not a value
            if count > 0:
                stack.append(_Open(kind, 2 * count if kind in (MAP, ATTRIBUTE) else count))
                continue
            if count < 0:
                value: Any = None
            else:
                value = _Open(kind, 0).items
        elif kind in _BLOB_TYPES:
            size = int(line)
            if size < 0:
                value = None
            else:
                body = buf[pos:pos + size]
                if len(body) != size or buf[pos + size:pos + size + 2] != CRLF:
                    raise FrameError("truncated bulk string")
                pos += size + 2
                value = ErrorReply(body) if kind == BLOB_ERROR else (
                    body[4:] if kind == VERBATIM else body)
        elif kind in _LINE_TYPES and _line_ok(kind, line):
            if kind == SIMPLE:
                value = line
            elif kind == ERROR:
                value = ErrorReply(line)
            elif kind == INTEGER or kind == BIG_NUMBER:
                value = int(line)
            elif kind == NULL:
                value = None
            elif kind == BOOLEAN:
                value = line == b"t"
            else:
                value = float(line)
        else:
            raise FrameError(f"bad {chr(kind)!r} value")
        # a value is complete: hand it to the aggregates it completes
        while stack:
            top = stack[-1]
            if top.kind == MAP or top.kind == ATTRIBUTE:
                if top.key is _NOTHING:
                    top.key = _hashable(value)
                else:
                    top.items[top.key] = value
                    top.key = _NOTHING
            else:
                top.items.append(value)
            top.owed -= 1
            if top.owed:
                break
            stack.pop()
            if top.kind == ATTRIBUTE and not (attribute_as_map and not stack):
                break  # the annotated element is still to come
            value = top.items
        else:
            return value, pos


def _hashable(value: Any) -> Any:
    if isinstance(value, list):
        return tuple(_hashable(v) for v in value)
    if isinstance(value, dict):
        return tuple((k, _hashable(v)) for k, v in value.items())
    return value
