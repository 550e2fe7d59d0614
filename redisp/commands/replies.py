"""GET and MGET replies, and replies too large to build whole.

A reply is normally one ``bytes``.  One past ``LARGE`` bytes (an MGET of a
thousand 1 MiB values, a pipeline of GETs whose values add up to megabytes,
one huge value fetched from Redis) is a ``Chunked`` instead: the encoded
headers and the values themselves, by reference, which the RESP door encodes
``CHUNK`` bytes at a time as the client's socket drains.  Building such a
reply whole and writing it copied every value several times over (the
encoded reply, then Twisted's send buffer joining what was written), and
sending it in one piece held every other client until it was out (SPEC §9;
see bench/NOTES-perf.md, "Issue 8, RESP door").  Here each value is copied once, into the
chunk that carries it, and the reply's memory is released as it is sent.
"""

from __future__ import annotations

from redisp.protocol.codec import CRLF, bulk

__all__ = ["CHUNK", "LARGE", "Chunked", "bulk_reply", "get_replies", "join_replies",
           "values_array"]

#: bytes of a large reply encoded and written at once: more than the
#: transport's 64 KiB send buffer, so each write pauses the connection until
#: the client has read it
CHUNK = 256 * 1024
#: replies larger than this are sent as a ``Chunked``
LARGE = CHUNK

#: "$<n>", the bulk header of each small n, for ``get_replies``
_HEADERS = [b"$%d" % i for i in range(1024)]
#: packets of GETs of at most this many values, each under 1024 bytes, make
#: a reply under ``LARGE`` without adding their sizes up
_SMALL_PACKET = LARGE // 1032


# redisp.protocol._resp.bulks when built (setup.py): the small case of get_replies in
# C; it declines (None) whatever it does not take, which then goes on here
try:
    from redisp.protocol._resp import bulks as _bulks
except ImportError:
    _bulks = None


class Chunked:
    """A reply kept as parts (encoded headers and values by reference),
    encoded ``take(limit)`` bytes at a time.  ``len()`` is what is left."""

    __slots__ = ("_parts", "_index", "_offset", "left")

    def __init__(self, parts: list[bytes]) -> None:
        self._parts = parts
        self._index = 0  # the part the next chunk starts in ...
        self._offset = 0  # ... and where in it
        self.left = sum(map(len, parts))

    def __len__(self) -> int:
        return self.left

    def take(self, limit: int) -> bytes:
        """The next at most ``limit`` bytes of the reply, each byte copied once
        (``bytes.join`` reads the slices through memoryviews); the parts
        wholly taken are dropped, so a value fetched for this reply alone is
        freed once sent."""
        parts = self._parts
        index, offset = self._index, self._offset
        pieces: list = []
        room = limit
        while room and index < len(parts):
            part = parts[index]
            rest = len(part) - offset
            if rest <= room:
                pieces.append(memoryview(part)[offset:] if offset else part)
                parts[index] = b""
                room -= rest
                index += 1
                offset = 0
            else:
                pieces.append(memoryview(part)[offset:offset + room])
                offset += room
                room = 0
        self._index, self._offset = index, offset
        chunk = b"".join(pieces)
        self.left -= len(chunk)
        return chunk

    def extend_into(self, parts: list[bytes]) -> None:
        """Append what is left of this reply, as parts, to ``parts``."""
        rest = self._parts[self._index:]
        if rest and self._offset:
            rest[0] = rest[0][self._offset:]
        parts.extend(rest)

    def __repr__(self) -> str:
        return f"<Chunked {self.left} bytes left>"


def bulk_reply(value: bytes) -> bytes | Chunked:
    """``bulk(value)``, or a ``Chunked`` holding ``value`` uncopied when large."""
    if len(value) <= LARGE:
        return bulk(value)
    return Chunked([b"$%d\r\n" % len(value), value, CRLF])


def get_replies(values: list[bytes]) -> bytes | Chunked:
    """The replies of pipelined GETs that all had a value, in one piece.

    Small (the common case: at most ``_SMALL_PACKET`` values, each under
    1024 bytes): one ``CRLF.join`` of an interleaved list filled by slice
    assignment, so no Python code runs per value (see bench/NOTES-perf.md,
    "Figures moved out of the code").  Larger:
    the values' sizes decide between one ``bytes`` and a ``Chunked``.
    """
    if _bulks is not None:  # compiled: one pass, the reply written in place
        reply = _bulks(values, LARGE)
        if reply is not None:
            return reply
    count = len(values)
    sizes = list(map(len, values))
    if count <= _SMALL_PACKET and count and max(sizes) < 1024:
        parts: list[bytes] = [b""] * (2 * count + 1)
        parts[0:-1:2] = map(_HEADERS.__getitem__, sizes)
        parts[1::2] = values
        return CRLF.join(parts)
    if sum(sizes) + 16 * count <= LARGE:
        return b"".join(map(bulk, values))
    headers = {size: b"$%d\r\n" % size for size in set(sizes)}  # one object per size
    parts = [CRLF] * (3 * count)
    parts[0::3] = map(headers.__getitem__, sizes)
    parts[1::3] = values
    return Chunked(parts)


def values_array(values: list[bytes | None], null: bytes) -> bytes | Chunked:
    """MGET's reply: an array of bulk strings, ``null`` for a missing value."""
    count = len(values)
    if sum(map(len, filter(None, values))) + 16 * count <= LARGE:
        return b"*%d\r\n" % count + b"".join(
            [null if value is None else bulk(value) for value in values]
        )
    parts = [b"*%d\r\n" % count]
    headers: dict[int, bytes] = {}  # one object per size
    for value in values:
        if value is None:
            parts.append(null)
            continue
        size = len(value)
        header = headers.get(size)
        if header is None:
            header = headers[size] = b"$%d\r\n" % size
        parts += (header, value, CRLF)
    return Chunked(parts)


def join_replies(replies: list[bytes | Chunked]) -> bytes | Chunked:
    """Several replies as one: ``bytes`` when they all are and the total is
    not large, else one ``Chunked`` over all of them."""
    if all(reply.__class__ is bytes for reply in replies):
        if sum(map(len, replies)) <= LARGE:
            return b"".join(replies)  # type: ignore[arg-type]
        return Chunked(list(replies))  # type: ignore[arg-type]
    parts: list[bytes] = []
    for reply in replies:
        if reply.__class__ is bytes:
            parts.append(reply)  # type: ignore[arg-type]
        else:
            reply.extend_into(parts)  # type: ignore[union-attr]
    return Chunked(parts)
